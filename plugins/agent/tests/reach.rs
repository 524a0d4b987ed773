//! The CLI next to a process that holds the embedded store (the real binaries): it
//! reaches the store through that process's Unix socket in the data directory, with no
//! setup, instead of failing on the store's lock.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use datasync_integration::free_port;

mod common;
use common::{Running, cli};

const BIN: &str = env!("CARGO_BIN_EXE_datasync");

/// Waits (up to 20 s) until `check` holds; `running` must not exit meanwhile.
async fn until(what: &str, running: &mut Running, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(
            running.0.exited().is_none(),
            "exited while waiting until {what}"
        );
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn stdout(out: &Output) -> String {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// `datasync watch cfg/` in one terminal, `datasync put cfg/b 2` in another, on the
/// default (embedded) store: the watch holds the store, the put reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_reaches_a_watch_that_holds_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let printed = dir.path().join("watch.out");
    let mut watch = Running::spawn({
        let mut c = Command::new(BIN);
        c.arg("--store")
            .arg(&data)
            .args(["watch", "cfg/", "--count", "2"])
            .stdout(std::fs::File::create(&printed).unwrap())
            .stderr(Stdio::null());
        c
    });
    let read = || std::fs::read_to_string(&printed).unwrap_or_default();
    until("the watch has its resync", &mut watch, || {
        read().contains("resync r")
    })
    .await;

    let put = cli(&data, &["put", "cfg/b", "2"]);
    let rev = stdout(&put).trim().to_owned();
    // The change is the watch's second event: it prints it and exits.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = watch.0.exited() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the watch never saw the put: {}",
            read()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    assert!(
        read().contains(&format!("{rev} Put cfg/b prev=- now=2")),
        "{}",
        read()
    );
    // No process holds it now: the CLI opens the store itself, and finds the write.
    assert!(
        !data.join("datasync.sock").exists(),
        "the socket is removed"
    );
    assert_eq!(stdout(&cli(&data, &["get", "cfg/b"])).trim(), "2");
}

/// A running agent on its embedded store takes its configuration from the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_configures_a_running_agent_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mirror = dir.path().join("mirror");
    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nkind = \"raft\"\ndir = {:?}\n[http]\nlisten = \"{addr}\"\n\
             [plugins.file-mirror]\ndir = {:?}\n",
            data.display().to_string(),
            mirror.display().to_string()
        ),
    )
    .unwrap();
    let mut agent = Running::agent(BIN, &config);
    until("the agent holds its store", &mut agent, || {
        data.join("local.key").exists()
    })
    .await;

    let put = cli(&data, &["put", "files/etc/motd", "hello"]);
    assert!(put.status.success(), "{put:?}");
    let motd = mirror.join("etc/motd");
    until("the agent's plugin writes the file", &mut agent, || {
        std::fs::read_to_string(&motd).is_ok_and(|t| t == "hello")
    })
    .await;
    let listed = stdout(&cli(&data, &["ls", "files/"]));
    assert!(listed.contains("files/etc/motd"), "{listed}");
    let del = cli(&data, &["del", "files/etc/motd"]);
    assert!(del.status.success(), "{del:?}");
    until("the agent's plugin removes the file", &mut agent, || {
        !motd.exists()
    })
    .await;

    agent.stop();
    assert!(
        !data.join("datasync.sock").exists(),
        "the socket is removed"
    );
    assert!(!data.join("local.key").exists(), "the key is removed");
}
