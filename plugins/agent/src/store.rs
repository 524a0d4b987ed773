//! Opening the configured store.

use std::sync::Arc;

use datasync::{Watcher, Writer};
use datasync_raft::{RaftConfig, RaftStore};

use crate::{AgentError, StoreConfig};

/// The store an agent runs on.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum AnyStore {
    /// The embedded raft store.
    Raft(RaftStore),
    /// NATS JetStream Key-Value.
    #[cfg(feature = "nats")]
    Nats(datasync_nats::NatsStore),
    /// etcd v3.
    #[cfg(feature = "etcd")]
    Etcd(datasync_etcd::EtcdStore),
}

impl AnyStore {
    /// Opens (or connects to) the store `config` names.
    pub async fn open(config: &StoreConfig) -> Result<AnyStore, AgentError> {
        match config {
            StoreConfig::Raft { dir } => {
                Ok(AnyStore::Raft(RaftStore::open(RaftConfig::new(dir)).await?))
            }
            #[cfg(feature = "nats")]
            StoreConfig::Nats { servers, bucket } => {
                let c = datasync_nats::NatsConfig::new(servers.clone()).with_bucket(bucket);
                Ok(AnyStore::Nats(datasync_nats::NatsStore::connect(c).await?))
            }
            #[cfg(feature = "etcd")]
            StoreConfig::Etcd {
                endpoints,
                namespace,
            } => {
                let c = datasync_etcd::EtcdConfig::new(endpoints.clone()).with_namespace(namespace);
                Ok(AnyStore::Etcd(datasync_etcd::EtcdStore::connect(c).await?))
            }
            #[allow(unreachable_patterns)]
            other => Err(AgentError::NotBuiltIn(match other {
                StoreConfig::Nats { .. } => "nats",
                _ => "etcd",
            })),
        }
    }

    /// The store as a watcher.
    pub fn watcher(&self) -> &dyn Watcher {
        match self {
            AnyStore::Raft(s) => s,
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
            #[cfg(feature = "nats")]
            AnyStore::Nats(s) => Arc::new(s.clone()),
            #[cfg(feature = "etcd")]
            AnyStore::Etcd(s) => Arc::new(s.clone()),
        }
    }

    /// Flushes and closes what the store holds locally (the raft store's files).
    pub async fn shutdown(&self) {
        match self {
            AnyStore::Raft(s) => s.shutdown().await,
            #[cfg(feature = "nats")]
            AnyStore::Nats(_) => {}
            #[cfg(feature = "etcd")]
            AnyStore::Etcd(_) => {}
        }
    }
}
