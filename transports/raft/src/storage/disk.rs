//! A disk that loses what was not synced (feature `testing`, for the simulation), and the
//! hooks the crash layer ([`super::crash`]) calls on every change to the store's files
//! (no-ops without the feature).

#[cfg(feature = "testing")]
pub use sim::{Disk, Loss, Lost};
#[cfg(feature = "testing")]
pub(crate) use sim::{before_set_len, before_write, check, pause, synced};

/// The bytes of `path` at `at..at + len` that exist, and the file's length (none, 0 for
/// a missing file): what an unsynced change overwrites, for the crash layers to undo.
#[cfg(any(test, feature = "testing"))]
pub(super) fn read_range(
    path: &std::path::Path,
    at: u64,
    len: u64,
) -> std::io::Result<(Vec<u8>, u64)> {
    use std::os::unix::fs::FileExt;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    let file_len = f.metadata()?.len();
    let have = file_len.saturating_sub(at).min(len);
    let mut buf = vec![0u8; have as usize];
    f.read_exact_at(&mut buf, at)?;
    Ok((buf, file_len))
}

#[cfg(not(feature = "testing"))]
mod off {
    use std::path::Path;

    #[inline]
    pub(crate) fn before_write(_path: &Path, _at: u64, _buf: &[u8]) -> std::io::Result<()> {
        Ok(())
    }

    #[inline]
    pub(crate) fn before_set_len(_path: &Path, _len: u64) -> std::io::Result<()> {
        Ok(())
    }

    #[inline]
    pub(crate) fn synced(_path: &Path) -> std::io::Result<()> {
        Ok(())
    }

    #[inline]
    pub(crate) fn check(_path: &Path) -> std::io::Result<()> {
        Ok(())
    }

    #[inline]
    pub(crate) async fn pause(_path: &Path) {}
}
#[cfg(not(feature = "testing"))]
pub(crate) use off::{before_set_len, before_write, check, pause, synced};

#[cfg(feature = "testing")]
mod sim {
    use std::collections::BTreeMap;
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex, MutexGuard};

    /// The disks a simulation registered (none elsewhere: every call is then one check
    /// of an empty list).
    static DISKS: Mutex<Vec<Arc<Disk>>> = Mutex::new(Vec::new());

    /// A simulated disk under a data directory: the store's files are real, but what was
    /// written to one since its last sync is kept apart, and [`Disk::crash`] loses it as
    /// power loss does (all of it, none, or a seeded choice of writes, some torn at a
    /// 512-byte sector). Until [`Disk::restart`], every change to its files fails, so a
    /// crashed member's handles (redb's close on drop) change nothing.
    ///
    /// Writes the log makes with `O_DSYNC` are durable when they return and are not kept
    /// apart (a down or failing disk refuses them); directory operations (create,
    /// rename, remove) count as durable at once and are not refused. Unsynced changes are
    /// kept by path: a file removed or renamed before its sync is not followed (the
    /// store syncs the files it renames, and never removes redb's).
    #[derive(Debug)]
    pub struct Disk {
        dir: PathBuf,
        state: Mutex<State>,
    }

    #[derive(Debug, Default)]
    struct State {
        down: bool,
        /// Changes still to fail (see [`Disk::fail`]), and failed so far.
        failing: u32,
        failed: u64,
        /// How long each of the log's writes takes (see [`Disk::slow`]).
        slow: std::time::Duration,
        /// Per file, the changes since its last sync, oldest first.
        unsynced: BTreeMap<PathBuf, Vec<Change>>,
    }

    #[derive(Debug)]
    enum Change {
        /// `new` written at `at`, over `old` (the bytes there before; shorter where the
        /// file was) in a file `len` long before.
        Write {
            at: u64,
            old: Vec<u8>,
            new: Vec<u8>,
            len: u64,
        },
        /// The length set to `to` from `len`, `tail` the bytes a shrink cut off.
        SetLen { len: u64, to: u64, tail: Vec<u8> },
    }

    /// What a crash does with the writes not yet synced.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Loss {
        /// Keeps them all (the process died, the machine did not).
        None,
        /// Loses every write (resizes are kept, as a journaling file system keeps its
        /// metadata).
        All,
        /// Keeps each with even odds, and tears one in four kept (a prefix of whole
        /// sectors lands): the seed chooses.
        Some(u64),
    }

    /// What a crash lost.
    #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
    pub struct Lost {
        /// Unsynced writes (and resizes) in all.
        pub unsynced: usize,
        /// Of those, undone.
        pub lost: usize,
        /// Of those, kept in part.
        pub torn: usize,
    }

    impl Disk {
        /// Puts the files under `dir` on a simulated disk, for the rest of the process.
        pub fn register(dir: &Path) -> Arc<Disk> {
            let disk = Arc::new(Disk {
                dir: dir.to_owned(),
                state: Mutex::new(State::default()),
            });
            lock(&DISKS).push(Arc::clone(&disk));
            disk
        }

        /// The machine stops: what was not synced is lost as `loss` says, and the files
        /// refuse changes until [`Disk::restart`].
        ///
        /// # Panics
        /// When the files cannot be put back (the test cannot go on).
        pub fn crash(&self, loss: Loss) -> Lost {
            let mut state = lock(&self.state);
            state.down = true;
            state.failing = 0;
            let mut rng = match loss {
                Loss::Some(seed) => Some(fastrand::Rng::with_seed(seed)),
                _ => None,
            };
            let mut lost = Lost::default();
            for (path, changes) in std::mem::take(&mut state.unsynced) {
                let keep: Vec<Option<usize>> = changes
                    .iter()
                    .map(|c| {
                        lost.unsynced += 1;
                        let kept = match (&mut rng, c) {
                            (_, Change::SetLen { .. }) => Some(usize::MAX),
                            (None, _) if loss == Loss::None => Some(usize::MAX),
                            (None, _) => None,
                            (Some(rng), Change::Write { new, .. }) => {
                                if rng.bool() {
                                    None
                                } else if new.len() > 512 && rng.u8(..4) == 0 {
                                    lost.torn += 1;
                                    Some(rng.usize(1..new.len().div_ceil(512)) * 512)
                                } else {
                                    Some(usize::MAX)
                                }
                            }
                        };
                        if kept.is_none() {
                            lost.lost += 1;
                        }
                        kept
                    })
                    .collect();
                if keep.iter().all(|k| *k == Some(usize::MAX)) {
                    continue;
                }
                undo(&path, &changes, &keep)
                    .unwrap_or_else(|e| panic!("putting back {}: {e}", path.display()));
            }
            lost
        }

        /// The machine is back: its files take changes again.
        pub fn restart(&self) {
            lock(&self.state).down = false;
        }

        /// The next `n` changes to its files (writes, resizes, syncs, the log's
        /// durable writes) fail with an I/O error, as a failing disk's do, until the
        /// next crash. A failed sync leaves what it was to make durable unsynced (a
        /// crash may lose it).
        pub fn fail(&self, n: u32) {
            lock(&self.state).failing = n;
        }

        /// Changes that failed as [`Disk::fail`] asked.
        pub fn failures(&self) -> u64 {
            lock(&self.state).failed
        }

        /// Each of the log's operations (appends, and the reads, truncations and
        /// purges that go through its blocking helper) takes `by` of simulated time
        /// from now on (zero: none; the simulation's time does not pass during I/O
        /// otherwise).
        pub fn slow(&self, by: std::time::Duration) {
            lock(&self.state).slow = by;
        }
    }

    impl State {
        /// Whether the next change may go ahead.
        fn admit(&mut self) -> std::io::Result<()> {
            if self.down {
                return Err(down());
            }
            if self.failing > 0 {
                self.failing -= 1;
                self.failed += 1;
                return Err(std::io::Error::other("simulated disk failure"));
            }
            Ok(())
        }
    }

    /// Takes every change back to the last sync, then makes again the kept ones (whole,
    /// or the first `n` bytes of a torn write).
    fn undo(path: &Path, changes: &[Change], keep: &[Option<usize>]) -> std::io::Result<()> {
        let f = match std::fs::OpenOptions::new().write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for c in changes.iter().rev() {
            match c {
                Change::Write { at, old, len, .. } => {
                    f.write_all_at(old, *at)?;
                    f.set_len(*len)?;
                }
                Change::SetLen { len, to, tail } => {
                    f.set_len(*len)?;
                    f.write_all_at(tail, *to)?;
                }
            }
        }
        for (c, k) in changes.iter().zip(keep) {
            match (c, k) {
                (_, None) => {}
                (Change::Write { at, new, .. }, Some(n)) => {
                    f.write_all_at(&new[..(*n).min(new.len())], *at)?
                }
                (Change::SetLen { to, .. }, Some(_)) => f.set_len(*to)?,
            }
        }
        Ok(())
    }

    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn disk_of(path: &Path) -> Option<Arc<Disk>> {
        let disks = lock(&DISKS);
        if disks.is_empty() {
            return None;
        }
        disks.iter().find(|d| path.starts_with(&d.dir)).cloned()
    }

    fn down() -> std::io::Error {
        std::io::Error::other("the simulated machine is down")
    }

    use super::read_range;

    /// Before `buf` is written at `at` without a sync: keeps what it overwrites.
    pub(crate) fn before_write(path: &Path, at: u64, buf: &[u8]) -> std::io::Result<()> {
        let Some(disk) = disk_of(path) else {
            return Ok(());
        };
        let mut state = lock(&disk.state);
        state.admit()?;
        let (old, len) = read_range(path, at, buf.len() as u64)?;
        state
            .unsynced
            .entry(path.to_owned())
            .or_default()
            .push(Change::Write {
                at,
                old,
                new: buf.to_vec(),
                len,
            });
        Ok(())
    }

    /// Before `path` is resized to `to`: keeps what a shrink cuts off.
    pub(crate) fn before_set_len(path: &Path, to: u64) -> std::io::Result<()> {
        let Some(disk) = disk_of(path) else {
            return Ok(());
        };
        let mut state = lock(&disk.state);
        state.admit()?;
        let (tail, len) = read_range(path, to, u64::MAX)?;
        let len = len.max(tail.len() as u64);
        state
            .unsynced
            .entry(path.to_owned())
            .or_default()
            .push(Change::SetLen { len, to, tail });
        Ok(())
    }

    /// After `path` was synced: its changes are durable (unless the sync fails).
    pub(crate) fn synced(path: &Path) -> std::io::Result<()> {
        let Some(disk) = disk_of(path) else {
            return Ok(());
        };
        let mut state = lock(&disk.state);
        state.admit()?;
        state.unsynced.remove(path);
        Ok(())
    }

    /// Before the log under `path` writes: the disk's slowness, in simulated time.
    pub(crate) async fn pause(path: &Path) {
        let by = disk_of(path)
            .map(|d| lock(&d.state).slow)
            .unwrap_or_default();
        if !by.is_zero() {
            tokio::time::sleep(by).await;
        }
    }

    /// Before a durable change under `path` (the log's `O_DSYNC` writes).
    pub(crate) fn check(path: &Path) -> std::io::Result<()> {
        match disk_of(path) {
            Some(disk) => lock(&disk.state).admit(),
            None => Ok(()),
        }
    }
}
