//! `datasync-etcd` against a real etcd: restarts, network drops, compaction, restore
//! from backup, leases, sessions, namespaces. (The contract itself is checked by
//! `conformance_etcd`.)
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use datasync::{
    DeleteOptions, Event, Mirror, Op, Prefix, PutOptions, ReadOptions, ResyncReason, Revision,
    StoreError, Value, WatchOptions, Watcher, Writer,
};
use datasync_etcd::{EtcdConfig, EtcdStore};
use datasync_integration::testkit::{assert_same, key, next, prefix};
use datasync_integration::{EtcdServer, Proxy, free_port};
use futures_util::StreamExt;

async fn server() -> EtcdServer {
    EtcdServer::start().await.unwrap_or_else(|e| panic!("{e}"))
}

async fn connect(endpoint: &str) -> EtcdStore {
    EtcdStore::connect(EtcdConfig::new([endpoint]).with_request_timeout(Duration::from_secs(1)))
        .await
        .unwrap()
}

/// A proxy to `etcd`, a store through it, and a store straight to etcd.
async fn through_a_proxy(etcd: &EtcdServer) -> (Proxy, EtcdStore, EtcdStore) {
    let proxy = Proxy::start(etcd.endpoint().trim_start_matches("http://"))
        .await
        .unwrap();
    let store = connect(&proxy.endpoint()).await;
    let direct = connect(etcd.endpoint()).await;
    (proxy, store, direct)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_under_write_load_no_gap_no_duplicate() {
    let mut etcd = server().await;
    let store = connect(etcd.endpoint()).await;
    assert_eq!(store.watch_streams_opened(), 0);
    let mut w = store
        .watch("load", &[prefix("load/")], WatchOptions::default())
        .await
        .unwrap();
    let target = Arc::new(AtomicU64::new(0));
    let consumer = {
        let target = target.clone();
        tokio::spawn(async move {
            let mut mirror = Mirror::new();
            let mut events = Vec::new();
            loop {
                let t = target.load(Ordering::Acquire);
                if t != 0 && mirror.revision("").is_some_and(|r| r.0 >= t) {
                    return (mirror, events);
                }
                let ev = match tokio::time::timeout(Duration::from_millis(200), w.next()).await {
                    Err(_) => continue,
                    Ok(None) => panic!("watch ended"),
                    Ok(Some(Err(e))) => {
                        panic!("watch error {e:?} (a resumable break must not surface)")
                    }
                    Ok(Some(Ok(ev))) => ev,
                };
                mirror.apply(&ev).unwrap();
                events.push(match &ev {
                    Event::Resync(r) => (true, r.revision),
                    Event::Change(c) => (false, c.revision),
                    _ => unreachable!(),
                });
                ev.into_done().ok();
            }
        })
    };
    let mut acked = Vec::new();
    let mut failed_during_outage = 0;
    for i in 0..400u32 {
        if i == 150 {
            etcd.kill();
            // While etcd is down, writes fail, and say they may be retried.
            for _ in 0..3 {
                let e = store
                    .put(&key("load/x"), "down".into(), PutOptions::new())
                    .await
                    .expect_err("a write to a killed etcd succeeded");
                assert!(e.is_retryable(), "not retryable: {e:?}");
                failed_during_outage += 1;
            }
            etcd.start_again().await.unwrap();
        }
        let k = key(&format!("load/{}", i % 40));
        loop {
            match store
                .put(&k, format!("{i}").into(), PutOptions::new())
                .await
            {
                Ok(r) => {
                    acked.push(r);
                    break;
                }
                Err(e) => {
                    assert!(e.is_retryable(), "not retryable: {e:?}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    assert_eq!(failed_during_outage, 3);
    target.store(acked.last().unwrap().0, Ordering::Release);
    let (mirror, events) = tokio::time::timeout(Duration::from_secs(60), consumer)
        .await
        .expect("the watcher did not catch up after the restart")
        .unwrap();
    let resyncs: Vec<_> = events.iter().filter(|(r, _)| *r).collect();
    assert_eq!(
        resyncs.len(),
        1,
        "a resumable break caused a resync: {events:?}"
    );
    // etcd's revisions are consecutive and only this test writes: no gap means each
    // change is exactly one after the one before, no duplicate means none repeats.
    let revs: Vec<u64> = events.iter().map(|(_, r)| r.0).collect();
    for pair in revs.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "gap or duplicate in {revs:?}");
    }
    for r in &acked {
        assert!(
            revs.contains(&r.0),
            "acknowledged write at {r} never delivered"
        );
    }
    assert_same(&store, &mirror, "load/").await;
    // One watch stream, and at least one more after the restart (a stream is opened
    // again per retry while etcd is down).
    assert!(
        store.watch_streams_opened() >= 2,
        "{} watch streams",
        store.watch_streams_opened()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_while_the_network_is_down_becomes_a_resync() {
    let etcd = server().await;
    let (proxy, store, direct) = through_a_proxy(&etcd).await;
    for i in 0..10 {
        direct
            .put(&key(&format!("c/{i}")), "old".into(), PutOptions::new())
            .await
            .unwrap();
    }
    let mut w = store
        .watch("c", &[prefix("c/")], WatchOptions::default())
        .await
        .unwrap();
    let mut mirror = Mirror::new();
    let first = next(&mut w).await;
    mirror.apply(&first).unwrap();
    let r0 = first.revision();
    first.into_done().ok();

    proxy.cut();
    for i in 5..20 {
        direct
            .put(&key(&format!("c/{i}")), "new".into(), PutOptions::new())
            .await
            .unwrap();
    }
    direct
        .delete(&key("c/1"), DeleteOptions::new())
        .await
        .unwrap();
    let head = direct.current_revision().await.unwrap();
    let mut kv = direct.client().kv_client();
    kv.compact(
        head.0 as i64,
        Some(etcd_client::CompactionOptions::new().with_physical()),
    )
    .await
    .unwrap();
    proxy.restore();

    let ev = next(&mut w).await;
    let Event::Resync(rs) = &ev else {
        panic!("after compaction past the resume point, want a resync, got {ev:?}");
    };
    assert_eq!(rs.reason, ResyncReason::Compacted);
    assert!(rs.revision >= head && rs.revision > r0);
    mirror.apply(&ev).unwrap();
    ev.into_done().ok();
    assert_same(&direct, &mirror, "c/").await;

    let r = direct
        .put(&key("c/5"), "newer".into(), PutOptions::new())
        .await
        .unwrap();
    let ev = next(&mut w).await;
    let Event::Change(c) = &ev else {
        panic!("want a change, got {ev:?}")
    };
    assert_eq!(c.revision, r);
    assert_eq!(c.changes[0].prev, Some(Value::from("new")));
    ev.into_done().ok();
}

/// A consumer resuming after a revision etcd compacted since gets a `Compacted` resync,
/// at or after the compaction, that leaves its state right; later changes follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_after_a_compacted_revision_is_a_compacted_resync() {
    let etcd = server().await;
    let store = connect(etcd.endpoint()).await;
    let held = store
        .put(&key("rc/a"), "1".into(), PutOptions::new())
        .await
        .unwrap();
    let mut mirror = Mirror::new();
    let mut w = store
        .watch("rc", &[prefix("rc/")], WatchOptions::default())
        .await
        .unwrap();
    let ev = next(&mut w).await;
    mirror.apply(&ev).unwrap();
    ev.into_done().ok();
    drop(w);
    for i in 0..5 {
        store
            .put(&key(&format!("rc/{i}")), "x".into(), PutOptions::new())
            .await
            .unwrap();
    }
    let head = store.current_revision().await.unwrap();
    let mut kv = store.client().kv_client();
    kv.compact(head.0 as i64, None).await.unwrap();

    let mut w = store
        .watch("rc", &[prefix("rc/")], WatchOptions::default().resume(held))
        .await
        .unwrap();
    let ev = next(&mut w).await;
    let Event::Resync(rs) = &ev else {
        panic!("resumed before the compaction, want a resync, got {ev:?}");
    };
    assert_eq!(rs.reason, ResyncReason::Compacted);
    assert!(rs.revision >= head);
    mirror.apply(&ev).unwrap();
    ev.into_done().ok();
    assert_same(&store, &mirror, "rc/").await;
    let r = store
        .put(&key("rc/a"), "2".into(), PutOptions::new())
        .await
        .unwrap();
    let ev = next(&mut w).await;
    let Event::Change(c) = &ev else {
        panic!("want a change, got {ev:?}")
    };
    assert_eq!(c.revision, r);
    assert_eq!(c.changes[0].prev, Some(Value::from("1")));
    ev.into_done().ok();
}

/// etcd looks up an event's `prev_kv` when it sends the event, not when the write
/// happens: events held in its send queue while compaction passes their previous
/// revision go out without `prev_kv` and without an error. Here the queue is held by a
/// paused connection (flow control), compaction passes every queued event, and the
/// watch must not deliver a Put of an existing key as a create: it resyncs
/// (`Compacted`), and its consumer's state stays right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_sent_without_prev_kv_after_compaction_become_a_resync() {
    let etcd = server().await;
    let (proxy, store, direct) = through_a_proxy(&etcd).await;
    direct
        .put(&key("p/k"), "v0".into(), PutOptions::new())
        .await
        .unwrap();
    let mut w = store
        .watch("p", &[prefix("p/")], WatchOptions::default())
        .await
        .unwrap();
    let mut mirror = Mirror::new();
    let first = next(&mut w).await;
    mirror.apply(&first).unwrap();
    first.into_done().ok();

    // 40 overwrites of 256 KiB (10 MiB) fill the windows of a paused connection, so
    // most of them wait in etcd's send queue (128 deep: the watcher stays synced).
    proxy.pause();
    let big = "x".repeat(256 * 1024);
    let mut head = Revision(0);
    for i in 0..40 {
        head = direct
            .put(&key("p/k"), format!("{i}{big}").into(), PutOptions::new())
            .await
            .unwrap();
    }
    let mut kv = direct.client().kv_client();
    kv.compact(head.0 as i64, None).await.unwrap();
    proxy.resume();

    let mut reasons = Vec::new();
    while mirror.revision("").is_none_or(|r| r < head) {
        let ev = next(&mut w).await;
        // The contract checker refuses a Put of an existing key without its previous value.
        mirror
            .apply(&ev)
            .unwrap_or_else(|e| panic!("the watch broke the contract: {e}"));
        if let Event::Resync(r) = &ev {
            reasons.push(r.reason);
        }
        ev.into_done().ok();
    }
    assert!(
        reasons.contains(&ResyncReason::Compacted),
        "the events after compaction carried no previous value: want a resync, got {reasons:?}"
    );
    assert_same(&direct, &mirror, "p/").await;
}

/// A watch of `a/` and `c/` covers `b/` on the server (one range), so etcd sends the
/// writes under `b/` too. They are not the consumer's, but the resume point must move
/// past them: a network drop, then compaction up to the head, must resume without a
/// resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resume_point_moves_past_writes_outside_the_prefixes() {
    let etcd = server().await;
    let (proxy, store, direct) = through_a_proxy(&etcd).await;
    let mut w = store
        .watch("ac", &[prefix("a/"), prefix("c/")], WatchOptions::default())
        .await
        .unwrap();
    let first = next(&mut w).await;
    first.into_done().ok();
    let mut head = Revision(0);
    for i in 0..5 {
        head = direct
            .put(&key(&format!("b/{i}")), "x".into(), PutOptions::new())
            .await
            .unwrap();
    }
    // Let the watch see them (they reach the client, which drops them).
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut();
    let mut kv = direct.client().kv_client();
    kv.compact(head.0 as i64, None).await.unwrap();
    proxy.restore();
    let r = direct
        .put(&key("a/1"), "v".into(), PutOptions::new())
        .await
        .unwrap();
    let ev = next(&mut w).await;
    let Event::Change(c) = &ev else {
        panic!("want the change at {r} without a resync, got {ev:?}");
    };
    assert_eq!(c.revision, r);
    ev.into_done().ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restored_from_a_backup_becomes_a_resync() {
    let mut etcd = server().await;
    let store = connect(etcd.endpoint()).await;
    store
        .put(&key("b/a"), "1".into(), PutOptions::new())
        .await
        .unwrap();
    let at_backup = store
        .put(&key("b/b"), "2".into(), PutOptions::new())
        .await
        .unwrap();
    etcd.kill();
    let backup = tempfile::tempdir().unwrap();
    copy_dir(&etcd.data_dir(), &backup.path().join("data"));
    etcd.start_again().await.unwrap();

    let mut w = store
        .watch("b", &[prefix("b/")], WatchOptions::default())
        .await
        .unwrap();
    let mut mirror = Mirror::new();
    let ev = next(&mut w).await;
    mirror.apply(&ev).unwrap();
    ev.into_done().ok();
    let mut last = Revision(0);
    for i in 0..8 {
        last = store
            .put(&key(&format!("b/{i}")), "later".into(), PutOptions::new())
            .await
            .unwrap();
    }
    while mirror.revision("").unwrap() < last {
        let ev = next(&mut w).await;
        mirror.apply(&ev).unwrap();
        ev.into_done().ok();
    }

    etcd.kill();
    std::fs::remove_dir_all(etcd.data_dir()).unwrap();
    copy_dir(&backup.path().join("data"), &etcd.data_dir());
    etcd.start_again().await.unwrap();

    let ev = next(&mut w).await;
    let Event::Resync(rs) = &ev else {
        panic!("etcd went back from {last} to {at_backup}: want a resync, got {ev:?}");
    };
    assert_eq!(rs.reason, ResyncReason::StoreReset);
    assert_eq!(rs.revision, at_backup);
    let keys: Vec<_> = rs.values().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["b/a", "b/b"]);
    mirror.apply(&ev).unwrap();
    ev.into_done().ok();
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_ttl_puts_share_a_few_leases() {
    let etcd = server().await;
    let store = connect(etcd.endpoint()).await;
    let ttl = PutOptions::new().ttl(Duration::from_secs(30));
    futures_util::stream::iter(0..1000)
        .map(|i| {
            let (store, ttl) = (store.clone(), ttl.clone());
            async move {
                store
                    .put(&key(&format!("ttl/{i}")), "v".into(), ttl)
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    let mut client = etcd.client().await.unwrap();
    let leases = client.leases().await.unwrap().leases().len();
    assert!(
        (1..=5).contains(&leases),
        "1,000 TTL puts made {leases} leases"
    );
    assert_eq!(store.leases_granted(), leases as u64);
    // Every key is on a lease with at least its TTL left (30 s, minus this test's time).
    let resp = client
        .get("ttl/", Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(resp.kvs().len(), 1000);
    for kv in resp.kvs().iter().step_by(97) {
        let left = client
            .lease_time_to_live(kv.lease(), None)
            .await
            .unwrap()
            .ttl();
        assert!(left >= 25, "key {:?} has {left} s left of 30", kv.key_str());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_etcd_is_a_retryable_error_or_is_waited_for() {
    let port = free_port().unwrap();
    let nobody = format!("http://127.0.0.1:{port}");
    let err = EtcdStore::connect(
        EtcdConfig::new([nobody]).with_connect_timeout(Duration::from_millis(500)),
    )
    .await
    .expect_err("connected to nothing");
    assert!(err.is_retryable(), "not retryable: {err:?}");

    let mut etcd = server().await;
    etcd.kill();
    let config = EtcdConfig::new([etcd.endpoint()])
        .with_connect_timeout(Duration::from_millis(500))
        .with_wait_for_server(Duration::from_secs(60));
    let waiting = tokio::spawn(EtcdStore::connect(config));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiting.is_finished(), "gave up before the deadline");
    etcd.start_again().await.unwrap();
    let store = waiting.await.unwrap().unwrap();
    store
        .put(&key("w"), "up".into(), PutOptions::new())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_are_trimmed_and_isolated() {
    let etcd = server().await;
    let ns = |n: &str| EtcdStore::connect(EtcdConfig::new([etcd.endpoint()]).with_namespace(n));
    let (a, b) = (ns("agent-a/").await.unwrap(), ns("agent-b/").await.unwrap());
    a.put(&key("cfg/x"), "a".into(), PutOptions::new())
        .await
        .unwrap();
    let mut w = a
        .watch("a", &[Prefix::all()], WatchOptions::default())
        .await
        .unwrap();
    let ev = next(&mut w).await;
    let Event::Resync(rs) = &ev else {
        panic!("{ev:?}")
    };
    let keys: Vec<_> = rs.values().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["cfg/x"], "namespace not trimmed");
    ev.into_done().ok();
    let mut raw = etcd.client().await.unwrap();
    assert_eq!(raw.get("agent-a/cfg/x", None).await.unwrap().kvs().len(), 1);
    assert!(
        b.get(&key("cfg/x"), ReadOptions::new())
            .await
            .unwrap()
            .is_none()
    );
    b.put(&key("cfg/x"), "b".into(), PutOptions::new())
        .await
        .unwrap();
    // Another client's key that datasync cannot represent is skipped, not fatal.
    raw.put("agent-a/bad\u{1}key", "?", None).await.unwrap();
    let r = a
        .put(&key("cfg/y"), "a".into(), PutOptions::new())
        .await
        .unwrap();
    let ev = next(&mut w).await;
    let Event::Change(c) = &ev else {
        panic!("{ev:?}")
    };
    assert_eq!((c.revision, c.changes.len()), (r, 1));
    assert_eq!(c.changes[0].key.as_str(), "cfg/y");
    ev.into_done().ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_transaction_over_two_prefixes_is_one_event() {
    let etcd = server().await;
    let store = connect(etcd.endpoint()).await;
    for k in ["m/a/1", "m/b/1", "m/c/1"] {
        store
            .put(&key(k), "v".into(), PutOptions::new())
            .await
            .unwrap();
    }
    let mut w = store
        .watch(
            "m",
            &[prefix("m/b/"), prefix("m/a/")],
            WatchOptions::default(),
        )
        .await
        .unwrap();
    next(&mut w).await.into_done().ok();
    let del = store
        .delete(&key("m/"), DeleteOptions::new().prefix())
        .await
        .unwrap();
    assert_eq!(del.count, 3);
    let ev = next(&mut w).await;
    let Event::Change(c) = &ev else {
        panic!("{ev:?}")
    };
    assert_eq!(c.revision, del.revision);
    let got: Vec<_> = c
        .changes
        .iter()
        .map(|kc| (kc.key.as_str(), kc.op, kc.prev.clone()))
        .collect();
    let v = Some(Value::from("v"));
    assert_eq!(
        got,
        [("m/a/1", Op::Delete, v.clone()), ("m/b/1", Op::Delete, v)]
    );
    ev.into_done().ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_keeps_keys_alive_until_closed() {
    let etcd = server().await;
    let store = connect(etcd.endpoint()).await;
    let session = store.session(Duration::from_secs(2)).await.unwrap();
    session.put(&key("s/me"), "here".into()).await.unwrap();
    let mut w = store
        .watch("s", &[prefix("s/")], WatchOptions::default())
        .await
        .unwrap();
    next(&mut w).await.into_done().ok();
    // Well past the lease's TTL: kept alive.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        store
            .get(&key("s/me"), ReadOptions::new())
            .await
            .unwrap()
            .is_some()
    );
    session.close().await.unwrap();
    let ev = next(&mut w).await;
    let Event::Change(c) = &ev else {
        panic!("{ev:?}")
    };
    assert_eq!(c.changes[0].op, Op::Delete);
    assert_eq!(c.changes[0].prev, Some(Value::from("here")));
    ev.into_done().ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_authenticate_and_a_wrong_one_is_refused() {
    let etcd = server().await;
    let mut admin = etcd.client().await.unwrap();
    admin.role_add("root").await.unwrap();
    admin.user_add("root", "s3cret", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();

    let config = EtcdConfig::new([etcd.endpoint()]).with_connect_timeout(Duration::from_secs(2));
    let store = EtcdStore::connect(config.clone().with_user("root", "s3cret"))
        .await
        .unwrap();
    let r = store
        .put(&key("auth/k"), "v".into(), PutOptions::new())
        .await
        .unwrap();
    let mut w = store
        .watch("auth", &[prefix("auth/")], WatchOptions::default())
        .await
        .unwrap();
    assert_eq!(next(&mut w).await.revision(), r);

    let wrong = EtcdStore::connect(config.clone().with_user("root", "wrong")).await;
    let e = wrong.expect_err("a wrong password connected");
    assert!(
        matches!(e, StoreError::Unauthenticated(_)),
        "a wrong password: {e:?}"
    );
    assert!(!e.is_retryable());
    let anonymous = EtcdStore::connect(config).await;
    let e = anonymous.expect_err("no credentials connected to an etcd with auth");
    assert!(
        matches!(
            e,
            StoreError::Unauthenticated(_) | StoreError::PermissionDenied(_)
        ),
        "missing credentials: {e:?}"
    );
    assert!(!e.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_of_no_prefixes_resyncs_empty_and_stays_quiet() {
    let etcd = server().await;
    let store = connect(etcd.endpoint()).await;
    let mut w = store
        .watch("none", &[], WatchOptions::default())
        .await
        .unwrap();
    let ev = next(&mut w).await;
    assert!(matches!(&ev, Event::Resync(rs) if rs.is_empty()), "{ev:?}");
    ev.into_done().ok();
    store
        .put(&key("any"), "v".into(), PutOptions::new())
        .await
        .unwrap();
    w.registration().request_resync();
    let ev = next(&mut w).await;
    assert!(
        matches!(&ev, Event::Resync(rs) if rs.reason == ResyncReason::Requested && rs.is_empty()),
        "{ev:?}"
    );
    ev.into_done().ok();
}
