//! Store revisions.

use std::fmt;

/// A store revision: the store's own counter of committed write transactions.
///
/// Revisions are strictly increasing within one event stream (per source, in a composite),
/// except at a resync with [`crate::ResyncReason::StoreReset`]: the store itself went
/// back (restored from a backup).
/// [`Revision::ZERO`] means "before any write".
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Revision(pub u64);

impl Revision {
    /// The revision of an empty store.
    pub const ZERO: Revision = Revision(0);

    /// The revision as a number.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The next revision.
    #[must_use]
    pub fn next(self) -> Revision {
        // Saturating: a revision from outside (one to resume after) may be the last.
        Revision(self.0.saturating_add(1))
    }
}

impl fmt::Debug for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl From<u64> for Revision {
    fn from(r: u64) -> Self {
        Revision(r)
    }
}
