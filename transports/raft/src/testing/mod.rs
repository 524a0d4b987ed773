//! Conformance-suite harnesses for the embedded store (tests only): one node, and a
//! three-node cluster on loopback whose follower is the store under test; [`Faults`],
//! the switchboard a test cluster's messages pass through.

use std::sync::Mutex;
use std::time::Duration;

use datasync::testing::Harness;
use tempfile::TempDir;

use crate::{ClusterConfig, RaftConfig, RaftStore, RemoteConfig, RemoteStore, Role, Secret};

mod faults;
pub use crate::network::net::{Listener, Net, Socket, Stream, Tcp};
pub use crate::rt::set_inline;
pub use crate::storage::disk::{Disk, Loss, Lost};
pub use faults::Faults;

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

/// The secret test clusters share.
pub fn test_secret() -> Secret {
    Secret::new("datasync test cluster secret").expect("a long enough secret")
}

/// A cluster of nodes in this process, each on its own loopback port and temp dir,
/// talking over real TCP through one fault switchboard. Nodes stop when it drops.
#[derive(Debug)]
pub struct TestCluster {
    /// The members, in the order they were started (node ids 1, 2, …).
    pub nodes: Vec<RaftStore>,
    /// Their data directories.
    pub dirs: Vec<TempDir>,
    /// The faults every member's messages pass through (none until set).
    pub faults: Faults,
}

impl TestCluster {
    /// The config of node `id` with data in `dir`, joining through `join` (none: it
    /// bootstraps).
    pub fn config(id: u64, dir: &std::path::Path, join: Option<&str>) -> RaftConfig {
        let listen = "127.0.0.1:0".parse().expect("an address");
        let mut c = ClusterConfig::new(listen, test_secret());
        if let Some(seed) = join {
            c = c.join([seed]);
        }
        RaftConfig::new(dir).cluster(id, c)
    }

    /// Starts `n` voters: node 1 bootstraps, the others join through it.
    pub async fn start(n: u64) -> TestCluster {
        Self::start_with(n, |c| c).await
    }

    /// Starts `n` voters whose configs `tune` adjusts.
    pub async fn start_with(n: u64, tune: impl Fn(RaftConfig) -> RaftConfig) -> TestCluster {
        let mut cluster = TestCluster {
            nodes: Vec::new(),
            dirs: Vec::new(),
            faults: Faults::new(),
        };
        for id in 1..=n {
            let dir = tempfile::tempdir().expect("temp dir");
            let seed = cluster.nodes.first().and_then(|s| s.cluster_addr());
            let mut config = tune(Self::config(id, dir.path(), seed));
            config.cluster = config.cluster.map(|c| c.faults(cluster.faults.clone()));
            let store = RaftStore::open(config)
                .await
                .expect("open a cluster member");
            cluster.nodes.push(store);
            cluster.dirs.push(dir);
        }
        for node in &cluster.nodes {
            wait_until("every member sees every voter", || {
                node.members().voters.len() == n as usize
                    && node.members().role(node.node_id()) == Some(Role::Voter)
            })
            .await;
        }
        cluster
    }

    /// The member that leads now, as the members agree.
    pub async fn leader(&self) -> &RaftStore {
        self.leader_among(&self.addrs()).await
    }

    /// The member that leads now, as the members at `addrs` agree (the others may be
    /// cut off and think otherwise).
    pub async fn leader_among(&self, addrs: &[String]) -> &RaftStore {
        let group: Vec<_> = self
            .nodes
            .iter()
            .filter(|n| {
                n.cluster_addr()
                    .is_some_and(|a| addrs.iter().any(|x| x == a))
            })
            .collect();
        let mut found = None;
        wait_until("the members agree on a leader", || {
            let leaders: Vec<_> = group.iter().map(|n| n.leader()).collect();
            found = leaders[0].filter(|l| leaders.iter().all(|x| *x == Some(*l)));
            found.is_some()
        })
        .await;
        let id = found.expect("a leader");
        self.nodes
            .iter()
            .find(|n| n.node_id() == id)
            .expect("the leader is a member")
    }

    /// The members' cluster addresses, as the fault switchboard names them.
    pub fn addrs(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter_map(|n| n.cluster_addr().map(str::to_owned))
            .collect()
    }

    /// A member that does not lead now.
    pub async fn follower(&self) -> &RaftStore {
        let leader = self.leader().await.node_id();
        self.nodes
            .iter()
            .find(|n| n.node_id() != leader)
            .expect("a follower")
    }
}

/// The path of this package's example `name`, next to the running test binary
/// (`cargo test` builds the examples); panics saying how to build it if it is missing.
pub fn example_binary(name: &str) -> std::path::PathBuf {
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/examples/<name>
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join("examples")
        .join(name);
    assert!(
        bin.exists(),
        "{} is missing: `cargo test` builds it (or: cargo build -p datasync-raft --example {name})",
        bin.display()
    );
    bin
}

/// Waits (up to 30 s) until `check` holds; panics naming `what` otherwise.
pub async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until every store in `nodes` is at the same revision with the same state hash.
pub async fn converged(nodes: &[&RaftStore]) {
    wait_until("the members converge", || {
        let revs: Vec<_> = nodes.iter().map(|n| n.revision()).collect();
        let hashes: Vec<_> = nodes
            .iter()
            .map(|n| n.state_hash().expect("a state hash"))
            .collect();
        revs.windows(2).all(|w| w[0] == w[1]) && hashes.windows(2).all(|w| w[0] == w[1])
    })
    .await;
}

/// A watch of `prefix` on `store` whose initial resync has been taken and answered:
/// the next events are the changes after it.
pub async fn watch_past_resync(store: &impl datasync::Watcher, prefix: &str) -> datasync::Watch {
    let prefix = datasync::Prefix::new(prefix).expect("a valid prefix");
    let mut w = store
        .watch("test", &[prefix], datasync::WatchOptions::default())
        .await
        .expect("a watch");
    datasync::testing::next_event(&mut w)
        .await
        .expect("the initial resync")
        .into_done()
        .ok();
    w
}

/// Runs the suite against a follower of a fresh three-node cluster per test: writes are
/// forwarded to the leader, watches and reads are served by the follower.
#[derive(Debug, Default)]
pub struct ClusterHarness {
    clusters: tokio::sync::Mutex<Vec<TestCluster>>,
}

#[async_trait::async_trait]
impl Harness for ClusterHarness {
    type Store = RaftStore;

    async fn store(&self) -> RaftStore {
        let cluster = TestCluster::start(3).await;
        let follower = cluster.follower().await.clone();
        self.clusters.lock().await.push(cluster);
        follower
    }

    async fn active_watches(&self, store: &RaftStore) -> usize {
        store.active_watches()
    }
}

/// Runs the suite against a [`RemoteStore`] (no replica of its own) talking to a fresh
/// three-node cluster per test, a follower first: every operation crosses the network
/// and writes are forwarded once more to the leader.
#[derive(Debug, Default)]
pub struct RemoteHarness {
    clusters: tokio::sync::Mutex<Vec<TestCluster>>,
}

#[async_trait::async_trait]
impl Harness for RemoteHarness {
    // The member's stream cannot be extended over the wire: an added prefix is a full
    // resync on a new stream.
    const READS_ADDED_PREFIXES_ALONE: bool = false;

    type Store = RemoteStore;

    async fn store(&self) -> RemoteStore {
        let cluster = TestCluster::start(3).await;
        let follower = cluster.follower().await.node_id();
        let mut endpoints = cluster.addrs();
        endpoints.sort_by_key(|a| {
            cluster
                .nodes
                .iter()
                .find(|n| n.cluster_addr() == Some(a))
                .is_none_or(|n| n.node_id() != follower)
        });
        let store = RemoteStore::connect(RemoteConfig::new(endpoints, test_secret()))
            .await
            .expect("connect a remote client");
        self.clusters.lock().await.push(cluster);
        store
    }

    /// The watches the members serve for this client's cluster.
    async fn active_watches(&self, store: &RemoteStore) -> usize {
        let clusters = self.clusters.lock().await;
        let cluster = clusters
            .iter()
            .find(|c| c.addrs().iter().any(|a| store.endpoints().contains(a)))
            .expect("the client's cluster");
        cluster.nodes.iter().map(RaftStore::active_watches).sum()
    }
}
