//! What only transports use: the producer's side of a registration, the queues between
//! a store and a [`Watch`](crate::Watch), and the resync driver.
//!
//! A plugin needs none of it: the crate root is the consumer's API. The split is by
//! type, not by convention: a consumer holds a [`Registration`], which can close and
//! ask for a resync but cannot take a pending request (and so swallow it) or make a
//! `Done`; a transport holds the [`Producer`] of the same registration.
//!
//! - [`Producer`]: one registration, as its transport sees it;
//! - [`feed`]: the in-process fan-out (`local`, the embedded raft store): publish under
//!   the commit lock, resnapshot under it;
//! - [`relay`]: the bounded queue between a watch task and its `Watch`;
//! - [`resync`]: the driver that keeps a registration's stream continuous over a
//!   server-side watch (etcd, NATS, a raft member for a remote client).

use std::task::Waker;

pub mod feed;
pub mod relay;
pub mod resync;

use crate::{Done, Prefix, PrefixSet, Registration, Revision};

/// The first error of type `T` in `e`'s chain of causes, looking inside the
/// `io::Error`s on the way too (whose `source()` skips the error they wrap): how a
/// transport finds, say, the TLS library's error under its client library's.
pub fn find_cause<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(t) = c.downcast_ref::<T>() {
            return Some(t);
        }
        if let Some(inner) = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(t) = find_cause::<T>(inner) {
                return Some(t);
            }
        }
        cur = c.source();
    }
    None
}

/// The transport's side of one registration. Cheap to clone; the consumer's side is
/// [`registration`](Self::registration).
#[derive(Debug, Clone)]
pub struct Producer {
    reg: Registration,
}

impl Producer {
    /// A new, open registration named `name`, of `prefixes`.
    pub fn new(name: &str, prefixes: &[Prefix]) -> Self {
        Producer {
            reg: Registration::new(name, prefixes),
        }
    }

    /// The consumer's handle (for [`Watch::new`](crate::Watch::new)).
    pub fn registration(&self) -> Registration {
        self.reg.clone()
    }

    /// The registration's name.
    pub fn name(&self) -> &str {
        self.reg.name()
    }

    /// Ends the registration from the store's side (the store stopped serving it).
    pub fn close(&self) {
        self.reg.close()
    }

    /// Whether the registration is closed (by the consumer, who may also have dropped
    /// its `Watch`, or by [`close`](Self::close)).
    pub fn is_closed(&self) -> bool {
        self.reg.is_closed()
    }

    /// Resolves once the registration is closed.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn closed(&self) {
        self.reg.closed().await
    }

    /// Takes a pending resync request: call it when serving one, so that every request
    /// made until then is served by it.
    pub fn take_resync_request(&self) -> bool {
        self.reg.take_resync_request()
    }

    /// Whether a resync request is pending, without taking it.
    pub fn resync_pending(&self) -> bool {
        self.reg.resync_pending()
    }

    /// Whether prefixes were added that wait for their resync.
    pub fn owes(&self) -> bool {
        self.reg.owes()
    }

    /// Whether prefixes were added or removed since the set was last taken.
    pub fn rescoped(&self) -> bool {
        self.reg.rescoped()
    }

    /// For a resync of added prefixes alone (`ResyncReason::PrefixAdded`): takes them,
    /// with the whole set to follow from then on; `None` if none are owed. Serve them in
    /// order: the resync comes after every change already delivered, at a revision at
    /// or above the last one, and their changes follow it. Changes the consumer has no
    /// state for are dropped by the `Watch`, so following the whole set a little early
    /// is harmless.
    pub fn take_owed(&self) -> Option<(PrefixSet, PrefixSet)> {
        self.reg.take_owed()
    }

    /// For a full resync: takes the set to read and follow, if it changed since it was
    /// last taken (owed prefixes are paid by the full resync).
    pub fn take_set(&self) -> Option<PrefixSet> {
        self.reg.take_set()
    }

    /// Registers the task to wake on a close or a resync request (for a stream's
    /// `poll_next`). Check both again after registering.
    pub fn register_waker(&self, waker: &Waker) {
        self.reg.register_waker(waker)
    }

    /// Wakes the registered task ("there is something new").
    pub fn wake(&self) {
        self.reg.wake()
    }

    /// A `Done` for an event at `revision`, recorded in the registration's
    /// [`acks`](Registration::acks).
    pub fn done(&self, revision: Revision) -> Done {
        self.reg.done(revision)
    }
}
