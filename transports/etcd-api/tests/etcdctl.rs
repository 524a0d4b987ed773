//! etcd's own client, `etcdctl` 3.4, run as a process against the built-in store's etcd
//! endpoint: a single node, and a three-member cluster through a follower. Every check
//! reads etcdctl's output or exit code.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use datasync_etcd_api::{EtcdApi, Serving};
use datasync_raft::testing::TestCluster;
use datasync_raft::{RaftConfig, RaftStore};

/// etcdctl against one endpoint.
struct Ctl {
    endpoint: String,
}

impl Ctl {
    fn new(api: &Serving) -> Ctl {
        Ctl {
            endpoint: api.addr().to_string(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("etcdctl");
        c.env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoint, "--dial-timeout", "3s"])
            .args(["--command-timeout", "15s"])
            .args(args);
        c
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run etcdctl ({e}): install it with `apt-get install etcd-client`")
            });
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    }

    /// Runs `args`, which must succeed; its standard output.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args, None);
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-w", "json"]);
        serde_json::from_str(&self.ok(&all)).unwrap()
    }

    /// A long-running etcdctl (a watch) whose output lines arrive on a channel.
    fn spawn(&self, args: &[&str]) -> Lines {
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Lines { child, rx }
    }
}

/// A running etcdctl's output.
struct Lines {
    child: Child,
    rx: mpsc::Receiver<String>,
}

impl Lines {
    /// The next `n` lines (failing after 15 s).
    fn take(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        (0..n)
            .map(|i| {
                let left = deadline.saturating_duration_since(Instant::now());
                self.rx
                    .recv_timeout(left)
                    .unwrap_or_else(|_| panic!("line {i} of {n} never came"))
            })
            .collect()
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines(s: &str) -> Vec<&str> {
    s.lines().collect()
}

/// A revision in etcdctl's JSON (a number).
fn rev(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a revision: {v}"))
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_reads_writes_transacts_and_watches_a_single_node() {
    let dir = tempfile::tempdir().unwrap();
    let store = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    let api = EtcdApi::new(store.clone())
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let ctl = Ctl::new(&api);
    let blocking = tokio::task::spawn_blocking(move || {
        let health = ctl.run(&["endpoint", "health"], None);
        let said =
            String::from_utf8_lossy(&health.stdout) + String::from_utf8_lossy(&health.stderr);
        assert!(
            health.status.success() && said.contains("is healthy"),
            "{said}"
        );
        assert_eq!(ctl.ok(&["put", "a", "1"]), "OK\n");
        let first = rev(&ctl.json(&["get", "a"])["header"]["revision"]);
        ctl.ok(&["put", "a", "2"]);
        for (k, v) in [("b", "3"), ("c/x", "4"), ("c/y", "5")] {
            ctl.ok(&["put", k, v]);
        }
        assert_eq!(ctl.ok(&["get", "a"]), "a\n2\n");
        let got = ctl.json(&["get", "a"]);
        let kv = &got["kvs"][0];
        assert_eq!(kv["key"], b64("a"));
        assert_eq!(kv["value"], b64("2"));
        assert_eq!(rev(&kv["create_revision"]), first);
        assert_eq!(rev(&kv["mod_revision"]), first + 1);
        assert_eq!(rev(&kv["version"]), 2);
        assert_eq!(rev(&got["header"]["revision"]), first + 4);
        assert_eq!(ctl.ok(&["get", "a", &format!("--rev={first}")]), "a\n1\n");
        assert_eq!(ctl.ok(&["get", "c/", "--prefix"]), "c/x\n4\nc/y\n5\n");
        let keys = ctl.ok(&["get", "", "--prefix", "--keys-only"]);
        let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(keys, ["a", "b", "c/x", "c/y"]);
        assert_eq!(
            ctl.ok(&["get", "", "--from-key", "--limit", "2"]),
            "a\n2\nb\n3\n"
        );
        // etcdctl 3.4 has no --count-only; a limited read still counts them all.
        let counted = ctl.json(&["get", "", "--prefix", "--limit", "1"]);
        assert_eq!(rev(&counted["count"]), 4);
        assert_eq!(counted["more"], true);
        assert_eq!(counted["kvs"].as_array().map(Vec::len), Some(1));
        let sorted = ctl.ok(&["get", "", "--prefix", "--sort-by=MODIFY", "--order=DESCEND"]);
        assert_eq!(lines(&sorted), ["c/y", "5", "c/x", "4", "b", "3", "a", "2"]);
        assert_eq!(ctl.ok(&["get", "b", "d"]), "b\n3\nc/x\n4\nc/y\n5\n");

        // A watch from now, with previous values, while another etcdctl writes.
        let watch = ctl.spawn(&["watch", "w/", "--prefix", "--prev-kv"]);
        std::thread::sleep(Duration::from_millis(500));
        ctl.ok(&["put", "w/1", "x"]);
        ctl.ok(&["put", "w/1", "y"]);
        ctl.ok(&["del", "w/1"]);
        assert_eq!(
            watch.take(3 + 5 + 5),
            [
                "PUT", "w/1", "x", // created: no previous value
                "PUT", "w/1", "x", "w/1", "y", // previous, then current
                "DELETE", "w/1", "y", "w/1", "", // previous, then the deleted key
            ]
        );
        drop(watch);
        // From a past revision: the history replays, then live changes follow.
        let from = rev(&ctl.json(&["get", "a"])["header"]["revision"]) - 1;
        let replay = ctl.spawn(&["watch", "w/", "--prefix", &format!("--rev={from}")]);
        assert_eq!(replay.take(6), ["PUT", "w/1", "y", "DELETE", "w/1", ""]);
        ctl.ok(&["put", "w/2", "z"]);
        assert_eq!(replay.take(3), ["PUT", "w/2", "z"]);
        drop(replay);

        // Deletes with previous values.
        assert_eq!(
            ctl.ok(&["del", "c/", "--prefix", "--prev-kv"]),
            "2\nc/x\n4\nc/y\n5\n"
        );
        assert_eq!(ctl.ok(&["del", "nothing"]), "0\n");

        // Transactions, fed on stdin as an operator types them: both branches.
        let txn = |input: &str| {
            let out = ctl.run(&["txn"], Some(input));
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        let out =
            txn("mod(\"a\") > \"0\"\nversion(\"b\") = \"1\"\n\nput a 10\nget b\n\nput a 20\n\n");
        assert_eq!(lines(&out), ["SUCCESS", "", "OK", "", "b", "3"]);
        assert_eq!(ctl.ok(&["get", "a", "--print-value-only"]), "10\n");
        let out = txn("value(\"a\") = \"nope\"\n\nput a 30\n\nput a 20\ndel b\n\n");
        assert_eq!(lines(&out), ["FAILURE", "", "OK", "", "1"]);
        assert_eq!(ctl.ok(&["get", "a", "--print-value-only"]), "20\n");
        assert_eq!(ctl.ok(&["get", "b"]), "");

        // Leases: grant, keys on them, keep-alive, time-to-live, list, revoke.
        let granted = ctl.ok(&["lease", "grant", "60"]);
        let id = granted
            .strip_prefix("lease ")
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("{granted}"))
            .to_owned();
        assert_eq!(granted, format!("lease {id} granted with TTL(60s)\n"));
        let lease = format!("--lease={id}");
        assert_eq!(ctl.ok(&["put", "lk", "v", &lease]), "OK\n");
        let got = ctl.json(&["get", "lk"]);
        assert_eq!(
            got["kvs"][0]["lease"].as_u64(),
            u64::from_str_radix(&id, 16).ok()
        );
        let ttl = ctl.ok(&["lease", "timetolive", &id, "--keys"]);
        assert!(
            ttl.starts_with(&format!("lease {id} granted with TTL(60s), remaining(5"))
                && ttl.ends_with("s), attached keys([lk])\n"),
            "{ttl}"
        );
        assert_eq!(
            ctl.ok(&["lease", "keep-alive", "--once", &id]),
            format!("lease {id} keepalived with TTL(60)\n")
        );
        assert_eq!(
            ctl.ok(&["lease", "list"]),
            format!("found 1 leases\n{id}\n")
        );
        assert_eq!(
            ctl.ok(&["lease", "revoke", &id]),
            format!("lease {id} revoked\n")
        );
        assert_eq!(ctl.ok(&["get", "lk"]), "", "revoking deleted its key");
        assert_eq!(
            ctl.ok(&["lease", "timetolive", &id]),
            format!("lease {id} already expired\n")
        );
        let out = ctl.run(&["put", "lk", "v", &lease], None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("requested lease not found"),
            "{err}"
        );

        // What the store does not do is refused, saying so.
        let out = ctl.run(&["compaction", "3"], None);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("does not compact on request"), "{err}");
        let out = ctl.run(&["get", "a", "--rev=999999"], None);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("future revision"), "{err}");

        let status = ctl.json(&["endpoint", "status"]);
        let s = &status[0]["Status"];
        assert_eq!(rev(&s["leader"]), 1, "{status}");
        assert!(
            rev(&s["raftIndex"]) >= rev(&s["raftAppliedIndex"]),
            "{status}"
        );
        assert!(rev(&s["raftAppliedIndex"]) > 0, "{status}");
        assert_eq!(s["version"], "3.4.0");
        assert!(rev(&s["dbSize"]) > 0, "{status}");
        assert!(ctl.ok(&["member", "list"]).contains("node-1"));
    });
    blocking.await.unwrap();
    api.stop().await;
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_through_a_follower_reads_its_writes_and_watches_the_leaders() {
    let cluster = TestCluster::start(3).await;
    let leader = cluster.leader().await;
    let follower = cluster.follower().await;
    let on_leader = EtcdApi::new(leader.clone())
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let on_follower = EtcdApi::new(follower.clone())
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (l, f) = (Ctl::new(&on_leader), Ctl::new(&on_follower));
    tokio::task::spawn_blocking(move || {
        let watch = f.spawn(&["watch", "k", "--prev-kv"]);
        std::thread::sleep(Duration::from_millis(500));
        // Written through the follower (forwarded), read back at once through it.
        assert_eq!(f.ok(&["put", "k", "1"]), "OK\n");
        assert_eq!(f.ok(&["get", "k"]), "k\n1\n");
        assert_eq!(l.ok(&["get", "k", "--consistency=s"]), "k\n1\n");
        l.ok(&["put", "k", "2"]);
        assert_eq!(
            watch.take(3 + 5),
            ["PUT", "k", "1", "PUT", "k", "1", "k", "2"]
        );
        let members = f.ok(&["member", "list"]);
        assert_eq!(members.lines().count(), 3, "{members}");
        let status = f.json(&["endpoint", "status"]);
        let leader_id = rev(&status[0]["Status"]["leader"]);
        assert_ne!(leader_id, rev(&status[0]["Status"]["header"]["member_id"]));
    })
    .await
    .unwrap();
}
