//! datasync-agent: the runtime that runs an agent's plugins.
//!
//! An agent binary links its plugin crates (each registers itself with
//! `datasync::register_plugin!`; a crate nothing references is not linked, so the binary
//! names each one: `use my_plugin as _;`), reads its [`AgentConfig`], and runs:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use datasync_agent::{Agent, AgentConfig};
//!
//! let config = AgentConfig::load(Some("agent.toml".as_ref()))?; // plus DATASYNC__… overrides
//! let agent = Agent::start(config).await?; // the embedded raft store in ./data by default
//! agent.ready().await; // every plugin took its first resync
//! agent.run_until_signal().await?; // SIGINT / SIGTERM: graceful shutdown
//! # Ok(()) }
//! ```
//!
//! What it does: opens the store the config names ([`AnyStore`]: the embedded raft
//! store, NATS, or etcd with the `etcd` feature); hands every plugin factory a
//! `PluginContext` (a writer on the store and the plugin's `[plugins.<name>]` settings);
//! runs the resync coordinator over all of them in dependency order; serves `/healthz`
//! (503 once the store or the coordinator stopped for good), `/readyz` (200 while the
//! store has a leader, the coordinator follows every source and every plugin is
//! `Ready`), `/status` (JSON: the store, and per plugin state, revision, counts, last
//! error), `/metrics` (Prometheus text by `prometheus-client`: the store's, the
//! coordinator's) and `POST /resync` if `[http] listen` is set; and on shutdown stops
//! feeding plugins, closes the watch and closes the store. [`agent_status`] and
//! [`request_resync`] are that endpoint's client side (`datasync status`, `resync`).

mod config;
mod etcd_api;
mod http;
mod metered;
mod ops;
mod runtime;
mod secure;
mod store;
mod store_url;

pub use config::{
    AgentConfig, ClusterSettings, ConfigError, CoordinatorSettings, EtcdApiSettings, HttpConfig,
    RaftTuning, StoreConfig,
};
pub use etcd_api::{EtcdApiServing, serve_etcd_api};
pub use http::{ErrorBody, PluginBody, SourceBody, StatusBody};
pub use ops::{agent_status, request_resync, status_text, store_text};
pub use runtime::Agent;
pub use secure::{AuthSettings, TlsSettings};
pub use store::{AnyStore, MemberStatus, StoreStatus};

/// Serves the status endpoint (`/healthz`, `/readyz`, `/status`, `/metrics`) of a
/// store alone, as `datasync serve --http` does, until the returned handle is stopped.
pub async fn serve_store_http(
    addr: std::net::SocketAddr,
    store: AnyStore,
) -> Result<StoreHttp, AgentError> {
    let h = runtime::serve(addr, http::Endpoint::new(store, None, None)).await?;
    Ok(StoreHttp(h))
}

/// A store's running status endpoint ([`serve_store_http`]).
#[derive(Debug)]
pub struct StoreHttp(runtime::Http);

impl StoreHttp {
    /// Where it listens.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.0.addr
    }

    /// Stops serving.
    pub async fn stop(self) {
        self.0.stop().await
    }
}

/// The agent could not start or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The embedded raft store could not be opened.
    #[error("cannot open the embedded raft store")]
    Raft(#[from] datasync_raft::OpenError),
    /// Another process holds the embedded store and does not serve it to others (it
    /// runs without a local endpoint, or is starting or stopping).
    #[error("the store in {} is held by another process, which does not serve it to others ({reason})", dir.display())]
    HeldElsewhere {
        /// The data directory.
        dir: std::path::PathBuf,
        /// Why its local endpoint could not be used.
        reason: String,
    },
    /// A file of `[store.tls]` or `[store.auth]` could not be read.
    #[error("cannot read {}", path.display())]
    CredentialFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The store could not be reached.
    #[error("cannot connect to the store")]
    Store(#[from] datasync::StoreError),
    /// The cluster secret could not be read or is too short.
    #[error("unusable cluster secret")]
    Secret(#[from] datasync_raft::SecretError),
    /// The raft cluster could not be reached as a remote client.
    #[error("cannot reach the raft cluster")]
    Cluster(#[from] datasync_raft::ClusterError),
    /// Membership was asked of a store that is no raft cluster.
    #[error("membership is a raft cluster's: this store is NATS or etcd")]
    NotClustered,
    /// This build has no support for the configured store.
    #[error("this agent was built without the {0} transport (enable the cargo feature `{0}`)")]
    NotBuiltIn(&'static str),
    /// The plugins cannot run (duplicates, missing dependencies, cycles) or the
    /// coordinator could not watch the store.
    #[error(transparent)]
    Coordinator(#[from] datasync::coordinator::CoordinatorError),
    /// The etcd API could not listen.
    #[error("cannot serve the etcd API on {addr}")]
    EtcdApi {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why (it cannot listen, or a TLS file is unreadable or unusable).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The status endpoint could not listen.
    #[error("cannot serve HTTP on {addr}")]
    Http {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The coordinator stopped by itself: the store's watch ended or failed for good.
    #[error("the agent stopped following the store: {0}")]
    Stopped(String),
    /// Signal handlers could not be installed.
    #[error("cannot wait for signals")]
    Signal(#[source] std::io::Error),
    /// A backup could not be made, read or restored.
    #[error(transparent)]
    Backup(#[from] datasync_raft::backup::BackupError),
    /// A backup was asked of a store that is not the raft store.
    #[error("backups are the raft store's: back up {0} with its own tools (see the README)")]
    NoBackup(&'static str),
    /// A running agent's status endpoint could not be asked, or refused.
    #[error("agent at {url}: {reason}")]
    Endpoint {
        /// The endpoint's URL.
        url: String,
        /// What went wrong (its answer, when it answered).
        reason: String,
    },
}
