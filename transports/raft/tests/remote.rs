//! Remote clients (no replica of their own) of a three-node cluster on loopback: a
//! watch that moves to another member when its member stops or is removed from the
//! group, failing over to a live endpoint, membership, and refusing a client without
//! the secret.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use datasync::ResyncReason;
use datasync::testing::mirror_until;
use datasync::{
    Consistency, Key, Mirror, Prefix, PutOptions, ReadOptions, Revision, StoreError, Value, Watch,
    WatchOptions, Watcher, Writer,
};
use datasync_raft::testing::{TestCluster, test_secret, wait_until};
use datasync_raft::{
    ClusterConfig, ClusterError, RaftConfig, RaftStore, RemoteConfig, RemoteStore, Role, Secret,
};

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

/// Writes through `remote`, retrying a call whose outcome is unknown (same key and
/// value: applying twice changes nothing but the revision).
async fn put(remote: &RemoteStore, k: &str) -> Revision {
    for _ in 0..50 {
        match remote
            .put(&key(k), Value::from(k.to_owned()), PutOptions::new())
            .await
        {
            Ok(rev) => return rev,
            Err(e) => eprintln!("put {k}: {e}; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("put {k} never succeeded");
}

/// Writes `m/{from}`… through `remote`; the watch must reach them through a resync on
/// another member (`Reconnect`) and hold what a linearizable listing holds.
async fn follow_elsewhere(
    remote: &RemoteStore,
    w: &mut Watch,
    mirror: &mut Mirror,
    keys: std::ops::Range<usize>,
) {
    let mut rev = Revision::ZERO;
    for i in keys.clone() {
        rev = put(remote, &format!("m/{i:02}")).await;
    }
    let reasons = mirror_until(w, mirror, rev).await.unwrap();
    assert!(
        reasons.contains(&ResyncReason::Reconnect),
        "the watch resynced on another member: {reasons:?}"
    );
    assert_eq!(mirror.len(""), keys.end);
    let listing = remote
        .list(&Prefix::new("m/").unwrap(), ReadOptions::new())
        .await
        .unwrap();
    let listed: Vec<_> = listing.values.iter().map(|kv| kv.key.clone()).collect();
    let mirrored: Vec<_> = mirror.values("").map(|(k, _, _)| k.clone()).collect();
    assert_eq!(listed, mirrored, "the watcher holds what the store holds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_watch_moves_to_another_member_when_its_member_stops() {
    let mut c = TestCluster::start(3).await;
    let f = c.follower().await.node_id();
    let fi = c.nodes.iter().position(|n| n.node_id() == f).unwrap();
    // The follower first: it serves the watch.
    let mut endpoints = c.addrs();
    endpoints.swap(0, fi);
    let remote = RemoteStore::connect(RemoteConfig::new(endpoints, test_secret()))
        .await
        .unwrap();
    let mut w = remote
        .watch("w", &[Prefix::new("m/").unwrap()], WatchOptions::default())
        .await
        .unwrap();
    let mut mirror = Mirror::new();
    let mut rev = Revision::ZERO;
    for i in 0..20 {
        rev = put(&remote, &format!("m/{i:02}")).await;
    }
    let reasons = mirror_until(&mut w, &mut mirror, rev).await.unwrap();
    assert_eq!(reasons, [ResyncReason::Initial]);
    assert_eq!(
        c.nodes[fi].active_watches(),
        1,
        "the follower serves the watch"
    );

    let stopped = c.nodes.remove(fi);
    stopped.shutdown().await;
    drop(stopped);
    // Writes go on through the next endpoint; the watch resyncs on another member.
    follow_elsewhere(&remote, &mut w, &mut mirror, 20..40).await;
    // Closing the registration releases the member's watch.
    drop(w);
    wait_until("the member's watch is released", || {
        c.nodes.iter().map(RaftStore::active_watches).sum::<usize>() == 0
    })
    .await;
}

/// A member removed from the group by the others stops hearing from the leader (it
/// may never apply its own removal) and its replica only ages: its remote watches end
/// and it refuses calls, so clients move to a member of the group. Before, a watch on
/// it stalled for good and its reads timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_client_moves_off_a_member_removed_from_the_group() {
    let c = TestCluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let listen = "127.0.0.1:0".parse().unwrap();
    let config = ClusterConfig::new(listen, test_secret())
        .join(c.addrs())
        .learner();
    let learner = RaftStore::open(RaftConfig::new(dir.path()).cluster(4, config))
        .await
        .unwrap();
    // The learner first: it serves the watch and the calls.
    let mut endpoints = vec![learner.cluster_addr().unwrap().to_owned()];
    endpoints.extend(c.addrs());
    let remote = RemoteStore::connect(RemoteConfig::new(endpoints, test_secret()))
        .await
        .unwrap();
    let mut w = remote
        .watch("w", &[Prefix::new("m/").unwrap()], WatchOptions::default())
        .await
        .unwrap();
    let mut mirror = Mirror::new();
    let mut rev = Revision::ZERO;
    for i in 0..10 {
        rev = put(&remote, &format!("m/{i:02}")).await;
    }
    mirror_until(&mut w, &mut mirror, rev).await.unwrap();
    assert_eq!(learner.active_watches(), 1, "the learner serves the watch");
    // A client of the learner alone, reading its replica. (It tries a refusing member
    // again until its timeout: a short one keeps the test short.)
    let pinned = RemoteStore::connect(
        RemoteConfig::new([learner.cluster_addr().unwrap().to_owned()], test_secret())
            .timeout(Duration::from_secs(4)),
    )
    .await
    .unwrap();
    let local = ReadOptions::new().consistency(Consistency::Local);
    assert!(pinned.get(&key("m/00"), local).await.unwrap().is_some());

    c.nodes[0].remove_member(4).await.unwrap();
    follow_elsewhere(&remote, &mut w, &mut mirror, 10..20).await;
    // The removed member refuses even local reads once it has heard from no leader.
    let mut refused = None;
    for _ in 0..100 {
        if let Err(e) = pinned.get(&key("m/00"), local).await {
            refused = Some(e);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Refused as a member that cannot serve (no other endpoint to go on to).
    match refused {
        Some(StoreError::Unavailable(e)) => assert!(
            matches!(
                e.downcast_ref::<ClusterError>(),
                Some(ClusterError::NoMember(_))
            ),
            "{e}"
        ),
        other => panic!("the removed member still serves its aging replica: {other:?}"),
    }
    wait_until("the removed member's watch is released", || {
        learner.active_watches() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_client_fails_over_to_a_live_endpoint() {
    let c = TestCluster::start(3).await;
    // Nothing listens on port 1; the client goes on to a member.
    let mut endpoints = vec!["127.0.0.1:1".to_owned()];
    endpoints.extend(c.addrs());
    let remote = RemoteStore::connect(RemoteConfig::new(endpoints, test_secret()))
        .await
        .unwrap();
    let rev = put(&remote, "a").await;
    let got = remote.get(&key("a"), ReadOptions::new()).await.unwrap();
    assert_eq!(got.map(|kv| kv.revision), Some(rev));
    assert_eq!(
        remote.limits(),
        c.nodes[0].limits(),
        "limits come from the members"
    );
}

/// A remote watch resuming after a revision: replayed by a member from its history;
/// once every member compacted past it, each passes the watch on and the client
/// resyncs as `Compacted`, its state then equal to the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_watch_resumes_or_resyncs_as_compacted() {
    let c = TestCluster::start(3).await;
    let remote = RemoteStore::connect(RemoteConfig::new(c.addrs(), test_secret()))
        .await
        .unwrap();
    let held = put(&remote, "m/a").await;
    let last = put(&remote, "m/b").await;
    let prefixes = [Prefix::new("m/").unwrap()];
    let mut w = remote
        .watch("w", &prefixes, WatchOptions::default().resume(held))
        .await
        .unwrap();
    let ev = datasync::testing::next_event(&mut w).await.unwrap();
    let datasync::Event::Change(ch) = &ev else {
        panic!("{ev:?}")
    };
    assert_eq!(ch.revision, last);
    ev.into_done().ok();
    drop(w);

    // The floor keeps its own change: compacting at `last` leaves `held` resumable.
    let floor = put(&remote, "m/c").await;
    c.nodes[0].compact(floor).await.unwrap();
    for n in &c.nodes {
        wait_until("every member compacted", || n.compacted_revision() >= floor).await;
    }
    let mut w = remote
        .watch("w", &prefixes, WatchOptions::default().resume(held))
        .await
        .unwrap();
    let mut mirror = Mirror::new();
    let ev = datasync::testing::next_event(&mut w).await.unwrap();
    let datasync::Event::Resync(rs) = &ev else {
        panic!("{ev:?}")
    };
    assert_eq!(rs.reason, ResyncReason::Compacted);
    mirror.apply(&ev).unwrap();
    ev.into_done().ok();
    assert_eq!(mirror.len(""), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_through_a_remote_client() {
    let c = TestCluster::start(3).await;
    let remote = RemoteStore::connect(RemoteConfig::new(c.addrs(), test_secret()))
        .await
        .unwrap();
    assert_eq!(remote.members().await.unwrap().voters.len(), 3);
    // A fourth node joins as a learner; the remote client promotes it, then removes it.
    let dir = tempfile::tempdir().unwrap();
    let listen = "127.0.0.1:0".parse().unwrap();
    let config = ClusterConfig::new(listen, test_secret())
        .join(c.addrs())
        .learner();
    let fourth = RaftStore::open(RaftConfig::new(dir.path()).cluster(4, config))
        .await
        .unwrap();
    let addr = fourth.cluster_addr().unwrap().to_owned();
    remote.add_member(4, &addr, Role::Voter).await.unwrap();
    wait_until("node 4 votes", || {
        c.nodes[0].members().role(4) == Some(Role::Voter)
    })
    .await;
    remote.remove_member(4).await.unwrap();
    wait_until("node 4 is gone", || c.nodes[0].members().role(4).is_none()).await;
    let m = remote.members().await.unwrap();
    assert_eq!(m.voters.len(), 3);
    assert_eq!(m.role(4), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_client_without_the_secret_is_refused() {
    let c = TestCluster::start(1).await;
    let wrong = Secret::new("not the cluster secret at all").unwrap();
    let err = RemoteStore::connect(RemoteConfig::new(c.addrs(), wrong))
        .await
        .unwrap_err();
    assert!(matches!(err, ClusterError::Unauthenticated(_)), "{err:?}");
    let none = RemoteStore::connect(RemoteConfig::new(Vec::<String>::new(), test_secret()))
        .await
        .unwrap_err();
    assert!(matches!(none, ClusterError::NoEndpoints), "{none:?}");
}
