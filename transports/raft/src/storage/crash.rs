//! Crash points for the storage's crash tests (nothing outside tests), and the hooks of
//! the simulated disk ([`super::disk`]).
//!
//! Every operation that changes the log's files or redb's goes through [`point`] or
//! [`write_at`]. A test arms a `Plan` on its thread: the `n`-th such operation fails
//! (a write may first tear, in whole sectors), and so does every later one, as if the
//! process had died there. Appends are `O_DSYNC`: durable once written. Other writes
//! ([`write_unsynced`]) are durable at their file's next [`sync`]; with `lose`, a crash
//! undoes every such write not yet synced. Directory operations count as durable at once; reordering them is
//! the simulated disk's business (issue 18).
//! Another thread's operations (the spare segment made in the background, into a
//! `.tmp` file open removes) are not counted.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::disk;

/// Where a test may stop the process: before an operation that changes the log's files.
pub(crate) fn point() -> io::Result<()> {
    imp::hit(false).map(drop)
}

/// `f.write_all_at(buf, at)`; at a test's crash point, none of it or (torn) a part.
pub(crate) fn write_at(f: &File, buf: &[u8], at: u64) -> io::Result<()> {
    if let imp::Cut::Torn = imp::hit(true)? {
        // Whole sectors, as a disk tears: 512 bytes, or 4 KiB where `O_DIRECT` asks for
        // whole 4 KiB blocks.
        for sector in [512, 4096] {
            let part = buf.len() / 2 / sector * sector;
            if part > 0 && f.write_all_at(&buf[..part], at).is_ok() {
                imp::tore();
                break;
            }
        }
        return Err(crashed());
    }
    f.write_all_at(buf, at)
}

/// [`write_at`] for a write that is durable only once its file is [`sync`]ed.
pub(crate) fn write_unsynced(f: &File, path: &Path, buf: &[u8], at: u64) -> io::Result<()> {
    imp::remember(path, at, buf.len());
    disk::before_write(path, at, buf)?;
    write_at(f, buf, at)
}

/// `f.set_len(len)`, durable once the file is synced.
pub(crate) fn set_len(f: &File, path: &Path, len: u64) -> io::Result<()> {
    point()?;
    imp::remember(path, len, usize::MAX);
    disk::before_set_len(path, len)?;
    f.set_len(len)
}

/// `f.sync_all()`: the writes before it are durable.
pub(crate) fn sync(f: &File, path: &Path) -> io::Result<()> {
    point()?;
    f.sync_all()?;
    imp::synced(path);
    disk::synced(path)
}

/// `f.sync_data()`: the writes before it are durable.
pub(crate) fn sync_data(f: &File, path: &Path) -> io::Result<()> {
    point()?;
    f.sync_data()?;
    imp::synced(path);
    disk::synced(path)
}

fn crashed() -> io::Error {
    io::Error::other("crash point")
}

#[cfg(test)]
pub(crate) use imp::{Plan, arm};

#[cfg(not(test))]
mod imp {
    #[allow(dead_code)] // `Torn` comes only from the tests' plans
    pub(super) enum Cut {
        Go,
        Torn,
    }

    #[inline]
    pub(super) fn hit(_write: bool) -> std::io::Result<Cut> {
        Ok(Cut::Go)
    }

    pub(super) fn tore() {}

    #[inline]
    pub(super) fn remember(_path: &std::path::Path, _at: u64, _len: usize) {}

    #[inline]
    pub(super) fn synced(_path: &std::path::Path) {}
}

#[cfg(test)]
mod imp {
    use std::cell::RefCell;
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};

    pub(super) enum Cut {
        Go,
        Torn,
    }

    /// A crash at operation `at` (counted from 1; `u64::MAX`: none, only count), torn
    /// if it is a write, losing the unsynced writes if `lose`; `count`: the operations
    /// seen; `tore`: part of a write landed; `lost`: unsynced writes undone.
    #[derive(Debug, Default, Clone)]
    pub(crate) struct Plan {
        pub(crate) at: u64,
        pub(crate) torn: bool,
        pub(crate) lose: bool,
        pub(crate) count: u64,
        pub(crate) dead: bool,
        pub(crate) tore: bool,
        pub(crate) lost: usize,
        /// Unsynced writes: the file, where, and its bytes there and length before.
        pub(crate) pending: Vec<(PathBuf, u64, Vec<u8>, u64)>,
    }

    thread_local! {
        static PLAN: RefCell<Option<Plan>> = const { RefCell::new(None) };
    }

    /// Arms `plan` on this thread (`None` disarms); returns the one it replaces, after
    /// undoing its unsynced writes if it crashed with `lose`.
    pub(crate) fn arm(plan: Option<Plan>) -> Option<Plan> {
        let mut old = PLAN.with(|p| std::mem::replace(&mut *p.borrow_mut(), plan))?;
        if old.dead && old.lose {
            for (path, at, bytes, len) in old.pending.drain(..).rev() {
                undo(&path, at, &bytes, len).expect("undoing an unsynced write");
                old.lost += 1;
            }
        }
        Some(old)
    }

    fn undo(path: &Path, at: u64, bytes: &[u8], len: u64) -> std::io::Result<()> {
        let Ok(f) = std::fs::OpenOptions::new().write(true).open(path) else {
            return Ok(()); // removed since: nothing to undo
        };
        f.write_all_at(bytes, at)?;
        if f.metadata()?.len() > len {
            f.set_len(len)?;
        }
        Ok(())
    }

    pub(super) fn remember(path: &Path, at: u64, len: usize) {
        PLAN.with(|p| {
            let mut p = p.borrow_mut();
            let Some(plan) = p.as_mut().filter(|p| p.lose && !p.dead) else {
                return;
            };
            let (old, old_len) =
                super::super::disk::read_range(path, at, len as u64).unwrap_or_default();
            plan.pending.push((path.to_owned(), at, old, old_len));
        })
    }

    pub(super) fn synced(path: &Path) {
        PLAN.with(|p| {
            if let Some(plan) = p.borrow_mut().as_mut() {
                plan.pending.retain(|(p, ..)| p != path);
            }
        })
    }

    pub(super) fn tore() {
        PLAN.with(|p| {
            if let Some(plan) = p.borrow_mut().as_mut() {
                plan.tore = true;
            }
        })
    }

    pub(super) fn hit(write: bool) -> std::io::Result<Cut> {
        PLAN.with(|p| {
            let mut p = p.borrow_mut();
            let Some(plan) = p.as_mut() else {
                return Ok(Cut::Go);
            };
            if plan.dead {
                return Err(super::crashed());
            }
            plan.count += 1;
            if plan.count != plan.at {
                return Ok(Cut::Go);
            }
            plan.dead = true;
            if write && plan.torn {
                Ok(Cut::Torn)
            } else {
                Err(super::crashed())
            }
        })
    }
}
