//! The raft log on disk: append-only segment files of checksummed frames.
//!
//! Why not redb: a durable redb commit rewrites table and allocator pages and costs
//! ~1.2 ms here, against ~190 µs for one page write to a preallocated file with
//! `O_DIRECT | O_DSYNC`. The log is where every write waits, so it gets its own file.
//!
//! Layout: `log/<first index, 20 digits>.wal`, each preallocated with zeros (4 MiB for
//! the first, doubling up to 64 MiB; larger for one huge frame), so an append overwrites
//! allocated blocks and the device flush carries no file-system metadata. One append is
//! one frame:
//!
//! ```text
//! magic u32 | header crc u32 | first index u64 | count u32 | payload len u32 | payload crc u32 | 0 u32
//! payload: count × (len u32, bincode entry), zero-padded to 8 bytes
//! ```
//!
//! With `O_DIRECT` the tail page is rewritten whole; its earlier bytes are the same as on
//! disk, so a torn write can only damage the frame being written, which was not yet
//! acknowledged. Recovery reads frames until the zeros. A bad frame is a torn tail (cut
//! off, its bytes zeroed) only if it is in the last segment and no valid frame header
//! follows it; anywhere else it is corruption and the node refuses to start. Frames
//! must continue the index sequence across segments, and a frame must end inside its
//! file: a missing or shortened segment is corruption too.
//!
//! Entries stay in a small memory cache until written and while the budget allows (apply reads them right
//! after commit); older ones are read back from their frame.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use super::crash::{point, sync, write_at, write_unsynced};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{debug, warn};

use crate::types::{Entry, LogId};

mod redo;
#[cfg(test)]
use redo::REDO;
use redo::Redo;

const MAGIC: u32 = 0x4453_4C47;
const HEADER: usize = 32;
const PAGE: usize = 4096;
/// Largest size of a new segment file.
pub(crate) const SEGMENT: u64 = 64 << 20;
/// Size of a store's first segment; each next one doubles, up to [`SEGMENT`], so a small
/// store does not hold 64 MiB of zeros.
const FIRST_SEGMENT: u64 = 4 << 20;
/// Bytes of entries kept decoded in memory.
const CACHE_BUDGET: usize = 8 << 20;

/// Where an entry's frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    /// The segment's first index (its name).
    pub(crate) seg: u64,
    /// The frame's offset in the segment.
    pub(crate) off: u64,
}

/// Why the log could not be read.
#[derive(Debug)]
pub(crate) struct Damage {
    pub(crate) path: PathBuf,
    pub(crate) reason: String,
}

impl Damage {
    fn new(path: &Path, reason: impl Into<String>) -> Self {
        Damage {
            path: path.to_owned(),
            reason: reason.into(),
        }
    }
}

fn crc(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// A frame holding `entries` (which must be consecutive).
pub(crate) fn encode(entries: &[Entry]) -> io::Result<Vec<u8>> {
    let mut out = vec![0u8; HEADER];
    for e in entries {
        let bytes = bincode::serialize(e).map_err(io::Error::other)?;
        let len = u32::try_from(bytes.len()).map_err(|_| io::Error::other("entry over 4 GiB"))?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    let payload_len =
        u32::try_from(out.len() - HEADER).map_err(|_| io::Error::other("frame over 4 GiB"))?;
    let payload_crc = crc(&out[HEADER..]);
    out.resize(out.len().next_multiple_of(8), 0);
    let first = entries.first().map_or(0, |e| e.log_id.index);
    out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    out[8..16].copy_from_slice(&first.to_le_bytes());
    out[16..20].copy_from_slice(&(entries.len() as u32).to_le_bytes());
    out[20..24].copy_from_slice(&payload_len.to_le_bytes());
    out[24..28].copy_from_slice(&payload_crc.to_le_bytes());
    let header_crc = crc(&out[8..HEADER]);
    out[4..8].copy_from_slice(&header_crc.to_le_bytes());
    Ok(out)
}

/// A frame header whose checksum holds: (first index, count, payload len, payload crc).
fn header(b: &[u8]) -> Option<(u64, u32, usize, u32)> {
    if b.len() < HEADER || u32_at(b, 0) != MAGIC || u32_at(b, 4) != crc(&b[8..HEADER]) {
        return None;
    }
    Some((
        u64_at(b, 8),
        u32_at(b, 16),
        u32_at(b, 20) as usize,
        u32_at(b, 24),
    ))
}

/// Decodes a frame's payload into its entries.
fn decode_payload(mut p: &[u8], count: u32) -> Result<Vec<Entry>, String> {
    // Each entry takes at least its 4-byte length: a count is not trusted beyond that.
    let mut out = Vec::with_capacity((count as usize).min(p.len() / 4));
    for _ in 0..count {
        if p.len() < 4 {
            return Err("frame payload ends inside an entry".into());
        }
        let len = u32_at(p, 0) as usize;
        let body = p
            .get(4..4 + len)
            .ok_or("frame payload ends inside an entry")?;
        out.push(bincode::deserialize(body).map_err(|e| format!("entry does not decode: {e}"))?);
        p = &p[4 + len..];
    }
    Ok(out)
}

/// The frame decoders on arbitrary bytes, past the checksums (as a frame whose damage
/// they missed would be): whether the payload decoded.
#[cfg(test)]
pub(crate) fn decode_frame_for_fuzz(b: &[u8]) -> bool {
    let _ = header(b);
    let count = if b.len() >= 20 { u32_at(b, 16) } else { 0 };
    decode_payload(b.get(HEADER..).unwrap_or(&[]), count).is_ok()
}

/// Reads and checks the frame at `off` of an open segment.
fn read_frame(file: &File, off: u64) -> io::Result<Vec<Entry>> {
    let mut h = [0u8; HEADER];
    file.read_exact_at(&mut h, off)?;
    let (_, count, len, pcrc) =
        header(&h).ok_or_else(|| io::Error::other(format!("bad frame header at {off}")))?;
    let mut p = vec![0u8; len];
    file.read_exact_at(&mut p, off + HEADER as u64)?;
    if crc(&p) != pcrc {
        return Err(io::Error::other(format!("bad frame checksum at {off}")));
    }
    decode_payload(&p, count).map_err(io::Error::other)
}

pub(crate) fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.wal"))
}

/// Creates a zero-filled file of `len` bytes at `path`, durably.
fn zero_file(path: &Path, len: u64) -> io::Result<()> {
    point()?;
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let chunk = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = chunk.len().min((len - at) as usize);
        write_unsynced(&f, path, &chunk[..n], at)?;
        at += n as u64;
    }
    sync(&f, path)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    point()?;
    File::open(dir)?.sync_all()
}

/// Opens a segment for appends: `O_DIRECT | O_DSYNC` where the file system allows it
/// (checked with a real write of `tail` at `page_start`), else `O_DSYNC`.
fn open_for_append(path: &Path, tail: &[u8], page_start: u64) -> io::Result<(File, bool)> {
    // The probe rewrites bytes already there; a crash before it changes nothing.
    point()?;
    let direct = OpenOptions::new()
        .write(true)
        .read(true)
        .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
        .open(path);
    if let Ok(f) = direct {
        let mut buf = Aligned::default();
        let page = buf.page_of(tail);
        if f.write_all_at(page, page_start).is_ok() {
            return Ok((f, true));
        }
    }
    let f = OpenOptions::new()
        .write(true)
        .read(true)
        .custom_flags(libc::O_DSYNC)
        .open(path)?;
    Ok((f, false))
}

/// A page-aligned scratch buffer (O_DIRECT needs aligned memory), kept without `unsafe`
/// by over-allocating and starting at the first aligned address.
#[derive(Default)]
struct Aligned {
    buf: Vec<u8>,
}

impl Aligned {
    /// `len` bytes (a multiple of the page), aligned, zeroed.
    fn get(&mut self, len: usize) -> &mut [u8] {
        if self.buf.len() < len + PAGE {
            self.buf = vec![0u8; len + PAGE];
        }
        let skew = self.buf.as_ptr() as usize % PAGE;
        let start = (PAGE - skew) % PAGE;
        let out = &mut self.buf[start..start + len];
        out.fill(0);
        out
    }

    /// One aligned page holding `tail` then zeros.
    fn page_of(&mut self, tail: &[u8]) -> &[u8] {
        let page = self.get(PAGE);
        page[..tail.len()].copy_from_slice(tail);
        page
    }
}

/// The segment being appended to.
struct Active {
    first: u64,
    file: File,
    direct: bool,
    /// End of the frames.
    pos: u64,
    /// File length.
    cap: u64,
    /// Bytes of the page holding `pos`, from the page start to `pos`.
    tail: Vec<u8>,
}

/// The files, and where the next frame goes.
struct Files {
    dir: PathBuf,
    /// Every segment's first index, ascending (the active one last).
    segments: Vec<u64>,
    active: Option<Active>,
    scratch: Aligned,
    /// Largest size of a new segment ([`SEGMENT`]; smaller in tests).
    seg_size: u64,
    /// A zero-filled spare segment being made in the background.
    spare: Option<(u64, crate::rt::Background<io::Result<PathBuf>>)>,
    /// Set after a failed write: the file state is unknown, refuse further writes.
    failed: bool,
}

impl Files {
    fn write(&mut self, frame: &[u8], first: u64) -> io::Result<Loc> {
        if self.failed {
            return Err(io::Error::other("an earlier log write failed"));
        }
        let r = self.write_inner(frame, first);
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn write_inner(&mut self, frame: &[u8], first: u64) -> io::Result<Loc> {
        let fits = self
            .active
            .as_ref()
            .is_some_and(|a| a.pos + frame.len() as u64 <= a.cap);
        if !fits {
            self.roll(first, frame.len() as u64)?;
        }
        let a = self
            .active
            .as_mut()
            .ok_or_else(|| io::Error::other("no active segment"))?;
        let loc = Loc {
            seg: a.first,
            off: a.pos,
        };
        let end = a.pos + frame.len() as u64;
        super::disk::check(&self.dir)?;
        if a.direct {
            let page_start = a.pos - a.tail.len() as u64;
            let len = (a.tail.len() + frame.len()).next_multiple_of(PAGE);
            let buf = self.scratch.get(len);
            buf[..a.tail.len()].copy_from_slice(&a.tail);
            buf[a.tail.len()..a.tail.len() + frame.len()].copy_from_slice(frame);
            write_at(&a.file, buf, page_start)?;
            let new_page = end - end % PAGE as u64;
            let keep = (end - new_page) as usize;
            let used = a.tail.len() + frame.len();
            a.tail = buf[used - keep..used].to_vec();
        } else {
            write_at(&a.file, frame, a.pos)?;
            a.tail.clear();
        }
        a.pos = end;
        if a.pos > a.cap / 2 && self.spare.is_none() {
            let path = self.dir.join("spare.tmp");
            let size = self.next_size();
            let made = crate::rt::Background::spawn("raft-log-spare", move || {
                zero_file(&path, size)?;
                Ok(path)
            });
            // Without a thread, the next segment is made when it is needed, and no other
            // thread is tried for this one.
            let made = made.unwrap_or_else(|e| {
                warn!(error = %e, "no thread to prepare the next log segment");
                crate::rt::Background::Done(Err(e))
            });
            self.spare = Some((size, made));
        }
        Ok(loc)
    }

    /// The size of the next segment.
    fn next_size(&self) -> u64 {
        match &self.active {
            Some(a) => a.cap.saturating_mul(2).min(self.seg_size),
            None => FIRST_SEGMENT.min(self.seg_size),
        }
    }

    /// Starts a new segment named `first`, big enough for `need` bytes.
    fn roll(&mut self, first: u64, need: u64) -> io::Result<()> {
        let path = segment_path(&self.dir, first);
        let len = self.next_size().max(need.next_multiple_of(PAGE as u64));
        let spare = match self.spare.take() {
            Some((size, h)) if len == size => h
                .join()
                .ok_or_else(|| io::Error::other("spare segment thread panicked"))?
                .ok(),
            Some((_, h)) => {
                let _ = h.join();
                None
            }
            None => None,
        };
        match spare {
            Some(tmp) => {
                point()?;
                std::fs::rename(tmp, &path)?
            }
            None => zero_file(&path, len)?,
        }
        sync_dir(&self.dir)?;
        let (file, direct) = open_for_append(&path, &[], 0)?;
        debug!(segment = %path.display(), direct, "new log segment");
        // An empty segment of the same name (kept at open, or left by a truncation to
        // its start) was just made again: it is one segment, not two.
        self.segments.retain(|&s| s != first);
        self.segments.push(first);
        self.active = Some(Active {
            first,
            file,
            direct,
            pos: 0,
            cap: len,
            tail: Vec::new(),
        });
        Ok(())
    }

    /// Removes every entry from `from` on, whose frame starts at `loc`; `keep` are the
    /// frame's entries before `from`, rewritten in its place.
    fn truncate(&mut self, loc: Loc, keep: &[Entry]) -> io::Result<()> {
        // Later segments go first, so a crash leaves a prefix of the log.
        while self.segments.last().is_some_and(|&s| s > loc.seg) {
            if let Some(s) = self.segments.pop() {
                point()?;
                std::fs::remove_file(segment_path(&self.dir, s))?;
            }
        }
        sync_dir(&self.dir)?;
        let path = segment_path(&self.dir, loc.seg);
        let cap = std::fs::metadata(&path)?.len();
        let old_end = match &self.active {
            Some(a) if a.first == loc.seg => a.pos,
            _ => cap,
        };
        let frame = if keep.is_empty() {
            Vec::new()
        } else {
            encode(keep)?
        };
        let redo = Redo {
            seg: loc.seg,
            off: loc.off,
            old_end,
            frame,
        };
        redo.write(&self.dir)?;
        redo.apply(&self.dir)?;
        Redo::remove(&self.dir)?;
        let pos = loc.off + redo.frame.len() as u64;
        let plain = OpenOptions::new().read(true).open(&path)?;
        let page_start = pos - pos % PAGE as u64;
        let mut tail = vec![0u8; (pos - page_start) as usize];
        plain.read_exact_at(&mut tail, page_start)?;
        let (file, direct) = open_for_append(&path, &tail, page_start)?;
        self.active = Some(Active {
            first: loc.seg,
            file,
            direct,
            pos,
            cap,
            tail: if direct { tail } else { Vec::new() },
        });
        Ok(())
    }

    /// Deletes segments whose entries are all at or below `upto`.
    fn purge(&mut self, upto: u64) -> io::Result<()> {
        let mut removed = false;
        while self.segments.len() > 1 && self.segments[1] <= upto + 1 {
            let s = self.segments.remove(0);
            point()?;
            std::fs::remove_file(segment_path(&self.dir, s))?;
            removed = true;
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

impl Drop for Files {
    /// Waits for a spare segment being made, so no thread writes into the directory
    /// after the store has let go of it.
    fn drop(&mut self) {
        if let Some((_, h)) = self.spare.take() {
            let _ = h.join();
        }
    }
}

/// Entries and where they are.
#[derive(Default)]
pub(crate) struct Mem {
    /// Frame of every entry written (purged ones removed).
    locs: BTreeMap<u64, Loc>,
    /// Decoded entries, with their encoded size.
    cache: BTreeMap<u64, (Entry, usize)>,
    cache_bytes: usize,
    pub(crate) last: Option<LogId>,
    pub(crate) purged: Option<LogId>,
}

impl Mem {
    fn evict(&mut self) {
        while self.cache_bytes > CACHE_BUDGET {
            let Some((&idx, _)) = self.cache.first_key_value() else {
                break;
            };
            if !self.locs.contains_key(&idx) {
                break; // not yet written: must stay
            }
            if let Some((_, (_, size))) = self.cache.pop_first() {
                self.cache_bytes -= size;
            }
        }
    }
}

/// How much the log has grown: bytes of frames appended since open, and a signal each
/// time they cross another multiple of `every` (0: never).
#[derive(Debug, Default)]
pub(crate) struct Growth {
    bytes: AtomicU64,
    every: AtomicU64,
    /// Notified when another `every` bytes were appended.
    pub(crate) crossed: tokio::sync::Notify,
}

impl Growth {
    pub(crate) fn signal_every(&self, bytes: u64) {
        self.every.store(bytes, Ordering::Relaxed);
    }

    fn add(&self, n: u64) {
        let every = self.every.load(Ordering::Relaxed);
        let before = self.bytes.fetch_add(n, Ordering::Relaxed);
        if every > 0 && before / every != before.saturating_add(n) / every {
            self.crossed.notify_one();
        }
    }
}

/// The log: cheap to clone, clones share the files.
#[derive(Clone)]
pub(crate) struct Wal {
    dir: PathBuf,
    growth: Arc<Growth>,
    mem: Arc<Mutex<Mem>>,
    /// Locked before `mem` when both are.
    files: Arc<Mutex<Files>>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal").field("dir", &self.dir).finish()
    }
}

impl Wal {
    /// Opens the log in `dir`, recovering it; entries at or below `purged` are dropped.
    /// New segments grow up to `seg_size` bytes.
    /// The log's directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// How much the log has grown since open.
    pub(crate) fn growth(&self) -> Arc<Growth> {
        self.growth.clone()
    }

    pub(crate) fn open(dir: &Path, purged: Option<LogId>, seg_size: u64) -> Result<Wal, Damage> {
        Self::open_sized(dir, purged, seg_size)
    }

    fn open_sized(dir: &Path, purged: Option<LogId>, seg_size: u64) -> Result<Wal, Damage> {
        std::fs::create_dir_all(dir).map_err(|e| Damage::new(dir, e.to_string()))?;
        Redo::recover(dir)?;
        let mut segments = Vec::new();
        let listing = std::fs::read_dir(dir).map_err(|e| Damage::new(dir, e.to_string()))?;
        for item in listing {
            let item = item.map_err(|e| Damage::new(dir, e.to_string()))?;
            let name = item.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".tmp") {
                let _ = point().and_then(|()| std::fs::remove_file(item.path()));
            } else if let Some(n) = name.strip_suffix(".wal") {
                let first = n
                    .parse::<u64>()
                    .map_err(|_| Damage::new(&item.path(), "not a log segment name"))?;
                segments.push(first);
            }
        }
        segments.sort_unstable();
        let mut mem = Mem {
            last: purged,
            purged,
            ..Mem::default()
        };
        // Index of the first entry wanted (openraft's first entry is index 0).
        let floor = purged.map_or(0, |p| p.index + 1);
        let mut next = floor;
        let mut active = None;
        let count = segments.len();
        let mut kept = Vec::new();
        for (i, &seg) in segments.iter().enumerate() {
            let path = segment_path(dir, seg);
            let is_last = i + 1 == count;
            let bytes = std::fs::read(&path).map_err(|e| Damage::new(&path, e.to_string()))?;
            let mut off = 0usize;
            let mut first_seen = true;
            let end = loop {
                if off > bytes.len() {
                    return Err(Damage::new(
                        &path,
                        format!(
                            "the file ends at {} inside a frame's padding (truncated)",
                            bytes.len()
                        ),
                    ));
                }
                if off + HEADER > bytes.len() {
                    if bytes[off..].iter().any(|&b| b != 0) {
                        return Err(Damage::new(&path, format!("truncated frame at {off}")));
                    }
                    break off;
                }
                let h = &bytes[off..off + HEADER];
                if h.iter().all(|&b| b == 0) {
                    break off;
                }
                let bad = |why: String| -> Result<usize, Damage> {
                    // A torn last write: nothing valid may follow it.
                    let later = (off + 8..bytes.len().saturating_sub(HEADER))
                        .step_by(8)
                        .any(|o| header(&bytes[o..o + HEADER]).is_some());
                    if is_last && !later {
                        warn!(segment = %path.display(), offset = off, "cutting off a torn last log write");
                        Ok(off)
                    } else {
                        Err(Damage::new(&path, format!("{why} at offset {off}")))
                    }
                };
                let Some((first, n, len, pcrc)) = header(h) else {
                    break bad("bad frame header".into())?;
                };
                let stop = off + HEADER + len;
                if stop > bytes.len() {
                    return Err(Damage::new(
                        &path,
                        format!("frame at offset {off} runs past the end of the file (truncated)"),
                    ));
                }
                let payload = &bytes[off + HEADER..stop];
                if crc(payload) != pcrc {
                    break bad("bad frame checksum".into())?;
                }
                if first_seen && first != seg {
                    return Err(Damage::new(
                        &path,
                        format!("first frame starts at index {first}, the name says {seg}"),
                    ));
                }
                first_seen = false;
                let entries = decode_payload(payload, n).map_err(|e| Damage::new(&path, e))?;
                for (k, e) in entries.into_iter().enumerate() {
                    let idx = e.log_id.index;
                    if idx != first + k as u64 {
                        return Err(Damage::new(
                            &path,
                            format!("entry index {idx} out of order"),
                        ));
                    }
                    if idx < floor {
                        continue;
                    }
                    if idx != next {
                        return Err(Damage::new(
                            &path,
                            format!(
                                "log expects index {next} but finds {idx}: a segment is missing"
                            ),
                        ));
                    }
                    next = idx + 1;
                    mem.locs.insert(
                        idx,
                        Loc {
                            seg,
                            off: off as u64,
                        },
                    );
                    mem.last = Some(e.log_id);
                }
                off = stop.next_multiple_of(8);
            };
            if end == 0 && is_last {
                // An empty segment made just before a crash (perhaps shorter than it was
                // to be): it holds nothing, and the next append makes a new one.
                point()
                    .and_then(|()| std::fs::remove_file(&path))
                    .and_then(|()| sync_dir(dir))
                    .map_err(|e| Damage::new(&path, e.to_string()))?;
                continue;
            }
            if end == 0 && !is_last {
                return Err(Damage::new(&path, "an empty segment before the last"));
            }
            kept.push(seg);
            if is_last {
                // Zero whatever a torn write left behind the frames.
                let dirty = bytes[end..].iter().rposition(|&b| b != 0);
                let cap = bytes.len() as u64;
                if let Some(d) = dirty {
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(|e| Damage::new(&path, e.to_string()))?;
                    write_unsynced(&f, &path, &vec![0u8; d + 1], end as u64)
                        .and_then(|()| sync(&f, &path))
                        .map_err(|e| Damage::new(&path, e.to_string()))?;
                }
                let page_start = end - end % PAGE;
                let tail = bytes[page_start..end].to_vec();
                let (file, direct) = open_for_append(&path, &tail, page_start as u64)
                    .map_err(|e| Damage::new(&path, e.to_string()))?;
                active = Some(Active {
                    first: seg,
                    file,
                    direct,
                    pos: end as u64,
                    cap,
                    tail: if direct { tail } else { Vec::new() },
                });
            }
        }
        if kept.first().is_some_and(|&s| s > floor) {
            return Err(Damage::new(
                &segment_path(dir, kept[0]),
                format!(
                    "the log starts at index {} but entries from {floor} are needed",
                    kept[0],
                ),
            ));
        }
        let files = Files {
            dir: dir.to_owned(),
            segments: kept,
            active,
            scratch: Aligned::default(),
            seg_size,
            spare: None,
            failed: false,
        };
        Ok(Wal {
            dir: dir.to_owned(),
            growth: Arc::default(),
            mem: Arc::new(Mutex::new(mem)),
            files: Arc::new(Mutex::new(files)),
        })
    }

    fn files(&self) -> MutexGuard<'_, Files> {
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn mem(&self) -> MutexGuard<'_, Mem> {
        self.mem.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `entries` durably, in one frame (blocking).
    ///
    /// Why inline rather than on a writer thread: openraft 0.9 waits for each append to
    /// be flushed before the next, so a thread would add its wake-up (~30 µs here) to
    /// every write and overlap nothing.
    pub(crate) fn append(&self, entries: Vec<Entry>) -> io::Result<()> {
        let frame = encode(&entries)?;
        let first = entries.first().map_or(0, |e| e.log_id.index);
        let indexes: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
        let mut files = self.files();
        {
            let mut mem = self.mem();
            let per = frame.len() / entries.len().max(1);
            for e in entries {
                mem.last = Some(e.log_id);
                mem.cache_bytes += per;
                if let Some((_, old)) = mem.cache.insert(e.log_id.index, (e, per)) {
                    mem.cache_bytes -= old;
                }
            }
        }
        let loc = files.write(&frame, first).inspect_err(|e| {
            warn!(error = %e, "raft log write failed");
        })?;
        drop(files);
        self.growth.add(frame.len() as u64);
        let mut mem = self.mem();
        for i in indexes {
            mem.locs.insert(i, loc);
        }
        mem.evict();
        Ok(())
    }

    /// Removes every entry from `from` on (blocking).
    pub(crate) fn truncate(&self, from: u64) -> io::Result<()> {
        let mut files = self.files();
        let r = (|| {
            let Some(loc) = self.mem().locs.get(&from).copied() else {
                return Ok(());
            };
            let path = segment_path(&self.dir, loc.seg);
            let entries = read_frame(&File::open(&path)?, loc.off)?;
            let keep: Vec<Entry> = entries
                .into_iter()
                .filter(|e| e.log_id.index < from)
                .collect();
            files.truncate(loc, &keep)
        })();
        if r.is_err() {
            files.failed = true;
        }
        r?;
        {
            let mut m = self.mem();
            m.locs.split_off(&from);
            let dropped: usize = m.cache.split_off(&from).values().map(|(_, s)| s).sum();
            m.cache_bytes -= dropped;
        }
        drop(files);
        let prev = match from.checked_sub(1) {
            Some(p) => self.read(p, Some(from))?.pop().map(|e| e.log_id),
            None => None,
        };
        let mut mem = self.mem();
        mem.last = prev.or(mem.purged);
        Ok(())
    }

    /// Drops every entry up to `upto` (blocking); whole segments are deleted.
    /// Segment files close when the last clone is dropped.
    pub(crate) fn purge(&self, upto: LogId) -> io::Result<()> {
        {
            let mut mem = self.mem();
            mem.locs = mem.locs.split_off(&(upto.index + 1));
            let kept = mem.cache.split_off(&(upto.index + 1));
            let dropped: usize = mem.cache.values().map(|(_, s)| s).sum();
            mem.cache = kept;
            mem.cache_bytes -= dropped;
            mem.purged = Some(upto);
            if mem.last.is_none_or(|l| l.index < upto.index) {
                mem.last = Some(upto);
            }
        }
        self.files().purge(upto.index)
    }

    /// Entries `start..end` if all of them are in memory.
    pub(crate) fn read_cached(&self, start: u64, end: Option<u64>) -> Option<Vec<Entry>> {
        let mem = self.mem();
        let Some(last) = mem.last else {
            return Some(Vec::new());
        };
        let end = end.unwrap_or(last.index + 1).min(last.index + 1).max(start);
        let first = mem.purged.map_or(0, |p| p.index + 1).max(start);
        (first..end)
            .map(|i| mem.cache.get(&i).map(|(e, _)| e.clone()))
            .collect()
    }

    /// Entries `start..end` that exist (blocking when read from disk).
    pub(crate) fn read(&self, start: u64, end: Option<u64>) -> io::Result<Vec<Entry>> {
        enum Got {
            Entry(Entry),
            At(u64, Loc),
        }
        let got: Vec<Got> = {
            let mem = self.mem();
            let last = mem.last.map_or(0, |l| l.index + 1);
            let end = end.unwrap_or(last).min(last);
            (start..end.max(start))
                .filter_map(|i| match mem.cache.get(&i) {
                    Some((e, _)) => Some(Got::Entry(e.clone())),
                    None => mem.locs.get(&i).map(|l| Got::At(i, *l)),
                })
                .collect()
        };
        let mut out = Vec::with_capacity(got.len());
        let mut frame: Option<(Loc, Vec<Entry>)> = None;
        for g in got {
            match g {
                Got::Entry(e) => out.push(e),
                Got::At(i, loc) => {
                    if frame.as_ref().is_none_or(|(l, _)| *l != loc) {
                        let path = segment_path(&self.dir, loc.seg);
                        let f = File::open(&path)?;
                        let entries = read_frame(&f, loc.off)
                            .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
                        frame = Some((loc, entries));
                    }
                    if let Some((_, entries)) = &frame {
                        if let Some(e) = entries.iter().find(|e| e.log_id.index == i) {
                            out.push(e.clone());
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::storage::crash;
    use crate::types::Command;

    fn entry(i: u64, term: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), i),
            payload: EntryPayload::Normal(Command::Put {
                key: format!("k/{i}"),
                value: vec![b'v'; 300],
                expires_at_ms: None,
            }),
        }
    }

    fn indexes(w: &Wal, from: u64) -> Vec<u64> {
        w.read(from, None)
            .unwrap()
            .iter()
            .map(|e| e.log_id.index)
            .collect()
    }

    const SMALL: u64 = 64 << 10;

    /// Opening `dir` fails, naming `path`, for a reason that says `why`.
    fn refused(dir: &Path, path: &Path, why: &str) {
        let err = Wal::open_sized(dir, None, SMALL).unwrap_err();
        assert_eq!(err.path, path);
        assert!(err.reason.contains(why), "{}", err.reason);
    }

    /// A log in a temp dir with entries `0..n` of term 1, one frame each.
    fn filled(n: u64) -> (tempfile::TempDir, Wal) {
        let dir = tempfile::tempdir().unwrap();
        let w = Wal::open_sized(dir.path(), None, SMALL).unwrap();
        for i in 0..n {
            w.append(vec![entry(i, 1)]).unwrap();
        }
        (dir, w)
    }

    #[test]
    fn entries_survive_reopen_across_segments_and_are_read_from_disk() {
        let (dir, w) = filled(400);
        w.append((400..450).map(|i| entry(i, 1)).collect()).unwrap();
        let segments = std::fs::read_dir(dir.path()).unwrap().count();
        assert!(segments > 2, "{segments} segments");
        drop(w);
        let w = Wal::open_sized(dir.path(), None, SMALL).unwrap();
        assert_eq!(w.mem().last.unwrap().index, 449);
        assert_eq!(indexes(&w, 0), (0..450).collect::<Vec<_>>());
        // Nothing cached after a reopen: this read came from the frames.
        assert!(w.read_cached(10, Some(11)).is_none());
        let e = w.read(123, Some(124)).unwrap();
        assert_eq!(e, vec![entry(123, 1)]);
        w.append(vec![entry(450, 2)]).unwrap();
        assert_eq!(w.mem().last, Some(entry(450, 2).log_id));
    }

    #[test]
    fn a_torn_last_write_is_cut_off_and_zeroed() {
        let (dir, w) = filled(5);
        let end = w.files().active.as_ref().unwrap().pos;
        drop(w);
        // Half of a next frame reached the disk.
        let frame = encode(&[entry(5, 1)]).unwrap();
        let path = segment_path(dir.path(), 0);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&frame[..frame.len() / 2], end).unwrap();
        drop(f);
        let w = Wal::open_sized(dir.path(), None, SMALL).unwrap();
        assert_eq!(indexes(&w, 0), vec![0, 1, 2, 3, 4]);
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            bytes[end as usize..].iter().all(|&b| b == 0),
            "torn bytes left"
        );
        w.append(vec![entry(5, 1)]).unwrap();
        drop(w);
        let w = Wal::open_sized(dir.path(), None, SMALL).unwrap();
        assert_eq!(indexes(&w, 0), vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn damage_before_the_last_frame_is_refused() {
        let (dir, w) = filled(5);
        drop(w);
        let path = segment_path(dir.path(), 0);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER + 100] ^= 0x40; // inside the first entry
        std::fs::write(&path, &bytes).unwrap();
        refused(dir.path(), &path, "checksum");
    }

    #[test]
    fn a_missing_or_shortened_segment_is_refused() {
        let (dir, w) = filled(400);
        let segs = w.files().segments.clone();
        drop(w);
        assert!(segs.len() >= 3);
        let copy = tempfile::tempdir().unwrap();
        for s in &segs {
            std::fs::copy(segment_path(dir.path(), *s), segment_path(copy.path(), *s)).unwrap();
        }
        std::fs::remove_file(segment_path(dir.path(), segs[1])).unwrap();
        refused(dir.path(), &segment_path(dir.path(), segs[2]), "missing");
        // Cut inside the last frame of the first segment.
        let first = segment_path(copy.path(), segs[0]);
        let used = std::fs::read(&first)
            .unwrap()
            .iter()
            .rposition(|&b| b != 0)
            .unwrap();
        let f = OpenOptions::new().write(true).open(&first).unwrap();
        f.set_len(used as u64 - 10).unwrap();
        drop(f);
        refused(copy.path(), &first, "truncated");
    }

    #[test]
    fn truncate_rewrites_a_shared_frame_and_purge_deletes_whole_segments() {
        let (dir, w) = filled(300);
        w.append((300..310).map(|i| entry(i, 1)).collect()).unwrap();
        w.truncate(305).unwrap();
        assert_eq!(w.mem().last.unwrap().index, 304);
        w.append(vec![entry(305, 2)]).unwrap();
        w.truncate(200).unwrap();
        assert_eq!(w.mem().last.unwrap().index, 199);
        w.append(vec![entry(200, 3), entry(201, 3)]).unwrap();
        for i in 202..400 {
            w.append(vec![entry(i, 3)]).unwrap();
        }
        let before = w.files().segments.clone();
        assert!(before.len() >= 2, "{before:?}");
        let upto = entry(250, 3).log_id;
        w.purge(upto).unwrap();
        let after = w.files().segments.clone();
        assert!(after.len() < before.len(), "{before:?} -> {after:?}");
        assert!(
            after[0] <= 251,
            "a segment with unpurged entries was deleted"
        );
        drop(w);
        let w = Wal::open_sized(dir.path(), Some(upto), SMALL).unwrap();
        assert_eq!(indexes(&w, 251), (251..400).collect::<Vec<_>>());
        assert_eq!(w.read(200, Some(202)).unwrap(), vec![]);
        assert_eq!(w.read(300, Some(301)).unwrap(), vec![entry(300, 3)]);
        assert_eq!(w.mem().purged, Some(upto));
    }

    /// A segment cut inside the zero padding after its last frame is refused, naming
    /// the file (it used to panic slicing past the end).
    #[test]
    fn a_segment_cut_inside_padding_is_refused_not_a_panic() {
        let (dir, w) = filled(3);
        let off = w.mem().locs[&2].off as usize;
        drop(w);
        let path = segment_path(dir.path(), 0);
        let bytes = std::fs::read(&path).unwrap();
        let stop = off + HEADER + u32_at(&bytes, off + 20) as usize;
        assert_ne!(stop % 8, 0, "the test needs a frame with padding");
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(stop as u64).unwrap();
        drop(f);
        refused(dir.path(), &path, "padding");
    }

    /// A truncation that cuts a shared frame, crashed at each step: before its intent
    /// is durable, with the intent torn, after it, with the frame zeroed, with the kept
    /// entries' frame half written, and before the intent is removed. The reopened log
    /// holds every entry before the cut (the truncation finished) or every entry (it had
    /// not begun), never fewer; appends go on after it.
    #[test]
    fn a_truncation_survives_a_crash_at_every_step() {
        for step in 0..6 {
            let (dir, w) = filled(20);
            w.append((20..30).map(|i| entry(i, 1)).collect()).unwrap();
            let loc = w.mem().locs[&25];
            let end = w.files().active.as_ref().unwrap().pos;
            drop(w);
            let keep: Vec<Entry> = (20..25).map(|i| entry(i, 1)).collect();
            let redo = Redo {
                seg: loc.seg,
                off: loc.off,
                old_end: end,
                frame: encode(&keep).unwrap(),
            };
            let path = segment_path(dir.path(), loc.seg);
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            let zero = || {
                f.write_all_at(&vec![0u8; (end - loc.off) as usize], loc.off)
                    .unwrap()
            };
            let finished = step >= 2;
            match step {
                0 => {}
                1 => {
                    let bytes = redo.encode();
                    std::fs::write(dir.path().join(REDO), &bytes[..bytes.len() / 2]).unwrap();
                }
                2 => redo.write(dir.path()).unwrap(),
                3 => {
                    redo.write(dir.path()).unwrap();
                    zero();
                }
                4 => {
                    redo.write(dir.path()).unwrap();
                    zero();
                    f.write_all_at(&redo.frame[..redo.frame.len() / 2], loc.off)
                        .unwrap();
                }
                _ => {
                    redo.write(dir.path()).unwrap();
                    redo.apply(dir.path()).unwrap();
                }
            }
            drop(f);
            let w = Wal::open_sized(dir.path(), None, SMALL)
                .unwrap_or_else(|e| panic!("step {step}: {e:?}"));
            let last = if finished { 25 } else { 30 };
            assert_eq!(indexes(&w, 0), (0..last).collect::<Vec<_>>(), "step {step}");
            assert!(!dir.path().join(REDO).exists(), "step {step}");
            w.append(vec![entry(last, 2)]).unwrap();
            drop(w);
            let w = Wal::open_sized(dir.path(), None, SMALL).unwrap();
            assert_eq!(
                indexes(&w, 0),
                (0..=last).collect::<Vec<_>>(),
                "step {step}"
            );
        }
    }

    /// A truncation through the real path leaves no intent behind and reopens cut.
    #[test]
    fn truncate_removes_its_intent() {
        let (dir, w) = filled(20);
        w.append((20..30).map(|i| entry(i, 1)).collect()).unwrap();
        w.truncate(25).unwrap();
        assert!(!dir.path().join(REDO).exists());
        drop(w);
        let w = Wal::open_sized(dir.path(), None, SMALL).unwrap();
        assert_eq!(indexes(&w, 0), (0..25).collect::<Vec<_>>());
    }

    /// An entry with a 4 KB value: sixteen fill a small segment.
    fn big(i: u64, term: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), i),
            payload: EntryPayload::Normal(Command::Put {
                key: format!("k/{i}"),
                value: vec![b'v'; 4000],
                expires_at_ms: None,
            }),
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// One frame of these (index, term).
        Append(Vec<(u64, u64)>),
        Truncate(u64),
        Purge(u64),
    }

    /// Appends one by one across segments (with spare segments made behind), a frame
    /// of several, a truncation inside that frame (the redo record), one that drops
    /// whole segments, purges (of whole segments, and close to the end as after a
    /// snapshot install), with appends between.
    fn workload() -> Vec<Step> {
        let one = |r: std::ops::Range<u64>, t| r.map(move |i| Step::Append(vec![(i, t)]));
        let mut v: Vec<Step> = one(0..40, 1).collect();
        v.push(Step::Append((40..48).map(|i| (i, 1)).collect()));
        v.push(Step::Truncate(44));
        v.push(Step::Append((44..52).map(|i| (i, 2)).collect()));
        v.push(Step::Truncate(20));
        v.extend(one(20..36, 3));
        v.push(Step::Purge(10));
        v.extend(one(36..60, 3));
        v.push(Step::Purge(50));
        v.push(Step::Append(vec![(60, 3)]));
        v
    }

    type Model = BTreeMap<u64, u64>;

    fn apply(m: &mut Model, step: &Step) {
        match step {
            Step::Append(es) => m.extend(es.iter().copied()),
            Step::Truncate(from) => drop(m.split_off(from)),
            Step::Purge(_) => {}
        }
    }

    /// Runs the workload with a crash at operation `at` (never: `u64::MAX`); returns the
    /// spent plan (operations counted, what tore or was lost), the model after the last
    /// completed step, the step the crash stopped (if any), and the purge point made
    /// durable (the store writes it first).
    fn run(
        dir: &Path,
        at: u64,
        (torn, lose): (bool, bool),
    ) -> (crash::Plan, Model, Option<Step>, Option<LogId>) {
        crash::arm(Some(crash::Plan {
            at,
            torn,
            lose,
            ..Default::default()
        }));
        let w = Wal::open_sized(dir, None, SMALL).unwrap();
        let mut model = Model::new();
        let mut purged = None;
        let mut stopped = None;
        for step in workload() {
            let done = match &step {
                Step::Append(es) => w.append(es.iter().map(|&(i, t)| big(i, t)).collect()),
                Step::Truncate(from) => w.truncate(*from),
                Step::Purge(upto) => {
                    let id = LogId::new(CommittedLeaderId::new(model[upto], 1), *upto);
                    purged = Some(id);
                    w.purge(id)
                }
            };
            if done.is_err() {
                stopped = Some(step);
                break;
            }
            apply(&mut model, &step);
        }
        let plan = crash::arm(None).unwrap();
        drop(w);
        (plan, model, stopped, purged)
    }

    fn held(w: &Wal, floor: u64) -> Model {
        w.read(floor, None)
            .unwrap()
            .iter()
            .map(|e| (e.log_id.index, e.log_id.leader_id.term))
            .collect()
    }

    fn copy_dir(from: &Path) -> tempfile::TempDir {
        let to = tempfile::tempdir().unwrap();
        for item in std::fs::read_dir(from).unwrap() {
            let item = item.unwrap();
            std::fs::copy(item.path(), to.path().join(item.file_name())).unwrap();
        }
        to
    }

    /// Copies of the crashed log in `dir`, each crashed again at one file operation of
    /// its reopening (finishing a truncation, zeroing a torn tail, removing leftovers),
    /// cleanly and torn.
    fn crashed_in_recovery(dir: &Path, purged: Option<LogId>) -> Vec<(String, tempfile::TempDir)> {
        let probe = copy_dir(dir);
        crash::arm(Some(crash::Plan {
            at: u64::MAX,
            ..Default::default()
        }));
        let opened = Wal::open_sized(probe.path(), purged, SMALL);
        let ops = crash::arm(None).unwrap().count;
        drop(opened);
        let mut out = Vec::new();
        for torn in [false, true] {
            for at in 1..=ops {
                let copy = copy_dir(dir);
                crash::arm(Some(crash::Plan {
                    at,
                    torn,
                    ..Default::default()
                }));
                drop(Wal::open_sized(copy.path(), purged, SMALL));
                crash::arm(None);
                out.push((
                    format!("at operation {at}/{ops} of reopening (torn {torn})"),
                    copy,
                ));
            }
        }
        out
    }

    /// Every operation that changes the log's files, in turn, is where the process
    /// dies (cleanly, and with a torn write), and then each operation of the reopening
    /// that follows: the log must reopen, hold what the completed steps left (a stopped
    /// append all or nothing; a stopped truncation a prefix of the log before it, at
    /// least down to the cut; a purge changes nothing above the purge point), and take
    /// appends again.
    #[test]
    fn the_log_reopens_whole_after_a_crash_at_every_file_operation() {
        let total = run(
            tempfile::tempdir().unwrap().path(),
            u64::MAX,
            (false, false),
        )
        .0
        .count;
        let mut tears = 0;
        let mut lost = 0;
        assert!(
            total > 100,
            "only {total} operations: the workload is too small"
        );
        let mut recoveries = 0;
        // Clean, torn, and losing the writes not yet synced.
        for (torn, lose) in [(false, false), (true, false), (false, true)] {
            for at in 1..=total {
                let dir = tempfile::tempdir().unwrap();
                let (ran, before, stopped, purged) = run(dir.path(), at, (torn, lose));
                tears += usize::from(ran.tore);
                lost += ran.lost;
                let step = stopped.unwrap_or_else(|| panic!("no crash at {at}"));
                let floor = purged.map_or(0, |p| p.index + 1);
                let keep =
                    |m: &Model| -> Model { m.range(floor..).map(|(i, t)| (*i, *t)).collect() };
                let mut after = before.clone();
                apply(&mut after, &step);
                let (before, after) = (keep(&before), keep(&after));
                let what = format!(
                    "crash at operation {at}/{total} (torn {torn}, lose {lose}) in {step:?}"
                );
                let again = if lose {
                    Vec::new()
                } else {
                    crashed_in_recovery(dir.path(), purged)
                };
                recoveries += again.len();
                let dirs = std::iter::once((what.clone(), dir)).chain(
                    again
                        .into_iter()
                        .map(|(m, d)| (format!("{what}, then {m}"), d)),
                );
                for (what, dir) in dirs {
                    let w = Wal::open_sized(dir.path(), purged, SMALL)
                        .unwrap_or_else(|e| panic!("{what}: the log does not reopen: {e:?}"));
                    let got = held(&w, floor);
                    let ok = match &step {
                        // A prefix of the log before, cut no lower than the truncation.
                        Step::Truncate(from) => {
                            let end = got.keys().max().map_or(floor, |m| m + 1);
                            let prefix: Model =
                                before.range(..end).map(|(i, t)| (*i, *t)).collect();
                            let lowest = before.keys().max().map_or(floor, |m| m + 1).min(*from);
                            got == prefix && end >= lowest
                        }
                        _ => got == before || got == after,
                    };
                    let keys = |m: &Model| m.keys().copied().collect::<Vec<_>>();
                    assert!(
                        ok,
                        "{what}: the log holds {:?}, want {:?} or {:?}",
                        keys(&got),
                        keys(&before),
                        keys(&after)
                    );
                    let last = w.mem().last.map(|l| l.index);
                    let want = got.keys().max().copied().or(purged.map(|p| p.index));
                    assert_eq!(last, want, "{what}: the reopened log's last entry");
                    // Appends (across a new segment) and a purge up to them work on.
                    let next = got.keys().max().map_or(floor, |m| m + 1);
                    for i in next..next + 20 {
                        w.append(vec![big(i, 9)])
                            .unwrap_or_else(|e| panic!("{what}: no append after reopening: {e}"));
                    }
                    let upto = LogId::new(CommittedLeaderId::new(9, 1), next + 17);
                    w.purge(upto)
                        .unwrap_or_else(|e| panic!("{what}: no purge after reopening: {e}"));
                    drop(w);
                    let w = Wal::open_sized(dir.path(), Some(upto), SMALL)
                        .unwrap_or_else(|e| panic!("{what}: no reopening after a purge: {e:?}"));
                    let tail: Vec<_> = held(&w, next + 18).into_iter().collect();
                    assert_eq!(
                        tail,
                        [(next + 18, 9), (next + 19, 9)],
                        "{what}: the appends after the crash are lost"
                    );
                }
            }
        }
        // Appends are writes of whole frames: a good share of torn crashes tear one.
        assert!(tears > 50, "only {tears} torn writes landed in part");
        assert!(lost > 10, "only {lost} unsynced writes were lost");
        assert!(
            recoveries > 0,
            "no reopening had a file operation to crash in"
        );
    }
}
