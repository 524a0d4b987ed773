//! The messages nodes exchange, encoded with bincode inside sealed frames.

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use datasync::{KeyError, Revision, StoreError};

use crate::members::{Members, Refusal};
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
    Snapshot(#[serde(with = "crate::bytes::chunk")] InstallSnapshotRequest<TypeConfig>),
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
        /// The revision to resume after ([`datasync::WatchOptions::resume`]).
        resume: Option<u64>,
    },
    /// Add a node that need not run yet (etcd's `member add`), as a learner.
    Register {
        /// The node.
        id: NodeId,
        /// Its advertised address.
        addr: String,
    },
    /// Make a learner a voter if it is in sync with the leader (etcd's `member
    /// promote`); refused otherwise, at once.
    Promote {
        /// The learner.
        id: NodeId,
    },
    /// Reach member `id` at `addr` from now on (etcd's `member update`).
    Update {
        /// The member.
        id: NodeId,
        /// Its new advertised address.
        addr: String,
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
        #[serde(with = "serde_bytes")]
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
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        ttl: Option<Duration>,
    },
    /// A transaction (`datasync::Writer::txn`): conditions (a key, and the revision it
    /// must be at, `None` for absent), then the two branches.
    Txn {
        when: Vec<(String, Option<u64>)>,
        then: Vec<WireTxnOp>,
        otherwise: Vec<WireTxnOp>,
    },
    /// The member's size limits.
    Limits,
    /// A backup of the member's applied state (see [`crate::backup`]).
    Backup,
}

/// A write of a remote client's transaction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum WireTxnOp {
    Put {
        key: String,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        ttl: Option<Duration>,
    },
    Delete {
        key: String,
        prefix: bool,
    },
}

/// How a remote read reads.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Read {
    pub(crate) linearizable: bool,
    pub(crate) revision: Option<u64>,
}

/// A key, its value and mod revision.
pub(crate) type WireKv = (String, serde_bytes::ByteBuf, u64);

/// A key's change: key, whether it is a delete, value, previous value.
pub(crate) type WireChange = (
    String,
    bool,
    Option<serde_bytes::ByteBuf>,
    Option<serde_bytes::ByteBuf>,
);

/// The answer to a [`ClientOp`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ClientReply {
    Revision(u64),
    Deleted {
        count: u64,
        revision: u64,
    },
    Value(Option<WireKv>),
    Listing {
        revision: u64,
        values: Vec<WireKv>,
    },
    Swapped(u64),
    Conflict(Option<WireKv>),
    /// What a transaction did.
    Txn {
        succeeded: bool,
        revision: u64,
    },
    Limits {
        max_value_size: usize,
    },
    /// A backup file's bytes.
    Backup(#[serde(with = "serde_bytes")] Vec<u8>),
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
    /// A watch asked to resume is registered (first item): the member's replay, or
    /// its resync, follows.
    Resumed,
}

/// A store error, on the wire: each `StoreError` a caller may match on keeps its
/// variant (see `to_wire` / `from_wire`).
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error, PartialEq, Eq)]
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
    /// The member did nothing with the call and cannot serve now (it is stopping, it
    /// left, or it hears from no leader); another member may.
    #[error("the member is stopping")]
    Stopped,
    /// A failure with no variant of its own (`StoreError::Backend` on the member),
    /// described.
    #[error("{0}")]
    Backend(String),
    /// A key or prefix the member refused.
    #[error("invalid key: {0}")]
    InvalidKey(WireKeyError),
    /// A compare-and-swap retry loop gave up after this many conflicts.
    #[error("contended: gave up after {0} conflicts")]
    Contended(u32),
    /// A transaction the member refused as given.
    #[error("invalid transaction: {0}")]
    InvalidTxn(String),
    /// The request does not fit where it was sent (a watch sent as a call).
    #[error("the request was sent the wrong way")]
    Misrouted,
}

/// `datasync::KeyError` on the wire.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) enum WireKeyError {
    Empty,
    TooLong { len: usize, max: usize },
    ControlCharacter { byte: u8, position: usize },
    ForbiddenCharacter { ch: char, position: usize },
    NotUtf8,
}

impl std::fmt::Display for WireKeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        KeyError::from(self.clone()).fmt(f)
    }
}

impl From<WireKeyError> for KeyError {
    fn from(e: WireKeyError) -> Self {
        match e {
            WireKeyError::Empty => KeyError::Empty,
            WireKeyError::TooLong { len, max } => KeyError::TooLong { len, max },
            WireKeyError::ControlCharacter { byte, position } => {
                KeyError::ControlCharacter { byte, position }
            }
            WireKeyError::ForbiddenCharacter { ch, position } => {
                KeyError::ForbiddenCharacter { ch, position }
            }
            WireKeyError::NotUtf8 => KeyError::NotUtf8,
        }
    }
}

impl From<KeyError> for WireError {
    fn from(e: KeyError) -> Self {
        WireError::InvalidKey(match e {
            KeyError::Empty => WireKeyError::Empty,
            KeyError::TooLong { len, max } => WireKeyError::TooLong { len, max },
            KeyError::ControlCharacter { byte, position } => {
                WireKeyError::ControlCharacter { byte, position }
            }
            KeyError::ForbiddenCharacter { ch, position } => {
                WireKeyError::ForbiddenCharacter { ch, position }
            }
            KeyError::NotUtf8 => WireKeyError::NotUtf8,
            // A backend's own refusal (never raft's), or a newer variant.
            e => return WireError::Backend(e.to_string()),
        })
    }
}

impl From<StoreError> for WireError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::InvalidKey(k) => k.into(),
            StoreError::ValueTooLarge { size, max } => WireError::ValueTooLarge { size, max },
            StoreError::InvalidTtl(t) => WireError::InvalidTtl(t),
            StoreError::Compacted {
                requested,
                compacted,
            } => WireError::Compacted {
                requested: requested.0,
                compacted: compacted.0,
            },
            StoreError::FutureRevision { requested, current } => WireError::FutureRevision {
                requested: requested.0,
                current: current.0,
            },
            StoreError::Timeout(t) => WireError::Timeout(t),
            StoreError::Corrupted(s) => WireError::Corrupted(s),
            StoreError::Stopped => WireError::Stopped,
            StoreError::Contended(n) => WireError::Contended(n),
            StoreError::InvalidTxn(s) => WireError::InvalidTxn(s),
            e @ StoreError::Unavailable(_) => WireError::Unavailable(datasync::error_chain(&e)),
            e => WireError::Backend(datasync::error_chain(&e)),
        }
    }
}

impl From<WireError> for StoreError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::InvalidKey(k) => StoreError::InvalidKey(k.into()),
            WireError::ValueTooLarge { size, max } => StoreError::ValueTooLarge { size, max },
            WireError::InvalidTtl(t) => StoreError::InvalidTtl(t),
            WireError::Compacted {
                requested,
                compacted,
            } => StoreError::Compacted {
                requested: Revision(requested),
                compacted: Revision(compacted),
            },
            WireError::FutureRevision { requested, current } => StoreError::FutureRevision {
                requested: Revision(requested),
                current: Revision(current),
            },
            WireError::Timeout(t) => StoreError::Timeout(t),
            WireError::Corrupted(s) => StoreError::Corrupted(s),
            WireError::Contended(n) => StoreError::Contended(n),
            WireError::InvalidTxn(s) => StoreError::InvalidTxn(s),
            // The member stopped, not this client: another member may serve.
            e @ (WireError::Stopped | WireError::Unavailable(_)) => {
                StoreError::Unavailable(Box::new(e))
            }
            e @ (WireError::Backend(_) | WireError::Misrouted) => StoreError::Backend(Box::new(e)),
        }
    }
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
    /// The leader could not confirm with a quorum that it still leads.
    #[error("the leader cannot reach a quorum")]
    NoQuorum,
    /// A membership change refused.
    #[error("membership change refused: {0}")]
    Refused(Refusal),
    /// A proposal failed on the leader with this store error.
    #[error(transparent)]
    Store(WireError),
}

impl From<ServiceError> for StoreError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Store(w) => w.into(),
            e @ ServiceError::Refused(_) => StoreError::Backend(Box::new(e)),
            e => StoreError::Unavailable(Box::new(e)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;

    fn across(e: StoreError) -> StoreError {
        let bytes = bincode::serialize(&WireError::from(e)).unwrap();
        StoreError::from(bincode::deserialize::<WireError>(&bytes).unwrap())
    }

    /// Each store error a caller may match on comes back from a member as itself.
    #[test]
    fn store_errors_keep_their_variant_across_the_wire() {
        let same: Vec<fn() -> StoreError> = vec![
            || StoreError::InvalidKey(KeyError::Empty),
            || {
                StoreError::InvalidKey(KeyError::TooLong {
                    len: 5000,
                    max: 4096,
                })
            },
            || {
                StoreError::InvalidKey(KeyError::ControlCharacter {
                    byte: 1,
                    position: 2,
                })
            },
            || {
                StoreError::InvalidKey(KeyError::ForbiddenCharacter {
                    ch: '\u{202e}',
                    position: 0,
                })
            },
            || StoreError::InvalidKey(KeyError::NotUtf8),
            || StoreError::ValueTooLarge { size: 10, max: 5 },
            || StoreError::InvalidTtl(Duration::ZERO),
            || StoreError::Compacted {
                requested: Revision(3),
                compacted: Revision(7),
            },
            || StoreError::FutureRevision {
                requested: Revision(9),
                current: Revision(4),
            },
            || StoreError::Timeout(Duration::from_secs(2)),
            || StoreError::Corrupted("bad record".into()),
            || StoreError::Contended(64),
            || StoreError::Unavailable("no leader".into()),
            || StoreError::Backend("disk on fire".into()),
        ];
        for make in same {
            let (sent, got) = (make(), across(make()));
            assert_eq!(
                std::mem::discriminant(&sent),
                std::mem::discriminant(&got),
                "{sent:?} came back as {got:?}"
            );
            assert!(
                got.to_string().contains(&sent.to_string()) || got.to_string() == sent.to_string(),
                "{sent} / {got}"
            );
            if let (StoreError::InvalidKey(a), StoreError::InvalidKey(b)) = (&sent, &got) {
                assert_eq!(a, b);
            }
        }
        // A member that stops did not fail the call: another member may serve it.
        assert!(matches!(
            across(StoreError::Stopped),
            StoreError::Unavailable(_)
        ));
    }

    /// A proposal forwarded to the leader fails with the leader's store error.
    #[test]
    fn a_forwarded_proposal_keeps_the_leaders_error() {
        let e = ServiceError::Store(StoreError::ValueTooLarge { size: 10, max: 5 }.into());
        let bytes = bincode::serialize(&e).unwrap();
        let back: ServiceError = bincode::deserialize(&bytes).unwrap();
        assert!(matches!(
            StoreError::from(back),
            StoreError::ValueTooLarge { size: 10, max: 5 }
        ));
        assert!(matches!(
            StoreError::from(ServiceError::NoQuorum),
            StoreError::Unavailable(_)
        ));
    }
}
