//! openraft type configuration and the replicated commands. openraft types stay behind
//! this module (and `storage`), so a move to openraft 0.10 stays local.

use serde::{Deserialize, Serialize};

pub use crate::rt::{Rng, Runtime};
pub use crate::snapshot_data::SnapshotData;

/// Set in a lease word (of a command and of a stored record): the other bits are a TTL
/// in milliseconds. Without it the word is an absolute Unix-ms deadline, as older stores
/// wrote; such a lease gets what is left of it by this machine's wall clock, counted
/// from when it is read.
pub(crate) const TTL_FLAG: u64 = 1 << 63;
pub(crate) use crate::records::{LEASE_ID_FLAG, MAX_LEASE_ID, lease_id_of};

openraft::declare_raft_types!(
    /// The raft type configuration of the datasync store.
    pub TypeConfig:
        D = Command,
        R = Outcome,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = SnapshotData,
        AsyncRuntime = crate::rt::Runtime,
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

/// The condition [`expected_rev`] made: `None` is `Absent`.
pub(crate) fn expect_of(rev: Option<u64>) -> datasync::Expect {
    rev.map_or(datasync::Expect::Absent, |r| {
        datasync::Expect::Revision(datasync::Revision(r))
    })
}

/// A write, replicated through the log and applied by every replica identically.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Command {
    /// Create or replace a key. `expires_at_ms` is a lease word: a TTL in milliseconds
    /// with the top bit set, counted by each replica from its apply (see the crate's
    /// TTL notes); without the bit, an absolute Unix-ms deadline from older versions.
    Put {
        /// The key.
        key: String,
        /// The value (as bytes: the same bincode as a sequence of `u8`, without a call
        /// per byte).
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// The lease word, if any.
        expires_at_ms: Option<u64>,
    },
    /// Put only if the key's mod revision is `expect` (`None`: the key must be absent).
    Cas {
        /// The key.
        key: String,
        /// Expected mod revision.
        expect: Option<u64>,
        /// The value (as bytes: the same bincode as a sequence of `u8`, without a call
        /// per byte).
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// The lease word, if any.
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
    /// Each is applied in order as if proposed alone, with its own revision. A batch
    /// holds no batches ([`Command::check`]); decoding refuses deep nesting, so hostile
    /// bytes cannot exhaust the stack.
    Batch(#[serde(deserialize_with = "flat_batch")] Vec<Command>),
    /// Delete keys whose lease ran out, each only if still at the given mod revision
    /// (a key re-put since keeps its new value).
    Expire {
        /// `(key, mod revision)` pairs.
        keys: Vec<(String, u64)>,
    },
    /// A client's write (a put, compare-and-swap or delete) with its request id: applied
    /// once however often it is proposed; a repeat answers the first outcome.
    Once {
        /// Who asks, and which of its requests this is.
        id: RequestId,
        /// The write.
        #[serde(deserialize_with = "nested_command")]
        cmd: Box<Command>,
    },
    /// A transaction: compares, then one branch of writes, all at one revision.
    Txn(Box<crate::records::Txn>),
    /// Creates lease object `id` (refused if it exists) living `ttl_ms` from each
    /// replica's apply unless kept alive.
    LeaseGrant {
        /// The lease (1 ..= [`MAX_LEASE_ID`]).
        id: u64,
        /// Its TTL in milliseconds (at most [`datasync::MAX_TTL`]).
        ttl_ms: u64,
    },
    /// Gives lease `id` its whole TTL again, counted from each replica's apply.
    LeaseKeepAlive {
        /// The lease.
        id: u64,
    },
    /// Ends lease `id`, deleting its keys at one revision.
    LeaseRevoke {
        /// The lease.
        id: u64,
    },
    /// Ends leases that ran out, each only if not kept alive since the leader saw it
    /// due: `(id, the log index of its last grant or keep-alive)`.
    LeaseExpire {
        /// The leases.
        ids: Vec<(u64, u64)>,
    },
    /// From here on, records count their versions (proposed once by a leader of a
    /// build that counts them; see the stored record's notes).
    CountVersions,
    /// Drops the history up to `revision` on every member (etcd's compaction): reads
    /// and watches from before it are `Compacted`. Takes no revision.
    Compact {
        /// The oldest revision that stays readable.
        revision: u64,
    },
}

/// A client write's identity, for exactly-once writes through retries.
///
/// `client` is random per client (a store handle, a remote client); `seq` counts its
/// requests. `first_unacked` is the lowest `seq` the client still waits for: the state
/// machine forgets outcomes below it, which bounds what it keeps per client.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct RequestId {
    /// The client.
    pub client: u64,
    /// This request.
    pub seq: u64,
    /// The lowest request of this client not yet answered.
    pub first_unacked: u64,
}

impl Command {
    /// Checks what applying the command relies on: every key is a valid [`Key`]
    /// (a prefix delete's too: the API deletes under a key, never under ""), and a
    /// batch holds no batch. Every proposal is checked where it enters (a local write,
    /// a forwarded one, [`RaftStore::propose`](crate::RaftStore::propose)); apply checks
    /// again and answers [`Outcome::Invalid`] for an entry that got into a log anyway.
    ///
    /// [`Key`]: datasync::Key
    pub fn check(&self) -> Result<(), datasync::StoreError> {
        match self {
            Command::Batch(cmds) => cmds.iter().try_for_each(|c| match c {
                Command::Batch(_) => {
                    Err(datasync::StoreError::Unsupported("a batch inside a batch"))
                }
                c => c.check(),
            }),
            c => {
                c.check_single()?;
                c.check_lease()
            }
        }
    }

    /// A new write's lease word must be a TTL word within [`datasync::MAX_TTL`] (apply
    /// still takes the absolute deadlines older versions wrote to their logs).
    fn check_lease(&self) -> Result<(), datasync::StoreError> {
        match self {
            Command::Put {
                expires_at_ms: Some(w),
                ..
            }
            | Command::Cas {
                expires_at_ms: Some(w),
                ..
            } => check_lease_word(*w),
            Command::Once { cmd, .. } => cmd.check_lease(),
            Command::Txn(t) => t.ops().try_for_each(|op| match op {
                crate::records::TxnOp::Put {
                    expires_at_ms: Some(w),
                    ..
                } if lease_id_of(*w).is_some() => check_lease_id(*w & !LEASE_ID_FLAG),
                crate::records::TxnOp::Put {
                    expires_at_ms: Some(w),
                    ..
                } => check_lease_word(*w),
                _ => Ok(()),
            }),
            Command::LeaseGrant { id, ttl_ms } => {
                check_lease_id(*id)?;
                let max = crate::records::MAX_LEASE_TTL.as_millis() as u64;
                if *ttl_ms == 0 || *ttl_ms > max {
                    return Err(datasync::StoreError::InvalidTtl(
                        std::time::Duration::from_millis(*ttl_ms),
                    ));
                }
                Ok(())
            }
            Command::LeaseKeepAlive { id } | Command::LeaseRevoke { id } => check_lease_id(*id),
            _ => Ok(()),
        }
    }

    /// [`Command::check`] for a command that is not a batch (a batch is refused).
    pub(crate) fn check_single(&self) -> Result<(), datasync::StoreError> {
        // The log's rule (what was valid when an entry was written applies the same on
        // every member); new writes pass `Key::new` before they get here.
        let key = |k: &str| datasync::Key::from_stored(k).map(drop);
        match self {
            Command::Put { key: k, .. }
            | Command::Cas { key: k, .. }
            | Command::Delete { key: k, .. } => key(k)?,
            Command::Expire { keys } => keys.iter().try_for_each(|(k, _)| key(k))?,
            Command::Batch(_) => {
                return Err(datasync::StoreError::Unsupported("a batch inside a batch"));
            }
            Command::Txn(t) => t.check()?,
            Command::LeaseGrant { .. }
            | Command::LeaseKeepAlive { .. }
            | Command::LeaseRevoke { .. }
            | Command::LeaseExpire { .. }
            | Command::CountVersions
            | Command::Compact { .. } => {}
            Command::Once { id, cmd } => match **cmd {
                Command::Put { .. }
                | Command::Cas { .. }
                | Command::Delete { .. }
                | Command::Txn(_)
                | Command::LeaseGrant { .. }
                | Command::LeaseKeepAlive { .. }
                | Command::LeaseRevoke { .. }
                    if id.first_unacked <= id.seq =>
                {
                    cmd.check_single()?
                }
                _ => {
                    return Err(datasync::StoreError::Unsupported(
                        "a request id on something other than one client write",
                    ));
                }
            },
        }
        Ok(())
    }
}

/// A lease object's id: 1 ..= [`MAX_LEASE_ID`].
fn check_lease_id(id: u64) -> Result<(), datasync::StoreError> {
    if id == 0 || id > MAX_LEASE_ID {
        return Err(datasync::StoreError::Unsupported(
            "a lease id must be between 1 and 2^62 - 1",
        ));
    }
    Ok(())
}

/// A new write's lease word: a TTL word within [`datasync::MAX_TTL`].
fn check_lease_word(w: u64) -> Result<(), datasync::StoreError> {
    let ms = w & !TTL_FLAG;
    let max = datasync::MAX_TTL.as_millis() as u64;
    if w & TTL_FLAG == 0 || ms == 0 || ms > max {
        return Err(datasync::StoreError::InvalidTtl(
            std::time::Duration::from_millis(ms),
        ));
    }
    Ok(())
}

/// Deepest nesting of batches the decoder accepts. Our proposers never nest batches
/// and apply skips a nested one as invalid; the decoder still takes a few levels, so
/// that such an entry, already in a log, is skipped instead of making the log unreadable.
pub(crate) const MAX_BATCH_DEPTH: u8 = 4;

thread_local! {
    /// How many batches this thread is decoding inside each other (see [`flat_batch`]).
    static BATCH_DEPTH: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

/// Decodes a [`Command::Once`]'s write, counting it as a level of nesting like a batch.
fn nested_command<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Box<Command>, D::Error> {
    let _level = Level::enter()?;
    Command::deserialize(d).map(Box::new)
}

/// One level of nesting being decoded on this thread; refused past [`MAX_BATCH_DEPTH`].
struct Level;

impl Level {
    fn enter<E: serde::de::Error>() -> Result<Level, E> {
        let depth = BATCH_DEPTH.with(|b| b.get());
        if depth >= MAX_BATCH_DEPTH {
            return Err(E::custom("commands nested too deep"));
        }
        BATCH_DEPTH.with(|b| b.set(depth + 1));
        Ok(Level)
    }
}

impl Drop for Level {
    fn drop(&mut self) {
        BATCH_DEPTH.with(|b| b.set(b.get().saturating_sub(1)));
    }
}

/// Decodes a batch's outcomes, counting it as a level of nesting.
fn nested_outcomes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Outcome>, D::Error> {
    let _level = Level::enter()?;
    Vec::<Outcome>::deserialize(d)
}

/// Decodes a batch's commands, refusing batches nested deeper than [`MAX_BATCH_DEPTH`].
///
/// Why a thread-local: serde decodes nested values by recursion on one thread, so a
/// depth counted around the inner decode sees exactly the batches nested in this one;
/// the check comes before the nested decode recurses any further, so hostile nesting
/// cannot exhaust the stack.
fn flat_batch<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Command>, D::Error> {
    let _level = Level::enter()?;
    Vec::<Command>::deserialize(d)
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
        #[serde(with = "crate::bytes::value_rev")]
        current: Option<(Vec<u8>, u64)>,
    },
    /// The outcomes of a [`Command::Batch`], in order (decoded with the same depth
    /// bound as batches).
    Batch(#[serde(deserialize_with = "nested_outcomes")] Vec<Outcome>),
    /// The command is invalid (see [`Command::check`]) and changed nothing. Only an
    /// entry that reached a log without the checks at its entry gets this: apply never
    /// fails on a command's content, so one bad entry cannot stop every replica.
    Invalid(String),
    /// What a [`Command::Txn`] did.
    Txn(crate::records::TxnOutcome),
    /// What a lease command did.
    Lease(LeaseOutcome),
}

/// What a lease command (or a transaction naming a lease) did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// Granted (or kept alive) with this TTL.
    Alive {
        /// The lease's TTL in milliseconds.
        ttl_ms: u64,
    },
    /// A grant of an id that exists changed nothing.
    Exists,
    /// The lease does not exist (never granted, revoked or expired): nothing changed.
    NotFound(u64),
    /// Revoked: its keys deleted at `revision` (the store's revision if it had none).
    Revoked {
        /// Keys deleted.
        count: u64,
        /// The revision.
        revision: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value as one byte string is the same bincode as the sequence of bytes it
    /// was written as before: logs and snapshots from before read the same.
    #[test]
    fn values_as_byte_strings_keep_the_encoding() {
        #[derive(Serialize)]
        enum Before {
            Put {
                key: String,
                value: Vec<u8>,
                expires_at_ms: Option<u64>,
            },
        }
        let (key, value) = ("k".to_owned(), vec![0u8, 1, 2, 255]);
        let now = Command::Put {
            key: key.clone(),
            value: value.clone(),
            expires_at_ms: Some(7),
        };
        let before = Before::Put {
            key,
            value,
            expires_at_ms: Some(7),
        };
        let bytes = bincode::serialize(&now).expect("encode");
        assert_eq!(bytes, bincode::serialize(&before).expect("encode"));
        assert_eq!(
            bincode::deserialize::<Command>(&bytes).expect("decode"),
            now
        );
    }

    /// A frame of batches nested 100,000 deep (12 bytes a level) is refused past
    /// [`MAX_BATCH_DEPTH`], not decoded by recursion until the stack overflows.
    #[test]
    fn nested_batches_are_refused_by_the_decoder() {
        let mut bytes = Vec::new();
        for _ in 0..100_000 {
            bytes.extend_from_slice(&3u32.to_le_bytes()); // Command::Batch
            bytes.extend_from_slice(&1u64.to_le_bytes()); // one element
        }
        let got = bincode::deserialize::<Command>(&bytes);
        assert!(got.is_err(), "{got:?}");
        // The flag is reset: a flat batch still decodes on this thread.
        let flat = Command::Batch(vec![Command::Delete {
            key: "k".into(),
            prefix: false,
        }]);
        let bytes = bincode::serialize(&flat).expect("serializes");
        assert_eq!(
            bincode::deserialize::<Command>(&bytes).expect("decodes"),
            flat
        );
    }

    /// Outcomes nest the same way (a reply, a stored session): bounded too.
    #[test]
    fn nested_outcomes_are_refused_by_the_decoder() {
        let mut bytes = Vec::new();
        for _ in 0..100_000 {
            bytes.extend_from_slice(&4u32.to_le_bytes()); // Outcome::Batch
            bytes.extend_from_slice(&1u64.to_le_bytes());
        }
        assert!(bincode::deserialize::<Outcome>(&bytes).is_err());
        let flat = Outcome::Batch(vec![Outcome::Written { revision: 3 }]);
        let bytes = bincode::serialize(&flat).expect("serializes");
        assert_eq!(
            bincode::deserialize::<Outcome>(&bytes).expect("decodes"),
            flat
        );
    }

    #[test]
    fn check_refuses_invalid_keys_and_nesting() {
        let put = |k: &str| Command::Put {
            key: k.into(),
            value: vec![],
            expires_at_ms: None,
        };
        assert!(put("ok").check().is_ok());
        assert!(matches!(
            put("").check(),
            Err(datasync::StoreError::InvalidKey(_))
        ));
        assert!(put("a\0b").check().is_err());
        assert!(Command::Batch(vec![put("a"), put("")]).check().is_err());
        assert!(
            Command::Batch(vec![Command::Batch(vec![put("a")])])
                .check()
                .is_err()
        );
        assert!(
            Command::Expire {
                keys: vec![("a".into(), 1), (String::new(), 2)]
            }
            .check()
            .is_err()
        );
        assert!(
            Command::Delete {
                key: String::new(),
                prefix: true
            }
            .check()
            .is_err()
        );
        let lease = |w: u64| Command::Put {
            key: "k".into(),
            value: vec![],
            expires_at_ms: Some(w),
        };
        let flag = TTL_FLAG;
        assert!(lease(flag | 1000).check().is_ok());
        for bad in [
            0,
            1000,
            flag,
            flag | (datasync::MAX_TTL.as_millis() as u64 + 1),
        ] {
            assert!(
                matches!(lease(bad).check(), Err(datasync::StoreError::InvalidTtl(_))),
                "{bad:#x}"
            );
        }
    }
}
