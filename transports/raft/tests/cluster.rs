//! Raft clusters in one process, each member on its own loopback port and temp dir,
//! talking over real TCP: forwarding, leader loss, learners, leaving, catching up by
//! snapshot, finishing an interrupted join, and refusing a node without the secret.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use datasync::{
    Consistency, Key, Mirror, Prefix, PutOptions, ReadOptions, StoreError, Value, WatchOptions,
    Watcher, Writer,
};
use datasync_raft::testing::{TestCluster, converged, test_secret, wait_until};
use datasync_raft::{
    ClusterConfig, OpenError, RaftConfig, RaftStore, RemoteConfig, RemoteStore, Role, Secret,
};

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

async fn get(s: &RaftStore, k: &str, consistency: Consistency) -> Option<Value> {
    let opts = ReadOptions::new().consistency(consistency);
    s.get(&key(k), opts).await.unwrap().map(|kv| kv.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_writes_are_forwarded_and_reads_are_linearizable() {
    let c = TestCluster::start(3).await;
    let f = c.follower().await;
    assert_ne!(
        f.leader(),
        Some(f.node_id()),
        "the store under test follows"
    );
    let rev = f
        .put(&key("a/1"), "one".into(), PutOptions::new())
        .await
        .unwrap();
    // A forwarded write returns once applied here: a local read sees it at once.
    assert!(f.revision() >= rev);
    assert_eq!(get(f, "a/1", Consistency::Local).await, Some("one".into()));
    // A write through the leader is seen by a linearizable read on a follower.
    let leader = c.leader().await;
    leader
        .put(&key("a/2"), "two".into(), PutOptions::new())
        .await
        .unwrap();
    for n in &c.nodes {
        assert_eq!(
            get(n, "a/2", Consistency::Linearizable).await,
            Some("two".into()),
            "node {} reads the leader's write",
            n.node_id()
        );
    }
    converged(&c.nodes.iter().collect::<Vec<_>>()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_on_after_the_leader_stops() {
    let mut c = TestCluster::start(3).await;
    let old = c.leader().await.node_id();
    let mut acked = Vec::new();
    for i in 0..20 {
        let f = c.follower().await;
        let k = format!("k/{i:02}");
        f.put(&key(&k), Value::from(k.clone()), PutOptions::new())
            .await
            .unwrap();
        acked.push(k);
    }
    let i = c.nodes.iter().position(|n| n.node_id() == old).unwrap();
    let stopped = c.nodes.remove(i);
    stopped.shutdown().await;
    drop(stopped);
    // The survivors elect a new leader; writes through either wait for it.
    for i in 20..40 {
        let n = &c.nodes[i % 2];
        let k = format!("k/{i:02}");
        n.put(&key(&k), Value::from(k.clone()), PutOptions::new())
            .await
            .unwrap();
        acked.push(k);
    }
    let new = c.nodes[0].leader().unwrap();
    assert_ne!(new, old, "a new leader was elected");
    converged(&[&c.nodes[0], &c.nodes[1]]).await;
    for n in &c.nodes {
        for k in &acked {
            assert_eq!(
                get(n, k, Consistency::Local).await,
                Some(Value::from(k.clone())),
                "acknowledged write {k} on node {}",
                n.node_id()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_replicates_and_is_promoted() {
    let mut c = TestCluster::start(3).await;
    let mut changes = c.nodes[0].observe_membership();
    let first = changes.next().await.unwrap();
    assert_eq!(
        first.voters.len(),
        3,
        "starts with the current configuration"
    );
    c.nodes[0]
        .put(&key("x"), "before".into(), PutOptions::new())
        .await
        .unwrap();
    // Join as a learner through a follower: the request is routed to the leader.
    let dir = tempfile::tempdir().unwrap();
    let seed = c.follower().await.cluster_addr().unwrap().to_owned();
    let listen = "127.0.0.1:0".parse().unwrap();
    let config = ClusterConfig::new(listen, test_secret())
        .join([seed])
        .learner();
    let learner = RaftStore::open(RaftConfig::new(dir.path()).cluster(4, config))
        .await
        .unwrap();
    // `open` returned once the learner applied its own join; the others apply it soon.
    let m = learner.members();
    assert_eq!(m.role(4), Some(Role::Learner));
    assert_eq!(m.voters.len(), 3, "a learner does not vote");
    // It caught up before open returned, and receives later writes.
    assert_eq!(
        get(&learner, "x", Consistency::Local).await,
        Some("before".into())
    );
    c.nodes[1]
        .put(&key("y"), "after".into(), PutOptions::new())
        .await
        .unwrap();
    assert_eq!(
        get(&learner, "y", Consistency::Linearizable).await,
        Some("after".into())
    );
    // Observed from committed configuration: the learner's arrival.
    loop {
        let m = changes.next().await.unwrap();
        if m.role(4) == Some(Role::Learner) {
            break;
        }
    }
    let addr = learner.cluster_addr().unwrap().to_owned();
    learner.add_member(4, &addr, Role::Voter).await.unwrap();
    // Applied here before `add_member` returned; on the other members, soon after.
    assert_eq!(learner.members().role(4), Some(Role::Voter));
    wait_until("node 2 applies the promotion", || {
        c.nodes[2].members().role(4) == Some(Role::Voter)
    })
    .await;
    loop {
        let m = changes.next().await.unwrap();
        if m.role(4) == Some(Role::Voter) && !m.joint {
            break;
        }
    }
    c.nodes.push(learner);
    c.dirs.push(dir);
    converged(&c.nodes.iter().collect::<Vec<_>>()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_leaves_and_keeps_its_data() {
    let c = TestCluster::start(3).await;
    c.nodes[0]
        .put(&key("kept"), "v".into(), PutOptions::new())
        .await
        .unwrap();
    converged(&c.nodes.iter().collect::<Vec<_>>()).await;
    let leaving = &c.nodes[2];
    leaving.remove_member(leaving.node_id()).await.unwrap();
    wait_until("the others commit the removal", || {
        c.nodes[..2]
            .iter()
            .all(|n| n.members().role(3).is_none() && n.members().voters.len() == 2)
    })
    .await;
    // The group goes on with two voters; the node that left keeps what it had.
    c.nodes[1]
        .put(&key("later"), "w".into(), PutOptions::new())
        .await
        .unwrap();
    assert_eq!(
        get(leaving, "kept", Consistency::Local).await,
        Some("v".into())
    );
    // It says so instead of serving a replica that no longer follows the group.
    assert!(leaving.has_left());
    let write = leaving.put(&key("x"), "y".into(), PutOptions::new()).await;
    match write {
        Err(StoreError::Backend(e)) => assert!(e.to_string().contains("left the cluster"), "{e}"),
        other => panic!("a write on a node that left: {other:?}"),
    }
    let read = ReadOptions::new().consistency(Consistency::Linearizable);
    assert!(leaving.get(&key("kept"), read).await.is_err());
    let all = [Prefix::new("").unwrap()];
    let watch = leaving.watch("w", &all, WatchOptions::default()).await;
    assert!(watch.is_err(), "no new watch on a node that left");
    // A remote client that tries it first goes on to a member.
    let mut endpoints = vec![leaving.cluster_addr().unwrap().to_owned()];
    endpoints.push(c.nodes[0].cluster_addr().unwrap().to_owned());
    let remote = RemoteStore::connect(RemoteConfig::new(endpoints, test_secret()))
        .await
        .unwrap();
    remote
        .put(&key("via-remote"), "z".into(), PutOptions::new())
        .await
        .unwrap();
    converged(&[&c.nodes[0], &c.nodes[1]]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_member_catches_up_by_snapshot_and_its_watcher_is_consistent() {
    // Snapshots every 50 entries, 5 kept behind: a member down for 300 writes is behind
    // the retained log and must be sent a snapshot.
    let mut nodes = Vec::new();
    let mut dirs = Vec::new();
    for id in 1..=3u64 {
        let dir = tempfile::tempdir().unwrap();
        let seed = nodes.first().map(|n: &RaftStore| n.cluster_addr().unwrap());
        let config = TestCluster::config(id, dir.path(), seed).snapshots(50, 5);
        nodes.push(RaftStore::open(config).await.unwrap());
        dirs.push(dir);
    }
    wait_until("three voters", || nodes[2].members().voters.len() == 3).await;
    let lagging = nodes.pop().unwrap();
    let addr: std::net::SocketAddr = lagging.cluster_addr().unwrap().parse().unwrap();
    lagging.shutdown().await;
    drop(lagging);
    for i in 0..300 {
        nodes[i % 2]
            .put(
                &key(&format!("s/{i:03}")),
                Value::from(i.to_string()),
                PutOptions::new(),
            )
            .await
            .unwrap();
    }
    // Back on the same address, with its old identity.
    let cc = ClusterConfig::new(addr, test_secret());
    let config = RaftConfig::new(dirs[2].path())
        .snapshots(50, 5)
        .cluster(3, cc);
    let back = RaftStore::open(config).await.unwrap();
    let mut w = back
        .watch("w", &[Prefix::new("s/").unwrap()], WatchOptions::default())
        .await
        .unwrap();
    let mut mirror = Mirror::new();
    let target = nodes[0].revision();
    tokio::time::timeout(
        Duration::from_secs(30),
        datasync::testing::mirror_until(&mut w, &mut mirror, target),
    )
    .await
    .expect("the watcher catches up (deadlock?)")
    .unwrap();
    assert_eq!(mirror.len(""), 300, "the watcher holds every key");
    assert!(
        back.snapshots_installed() > 0,
        "the member caught up from a snapshot"
    );

    // A remote watch resuming after revision 1, asked of this member first: its history
    // starts after the snapshot it installed, so it passes the watch on, and a member
    // that holds the changes replays them (no resync).
    let mut endpoints = vec![back.cluster_addr().unwrap().to_owned()];
    endpoints.extend(nodes.iter().map(|n| n.cluster_addr().unwrap().to_owned()));
    let remote = datasync_raft::RemoteStore::connect(datasync_raft::RemoteConfig::new(
        endpoints,
        test_secret(),
    ))
    .await
    .unwrap();
    let opts = WatchOptions::default().resume(datasync::Revision(1));
    let mut w = remote
        .watch("r", &[Prefix::new("s/").unwrap()], opts)
        .await
        .unwrap();
    let ev = datasync::testing::next_event(&mut w).await.unwrap();
    match &ev {
        datasync::Event::Change(c) => assert_eq!(c.revision, datasync::Revision(2)),
        datasync::Event::Resync(r) => {
            panic!("replayed by another member, not a {:?} resync", r.reason)
        }
        other => panic!("{other:?}"),
    }
    ev.into_done().ok();
    drop(w);
    nodes.push(back);
    converged(&nodes.iter().collect::<Vec<_>>()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_secret_cannot_join() {
    let c = TestCluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let stranger = Secret::new("not the cluster secret").unwrap();
    let listen = "127.0.0.1:0".parse().unwrap();
    let seed = c.nodes[0].cluster_addr().unwrap().to_owned();
    let config =
        RaftConfig::new(dir.path()).cluster(9, ClusterConfig::new(listen, stranger).join([seed]));
    let refused = tokio::time::timeout(Duration::from_secs(20), RaftStore::open(config))
        .await
        .expect("refused at once, not retried");
    assert!(
        matches!(refused, Err(OpenError::Join(_))),
        "joining without the secret fails: {refused:?}"
    );
    for n in &c.nodes {
        assert_eq!(n.members().role(9), None, "the stranger is not a member");
        assert_eq!(n.members().voters.len(), 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_restarted_as_a_voter_is_promoted() {
    // The state a crash between the two steps of a voter's join leaves behind: added
    // as a learner, not yet promoted.
    let c = TestCluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let listen = "127.0.0.1:0".parse().unwrap();
    let learner = ClusterConfig::new(listen, test_secret())
        .join(c.addrs())
        .learner();
    let node = RaftStore::open(RaftConfig::new(dir.path()).cluster(4, learner))
        .await
        .unwrap();
    let addr: std::net::SocketAddr = node.cluster_addr().unwrap().parse().unwrap();
    node.shutdown().await;
    drop(node);
    wait_until("node 4 is a learner everywhere", || {
        c.nodes
            .iter()
            .all(|n| n.members().role(4) == Some(Role::Learner))
    })
    .await;
    // Restarted with the same identity, configured as a voter: it asks to be promoted.
    let voter = ClusterConfig::new(addr, test_secret());
    let node = RaftStore::open(RaftConfig::new(dir.path()).cluster(4, voter))
        .await
        .unwrap();
    for n in c.nodes.iter().chain([&node]) {
        wait_until("node 4 votes", || n.members().role(4) == Some(Role::Voter)).await;
    }
}

/// A cluster member's value limit past what one heartbeat carries (openraft 0.9 gives
/// an append one heartbeat interval) is refused at open. (Measured while writing this:
/// with the default 100 ms, a 4 MiB value never replicated; a 1 MiB one did when run
/// alone and, once, not within 10 s under the whole suite's load: see the note in
/// `MAX_VALUE_SIZE`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_limit_past_what_a_heartbeat_carries_is_refused() {
    let per_heartbeat = datasync_raft::CLUSTER_VALUE_PER_100MS;
    let dir = tempfile::tempdir().unwrap();
    let config = TestCluster::config(1, dir.path(), None).max_value_size(per_heartbeat + 1);
    let refused = RaftStore::open(config).await;
    assert!(
        matches!(&refused, Err(OpenError::Config(m)) if m.contains("max_value_size")),
        "{refused:?}"
    );
    let config = TestCluster::config(1, dir.path(), None).max_value_size(per_heartbeat);
    RaftStore::open(config).await.unwrap().shutdown().await;
}

/// Values at the limit replicate: 4 MiB values with a 400 ms heartbeat (which allows
/// 4 MiB), and every member ends with them. A value's bytes go into the log and onto
/// the wire as one byte string (`serde_bytes`); as a sequence of single bytes, each
/// such append took about 1.2 s in this (debug) build, three heartbeats, and none
/// replicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_at_the_cluster_limit_replicate() {
    let c = TestCluster::start_with(3, |mut cfg| {
        if let Some(cc) = cfg.cluster.as_mut() {
            cc.heartbeat = Duration::from_millis(400);
            cc.election = (Duration::from_millis(1000), Duration::from_millis(2000));
        }
        cfg.max_value_size(4 * datasync_raft::CLUSTER_VALUE_PER_100MS)
    })
    .await;
    let leader = c.leader().await;
    let mut written = Vec::new();
    for i in 0..3u8 {
        let k = Key::new(format!("big/{i}")).unwrap();
        let v = Value::from(vec![b'a' + i; 4 << 20]);
        let put = leader.put(&k, v.clone(), PutOptions::new()).await;
        assert!(put.is_ok(), "put of 4 MiB: {put:?}");
        written.push((k, v));
    }
    for node in &c.nodes {
        for (k, v) in &written {
            let got = node
                .get(k, ReadOptions::new().consistency(Consistency::Linearizable))
                .await
                .unwrap();
            assert!(
                got.is_some_and(|kv| &kv.value == v),
                "{k} on node {}",
                node.node_id()
            );
        }
    }
}
