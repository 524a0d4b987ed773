//! The endpoint through `etcd-client` (an etcd client in Rust no one here wrote), for
//! what etcdctl does not show exactly: ranges inside transactions, compacted watches,
//! progress requests, counts.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use datasync_etcd_api::{EtcdApi, Serving};
use datasync_raft::{RaftConfig, RaftStore};
use etcd_client::{Client, Compare, CompareOp, GetOptions, TxnOp, TxnOpResponse, WatchOptions};

async fn start(history: usize) -> (tempfile::TempDir, RaftStore, Serving, Client) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = RaftConfig::new(dir.path());
    config.history = history;
    let store = RaftStore::open(config).await.unwrap();
    let api = EtcdApi::new(store.clone())
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let client = Client::connect([api.addr().to_string()], None)
        .await
        .unwrap();
    (dir, store, api, client)
}

fn values(r: &TxnOpResponse) -> Vec<String> {
    let TxnOpResponse::Get(g) = r else {
        panic!("not a range: {r:?}")
    };
    g.kvs()
        .iter()
        .map(|kv| kv.value_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_in_a_txn_read_before_or_after_its_writes() {
    let (_dir, store, api, mut c) = start(100).await;
    c.put("a", "1", None).await.unwrap();
    let txn = etcd_client::Txn::new()
        .when([Compare::value("a", CompareOp::Equal, "1")])
        .and_then([
            TxnOp::get("a", None),
            TxnOp::put("a", "2", None),
            TxnOp::put("b", "x", None),
            TxnOp::get("", Some(GetOptions::new().with_from_key())),
        ]);
    let resp = c.txn(txn).await.unwrap();
    assert!(resp.succeeded());
    let ops = resp.op_responses();
    assert_eq!(values(&ops[0]), ["1"], "before the writes");
    assert_eq!(values(&ops[3]), ["2", "x"], "after them");
    // A read-only txn reads the state it was applied to.
    let ro = etcd_client::Txn::new().and_then([TxnOp::get("a", None)]);
    assert_eq!(values(&c.txn(ro).await.unwrap().op_responses()[0]), ["2"]);
    // A range between two writes would need a state no revision has: refused.
    let between = etcd_client::Txn::new().and_then([
        TxnOp::put("a", "3", None),
        TxnOp::get("a", None),
        TxnOp::put("b", "y", None),
    ]);
    let e = c.txn(between).await.unwrap_err().to_string();
    assert!(e.contains("between two writes"), "{e}");
    assert_eq!(c.get("a", None).await.unwrap().kvs()[0].value(), b"2");
    // The count is the whole range's, before the revision filters (as etcd counts).
    let newer = c
        .put("c", "z", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let got = c
        .get(
            "",
            Some(
                GetOptions::new()
                    .with_from_key()
                    .with_min_mod_revision(newer),
            ),
        )
        .await
        .unwrap();
    assert_eq!(got.count(), 3);
    assert_eq!(got.kvs().len(), 1);
    api.stop().await;
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_watch_names_where_a_watch_may_start_and_progress_is_answered() {
    let (_dir, store, api, mut c) = start(5).await;
    for i in 0..20 {
        c.put("k", format!("{i}"), None).await.unwrap();
    }
    let mut stream = c
        .watch("k", Some(WatchOptions::new().with_start_revision(2)))
        .await
        .unwrap();
    let created = stream.message().await.unwrap().unwrap();
    assert!(created.created());
    let cancelled = stream.message().await.unwrap().unwrap();
    assert!(cancelled.canceled(), "{cancelled:?}");
    // History keeps 5 revisions: 16..=20; the first a watch may start from is 16.
    let from = cancelled.compact_revision();
    assert_eq!(from, 16);
    let mut stream = c
        .watch("k", Some(WatchOptions::new().with_start_revision(from)))
        .await
        .unwrap();
    assert!(stream.message().await.unwrap().unwrap().created());
    let replayed = stream.message().await.unwrap().unwrap();
    assert_eq!(replayed.events()[0].kv().unwrap().mod_revision(), from);
    // Nothing owed: a progress request is answered with the store's revision.
    let mut seen = replayed.events().len();
    while seen < 5 {
        seen += stream.message().await.unwrap().unwrap().events().len();
    }
    stream.request_progress().await.unwrap();
    let progress = stream.message().await.unwrap().unwrap();
    assert!(progress.events().is_empty() && !progress.canceled());
    assert_eq!(progress.header().unwrap().revision(), 20);
    // Revisions outside the watched keys leave nothing to deliver: still answered.
    for i in 0..50 {
        c.put(format!("other{i}"), "x", None).await.unwrap();
    }
    stream.request_progress().await.unwrap();
    let progress = stream.message().await.unwrap().unwrap();
    assert!(progress.events().is_empty(), "{progress:?}");
    assert_eq!(progress.header().unwrap().revision(), 70);
    api.stop().await;
    store.shutdown().await;
}

/// Compares on a key's lease (etcd's `Compare_LEASE`; etcdctl 3.4 cannot send one):
/// the lease the key is on, 0 for a key on none and for an absent key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_txn_compares_the_lease_a_key_is_on() {
    let (_dir, store, api, mut c) = start(100).await;
    let lease = c.lease_grant(60, None).await.unwrap().id();
    c.put(
        "leased",
        "v",
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    c.put("plain", "v", None).await.unwrap();
    let holds = |key: &str, op: CompareOp, id: i64| {
        etcd_client::Txn::new().when([Compare::lease(key, op, id)])
    };
    for (key, op, id, want) in [
        ("leased", CompareOp::Equal, lease, true),
        ("leased", CompareOp::Equal, 0, false),
        ("leased", CompareOp::Greater, 0, true),
        ("leased", CompareOp::NotEqual, lease + 1, true),
        ("plain", CompareOp::Equal, 0, true),
        ("plain", CompareOp::Equal, lease, false),
        ("absent", CompareOp::Equal, 0, true),
        ("absent", CompareOp::Less, lease, true),
    ] {
        let got = c.txn(holds(key, op, id)).await.unwrap().succeeded();
        assert_eq!(got, want, "lease({key}) {op:?} {id}");
    }
    // Revoked, the key is gone and compares as on no lease.
    c.lease_revoke(lease).await.unwrap();
    let got = c
        .txn(holds("leased", CompareOp::Equal, 0))
        .await
        .unwrap()
        .succeeded();
    assert!(got);
    api.stop().await;
    store.shutdown().await;
}
