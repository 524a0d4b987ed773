//! Records and transactions as etcd's API has them: a key's create and mod revision and
//! version, key ranges, and transactions of compares and writes applied at one revision.
//!
//! These are the store's own (the `datasync` API has prefixes and one key per write);
//! they go into the log and replies as they are, so their encoding is part of the log's.

use datasync::{Key, Prefix, Revision, Value};
use serde::{Deserialize, Serialize};

/// Set (without the TTL flag, the top bit) in a lease word that attaches a key to a
/// lease object: the other bits are its id, so ids are below 2^62. The absolute
/// deadlines older versions wrote never reach this bit.
pub(crate) const LEASE_ID_FLAG: u64 = 1 << 62;

/// Largest lease object id.
pub const MAX_LEASE_ID: u64 = LEASE_ID_FLAG - 1;

/// Longest lease object TTL: etcd's (`MaxLeaseTTL`, about 285 years), so what an etcd
/// client may grant there it may grant here. A key's own TTL stays within
/// [`datasync::MAX_TTL`].
pub const MAX_LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(9_000_000_000);

/// The lease word of a [`TxnOp::Put`] that attaches its key to lease object `id`.
pub fn on_lease(id: u64) -> u64 {
    LEASE_ID_FLAG | id
}

/// The lease object a lease word attaches its key to, if it does.
pub(crate) fn lease_id_of(word: u64) -> Option<u64> {
    (word & (1 << 63) == 0 && word & LEASE_ID_FLAG != 0).then_some(word & !LEASE_ID_FLAG)
}

/// A key's record at some revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The key.
    pub key: Key,
    /// The value.
    pub value: Value,
    /// The revision that created the key (since it last did not exist).
    pub create_revision: Revision,
    /// The revision of its last write.
    pub mod_revision: Revision,
    /// Writes since its creation (1 when created).
    pub version: u64,
    /// The lease object it is attached to (0: none; a per-key TTL is no lease object).
    pub lease: u64,
}

/// Keys from `start` to `end`, in byte (so code point) order.
///
/// `start` need not be a valid key (`""` starts at the first key); keys stored are
/// always valid [`Key`]s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRange {
    /// The first key (or where the range starts).
    pub start: String,
    /// Where it ends.
    pub end: RangeEnd,
}

/// Where a [`KeyRange`] ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RangeEnd {
    /// The range is the one key `start`.
    Single,
    /// Before this key (exclusive).
    Before(String),
    /// At the end of the key space.
    Unbounded,
}

impl KeyRange {
    /// The one key.
    pub fn key(key: &Key) -> KeyRange {
        KeyRange {
            start: key.as_str().to_owned(),
            end: RangeEnd::Single,
        }
    }

    /// Every key under `prefix`.
    pub fn prefix(prefix: &Prefix) -> KeyRange {
        KeyRange {
            start: prefix.as_str().to_owned(),
            end: prefix
                .range_end()
                .map_or(RangeEnd::Unbounded, RangeEnd::Before),
        }
    }

    /// Every key from `start` on.
    pub fn from(start: impl Into<String>) -> KeyRange {
        KeyRange {
            start: start.into(),
            end: RangeEnd::Unbounded,
        }
    }

    /// Keys from `start` up to, not including, `end`.
    pub fn between(start: impl Into<String>, end: impl Into<String>) -> KeyRange {
        KeyRange {
            start: start.into(),
            end: RangeEnd::Before(end.into()),
        }
    }

    /// Whether `key` lies in the range.
    pub fn contains(&self, key: &str) -> bool {
        match &self.end {
            RangeEnd::Single => key == self.start,
            RangeEnd::Before(end) => self.start.as_str() <= key && key < end.as_str(),
            RangeEnd::Unbounded => self.start.as_str() <= key,
        }
    }

    /// Whether the range can hold two keys that [`contains`](Self::contains) both
    /// accept (used to refuse a transaction that puts a key it also deletes).
    pub(crate) fn overlaps(&self, other: &KeyRange) -> bool {
        let end = |r: &KeyRange| -> Option<String> {
            match &r.end {
                RangeEnd::Single => Some(format!("{}\0", r.start)),
                RangeEnd::Before(e) => Some(e.clone()),
                RangeEnd::Unbounded => None,
            }
        };
        let before = |a: &KeyRange, b: &KeyRange| end(a).is_some_and(|e| e <= b.start);
        !before(self, other) && !before(other, self)
    }
}

/// A transaction: if every compare holds, `success` is applied, else `failure`; all
/// of it at one revision (no new revision when nothing changes), as etcd's `Txn`.
///
/// Why no reads: an outcome is kept for exactly-once retries (and replicated with the
/// client sessions), so it must stay small; a reader reads at the transaction's
/// revision (or the one before) once it is applied, which the history holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Txn {
    /// The conditions, all of which must hold.
    pub compares: Vec<Compare>,
    /// Applied when they hold.
    pub success: Vec<TxnOp>,
    /// Applied when one does not.
    pub failure: Vec<TxnOp>,
}

/// The most compares, and the most writes in a branch, of one transaction (etcd's
/// default `--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;

impl Txn {
    /// Both branches' writes.
    pub(crate) fn ops(&self) -> impl Iterator<Item = &TxnOp> {
        self.success.iter().chain(&self.failure)
    }

    /// What applying it relies on: keys put (and single keys deleted) are valid keys
    /// (the log's rule, as for every command), at most [`MAX_TXN_OPS`] compares and
    /// writes per branch, and no branch that puts a key twice or puts a key it also
    /// deletes (etcd refuses those too: which write would win is not obvious).
    pub(crate) fn check(&self) -> Result<(), datasync::StoreError> {
        use datasync::StoreError;
        if self.compares.len() > MAX_TXN_OPS
            || self.success.len() > MAX_TXN_OPS
            || self.failure.len() > MAX_TXN_OPS
        {
            return Err(StoreError::Unsupported(
                "too many operations in the txn request (etcd's limit: 128)",
            ));
        }
        let key = |k: &str| Key::from_stored(k).map(drop);
        for op in self.ops() {
            match op {
                TxnOp::Put { key: k, .. } => key(k)?,
                TxnOp::Delete { range, .. } if range.end == RangeEnd::Single => key(&range.start)?,
                TxnOp::Delete { .. } => {}
            }
        }
        for branch in [&self.success, &self.failure] {
            let puts: Vec<KeyRange> = branch
                .iter()
                .filter_map(|op| match op {
                    TxnOp::Put { key, .. } => Some(KeyRange {
                        start: key.clone(),
                        end: RangeEnd::Single,
                    }),
                    TxnOp::Delete { .. } => None,
                })
                .collect();
            for (i, put) in puts.iter().enumerate() {
                let deleted = branch.iter().any(|op| match op {
                    TxnOp::Delete { range, .. } => range.overlaps(put),
                    TxnOp::Put { .. } => false,
                });
                if deleted || puts[..i].contains(put) {
                    return Err(StoreError::Unsupported(
                        "duplicate key given in txn request",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A condition on every key in a range (on the absent key's zeros when none is:
/// version, create and mod revision 0; a value compare on no key fails, as in etcd).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    /// The keys compared.
    pub range: KeyRange,
    /// How.
    pub op: CompareOp,
    /// With what.
    pub target: CompareTarget,
}

/// A compare's relation: the key's side first (`Greater`: the key's is greater).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    /// Equal.
    Equal,
    /// Not equal.
    NotEqual,
    /// The key's is greater.
    Greater,
    /// The key's is less.
    Less,
}

/// What a compare looks at, and the operand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    /// The value, byte by byte.
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The version (0: absent).
    Version(u64),
    /// The create revision (0: absent).
    CreateRevision(u64),
    /// The mod revision (0: absent).
    ModRevision(u64),
    /// The lease object the key is on (0: none, or absent).
    Lease(u64),
}

/// A write in a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOp {
    /// Create or replace a key.
    Put {
        /// The key.
        key: String,
        /// The value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// A lease word, as in [`Command::Put`](crate::types::Command::Put).
        expires_at_ms: Option<u64>,
        /// Whether the outcome carries the key's record before the put.
        prev_kv: bool,
    },
    /// Delete the keys in a range.
    Delete {
        /// The keys.
        range: KeyRange,
        /// Whether the outcome carries the deleted records.
        prev_kv: bool,
    },
}

/// What a transaction did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnOutcome {
    /// Whether the compares held (`success` was applied).
    pub succeeded: bool,
    /// The transaction's revision; the store's revision when nothing changed.
    pub revision: u64,
    /// One per write of the branch applied, in order.
    pub results: Vec<OpResult>,
}

/// What a write in a transaction did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    /// A put; the record before it, if asked for and there was one.
    Put(Option<PrevRecord>),
    /// A delete: how many keys, and their records if asked for.
    Deleted {
        /// Keys deleted.
        count: u64,
        /// Their records before, if asked for.
        prev: Vec<PrevRecord>,
    },
}

/// A revision's changes to the records a [`RecordWatch`](crate::RecordWatch) watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordChanges {
    /// The revision.
    pub revision: Revision,
    /// The changed records in the watched range, in key order.
    pub events: Vec<RecordEvent>,
}

/// One record's change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordEvent {
    /// Put or delete.
    pub op: datasync::Op,
    /// The record after: for a delete, the key and the revision that deleted it
    /// (value empty, create revision and version 0, as etcd reports it).
    pub record: Record,
    /// The record before, if the key existed.
    pub prev: Option<Record>,
}

/// A record in an outcome (plain strings and bytes, as the log's encoding wants).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrevRecord {
    /// The key.
    pub key: String,
    /// The value.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Its create revision.
    pub create_revision: u64,
    /// Its mod revision.
    pub mod_revision: u64,
    /// Its version.
    pub version: u64,
    /// Its lease object (0: none).
    pub lease: u64,
}

impl PrevRecord {
    /// As a [`Record`]; `None` if the key is not a valid key (a corrupt outcome).
    pub fn record(&self) -> Option<Record> {
        Some(Record {
            key: Key::from_stored(&self.key).ok()?,
            value: Value::from(self.value.clone()),
            create_revision: Revision(self.create_revision),
            mod_revision: Revision(self.mod_revision),
            version: self.version,
            lease: self.lease,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_contain_and_overlap_by_byte_order() {
        let p = KeyRange::prefix(&Prefix::new("a/é").expect("prefix"));
        assert!(p.contains("a/é") && p.contains("a/éz") && !p.contains("a/ê"));
        let one = |k: &str| KeyRange {
            start: k.into(),
            end: RangeEnd::Single,
        };
        assert!(one("a/éx").overlaps(&p) && p.overlaps(&one("a/éx")));
        assert!(!one("a/ê").overlaps(&p) && !p.overlaps(&one("a/ê")));
        assert!(one("k").overlaps(&one("k")) && !one("k").overlaps(&one("k2")));
        assert!(KeyRange::from("").overlaps(&one("z")));
        assert!(!KeyRange::between("a", "b").overlaps(&one("b")));
        assert!(KeyRange::between("a", "b").overlaps(&one("a")));
        assert!(!KeyRange::between("b", "a").contains("a"));
    }
}
