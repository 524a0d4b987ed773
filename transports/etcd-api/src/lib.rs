//! The etcd v3 gRPC API on datasync's built-in raft store, so `etcdctl` and etcd
//! clients in any language work against an agent with nothing else to run.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use datasync_raft::{RaftConfig, RaftStore};
//!
//! let store = RaftStore::open(RaftConfig::new("./data")).await?;
//! let api = datasync_etcd_api::EtcdApi::new(store.clone())
//!     .bind("127.0.0.1:2379".parse()?)
//!     .await?;
//! // etcdctl --endpoints 127.0.0.1:2379 put a 1
//! api.stop().await;
//! store.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # What it serves
//! - **KV**: Range (limit, count and keys only, revision, sort, filters, `range_end`
//!   and the `\0` "from key" form), Put and DeleteRange (with previous records), Txn
//!   (compares on value, version, create and mod revision and lease over a key or a range; put,
//!   delete-range and range in either branch, all at one revision), Compact (replicated
//!   to every member). Each write is one store transaction, so previous records are
//!   exactly what it replaced.
//! - **Watch**: many watches on one stream, from now or from a revision the store still
//!   holds in its history (else cancelled with `compact_revision`, as etcd does), with
//!   previous records, `NOPUT`/`NODELETE` filters, progress requests and notifications.
//! - **Lease**: Grant (a chosen or random id), Revoke, KeepAlive, TimeToLive (with
//!   keys), Leases, on the store's lease objects; puts attach keys to them.
//! - **Maintenance**: Status, AlarmList (empty), Hash and HashKV (the store's own
//!   hashes), Snapshot (the store's backup, ending in its SHA-256 as etcd's does).
//! - **Cluster**: MemberList, MemberAdd (the member need not run yet), MemberPromote
//!   (once the learner is in sync), MemberRemove.
//!
//! Not yet: Defragment, MoveLeader, authentication; they answer
//! `Unimplemented` with a message naming what to use instead. Keys are UTF-8 text
//! valid as `datasync` keys (the store's rule), values any bytes.
//!
//! Why the endpoint maps onto the store's own records and transactions rather than its
//! `datasync` `Writer`: etcd's answers carry create revisions, versions and previous
//! records of the write itself, which only the state machine knows at apply time.

mod convert;
mod kv;
mod lease;
mod maintenance;
mod watch;

use std::net::SocketAddr;

use datasync_raft::RaftStore;
use etcd_client::proto::{
    PbClusterServer, PbKvServer, PbLeaseServer, PbMaintenanceServer, PbWatchServer,
};
use tokio_util::sync::CancellationToken;

/// Largest request the endpoint decodes beyond the store's value limit (keys, the
/// message's framing, a txn's compares).
const REQUEST_SLACK: usize = 1 << 20;

/// The etcd API over one store.
#[derive(Debug, Clone)]
pub struct EtcdApi {
    store: RaftStore,
    tls: Option<Tls>,
}

/// TLS for the endpoint, in PEM: the server's certificate chain and key, and the CA
/// whose certificates clients must present (none: any client that trusts the
/// server's certificate gets in).
///
/// Why a client CA and nothing finer: a certificate the CA signed is the whole
/// credential (etcd's `--client-cert-auth` without users and roles, which the built-in
/// store does not have).
#[derive(Clone)]
pub struct Tls {
    /// The server's certificate chain.
    pub cert: Vec<u8>,
    /// Its private key.
    pub key: Vec<u8>,
    /// The CA that signs the certificates clients must present.
    pub client_ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("client_ca", &self.client_ca.is_some())
            .finish_non_exhaustive()
    }
}

/// The endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// The address could not be listened on.
    #[error("cannot listen")]
    Listen(#[from] std::io::Error),
    /// The certificate, key or client CA is not usable.
    #[error("the TLS certificate, key or client CA is not usable")]
    Tls(#[source] tonic::transport::Error),
}

/// A running endpoint; [`stop`](Self::stop) it (dropping it stops it too).
#[derive(Debug)]
pub struct Serving {
    addr: SocketAddr,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl EtcdApi {
    /// The API over `store` (a single node or a cluster member: on a follower writes
    /// are forwarded to the leader and reads are linearizable through it).
    pub fn new(store: RaftStore) -> EtcdApi {
        EtcdApi { store, tls: None }
    }

    /// Serves over TLS (clients connect to `https://`), checking clients' certificates
    /// against `tls.client_ca` when given.
    #[must_use]
    pub fn tls(mut self, tls: Tls) -> EtcdApi {
        self.tls = Some(tls);
        self
    }

    /// Listens on `addr` (port 0 picks one; see [`Serving::addr`]) and serves until
    /// stopped.
    pub async fn bind(self, addr: SocketAddr) -> Result<Serving, BindError> {
        let mut server = tonic::transport::Server::builder();
        let scheme = if let Some(tls) = &self.tls {
            // A client that never finishes its handshake must not hold a task forever.
            let mut config = tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(&tls.cert, &tls.key))
                .timeout(std::time::Duration::from_secs(10));
            if let Some(ca) = &tls.client_ca {
                config = config.client_ca_root(tonic::transport::Certificate::from_pem(ca));
            }
            server = server.tls_config(config).map_err(BindError::Tls)?;
            "https"
        } else {
            "http"
        };
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let max = datasync::Writer::limits(&self.store).max_value_size + REQUEST_SLACK;
        let store = self.store;
        let stop = CancellationToken::new();
        let kv = PbKvServer::new(kv::Kv {
            store: store.clone(),
        })
        .max_decoding_message_size(max)
        .max_encoding_message_size(usize::MAX);
        let watch = PbWatchServer::new(watch::Watch::new(store.clone(), stop.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(usize::MAX);
        let lease = PbLeaseServer::new(lease::Lease::new(store.clone(), stop.clone()));
        let maintenance = PbMaintenanceServer::new(maintenance::Maintenance {
            store: store.clone(),
        });
        let cluster = PbClusterServer::new(maintenance::Cluster {
            store,
            client_url: format!("{scheme}://{addr}"),
        });
        let stopped = stop.clone();
        let task = tokio::spawn(
            server
                .add_service(kv)
                .add_service(watch)
                .add_service(lease)
                .add_service(maintenance)
                .add_service(cluster)
                // With the listener handed over, tonic applies none of its socket
                // options: without TCP_NODELAY a watch event waited ~40 ms for the
                // client's delayed ACK (Nagle).
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async move { stopped.cancelled().await },
                ),
        );
        tracing::info!(%addr, "etcd API listening");
        Ok(Serving {
            addr,
            stop,
            task: Some(task),
        })
    }
}

impl Serving {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops listening and waits for the calls in progress to end (open watch streams
    /// end with the server).
    ///
    /// # Cancel safety
    /// Dropping the future leaves the server stopping in the background.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            match task.await {
                Ok(Err(e)) => tracing::warn!(error = %e, "the etcd API stopped with an error"),
                Err(e) => tracing::warn!(error = %e, "the etcd API's task failed"),
                Ok(Ok(())) => {}
            }
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
