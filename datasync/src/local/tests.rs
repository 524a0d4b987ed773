use std::time::Duration;

use futures_util::StreamExt;

use super::*;
use crate::{Event, Op, ResyncReason};

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

/// Writes `i` to key `k{i % keys}` for each `i` in `range`: revision `i + 1` on a
/// fresh store.
async fn rotate(s: &Local, range: std::ops::Range<u64>, keys: u64) {
    for i in range {
        let k = key(&format!("k{}", i % keys));
        s.put(&k, format!("{i}").into(), PutOptions::new())
            .await
            .unwrap();
    }
}

async fn next(w: &mut crate::Watch) -> Event {
    crate::testing::next_event(w).await.expect("next event")
}

#[tokio::test(start_paused = true)]
async fn ttl_follows_tokio_time_exactly() {
    let s = Local::new();
    let mut w = s
        .watch("t", &[Prefix::all()], WatchOptions::default())
        .await
        .unwrap();
    next(&mut w).await.into_done().ok();
    s.put(
        &key("lease"),
        "v".into(),
        PutOptions::new().ttl(Duration::from_secs(10)),
    )
    .await
    .unwrap();
    next(&mut w).await.into_done().ok();
    tokio::time::sleep(Duration::from_millis(9_999)).await;
    assert!(
        s.get(&key("lease"), ReadOptions::new())
            .await
            .unwrap()
            .is_some()
    );
    tokio::time::sleep(Duration::from_millis(2)).await;
    let Event::Change(c) = next(&mut w).await else {
        panic!("want the expiry")
    };
    assert_eq!(c.changes[0].op, Op::Delete);
    assert_eq!(c.changes[0].prev, Some(Value::from("v")));
    c.done.ok();
    assert!(
        s.get(&key("lease"), ReadOptions::new())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(start_paused = true)]
async fn keys_expiring_together_go_in_one_transaction() {
    let s = Local::new();
    let mut w = s
        .watch("t", &[Prefix::all()], WatchOptions::default())
        .await
        .unwrap();
    next(&mut w).await.into_done().ok();
    let ttl = PutOptions::new().ttl(Duration::from_secs(1));
    s.put(&key("a"), "1".into(), ttl.clone()).await.unwrap();
    s.put(&key("b"), "2".into(), ttl).await.unwrap();
    next(&mut w).await.into_done().ok();
    next(&mut w).await.into_done().ok();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let Event::Change(c) = next(&mut w).await else {
        panic!()
    };
    assert_eq!(c.changes.len(), 2);
    assert_eq!(c.revision, Revision(3));
    c.done.ok();
}

#[tokio::test]
async fn prefix_delete_is_one_transaction() {
    let s = Local::new();
    for k in ["p/1", "p/2", "p/3", "q"] {
        s.put(&key(k), "v".into(), PutOptions::new()).await.unwrap();
    }
    let mut w = s
        .watch("t", &[Prefix::all()], WatchOptions::default())
        .await
        .unwrap();
    next(&mut w).await.into_done().ok();
    let d = s
        .delete(&key("p/"), DeleteOptions::new().prefix())
        .await
        .unwrap();
    assert_eq!((d.count, d.revision), (3, Revision(5)));
    let Event::Change(c) = next(&mut w).await else {
        panic!()
    };
    assert_eq!(c.revision, Revision(5));
    let keys: Vec<_> = c.changes.iter().map(|kc| kc.key.as_str()).collect();
    assert_eq!(keys, ["p/1", "p/2", "p/3"]);
    c.done.ok();
}

#[tokio::test]
async fn history_is_compacted_and_reads_say_so() {
    let s = Local::with_config(LocalConfig::default().history(10));
    rotate(&s, 0..100, 3).await;
    s.delete(&key("k0"), DeleteOptions::new()).await.unwrap();
    let now = s.revision();
    assert_eq!(now, Revision(101));
    let old = s.get(&key("k1"), ReadOptions::new().at(Revision(5))).await;
    assert!(matches!(old, Err(StoreError::Compacted { .. })), "{old:?}");
    let recent = s
        .get(&key("k1"), ReadOptions::new().at(Revision(95)))
        .await
        .unwrap();
    assert_eq!(recent.unwrap().value, Value::from("94"));
    let listing = s
        .list(&Prefix::all(), ReadOptions::new().at(Revision(100)))
        .await
        .unwrap();
    assert_eq!(listing.values.len(), 3);
    assert_eq!(
        s.list(&Prefix::all(), ReadOptions::new())
            .await
            .unwrap()
            .values
            .len(),
        2
    );
}

#[tokio::test]
async fn overflow_resync_replaces_queued_changes() {
    let s = Local::new();
    let mut w = s
        .watch(
            "t",
            &[Prefix::all()],
            WatchOptions::default().queue_capacity(2),
        )
        .await
        .unwrap();
    next(&mut w).await.into_done().ok();
    for i in 0..10 {
        s.put(&key(&format!("k{i}")), "v".into(), PutOptions::new())
            .await
            .unwrap();
    }
    let Event::Resync(r) = next(&mut w).await else {
        panic!("want the overflow resync")
    };
    assert_eq!(
        (r.reason, r.revision, r.len()),
        (ResyncReason::Overflow, Revision(10), 10)
    );
    r.done.ok();
    s.put(&key("k0"), "w".into(), PutOptions::new())
        .await
        .unwrap();
    let Event::Change(c) = next(&mut w).await else {
        panic!()
    };
    assert_eq!(c.revision, Revision(11));
    c.done.ok();
}

#[tokio::test]
async fn an_added_prefix_comes_after_the_queued_changes_or_with_an_overflow_resync() {
    let s = Local::new();
    let put = |k: &str| {
        let s = s.clone();
        let k = key(k);
        async move { s.put(&k, "v".into(), PutOptions::new()).await.unwrap() }
    };
    put("b/0").await;
    let a = Prefix::new("a/").unwrap();
    let b = Prefix::new("b/").unwrap();
    let opts = WatchOptions::default().queue_capacity(4);
    let mut w = s.watch("t", std::slice::from_ref(&a), opts).await.unwrap();
    next(&mut w).await.into_done().ok();
    put("a/1").await;
    put("b/1").await;
    w.registration().add_prefix(b.clone());
    put("a/2").await;
    // Read at the first poll (revision 4), after the two queued a/ changes.
    let mut got = Vec::new();
    for _ in 0..3 {
        let ev = next(&mut w).await;
        got.push(match &ev {
            Event::Change(c) => format!("change {}", c.revision),
            Event::Resync(r) => format!("{:?} {} {}", r.reason, r.revision, r.len()),
        });
        ev.into_done().ok();
    }
    assert_eq!(got, ["change 2", "change 4", "PrefixAdded 4 2"]);
    // An overflow while an added prefix is owed: one full resync pays both.
    let c = Prefix::new("c/").unwrap();
    put("c/1").await;
    w.registration().add_prefix(c.clone());
    for i in 0..6 {
        put(&format!("a/x{i}")).await;
    }
    let Event::Resync(r) = next(&mut w).await else {
        panic!("want a resync")
    };
    let listed: Vec<_> = r.prefixes.iter().map(|g| g.prefix.clone()).collect();
    assert_eq!(listed, [a, b, c]);
    assert_eq!((r.reason, r.len()), (ResyncReason::Overflow, 11));
}

#[tokio::test]
async fn a_removed_prefix_is_no_longer_fed_so_it_cannot_overflow_the_queue() {
    let s = Local::new();
    let a = Prefix::new("a/").unwrap();
    let b = Prefix::new("b/").unwrap();
    let opts = WatchOptions::default().queue_capacity(2);
    let mut w = s.watch("t", &[a, b.clone()], opts).await.unwrap();
    next(&mut w).await.into_done().ok();
    assert!(w.registration().remove_prefix(&b));
    s.put(&key("a/1"), "v".into(), PutOptions::new())
        .await
        .unwrap();
    next(&mut w).await.into_done().ok();
    for i in 0..5 {
        s.put(&key(&format!("b/{i}")), "v".into(), PutOptions::new())
            .await
            .unwrap();
    }
    let r = s
        .put(&key("a/2"), "v".into(), PutOptions::new())
        .await
        .unwrap();
    let ev = next(&mut w).await;
    assert!(
        matches!(&ev, Event::Change(c) if c.revision == r),
        "want the change of a/2, not an overflow of unwatched b/ writes: {ev:?}"
    );
}

#[tokio::test]
async fn a_watch_keeps_the_store_alive_and_dropping_releases_it() {
    let s = Local::new();
    let w = s
        .watch("t", &[Prefix::all()], WatchOptions::default())
        .await
        .unwrap();
    assert_eq!(s.active_watches(), 1);
    drop(w);
    assert_eq!(s.active_watches(), 0);
}

/// Regression: the TTL task was woken before the deadline was committed; on two threads
/// it could miss it and sleep until some later operation. Expiry must come on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_arrives_without_any_other_operation() {
    for round in 0..50 {
        let s = Local::new();
        let mut w = s
            .watch("t", &[Prefix::all()], WatchOptions::default())
            .await
            .unwrap();
        next(&mut w).await.into_done().ok();
        let ttl = PutOptions::new().ttl(Duration::from_millis(1));
        s.put(&key("k"), "v".into(), ttl).await.unwrap();
        next(&mut w).await.into_done().ok();
        let ev = tokio::time::timeout(Duration::from_secs(2), w.next()).await;
        assert!(
            matches!(&ev, Ok(Some(Ok(Event::Change(c)))) if c.changes[0].op == Op::Delete),
            "round {round}: no expiry event: {ev:?}"
        );
    }
}

/// The TTL task has had no chance to run (one thread, never yielded to): a requested
/// resync must still leave the expired key out, as reads do.
#[tokio::test(flavor = "current_thread")]
async fn a_resync_never_holds_an_expired_key() {
    let s = Local::new();
    let mut w = s
        .watch("t", &[Prefix::all()], WatchOptions::default())
        .await
        .unwrap();
    next(&mut w).await.into_done().ok();
    let ttl = PutOptions::new().ttl(Duration::from_millis(1));
    s.put(&key("gone"), "v".into(), ttl).await.unwrap();
    s.put(&key("kept"), "v".into(), PutOptions::new())
        .await
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    w.registration().request_resync();
    let Event::Resync(r) = next(&mut w).await else {
        panic!("want the resync")
    };
    let keys: Vec<_> = r.values().map(|kv| kv.key.as_str().to_owned()).collect();
    assert_eq!(keys, ["kept"]);
    r.done.ok();
}

/// Resuming inside the kept history replays it, with the previous values of the time,
/// down to the compaction floor itself (whose previous values are the versions the
/// compaction kept); before it, a `Compacted` resync.
#[tokio::test]
async fn a_resume_replays_the_kept_history_or_resyncs_as_compacted() {
    let s = Local::with_config(LocalConfig::default().history(10));
    rotate(&s, 0..40, 3).await;
    let now = s.revision();
    let all = [Prefix::all()];
    let resumed = |r: u64| s.watch("r", &all, WatchOptions::default().resume(Revision(r)));
    let mut w = resumed(now.0 - 5).await.unwrap();
    for r in now.0 - 4..=now.0 {
        let Event::Change(c) = next(&mut w).await else {
            panic!("not a change")
        };
        assert_eq!(c.revision, Revision(r));
        // Revision r wrote i = r - 1 to k{(r-1) % 3}, over i - 3.
        let i = r - 1;
        assert_eq!(c.changes[0].key, key(&format!("k{}", i % 3)));
        assert_eq!(c.changes[0].value, Some(format!("{i}").into()));
        assert_eq!(c.changes[0].prev, Some(format!("{}", i - 3).into()));
        c.done.ok();
    }
    // 40 puts with history(10): compacted at 11 (revision 21), then at 22 (32).
    let mut w = resumed(22).await.unwrap();
    let Event::Change(c) = next(&mut w).await else {
        panic!("not a change")
    };
    assert_eq!(c.revision, Revision(23));
    // i = 22 to k1, over i = 19 written at revision 20, kept as the floor's version.
    assert_eq!(c.changes[0].key, key("k1"));
    assert_eq!(c.changes[0].prev, Some("19".into()));
    c.done.ok();
    let mut w = resumed(21).await.unwrap();
    let Event::Resync(rs) = next(&mut w).await else {
        panic!("not a resync")
    };
    assert_eq!(rs.reason, ResyncReason::Compacted);
    assert_eq!(rs.revision, now);
    assert_eq!(rs.values().count(), 3);
}

/// A queue that overflows while the replay is still being delivered: the rest of the
/// replay gives way to an `Overflow` resync, and the consumer's state ends right.
#[tokio::test]
async fn an_overflow_during_a_replay_becomes_a_resync() {
    let s = Local::new();
    rotate(&s, 0..10, 2).await;
    let all = [Prefix::all()];
    let mut m = crate::Mirror::new();
    let mut w = s.watch("r", &all, WatchOptions::default()).await.unwrap();
    let ev = next(&mut w).await;
    m.apply(&ev).unwrap();
    ev.into_done().ok();
    drop(w);
    let held = s.revision();
    rotate(&s, 10..20, 2).await;
    let opts = WatchOptions::default().queue_capacity(1).resume(held);
    let mut w = s.watch("r", &all, opts).await.unwrap();
    let ev = next(&mut w).await;
    assert!(matches!(ev, Event::Change(_)), "{ev:?}");
    m.apply(&ev).unwrap();
    ev.into_done().ok();
    // Two writes while the replay is out: the queue of one overflows.
    rotate(&s, 20..22, 2).await;
    let ev = next(&mut w).await;
    let Event::Resync(rs) = &ev else {
        panic!("{ev:?}")
    };
    assert_eq!(rs.reason, ResyncReason::Overflow);
    assert_eq!(rs.revision, s.revision());
    m.apply(&ev).unwrap();
    ev.into_done().ok();
    assert_eq!(m.get("", "k0"), Some(&crate::Value::from("20")));
    assert_eq!(m.get("", "k1"), Some(&crate::Value::from("21")));
}
