//! openraft's network over the authenticated connections of [`Pool`].

use std::time::Duration;

use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use super::client::{Client, Pool};
use super::error::NetError;
use super::wire::{Reply, Request};
use crate::types::{NodeId, TypeConfig};

/// An append larger than this (encoded) is refused with `PayloadTooLarge`, and openraft
/// retries with fewer entries.
const APPEND_LIMIT: u64 = 16 << 20;

/// The raft network of a cluster member.
#[derive(Debug, Clone)]
pub(crate) struct TcpNetwork {
    pub(crate) pool: Pool,
    /// Counts snapshots sent in full.
    pub(crate) snapshots_sent: prometheus_client::metrics::counter::Counter,
}

impl RaftNetworkFactory<TypeConfig> for TcpNetwork {
    type Network = Peer;
    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            target,
            client: self.pool.get(&node.addr),
            snapshots_sent: self.snapshots_sent.clone(),
        }
    }
}

/// One peer, as openraft's replication and election see it.
#[derive(Debug)]
pub(crate) struct Peer {
    target: NodeId,
    client: Client,
    snapshots_sent: prometheus_client::metrics::counter::Counter,
}

#[derive(Debug, thiserror::Error)]
#[error("unexpected reply to {0}")]
struct Unexpected(&'static str);

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl Peer {
    /// One call: `pick` takes the answer out of the reply (`None`: the wrong kind).
    async fn call<T, E: std::error::Error>(
        &self,
        req: Request,
        option: &RPCOption,
        what: &'static str,
        pick: impl FnOnce(Reply) -> Option<Result<T, E>>,
    ) -> Result<T, RPCError<NodeId, BasicNode, E>> {
        match self.client.call(req, option.hard_ttl()).await {
            Ok(reply) => match pick(reply) {
                Some(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
                None => Err(RPCError::Network(NetworkError::new(&Unexpected(what)))),
            },
            Err(e @ (NetError::Decode(_) | NetError::BadFrame)) => {
                Err(RPCError::Network(NetworkError::new(&e)))
            }
            // A peer that is down, cut off or restarting: openraft backs off instead of
            // retrying at once.
            Err(e) => Err(RPCError::Unreachable(Unreachable::new(&e))),
        }
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        if rpc.entries.len() > 1 && bincode::serialized_size(&rpc).unwrap_or(0) > APPEND_LIMIT {
            let hint = (rpc.entries.len() / 2).max(1) as u64;
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(hint),
            ));
        }
        self.call(Request::Append(rpc), &option, "append", |r| match r {
            Reply::Append(r) => Some(r),
            _ => None,
        })
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let last = rpc.done;
        let out = self
            .call(Request::Snapshot(rpc), &option, "snapshot", |r| match r {
                Reply::Snapshot(r) => Some(r),
                _ => None,
            })
            .await;
        if last && out.is_ok() {
            self.snapshots_sent.inc();
        }
        out
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        self.call(Request::Vote(rpc), &option, "vote", |r| match r {
            Reply::Vote(r) => Some(r),
            _ => None,
        })
        .await
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}
