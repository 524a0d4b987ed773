//! Crash points for the log's crash tests (nothing outside tests).
//!
//! Every operation that changes the log's files goes through [`point`] or
//! [`write_at`]. A test arms a `Plan` on its thread: the `n`-th such operation fails
//! (a write may first tear, in whole 512-byte sectors), and so does every later one, as
//! if the process had died there. The model: every operation before it reached the disk
//! (appends are `O_DSYNC`, everything else is synced before the next step depends on
//! it); losing unsynced page-cache writes is the simulated disk's business (issue 18).
//! Another thread's operations (the spare segment made in the background, into a
//! `.tmp` file open removes) are not counted.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

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
}

#[cfg(test)]
mod imp {
    use std::cell::RefCell;

    pub(super) enum Cut {
        Go,
        Torn,
    }

    /// A crash at operation `at` (counted from 1; `u64::MAX`: none, only count), torn
    /// if it is a write; `count`: the operations seen; `tore`: part of a write landed.
    #[derive(Debug, Default, Clone)]
    pub(crate) struct Plan {
        pub(crate) at: u64,
        pub(crate) torn: bool,
        pub(crate) count: u64,
        pub(crate) dead: bool,
        pub(crate) tore: bool,
    }

    thread_local! {
        static PLAN: RefCell<Option<Plan>> = const { RefCell::new(None) };
    }

    /// Arms `plan` on this thread (`None` disarms); returns the one it replaces.
    pub(crate) fn arm(plan: Option<Plan>) -> Option<Plan> {
        PLAN.with(|p| std::mem::replace(&mut *p.borrow_mut(), plan))
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
