//! Errors of store operations and watch streams.

use std::time::Duration;

use crate::done::BoxError;
use crate::{KeyError, Revision, Source};

/// A `Result` of a store operation.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A store operation failed.
///
/// "This call failed" ([`is_retryable`](Self::is_retryable) tells whether trying again may
/// help) is kept apart from "this store has stopped" ([`StoreError::Stopped`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The key or prefix is invalid, or the backend cannot represent it.
    #[error("invalid key")]
    InvalidKey(#[from] KeyError),
    /// The value is larger than the store accepts.
    #[error("value is {size} bytes, the limit is {max}")]
    ValueTooLarge {
        /// Size of the rejected value.
        size: usize,
        /// The store's limit.
        max: usize,
    },
    /// A TTL of zero (TTLs are never rounded to zero, and zero is refused) or longer
    /// than [`MAX_TTL`](crate::MAX_TTL).
    #[error("TTL must be positive and at most ten years (MAX_TTL), got {0:?}")]
    InvalidTtl(Duration),
    /// The requested revision is older than the retained history.
    #[error("revision {requested} is compacted (history starts after {compacted})")]
    Compacted {
        /// The revision asked for.
        requested: Revision,
        /// The newest compacted revision.
        compacted: Revision,
    },
    /// The requested revision is newer than the store.
    #[error("revision {requested} is in the future (store is at {current})")]
    FutureRevision {
        /// The revision asked for.
        requested: Revision,
        /// The store's revision.
        current: Revision,
    },
    /// The store cannot be reached now; trying again may succeed.
    #[error("store unavailable")]
    Unavailable(#[source] BoxError),
    /// The operation did not finish in time; its outcome is unknown.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The operation is not supported by this store.
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    /// Stored data failed a check: the store refuses to serve it.
    #[error("corrupted data: {0}")]
    Corrupted(String),
    /// The store has stopped (closed or failed fatally); this handle will not recover.
    #[error("store stopped")]
    Stopped,
    /// The store did not accept the credentials (a wrong password or secret, none
    /// given where they are required, an expired token). Not retryable.
    #[error("not authenticated")]
    Unauthenticated(#[source] BoxError),
    /// A read-modify-write ([`crate::WriterExt::update`]) met a conflict on every one of
    /// this many attempts: the key is changing too fast. Retryable.
    #[error("the key changed under each of {0} attempts")]
    Contended(u32),
    /// The credentials were accepted but do not allow this operation. Not retryable.
    #[error("permission denied")]
    PermissionDenied(#[source] BoxError),
    /// A transaction the store will not apply as given (a branch that writes one key
    /// twice, too many operations): see [`Txn::validate`](crate::Txn::validate). Not
    /// retryable.
    #[error("invalid transaction: {0}")]
    InvalidTxn(String),
    /// Some parts of a composite writer failed.
    #[error("{} of {} writers failed", .0.failed(), .0.results.len())]
    Composite(Box<CompositeError>),
    /// Any other backend error.
    #[error("backend error")]
    Backend(#[source] BoxError),
}

impl StoreError {
    /// Whether trying the same call again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Unavailable(_) | StoreError::Timeout(_) | StoreError::Contended(_) => true,
            StoreError::Composite(c) => c
                .results
                .iter()
                .all(|(_, r)| r.as_ref().err().is_none_or(StoreError::is_retryable)),
            _ => false,
        }
    }
}

/// An item-level error of a watch stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WatchError {
    /// Transient: continuity was interrupted and the transport is recovering. The stream
    /// goes on, and a resync follows before any further change.
    #[error("watch interrupted")]
    Interrupted(#[source] StoreError),
    /// The stream ends after this item.
    #[error("watch stopped")]
    Stopped(#[source] StoreError),
    /// An error of one part of a composite ([`crate::CompositeWatcher`]), named by its
    /// source. The composite's stream goes on with its other parts: a part that
    /// stopped ends only its own events.
    #[error("watch of source {part:?}")]
    InPart {
        /// The part's source (as its events carry it).
        part: crate::Source,
        /// The part's error.
        #[source]
        error: Box<WatchError>,
    },
}

impl WatchError {
    /// Whether the stream (or, for [`WatchError::InPart`], the part) goes on after this
    /// error.
    pub fn is_retryable(&self) -> bool {
        match self {
            WatchError::Interrupted(_) => true,
            WatchError::InPart { error, .. } => error.is_retryable(),
            WatchError::Stopped(_) => false,
        }
    }

    /// The source of a composite's part this error is of, if any.
    pub fn part(&self) -> Option<&crate::Source> {
        match self {
            WatchError::InPart { part, .. } => Some(part),
            _ => None,
        }
    }
}

/// An error with its causes, on one line (`a: b: c`): for logs, status and messages
/// that must say everything at once.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Per-part outcome of a composite write that did not succeed everywhere.
#[derive(Debug)]
#[non_exhaustive]
pub struct CompositeError {
    /// Every part's outcome, in part order.
    pub results: Vec<(Source, Result<(), StoreError>)>,
}

impl CompositeError {
    /// How many parts failed.
    pub fn failed(&self) -> usize {
        self.results.iter().filter(|(_, r)| r.is_err()).count()
    }
}
