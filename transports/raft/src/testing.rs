//! A conformance-suite harness for the embedded store (tests only).

use std::sync::Mutex;

use datasync::testing::Harness;
use tempfile::TempDir;

use crate::{RaftConfig, RaftStore};

/// Opens a fresh single-node store in a temp dir per suite test; the dirs are removed
/// when the harness drops.
#[derive(Debug, Default)]
pub struct RaftHarness {
    dirs: Mutex<Vec<TempDir>>,
}

#[async_trait::async_trait]
impl Harness for RaftHarness {
    type Store = RaftStore;

    async fn store(&self) -> RaftStore {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = RaftStore::open(RaftConfig::new(dir.path()))
            .await
            .expect("open a fresh store");
        self.dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(dir);
        store
    }

    async fn active_watches(&self, store: &RaftStore) -> usize {
        store.active_watches()
    }
}
