//! etcd's Maintenance and Cluster services: status, alarms and the member list; what
//! the built-in store does not do yet answers `Unimplemented`, saying so.

use datasync::{Consistency, ReadOptions, Revision};
use datasync_raft::{ClusterError, KeyRange, RaftStore, Record, Refusal, Role};
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

    /// The store's state hash (keys, values, revisions, leases, client sessions),
    /// folded to etcd's 32 bits: equal on members that applied the same log.
    async fn hash(
        &self,
        _request: Request<PbHashRequest>,
    ) -> Result<Response<PbHashResponse>, Status> {
        let revision = self.store.revision().0;
        let h = self.store.state_hash().map_err(status)?;
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

    type SnapshotStream =
        futures_util::stream::Iter<std::vec::IntoIter<Result<PbSnapshotResponse, Status>>>;

    /// The store's backup (`datasync snapshot status/restore` read it), in 32 KiB
    /// pieces. Like etcd's, the stream ends in the SHA-256 of what came before: the
    /// backup's own checksum.
    async fn snapshot(
        &self,
        _request: Request<PbSnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        const PIECE: usize = 32 << 10;
        let backup = self.store.backup().await.map_err(status)?;
        let header = header(&self.store, self.store.revision().0);
        let mut left = backup.len();
        let pieces: Vec<_> = backup
            .chunks(PIECE)
            .map(|piece| {
                left -= piece.len();
                Ok(PbSnapshotResponse {
                    header,
                    remaining_bytes: left as u64,
                    blob: piece.to_vec(),
                    ..PbSnapshotResponse::default()
                })
            })
            .collect();
        Ok(Response::new(futures_util::stream::iter(pieces)))
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

/// A member's peer URL as the store's address: `host:port` after any scheme
/// (etcdctl sends `http://host:port`; the members speak their own protocol there).
fn peer_addr(urls: &[String]) -> Result<String, Status> {
    let bad = || Status::invalid_argument("etcdserver: given member URLs are invalid");
    let [url] = urls else {
        return Err(Status::invalid_argument(
            "etcdserver: a member of the built-in store has exactly one peer URL",
        ));
    };
    let addr = url.split_once("://").map_or(url.as_str(), |(_, a)| a);
    let addr = addr.trim_end_matches('/');
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(addr.to_owned())
        }
        _ => Err(bad()),
    }
}

/// A membership change's failure as etcd's status.
fn cluster_status(e: ClusterError) -> Status {
    match e {
        ClusterError::Refused(Refusal::AlreadyMember(_)) => {
            Status::failed_precondition("etcdserver: member ID already exist")
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
        let now = self.store.members();
        if now
            .voters
            .values()
            .chain(now.learners.values())
            .any(|a| *a == addr)
        {
            return Err(Status::failed_precondition(
                "etcdserver: Peer URLs already exists",
            ));
        }
        // The next id after the members': short enough to type as `--node-id`.
        let id = now
            .voters
            .keys()
            .chain(now.learners.keys())
            .max()
            .map_or(1, |m| m.saturating_add(1));
        let role = if r.is_learner {
            Role::Learner
        } else {
            Role::Voter
        };
        self.store
            .register_member(id, &addr, role)
            .await
            .map_err(cluster_status)?;
        Ok(Response::new(PbMemberAddResponse {
            header: header(&self.store, self.store.revision().0),
            member: Some(PbMember {
                id,
                name: String::new(),
                peer_ur_ls: r.peer_ur_ls,
                client_ur_ls: Vec::new(),
                is_learner: r.is_learner,
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
        self.store.remove_member(id).await.map_err(cluster_status)?;
        Ok(Response::new(PbMemberRemoveResponse {
            header: header(&self.store, self.store.revision().0),
            members: self.members(),
        }))
    }

    async fn member_update(
        &self,
        _request: Request<PbMemberUpdateRequest>,
    ) -> Result<Response<PbMemberUpdateResponse>, Status> {
        Err(not_yet(
            "member update (a member's address is set when it is added)",
        ))
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
        self.store
            .promote_member(id)
            .await
            .map_err(cluster_status)?;
        Ok(Response::new(PbMemberPromoteResponse {
            header: header(&self.store, self.store.revision().0),
            members: self.members(),
        }))
    }
}
