//! The redb tables and the stored record format (below the state machine and the log,
//! which both use them).

use redb::TableDefinition;

pub(crate) const RAFT_META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("raft_meta");
pub(crate) const KV: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("kv");
pub(crate) const SM_META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("sm_meta");
pub(crate) const EXPIRY: TableDefinition<'_, (u64, &str), ()> = TableDefinition::new("expiry");
pub(crate) const SNAPSHOT: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("snapshot");
/// Lease objects (etcd's leases): id → bincode [`super::lease::LeaseObj`]. Their keys
/// are found through `EXPIRY` (a key's lease word names its lease).
pub(crate) const LEASE_OBJS: TableDefinition<'_, u64, &[u8]> =
    TableDefinition::new("lease_objects");
/// The undo history (reads at past revisions, watches from a revision): revision →
/// that revision's change with each key's record before and after it (see
/// `sm::Undo::encode`). Written with the state it goes with, trimmed to the history's
/// length and the last compaction, emptied when a snapshot replaces the state.
pub(crate) const HISTORY: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("history");
/// Client sessions for exactly-once writes: client id → bincode `session::Session`.
pub(crate) const CLIENTS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("clients");

/// A stored value: `[mod_rev | VERSIONED][create_rev][lease word][version][bytes]`, each
/// word a `u64` LE.
///
/// Why a flag: records written before versions were kept are
/// `[mod_rev][create_rev][lease word][bytes]`. Revisions never reach 2^63, so the top bit
/// of the first word tells the two apart and such a store opens without a migration;
/// an old record reads as version 1 (what it was at its last write is not known) and
/// counts on from there at its next write.
///
/// Replicas must write the same bytes for the same entry, yet entries applied by an
/// older build on one member may be applied again by this one on another (a member
/// replaying after a crash, a new member replaying the log). So records carry versions
/// only from a `Command::CountVersions` entry on (proposed once by a leader of this
/// build, recorded in the state machine): before it, every replica writes the old form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    pub(crate) mod_rev: u64,
    pub(crate) create_rev: u64,
    /// 0: no expiry; else a lease word (see [`super::lease`]).
    pub(crate) expires_at_ms: u64,
    /// Writes since the key was created (1 at its creation), as etcd counts them.
    pub(crate) version: u64,
    /// Whether it is stored with its version (else in the old form, read as 1).
    pub(crate) versioned: bool,
    pub(crate) value: datasync::Value,
}

/// Set in the first word of a record that carries its version.
const VERSIONED: u64 = 1 << 63;
/// The header of a record without (with) its version.
const OLD_HEADER: usize = 24;
const HEADER: usize = 32;

/// A record's header words: mod revision, create revision, lease word, version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) mod_rev: u64,
    pub(crate) create_rev: u64,
    pub(crate) expires_at_ms: u64,
    pub(crate) version: u64,
    /// Where the value starts.
    len: usize,
}

impl Stored {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.value.len());
        let flag = if self.versioned { VERSIONED } else { 0 };
        out.extend_from_slice(&(self.mod_rev | flag).to_le_bytes());
        out.extend_from_slice(&self.create_rev.to_le_bytes());
        out.extend_from_slice(&self.expires_at_ms.to_le_bytes());
        if self.versioned {
            out.extend_from_slice(&self.version.to_le_bytes());
        }
        out.extend_from_slice(self.value.as_bytes());
        out
    }

    #[inline]
    pub(crate) fn header(bytes: &[u8]) -> Result<Header, CorruptValue> {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        if bytes.len() < OLD_HEADER {
            return Err(CorruptValue(bytes.len()));
        }
        let first = word(0);
        if first & VERSIONED == 0 {
            return Ok(Header {
                mod_rev: first,
                create_rev: word(1),
                expires_at_ms: word(2),
                version: 1,
                len: OLD_HEADER,
            });
        }
        if bytes.len() < HEADER {
            return Err(CorruptValue(bytes.len()));
        }
        Ok(Header {
            mod_rev: first & !VERSIONED,
            create_rev: word(1),
            expires_at_ms: word(2),
            version: word(3),
            len: HEADER,
        })
    }

    #[inline]
    pub(crate) fn decode(bytes: &[u8]) -> Result<Stored, CorruptValue> {
        let h = Self::header(bytes)?;
        Ok(Stored {
            mod_rev: h.mod_rev,
            create_rev: h.create_rev,
            expires_at_ms: h.expires_at_ms,
            version: h.version,
            versioned: h.len == HEADER,
            value: datasync::Value::from(bytes[h.len..].to_vec()),
        })
    }
}

/// A stored record shorter than its header.
#[derive(Debug, thiserror::Error)]
#[error("stored record of {0} bytes is shorter than its header")]
pub(crate) struct CorruptValue(pub(crate) usize);

/// A history row that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("stored history of revision {0} does not decode: {1}")]
pub(crate) struct CorruptHistory(pub(crate) u64, pub(crate) String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_carry_their_version_and_old_ones_still_read() {
        let rec = Stored {
            mod_rev: 9,
            create_rev: 2,
            expires_at_ms: 5,
            version: 4,
            versioned: true,
            value: datasync::Value::from("v"),
        };
        assert_eq!(Stored::decode(&rec.encode()).expect("decodes"), rec);
        // Written in the old form (before versions are counted): the same bytes.
        let unversioned = Stored {
            version: 1,
            versioned: false,
            ..rec.clone()
        };
        let mut same = Vec::new();
        for w in [9u64, 2, 5] {
            same.extend_from_slice(&w.to_le_bytes());
        }
        same.extend_from_slice(b"v");
        assert_eq!(unversioned.encode(), same);
        // As stores before versions wrote it.
        let mut old = Vec::new();
        for w in [9u64, 2, 5] {
            old.extend_from_slice(&w.to_le_bytes());
        }
        old.extend_from_slice(b"v");
        let read = Stored::decode(&old).expect("decodes");
        assert_eq!((read.mod_rev, read.version, read.value), (9, 1, "v".into()));
        // A flagged record cut inside its version word is refused, not misread.
        assert!(Stored::decode(&rec.encode()[..28]).is_err());
        assert!(Stored::decode(&old[..20]).is_err());
    }
}
