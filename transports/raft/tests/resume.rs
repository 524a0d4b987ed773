//! A consumer resumes after a revision it holds (`WatchOptions::resume`) from the
//! history the store keeps on disk, across a restart of the store; the history's
//! compaction by age decides how far back that works.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use datasync::testing::next_event;
use datasync::{
    DeleteOptions, Event, Key, Mirror, Prefix, PutOptions, ReadOptions, ResyncReason, Revision,
    WatchOptions, Watcher, Writer,
};
use datasync_raft::{RaftConfig, RaftStore};

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

async fn put(s: &RaftStore, k: &str, v: &str) -> Revision {
    s.put(&key(k), v.to_owned().into(), PutOptions::new())
        .await
        .unwrap()
}

async fn same_as_store(s: &RaftStore, m: &Mirror) {
    datasync::testing::same_as_store(s, m, "p/").await.unwrap();
}

/// The first event of a watch of `p/` resuming after `r`.
async fn first_after(s: &RaftStore, r: Revision) -> Event {
    let opts = WatchOptions::default().resume(r);
    let mut w = s
        .watch("p", &[Prefix::new("p/").unwrap()], opts)
        .await
        .unwrap();
    next_event(&mut w).await.unwrap()
}

/// The plugin's case: its state at R survives a restart of the agent (and the store),
/// and the stream goes on from R + 1 with no full resync, previous values as its state
/// has them; once a compaction passed R, it gets a `Compacted` resync instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_resumes_across_a_restart_of_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let config = || {
        let mut c = RaftConfig::new(dir.path());
        c.history = 100;
        c
    };
    let prefixes = [Prefix::new("p/").unwrap()];
    let s = RaftStore::open(config()).await.unwrap();
    put(&s, "p/a", "a1").await;
    put(&s, "p/b", "b1").await;
    let mut m = Mirror::new();
    let mut w = s
        .watch("p", &prefixes, WatchOptions::default())
        .await
        .unwrap();
    let ev = next_event(&mut w).await.unwrap();
    m.apply(&ev).unwrap();
    ev.into_done().ok();
    let held = put(&s, "p/a", "a2").await;
    while m.revision("") != Some(held) {
        let ev = next_event(&mut w).await.unwrap();
        m.apply(&ev).unwrap();
        ev.into_done().ok();
    }
    drop(w);
    // While the consumer is down.
    put(&s, "p/b", "b2").await;
    s.delete(&key("p/a"), DeleteOptions::new()).await.unwrap();
    put(&s, "q/x", "elsewhere").await;
    let last = put(&s, "p/c", "c1").await;
    s.shutdown().await;
    drop(s);

    let s = RaftStore::open(config()).await.unwrap();
    let mut w = s
        .watch("p", &prefixes, WatchOptions::default().resume(held))
        .await
        .unwrap();
    let mut changes = 0;
    while m.revision("") != Some(last) {
        let ev = next_event(&mut w).await.unwrap();
        assert!(matches!(ev, Event::Change(_)), "{ev:?}");
        m.apply(&ev).unwrap();
        ev.into_done().ok();
        changes += 1;
    }
    assert_eq!(changes, 3, "b2, the delete of a, c1 (not q/x)");
    same_as_store(&s, &m).await;
    drop(w);

    // A compaction past the held revision: the consumer's state is resynced whole.
    // (Resuming after the revision just before the floor still replays: the floor's
    // own change is kept.)
    s.compact(last).await.unwrap();
    let ev = first_after(&s, Revision(last.0 - 1)).await;
    let Event::Change(c) = &ev else {
        panic!("{ev:?}")
    };
    assert_eq!(c.revision, last);
    ev.into_done().ok();
    let ev = first_after(&s, held).await;
    let Event::Resync(rs) = &ev else {
        panic!("{ev:?}")
    };
    assert_eq!(rs.reason, ResyncReason::Compacted);
    m.apply(&ev).unwrap();
    ev.into_done().ok();
    same_as_store(&s, &m).await;
}

/// `history_age`: what is older is compacted on its own, and never what is younger.
/// A consumer held at a revision that aged out gets a `Compacted` resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_is_compacted_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let age = std::time::Duration::from_secs(2);
    let s = RaftStore::open(RaftConfig::new(dir.path()).history_age(Some(age)))
        .await
        .unwrap();
    let mut held = Revision::ZERO;
    for i in 0..5 {
        held = put(&s, &format!("p/{i}"), "old").await;
    }
    // Up to about two ages (sampled every second), the floor reaches what was written.
    let deadline = tokio::time::Instant::now() + age * 10;
    while s.compacted_revision() < held {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never compacted: floor {}",
            s.compacted_revision()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let young = put(&s, "p/young", "new").await;
    // More than a sampling interval (1 s), less than the age.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(
        s.compacted_revision() < young,
        "a revision younger than the age is never compacted"
    );
    let old = s
        .get(&key("p/0"), ReadOptions::new().at(Revision(held.0 - 1)))
        .await;
    assert!(
        matches!(old, Err(datasync::StoreError::Compacted { .. })),
        "{old:?}"
    );
    let ev = first_after(&s, Revision(1)).await;
    let Event::Resync(rs) = &ev else {
        panic!("{ev:?}")
    };
    assert_eq!(rs.reason, ResyncReason::Compacted);
    ev.into_done().ok();
    // Out of range ages are refused.
    for bad in [
        std::time::Duration::ZERO,
        datasync_raft::MAX_HISTORY_AGE * 2,
    ] {
        let config = RaftConfig::new(dir.path().join("other")).history_age(Some(bad));
        assert!(config.validate().is_err(), "{bad:?}");
    }
}
