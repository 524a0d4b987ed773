//! The messages nodes exchange, encoded with bincode inside sealed frames.

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cluster::Members;
use crate::types::{Command, NodeId, Outcome, RequestId, TypeConfig};

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
    /// A remote client's store operation, run by this member as if local; a write
    /// carries the client's request id, so a retry applies once.
    Client(ClientOp, Option<RequestId>),
    /// A remote client's watch: a stream of [`WireItem`]s under this request's id,
    /// until the connection closes.
    Watch {
        /// The registration's name.
        name: String,
        /// The prefixes.
        prefixes: Vec<String>,
        /// The member-side queue capacity.
        queue_capacity: usize,
    },
}

impl Request {
    /// Whether the reply is a stream rather than one message.
    pub(crate) fn is_stream(&self) -> bool {
        matches!(self, Request::Watch { .. })
    }
}

/// A store operation of a remote client.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ClientOp {
    Put {
        key: String,
        value: Vec<u8>,
        ttl: Option<Duration>,
    },
    Delete {
        key: String,
        prefix: bool,
    },
    Get {
        key: String,
        read: Read,
    },
    List {
        prefix: String,
        read: Read,
    },
    Cas {
        key: String,
        expect: Option<u64>,
        value: Vec<u8>,
        ttl: Option<Duration>,
    },
    /// The member's size limits.
    Limits,
}

/// How a remote read reads.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Read {
    pub(crate) linearizable: bool,
    pub(crate) revision: Option<u64>,
}

/// A key, its value and mod revision.
pub(crate) type WireKv = (String, Vec<u8>, u64);

/// A key's change: key, whether it is a delete, value, previous value.
pub(crate) type WireChange = (String, bool, Option<Vec<u8>>, Option<Vec<u8>>);

/// The answer to a [`ClientOp`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ClientReply {
    Revision(u64),
    Deleted { count: u64, revision: u64 },
    Value(Option<WireKv>),
    Listing { revision: u64, values: Vec<WireKv> },
    Swapped(u64),
    Conflict(Option<WireKv>),
    Limits { max_value_size: usize },
}

/// One item of a remote watch stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum WireItem {
    /// A resync: the values per prefix, at a revision.
    Resync {
        revision: u64,
        reason: datasync::ResyncReason,
        prefixes: Vec<(String, Vec<WireKv>)>,
    },
    /// One transaction's changes.
    Change {
        revision: u64,
        changes: Vec<WireChange>,
    },
    /// A transient error on the member; a resync or the continuation follows.
    Interrupted(WireError),
    /// The watch could not start, or ended.
    Failed(WireError),
}

/// A store error, on the wire.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
pub(crate) enum WireError {
    #[error("value is {size} bytes, the limit is {max}")]
    ValueTooLarge { size: usize, max: usize },
    #[error("TTL must be positive, got {0:?}")]
    InvalidTtl(Duration),
    #[error("revision {requested} is compacted (history starts after {compacted})")]
    Compacted { requested: u64, compacted: u64 },
    #[error("revision {requested} is in the future (store is at {current})")]
    FutureRevision { requested: u64, current: u64 },
    #[error("{0}")]
    Unavailable(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("corrupted data: {0}")]
    Corrupted(String),
    /// The member is stopping (another member may serve).
    #[error("the member is stopping")]
    Stopped,
    #[error("{0}")]
    Failed(String),
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
    Client(Result<ClientReply, WireError>),
    Watch(WireItem),
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
