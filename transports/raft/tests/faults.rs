//! A three-node cluster under injected network faults (the members talk over real TCP;
//! [`Faults`](datasync_raft::testing::Faults) decides which messages arrive, and when): an
//! isolated leader, a minority follower, a one-way cut, and a linearizability check of
//! client histories under loss, delay and partitions.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use datasync::testing::linearizability::{self, Op, Recorder};
use datasync::{Consistency, Expect, Key, PutOptions, ReadOptions, StoreError, Value, Writer};
use datasync_raft::testing::{TestCluster, converged, test_secret, wait_until};
use datasync_raft::{RaftConfig, RaftStore, RemoteConfig, RemoteStore};

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

/// Calls that cannot complete give up after 2 s, so a cut-off member answers in time.
fn tuned(mut c: RaftConfig) -> RaftConfig {
    c.cluster = c.cluster.map(|c| c.forward_timeout(Duration::from_secs(2)));
    c
}

async fn local(s: &RaftStore, k: &str) -> Option<Value> {
    let opts = ReadOptions::new().consistency(Consistency::Local);
    s.get(&key(k), opts).await.unwrap().map(|kv| kv.value)
}

fn all(c: &TestCluster) -> Vec<&RaftStore> {
    c.nodes.iter().collect()
}

/// The members other than `id`, and their addresses.
fn others(c: &TestCluster, id: u64) -> (Vec<&RaftStore>, Vec<String>) {
    let nodes: Vec<_> = c.nodes.iter().filter(|n| n.node_id() != id).collect();
    let addrs = nodes
        .iter()
        .map(|n| n.cluster_addr().unwrap().to_owned())
        .collect();
    (nodes, addrs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_cannot_commit_and_the_majority_goes_on() {
    let c = TestCluster::start_with(3, tuned).await;
    let old = c.leader().await;
    old.put(&key("before"), "1".into(), PutOptions::new())
        .await
        .unwrap();
    let (rest, rest_addrs) = others(&c, old.node_id());
    c.faults
        .partition(&[old.cluster_addr().unwrap()], &rest_addrs);

    // Cut off from its quorum, the old leader can neither commit nor serve a
    // linearizable read; both fail in time instead of hanging.
    let lost = old.put(&key("lost"), "x".into(), PutOptions::new()).await;
    assert!(
        matches!(
            lost,
            Err(StoreError::Timeout(_) | StoreError::Unavailable(_))
        ),
        "{lost:?}"
    );
    let read = ReadOptions::new().consistency(Consistency::Linearizable);
    assert!(old.get(&key("before"), read).await.is_err());
    // It still names itself leader (openraft 0.9 does not step down), but its health
    // says it cannot serve: what /readyz and etcd_server_has_leader report.
    wait_until("the cut-off leader is not ready", || {
        let h = old.health();
        !h.ready() && !h.serving && h.stopped.is_none()
    })
    .await;

    // The majority elects a leader among themselves and commits through either member.
    wait_until("the majority elects a new leader", || {
        rest.iter()
            .all(|n| n.leader().is_some_and(|l| l != old.node_id()))
    })
    .await;
    for (i, n) in rest.iter().enumerate() {
        n.put(&key(&format!("during/{i}")), "2".into(), PutOptions::new())
            .await
            .unwrap();
    }
    assert_eq!(
        local(old, "during/0").await,
        None,
        "the minority saw nothing"
    );

    c.faults.heal();
    converged(&all(&c)).await;
    wait_until("every member is ready again", || {
        c.nodes.iter().all(|n| n.health().ready())
    })
    .await;
    for n in &c.nodes {
        assert_eq!(local(n, "during/0").await, Some("2".into()));
        assert_eq!(local(n, "during/1").await, Some("2".into()));
        assert_eq!(local(n, "lost").await, None, "an uncommitted write is gone");
    }
    let leader = c.leader().await;
    assert_ne!(
        leader.node_id(),
        old.node_id(),
        "the old leader rejoined as follower"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_follower_cannot_commit_and_catches_up_when_healed() {
    let c = TestCluster::start_with(3, tuned).await;
    let f = c.follower().await;
    let (_, rest_addrs) = others(&c, f.node_id());
    c.faults
        .partition(&[f.cluster_addr().unwrap()], &rest_addrs);

    let write = f
        .put(&key("from/minority"), "x".into(), PutOptions::new())
        .await;
    assert!(
        write.is_err(),
        "a write through a cut-off follower: {write:?}"
    );
    let read = ReadOptions::new().consistency(Consistency::Linearizable);
    assert!(f.get(&key("a"), read).await.is_err());

    let leader = c.leader_among(&rest_addrs).await;
    for i in 0..100 {
        leader
            .put(&key(&format!("k/{i}")), "v".into(), PutOptions::new())
            .await
            .unwrap();
    }
    assert_eq!(local(f, "k/0").await, None);

    c.faults.heal();
    converged(&all(&c)).await;
    for i in 0..100 {
        assert_eq!(local(f, &format!("k/{i}")).await, Some("v".into()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_way_cut_from_the_leader_does_not_stop_the_cluster() {
    let c = TestCluster::start_with(3, tuned).await;
    let leader = c.leader().await;
    let f = c.follower().await;
    // The follower hears nothing from the leader (it campaigns in vain: the others
    // still hear their leader), while the leader hears it.
    c.faults
        .cut(leader.cluster_addr().unwrap(), f.cluster_addr().unwrap());
    for i in 0..50 {
        leader
            .put(&key(&format!("k/{i}")), "v".into(), PutOptions::new())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        local(f, "k/49").await,
        None,
        "nothing reached the cut-off follower"
    );
    c.faults.heal();
    converged(&all(&c)).await;
    assert_eq!(local(f, "k/49").await, Some("v".into()));
}

/// Clients on every member, and remote clients, run random puts, reads, compare-and-swaps and deletes on a
/// few keys while messages are lost and delayed and the leader is cut off for a while;
/// the recorded history must be linearizable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histories_under_loss_delay_and_partitions_are_linearizable() {
    let c = TestCluster::start_with(3, tuned).await;
    let recorder = Recorder::new();
    c.faults.drop_rate(0.03);
    c.faults
        .delay(Duration::from_micros(0), Duration::from_millis(3));
    let keys: Vec<Key> = (0..3).map(|i| key(&format!("reg/{i}"))).collect();
    let stop = tokio::time::Instant::now() + Duration::from_secs(6);
    // Six clients on the members, two remote clients (no replica) on all of them.
    let mut stores: Vec<Arc<dyn Writer>> = Vec::new();
    for i in 0..6 {
        stores.push(Arc::new(c.nodes[i % 3].clone()));
    }
    for i in 0..2 {
        let mut endpoints = c.addrs();
        endpoints.rotate_left(i);
        let remote = RemoteStore::connect(RemoteConfig::new(endpoints, test_secret()));
        stores.push(Arc::new(remote.await.unwrap()));
    }
    let mut clients = Vec::new();
    for (client, store) in stores.into_iter().enumerate() {
        let (recorder, keys) = (recorder.clone(), keys.clone());
        clients.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(client as u64);
            let mut seen: Vec<Option<datasync::Revision>> = vec![None; keys.len()];
            let mut n = 0;
            while tokio::time::Instant::now() < stop {
                let k = rng.usize(..keys.len());
                let value = Value::from(format!("c{client}-{n}"));
                n += 1;
                let op = match rng.u32(..100) {
                    0..40 => Op::Put(value),
                    40..75 => Op::Get,
                    75..90 => Op::Cas(seen[k].map_or(Expect::Absent, Expect::Revision), value),
                    _ => Op::Delete,
                };
                if let linearizability::Outcome::Get(kv) =
                    recorder.run(&*store, client, &keys[k], op).await
                {
                    seen[k] = kv.map(|(_, r)| r);
                }
            }
        }));
    }
    // Midway, the leader is cut off for 1.5 s.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let leader = c.leader().await;
    let (_, rest) = others(&c, leader.node_id());
    c.faults.partition(&[leader.cluster_addr().unwrap()], &rest);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.faults.heal();
    for client in clients {
        client.await.unwrap();
    }
    c.faults.reset();
    converged(&all(&c)).await;

    let history = recorder.history();
    let done = history.iter().filter(|h| h.end.is_some()).count();
    let unknown = history.len() - done;
    assert!(done >= 100, "too few completed calls to judge: {done}");
    if let Err(v) = linearizability::check(&history) {
        panic!("{v}");
    }
    eprintln!("linearizable: {done} completed calls, {unknown} with unknown outcome");
}
