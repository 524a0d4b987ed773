//! Backups of the raft store: a file holding the applied state at one revision
//! ([`RaftStore::backup`](crate::RaftStore::backup),
//! [`RemoteStore::backup`](crate::RemoteStore::backup)), checked with [`verify`] and
//! restored into a new store with [`restore`](crate::RaftStore::restore).
//!
//! The file: `DSBACKUP`, a format version (u32), the revision and key count (u64
//! each), the payload's length (u64), the payload (the same encoding as a raft
//! snapshot's: every key's record, the client sessions), then the SHA-256 of
//! everything before it. All integers little-endian.
//!
//! Why a checksum over the whole file rather than trusting the payload's decoder: a
//! flipped byte inside a value still decodes; only the checksum says the file is not
//! what was saved.

use ring::digest::{SHA256, digest};

const MAGIC: &[u8; 8] = b"DSBACKUP";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 8 + 8 + 8;
const SUM: usize = 32;

/// What a backup holds.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackupInfo {
    /// The revision of the state it holds.
    pub revision: u64,
    /// How many keys.
    pub keys: u64,
    /// The file's size in bytes.
    pub bytes: u64,
    /// The file's SHA-256 (of everything but the checksum itself), hex.
    pub sha256: String,
}

/// A backup could not be made, read or restored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// The file does not start as a backup does.
    #[error("not a datasync backup (no DSBACKUP header)")]
    NotABackup,
    /// A format this build does not read.
    #[error("backup format {0} is not known to this build (it reads format {VERSION})")]
    UnknownVersion(u32),
    /// The file is shorter or longer than its header says.
    #[error("the backup is {found} bytes, its header says {expected}: truncated or extended")]
    Length {
        /// What the header says.
        expected: u64,
        /// What the file holds.
        found: u64,
    },
    /// The checksum does not match: the file was damaged after it was saved.
    #[error("the backup's checksum does not match: the file is damaged")]
    Checksum,
    /// The checksum matches but the content does not decode (or disagrees with the
    /// header): written by a faulty tool.
    #[error("the backup's content is invalid: {0}")]
    Invalid(String),
    /// Restoring needs a new data directory.
    #[error("{} is not empty: restore into a new directory", .0.display())]
    NotEmpty(std::path::PathBuf),
    /// Restoring makes the first member of a new group; a join would replace the
    /// restored state with the group's.
    #[error("restore makes a new group's first member: joining an existing group is not possible")]
    Join,
    /// The new store could not be opened.
    #[error("cannot open the new store")]
    Open(#[from] crate::OpenError),
    /// The store failed while saving or restoring.
    #[error(transparent)]
    Store(#[from] datasync::StoreError),
    /// Reading or writing the file failed.
    #[error("backup file")]
    Io(#[from] std::io::Error),
}

/// A backup too large to send to a remote client in one piece.
#[derive(Debug, thiserror::Error)]
#[error(
    "the backup is {bytes} bytes; a running member sends at most {limit}: stop it and save from its directory (`--store DIR`)"
)]
pub struct TooLarge {
    /// The backup's size.
    pub bytes: u64,
    /// The most a member sends.
    pub limit: u64,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The backup file of `payload`, the state at `revision` with `keys` keys.
pub(crate) fn encode(revision: u64, keys: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len() + SUM);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&revision.to_le_bytes());
    out.extend_from_slice(&keys.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let sum = digest(&SHA256, &out);
    out.extend_from_slice(sum.as_ref());
    out
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Checks a backup (header, length, checksum, content) and says what it holds;
/// returns its payload too.
pub(crate) fn decode(file: &[u8]) -> Result<(BackupInfo, &[u8]), BackupError> {
    if file.len() < MAGIC.len() || &file[..MAGIC.len()] != MAGIC {
        return Err(BackupError::NotABackup);
    }
    if file.len() < HEADER + SUM {
        return Err(BackupError::Length {
            expected: (HEADER + SUM) as u64,
            found: file.len() as u64,
        });
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(&file[8..12]);
    let version = u32::from_le_bytes(v);
    if version != VERSION {
        return Err(BackupError::UnknownVersion(version));
    }
    let (revision, keys, len) = (u64_at(file, 12), u64_at(file, 20), u64_at(file, 28));
    let expected = len
        .checked_add((HEADER + SUM) as u64)
        .ok_or(BackupError::Length {
            expected: u64::MAX,
            found: file.len() as u64,
        })?;
    if expected != file.len() as u64 {
        return Err(BackupError::Length {
            expected,
            found: file.len() as u64,
        });
    }
    let body = &file[..file.len() - SUM];
    let sum = digest(&SHA256, body);
    if sum.as_ref() != &file[file.len() - SUM..] {
        return Err(BackupError::Checksum);
    }
    let payload = &body[HEADER..];
    let (rev, n) = crate::storage::sm::payload_summary(payload).map_err(BackupError::Invalid)?;
    if (rev, n) != (revision, keys) {
        return Err(BackupError::Invalid(format!(
            "the header says r{revision} with {keys} keys, the content r{rev} with {n}"
        )));
    }
    let info = BackupInfo {
        revision,
        keys,
        bytes: file.len() as u64,
        sha256: hex(sum.as_ref()),
    };
    Ok((info, payload))
}

/// Checks a backup file's bytes and says what it holds: a damaged, truncated or
/// foreign file is a typed error.
pub fn verify(file: &[u8]) -> Result<BackupInfo, BackupError> {
    decode(file).map(|(info, _)| info)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sample() -> Vec<u8> {
        let payload = crate::storage::sm::payload_seed();
        encode(9, 1, &payload)
    }

    #[test]
    fn a_backup_reads_back_and_every_damage_is_named() {
        let file = sample();
        let info = verify(&file).unwrap();
        assert_eq!(
            (info.revision, info.keys, info.bytes),
            (9, 1, file.len() as u64)
        );
        assert!(matches!(verify(b"hello"), Err(BackupError::NotABackup)));
        assert!(matches!(
            verify(&file[..file.len() - 1]),
            Err(BackupError::Length { .. })
        ));
        let mut longer = file.clone();
        longer.push(0);
        assert!(matches!(verify(&longer), Err(BackupError::Length { .. })));
        // Any flipped byte past the header is caught.
        for at in [HEADER, HEADER + 5, file.len() - 1] {
            let mut bad = file.clone();
            bad[at] ^= 0x40;
            assert!(
                matches!(verify(&bad), Err(BackupError::Checksum)),
                "at {at}"
            );
        }
        let mut v2 = file.clone();
        v2[8] = 2;
        assert!(matches!(verify(&v2), Err(BackupError::UnknownVersion(2))));
        // A huge length in the header is an error, not an overflow.
        let mut huge = file.clone();
        huge[28..36].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(verify(&huge), Err(BackupError::Length { .. })));
        // A header that disagrees with a content whose checksum matches.
        let lying = encode(10, 1, &crate::storage::sm::payload_seed());
        assert!(matches!(verify(&lying), Err(BackupError::Invalid(_))));
    }
}
