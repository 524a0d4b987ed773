//! Exactly-once client writes: a write retried with its request id (after a member
//! answered "stopping" although it had committed it) applies once and answers its first
//! outcome, through forwarding, a remote client and a restart.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use datasync::{
    CasOutcome, DeleteOptions, Event, Expect, Key, PutOptions, Revision, Value, Watch, Writer,
};
use datasync_raft::testing::{TestCluster, test_secret, watch_past_resync};
use datasync_raft::types::{Command, Outcome, RequestId};
use datasync_raft::{RaftConfig, RaftStore, RemoteConfig, RemoteStore};

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

fn once(seq: u64, first_unacked: u64, cmd: Command) -> Command {
    Command::Once {
        id: RequestId {
            client: 7,
            seq,
            first_unacked,
        },
        cmd: Box::new(cmd),
    }
}

fn put(k: &str, v: &str) -> Command {
    Command::Put {
        key: k.into(),
        value: v.as_bytes().to_vec(),
        expires_at_ms: None,
    }
}

/// The leader and a follower of `c`, their addresses (as the faults name them), and a
/// watch of `x/` on the leader past its resync.
async fn leader_and_follower(c: &TestCluster) -> (&RaftStore, &RaftStore, String, String, Watch) {
    let leader = c.leader().await;
    let follower = c.follower().await;
    let (l, f) = (
        leader.cluster_addr().unwrap().to_owned(),
        follower.cluster_addr().unwrap().to_owned(),
    );
    let w = watch_past_resync(leader, "x/").await;
    (leader, follower, l, f, w)
}

/// The changes `w` delivers up to and including revision `last`, as (revision, key).
async fn changes_until(w: &mut Watch, last: Revision) -> Vec<(Revision, String)> {
    let mut out = Vec::new();
    loop {
        let ev = datasync::testing::next_event(w).await.unwrap();
        let rev = ev.revision();
        if let Event::Change(c) = &ev {
            out.extend(c.changes.iter().map(|kc| (rev, kc.key.as_str().to_owned())));
        }
        ev.into_done().ok();
        if rev >= last {
            return out;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_request_applies_once_and_answers_its_first_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    let mut w = watch_past_resync(&s, "x/").await;
    let first = s.propose(once(1, 1, put("x/a", "1"))).await.unwrap();
    assert_eq!(s.propose(once(1, 1, put("x/a", "1"))).await.unwrap(), first);
    let cas = Command::Cas {
        key: "x/b".into(),
        expect: None,
        value: b"2".to_vec(),
        expires_at_ms: None,
    };
    let swapped = s.propose(once(2, 1, cas.clone())).await.unwrap();
    assert!(matches!(swapped, Outcome::Written { .. }), "{swapped:?}");
    assert_eq!(
        s.propose(once(2, 1, cas.clone())).await.unwrap(),
        swapped,
        "a repeated create-if-absent answers Written, not Conflict"
    );
    let del = Command::Delete {
        key: "x/".into(),
        prefix: true,
    };
    let deleted = s.propose(once(3, 1, del.clone())).await.unwrap();
    assert!(
        matches!(deleted, Outcome::Deleted { count: 2, .. }),
        "{deleted:?}"
    );
    assert_eq!(s.propose(once(3, 1, del.clone())).await.unwrap(), deleted);
    let Outcome::Deleted { revision, .. } = deleted else {
        unreachable!()
    };
    let got = changes_until(&mut w, Revision(revision)).await;
    assert_eq!(got.len(), 4, "one change per write: {got:?}");
    // Request 4 says 1–3 were answered: a repeat of 1 is refused, never applied again.
    let r4 = s.propose(once(4, 4, put("x/c", "4"))).await.unwrap();
    let stale = s.propose(once(1, 1, put("x/a", "1"))).await.unwrap();
    assert!(matches!(stale, Outcome::Invalid(_)), "{stale:?}");
    assert_eq!(s.revision(), Revision(revision + 1));
    // The table survives a restart (stored with the data, replayed from the log).
    drop(w);
    s.shutdown().await;
    drop(s);
    let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    assert_eq!(s.propose(once(4, 4, put("x/c", "4"))).await.unwrap(), r4);
    assert_eq!(s.revision(), Revision(revision + 1));
    s.shutdown().await;
}

/// A follower forwards a write; the leader commits it but its answer comes back as
/// "stopping", so the follower retries: the write applies once and answers as first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_write_retried_after_its_commit_applies_once() {
    let cluster = TestCluster::start(3).await;
    let (_, follower, l, f, mut w) = leader_and_follower(&cluster).await;
    cluster.faults.stop_replies(&l, &f, 1);
    let got = follower
        .compare_and_swap(&key("x/k"), Expect::Absent, "v".into(), PutOptions::new())
        .await
        .unwrap();
    let CasOutcome::Swapped(r) = got else {
        panic!("the retried create-if-absent must answer Swapped, got {got:?}")
    };
    cluster.faults.stop_replies(&l, &f, 1);
    let r2 = follower
        .put(&key("x/p"), "p".into(), PutOptions::new())
        .await
        .unwrap();
    cluster.faults.stop_replies(&l, &f, 1);
    let d = follower
        .delete(&key("x/p"), DeleteOptions::new())
        .await
        .unwrap();
    assert_eq!(d.count, 1, "the retried delete answers its first count");
    let got = changes_until(&mut w, d.revision).await;
    assert_eq!(
        got,
        vec![
            (r, "x/k".to_owned()),
            (r2, "x/p".to_owned()),
            (d.revision, "x/p".to_owned())
        ],
        "each write is one change"
    );
}

/// A remote client of a follower, and a watch on it; the leader's next answer to the
/// follower comes back as "stopping".
async fn remote_whose_next_answer_is_lost(c: &TestCluster) -> (RemoteStore, Watch) {
    let (_, _, l, f, w) = leader_and_follower(c).await;
    let remote = RemoteStore::connect(RemoteConfig::new([f.clone()], test_secret()))
        .await
        .unwrap();
    c.faults.stop_replies(&l, &f, 1);
    (remote, w)
}

/// The same through a remote client: its member forwards, the leader's answer comes
/// back as "stopping", the member retries with the client's request id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_clients_write_retried_after_its_commit_applies_once() {
    let cluster = TestCluster::start(3).await;
    let (remote, mut w) = remote_whose_next_answer_is_lost(&cluster).await;
    let got = remote
        .compare_and_swap(&key("x/k"), Expect::Absent, "v".into(), PutOptions::new())
        .await
        .unwrap();
    let CasOutcome::Swapped(r) = got else {
        panic!("the retried create-if-absent must answer Swapped, got {got:?}")
    };
    let got = changes_until(&mut w, r).await;
    assert_eq!(got, vec![(r, "x/k".to_owned())]);
    assert_eq!(
        remote
            .get(&key("x/k"), datasync::ReadOptions::new())
            .await
            .unwrap()
            .map(|kv| kv.value),
        Some(Value::from("v"))
    );
}

/// A remote client's transaction, forwarded by its member, whose answer from the
/// leader is lost: retried, applied once and answered with its first outcome (applied
/// again, its condition would fail and answer so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_clients_txn_retried_after_its_commit_applies_once() {
    let cluster = TestCluster::start(3).await;
    let (remote, mut w) = remote_whose_next_answer_is_lost(&cluster).await;
    let txn = datasync::Txn::new()
        .when(&key("x/t"), Expect::Absent)
        .put(&key("x/t"), "t", PutOptions::new())
        .put(&key("x/u"), "u", PutOptions::new());
    let out = remote.txn(txn).await.unwrap();
    assert!(
        out.succeeded,
        "the retried txn must answer its first outcome: {out:?}"
    );
    let got = changes_until(&mut w, out.revision).await;
    let r = out.revision;
    assert_eq!(got, vec![(r, "x/t".to_owned()), (r, "x/u".to_owned())]);
}
