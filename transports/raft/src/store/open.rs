//! Opening a store: the data files, raft, and (for a member) the server, then a
//! bootstrap, a join, or a restart from disk.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::{BasicNode, Raft, SnapshotPolicy};
use tokio_util::sync::CancellationToken;
use tracing::{debug, instrument, warn};

use super::tasks::{catch_up, ttl_task};
use super::{Inner, LEFT, RaftConfig, RaftStore, WeakStore};
use crate::OpenError;
use crate::cluster::{ClusterConfig, Node, Service};
use crate::members::{Members, Role};
use crate::network::client::Pool;
use crate::network::nopeers::NoPeers;
use crate::network::peer::TcpNetwork;
use crate::network::server;
use crate::network::wire::Request;
use crate::once::Requests;
use crate::propose::Proposals;
use crate::routing;
use crate::storage::log::LogStore;
use crate::storage::{self, sm};
use crate::types::{NodeId, TypeConfig};

/// How long a single node waits to lead after it starts.
const LEAD_WITHIN: Duration = Duration::from_secs(10);
/// How long a single node may take to re-apply its log after a crash.
const REPLAY_WITHIN: Duration = Duration::from_secs(300);

/// A member's listener, bound before anything else so a taken port fails fast.
struct Bound<'a> {
    config: &'a ClusterConfig,
    listener: Box<dyn crate::network::net::Listener>,
    advertise: String,
    pool: Pool,
}

impl RaftStore {
    /// Opens the store in `config.dir`.
    ///
    /// Without [`RaftConfig::cluster`]: bootstraps a one-node group on first start,
    /// restarts from disk afterwards (never re-initializing), and returns once this
    /// node leads and has re-applied its log.
    ///
    /// With a cluster: starts serving peers, then on the first start bootstraps a new
    /// group or joins through [`ClusterConfig::join`] (returning once this node has
    /// caught up and is a member); on later starts restarts from disk with the same
    /// identity and returns at once (the group elects a leader when enough members
    /// run; until then writes wait for one, up to the forward timeout).
    #[instrument(level = "debug", skip_all, fields(dir = %config.dir.display()))]
    pub async fn open(config: RaftConfig) -> Result<RaftStore, OpenError> {
        config.validate()?;
        let bound = match &config.cluster {
            None => None,
            Some(c) => Some(bind(c).await?),
        };
        let (dir, segment) = (config.dir.clone(), config.log_segment);
        let (db, wal) = crate::rt::blocking(move || storage::open(&dir, segment))
            .await
            .map_err(|e| OpenError::Task(e.0))??;
        let shared = sm::Shared::new(db.clone(), config.history, config.clock.clone())
            .map_err(|e| OpenError::State(Box::new(e)))?;
        let applied = storage::log::applied(&db).map_err(|e| OpenError::State(Box::new(e)))?;
        let behind = wal.mem().last.map_or(0, |l| {
            l.index.saturating_sub(applied.map_or(0, |a| a.index))
        });
        shared
            .behind_at_open
            .store(behind, std::sync::atomic::Ordering::Relaxed);
        let clean = {
            let db = db.clone();
            crate::rt::blocking(move || sm::take_clean_close(&db))
                .await
                .map_err(|e| OpenError::Task(e.0))?
                .map_err(OpenError::CleanMark)?
        };
        // A member that left has no group to catch up with; it serves what it has.
        let left = config.dir.join(LEFT).exists();
        if config.cluster.is_some() {
            shared.set_complete(clean || left);
        }
        let raft_config = Arc::new(raft_config(&config)?);
        let growth = wal.growth();
        growth.signal_every(config.snapshot_log_bytes);
        let (log, machine) = (
            LogStore::new(db, wal, config.cluster.as_ref().map(|_| config.node_id))
                .metered(shared.metrics()),
            sm::StateMachine::new(shared.clone()),
        );
        let id = config.node_id;
        let raft = match &bound {
            None => Raft::new(id, raft_config, NoPeers, log, machine).await,
            Some(b) => {
                let net = TcpNetwork {
                    pool: b.pool.clone(),
                    snapshots_sent: shared.metrics().snapshots_sent.clone(),
                };
                Raft::new(id, raft_config, net, log, machine).await
            }
        }
        .map_err(|e| OpenError::Fatal(Box::new(e)))?;
        let stop = CancellationToken::new();
        let in_flight = match &config.cluster {
            None => crate::propose::IN_FLIGHT_SINGLE,
            Some(_) => crate::propose::IN_FLIGHT_CLUSTER,
        };
        let proposals = Proposals::start(raft.clone(), in_flight, stop.clone(), shared.metrics());
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| OpenError::Fatal(Box::new(e)))?;
        let mut bootstrapped = false;
        let node = match bound {
            Some(bound) => {
                let service = Arc::new(Service {
                    raft: raft.clone(),
                    proposals: proposals.clone(),
                    sm: shared.clone(),
                    clients: std::sync::OnceLock::new(),
                    leader_heard: std::sync::Mutex::new(None),
                });
                let server = tokio::spawn(server::serve(
                    bound.listener,
                    bound.config.secret.clone(),
                    service.clone(),
                    stop.clone(),
                ));
                let member = Member {
                    id,
                    raft: &raft,
                    config: bound.config,
                    advertise: &bound.advertise,
                    pool: &bound.pool,
                };
                let started = if !initialized {
                    member.start_first().await
                } else {
                    member.restart(&shared);
                    Ok(false)
                };
                bootstrapped = match started {
                    Ok(b) => b,
                    Err(e) => {
                        stop.cancel();
                        let _ = raft.shutdown().await;
                        return Err(e);
                    }
                };
                Some(Node {
                    id,
                    addr: bound.advertise,
                    pool: bound.pool,
                    service,
                    forward_timeout: bound.config.forward_timeout,
                    server: std::sync::Mutex::new(Some(server)),
                    left: std::sync::atomic::AtomicBool::new(left),
                    caught_up: tokio::sync::watch::Sender::new(clean || left),
                })
            }
            None => {
                start_single(id, &raft, initialized).await?;
                None
            }
        };
        if let Err(e) = super::tasks::purge_behind_snapshot(&raft, config.keep_logs).await {
            tracing::warn!(error = %e, "the log behind the snapshot is not purged at open");
        }
        tokio::spawn(super::tasks::snapshot_by_log_bytes(
            raft.clone(),
            growth,
            stop.clone(),
        ));
        tokio::spawn(super::tasks::count_leader_changes(
            raft.clone(),
            shared.metrics().leader_changes.clone(),
            stop.clone(),
        ));
        // A new group (a single node, or the member that bootstraps one) counts versions
        // from before its first write; an older group's leader turns them on from its
        // TTL task, which also retries this if it failed.
        if bootstrapped {
            let _ = raft
                .wait(Some(Duration::from_secs(5)))
                .current_leader(id, "the bootstrapping member leads")
                .await;
        }
        if (node.is_none() || bootstrapped)
            && config.count_versions
            && !shared.versions()
            && let Err(e) = proposals
                .propose_internal(crate::types::Command::CountVersions)
                .await
        {
            tracing::warn!(error = ?e, "counting versions not committed yet; the TTL task retries");
        }
        let ttl = tokio::spawn(ttl_task(
            config.count_versions,
            proposals.clone(),
            shared.clone(),
            raft.clone(),
            id,
            stop.clone(),
        ));
        let store = RaftStore {
            inner: Arc::new(Inner {
                local: std::sync::OnceLock::new(),
                raft,
                sm: shared,
                config,
                source: datasync::Source::from(""),
                stop,
                ttl: std::sync::Mutex::new(Some(ttl)),
                proposals,
                node,
                requests: Requests::new(),
            }),
        };
        if let Some(age) = store.inner.config.history_age {
            tokio::spawn(super::tasks::compact_by_age(
                Arc::downgrade(&store.inner),
                age,
                store.inner.stop.clone(),
            ));
        }
        if let Some(node) = &store.inner.node {
            if !*node.caught_up.borrow() {
                tokio::spawn(catch_up(
                    Arc::downgrade(&store.inner),
                    store.inner.stop.clone(),
                ));
            }
            let _ = node
                .service
                .clients
                .set(Box::new(WeakStore(Arc::downgrade(&store.inner))));
        }
        if store.inner.config.local_endpoint {
            let handler: Arc<dyn crate::network::server::Handler> = match &store.inner.node {
                Some(node) => node.service.clone(),
                None => Arc::new(crate::local::SingleNode(Box::new(store.downgrade()))),
            };
            // The store serves this process without it: a failure is logged, not fatal.
            match crate::local::open(&store.inner.config.dir, handler).await {
                Ok(local) => {
                    let _ = store.inner.local.set(local);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no local endpoint: other processes cannot reach this store")
                }
            }
        }
        Ok(store)
    }
}

async fn bind(c: &ClusterConfig) -> Result<Bound<'_>, OpenError> {
    let listen_err = |source| OpenError::Listen {
        addr: c.listen,
        source,
    };
    let listener = c.net.bind(c.listen).await.map_err(listen_err)?;
    let bound = listener.local_addr().map_err(listen_err)?;
    let advertise = c.advertise.clone().unwrap_or_else(|| bound.to_string());
    let faults = c.link.clone().map(|f| (f, advertise.clone()));
    let pool = Pool::new(c.secret.clone(), faults, c.net.clone());
    Ok(Bound {
        config: c,
        listener,
        advertise,
        pool,
    })
}

fn raft_config(config: &RaftConfig) -> Result<openraft::Config, OpenError> {
    let mut raft_config = openraft::Config {
        cluster_name: "datasync".into(),
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every),
        max_in_snapshot_log_to_keep: config.keep_logs,
        ..Default::default()
    };
    if let Some(c) = &config.cluster {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        raft_config.heartbeat_interval = ms(c.heartbeat);
        raft_config.election_timeout_min = ms(c.election.0);
        raft_config.election_timeout_max = ms(c.election.1);
    }
    raft_config
        .validate()
        .map_err(|e| OpenError::Timing(Box::new(e)))
}

/// A single node: bootstraps on its first start, then leads and has re-applied its
/// log before it serves.
async fn start_single(
    id: NodeId,
    raft: &Raft<TypeConfig>,
    initialized: bool,
) -> Result<(), OpenError> {
    if !initialized {
        debug!(node = id, "bootstrapping a new single-node group");
        let members = BTreeMap::from([(id, BasicNode::default())]);
        raft.initialize(members)
            .await
            .map_err(|e| OpenError::Bootstrap(Box::new(e)))?;
    }
    let mut metrics = raft.metrics();
    tokio::time::timeout(
        LEAD_WITHIN,
        metrics.wait_for(|m| m.current_leader == Some(id)),
    )
    .await
    .map_err(|_| OpenError::NoLeader)?
    .map_err(|_| OpenError::NoLeader)?;
    // Applies commit durably about once a second, so after a crash the state machine
    // may be behind the log: it is usable once the log is re-applied, never before (a
    // reader must not see the revision go back).
    let replayed = |m: &openraft::RaftMetrics<NodeId, BasicNode>| {
        m.last_applied.map(|l| l.index) >= m.last_log_index
    };
    tokio::time::timeout(REPLAY_WITHIN, metrics.wait_for(replayed))
        .await
        .map_err(|_| OpenError::Replay(REPLAY_WITHIN))?
        .map_err(|_| OpenError::Replay(REPLAY_WITHIN))?;
    Ok(())
}

/// A cluster member starting: its first start (bootstrap or join), or a restart.
struct Member<'a> {
    id: NodeId,
    raft: &'a Raft<TypeConfig>,
    config: &'a ClusterConfig,
    advertise: &'a str,
    pool: &'a Pool,
}

impl Member<'_> {
    /// Bootstraps a new group (nothing to join; `true`) or joins through the seeds,
    /// returning once this member has applied the change that made it one.
    async fn start_first(&self) -> Result<bool, OpenError> {
        let (id, c) = (self.id, self.config);
        if c.join.is_empty() {
            debug!(node = id, addr = %self.advertise, "bootstrapping a new group");
            let members = BTreeMap::from([(id, BasicNode::new(self.advertise))]);
            return self
                .raft
                .initialize(members)
                .await
                .map(|()| true)
                .map_err(|e| OpenError::Bootstrap(Box::new(e)));
        }
        debug!(node = id, addr = %self.advertise, seeds = ?c.join, "joining");
        let voter = c.role == Role::Voter;
        let req = || Request::Join {
            id,
            addr: self.advertise.to_owned(),
            voter,
        };
        let joined = routing::change_membership(self.pool, &c.join, req, c.join_timeout)
            .await
            .map_err(OpenError::Join)?;
        // Caught up means applied here too, not only replicated.
        self.raft
            .wait(Some(c.join_timeout))
            .applied_index_at_least(Some(joined), "joined")
            .await
            .map_err(|source| OpenError::CatchUp {
                index: joined,
                source,
            })?;
        Ok(false)
    }

    /// A restart from disk. A member configured as a voter but restarting as a
    /// learner crashed between the two steps of its join (or was configured as a
    /// learner before): the promotion is asked for in the background (the leader may
    /// need a while); asking twice is harmless.
    fn restart(&self, shared: &sm::Shared) {
        let (id, c) = (self.id, self.config);
        let members = Members::from_stored(&shared.membership.borrow());
        if c.role != Role::Voter || members.role(id) != Some(Role::Learner) {
            return;
        }
        let seeds: Vec<String> = c
            .join
            .iter()
            .cloned()
            .chain(members.voters.into_values())
            .collect();
        let (pool, addr, timeout) = (self.pool.clone(), self.advertise.to_owned(), c.join_timeout);
        tokio::spawn(async move {
            let req = || Request::Join {
                id,
                addr: addr.clone(),
                voter: true,
            };
            match routing::change_membership(&pool, &seeds, req, timeout).await {
                Ok(_) => debug!(node = id, "promoted to voter, as configured"),
                Err(e) => warn!(node = id, error = %e, "could not become a voter as configured"),
            }
        });
    }
}
