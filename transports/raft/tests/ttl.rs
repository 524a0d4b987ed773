//! TTLs are durations counted on each member's monotonic clock from its apply: clock
//! skew between members does not move expiry, a leader change never expires a key
//! early, and after a restart every lease gets its full TTL again.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::{Duration, Instant};

use datasync::{Event, Key, Op, Prefix, PutOptions, ReadOptions, WatchOptions, Watcher, Writer};
use datasync_raft::testing::{TestCluster, watch_past_resync};
use datasync_raft::{Clock, RaftConfig, RaftStore};

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

/// Waits for the Delete of `k` on `w`, answering everything; returns when it came.
async fn expiry_of(w: &mut datasync::Watch, k: &str) -> Instant {
    loop {
        let ev = datasync::testing::next_event(w).await.expect("next event");
        let hit = matches!(&ev, Event::Change(c)
            if c.changes.iter().any(|kc| kc.key.as_str() == k && kc.op == Op::Delete));
        ev.into_done().ok();
        if hit {
            return Instant::now();
        }
    }
}

/// Members whose clocks are 30 s behind and 30 s ahead take TTL writes: each key lives
/// its TTL (2 s) and then expires, whichever member took it and whichever leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_skew_between_members_does_not_move_expiry() {
    let cluster = TestCluster::start_with(3, |c| {
        let clock = Clock::new();
        match c.node_id {
            2 => clock.rewind(Duration::from_secs(30)),
            3 => clock.advance(Duration::from_secs(30)),
            _ => {}
        }
        c.clock(clock)
    })
    .await;
    let leader = cluster.leader().await;
    let mut w = watch_past_resync(leader, "t/").await;
    let ttl = Duration::from_secs(2);
    let mut puts = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let k = format!("t/{}", node.node_id());
        node.put(&key(&k), format!("v{i}").into(), PutOptions::new().ttl(ttl))
            .await
            .unwrap();
        puts.push((k, Instant::now()));
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for (k, _) in &puts {
        assert!(
            leader
                .get(&key(k), ReadOptions::new())
                .await
                .unwrap()
                .is_some(),
            "{k} expired before its TTL"
        );
    }
    // Keys due together may expire in one transaction: note when each goes.
    let mut gone = std::collections::BTreeMap::new();
    while gone.len() < puts.len() {
        let ev = datasync::testing::next_event(&mut w)
            .await
            .expect("next event");
        if let Event::Change(c) = &ev {
            for kc in c.changes.iter().filter(|kc| kc.op == Op::Delete) {
                gone.insert(kc.key.as_str().to_owned(), Instant::now());
            }
        }
        ev.into_done().ok();
    }
    for (k, at) in &puts {
        let lived = gone[k] - *at;
        assert!(
            lived >= ttl - Duration::from_millis(50),
            "{k} expired after {lived:?}, its TTL is {ttl:?}"
        );
        assert!(
            lived < ttl + Duration::from_secs(5),
            "{k} expired only after {lived:?}"
        );
    }
}

/// The leader that took a TTL write stops midway: the new leader expires the key no
/// earlier than the TTL after the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_never_expires_a_key_early() {
    let mut cluster = TestCluster::start(3).await;
    let leader_id = cluster.leader().await.node_id();
    let ttl = Duration::from_secs(3);
    cluster
        .leader()
        .await
        .put(&key("t/k"), "v".into(), PutOptions::new().ttl(ttl))
        .await
        .unwrap();
    let at = Instant::now();
    let follower = cluster
        .nodes
        .iter()
        .position(|n| n.node_id() != leader_id)
        .unwrap();
    let mut w = watch_past_resync(&cluster.nodes[follower], "t/").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pos = cluster
        .nodes
        .iter()
        .position(|n| n.node_id() == leader_id)
        .unwrap();
    let old = cluster.nodes.remove(pos);
    old.shutdown().await;
    let gone = expiry_of(&mut w, "t/k").await;
    let lived = gone - at;
    assert!(lived >= ttl, "the key lived {lived:?} of its {ttl:?} TTL");
    assert!(
        lived < ttl + Duration::from_secs(8),
        "the key lived {lived:?}"
    );
}

/// A single node stopped with a 1.5 s lease and opened 2 s later keeps the key (the
/// lease starts again at open), reads agree, and it expires 1.5 s after the open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_store_gives_every_lease_its_full_ttl_again() {
    let dir = tempfile::tempdir().unwrap();
    let ttl = Duration::from_millis(1500);
    {
        let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
        s.put(&key("t/k"), "v".into(), PutOptions::new().ttl(ttl))
            .await
            .unwrap();
        s.shutdown().await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    let opened = Instant::now();
    let mut w = s
        .watch(
            "ttl",
            &[Prefix::new("t/").unwrap()],
            WatchOptions::default(),
        )
        .await
        .unwrap();
    let first = datasync::testing::next_event(&mut w).await.unwrap();
    let Event::Resync(r) = &first else {
        panic!("want a resync, got {first:?}")
    };
    assert_eq!(r.len(), 1, "the lease starts again at open: {r:?}");
    first.into_done().ok();
    assert!(
        s.get(&key("t/k"), ReadOptions::new())
            .await
            .unwrap()
            .is_some()
    );
    let gone = expiry_of(&mut w, "t/k").await;
    let lived = gone - opened;
    assert!(
        lived >= ttl - Duration::from_millis(100),
        "expired {lived:?} after the open, the TTL is {ttl:?}"
    );
    assert!(lived < ttl + Duration::from_secs(5), "lived {lived:?}");
    assert!(
        s.get(&key("t/k"), ReadOptions::new())
            .await
            .unwrap()
            .is_none()
    );
    s.shutdown().await;
}

/// The store runs on one thread under paused time (as a simulation runs it, see
/// `docs/SIMULATION.md`): blocking work and the state machine's writer inline, every
/// clock the runtime's. An hour's TTL then expires after an hour of simulated time,
/// not before, in moments of real time.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_store_on_one_thread_under_paused_time_expires_a_ttl_on_simulated_time() {
    datasync_raft::testing::set_inline(true);
    let dir = tempfile::tempdir().unwrap();
    let store = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    let real = Instant::now();
    let hour = Duration::from_secs(3600);
    store
        .put(&key("lease"), "held".into(), PutOptions::new().ttl(hour))
        .await
        .unwrap();
    let mut w = watch_past_resync(&store, "lease").await;
    let start = tokio::time::Instant::now();
    tokio::time::sleep(hour - Duration::from_secs(1)).await;
    assert!(
        store
            .get(&key("lease"), ReadOptions::new())
            .await
            .unwrap()
            .is_some(),
        "expired before its TTL"
    );
    expiry_of(&mut w, "lease").await;
    let simulated = start.elapsed();
    assert!(simulated >= hour - Duration::from_secs(1), "{simulated:?}");
    assert!(simulated < hour + Duration::from_secs(2), "{simulated:?}");
    assert!(
        store
            .get(&key("lease"), ReadOptions::new())
            .await
            .unwrap()
            .is_none()
    );
    store.shutdown().await;
    datasync_raft::testing::set_inline(false);
    assert!(
        real.elapsed() < Duration::from_secs(60),
        "{:?}",
        real.elapsed()
    );
}
