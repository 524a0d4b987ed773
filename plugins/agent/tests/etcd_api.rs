//! etcd's API where users run it: an agent with `[store.etcd_api]` whose plugin and a
//! `datasync watch` see what `etcdctl` writes, with previous values and the same
//! revisions; `datasync serve --etcd-listen`.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Running, get};
use datasync_file_mirror as _;
use datasync_integration::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_datasync");

fn addr() -> String {
    format!("127.0.0.1:{}", free_port().unwrap())
}

/// `etcdctl --endpoints endpoint ARGS…`, retried for up to 20 s until it succeeds
/// (the endpoint may still be starting).
fn etcdctl(endpoint: &str, args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out: Output = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", endpoint, "--dial-timeout", "2s"])
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run etcdctl ({e}): install it with `apt-get install etcd-client`")
            });
        if out.status.success() {
            return String::from_utf8(out.stdout).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The revision an `etcdctl … -w json` answer's header carries.
fn header_revision(json: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v["header"]["revision"].as_u64().unwrap()
}

#[test]
fn etcdctl_writes_reach_the_agents_plugin_and_watchers_with_the_same_history() {
    let dir = tempfile::tempdir().unwrap();
    let (data, mirror) = (dir.path().join("data"), dir.path().join("mirror"));
    let (api, http) = (addr(), addr());
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nkind = \"raft\"\ndir = {:?}\n[store.etcd_api]\nlisten = \"{api}\"\n\
             [http]\nlisten = \"{http}\"\n[plugins.file-mirror]\ndir = {:?}\n",
            data.display().to_string(),
            mirror.display().to_string()
        ),
    )
    .unwrap();
    let agent = Running::agent(BIN, &config);
    eventually("the agent is ready", || {
        get(&format!("http://{http}/readyz")).0 == 200
    });
    // A `datasync watch` reaching the agent's store through its local endpoint.
    let printed = dir.path().join("watch.json");
    let mut watch = Command::new(BIN)
        .arg("--store")
        .arg(&data)
        .args(["--output", "json", "watch", "files/", "--count", "4"])
        .stdout(std::fs::File::create(&printed).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually("the watch's resync", || {
        std::fs::read_to_string(&printed).is_ok_and(|t| t.contains("resync"))
    });

    let r1 = header_revision(&etcdctl(
        &api,
        &["put", "files/motd", "hello", "-w", "json"],
    ));
    let motd = mirror.join("motd");
    eventually("the mirror has the file", || {
        std::fs::read_to_string(&motd).is_ok_and(|t| t == "hello")
    });
    let r2 = header_revision(&etcdctl(&api, &["put", "files/motd", "bye", "-w", "json"]));
    eventually("the mirror has the new content", || {
        std::fs::read_to_string(&motd).is_ok_and(|t| t == "bye")
    });
    let del = etcdctl(&api, &["del", "files/motd", "-w", "json"]);
    let r3 = header_revision(&del);
    eventually("the mirror removed the file", || !motd.exists());
    assert!(watch.wait().unwrap().success());
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&printed)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let changes: Vec<(u64, &str, &serde_json::Value, &serde_json::Value)> = lines[1..]
        .iter()
        .map(|l| {
            let c = &l["change"];
            (
                c["revision"].as_u64().unwrap(),
                c["op"].as_str().unwrap(),
                &c["value"],
                &c["prev"],
            )
        })
        .collect();
    assert_eq!(
        changes,
        [
            (r1, "Put", &"hello".into(), &serde_json::Value::Null),
            (r2, "Put", &"bye".into(), &"hello".into()),
            (r3, "Delete", &serde_json::Value::Null, &"bye".into()),
        ],
        "{lines:?}"
    );
    // What the plugin holds and what etcdctl reads agree.
    assert_eq!(etcdctl(&api, &["get", "files/", "--prefix"]), "");
    agent.stop();
}

#[test]
fn serve_with_etcd_listen_answers_etcdctl() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "a cluster secret of enough length!").unwrap();
    let api = addr();
    let mut cmd = Command::new(BIN);
    cmd.arg("--secret-file").arg(&secret).arg("serve");
    cmd.args(["--listen", &addr(), "--etcd-listen", &api, "--dir"]);
    cmd.arg(dir.path().join("n1"));
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let node = Running::spawn(cmd);
    assert_eq!(etcdctl(&api, &["put", "k", "v"]), "OK\n");
    assert_eq!(etcdctl(&api, &["get", "k"]), "k\nv\n");
    let members = etcdctl(&api, &["member", "list"]);
    assert!(
        members.contains("node-1") && members.contains(&api),
        "{members}"
    );
    node.stop();
}

#[test]
fn serve_serves_etcds_api_over_tls_to_clients_with_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    datasync_integration::testkit::certificates(dir.path());
    let file = |name: &str| dir.path().join(name).display().to_string();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "a cluster secret of enough length!").unwrap();
    let api = addr();
    let mut cmd = Command::new(BIN);
    cmd.arg("--secret-file").arg(&secret).arg("serve");
    cmd.args(["--listen", &addr(), "--etcd-listen", &api]);
    cmd.args([
        "--etcd-cert",
        &file("server.crt"),
        "--etcd-key",
        &file("server.key"),
    ]);
    cmd.args(["--etcd-client-ca", &file("ca.crt"), "--dir"]);
    cmd.arg(dir.path().join("n1"));
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let node = Running::spawn(cmd);
    let https = format!("https://{api}");
    let (ca, cert, key) = (
        format!("--cacert={}", file("ca.crt")),
        format!("--cert={}", file("client.crt")),
        format!("--key={}", file("client.key")),
    );
    assert_eq!(
        etcdctl(&https, &[&ca, &cert, &key, "put", "k", "v"]),
        "OK\n"
    );
    assert_eq!(etcdctl(&https, &[&ca, &cert, &key, "get", "k"]), "k\nv\n");
    let members = etcdctl(&https, &[&ca, &cert, &key, "member", "list"]);
    assert!(members.contains(&https), "{members}");
    // Without a client certificate, or in plain text, nothing gets in.
    for args in [vec![ca.as_str()], vec![]] {
        let endpoint = if args.is_empty() { &api } else { &https };
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", endpoint, "--dial-timeout", "2s"])
            .args(["--command-timeout", "5s"])
            .args(&args)
            .args(["get", "k"])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "etcdctl {args:?} got in: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    node.stop();
}
