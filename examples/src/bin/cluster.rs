//! The same two dependent plugins on a three-node raft cluster, all in this process on
//! loopback (real TCP, real disk, a shared secret): the plugins run on a follower while
//! writes go through the leader, the leader then stops, the two others elect a new one,
//! writes go on through the follower and still reach the plugins, and a remote client
//! (a process with no replica, like the CLI) reads the same state.
//!
//! Run: `cargo run -p datasync-examples --bin cluster`

use std::error::Error;
use std::time::Duration;

use datasync::coordinator::PluginState;
use datasync::{Key, Prefix, PutOptions, ReadOptions, Writer};
use datasync_examples::{Interfaces, print_status, seed, settle, start, walkthrough};
use datasync_raft::{ClusterConfig, RaftConfig, RaftStore, RemoteConfig, RemoteStore, Secret};

async fn wait_for(what: &str, check: impl Fn() -> bool) -> Result<(), Box<dyn Error>> {
    let until = async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), until)
        .await
        .map_err(|_| format!("timed out waiting until {what}").into())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let secret = Secret::new("the example cluster's shared secret")?;
    let dirs = [
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    ];
    let mut nodes: Vec<RaftStore> = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let mut cluster = ClusterConfig::new("127.0.0.1:0".parse()?, secret.clone());
        if let Some(first) = nodes.first() {
            cluster = cluster.join([first.cluster_addr().unwrap_or_default()]);
        }
        let node =
            RaftStore::open(RaftConfig::new(dir.path()).cluster(i as u64 + 1, cluster)).await?;
        println!(
            "node {} on {} ({})",
            node.node_id(),
            node.cluster_addr().unwrap_or_default(),
            if i == 0 {
                "bootstrapped"
            } else {
                "joined through node 1"
            }
        );
        nodes.push(node);
    }
    wait_for("every member sees three voters", || {
        nodes.iter().all(|n| n.members().voters.len() == 3)
    })
    .await?;
    wait_for("a leader", || nodes[0].leader().is_some()).await?;
    let leader_id = nodes[0].leader().ok_or("no leader")?;
    let li = nodes
        .iter()
        .position(|n| n.node_id() == leader_id)
        .ok_or("the leader is no member")?;
    let leader = nodes.remove(li);
    let follower = nodes.remove(0);
    println!(
        "node {} leads; the plugins run on node {}, a follower",
        leader.node_id(),
        follower.node_id()
    );
    seed(&leader).await?;
    let ifaces = Interfaces::default();

    println!("1. startup: one snapshot of the follower's replica, plugins in dependency order");
    let coordinator = start(&follower, &ifaces).await?;
    // Writes go through the leader; the follower's plugins receive them.
    walkthrough(&leader, &coordinator, &ifaces).await?;

    println!("6. the leader stops: the two others elect a new one");
    let mut membership = follower.observe_membership();
    leader.shutdown().await;
    drop(leader);
    wait_for("a new leader", || {
        follower.leader().is_some_and(|l| l != leader_id)
    })
    .await?;
    println!(
        "  node {} leads now; members: {:?}",
        follower.leader().unwrap_or(0),
        membership
            .next()
            .await
            .map(|m| m.voters.into_keys().collect::<Vec<_>>())
    );
    println!("  (a stopped member is still a member: only a leave removes one)");

    println!("7. writes go on through the follower (forwarded to the new leader)");
    follower
        .put(
            &Key::new("if/eth2")?,
            datasync_netconfig::Interface::value(1500),
            PutOptions::new(),
        )
        .await?;
    let arrived = async {
        while !ifaces.state().interfaces.contains_key("eth2") {
            settle().await;
        }
        Ok::<_, Box<dyn Error>>(())
    };
    tokio::time::timeout(Duration::from_secs(10), arrived)
        .await
        .map_err(|_| "the write after the failover never reached the plugin")??;
    println!("  the interfaces plugin has eth2");

    println!("8. a remote client (no replica) reads the same state");
    let remote = RemoteStore::connect(RemoteConfig::new(
        [follower.cluster_addr().unwrap_or_default()],
        secret,
    ))
    .await?;
    let remote_view = remote
        .list(&Prefix::new("if/")?, ReadOptions::new())
        .await?;
    let local_view = follower
        .list(&Prefix::new("if/")?, ReadOptions::new())
        .await?;
    if remote_view.values != local_view.values {
        return Err("the remote client and the member disagree".into());
    }
    for kv in &remote_view.values {
        println!(
            "  {}\t{} (r{})",
            kv.key,
            String::from_utf8_lossy(kv.value.as_bytes()),
            kv.revision
        );
    }
    print_status(&coordinator);
    let st = coordinator.status();
    if !st.plugins.iter().all(|p| p.state == PluginState::Ready) {
        return Err("a plugin is not ready".into());
    }
    coordinator.shutdown().await;
    for n in nodes.iter().chain([&follower]) {
        n.shutdown().await;
    }
    println!("done");
    Ok(())
}
