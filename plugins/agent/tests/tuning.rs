//! Raft tuning where users run it: `[store.tuning]` in the agent's config (and its
//! environment overrides), and `datasync serve` flags (the real binary), checked with
//! errors that name the field, and reaching the store.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use datasync::{Key, PutOptions, StoreError, Value};
use datasync_agent::{AgentConfig, AnyStore, StoreConfig};
use datasync_integration::free_port;

mod common;
use common::Running;

const BIN: &str = env!("CARGO_BIN_EXE_datasync");

fn parse(text: &str, env: &[(&str, &str)]) -> Result<AgentConfig, String> {
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    AgentConfig::parse(text, "agent.toml", env).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_tunes_the_store_and_names_a_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[store]\nkind = \"raft\"\ndir = {:?}\n[store.tuning]\nmax_value_size = 16\n",
        dir.path().join("data").display().to_string()
    );
    // An override reaches a tuning key too.
    let config = parse(&text, &[("DATASYNC__STORE__TUNING__SNAPSHOT_EVERY", "500")]).unwrap();
    let aged = parse(&format!("{text}history_age_s = 3600\n"), &[]).unwrap();
    let StoreConfig::Raft { tuning: aged, .. } = &aged.store else {
        panic!("{:?}", aged.store);
    };
    assert_eq!(
        aged.apply(datasync_raft::RaftConfig::default()).history_age,
        Some(Duration::from_secs(3600))
    );
    let StoreConfig::Raft { tuning, .. } = &config.store else {
        panic!("{:?}", config.store);
    };
    assert_eq!(
        (tuning.max_value_size, tuning.snapshot_every),
        (Some(16), Some(500))
    );
    let store = AnyStore::open(&config.store).await.unwrap();
    let refused = store
        .writer()
        .put(
            &Key::new("k").unwrap(),
            Value::from(vec![0u8; 17]),
            PutOptions::new(),
        )
        .await;
    assert!(
        matches!(refused, Err(StoreError::ValueTooLarge { max: 16, .. })),
        "the store has the configured limit: {refused:?}"
    );
    store.shutdown().await;

    for (bad, field) in [
        ("max_value_size = 0", "max_value_size"),
        ("max_value_size = 100000000", "max_value_size"),
        ("snapshot_every = 0", "snapshot_every"),
        ("snapshot_log_bytes = 1024", "snapshot_log_bytes"),
        (
            "snapshot_log_bytes = 9000000000000000000",
            "snapshot_log_bytes",
        ),
        ("log_segment = 1024", "log_segment"),
        ("heartbeat_ms = 0", "heartbeat_ms"),
        ("heartbeat_ms = 300", "election_min_ms"),
        ("election_max_ms = 400", "election_max_ms"),
        ("forward_timeout_ms = 0", "forward_timeout_ms"),
        ("heartbeat_ms = 9000000000000000000", "heartbeat_ms"),
        ("election_max_ms = 9000000000000000000", "election_max_ms"),
        (
            "forward_timeout_ms = 9000000000000000000",
            "forward_timeout_ms",
        ),
        ("log_segment = 1099511627776", "log_segment"),
        ("snapshot_every = 9000000000000000000", "snapshot_every"),
        ("snapshot_evry = 5", "snapshot_evry"),
        ("history_age_s = 0", "history_age_s"),
        ("history_age_s = 9000000000000000000", "history_age_s"),
    ] {
        let err = parse(
            &format!("[store]\nkind = \"raft\"\n[store.tuning]\n{bad}\n"),
            &[],
        )
        .expect_err(bad);
        assert!(
            err.contains("agent.toml") && err.contains(field),
            "{bad}: {err}"
        );
    }
    let err = parse(
        "[store]\nkind = \"raft\"\n",
        &[("DATASYNC__STORE__TUNING__HEARTBEAT_MS", "0")],
    )
    .unwrap_err();
    assert!(
        err.contains("DATASYNC__STORE__TUNING__HEARTBEAT_MS") && err.contains("heartbeat_ms"),
        "{err}"
    );
}

#[test]
fn serve_flags_tune_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "a secret shared by the test cluster\n").unwrap();
    let listen = format!("127.0.0.1:{}", free_port().unwrap());
    let serve = |extra: &[&str]| {
        let mut c = Command::new(BIN);
        c.arg("--secret-file")
            .arg(&secret)
            .args(["serve", "--listen", &listen, "--dir"])
            .arg(dir.path().join("n1"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    };
    let bad = serve(&["--heartbeat-ms", "400"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("election_min_ms"),
        "{bad:?}"
    );
    // Past u64::MAX / 2 ms, raft's arithmetic would overflow: refused first.
    let huge = serve(&["--election-max-ms", "18446744073709551615"])
        .output()
        .unwrap();
    assert_eq!(huge.status.code(), Some(2), "{huge:?}");
    // A member's values must reach a follower within a heartbeat: 1 MiB per 100 ms.
    let big = serve(&["--max-value-size", "2000000"]).output().unwrap();
    assert_eq!(big.status.code(), Some(2), "{big:?}");
    assert!(
        String::from_utf8_lossy(&big.stderr).contains("max_value_size"),
        "{big:?}"
    );

    let mut cmd = serve(&["--max-value-size", "16", "--heartbeat-ms", "50"]);
    cmd.stderr(Stdio::null());
    let node = Running::spawn(cmd);
    let store = format!("raft://{listen}");
    let put = |value: &str| {
        Command::new(BIN)
            .args(["--store", &store, "--secret-file"])
            .arg(&secret)
            .args(["put", "k", value])
            .output()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !put("small").status.success() {
        assert!(Instant::now() < deadline, "the node never served");
        std::thread::sleep(Duration::from_millis(100));
    }
    let big = put("a value of seventeen+ bytes");
    assert_eq!(big.status.code(), Some(1), "{big:?}");
    assert!(
        String::from_utf8_lossy(&big.stderr).contains("limit is 16"),
        "{big:?}"
    );
    node.stop();
}
