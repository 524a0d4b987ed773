//! `datasync snapshot save | status | restore` as an operator runs them: a backup of
//! the store a running agent holds, checked, restored into a new directory (a single
//! node, and a cluster's first member served by `datasync serve`) with the same keys,
//! values and revisions; a damaged file or a used directory is refused.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use datasync_integration::free_port;
use serde_json::Value as Json;

mod common;
use common::{Running, cli, ok};

const BIN: &str = env!("CARGO_BIN_EXE_datasync");

fn failed(out: Output, says: &str) {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(says), "{err}");
}

/// Every key with its value and revision, as JSON.
fn listing(store: &Path) -> Json {
    let l: Json = serde_json::from_str(&ok(cli(store, &["--output", "json", "ls"]))).unwrap();
    l["values"].clone()
}

#[test]
fn an_agents_store_is_saved_checked_and_restored() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nkind = \"raft\"\ndir = {:?}\n[plugins.file-mirror]\ndir = {:?}\n",
            data.display().to_string(),
            dir.path().join("mirror").display().to_string(),
        ),
    )
    .unwrap();
    let agent = Running::agent(BIN, &config);
    // Written through the running agent's socket, once it serves (its key is written
    // last).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !data.join("local.key").exists() {
        assert!(
            Instant::now() < deadline,
            "the agent never served its store"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ok(cli(&data, &["put", "files/a", "1"]));
    let binary = dir.path().join("binary");
    std::fs::write(&binary, [0u8, 159, 146, 150, 255]).unwrap();
    ok(cli(
        &data,
        &["put", "cfg/bin", "--file", binary.to_str().unwrap()],
    ));
    ok(cli(&data, &["put", "cfg/ttl", "t", "--ttl", "1h"]));
    ok(cli(&data, &["del", "files/a"]));
    ok(cli(&data, &["put", "files/b", "2"]));
    let before = listing(&data);

    let file = dir.path().join("backup.db");
    let saved = ok(cli(&data, &["snapshot", "save", file.to_str().unwrap()]));
    assert!(saved.starts_with("saved r5 (3 keys,"), "{saved}");
    let status: Json = serde_json::from_str(&ok(cli(
        &data,
        &[
            "--output",
            "json",
            "snapshot",
            "status",
            file.to_str().unwrap(),
        ],
    )))
    .unwrap();
    assert_eq!(
        (status["revision"].as_u64(), status["keys"].as_u64()),
        (Some(5), Some(3))
    );
    assert_eq!(status["sha256"].as_str().unwrap().len(), 64);

    // A damaged copy is refused, by status and by restore, which makes nothing.
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    let bad = dir.path().join("bad.db");
    std::fs::write(&bad, &bytes).unwrap();
    failed(
        cli(&data, &["snapshot", "status", bad.to_str().unwrap()]),
        "the file is damaged",
    );
    let nowhere = dir.path().join("nowhere");
    failed(
        cli(
            &data,
            &[
                "snapshot",
                "restore",
                bad.to_str().unwrap(),
                "--dir",
                nowhere.to_str().unwrap(),
            ],
        ),
        "damaged",
    );
    assert!(!nowhere.exists());
    std::fs::write(&bad, b"hello").unwrap();
    failed(
        cli(&data, &["snapshot", "status", bad.to_str().unwrap()]),
        "not a datasync backup",
    );

    // Restored into a new directory: the same keys, values and revisions.
    let restored = dir.path().join("restored");
    let r = ok(cli(
        &data,
        &[
            "snapshot",
            "restore",
            file.to_str().unwrap(),
            "--dir",
            restored.to_str().unwrap(),
        ],
    ));
    assert!(r.starts_with("restored r5 (3 keys)"), "{r}");
    assert_eq!(listing(&restored), before);
    let raw = cli(&restored, &["--output", "raw", "get", "cfg/bin"]);
    assert_eq!(raw.stdout, [0u8, 159, 146, 150, 255]);
    assert_eq!(ok(cli(&restored, &["put", "x", "y"])).trim(), "r6");
    failed(
        cli(
            &data,
            &[
                "snapshot",
                "restore",
                file.to_str().unwrap(),
                "--dir",
                restored.to_str().unwrap(),
            ],
        ),
        "is not empty",
    );
    agent.stop();

    // Restored as a cluster's first member, then served.
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "a secret for the restored cluster\n").unwrap();
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let n1 = dir.path().join("n1");
    ok(Command::new(BIN)
        .arg("--secret-file")
        .arg(&secret)
        .args([
            "snapshot",
            "restore",
            file.to_str().unwrap(),
            "--listen",
            &listen,
            "--dir",
        ])
        .arg(&n1)
        .output()
        .unwrap());
    let mut serve = Command::new(BIN);
    serve.arg("--secret-file").arg(&secret).arg("serve");
    serve
        .args(["--id", "1", "--listen", &listen, "--dir"])
        .arg(&n1);
    serve.stdout(Stdio::null()).stderr(Stdio::null());
    let node = Running::spawn(serve);
    let store = format!("raft://{listen}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let got = loop {
        let out = Command::new(BIN)
            .args(["--store", &store, "--secret-file"])
            .arg(&secret)
            .args(["get", "files/b"])
            .output()
            .unwrap();
        if out.status.success() {
            break String::from_utf8(out.stdout).unwrap();
        }
        assert!(Instant::now() < deadline, "{out:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(got.trim(), "2");
    node.stop();
}
