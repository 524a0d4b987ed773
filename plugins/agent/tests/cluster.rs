//! A raft cluster of separate processes: three `datasync serve` nodes, an agent that
//! joins them as a fourth member (`[store.cluster]`), another agent on the cluster as a
//! remote client (`kind = "remote"`), and the CLI on `raft://` (put, get, members,
//! promotion, removal, a wrong secret). SIGTERM stops every process cleanly.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use datasync_integration::free_port;

mod common;
use common::Running;

const BIN: &str = env!("CARGO_BIN_EXE_datasync");

fn addr() -> String {
    format!("127.0.0.1:{}", free_port().unwrap())
}

fn serve(dir: &Path, secret: &Path, id: u64, listen: &str, join: Option<&str>) -> Running {
    let mut cmd = Command::new(BIN);
    cmd.arg("--secret-file").arg(secret).arg("serve");
    cmd.args(["--id", &id.to_string(), "--listen", listen, "--dir"]);
    cmd.arg(dir.join(format!("n{id}")));
    if let Some(seed) = join {
        cmd.args(["--join", seed]);
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    Running::spawn(cmd)
}

fn cli(store: &str, secret: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--store")
        .arg(store)
        .arg("--secret-file")
        .arg(secret)
        .args(args)
        .output()
        .unwrap()
}

/// Retries `args` until it succeeds (the cluster may still be electing or joining).
fn cli_ok(store: &str, secret: &Path, args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = cli(store, secret, args);
        if out.status.success() {
            return String::from_utf8(out.stdout).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "datasync {args:?} kept failing: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn agent(config: &Path) -> Running {
    Running::spawn({
        let mut c = Command::new(BIN);
        c.args(["agent", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    })
}

fn mirror_config(dir: &Path, name: &str, store: &str) -> (PathBuf, PathBuf) {
    let mirror = dir.join(format!("{name}-mirror"));
    let config = dir.join(format!("{name}.toml"));
    let text = format!(
        "{store}\n[plugins.file-mirror]\ndir = {:?}\n",
        mirror.display().to_string()
    );
    std::fs::write(&config, text).unwrap();
    (config, mirror)
}

#[test]
fn serve_members_remote_cli_and_agents_on_a_raft_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "a secret shared by the test cluster\n").unwrap();
    let addrs: Vec<String> = (0..3).map(|_| addr()).collect();
    let mut nodes = vec![serve(dir.path(), &secret, 1, &addrs[0], None)];
    let store = format!("raft://{}", addrs.join(","));
    // Node 1 bootstraps; the others join through it.
    cli_ok(&store, &secret, &["members"]);
    for id in 2..=3 {
        nodes.push(serve(
            dir.path(),
            &secret,
            id,
            &addrs[id as usize - 1],
            Some(&addrs[0]),
        ));
    }
    eventually("three voters", || {
        let out = cli(&store, &secret, &["members"]);
        String::from_utf8_lossy(&out.stdout)
            .matches("\tvoter\t")
            .count()
            == 3
    });

    // The CLI as a remote client: a put through one member, read through another.
    let rev = cli_ok(&store, &secret, &["put", "files/motd", "hello"]);
    assert!(rev.trim().starts_with('r'), "{rev}");
    let other = format!("raft://{}", addrs[2]);
    assert_eq!(
        cli_ok(&other, &secret, &["get", "files/motd"]).trim(),
        "hello"
    );

    // An agent as a fourth member, its plugin fed by its own replica.
    let a_listen = addr();
    let secret_file = secret.display().to_string();
    let member_store = format!(
        "[store]\nkind = \"raft\"\ndir = {:?}\nnode_id = 4\n[store.cluster]\nlisten = \"{a_listen}\"\n\
         secret_file = {secret_file:?}\njoin = [\"{}\"]\nlearner = true\n",
        dir.path().join("agent-data").display().to_string(),
        addrs[1]
    );
    let (config, member_mirror) = mirror_config(dir.path(), "member", &member_store);
    let member = agent(&config);
    eventually("the member agent mirrors the cluster", || {
        std::fs::read_to_string(member_mirror.join("motd")).is_ok_and(|t| t == "hello")
    });
    let listing = cli_ok(&store, &secret, &["--output", "json", "members"]);
    let m: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(m["learners"][0]["id"], 4, "{m}");
    // Promoted through the CLI, then removed again.
    cli_ok(&store, &secret, &["members", "add", "4", &a_listen]);
    let m: serde_json::Value =
        serde_json::from_str(&cli_ok(&store, &secret, &["--output", "json", "members"])).unwrap();
    assert_eq!(m["voters"].as_array().unwrap().len(), 4, "{m}");

    // An agent on the cluster as a remote client.
    let remote_store = format!(
        "[store]\nkind = \"remote\"\nendpoints = [\"{}\", \"{}\"]\nsecret_file = {secret_file:?}\n",
        addrs[2], addrs[0]
    );
    let (config, remote_mirror) = mirror_config(dir.path(), "remote", &remote_store);
    let remote = agent(&config);
    eventually("the remote agent mirrors the cluster", || {
        std::fs::read_to_string(remote_mirror.join("motd")).is_ok_and(|t| t == "hello")
    });
    cli_ok(&store, &secret, &["put", "files/later", "after"]);
    for m in [&member_mirror, &remote_mirror] {
        eventually("both agents see a later put", || {
            std::fs::read_to_string(m.join("later")).is_ok_and(|t| t == "after")
        });
    }

    cli_ok(&store, &secret, &["members", "remove", "4"]);
    let m: serde_json::Value =
        serde_json::from_str(&cli_ok(&store, &secret, &["--output", "json", "members"])).unwrap();
    assert_eq!(m["voters"].as_array().unwrap().len(), 3, "{m}");
    assert!(m["learners"].as_array().unwrap().is_empty(), "{m}");

    // A client without the secret is refused, with a reason.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "some other secret entirely").unwrap();
    let out = cli(&store, &wrong, &["get", "files/motd"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("authenticat"), "{err}");
    let out = Command::new(BIN)
        .args(["--store", &store, "get", "files/motd"])
        .env_remove("DATASYNC_SECRET_FILE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "no secret is bad usage");

    remote.stop();
    member.stop();
    for n in nodes {
        n.stop();
    }
}
