//! The redb tables and the stored record format (below the state machine and the log,
//! which both use them).

use redb::TableDefinition;

pub(crate) const RAFT_META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("raft_meta");
pub(crate) const KV: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("kv");
pub(crate) const SM_META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("sm_meta");
pub(crate) const EXPIRY: TableDefinition<'_, (u64, &str), ()> = TableDefinition::new("expiry");
pub(crate) const SNAPSHOT: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("snapshot");
/// Client sessions for exactly-once writes: client id → bincode `session::Session`.
pub(crate) const CLIENTS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("clients");

/// A stored value: `[mod_rev u64 LE][create_rev u64 LE][expires_at_ms u64 LE][bytes]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    pub(crate) mod_rev: u64,
    pub(crate) create_rev: u64,
    /// 0: no expiry; else a lease word (see [`super::lease`]).
    pub(crate) expires_at_ms: u64,
    pub(crate) value: datasync::Value,
}

const HEADER: usize = 24;

impl Stored {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.value.len());
        out.extend_from_slice(&self.mod_rev.to_le_bytes());
        out.extend_from_slice(&self.create_rev.to_le_bytes());
        out.extend_from_slice(&self.expires_at_ms.to_le_bytes());
        out.extend_from_slice(self.value.as_bytes());
        out
    }

    #[inline]
    pub(crate) fn header(bytes: &[u8]) -> Result<(u64, u64, u64), CorruptValue> {
        let h = bytes.get(..HEADER).ok_or(CorruptValue(bytes.len()))?;
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&h[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        Ok((word(0), word(1), word(2)))
    }

    #[inline]
    pub(crate) fn decode(bytes: &[u8]) -> Result<Stored, CorruptValue> {
        let (mod_rev, create_rev, expires_at_ms) = Self::header(bytes)?;
        Ok(Stored {
            mod_rev,
            create_rev,
            expires_at_ms,
            value: datasync::Value::from(bytes[HEADER..].to_vec()),
        })
    }
}

/// A stored record shorter than its header.
#[derive(Debug, thiserror::Error)]
#[error("stored record of {0} bytes is shorter than its 24-byte header")]
pub(crate) struct CorruptValue(pub(crate) usize);
