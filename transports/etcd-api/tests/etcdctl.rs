//! etcd's own client, `etcdctl` 3.4, run as a process against the built-in store's etcd
//! endpoint: a single node, and a three-member cluster through a follower. Every check
//! reads etcdctl's output or exit code.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use datasync::Writer as _;
use datasync_etcd_api::{EtcdApi, Serving};
use datasync_raft::testing::{TestCluster, converged, test_secret};
use datasync_raft::{ClusterConfig, RaftConfig, RaftStore};

/// etcdctl against one endpoint.
#[derive(Clone)]
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

    /// Runs `args`, which must fail; its standard error.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args, None);
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(!out.status.success(), "etcdctl {args:?} succeeded: {err}");
        err
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
        // `--ignore-lease` keeps the key's lease, `--ignore-value` its value.
        assert_eq!(ctl.ok(&["put", "lk", "w", "--ignore-lease"]), "OK\n");
        let both = ["put", "lk", "--ignore-value", "--ignore-lease"];
        assert_eq!(ctl.ok(&both), "OK\n");
        let got = ctl.json(&["get", "lk"]);
        assert_eq!(got["kvs"][0]["value"], b64("w"));
        assert_eq!(rev(&got["kvs"][0]["version"]), 3);
        assert_eq!(
            got["kvs"][0]["lease"].as_u64(),
            u64::from_str_radix(&id, 16).ok()
        );
        let err = ctl.fails(&["put", "nokey", "--ignore-value"]);
        assert!(err.contains("key not found"), "{err}");
        let err = ctl.fails(&["put", "lk", "x", "--ignore-lease", &lease]);
        assert!(err.contains("lease is provided"), "{err}");
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

        // Compaction: the revision itself stays readable, the one before it does not,
        // for reads and for watches, and compacting it again is refused.
        let now = rev(&ctl.json(&["get", "a"])["header"]["revision"]);
        let at = first + 2;
        assert_eq!(
            ctl.ok(&["compaction", &at.to_string()]),
            format!("compacted revision {at}\n")
        );
        assert_eq!(ctl.ok(&["get", "a", &format!("--rev={at}")]), "a\n2\n");
        let err = ctl.fails(&["get", "a", &format!("--rev={}", at - 1)]);
        assert!(
            err.contains("required revision has been compacted"),
            "{err}"
        );
        let err = ctl.fails(&["compaction", &(at - 1).to_string()]);
        assert!(
            err.contains("required revision has been compacted"),
            "{err}"
        );
        let err = ctl.fails(&["compaction", &(now + 1).to_string()]);
        assert!(err.contains("future revision"), "{err}");
        // The server cancels the watch; etcdctl says why and exits.
        let err = ctl.fails(&["watch", "a", &format!("--rev={}", at - 1)]);
        assert!(
            err.contains(
                "watch was canceled (etcdserver: mvcc: required revision has been compacted)"
            ),
            "{err}"
        );

        // `snapshot save` writes the store's backup: `datasync snapshot status` reads
        // it, with its revision and keys.
        let file = tempfile::NamedTempFile::new().unwrap();
        let path = file.path().to_str().unwrap().to_owned();
        let saved = ctl.ok(&["snapshot", "save", &path]);
        assert!(
            saved.contains(&format!("Snapshot saved at {path}")),
            "{saved}"
        );
        let info = datasync_raft::backup::verify(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(info.revision, now);
        let keys = ctl.ok(&["get", "", "--from-key", "--keys-only"]);
        assert_eq!(
            info.keys,
            keys.lines().filter(|l| !l.is_empty()).count() as u64
        );

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
    let (l2, f2) = (l.clone(), f.clone());
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

    // Members at the same revision answer the same `hashkv`; a write changes it.
    let hash = |ctl: Ctl| {
        tokio::task::spawn_blocking(move || {
            rev(&ctl.json(&["endpoint", "hashkv"])[0]["HashKV"]["hash"])
        })
    };
    converged(&[leader, follower]).await;
    let before = hash(f2.clone()).await.unwrap();
    assert_eq!(hash(l2.clone()).await.unwrap(), before);
    tokio::task::spawn_blocking(move || l2.ok(&["put", "k", "3"]))
        .await
        .unwrap();
    converged(&[leader, follower]).await;
    assert_ne!(hash(f2).await.unwrap(), before, "a write changes the hash");
}

/// `s` with each run of spaces as one (etcdctl pads ids to 16 columns).
fn words(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A loopback port no one listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The id etcdctl prints after `Member` (hex, as every member command takes it).
fn added_id(out: &str) -> String {
    let id = out
        .strip_prefix("Member ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no member id in {out:?}"));
    assert!(out.contains(" added to cluster "), "{out}");
    id.to_owned()
}

/// A member etcdctl added, started with the id it was given, joining through `seed`.
async fn start_added(
    id: &str,
    port: u16,
    seed: &str,
    learner: bool,
    dir: &std::path::Path,
) -> RaftStore {
    let id = u64::from_str_radix(id, 16).unwrap();
    let listen = format!("127.0.0.1:{port}").parse().unwrap();
    let cluster = ClusterConfig::new(listen, test_secret()).join([seed]);
    let cluster = if learner { cluster.learner() } else { cluster };
    RaftStore::open(RaftConfig::new(dir).cluster(id, cluster))
        .await
        .unwrap()
}

/// A three-member cluster, one follower of it (and its cluster address, a seed to
/// join through) serving the endpoint, and etcdctl pointed at it.
async fn through_a_follower() -> (TestCluster, RaftStore, String, Serving, Ctl) {
    let cluster = TestCluster::start(3).await;
    let follower = cluster.follower().await.clone();
    let seed = follower.cluster_addr().unwrap().to_owned();
    let api = EtcdApi::new(follower.clone())
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let ctl = Ctl::new(&api);
    (cluster, follower, seed, api, ctl)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_adds_promotes_and_removes_members() {
    let (_cluster, follower, seed, api, ctl) = through_a_follower().await;
    let (p4, p5) = (free_port(), free_port());
    let url4 = format!("--peer-urls=http://127.0.0.1:{p4}");
    let url5 = format!("--peer-urls=http://127.0.0.1:{p5}");

    // A learner, added before it runs: it cannot be promoted until it has the log.
    let (ctl, id4) = tokio::task::spawn_blocking(move || {
        ctl.ok(&["put", "k", "before"]);
        let out = ctl.ok(&["member", "add", "n4", "--learner", &url4]);
        let id4 = added_id(&out);
        assert!(
            out.contains("ETCD_INITIAL_CLUSTER_STATE=\"existing\""),
            "{out}"
        );
        let list = ctl.ok(&["member", "list"]);
        assert_eq!(list.lines().count(), 4, "{list}");
        assert!(
            list.lines()
                .any(|l| l.starts_with(&format!("{id4},")) && l.ends_with(", true")),
            "the new member is listed as a learner: {list}"
        );
        let err = ctl.fails(&["member", "promote", &id4]);
        assert!(
            err.contains("can only promote a learner member which is in sync with leader"),
            "{err}"
        );
        let err = ctl.fails(&["member", "add", "again", &url4]);
        assert!(err.contains("Peer URLs already exists"), "{err}");
        let err = ctl.fails(&["member", "remove", "ff"]);
        assert!(err.contains("member not found"), "{err}");
        let err = ctl.fails(&["member", "promote", "ff"]);
        assert!(err.contains("member not found"), "{err}");
        (ctl, id4)
    })
    .await
    .unwrap();

    // Started with the id etcdctl printed, it catches up; then it can be promoted.
    let d4 = tempfile::tempdir().unwrap();
    let n4 = start_added(&id4, p4, &seed, true, d4.path()).await;
    datasync_raft::testing::wait_until("the learner has the first write", || {
        n4.revision() >= follower.revision()
    })
    .await;
    let (ctl, id5) = tokio::task::spawn_blocking(move || {
        let out = ctl.ok(&["member", "promote", &id4]);
        assert!(
            words(&out).starts_with(&format!("Member {id4} promoted")),
            "{out}"
        );
        let err = ctl.fails(&["member", "promote", &id4]);
        assert!(err.contains("can only promote a learner member"), "{err}");
        // A voter added before it runs is a learner until it runs and catches up: the
        // group writes on meanwhile (a voter that does not run would stall it).
        let out = ctl.ok(&["member", "add", "n5", &url5]);
        let id5 = added_id(&out);
        let list = ctl.ok(&["member", "list"]);
        assert!(
            list.lines()
                .any(|l| l.starts_with(&format!("{id5},")) && l.ends_with(", true")),
            "{list}"
        );
        assert_eq!(ctl.ok(&["put", "k", "while n5 is away"]), "OK\n");
        (ctl, id5)
    })
    .await
    .unwrap();
    let d5 = tempfile::tempdir().unwrap();
    let n5 = start_added(&id5, p5, &seed, false, d5.path()).await;
    let ctl = tokio::task::spawn_blocking(move || {
        ctl.ok(&["put", "k", "five"]);
        let list = ctl.ok(&["member", "list"]);
        assert_eq!(list.lines().count(), 5, "{list}");
        assert!(
            list.lines().all(|l| l.ends_with(", false")),
            "every member votes: {list}"
        );
        ctl
    })
    .await
    .unwrap();
    datasync_raft::testing::converged(&[&follower, &n4, &n5]).await;
    for n in [&n4, &n5] {
        assert_eq!(n.members().voters.len(), 5);
    }

    // Removed, each is gone from the list, and the group writes on without them.
    let (i4, i5) = (n4.node_id(), n5.node_id());
    tokio::task::spawn_blocking(move || {
        for id in [i4, i5] {
            let hex = format!("{id:x}");
            let out = ctl.ok(&["member", "remove", &hex]);
            assert!(
                words(&out).starts_with(&format!("Member {hex} removed")),
                "{out}"
            );
        }
        let list = ctl.ok(&["member", "list"]);
        assert_eq!(list.lines().count(), 3, "{list}");
        assert_eq!(ctl.ok(&["put", "k", "after"]), "OK\n");
    })
    .await
    .unwrap();
    n4.shutdown().await;
    n5.shutdown().await;
    api.stop().await;
}

/// `member update` moves a learner to a new peer URL: the list shows it, the member
/// restarted there (same data) is reached by the group again; a voter, an address
/// another member has, or an unknown id, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_moves_a_member_to_a_new_address() {
    let (_cluster, follower, seed, api, ctl) = through_a_follower().await;
    let (p4, p6) = (free_port(), free_port());
    let url4 = format!("--peer-urls=http://127.0.0.1:{p4}");
    let (ctl, id4) = tokio::task::spawn_blocking(move || {
        ctl.ok(&["put", "k", "before"]);
        let out = ctl.ok(&["member", "add", "n4", "--learner", &url4]);
        (ctl, added_id(&out))
    })
    .await
    .unwrap();
    let d4 = tempfile::tempdir().unwrap();
    let n4 = start_added(&id4, p4, &seed, true, d4.path()).await;
    datasync_raft::testing::wait_until("the learner has the first write", || {
        n4.revision() >= follower.revision()
    })
    .await;
    n4.shutdown().await;
    drop(n4);

    let (id, taken_addr) = (id4.clone(), seed.clone());
    let ctl = tokio::task::spawn_blocking(move || {
        let (id4, seed) = (id, taken_addr);
        let moved = format!("--peer-urls=http://127.0.0.1:{p6}");
        let out = ctl.ok(&["member", "update", &id4, &moved]);
        assert!(
            words(&out).starts_with(&format!("Member {id4} updated")),
            "{out}"
        );
        let list = ctl.ok(&["member", "list"]);
        assert!(
            list.lines()
                .any(|l| l.starts_with(&format!("{id4},"))
                    && l.contains(&format!("://127.0.0.1:{p6},"))),
            "the member is listed at its new address: {list}"
        );
        let taken = format!("--peer-urls=http://{seed}");
        let err = ctl.fails(&["member", "update", &id4, &taken]);
        assert!(err.contains("Peer URLs already exists"), "{err}");
        let err = ctl.fails(&["member", "update", "ff", &moved]);
        assert!(err.contains("member not found"), "{err}");
        // A voter's move would need the voter at its new address to commit.
        let err = ctl.fails(&["member", "update", "1", &moved]);
        assert!(
            err.contains("only a learner's address can be changed"),
            "{err}"
        );
        ctl.ok(&["put", "k", "while it moved"]);
        ctl
    })
    .await
    .unwrap();
    // Restarted on its new address with its data, the group reaches it there.
    let n4 = start_added(&id4, p6, &seed, true, d4.path()).await;
    datasync_raft::testing::wait_until("the moved member has the write made meanwhile", || {
        n4.revision() >= follower.revision()
    })
    .await;
    let got = n4
        .get(
            &datasync::Key::new("k").unwrap(),
            datasync::ReadOptions::new().consistency(datasync::Consistency::Local),
        )
        .await
        .unwrap();
    assert_eq!(got.unwrap().value, datasync::Value::from("while it moved"));
    drop(ctl);
    n4.shutdown().await;
    api.stop().await;
}
