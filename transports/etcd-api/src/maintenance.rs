//! etcd's Maintenance and Cluster services: status, alarms and the member list; what
//! the built-in store does not do yet answers `Unimplemented`, saying so.

use datasync::{Consistency, ReadOptions, Revision};
use datasync_raft::{ClusterError, KeyRange, RaftStore, Record, Refusal};
use etcd_client::proto::{
    PbAlarmRequest, PbAlarmResponse, PbClusterService, PbDefragmentRequest, PbDefragmentResponse,
    PbDowngradeRequest, PbDowngradeResponse, PbHashKvRequest, PbHashKvResponse, PbHashRequest,
    PbHashResponse, PbMaintenanceService, PbMember, PbMemberAddRequest, PbMemberAddResponse,
    PbMemberListRequest, PbMemberListResponse, PbMemberPromoteRequest, PbMemberPromoteResponse,
    PbMemberRemoveRequest, PbMemberRemoveResponse, PbMemberUpdateRequest, PbMemberUpdateResponse,
    PbMoveLeaderRequest, PbMoveLeaderResponse, PbSnapshotRequest, PbSnapshotResponse,
    PbStatusRequest, PbStatusResponse,
};
use tonic::{Request, Response, Status};

use crate::convert::{header, signed, status, unsigned};

/// The etcd API version this endpoint speaks (clients read it to pick features).
pub(crate) const API_VERSION: &str = "3.4.0";

fn not_yet(what: &str) -> Status {
    Status::unimplemented(format!(
        "etcdserver: {what} is not supported by the built-in store yet"
    ))
}

/// 64 bits folded to 32.
fn fold(h: u64) -> u32 {
    (h ^ (h >> 32)) as u32
}

/// FNV-1a over each record's key, value, revisions, version and lease, in key order.
fn records_hash(records: &[Record]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes.iter().chain(&(bytes.len() as u64).to_le_bytes()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for r in records {
        feed(r.key.as_str().as_bytes());
        feed(r.value.as_bytes());
        for n in [r.create_revision.0, r.mod_revision.0, r.version, r.lease] {
            feed(&n.to_le_bytes());
        }
    }
    h
}

/// The Maintenance service over one store.
#[derive(Debug, Clone)]
pub(crate) struct Maintenance {
    pub(crate) store: RaftStore,
}

#[tonic::async_trait]
impl PbMaintenanceService for Maintenance {
    async fn alarm(
        &self,
        request: Request<PbAlarmRequest>,
    ) -> Result<Response<PbAlarmResponse>, Status> {
        // GET lists alarms (the store raises none); DEACTIVATE of none is a no-op.
        match request.into_inner().action {
            0 | 2 => Ok(Response::new(PbAlarmResponse {
                header: header(&self.store, self.store.revision().0),
                alarms: Vec::new(),
            })),
            _ => Err(not_yet("raising alarms")),
        }
    }

    async fn status(
        &self,
        _request: Request<PbStatusRequest>,
    ) -> Result<Response<PbStatusResponse>, Status> {
        let h = self.store.health();
        let mut errors = Vec::new();
        if let Some(why) = &h.stopped {
            errors.push(why.clone());
        } else if !h.serving {
            errors.push("etcdserver: no leader".to_owned());
        }
        Ok(Response::new(PbStatusResponse {
            header: header(&self.store, h.revision),
            version: API_VERSION.to_owned(),
            db_size: signed(h.db_bytes),
            leader: h.leader.unwrap_or(0),
            raft_index: h.last_log_index,
            raft_term: h.term,
            raft_applied_index: h.applied_index,
            errors,
            db_size_in_use: signed(h.db_bytes),
            is_learner: self
                .store
                .members()
                .learners
                .contains_key(&self.store.node_id()),
            ..PbStatusResponse::default()
        }))
    }

    async fn defragment(
        &self,
        _request: Request<PbDefragmentRequest>,
    ) -> Result<Response<PbDefragmentResponse>, Status> {
        Err(not_yet("defragment"))
    }

    /// The store's data hash (every key with its value, revisions and lease), folded
    /// to etcd's 32 bits: equal on members at the same revision.
    async fn hash(
        &self,
        _request: Request<PbHashRequest>,
    ) -> Result<Response<PbHashResponse>, Status> {
        let store = self.store.clone();
        // It waits for the writer and reads every key: off the async workers.
        let (revision, h) = tokio::task::spawn_blocking(move || {
            // The revision the hashed state is at: the same before and after the hash
            // (a write in between would pair a revision with another state).
            for _ in 0..8 {
                let revision = store.revision().0;
                let h = store.data_hash()?;
                if store.revision().0 == revision {
                    return Ok(Some((revision, h)));
                }
            }
            Ok(None)
        })
        .await
        .map_err(|e| Status::internal(format!("etcdserver: hash: {e}")))?
        .map_err(status)?
        .ok_or_else(|| {
            Status::unavailable("etcdserver: the store changed during each of 8 hashes; retry")
        })?;
        Ok(Response::new(PbHashResponse {
            header: header(&self.store, revision),
            hash: fold(h),
        }))
    }

    /// A hash of every record at a revision (0: the current one), as etcd's: equal on
    /// members at that revision, whatever else they hold.
    async fn hash_kv(
        &self,
        request: Request<PbHashKvRequest>,
    ) -> Result<Response<PbHashKvResponse>, Status> {
        let at = unsigned(request.into_inner().revision, "revision")?;
        let mut opts = ReadOptions::new().consistency(Consistency::Local);
        if at != 0 {
            opts = opts.at(Revision(at));
        }
        let (revision, records) = self
            .store
            .range(&KeyRange::from(String::new()), opts)
            .await
            .map_err(status)?;
        Ok(Response::new(PbHashKvResponse {
            header: header(&self.store, revision.0),
            hash: fold(records_hash(&records)),
            compact_revision: signed(self.store.compacted_revision().0),
            hash_revision: signed(revision.0),
        }))
    }

    type SnapshotStream = std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<PbSnapshotResponse, Status>> + Send>,
    >;

    /// The store's backup (`datasync snapshot status/restore` read it), in 32 KiB
    /// pieces. Like etcd's, the stream ends in the SHA-256 of what came before: the
    /// backup's own checksum.
    async fn snapshot(
        &self,
        _request: Request<PbSnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        const PIECE: usize = 32 << 10;
        let backup = std::sync::Arc::new(self.store.backup().await.map_err(status)?);
        let header = header(&self.store, self.store.revision().0);
        // Each piece is copied out as it is sent, not all at once.
        let pieces = (0..backup.len().div_ceil(PIECE)).map(move |i| {
            let piece = &backup[i * PIECE..backup.len().min((i + 1) * PIECE)];
            Ok(PbSnapshotResponse {
                header,
                remaining_bytes: (backup.len() - i * PIECE - piece.len()) as u64,
                blob: piece.to_vec(),
                ..PbSnapshotResponse::default()
            })
        });
        Ok(Response::new(Box::pin(futures_util::stream::iter(pieces))))
    }

    async fn move_leader(
        &self,
        _request: Request<PbMoveLeaderRequest>,
    ) -> Result<Response<PbMoveLeaderResponse>, Status> {
        Err(not_yet("move_leader"))
    }

    async fn downgrade(
        &self,
        _request: Request<PbDowngradeRequest>,
    ) -> Result<Response<PbDowngradeResponse>, Status> {
        Err(not_yet("downgrade"))
    }
}

/// The Cluster service over one store.
#[derive(Debug, Clone)]
pub(crate) struct Cluster {
    pub(crate) store: RaftStore,
    /// This endpoint's URL, this member's only client URL known here.
    pub(crate) client_url: String,
}

impl Cluster {
    fn members(&self) -> Vec<PbMember> {
        let m = self.store.members();
        let me = self.store.node_id();
        let member = |(id, addr): (&u64, &String), learner: bool| PbMember {
            id: *id,
            name: format!("node-{id}"),
            peer_ur_ls: vec![format!("raft://{addr}")],
            client_ur_ls: if *id == me {
                vec![self.client_url.clone()]
            } else {
                Vec::new()
            },
            is_learner: learner,
        };
        let mut members: Vec<PbMember> = m.voters.iter().map(|v| member(v, false)).collect();
        members.extend(m.learners.iter().map(|l| member(l, true)));
        members
    }
}

/// A member's peer URL as the store's address: the `host:port` of an `http` or
/// `https` URL with nothing else in it (the schemes etcdctl accepts; the members speak
/// their own protocol at that address).
fn peer_addr(urls: &[String]) -> Result<String, Status> {
    let bad = || Status::invalid_argument("etcdserver: given member URLs are invalid");
    let [url] = urls else {
        return Err(Status::invalid_argument(
            "etcdserver: a member of the built-in store has exactly one peer URL",
        ));
    };
    let u = url::Url::parse(url).map_err(|_| bad())?;
    let plain = matches!(u.scheme(), "http" | "https")
        && u.username().is_empty()
        && u.password().is_none()
        && matches!(u.path(), "" | "/")
        && u.query().is_none()
        && u.fragment().is_none();
    match (plain, u.host_str(), u.port_or_known_default()) {
        (true, Some(host), Some(port)) => Ok(format!("{host}:{port}")),
        _ => Err(bad()),
    }
}

/// How long a membership change may take before the call fails (the change may still
/// commit later: a group without a quorum commits nothing until it has one).
const CHANGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

async fn within<T>(
    change: impl std::future::Future<Output = Result<T, ClusterError>>,
) -> Result<T, Status> {
    match tokio::time::timeout(CHANGE_TIMEOUT, change).await {
        Ok(done) => done.map_err(cluster_status),
        Err(_) => Err(Status::unavailable(format!(
            "etcdserver: the membership change was not committed within {CHANGE_TIMEOUT:?} \
             (no quorum?)"
        ))),
    }
}

/// A membership change's failure as etcd's status.
fn cluster_status(e: ClusterError) -> Status {
    match e {
        ClusterError::Refused(Refusal::AlreadyMember(_)) => {
            Status::failed_precondition("etcdserver: member ID already exist")
        }
        ClusterError::Refused(Refusal::AddressInUse(_)) => {
            Status::failed_precondition("etcdserver: Peer URLs already exists")
        }
        ClusterError::Refused(Refusal::NotAMember(_)) => {
            Status::not_found("etcdserver: member not found")
        }
        ClusterError::Refused(Refusal::AlreadyVoter(_)) => {
            Status::failed_precondition("etcdserver: can only promote a learner member")
        }
        ClusterError::Refused(Refusal::NotInSync { .. }) => Status::failed_precondition(
            "etcdserver: can only promote a learner member which is in sync with leader",
        ),
        ClusterError::Refused(r @ (Refusal::VoterMove(_) | Refusal::BadAddress)) => {
            Status::failed_precondition(format!("etcdserver: {r}"))
        }
        ClusterError::Refused(r @ Refusal::NoVoterLeft) => {
            Status::failed_precondition(format!("etcdserver: {r}"))
        }
        ClusterError::NotClustered => Status::failed_precondition(
            "etcdserver: this store is a single node, not a cluster (start it as a cluster \
             member to change members)",
        ),
        ClusterError::Left => Status::failed_precondition(format!("etcdserver: {e}")),
        e => Status::unavailable(format!("etcdserver: {e}")),
    }
}

#[tonic::async_trait]
impl PbClusterService for Cluster {
    async fn member_add(
        &self,
        request: Request<PbMemberAddRequest>,
    ) -> Result<Response<PbMemberAddResponse>, Status> {
        let r = request.into_inner();
        let addr = peer_addr(&r.peer_ur_ls)?;
        // An address in use is refused by the leader (`Refusal::AddressInUse`).
        let now = self.store.members();
        // Random, as etcd's: an id is never given twice, so a removed member that
        // still runs is never taken for a new one.
        let id = loop {
            let id = fastrand::u64(1..=i64::MAX as u64);
            if now.role(id).is_none() {
                break id;
            }
        };
        within(self.store.register_member(id, &addr)).await?;
        Ok(Response::new(PbMemberAddResponse {
            header: header(&self.store, self.store.revision().0),
            // A learner until it runs and catches up, even when a voter was asked for.
            member: Some(PbMember {
                id,
                name: String::new(),
                peer_ur_ls: r.peer_ur_ls,
                client_ur_ls: Vec::new(),
                is_learner: true,
            }),
            members: self.members(),
        }))
    }

    async fn member_remove(
        &self,
        request: Request<PbMemberRemoveRequest>,
    ) -> Result<Response<PbMemberRemoveResponse>, Status> {
        let id = request.into_inner().id;
        if self.store.members().role(id).is_none() {
            return Err(Status::not_found("etcdserver: member not found"));
        }
        within(self.store.remove_member(id)).await?;
        Ok(Response::new(PbMemberRemoveResponse {
            header: header(&self.store, self.store.revision().0),
            members: self.members(),
        }))
    }

    async fn member_update(
        &self,
        request: Request<PbMemberUpdateRequest>,
    ) -> Result<Response<PbMemberUpdateResponse>, Status> {
        let r = request.into_inner();
        let addr = peer_addr(&r.peer_ur_ls)?;
        within(self.store.update_member(r.id, &addr)).await?;
        Ok(Response::new(PbMemberUpdateResponse {
            header: header(&self.store, self.store.revision().0),
            members: self.members(),
        }))
    }

    async fn member_list(
        &self,
        _request: Request<PbMemberListRequest>,
    ) -> Result<Response<PbMemberListResponse>, Status> {
        Ok(Response::new(PbMemberListResponse {
            header: header(&self.store, self.store.revision().0),
            members: self.members(),
        }))
    }

    async fn member_promote(
        &self,
        request: Request<PbMemberPromoteRequest>,
    ) -> Result<Response<PbMemberPromoteResponse>, Status> {
        let id = request.into_inner().id;
        within(self.store.promote_member(id)).await?;
        Ok(Response::new(PbMemberPromoteResponse {
            header: header(&self.store, self.store.revision().0),
            members: self.members(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_urls_are_plain_http_addresses() {
        let one = |u: &str| peer_addr(&[u.to_owned()]).ok();
        assert_eq!(
            one("http://127.0.0.1:2380").as_deref(),
            Some("127.0.0.1:2380")
        );
        assert_eq!(one("https://node5:443/").as_deref(), Some("node5:443"));
        assert_eq!(one("http://10.0.0.5:80").as_deref(), Some("10.0.0.5:80"));
        assert_eq!(one("http://[::1]:7").as_deref(), Some("[::1]:7"));
        for bad in [
            "raft://h:1",
            "http://user@h:1",
            "http://h:1/path",
            "http://h:1?q",
            "h:1",
            "http://:1",
            "",
        ] {
            assert_eq!(one(bad), None, "{bad:?}");
        }
        assert!(peer_addr(&[]).is_err());
        assert!(peer_addr(&["http://a:1".into(), "http://b:1".into()]).is_err());
    }
}
