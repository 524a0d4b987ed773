//! A log truncation's intent (see [`Redo`]).

use std::fs::OpenOptions;
use std::io;
use std::path::Path;

use tracing::warn;

use super::super::crash::{point, sync, write_unsynced};
use super::{Damage, crc, segment_path, sync_dir, u32_at, u64_at};

/// A truncation's intent, made durable (in [`REDO`]) before a segment is changed in
/// place, and removed durably after.
///
/// Why: a truncation zeroes a frame and rewrites the entries before the cut in its
/// place. A crash in between would lose those entries, which may be committed; with the
/// intent on disk, open finishes the rewrite (zeroing and writing again is idempotent)
/// before it reads the segments. A torn intent (bad checksum) means the crash came
/// before the segment was touched, and it is dropped. No append happens while it exists.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Redo {
    /// The segment (its first index).
    pub(super) seg: u64,
    /// Where the cut frame starts.
    pub(super) off: u64,
    /// End of the frames before the truncation: zero `off..old_end`.
    pub(super) old_end: u64,
    /// The frame to write at `off` (empty: none).
    pub(super) frame: Vec<u8>,
}

/// The file name of a pending truncation's [`Redo`].
pub(crate) const REDO: &str = "truncate.redo";

impl Redo {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.frame.len());
        out.extend_from_slice(&self.seg.to_le_bytes());
        out.extend_from_slice(&self.off.to_le_bytes());
        out.extend_from_slice(&self.old_end.to_le_bytes());
        out.extend_from_slice(&self.frame);
        let sum = crc(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// `None` for a torn record.
    pub(super) fn decode(b: &[u8]) -> Option<Redo> {
        let body = b.get(..b.len().checked_sub(4)?)?;
        if b.len() < 28 || crc(body) != u32_at(b, body.len()) {
            return None;
        }
        Some(Redo {
            seg: u64_at(b, 0),
            off: u64_at(b, 8),
            old_end: u64_at(b, 16),
            frame: body[24..].to_vec(),
        })
    }

    pub(super) fn write(&self, dir: &Path) -> io::Result<()> {
        point()?;
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(REDO))?;
        write_unsynced(&f, &dir.join(REDO), &self.encode(), 0)?;
        sync(&f, &dir.join(REDO))?;
        sync_dir(dir)
    }

    /// Zeroes the cut frames and writes the kept entries' frame, durably.
    pub(super) fn apply(&self, dir: &Path) -> io::Result<()> {
        let path = segment_path(dir, self.seg);
        let f = OpenOptions::new().write(true).open(&path)?;
        let chunk = vec![0u8; 1 << 20];
        let mut at = self.off;
        while at < self.old_end {
            let n = chunk.len().min((self.old_end - at) as usize);
            write_unsynced(&f, &path, &chunk[..n], at)?;
            at += n as u64;
        }
        write_unsynced(&f, &path, &self.frame, self.off)?;
        sync(&f, &path)
    }

    pub(super) fn remove(dir: &Path) -> io::Result<()> {
        point()?;
        std::fs::remove_file(dir.join(REDO))?;
        sync_dir(dir)
    }

    /// Finishes a truncation a crash interrupted, if any (at open).
    pub(super) fn recover(dir: &Path) -> Result<(), Damage> {
        let path = dir.join(REDO);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Damage::new(&path, e.to_string())),
        };
        let fail = |e: io::Error| Damage::new(&path, e.to_string());
        match Redo::decode(&bytes) {
            Some(redo) => {
                warn!(
                    segment = redo.seg,
                    offset = redo.off,
                    "finishing a log truncation interrupted by a crash"
                );
                redo.apply(dir).map_err(|e| {
                    Damage::new(
                        &segment_path(dir, redo.seg),
                        format!("finishing a truncation: {e}"),
                    )
                })?;
            }
            None => warn!("dropping a torn log truncation record (the log was not changed yet)"),
        }
        Redo::remove(dir).map_err(fail)
    }
}
