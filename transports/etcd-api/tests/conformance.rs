//! The conformance suite, unchanged, through `datasync-etcd` (an etcd client of ours)
//! against the built-in store's etcd endpoint instead of a real etcd.

use std::sync::Mutex;

use datasync_etcd::{EtcdConfig, EtcdStore};
use datasync_etcd_api::{EtcdApi, Serving};
use datasync_raft::{RaftConfig, RaftStore};

/// A fresh single-node store and endpoint per test, kept until the harness drops.
#[derive(Debug, Default)]
struct OwnEndpoint {
    running: Mutex<Vec<(tempfile::TempDir, RaftStore, Serving)>>,
}

#[async_trait::async_trait]
impl datasync::testing::Harness for OwnEndpoint {
    type Store = EtcdStore;

    async fn store(&self) -> EtcdStore {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = RaftStore::open(RaftConfig::new(dir.path()))
            .await
            .expect("open the store");
        let api = EtcdApi::new(store.clone())
            .bind("127.0.0.1:0".parse().expect("an address"))
            .await
            .expect("bind the etcd endpoint");
        let client = EtcdStore::connect(EtcdConfig::new([format!("http://{}", api.addr())]))
            .await
            .unwrap_or_else(|e| panic!("connect to the endpoint: {e} ({e:?})"));
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((dir, store, api));
        client
    }

    async fn active_watches(&self, client: &EtcdStore) -> usize {
        let endpoint = client.config().endpoints[0].clone();
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let (_, store, _) = running
            .iter()
            .find(|(_, _, api)| endpoint.ends_with(&api.addr().to_string()))
            .expect("the client's endpoint");
        store.record_watches()
    }
}

datasync::conformance_tests!(OwnEndpoint::default());
