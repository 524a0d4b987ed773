//! etcd's Maintenance and Cluster services: status, alarms and the member list; what
//! the built-in store does not do yet answers `Unimplemented`, saying so.

use datasync_raft::RaftStore;
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

use crate::convert::{header, signed};

/// The etcd API version this endpoint speaks (clients read it to pick features).
pub(crate) const API_VERSION: &str = "3.4.0";

fn not_yet(what: &str) -> Status {
    Status::unimplemented(format!(
        "etcdserver: {what} is not supported by the built-in store yet"
    ))
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

    async fn hash(
        &self,
        _request: Request<PbHashRequest>,
    ) -> Result<Response<PbHashResponse>, Status> {
        Err(not_yet("hash"))
    }

    async fn hash_kv(
        &self,
        _request: Request<PbHashKvRequest>,
    ) -> Result<Response<PbHashKvResponse>, Status> {
        Err(not_yet("hash_kv"))
    }

    type SnapshotStream = futures_util::stream::Empty<Result<PbSnapshotResponse, Status>>;

    async fn snapshot(
        &self,
        _request: Request<PbSnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        Err(not_yet("snapshot (use `datasync snapshot save`)"))
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

#[tonic::async_trait]
impl PbClusterService for Cluster {
    async fn member_add(
        &self,
        _request: Request<PbMemberAddRequest>,
    ) -> Result<Response<PbMemberAddResponse>, Status> {
        Err(not_yet("member add (use `datasync serve --join`)"))
    }

    async fn member_remove(
        &self,
        _request: Request<PbMemberRemoveRequest>,
    ) -> Result<Response<PbMemberRemoveResponse>, Status> {
        Err(not_yet("member remove (use `datasync member remove`)"))
    }

    async fn member_update(
        &self,
        _request: Request<PbMemberUpdateRequest>,
    ) -> Result<Response<PbMemberUpdateResponse>, Status> {
        Err(not_yet("member update"))
    }

    async fn member_list(
        &self,
        _request: Request<PbMemberListRequest>,
    ) -> Result<Response<PbMemberListResponse>, Status> {
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
        Ok(Response::new(PbMemberListResponse {
            header: header(&self.store, self.store.revision().0),
            members,
        }))
    }

    async fn member_promote(
        &self,
        _request: Request<PbMemberPromoteRequest>,
    ) -> Result<Response<PbMemberPromoteResponse>, Status> {
        Err(not_yet("member promote"))
    }
}
