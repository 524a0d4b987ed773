//! etcd's Lease service on the store's lease objects: grant, revoke, keep-alive,
//! time-to-live and list.

use std::time::Duration;

use datasync_raft::RaftStore;
use datasync_raft::records::{MAX_LEASE_ID, MAX_LEASE_TTL};
use etcd_client::proto::{
    PbLeaseGrantRequest, PbLeaseGrantResponse, PbLeaseKeepAliveRequest, PbLeaseKeepAliveResponse,
    PbLeaseLeasesRequest, PbLeaseLeasesResponse, PbLeaseRevokeRequest, PbLeaseRevokeResponse,
    PbLeaseService, PbLeaseStatus, PbLeaseTimeToLiveRequest, PbLeaseTimeToLiveResponse,
};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::convert::{header, signed, status};

/// The shortest lease granted (etcd's default minimum, from its election timeout):
/// a shorter TTL asked for gets this.
const MIN_TTL_SECS: i64 = 2;
/// How often a grant with no id retries a random one that was taken.
const ID_TRIES: usize = 8;

/// The Lease service over one store.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    store: RaftStore,
    /// Ends keep-alive streams when the endpoint stops.
    stop: CancellationToken,
}

impl Lease {
    pub(crate) fn new(store: RaftStore, stop: CancellationToken) -> Lease {
        Lease { store, stop }
    }
}

fn not_found() -> Status {
    Status::not_found("etcdserver: requested lease not found")
}

/// A lease id from the wire: positive and within the store's ids.
fn lease_id(id: i64) -> Result<u64, Status> {
    u64::try_from(id)
        .ok()
        .filter(|id| (1..=MAX_LEASE_ID).contains(id))
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "etcdserver: lease id {id} is not between 1 and 2^62 - 1"
            ))
        })
}

#[tonic::async_trait]
impl PbLeaseService for Lease {
    async fn lease_grant(
        &self,
        request: Request<PbLeaseGrantRequest>,
    ) -> Result<Response<PbLeaseGrantResponse>, Status> {
        let r = request.into_inner();
        let secs = r.ttl.max(MIN_TTL_SECS);
        let ttl = Duration::from_secs(secs.unsigned_abs());
        if ttl > MAX_LEASE_TTL {
            return Err(Status::out_of_range("etcdserver: too large lease TTL"));
        }
        let chosen = r.id != 0;
        let mut granted = None;
        for _ in 0..if chosen { 1 } else { ID_TRIES } {
            let id = if chosen {
                lease_id(r.id)?
            } else {
                fastrand::u64(1..=MAX_LEASE_ID)
            };
            if self.store.lease_grant(id, ttl).await.map_err(status)? {
                granted = Some(id);
                break;
            }
        }
        let Some(id) = granted else {
            return Err(Status::failed_precondition(
                "etcdserver: lease already exists",
            ));
        };
        Ok(Response::new(PbLeaseGrantResponse {
            header: header(&self.store, self.store.revision().0),
            id: signed(id),
            ttl: secs,
            error: String::new(),
        }))
    }

    async fn lease_revoke(
        &self,
        request: Request<PbLeaseRevokeRequest>,
    ) -> Result<Response<PbLeaseRevokeResponse>, Status> {
        let id = lease_id(request.into_inner().id)?;
        let (_, revision) = self
            .store
            .lease_revoke(id)
            .await
            .map_err(status)?
            .ok_or_else(not_found)?;
        Ok(Response::new(PbLeaseRevokeResponse {
            header: header(&self.store, revision.0),
        }))
    }

    type LeaseKeepAliveStream = ReceiverStream<Result<PbLeaseKeepAliveResponse, Status>>;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<PbLeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let (store, stop) = (self.store.clone(), self.stop.clone());
        tokio::spawn(async move {
            loop {
                let req = tokio::select! {
                    () = stop.cancelled() => return,
                    req = incoming.next() => req,
                };
                let Some(Ok(req)) = req else { return };
                // An id that cannot exist here is not found, as etcd answers: TTL 0.
                let ttl = match lease_id(req.id) {
                    Err(_) => Ok(None),
                    Ok(id) => store.lease_keep_alive(id).await,
                };
                let resp = ttl.map_err(status).map(|ttl| PbLeaseKeepAliveResponse {
                    header: header(&store, store.revision().0),
                    id: req.id,
                    ttl: ttl.map_or(0, |t| signed(t.as_secs())),
                });
                if tx.send(resp).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<PbLeaseTimeToLiveRequest>,
    ) -> Result<Response<PbLeaseTimeToLiveResponse>, Status> {
        let r = request.into_inner();
        let found = lease_id(r.id)
            .ok()
            .and_then(|id| self.store.lease_time_to_live(id));
        let resp = match found {
            // etcd answers an unknown lease with TTL -1, not an error.
            None => PbLeaseTimeToLiveResponse {
                header: header(&self.store, self.store.revision().0),
                id: r.id,
                ttl: -1,
                ..PbLeaseTimeToLiveResponse::default()
            },
            Some((ttl, left, keys)) => PbLeaseTimeToLiveResponse {
                header: header(&self.store, self.store.revision().0),
                id: r.id,
                ttl: signed(left.as_secs()),
                granted_ttl: signed(ttl.as_secs()),
                keys: if r.keys {
                    keys.iter()
                        .map(|k| k.as_str().as_bytes().to_vec())
                        .collect()
                } else {
                    Vec::new()
                },
            },
        };
        Ok(Response::new(resp))
    }

    async fn lease_leases(
        &self,
        _request: Request<PbLeaseLeasesRequest>,
    ) -> Result<Response<PbLeaseLeasesResponse>, Status> {
        Ok(Response::new(PbLeaseLeasesResponse {
            header: header(&self.store, self.store.revision().0),
            leases: self
                .store
                .leases()
                .into_iter()
                .map(|id| PbLeaseStatus { id: signed(id) })
                .collect(),
        }))
    }
}
