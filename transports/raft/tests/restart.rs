//! Restarts from disk: state, revisions, leases and snapshots survive; nothing is
//! re-initialized.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use datasync::{
    DeleteOptions, Event, Key, Prefix, PutOptions, ReadOptions, Revision, Value, WatchOptions,
    Watcher, Writer,
};
use datasync_raft::{RaftConfig, RaftStore};
use futures_util::StreamExt;

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

async fn next(w: &mut datasync::Watch) -> Event {
    datasync::testing::next_event(w).await.expect("next event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_state_revision_and_hash() {
    let dir = tempfile::tempdir().unwrap();
    let (rev, hash) = {
        let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
        for i in 0..50 {
            s.put(
                &key(&format!("a/{i:02}")),
                format!("v{i}").into(),
                PutOptions::new(),
            )
            .await
            .unwrap();
        }
        s.delete(&key("a/1"), DeleteOptions::new().prefix())
            .await
            .unwrap();
        let rev = s.revision();
        let hash = s.state_hash().unwrap();
        s.shutdown().await;
        (rev, hash)
    };
    assert_eq!(rev, Revision(51));
    let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    let mut w = s
        .watch("w", &[Prefix::new("a/").unwrap()], WatchOptions::default())
        .await
        .unwrap();
    let Event::Resync(r) = next(&mut w).await else {
        panic!("want a resync")
    };
    assert_eq!(
        r.revision, rev,
        "the restarted store resyncs at the same revision"
    );
    assert_eq!(r.len(), 40);
    r.done.ok();
    assert_eq!(s.state_hash().unwrap(), hash);
    let got = s
        .get(&key("a/07"), ReadOptions::new())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((got.value, got.revision), (Value::from("v7"), Revision(8)));
    let r2 = s
        .put(&key("a/new"), "x".into(), PutOptions::new())
        .await
        .unwrap();
    assert_eq!(r2, Revision(52), "revisions continue, never restart");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_compact_the_log_and_restore_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = || RaftConfig::new(dir.path()).snapshots(100, 10);
    let hash = {
        let s = RaftStore::open(config()).await.unwrap();
        for i in 0..1000 {
            s.put(
                &key(&format!("k/{}", i % 37)),
                format!("{i}").into(),
                PutOptions::new(),
            )
            .await
            .unwrap();
        }
        s.snapshot().await.unwrap();
        let hash = s.state_hash().unwrap();
        s.shutdown().await;
        hash
    };
    let s = RaftStore::open(config()).await.unwrap();
    assert_eq!(s.revision(), Revision(1000));
    assert_eq!(s.state_hash().unwrap(), hash);
    let l = s
        .list(&Prefix::new("k/").unwrap(), ReadOptions::new())
        .await
        .unwrap();
    assert_eq!(l.values.len(), 37);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_outlives_a_restart_and_then_expires() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
        let ttl = PutOptions::new().ttl(Duration::from_millis(1500));
        s.put(&key("lease"), "held".into(), ttl).await.unwrap();
        s.put(&key("plain"), "kept".into(), PutOptions::new())
            .await
            .unwrap();
        s.shutdown().await;
    }
    let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    let mut w = s
        .watch("w", &[Prefix::all()], WatchOptions::default())
        .await
        .unwrap();
    let Event::Resync(r) = next(&mut w).await else {
        panic!()
    };
    let lease_present = r.values().any(|kv| kv.key.as_str() == "lease");
    r.done.ok();
    if lease_present {
        let Event::Change(c) = next(&mut w).await else {
            panic!("want the expiry")
        };
        assert_eq!(c.changes[0].key.as_str(), "lease");
        assert_eq!(c.changes[0].prev, Some(Value::from("held")));
        c.done.ok();
    }
    assert!(
        s.get(&key("lease"), ReadOptions::new())
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        s.get(&key("plain"), ReadOptions::new())
            .await
            .unwrap()
            .is_some()
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_values_and_zero_ttl_are_refused_before_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let s = RaftStore::open(RaftConfig::new(dir.path()).max_value_size(16))
        .await
        .unwrap();
    let big = s
        .put(&key("k"), Value::from(vec![0u8; 17]), PutOptions::new())
        .await;
    assert!(matches!(
        big,
        Err(datasync::StoreError::ValueTooLarge { size: 17, max: 16 })
    ));
    let zero = s
        .put(&key("k"), "v".into(), PutOptions::new().ttl(Duration::ZERO))
        .await;
    assert!(matches!(zero, Err(datasync::StoreError::InvalidTtl(_))));
    assert_eq!(s.revision(), Revision(0));
    s.shutdown().await;
}

/// A limit no member could send on (one log entry travels in one frame) is refused
/// when the store opens, naming the field; the largest allowed one opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_limit_past_what_members_can_send_is_refused() {
    for bad in [0, datasync_raft::MAX_VALUE_SIZE + 1] {
        let dir = tempfile::tempdir().unwrap();
        let err = RaftStore::open(RaftConfig::new(dir.path()).max_value_size(bad))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("max_value_size"), "{bad}: {err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let s =
        RaftStore::open(RaftConfig::new(dir.path()).max_value_size(datasync_raft::MAX_VALUE_SIZE))
            .await
            .unwrap();
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_the_files_and_ends_watches_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    let mut w = s
        .watch("w", &[Prefix::all()], WatchOptions::default())
        .await
        .unwrap();
    next(&mut w).await.into_done().ok();
    let t = std::time::Instant::now();
    s.shutdown().await;
    drop(s);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        t.elapsed()
    );
    let end = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap();
    assert!(
        matches!(end, Some(Err(datasync::WatchError::Stopped(_)))),
        "a watch of a stopped store must say so, got {end:?}"
    );
    let again = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    again.shutdown().await;
}

#[tokio::test]
async fn a_watch_asked_for_a_prefix_or_a_resync_after_shutdown_ends_instead_of_spinning() {
    let dir = tempfile::tempdir().unwrap();
    let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    let a = Prefix::new("a/").unwrap();
    let mut one = s
        .watch("one", std::slice::from_ref(&a), WatchOptions::default())
        .await
        .unwrap();
    let mut two = s
        .watch("two", std::slice::from_ref(&a), WatchOptions::default())
        .await
        .unwrap();
    next(&mut one).await.into_done().ok();
    next(&mut two).await.into_done().ok();
    s.shutdown().await;
    drop(s);
    one.registration().add_prefix(Prefix::new("b/").unwrap());
    two.registration().request_resync();
    for w in [&mut one, &mut two] {
        let mut items = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(item) = w.next().await {
                items.push(format!("{item:?}"));
                assert!(items.len() < 10, "the stream spins: {items:?}");
            }
        })
        .await;
        assert!(ended.is_ok(), "the stream did not end: {items:?}");
        assert!(
            items.last().is_some_and(|l| l.starts_with("Err(Stopped")),
            "it must end saying the store stopped: {items:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_returns_once_the_snapshot_is_built() {
    let dir = tempfile::tempdir().unwrap();
    let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    for i in 0..50 {
        s.put(&key(&format!("k/{i}")), "v".into(), PutOptions::new())
            .await
            .unwrap();
    }
    assert_eq!(
        s.snapshot_index(),
        None,
        "the first comes after 20,000 entries"
    );
    s.snapshot().await.unwrap();
    let first = s.snapshot_index().expect("built when `snapshot` returns");
    s.put(&key("k/last"), "v".into(), PutOptions::new())
        .await
        .unwrap();
    s.snapshot().await.unwrap();
    assert!(
        s.snapshot_index().unwrap() > first,
        "a second snapshot covers the later write"
    );
    s.shutdown().await;
}

/// Bytes allocated to the file `path`, or to the files under it.
fn disk(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap();
    if !m.is_dir() {
        return m.blocks() * 512;
    }
    std::fs::read_dir(path)
        .unwrap()
        .map(|e| disk(&e.unwrap().path()))
        .sum()
}

/// Puts `n` keys of `size` bytes, 64 at a time.
async fn load(s: &RaftStore, n: usize, size: usize) {
    let value = Value::from(vec![7u8; size]);
    for chunk in (0..n).collect::<Vec<_>>().chunks(64) {
        let keys: Vec<Key> = chunk.iter().map(|i| key(&format!("k/{i:06}"))).collect();
        let puts = keys
            .iter()
            .map(|k| s.put(k, value.clone(), PutOptions::new()));
        for r in futures_util::future::join_all(puts).await {
            r.unwrap();
        }
    }
}

/// A snapshot is the state machine's tables, not a copy of them: building one does not
/// grow the data file by the state's size (a store that kept a copy in its database
/// grew by about one copy per snapshot: the new copy cannot reuse the old one's pages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_not_a_copy_of_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    let state = 4_000 * 4096;
    load(&s, 4_000, 4096).await;
    let db = dir.path().join("datasync.redb");
    // The first snapshot also waits for the state machine's writer to store the load.
    s.snapshot().await.unwrap();
    let first = disk(&db);
    for i in 0..3 {
        s.put(&key(&format!("k/last{i}")), "v".into(), PutOptions::new())
            .await
            .unwrap();
        s.snapshot().await.unwrap();
    }
    let after = disk(&db);
    assert!(
        after < first + state / 4,
        "three more snapshots grew the data file from {first} to {after} bytes (the state is {state})"
    );
    s.shutdown().await;
    drop(s);
    // The state is whole after a restart.
    let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    let all = s
        .list(&Prefix::new("k/").unwrap(), ReadOptions::new())
        .await
        .unwrap();
    assert_eq!(all.values.len(), 4_003);
    s.shutdown().await;
}

/// The log is compacted by its size as well as by its entry count: with a count no
/// load reaches, a snapshot comes once the log holds `snapshot_log_bytes`, and the log
/// before it is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_compacted_by_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let config = RaftConfig::new(dir.path())
        .snapshots(1 << 40, 10)
        .snapshot_log_bytes(1 << 20)
        .log_segment(256 << 10);
    let s = RaftStore::open(config).await.unwrap();
    for i in 0..1_000 {
        let value = Value::from(vec![7u8; 4096]);
        s.put(&key(&format!("k/{i}")), value, PutOptions::new())
            .await
            .unwrap();
    }
    let log = dir.path().join("log");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (index, bytes) = (s.snapshot_index(), disk(&log));
        if index.is_some() && bytes < 2 << 20 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after 4 MiB of puts: snapshot at {index:?}, log {bytes} bytes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.shutdown().await;
}

/// After a restart the log from before it is compacted too: at open, and by a
/// snapshot at the index the store restarted at (which openraft, starting from a
/// snapshot of the state as it is, would not purge behind by itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_from_before_a_restart_is_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let config = || {
        RaftConfig::new(dir.path())
            .snapshots(1 << 40, 10)
            .log_segment(64 << 10)
    };
    let s = RaftStore::open(config()).await.unwrap();
    s.put(&key("first"), "v".into(), PutOptions::new())
        .await
        .unwrap();
    s.snapshot().await.unwrap();
    for i in 0..500 {
        let value = Value::from(vec![7u8; 4096]);
        s.put(&key(&format!("k/{i}")), value, PutOptions::new())
            .await
            .unwrap();
    }
    s.shutdown().await;
    drop(s);
    let log = dir.path().join("log");
    assert!(disk(&log) > 2 << 20, "the puts are in the log");
    let s = RaftStore::open(config()).await.unwrap();
    s.snapshot().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while disk(&log) > 1 << 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the log still takes {} bytes after a restart and a snapshot",
            disk(&log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        s.list(&Prefix::new("k/").unwrap(), ReadOptions::new())
            .await
            .unwrap()
            .values
            .len(),
        500
    );
    s.shutdown().await;
}
