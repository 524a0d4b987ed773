//! Opening the configured store.

use std::sync::Arc;

use datasync::{Watcher, Writer};
use datasync_raft::{
    ClusterConfig, Members, RaftConfig, RaftStore, RemoteConfig, RemoteStore, Role, Secret,
};

use crate::{AgentError, ConfigError, StoreConfig};

/// A store configuration that does not fit together, as a configuration error.
#[allow(dead_code)] // unused without the nats and etcd features
fn invalid(message: String) -> AgentError {
    AgentError::Config(ConfigError::Invalid {
        origin: "the store settings".to_owned(),
        message,
    })
}

/// The store an agent runs on.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum AnyStore {
    /// The embedded raft store (one node or a cluster member).
    Raft(RaftStore),
    /// A raft cluster reached as a remote client.
    Remote(RemoteStore),
    /// NATS JetStream Key-Value.
    #[cfg(feature = "nats")]
    Nats(datasync_nats::NatsStore),
    /// etcd v3.
    #[cfg(feature = "etcd")]
    Etcd(datasync_etcd::EtcdStore),
}

impl AnyStore {
    /// Opens (or connects to) the store `config` names. An embedded store serves other
    /// processes through its local endpoint (see [`open_or_reach`](Self::open_or_reach)).
    pub async fn open(config: &StoreConfig) -> Result<AnyStore, AgentError> {
        AnyStore::open_serving(config, true).await
    }

    async fn open_serving(config: &StoreConfig, serve: bool) -> Result<AnyStore, AgentError> {
        match config {
            StoreConfig::Raft {
                dir,
                node_id,
                cluster,
                tuning,
                ..
            } => {
                let mut raft = RaftConfig::new(dir).local_endpoint(serve);
                raft.node_id = *node_id;
                if let Some(c) = cluster {
                    let mut cc = ClusterConfig::new(c.listen, Secret::from_file(&c.secret_file)?)
                        .join(c.join.clone());
                    if let Some(a) = &c.advertise {
                        cc = cc.advertise(a.clone());
                    }
                    if c.learner {
                        cc = cc.learner();
                    }
                    raft = raft.cluster(*node_id, cc);
                }
                Ok(AnyStore::Raft(RaftStore::open(tuning.apply(raft)).await?))
            }
            StoreConfig::Remote {
                endpoints,
                secret_file,
            } => {
                let c = RemoteConfig::new(endpoints.clone(), Secret::from_file(secret_file)?);
                Ok(AnyStore::Remote(RemoteStore::connect(c).await?))
            }
            #[cfg(feature = "nats")]
            StoreConfig::Nats {
                servers,
                bucket,
                tls,
                auth,
            } => {
                config.check().map_err(invalid)?;
                let c = crate::secure::nats_config(servers, bucket, tls.as_ref(), auth)?;
                Ok(AnyStore::Nats(datasync_nats::NatsStore::connect(c).await?))
            }
            #[cfg(feature = "etcd")]
            StoreConfig::Etcd {
                endpoints,
                namespace,
                tls,
                auth,
            } => {
                config.check().map_err(invalid)?;
                let c = crate::secure::etcd_config(endpoints, namespace, tls.as_ref(), auth)?;
                Ok(AnyStore::Etcd(datasync_etcd::EtcdStore::connect(c).await?))
            }
            #[allow(unreachable_patterns)]
            other => Err(AgentError::NotBuiltIn(match other {
                StoreConfig::Nats { .. } => "nats",
                _ => "etcd",
            })),
        }
    }

    /// [`open`](Self::open), except that an embedded store another process holds (an
    /// agent, `datasync serve`, a CLI `watch`) is reached through that process's local
    /// endpoint (a Unix socket in the data directory) instead of failing on its lock.
    /// For the CLI: an agent opens its store itself, or fails. `serve`: whether this
    /// process, if it opens the store itself, serves others in turn (a long-running
    /// `watch` does; a one-shot command does not, so that a second CLI never comes to
    /// depend on a process about to exit).
    ///
    /// A holder that is starting or exiting may hold the lock without serving: the
    /// store is tried again for up to 5 s, then the error names both.
    pub async fn open_or_reach(config: &StoreConfig, serve: bool) -> Result<AnyStore, AgentError> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let dir = match AnyStore::open_serving(config, serve).await {
                Err(AgentError::Raft(datasync_raft::OpenError::InUse { dir })) => dir,
                opened => return opened,
            };
            match RemoteStore::connect_local(&dir).await {
                Ok(remote) => return Ok(AnyStore::Remote(remote)),
                Err(datasync_raft::ClusterError::NoLocalEndpoint { .. })
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(datasync_raft::ClusterError::NoLocalEndpoint { dir, reason }) => {
                    return Err(AgentError::HeldElsewhere { dir, reason });
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The store as a watcher.
    pub fn watcher(&self) -> &dyn Watcher {
        match self {
            AnyStore::Raft(s) => s,
            AnyStore::Remote(s) => s,
            #[cfg(feature = "nats")]
            AnyStore::Nats(s) => s,
            #[cfg(feature = "etcd")]
            AnyStore::Etcd(s) => s,
        }
    }

    /// The store as a writer, for plugins.
    pub fn writer(&self) -> Arc<dyn Writer> {
        match self {
            AnyStore::Raft(s) => Arc::new(s.clone()),
            AnyStore::Remote(s) => Arc::new(s.clone()),
            #[cfg(feature = "nats")]
            AnyStore::Nats(s) => Arc::new(s.clone()),
            #[cfg(feature = "etcd")]
            AnyStore::Etcd(s) => Arc::new(s.clone()),
        }
    }

    /// The committed members of the raft cluster this store is or reaches.
    pub async fn members(&self) -> Result<Members, AgentError> {
        match self {
            AnyStore::Raft(s) => Ok(s.members()),
            AnyStore::Remote(s) => Ok(s.members().await?),
            #[allow(unreachable_patterns)]
            _ => Err(AgentError::NotClustered),
        }
    }

    /// Adds node `id` at `addr` to the raft cluster (or promotes a learner).
    pub async fn add_member(&self, id: u64, addr: &str, role: Role) -> Result<(), AgentError> {
        match self {
            AnyStore::Raft(s) => Ok(s.add_member(id, addr, role).await?),
            AnyStore::Remote(s) => Ok(s.add_member(id, addr, role).await?),
            #[allow(unreachable_patterns)]
            _ => Err(AgentError::NotClustered),
        }
    }

    /// Removes node `id` from the raft cluster (it keeps its data).
    pub async fn remove_member(&self, id: u64) -> Result<(), AgentError> {
        match self {
            AnyStore::Raft(s) => Ok(s.remove_member(id).await?),
            AnyStore::Remote(s) => Ok(s.remove_member(id).await?),
            #[allow(unreachable_patterns)]
            _ => Err(AgentError::NotClustered),
        }
    }

    /// Moves member `id` of the raft cluster to `addr` (restart it listening there).
    pub async fn update_member(&self, id: u64, addr: &str) -> Result<(), AgentError> {
        match self {
            AnyStore::Raft(s) => Ok(s.update_member(id, addr).await?),
            AnyStore::Remote(s) => Ok(s.update_member(id, addr).await?),
            #[allow(unreachable_patterns)]
            _ => Err(AgentError::NotClustered),
        }
    }

    /// Adds the store's metrics to `registry` (the embedded raft store's; the other
    /// stores' watches show in the coordinator's metrics).
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        match self {
            AnyStore::Raft(s) => s.register_metrics(registry),
            AnyStore::Remote(_) => {}
            #[allow(unreachable_patterns)]
            other => registry.register_collector(Box::new(ClientMetrics(other.clone()))),
        }
    }

    /// What the process knows of the store now, without asking it anything and
    /// without waiting for a lock an apply or a snapshot install may hold (health
    /// checks call it).
    pub fn status(&self) -> StoreStatus {
        let mut st = StoreStatus {
            kind: self.kind().to_owned(),
            node_id: None,
            leader: None,
            serving: None,
            term: None,
            revision: None,
            db_bytes: None,
            watches: None,
            stopped: None,
            members: Vec::new(),
            error: None,
        };
        if let AnyStore::Raft(s) = self {
            let h = s.health();
            st.node_id = Some(s.node_id());
            st.leader = h.leader;
            st.serving = Some(h.serving);
            st.term = Some(h.term);
            st.revision = Some(h.revision);
            st.db_bytes = Some(h.db_bytes);
            st.stopped = h.stopped;
        }
        st
    }

    /// [`status`](Self::status), with the raft cluster's members (asked of the cluster
    /// when this is a remote client; a failure to reach it goes into `error`).
    /// At most 2 s is spent asking.
    pub async fn status_with_members(&self) -> StoreStatus {
        let mut st = self.status();
        if let AnyStore::Raft(s) = self {
            st.watches = Some(s.active_watches());
        }
        let within = std::time::Duration::from_secs(2);
        let members = match self {
            AnyStore::Raft(_) | AnyStore::Remote(_) => {
                tokio::time::timeout(within, self.members()).await
            }
            #[allow(unreachable_patterns)]
            _ => return st,
        };
        match members {
            Err(_) => st.error = Some(format!("the members did not answer within {within:?}")),
            Ok(Err(e)) => st.error = Some(datasync::error_chain(&e)),
            Ok(Ok(m)) => {
                let role = |r: &'static str| {
                    move |(id, addr): (&u64, &String)| MemberStatus {
                        id: *id,
                        addr: addr.clone(),
                        role: r.to_owned(),
                    }
                };
                st.members = m.voters.iter().map(role("voter")).collect();
                st.members.extend(m.learners.iter().map(role("learner")));
            }
        }
        st
    }

    /// A backup of the raft store's state at one revision (the file's bytes; see
    /// `datasync_raft::backup`), from the embedded store or through a member.
    pub async fn backup(&self) -> Result<Vec<u8>, AgentError> {
        match self {
            AnyStore::Raft(s) => Ok(s.backup().await?),
            AnyStore::Remote(s) => Ok(s.backup().await?),
            #[allow(unreachable_patterns)]
            other => Err(AgentError::NoBackup(other.kind())),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            AnyStore::Raft(_) => "raft",
            AnyStore::Remote(_) => "raft-remote",
            #[cfg(feature = "nats")]
            AnyStore::Nats(_) => "nats",
            #[cfg(feature = "etcd")]
            AnyStore::Etcd(_) => "etcd",
        }
    }

    /// Flushes and closes what the store holds locally (the raft store's files).
    pub async fn shutdown(&self) {
        match self {
            AnyStore::Raft(s) => s.shutdown().await,
            AnyStore::Remote(_) => {}
            #[cfg(feature = "nats")]
            AnyStore::Nats(_) => {}
            #[cfg(feature = "etcd")]
            AnyStore::Etcd(_) => {}
        }
    }
}

/// A store's state as `/status` and `datasync status` show it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct StoreStatus {
    /// `raft` (embedded), `raft-remote`, `nats` or `etcd`.
    pub kind: String,
    /// This raft node's id (embedded).
    pub node_id: Option<u64>,
    /// The leader the embedded node knows of.
    pub leader: Option<u64>,
    /// Whether the embedded node serves clients (a member hearing a live leader).
    pub serving: Option<bool>,
    /// The raft term (embedded).
    pub term: Option<u64>,
    /// The revision of the applied state (embedded).
    pub revision: Option<u64>,
    /// The database file's size (embedded).
    pub db_bytes: Option<u64>,
    /// Watch registrations the store feeds (embedded).
    pub watches: Option<usize>,
    /// Why the store cannot serve, if it cannot (embedded).
    pub stopped: Option<String>,
    /// The raft cluster's members (raft stores).
    #[serde(default)]
    pub members: Vec<MemberStatus>,
    /// Why the members could not be read.
    pub error: Option<String>,
}

impl StoreStatus {
    /// Whether the store can serve: the embedded one runs, hears a live leader and is
    /// a member; a store this process does not run, always (its watch says more).
    pub fn can_serve(&self) -> bool {
        self.stopped.is_none()
            && (self.kind != "raft" || (self.leader.is_some() && self.serving == Some(true)))
    }
}

/// One raft member.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MemberStatus {
    /// Its node id.
    pub id: u64,
    /// Its cluster address.
    pub addr: String,
    /// `voter` or `learner`.
    pub role: String,
}

/// The NATS and etcd clients' counters, read at scrape time.
#[derive(Debug)]
struct ClientMetrics(AnyStore);

impl prometheus_client::collector::Collector for ClientMetrics {
    fn encode(
        &self,
        #[allow(unused_mut, unused_variables)]
        mut e: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        #[allow(unused_variables)]
        let counter = |e: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
                       name: &str,
                       help: &str,
                       n: u64|
         -> Result<(), std::fmt::Error> {
            use prometheus_client::encoding::EncodeMetric;
            let c = prometheus_client::metrics::counter::ConstCounter::new(n);
            c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
        };
        match &self.0 {
            #[cfg(feature = "nats")]
            AnyStore::Nats(s) => {
                use std::sync::atomic::Ordering::Relaxed;
                let st = s.client().statistics();
                counter(
                    &mut e,
                    "datasync_nats_connects",
                    "Connections made to a NATS server: the first, then each reconnect.",
                    st.connects.load(Relaxed),
                )?;
                counter(
                    &mut e,
                    "datasync_nats_in_bytes",
                    "Payload bytes received from NATS.",
                    st.in_bytes.load(Relaxed),
                )?;
                counter(
                    &mut e,
                    "datasync_nats_out_bytes",
                    "Payload bytes sent to NATS.",
                    st.out_bytes.load(Relaxed),
                )?;
            }
            #[cfg(feature = "etcd")]
            AnyStore::Etcd(s) => {
                counter(
                    &mut e,
                    "datasync_etcd_watch_streams_opened",
                    "Watch streams opened on etcd: one per watch, one more after each loss.",
                    s.watch_streams_opened(),
                )?;
                counter(
                    &mut e,
                    "datasync_etcd_leases_granted",
                    "Leases granted for TTL puts.",
                    s.leases_granted(),
                )?;
            }
            _ => {}
        }
        Ok(())
    }
}
