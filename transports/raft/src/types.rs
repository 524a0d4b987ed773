//! openraft type configuration and the replicated commands. openraft types stay behind
//! this module (and `storage`), so a move to openraft 0.10 stays local.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    /// The raft type configuration of the datasync store.
    pub TypeConfig:
        D = Command,
        R = Outcome,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Node identifier.
pub type NodeId = u64;
/// A log id.
pub type LogId = openraft::LogId<NodeId>;
/// openraft's storage error for this configuration.
pub type StorageError = openraft::StorageError<NodeId>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// Committed membership.
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;

/// The leader a `ForwardToLeader` names, with its address, if it names one.
pub(crate) fn leader_of(
    f: &openraft::error::ForwardToLeader<NodeId, openraft::BasicNode>,
) -> Option<(NodeId, String)> {
    f.leader_id
        .zip(f.leader_node.as_ref().map(|n| n.addr.clone()))
}

/// A compare-and-swap's condition as a mod revision (`None`: the key must be absent).
pub(crate) fn expected_rev(expect: datasync::Expect) -> Option<u64> {
    match expect {
        datasync::Expect::Absent => None,
        datasync::Expect::Revision(r) => Some(r.0),
    }
}

/// A write, replicated through the log and applied by every replica identically.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Command {
    /// Create or replace a key. `expires_at_ms` (Unix ms) is decided by the leader.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
        /// Absolute expiry, if any.
        expires_at_ms: Option<u64>,
    },
    /// Put only if the key's mod revision is `expect` (`None`: the key must be absent).
    Cas {
        /// The key.
        key: String,
        /// Expected mod revision.
        expect: Option<u64>,
        /// The value.
        value: Vec<u8>,
        /// Absolute expiry, if any.
        expires_at_ms: Option<u64>,
    },
    /// Delete a key, or every key under it.
    Delete {
        /// The key or prefix.
        key: String,
        /// Whether `key` is a prefix.
        prefix: bool,
    },
    /// Several commands proposed concurrently, carried by one log entry (one fsync).
    /// Each is applied in order as if proposed alone, with its own revision.
    Batch(Vec<Command>),
    /// Delete keys whose lease ran out, each only if still at the given mod revision
    /// (a key re-put since keeps its new value).
    Expire {
        /// `(key, mod revision)` pairs.
        keys: Vec<(String, u64)>,
    },
}

/// What applying a [`Command`] did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum Outcome {
    /// Nothing changed; the store is at `revision`.
    #[default]
    Unchanged,
    /// Written at `revision`.
    Written {
        /// The revision of the write.
        revision: u64,
    },
    /// `count` keys deleted at `revision`.
    Deleted {
        /// Keys deleted.
        count: u64,
        /// The revision of the delete.
        revision: u64,
    },
    /// The compare-and-swap condition failed; the key's current value and mod revision.
    Conflict {
        /// Current state, if the key exists.
        current: Option<(Vec<u8>, u64)>,
    },
    /// The outcomes of a [`Command::Batch`], in order.
    Batch(Vec<Outcome>),
}
