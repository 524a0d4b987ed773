//! The store's own timings count every proposal: one whose caller gave up on it too.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use datasync::{Key, PutOptions, Writer};
use datasync_raft::{RaftConfig, RaftStore};
use futures_util::FutureExt;
use prometheus_client::registry::Registry;

/// The `_count` of histogram `name`, read as a scrape would.
fn count(registry: &Registry, name: &str) -> f64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    let head = format!("{name}_count ");
    text.lines()
        .find_map(|l| l.strip_prefix(&head))
        .unwrap_or_else(|| panic!("no {name}_count in:\n{text}"))
        .parse()
        .unwrap()
}

const PROPOSAL: &str = "datasync_raft_proposal_duration_seconds";
const BATCH: &str = "datasync_raft_proposal_batch_size";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_its_caller_drops_is_timed_too() {
    let dir = tempfile::tempdir().unwrap();
    let store = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    let mut registry = Registry::default();
    store.register_metrics(&mut registry);
    let key = Key::new("k").unwrap();

    store
        .put(&key, "1".into(), PutOptions::new())
        .await
        .unwrap();
    let (proposals, batches) = (count(&registry, PROPOSAL), count(&registry, BATCH));
    assert_eq!(proposals, batches, "a lone write is one proposal, timed");
    assert!(batches >= 1.0);

    // Polled once, then dropped while raft has it: it reached the proposer (a batch of
    // one), and its time is recorded at the drop.
    let dropped = store
        .put(&key, "2".into(), PutOptions::new())
        .now_or_never();
    assert!(
        dropped.is_none(),
        "the write was still in raft when dropped"
    );
    assert_eq!(
        count(&registry, BATCH),
        batches + 1.0,
        "the dropped write was proposed"
    );
    assert_eq!(
        count(&registry, PROPOSAL),
        proposals + 1.0,
        "the dropped write's proposal was timed"
    );
    store.shutdown().await;
}
