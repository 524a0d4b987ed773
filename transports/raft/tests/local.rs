//! The local endpoint: another process (here another client in this one) reaches the
//! store a process holds through the Unix socket in its data directory — writes,
//! reads, watches, membership — with no setup; the files are the owner's alone, a
//! crashed holder's socket does not stop the next open, and none is left behind.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use datasync::testing::mirror_until;
use datasync::{
    Key, Mirror, Prefix, PutOptions, ReadOptions, ResyncReason, Value, WatchOptions, Watcher,
    Writer,
};
use datasync_raft::testing::TestCluster;
use datasync_raft::{ClusterError, OpenError, RaftConfig, RaftStore, RemoteStore, Role};

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_store_is_reached_through_its_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let store = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    // The directory is held: a second open says so, with the directory.
    match RaftStore::open(RaftConfig::new(dir.path())).await {
        Err(OpenError::InUse { dir: d }) => assert_eq!(d, dir.path()),
        other => panic!("a held store opened again: {other:?}"),
    }
    // Only the owner may use the endpoint.
    assert_eq!(mode(&dir.path().join("datasync.sock")), 0o600);
    assert_eq!(mode(&dir.path().join("local.key")), 0o600);

    let local = RemoteStore::connect_local(dir.path()).await.unwrap();
    assert_eq!(local.limits(), store.limits());
    let mut w = local
        .watch(
            "w",
            &[Prefix::new("cfg/").unwrap()],
            WatchOptions::default(),
        )
        .await
        .unwrap();
    let mut mirror = Mirror::new();
    let a = local
        .put(&key("cfg/a"), Value::from("1"), PutOptions::new())
        .await
        .unwrap();
    let b = store
        .put(&key("cfg/b"), Value::from("2"), PutOptions::new())
        .await
        .unwrap();
    assert!(b > a);
    let reasons = mirror_until(&mut w, &mut mirror, b).await.unwrap();
    assert_eq!(reasons, [ResyncReason::Initial]);
    assert_eq!(mirror.len(""), 2, "both writers' changes reach the watch");
    let got = store.get(&key("cfg/a"), ReadOptions::new()).await.unwrap();
    assert_eq!(got.unwrap().value, Value::from("1"), "the holder reads it");
    assert_eq!(local.members().await.unwrap().voters.len(), 1);
    let refused = local.add_member(2, "127.0.0.1:1", Role::Learner).await;
    assert!(
        matches!(refused, Err(ClusterError::NotClustered)),
        "a single node has no members to add: {refused:?}"
    );

    // Closing the store closes the endpoint and removes its files.
    drop(w);
    store.shutdown().await;
    drop(store);
    assert!(!dir.path().join("datasync.sock").exists());
    assert!(!dir.path().join("local.key").exists());
    let gone = RemoteStore::connect_local(dir.path()).await.unwrap_err();
    assert!(
        matches!(gone, ClusterError::NoLocalEndpoint { .. }),
        "{gone:?}"
    );
    assert!(gone.to_string().contains("no process serves"), "{gone}");

    // Opened again in this process: a new endpoint, with a new key, that the old
    // handle's end does not remove.
    let again = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    let local = RemoteStore::connect_local(dir.path()).await.unwrap();
    let got = local.get(&key("cfg/b"), ReadOptions::new()).await.unwrap();
    assert_eq!(got.unwrap().value, Value::from("2"));
    drop(local);
    assert!(dir.path().join("datasync.sock").exists());
    again.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_an_endpoint_serves_no_one_else() {
    let dir = tempfile::tempdir().unwrap();
    let store = RaftStore::open(RaftConfig::new(dir.path()).local_endpoint(false))
        .await
        .unwrap();
    assert!(!dir.path().join("datasync.sock").exists());
    let none = RemoteStore::connect_local(dir.path()).await.unwrap_err();
    assert!(
        matches!(none, ClusterError::NoLocalEndpoint { .. }),
        "{none:?}"
    );
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_holders_endpoint_is_stale_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    // What a crash leaves: a socket no one listens on, and the old key.
    let stale = std::os::unix::net::UnixListener::bind(dir.path().join("datasync.sock")).unwrap();
    drop(stale);
    std::fs::write(dir.path().join("local.key"), "f".repeat(64)).unwrap();
    let gone = RemoteStore::connect_local(dir.path()).await.unwrap_err();
    assert!(
        matches!(gone, ClusterError::NoLocalEndpoint { .. }),
        "a dead socket is refused at once: {gone:?}"
    );

    let store = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    let key_now = std::fs::read_to_string(dir.path().join("local.key")).unwrap();
    assert_ne!(key_now, "f".repeat(64), "every open has a fresh key");
    assert_eq!(mode(&dir.path().join("local.key")), 0o600);
    assert_eq!(mode(&dir.path().join("datasync.sock")), 0o600);
    let local = RemoteStore::connect_local(dir.path()).await.unwrap();
    local
        .put(&key("k"), Value::from("v"), PutOptions::new())
        .await
        .unwrap();
    assert!(
        store
            .get(&key("k"), ReadOptions::new())
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_members_endpoint_serves_as_its_cluster_address_does() {
    let c = TestCluster::start(3).await;
    let f = c.follower().await.node_id();
    let fi = c.nodes.iter().position(|n| n.node_id() == f).unwrap();
    let local = RemoteStore::connect_local(c.dirs[fi].path()).await.unwrap();
    let rev = local
        .put(&key("k"), Value::from("v"), PutOptions::new())
        .await
        .unwrap();
    let got = c.nodes[(fi + 1) % 3]
        .get(&key("k"), ReadOptions::new())
        .await
        .unwrap();
    assert_eq!(
        got.unwrap().revision,
        rev,
        "the write went through the leader"
    );
    assert_eq!(local.members().await.unwrap().voters.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_too_deep_for_a_socket_opens_without_an_endpoint() {
    let base = tempfile::tempdir().unwrap();
    let deep = base.path().join("d".repeat(120));
    let store = RaftStore::open(RaftConfig::new(&deep)).await.unwrap();
    store
        .put(&key("k"), Value::from("v"), PutOptions::new())
        .await
        .unwrap();
    let none = RemoteStore::connect_local(&deep).await.unwrap_err();
    assert!(
        matches!(none, ClusterError::NoLocalEndpoint { .. }),
        "{none:?}"
    );
}
