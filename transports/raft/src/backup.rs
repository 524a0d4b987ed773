//! Backups of the raft store: a file holding the applied state at one revision
//! ([`RaftStore::backup`](crate::RaftStore::backup),
//! [`RemoteStore::backup`](crate::RemoteStore::backup)), checked with [`verify`] and
//! restored into a new store with [`restore`](crate::RaftStore::restore).
//!
//! The file: `DSBACKUP`, a format version (u32), the revision and key count (u64
//! each), the payload's length (u64), the payload (the same encoding as a raft
//! snapshot's: every key's record, the client sessions), zero bytes up to a multiple of
//! 512 (format 2; format 1 has none), then the SHA-256 of everything before it. All
//! integers little-endian.
//!
//! Why the padding: etcd's snapshot files end the same way (a database of 512-byte
//! pages, then its SHA-256), and `etcdctl snapshot save` refuses a stream whose length
//! is not 32 past a multiple of 512. A backup streamed through the etcd endpoint is
//! this file, so it has that length.
//!
//! Why a checksum over the whole file rather than trusting the payload's decoder: a
//! flipped byte inside a value still decodes; only the checksum says the file is not
//! what was saved.

use ring::digest::{SHA256, digest};

const MAGIC: &[u8; 8] = b"DSBACKUP";
const VERSION: u32 = 2;
/// The body (header, payload, padding) of a format 2 file is a multiple of this.
const PAGE: usize = 512;
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
    #[error("backup format {0} is not known to this build (it reads formats 1 to {VERSION})")]
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
    encode_as(VERSION, revision, keys, payload)
}

/// How many zero bytes follow a payload of `len` bytes in a file of `version`.
fn padding(version: u32, len: u64) -> u64 {
    let page = PAGE as u64;
    match version {
        1 => 0,
        _ => (page - (HEADER as u64 + len % page) % page) % page,
    }
}

fn encode_as(version: u32, revision: u64, keys: u64, payload: &[u8]) -> Vec<u8> {
    let pad = padding(version, payload.len() as u64) as usize;
    let mut out = Vec::with_capacity(HEADER + payload.len() + pad + SUM);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&revision.to_le_bytes());
    out.extend_from_slice(&keys.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len() + pad, 0);
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
    if !(1..=VERSION).contains(&version) {
        return Err(BackupError::UnknownVersion(version));
    }
    let (revision, keys, len) = (u64_at(file, 12), u64_at(file, 20), u64_at(file, 28));
    let pad = padding(version, len);
    let expected = len
        .checked_add((HEADER + SUM) as u64 + pad)
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
    let (payload, padded) = body[HEADER..].split_at(len as usize);
    if padded.iter().any(|b| *b != 0) {
        return Err(BackupError::Invalid("the padding is not zeros".into()));
    }
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
        let mut v3 = file.clone();
        v3[8] = 3;
        assert!(matches!(verify(&v3), Err(BackupError::UnknownVersion(3))));
        // etcd's length: 32 past a multiple of 512, which `etcdctl snapshot save`
        // checks; format 1 files (no padding) still read.
        assert_eq!(file.len() % PAGE, SUM);
        let v1 = encode_as(1, 9, 1, &crate::storage::sm::payload_seed());
        assert!(v1.len() % PAGE != SUM);
        assert_eq!(verify(&v1).unwrap().revision, 9);
        let mut dirty = file[..file.len() - SUM].to_vec();
        *dirty.last_mut().unwrap() = 1;
        let sum = digest(&SHA256, &dirty);
        dirty.extend_from_slice(sum.as_ref());
        assert!(matches!(verify(&dirty), Err(BackupError::Invalid(_))));
        // A huge length in the header is an error, not an overflow.
        let mut huge = file.clone();
        huge[28..36].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(verify(&huge), Err(BackupError::Length { .. })));
        // A header that disagrees with a content whose checksum matches.
        let lying = encode(10, 1, &crate::storage::sm::payload_seed());
        assert!(matches!(verify(&lying), Err(BackupError::Invalid(_))));
    }
}
