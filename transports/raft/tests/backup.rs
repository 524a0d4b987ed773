//! Backup and restore: a backup taken from a running store (embedded, or through a
//! member as a remote client) restores into a new store with the same state hash and
//! revision, whose watchers start with a resync; a member joining a restored node gets
//! the restored state; a damaged file or a used directory is refused.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use datasync::{
    DeleteOptions, Event, Expect, Key, Prefix, PutOptions, ResyncReason, Revision, Value,
    WatchOptions, Watcher, Writer,
};
use datasync_raft::backup::{BackupError, verify};
use datasync_raft::testing::{converged, test_secret, wait_until};
use datasync_raft::{ClusterConfig, RaftConfig, RaftStore, RemoteConfig, RemoteStore};
use futures_util::StreamExt;

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

/// Writes of every kind: puts, overwrites, TTLs (one of `short`), a compare-and-swap,
/// deletes.
async fn fill(w: &impl Writer, short: Duration) -> Revision {
    for i in 0..200 {
        let k = key(&format!("cfg/{i:03}"));
        w.put(&k, Value::from(format!("v{i}")), PutOptions::new())
            .await
            .unwrap();
    }
    w.put(&key("cfg/000"), Value::from("again"), PutOptions::new())
        .await
        .unwrap();
    w.put(
        &key("lease/a"),
        Value::from(vec![0u8, 255, 7]),
        PutOptions::new().ttl(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    w.put(
        &key("lease/short"),
        Value::from("soon gone"),
        PutOptions::new().ttl(short),
    )
    .await
    .unwrap();
    let swapped = w
        .compare_and_swap(
            &key("cas/x"),
            Expect::Absent,
            Value::from("1"),
            PutOptions::new(),
        )
        .await
        .unwrap();
    assert!(matches!(swapped, datasync::CasOutcome::Swapped(_)));
    w.delete(&key("cfg/1"), DeleteOptions::new().prefix())
        .await
        .unwrap();
    w.delete(&key("cfg/050"), DeleteOptions::new())
        .await
        .unwrap()
        .revision
}

fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_store_has_the_state_revision_and_resyncs_its_watchers() {
    let a = tempfile::tempdir().unwrap();
    let store = RaftStore::open(RaftConfig::new(a.path())).await.unwrap();
    let last = fill(&store, Duration::from_secs(10)).await;
    let file = store.backup().await.unwrap();
    let info = verify(&file).unwrap();
    assert_eq!(Revision(info.revision), last);
    assert_eq!(info.revision, store.revision().0);
    let hash = store.data_hash().unwrap();
    // Writes after the backup are not in it.
    store
        .put(&key("cfg/late"), Value::from("x"), PutOptions::new())
        .await
        .unwrap();
    store.shutdown().await;

    let b = tempfile::tempdir().unwrap();
    let restored = RaftStore::restore(&file, RaftConfig::new(b.path()))
        .await
        .unwrap();
    assert_eq!(restored, info);
    let again = RaftStore::open(RaftConfig::new(b.path())).await.unwrap();
    assert_eq!(again.revision(), last);
    assert_eq!(again.data_hash().unwrap(), hash);
    let mut w = again
        .watch("w", &[Prefix::new("").unwrap()], WatchOptions::default())
        .await
        .unwrap();
    match w.next().await.unwrap().unwrap() {
        Event::Resync(r) => {
            assert_eq!((r.reason, r.revision), (ResyncReason::Initial, last));
            let values = &r.prefixes[0].values;
            assert!(values.iter().all(|kv| kv.key.as_str() != "cfg/late"));
            let lease = values
                .iter()
                .find(|kv| kv.key.as_str() == "lease/a")
                .unwrap();
            assert_eq!(lease.value, Value::from(vec![0u8, 255, 7]));
            assert_eq!(values.len(), 200 - 100 - 1 + 3, "{}", values.len());
            r.done.complete(Ok(()));
        }
        other => panic!("{other:?}"),
    }
    // Leases came along: the short one expires in the restored store.
    match tokio::time::timeout(Duration::from_secs(40), w.next()).await {
        Ok(Some(Ok(Event::Change(c)))) => {
            assert_eq!(c.changes[0].key.as_str(), "lease/short");
            assert_eq!(c.changes[0].op, datasync::Op::Delete);
            c.done.complete(Ok(()));
        }
        other => panic!("the short lease did not expire: {other:?}"),
    }
    let last = Revision(last.0 + 1);
    let next = again
        .put(&key("cfg/new"), Value::from("n"), PutOptions::new())
        .await
        .unwrap();
    assert_eq!(
        next,
        Revision(last.0 + 1),
        "revisions go on from the backup's"
    );
    again.shutdown().await;
    drop(again);

    // A used directory is refused, and left as it was.
    let entries = |d: &std::path::Path| {
        let mut e: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        e.sort();
        e
    };
    let was = entries(b.path());
    let used = RaftStore::restore(&file, RaftConfig::new(b.path())).await;
    assert!(matches!(used, Err(BackupError::NotEmpty(_))), "{used:?}");
    assert_eq!(entries(b.path()), was);
    let reopened = RaftStore::open(RaftConfig::new(b.path())).await.unwrap();
    assert_eq!(reopened.revision(), Revision(last.0 + 1));
    reopened.shutdown().await;
    drop(reopened);
    // A damaged or truncated file is refused before anything is made.
    let c = tempfile::tempdir().unwrap();
    let mut bad = file.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    let damaged = RaftStore::restore(&bad, RaftConfig::new(c.path())).await;
    assert!(matches!(damaged, Err(BackupError::Checksum)), "{damaged:?}");
    let cut = RaftStore::restore(&file[..mid], RaftConfig::new(c.path())).await;
    assert!(matches!(cut, Err(BackupError::Length { .. })), "{cut:?}");
    assert_eq!(std::fs::read_dir(c.path()).unwrap().count(), 0);
}

/// Restored as a cluster's first member: a node joining it gets the restored state
/// (from the snapshot the restore built, since the log never held it); a backup taken
/// through a member as a remote client holds the same state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joining_a_restored_node_gets_its_state() {
    let a = tempfile::tempdir().unwrap();
    let source = RaftStore::open(RaftConfig::new(a.path())).await.unwrap();
    let last = fill(&source, Duration::from_secs(3600)).await;
    let file = source.backup().await.unwrap();
    let hash = source.data_hash().unwrap();
    source.shutdown().await;

    let listen = free_addr();
    let member = |id: u64, dir: &std::path::Path, listen, join: Option<String>| {
        let mut c = ClusterConfig::new(listen, test_secret());
        if let Some(j) = join {
            c = c.join([j]);
        }
        RaftConfig::new(dir).cluster(id, c)
    };
    let d1 = tempfile::tempdir().unwrap();
    let joining = RaftStore::restore(&file, member(1, d1.path(), listen, Some("x:1".into()))).await;
    assert!(matches!(joining, Err(BackupError::Join)), "{joining:?}");
    RaftStore::restore(&file, member(1, d1.path(), listen, None))
        .await
        .unwrap();
    let n1 = RaftStore::open(member(1, d1.path(), listen, None))
        .await
        .unwrap();
    wait_until("the restored member leads", || n1.leader() == Some(1)).await;
    assert_eq!((n1.revision(), n1.data_hash().unwrap()), (last, hash));
    let d2 = tempfile::tempdir().unwrap();
    let n2 = RaftStore::open(member(2, d2.path(), free_addr(), Some(listen.to_string())))
        .await
        .unwrap();
    converged(&[&n1, &n2]).await;
    assert_eq!(n2.data_hash().unwrap(), hash);
    assert!(
        n2.snapshots_installed() >= 1,
        "the state came in a snapshot"
    );

    let remote = RemoteStore::connect(RemoteConfig::new([listen.to_string()], test_secret()))
        .await
        .unwrap();
    let through = remote.backup().await.unwrap();
    let info = verify(&through).unwrap();
    assert_eq!(Revision(info.revision), n1.revision());
    let d3 = tempfile::tempdir().unwrap();
    RaftStore::restore(&through, RaftConfig::new(d3.path()))
        .await
        .unwrap();
    let n3 = RaftStore::open(RaftConfig::new(d3.path())).await.unwrap();
    assert_eq!(n3.data_hash().unwrap(), n1.data_hash().unwrap());
    n3.shutdown().await;
    n2.shutdown().await;
    n1.shutdown().await;
}
