//! The messages nodes exchange, encoded with bincode inside sealed frames.

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::cluster::Members;
use crate::types::{Command, NodeId, Outcome, TypeConfig};

/// A request with its id; the reply carries the same id.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Envelope<T> {
    pub(crate) id: u64,
    pub(crate) body: T,
}

/// What one node asks another.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Request {
    /// Raft: replicate entries.
    Append(AppendEntriesRequest<TypeConfig>),
    /// Raft: ask for a vote.
    Vote(VoteRequest<NodeId>),
    /// Raft: one chunk of a snapshot.
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// Propose a command on the leader (a follower forwards its writes).
    Propose(Command),
    /// The leader's read index, for a linearizable read on a follower.
    ReadIndex,
    /// Add a node (routed to the leader); `voter: false` keeps it a learner.
    Join {
        /// The node.
        id: NodeId,
        /// Its advertised address.
        addr: String,
        /// Voter or learner.
        voter: bool,
    },
    /// Remove a node from the group (it keeps its data).
    Leave {
        /// The node.
        id: NodeId,
    },
    /// The committed membership, as this node knows it.
    Members,
}

/// What a node answers.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Reply {
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    /// The outcome and the log index it was committed at.
    Proposed(Result<(Outcome, u64), ServiceError>),
    /// The log index a linearizable read must wait for.
    ReadIndex(Result<u64, ServiceError>),
    /// The log index of the committed membership change.
    Membership(Result<u64, ServiceError>),
    Members(Members),
}

/// A client-service request failed on the node that received it.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ServiceError {
    /// This node does not lead; the leader, if it knows one.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<(NodeId, String)> },
    /// A membership change is still in progress.
    #[error("another membership change is in progress")]
    InProgress,
    /// The node is shutting down.
    #[error("the node is stopping")]
    Stopped,
    /// Anything else, described.
    #[error("{0}")]
    Failed(String),
}
