//! Records as etcd keeps them (create revision, mod revision, version, at past
//! revisions and across restarts and snapshot installs) and transactions (compares,
//! one branch of writes at one revision, one change event, exactly once).
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use datasync::{
    Consistency, Event, Key, Prefix, PutOptions, ReadOptions, Revision, StoreError, Value, Writer,
};
use datasync_raft::records::{
    Compare, CompareOp, CompareTarget, KeyRange, OpResult, RangeEnd, Record, RecordChanges, Txn,
    TxnOp,
};
use datasync_raft::testing::{TestCluster, converged, watch_past_resync};
use datasync_raft::{RaftConfig, RaftStore};
use futures_util::StreamExt;

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

fn rec(k: &str, v: &str, create: u64, modr: u64, version: u64) -> Record {
    Record {
        key: key(k),
        value: Value::from(v.to_owned()),
        create_revision: Revision(create),
        mod_revision: Revision(modr),
        version,
        lease: 0,
    }
}

async fn one(s: &RaftStore, k: &str, at: Option<u64>) -> Option<Record> {
    let mut opts = ReadOptions::new();
    if let Some(r) = at {
        opts = opts.at(Revision(r));
    }
    let (_, mut got) = s.range(&KeyRange::key(&key(k)), opts).await.unwrap();
    assert!(got.len() <= 1, "{got:?}");
    got.pop()
}

fn put(k: &str, v: &str, prev_kv: bool) -> TxnOp {
    TxnOp::Put {
        key: k.into(),
        value: v.as_bytes().to_vec(),
        expires_at_ms: None,
        prev_kv,
    }
}

fn cmp(k: &str, op: CompareOp, target: CompareTarget) -> Compare {
    Compare {
        range: KeyRange {
            start: k.into(),
            end: RangeEnd::Single,
        },
        op,
        target,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_keep_create_revision_and_version_as_etcd_does() {
    let dir = tempfile::tempdir().unwrap();
    let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    let o = PutOptions::new();
    let r1 = s.put(&key("a"), "1".into(), o.clone()).await.unwrap().0;
    let r2 = s.put(&key("a"), "2".into(), o.clone()).await.unwrap().0;
    let r3 = s.put(&key("b"), "x".into(), o.clone()).await.unwrap().0;
    let r4 = s
        .delete(&key("a"), datasync::DeleteOptions::new())
        .await
        .unwrap()
        .revision
        .0;
    let r5 = s.put(&key("a"), "3".into(), o.clone()).await.unwrap().0;
    assert_eq!(one(&s, "a", None).await, Some(rec("a", "3", r5, r5, 1)));
    // Past revisions, from the history.
    assert_eq!(one(&s, "a", Some(r1)).await, Some(rec("a", "1", r1, r1, 1)));
    assert_eq!(one(&s, "a", Some(r3)).await, Some(rec("a", "2", r1, r2, 2)));
    assert_eq!(one(&s, "a", Some(r4)).await, None);
    let (rev, all) = s
        .range(&KeyRange::from(""), ReadOptions::new().at(Revision(r3)))
        .await
        .unwrap();
    assert_eq!(rev, Revision(r3));
    assert_eq!(
        all,
        vec![rec("a", "2", r1, r2, 2), rec("b", "x", r3, r3, 1)]
    );
    let (_, between) = s
        .range(&KeyRange::between("a", "b"), ReadOptions::new())
        .await
        .unwrap();
    assert_eq!(between, vec![rec("a", "3", r5, r5, 1)]);
    // Stored with the record: the same after a restart, and counting on.
    s.shutdown().await;
    drop(s);
    let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    assert_eq!(one(&s, "b", None).await, Some(rec("b", "x", r3, r3, 1)));
    let r6 = s.put(&key("a"), "4".into(), o).await.unwrap().0;
    assert_eq!(one(&s, "a", None).await, Some(rec("a", "4", r5, r6, 2)));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_txn_applies_one_branch_at_one_revision_as_one_change() {
    let dir = tempfile::tempdir().unwrap();
    let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    let o = PutOptions::new();
    let r1 = s.put(&key("t/a"), "1".into(), o.clone()).await.unwrap().0;
    let r2 = s.put(&key("t/a"), "2".into(), o.clone()).await.unwrap().0;
    s.put(&key("t/b"), "b".into(), o.clone()).await.unwrap();
    s.put(&key("t/c"), "c".into(), o.clone()).await.unwrap();
    let mut w = watch_past_resync(&s, "t/").await;

    // Every compare holds: the success branch, at one revision, as one change.
    let txn = Txn {
        compares: vec![
            cmp("t/a", CompareOp::Equal, CompareTarget::Version(2)),
            cmp("t/a", CompareOp::Equal, CompareTarget::CreateRevision(r1)),
            cmp("t/a", CompareOp::Greater, CompareTarget::ModRevision(r1)),
            cmp("t/a", CompareOp::Less, CompareTarget::Value(b"3".to_vec())),
            cmp("t/none", CompareOp::Equal, CompareTarget::Version(0)),
            cmp("t/none", CompareOp::NotEqual, CompareTarget::ModRevision(5)),
        ],
        success: vec![
            put("t/a", "A", true),
            TxnOp::Delete {
                range: KeyRange::between("t/b", "t/d"),
                prev_kv: true,
            },
            put("t/new", "N", true),
        ],
        failure: vec![put("t/failed", "F", false)],
    };
    let out = s.record_txn(txn).await.unwrap();
    assert!(out.succeeded, "{out:?}");
    let r = out.revision;
    assert_eq!(s.revision(), Revision(r), "one revision for the whole txn");
    let OpResult::Put(Some(prev)) = &out.results[0] else {
        panic!("{out:?}")
    };
    assert_eq!(prev.record(), Some(rec("t/a", "2", r1, r2, 2)));
    let OpResult::Deleted { count: 2, prev } = &out.results[1] else {
        panic!("{out:?}")
    };
    assert_eq!(
        prev.iter().map(|p| p.key.as_str()).collect::<Vec<_>>(),
        ["t/b", "t/c"]
    );
    assert_eq!(out.results[2], OpResult::Put(None), "a new key has no prev");
    assert_eq!(one(&s, "t/a", None).await, Some(rec("t/a", "A", r1, r, 3)));
    assert_eq!(one(&s, "t/failed", None).await, None);
    let ev = datasync::testing::next_event(&mut w).await.unwrap();
    let Event::Change(c) = &ev else {
        panic!("{ev:?}")
    };
    assert_eq!(c.revision, Revision(r));
    let keys: Vec<_> = c.changes.iter().map(|k| k.key.as_str()).collect();
    assert_eq!(
        keys,
        ["t/a", "t/b", "t/c", "t/new"],
        "one event, in key order"
    );
    assert_eq!(c.changes[0].prev, Some(Value::from("2")));
    ev.into_done().ok();

    // A compare fails: the failure branch; a value compare on no key fails.
    let out = s
        .record_txn(Txn {
            compares: vec![cmp(
                "t/none",
                CompareOp::NotEqual,
                CompareTarget::Value(b"x".to_vec()),
            )],
            success: vec![put("t/ok", "1", false)],
            failure: vec![put("t/failed", "F", false)],
        })
        .await
        .unwrap();
    assert!(!out.succeeded);
    assert_eq!(one(&s, "t/ok", None).await, None);
    assert_eq!(
        one(&s, "t/failed", None).await,
        Some(rec("t/failed", "F", out.revision, out.revision, 1))
    );
    // A compare over a range holds only if it holds for every key there.
    let range_cmp = |op, n| Compare {
        range: KeyRange::prefix(&Prefix::new("t/").unwrap()),
        op,
        target: CompareTarget::Version(n),
    };
    let before = s.revision();
    let out = s
        .record_txn(Txn {
            compares: vec![range_cmp(CompareOp::Greater, 0)],
            ..Txn::default()
        })
        .await
        .unwrap();
    assert!(out.succeeded && out.results.is_empty());
    assert_eq!(
        out.revision, before.0,
        "a txn that changes nothing adds no revision"
    );
    let out = s
        .record_txn(Txn {
            compares: vec![range_cmp(CompareOp::Equal, 1)],
            ..Txn::default()
        })
        .await
        .unwrap();
    assert!(!out.succeeded, "t/a is at version 3");
    assert_eq!(s.revision(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_txn_that_writes_a_key_twice_or_carries_too_much_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = RaftStore::open(RaftConfig::new(dir.path()).max_value_size(1000))
        .await
        .unwrap();
    let refused = |t: Txn| {
        let s = &s;
        async move {
            let got = s.record_txn(t).await;
            assert!(got.is_err(), "{got:?}");
            assert_eq!(s.revision(), Revision(0), "nothing applied");
            got.unwrap_err()
        }
    };
    let twice = refused(Txn {
        success: vec![put("k", "1", false), put("k", "2", false)],
        ..Txn::default()
    })
    .await;
    assert!(twice.to_string().contains("duplicate key"), "{twice}");
    refused(Txn {
        failure: vec![
            TxnOp::Delete {
                range: KeyRange::from("j"),
                prev_kv: false,
            },
            put("k", "2", false),
        ],
        ..Txn::default()
    })
    .await;
    let e = refused(Txn {
        success: vec![put("", "1", false)],
        ..Txn::default()
    })
    .await;
    assert!(matches!(e, StoreError::InvalidKey(_)), "{e:?}");
    let e = refused(Txn {
        success: (0..129).map(|i| put(&format!("k{i}"), "", false)).collect(),
        ..Txn::default()
    })
    .await;
    assert!(matches!(e, StoreError::Unsupported(_)), "{e:?}");
    let e = refused(Txn {
        success: vec![
            put("a", &"x".repeat(1000), false),
            put("b", &"x".repeat(1000), false),
            put("c", &"x".repeat(1000), false),
        ],
        failure: ["d", "e", "f"]
            .map(|k| put(k, &"x".repeat(1000), false))
            .to_vec(),
        ..Txn::default()
    })
    .await;
    // Both branches, keys and values: one log entry carries them all; the limit is the
    // value limit and one key.
    assert!(
        matches!(
            e,
            StoreError::ValueTooLarge {
                size: 6006,
                max: 5096
            }
        ),
        "{e:?}"
    );
    let e = refused(Txn {
        success: vec![TxnOp::Put {
            key: "k".into(),
            value: vec![],
            expires_at_ms: Some(0),
            prev_kv: false,
        }],
        ..Txn::default()
    })
    .await;
    assert!(matches!(e, StoreError::InvalidTtl(_)), "{e:?}");
    // Different branches may name the same key: only one of them applies.
    let out = s
        .record_txn(Txn {
            success: vec![put("k", "1", false)],
            failure: vec![put("k", "2", false)],
            ..Txn::default()
        })
        .await
        .unwrap();
    assert!(out.succeeded);
    s.shutdown().await;
}

/// Through a follower whose forwarded txn's commit is answered "stopping" (so it is
/// retried): applied once; a member that installs a snapshot gets the versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_txn_through_a_follower_applies_once_and_snapshots_carry_versions() {
    let cluster = TestCluster::start_with(3, |c| c.snapshots(20, 5)).await;
    let leader = cluster.leader().await;
    let follower = cluster.follower().await;
    let (l, f) = (
        leader.cluster_addr().unwrap().to_owned(),
        follower.cluster_addr().unwrap().to_owned(),
    );
    let mut w = watch_past_resync(leader, "x/").await;
    let create = Txn {
        compares: vec![cmp("x/k", CompareOp::Equal, CompareTarget::Version(0))],
        success: vec![put("x/k", "v", false), put("x/j", "w", false)],
        failure: vec![],
    };
    cluster.faults.stop_replies(&l, &f, 1);
    let out = follower.record_txn(create).await.unwrap();
    assert!(
        out.succeeded,
        "the retried create answers its first outcome: {out:?}"
    );
    let ev = datasync::testing::next_event(&mut w).await.unwrap();
    assert_eq!(ev.revision(), Revision(out.revision));
    ev.into_done().ok();
    assert_eq!(leader.revision(), Revision(out.revision), "applied once");

    // The third member misses enough writes to need the leader's snapshot.
    let third = cluster
        .nodes
        .iter()
        .find(|n| n.node_id() != leader.node_id() && n.node_id() != follower.node_id())
        .unwrap();
    let t = third.cluster_addr().unwrap().to_owned();
    cluster
        .faults
        .partition(&[t.as_str()], &[l.as_str(), f.as_str()]);
    let long = std::time::Duration::from_secs(600);
    assert!(leader.lease_grant(42, long).await.unwrap());
    for i in 0..60 {
        leader
            .put(&key("x/k"), format!("{i}").into(), PutOptions::new())
            .await
            .unwrap();
    }
    leader.snapshot().await.unwrap();
    cluster.faults.heal();
    converged(&[leader, follower, third]).await;
    assert!(
        third.snapshots_installed() > 0,
        "the third member installed a snapshot"
    );
    let local = ReadOptions::new().consistency(Consistency::Local);
    let want = one(leader, "x/k", None).await.unwrap();
    assert_eq!(want.version, 61);
    let (_, got) = third
        .range(&KeyRange::key(&key("x/k")), local)
        .await
        .unwrap();
    assert_eq!(got, vec![want]);
    assert_eq!(third.leases(), [42], "the snapshot carries lease objects");
}

/// The next item of a record watch, within 10 s.
async fn next(w: &mut datasync_raft::RecordWatch) -> Result<RecordChanges, StoreError> {
    tokio::time::timeout(std::time::Duration::from_secs(10), w.next())
        .await
        .expect("a record watch item within 10 s")
        .expect("the watch goes on")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_watches_replay_history_catch_up_and_end_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = RaftConfig::new(dir.path());
    config.history = 3000;
    let s = RaftStore::open(config).await.unwrap();
    let o = PutOptions::new();
    let r1 = s.put(&key("w/a"), "1".into(), o.clone()).await.unwrap().0;
    s.put(&key("other"), "x".into(), o.clone()).await.unwrap();
    let r3 = s.put(&key("w/a"), "2".into(), o.clone()).await.unwrap().0;
    let range = KeyRange::prefix(&Prefix::new("w/").unwrap());
    // From a past revision: the history replays, with records after and before.
    let mut from = s
        .watch_records(range.clone(), Some(Revision(r1)))
        .await
        .unwrap();
    let c = next(&mut from).await.unwrap();
    assert_eq!(c.revision, Revision(r1));
    assert_eq!(c.events[0].record, rec("w/a", "1", r1, r1, 1));
    assert_eq!(c.events[0].prev, None);
    let c = next(&mut from).await.unwrap();
    assert_eq!(
        c.revision,
        Revision(r3),
        "a revision outside the range is skipped"
    );
    assert_eq!(c.events[0].record, rec("w/a", "2", r1, r3, 2));
    assert_eq!(c.events[0].prev, Some(rec("w/a", "1", r1, r1, 1)));
    assert_eq!(from.progress(), Some(Revision(r3)), "caught up");
    let d = s
        .delete(&key("w/a"), datasync::DeleteOptions::new())
        .await
        .unwrap()
        .revision;
    let c = next(&mut from).await.unwrap();
    assert_eq!(c.events[0].op, datasync::Op::Delete);
    assert_eq!(c.events[0].record.mod_revision, d);
    assert_eq!(c.events[0].record.version, 0);
    assert_eq!(c.events[0].prev, Some(rec("w/a", "2", r1, r3, 2)));

    // A watch that is not read while 2,000 revisions commit overflows its queue and
    // catches up from the history: every revision once, in order.
    let mut slow = s.watch_records(range.clone(), None).await.unwrap();
    let start = s.revision().0;
    for i in 0..2000u64 {
        s.put(
            &key(&format!("w/{}", i % 10)),
            format!("{i}").into(),
            o.clone(),
        )
        .await
        .unwrap();
    }
    assert_eq!(slow.progress(), None, "it has changes to deliver");
    for want in start + 1..=start + 2000 {
        let c = next(&mut slow).await.unwrap();
        assert_eq!(c.revision, Revision(want));
        assert_eq!(c.events.len(), 1);
    }
    // One that falls behind further than the history reaches ends compacted, as does
    // one that starts there.
    for i in 0..3500u64 {
        s.put(&key("w/x"), format!("{i}").into(), o.clone())
            .await
            .unwrap();
    }
    let mut ended = next(&mut slow).await.map(|_| ());
    while ended.is_ok() {
        ended = next(&mut slow).await.map(|_| ());
    }
    assert!(
        matches!(ended, Err(StoreError::Compacted { .. })),
        "{ended:?}"
    );
    let old = s.watch_records(range, Some(Revision(r1))).await;
    assert!(matches!(old, Err(StoreError::Compacted { .. })), "{old:?}");
    s.shutdown().await;
}

/// A member that installs a snapshot cannot carry a record watch across the jump: the
/// watch delivers what it had, then ends compacted (etcd's clients then re-read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_watch_ends_compacted_when_its_member_installs_a_snapshot() {
    let cluster = TestCluster::start_with(3, |c| c.snapshots(20, 5)).await;
    let leader = cluster.leader().await;
    let behind = cluster
        .nodes
        .iter()
        .find(|n| n.node_id() != leader.node_id())
        .unwrap();
    let range = KeyRange::prefix(&Prefix::new("s/").unwrap());
    let mut w = behind.watch_records(range, None).await.unwrap();
    leader
        .put(&key("s/a"), "1".into(), PutOptions::new())
        .await
        .unwrap();
    assert_eq!(next(&mut w).await.unwrap().events.len(), 1);
    let b = behind.cluster_addr().unwrap().to_owned();
    let rest: Vec<String> = cluster.addrs().into_iter().filter(|a| *a != b).collect();
    cluster.faults.partition(&[b.as_str()], &rest);
    for i in 0..60 {
        leader
            .put(&key("s/a"), format!("{i}").into(), PutOptions::new())
            .await
            .unwrap();
    }
    leader.snapshot().await.unwrap();
    cluster.faults.heal();
    converged(&[leader, behind]).await;
    assert!(behind.snapshots_installed() > 0);
    let mut ended = next(&mut w).await.map(|_| ());
    while ended.is_ok() {
        ended = next(&mut w).await.map(|_| ());
    }
    assert!(
        matches!(ended, Err(StoreError::Compacted { .. })),
        "{ended:?}"
    );
}

fn put_on(k: &str, v: &str, lease: u64) -> TxnOp {
    TxnOp::Put {
        key: k.into(),
        value: v.as_bytes().to_vec(),
        expires_at_ms: Some(datasync_raft::records::on_lease(lease)),
        prev_kv: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_objects_hold_keys_until_revoked_or_expired() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    assert!(s.lease_grant(7, Duration::from_secs(60)).await.unwrap());
    assert!(
        !s.lease_grant(7, Duration::from_secs(60)).await.unwrap(),
        "taken"
    );
    let e = s.lease_grant(8, Duration::ZERO).await;
    assert!(matches!(e, Err(StoreError::InvalidTtl(_))), "{e:?}");
    let out = s
        .record_txn(Txn {
            success: vec![put_on("l/a", "1", 7), put_on("l/b", "2", 7)],
            ..Txn::default()
        })
        .await
        .unwrap();
    assert_eq!(one(&s, "l/a", None).await.unwrap().lease, 7);
    let (ttl, left, keys) = s.lease_time_to_live(7).unwrap();
    assert_eq!(ttl, Duration::from_secs(60));
    assert!(left <= ttl && left > Duration::from_secs(50), "{left:?}");
    assert_eq!(keys, [key("l/a"), key("l/b")]);
    // A put on a lease that does not exist changes nothing.
    let missing = s
        .record_txn(Txn {
            success: vec![put("l/c", "3", false), put_on("l/d", "4", 99)],
            ..Txn::default()
        })
        .await;
    assert!(missing.is_err_and(|e| e.to_string().contains("lease not found")));
    assert_eq!(s.revision(), Revision(out.revision));
    // Put again without the lease: the key leaves it.
    s.put(&key("l/b"), "2b".into(), PutOptions::new())
        .await
        .unwrap();
    assert_eq!(s.lease_time_to_live(7).unwrap().2, [key("l/a")]);
    // Revoked: its keys deleted at one revision, as one change with previous values.
    let mut w = watch_past_resync(&s, "l/").await;
    let (count, rev) = s.lease_revoke(7).await.unwrap().unwrap();
    assert_eq!(count, 1);
    let ev = datasync::testing::next_event(&mut w).await.unwrap();
    let Event::Change(c) = &ev else {
        panic!("{ev:?}")
    };
    assert_eq!((c.revision, c.changes.len()), (rev, 1));
    assert_eq!(c.changes[0].prev, Some(Value::from("1")));
    ev.into_done().ok();
    assert_eq!(s.lease_revoke(7).await.unwrap(), None);
    assert_eq!(s.lease_keep_alive(7).await.unwrap(), None);

    // Expiry: a short lease, kept alive past its TTL, then let go.
    assert!(s.lease_grant(9, Duration::from_millis(600)).await.unwrap());
    s.record_txn(Txn {
        success: vec![put_on("l/e", "5", 9)],
        ..Txn::default()
    })
    .await
    .unwrap();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(s.lease_keep_alive(9).await.unwrap().is_some());
    }
    assert!(
        one(&s, "l/e", None).await.is_some(),
        "kept alive past its TTL"
    );
    // A lease survives a restart (with its whole TTL again) and keeps its keys.
    s.shutdown().await;
    drop(s);
    let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    assert_eq!(s.leases(), [9]);
    assert_eq!(s.lease_time_to_live(9).unwrap().2, [key("l/e")]);
    let mut w = watch_past_resync(&s, "l/").await;
    let ev = datasync::testing::next_event(&mut w).await.unwrap();
    let Event::Change(c) = &ev else {
        panic!("{ev:?}")
    };
    assert_eq!(c.changes[0].key, key("l/e"));
    assert_eq!(c.changes[0].op, datasync::Op::Delete);
    ev.into_done().ok();
    assert!(s.leases().is_empty(), "the expired lease is gone");
    s.shutdown().await;
}

/// Entries an older build applied may be applied again by this one on another member
/// (a new member replaying the log, one replaying after a crash): every member must
/// still write the same records, so versions count only from the group's marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_write_the_same_records_across_the_upgrade_to_versions() {
    let cluster = TestCluster::start_with(3, |c| c.as_older_build()).await;
    let leader = cluster.leader().await;
    for i in 0..5 {
        leader
            .put(&key("u/k"), format!("{i}").into(), PutOptions::new())
            .await
            .unwrap();
    }
    assert_eq!(
        one(leader, "u/k", None).await.unwrap().version,
        1,
        "old form"
    );
    // A member of this build joins and replays the whole log.
    let dir = tempfile::tempdir().unwrap();
    let seed = leader.cluster_addr().unwrap().to_owned();
    let newer = RaftStore::open(TestCluster::config(4, dir.path(), Some(&seed)))
        .await
        .unwrap();
    let all: Vec<&RaftStore> = cluster.nodes.iter().chain([&newer]).collect();
    converged(&all).await;
    newer.shutdown().await;

    // A single node from before versions, reopened by this build: counts on from 1.
    let dir = tempfile::tempdir().unwrap();
    let old = RaftStore::open(RaftConfig::new(dir.path()).as_older_build())
        .await
        .unwrap();
    let range = KeyRange::key(&key("a"));
    let mut w = old.watch_records(range, None).await.unwrap();
    for v in ["1", "2"] {
        old.put(&key("a"), v.into(), PutOptions::new())
            .await
            .unwrap();
    }
    assert_eq!(one(&old, "a", None).await.unwrap().version, 1);
    for _ in 0..2 {
        let c = next(&mut w).await.unwrap();
        assert_eq!(c.events[0].record.version, 1, "what a read returns");
    }
    drop(w);
    old.shutdown().await;
    drop(old);
    let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    s.put(&key("a"), "3".into(), PutOptions::new())
        .await
        .unwrap();
    assert_eq!(one(&s, "a", None).await.unwrap().version, 2);
    s.shutdown().await;
}

/// A compaction through a follower reaches every member: each refuses reads at and
/// watches from revisions before it, and keeps the revision itself readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_cuts_the_history_on_every_member() {
    let cluster = TestCluster::start(3).await;
    let leader = cluster.leader().await;
    let follower = cluster.follower().await;
    let mut revs = Vec::new();
    for i in 0..5 {
        let r = leader
            .put(
                &key("c"),
                Value::from(format!("{i}")),
                PutOptions::default(),
            )
            .await
            .unwrap();
        revs.push(r.0);
    }
    converged(&[leader, follower]).await;
    let at = Revision(revs[2]);
    assert!(follower.compacted_revision() < Revision(revs[0]));
    follower.compact(at).await.unwrap();
    for s in &cluster.nodes {
        datasync_raft::testing::wait_until("the compaction applied", || {
            s.compacted_revision() == at
        })
        .await;
        let c = KeyRange::key(&key("c"));
        let read = |r: u64| {
            s.range(
                &c,
                ReadOptions::new()
                    .at(Revision(r))
                    .consistency(Consistency::Local),
            )
        };
        let (_, got) = read(at.0).await.unwrap();
        assert_eq!(got[0].value, Value::from("2".to_owned()));
        assert!(matches!(
            read(at.0 - 1).await,
            Err(StoreError::Compacted { compacted, .. }) if compacted == at
        ));
        assert!(matches!(
            s.watch_records(KeyRange::key(&key("c")), Some(Revision(at.0 - 1)))
                .await,
            Err(StoreError::Compacted { .. })
        ));
        let mut w = s
            .watch_records(KeyRange::key(&key("c")), Some(at))
            .await
            .unwrap();
        let first = next(&mut w).await.unwrap();
        assert_eq!(
            first.revision, at,
            "replayed from {at:?} itself, as etcd does"
        );
    }
    // Compacting below what is gone, or past the present, is refused.
    assert!(matches!(
        leader.compact(Revision(at.0 - 1)).await,
        Err(StoreError::Compacted { .. })
    ));
    assert!(matches!(
        leader.compact(Revision(revs[4] + 1)).await,
        Err(StoreError::FutureRevision { .. })
    ));
}

/// The history is on disk: after a restart, reads at past revisions and watches from
/// them work as before, bounded by the history's length and by the last compaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_and_the_compaction_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = || {
        let mut c = RaftConfig::new(dir.path());
        c.history = 20;
        c
    };
    let s = RaftStore::open(config()).await.unwrap();
    let mut revs = Vec::new();
    for i in 0..30 {
        let k = if i % 2 == 0 { "h/a" } else { "h/b" };
        let r = s
            .put(&key(k), Value::from(format!("{i}")), PutOptions::new())
            .await
            .unwrap();
        revs.push(r.0);
    }
    s.delete(&key("h/a"), datasync::DeleteOptions::new())
        .await
        .unwrap();
    let last = s.revision();
    let oldest = s.compacted_revision();
    assert_eq!(oldest, Revision(last.0 - 20), "20 revisions kept");
    let at = Revision(revs[15]);
    let before = s
        .range(&KeyRange::from("h/"), ReadOptions::new().at(at))
        .await
        .unwrap();
    s.shutdown().await;
    drop(s);

    let s = RaftStore::open(config()).await.unwrap();
    assert_eq!(s.compacted_revision(), oldest, "the history came back");
    let after = s
        .range(&KeyRange::from("h/"), ReadOptions::new().at(at))
        .await
        .unwrap();
    assert_eq!(after, before);
    // A watch from a past revision replays it, with the records of the time.
    let mut w = s
        .watch_records(KeyRange::from("h/"), Some(at))
        .await
        .unwrap();
    let first = next(&mut w).await.unwrap();
    assert_eq!(first.revision, at);
    assert_eq!(first.events[0].record.value, Value::from("15".to_owned()));
    assert_eq!(
        first.events[0].prev.as_ref().map(|p| p.value.clone()),
        Some(Value::from("13".to_owned()))
    );
    let mut seen = vec![first.revision];
    while seen.last() != Some(&last) {
        seen.push(next(&mut w).await.unwrap().revision);
    }
    assert_eq!(seen.len() as u64, last.0 - at.0 + 1, "no revision missing");
    drop(w);

    // A compaction is kept too.
    let floor = Revision(revs[25]);
    s.compact(floor).await.unwrap();
    s.shutdown().await;
    drop(s);
    let s = RaftStore::open(config()).await.unwrap();
    assert_eq!(s.compacted_revision(), floor);
    assert!(matches!(
        s.range(
            &KeyRange::from("h/"),
            ReadOptions::new().at(Revision(floor.0 - 1))
        )
        .await,
        Err(StoreError::Compacted { .. })
    ));
    let w = s
        .watch_records(KeyRange::from("h/"), Some(floor))
        .await
        .unwrap();
    drop(w);
    s.shutdown().await;
}
