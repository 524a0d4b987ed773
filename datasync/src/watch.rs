//! Watching: the [`Watcher`] trait, the [`Watch`] stream and its [`Registration`].

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use futures_util::Stream;
use futures_util::task::AtomicWaker;
use tokio_util::sync::CancellationToken;

use crate::done::Acks;
use crate::scope::Scope;
use crate::{AckStatus, Done, Event, Prefix, PrefixSet, Revision, StoreError, WatchError};

/// Per-registration options.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WatchOptions {
    /// How many events may wait for the consumer. A consumer that falls further behind is
    /// caught up by a resync, never by a stream with holes.
    pub queue_capacity: usize,
    /// The consumer already holds the state of these prefixes at this revision (from
    /// an earlier stream of the same store): the stream may begin with the changes
    /// after it instead of a resync. See [`resume`](Self::resume).
    pub resume: Option<Revision>,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            queue_capacity: 1024,
            resume: None,
        }
    }
}

impl WatchOptions {
    /// Sets [`queue_capacity`](Self::queue_capacity) (at least 1).
    #[must_use]
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.queue_capacity = n.max(1);
        self
    }

    /// Resumes from revision `r`, the revision of the last event the consumer applied
    /// for exactly these prefixes on this store (rule 11 of `docs/CONTRACT.md`).
    ///
    /// A transport that retains the changes after `r` (`local`, the raft store, a
    /// `RemoteStore`, etcd) begins the stream with them, previous values and all, and
    /// no resync: a restarted consumer with a large state skips reading it again.
    /// Otherwise the stream begins with a full resync as usual, whose reason says why:
    /// `Compacted` (the changes after `r` are no longer retained), `StoreReset` (the
    /// store is behind `r`: restored from a backup, or not the store `r` came from),
    /// or `Initial` (the transport does not resume: NATS; a composite).
    ///
    /// A revision names no store: resuming on another store that is already past `r`
    /// replays its changes as if they followed the consumer's state. (etcd's cluster
    /// id is checked once the watch has seen it.)
    #[must_use]
    pub fn resume(mut self, r: Revision) -> Self {
        self.resume = Some(r);
        self
    }
}

/// Something that can be watched.
///
/// # To ensure correctness
/// An implementation keeps every rule of the contract (`docs/CONTRACT.md`, checked by
/// `datasync::testing`): the stream begins with a [`Event::Resync`] of all prefixes at one
/// revision R (or, resuming after R, [`WatchOptions::resume`], with the changes after it);
/// changes follow from R+1 with strictly increasing revisions, one event per
/// transaction; previous values are right per registration; any loss of continuity becomes
/// a new resync; every event carries a `Done` made by
/// [`Producer::done`](crate::transport::Producer::done); a slow consumer is resynced,
/// never given holes and never slowing others; closing the
/// registration releases everything it holds in the store.
#[async_trait::async_trait]
pub trait Watcher: Send + Sync + fmt::Debug {
    /// Registers a watch of `prefixes` named `name` (names appear in logs and status).
    ///
    /// # Cancel safety
    /// Cancel safe: a registration whose `watch` was dropped before it returned is
    /// released with it (its stream or connection is dropped; no task outlives it).
    async fn watch(
        &self,
        name: &str,
        prefixes: &[Prefix],
        opts: WatchOptions,
    ) -> Result<Watch, StoreError>;

    /// The sources whose events a watch carries: one resync of each starts the stream
    /// (in any order), unless it resumes. A plain store is one source, `""`; a composite names its parts.
    fn sources(&self) -> Vec<crate::Source> {
        vec![crate::Source::from("")]
    }
}

#[async_trait::async_trait]
impl<W: Watcher + ?Sized> Watcher for Arc<W> {
    async fn watch(
        &self,
        name: &str,
        prefixes: &[Prefix],
        opts: WatchOptions,
    ) -> Result<Watch, StoreError> {
        (**self).watch(name, prefixes, opts).await
    }

    fn sources(&self) -> Vec<crate::Source> {
        (**self).sources()
    }
}

/// The event stream of one registration: `Stream<Item = Result<Event, WatchError>>`.
///
/// Errors are items; a [`WatchError::Interrupted`] does not end the stream. Dropping the
/// `Watch` closes its registration.
pub struct Watch {
    registration: Registration,
    stream: Pin<Box<dyn Stream<Item = Result<Event, WatchError>> + Send>>,
}

impl Watch {
    /// Wraps a transport's stream (for transports).
    pub fn new(
        registration: Registration,
        stream: impl Stream<Item = Result<Event, WatchError>> + Send + 'static,
    ) -> Self {
        Watch {
            registration,
            stream: Box::pin(stream),
        }
    }

    /// The registration: close it, request a resync, read its acknowledgement status.
    pub fn registration(&self) -> &Registration {
        &self.registration
    }
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch")
            .field("registration", &self.registration)
            .finish_non_exhaustive()
    }
}

impl Stream for Watch {
    type Item = Result<Event, WatchError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.registration.is_closed() {
                return Poll::Ready(None);
            }
            let item = std::task::ready!(self.stream.as_mut().poll_next(cx));
            // A composite's parts restrict their own events.
            let reg = &self.registration.inner;
            if !reg.reshaped.load(Ordering::Acquire) || !reg.children.is_empty() {
                return Poll::Ready(item);
            }
            match item {
                Some(Ok(ev)) => match self.registration.scope().restrict(ev) {
                    Some(ev) => return Poll::Ready(Some(Ok(ev))),
                    None => continue,
                },
                other => return Poll::Ready(other),
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.registration.close();
    }
}

/// The consumer's handle to one watch registration: close it, ask for a resync, add or
/// remove prefixes, read how its events were answered. Cheap to clone.
///
/// Closing ends the stream and releases the registration in the store (server-side
/// watches are cancelled). A composite's registration closes and resyncs all its parts.
/// The transport's side of the same registration is a
/// [`transport::Producer`](crate::transport::Producer): only it can take a resync
/// request or make a `Done`, so a consumer cannot swallow a pending resync.
#[derive(Clone)]
pub struct Registration {
    inner: Arc<Inner>,
}

struct Inner {
    name: Arc<str>,
    cancel: CancellationToken,
    resync: AtomicBool,
    waker: AtomicWaker,
    acks: Arc<Acks>,
    scope: Mutex<Scope>,
    /// Prefixes were added or removed (until then, events pass unfiltered).
    reshaped: AtomicBool,
    children: Vec<Registration>,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("name", &self.inner.name)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Registration {
    /// A new, open registration of `prefixes` (see [`crate::transport::Producer::new`]).
    pub(crate) fn new(name: &str, prefixes: &[Prefix]) -> Self {
        Self::with_children(name, prefixes, Vec::new())
    }

    /// One registration that stands for several watching the same prefixes: closing,
    /// resyncing or reshaping it does so to all of them, and its status merges theirs.
    pub(crate) fn aggregate(name: &str, prefixes: &[Prefix], parts: Vec<Registration>) -> Self {
        Self::with_children(name, prefixes, parts)
    }

    fn with_children(name: &str, prefixes: &[Prefix], children: Vec<Registration>) -> Self {
        let name: Arc<str> = Arc::from(name);
        Registration {
            inner: Arc::new(Inner {
                acks: Arc::new(Acks::new(name.clone())),
                name,
                cancel: CancellationToken::new(),
                resync: AtomicBool::new(false),
                waker: AtomicWaker::new(),
                scope: Mutex::new(Scope::new(prefixes)),
                reshaped: AtomicBool::new(false),
                children,
            }),
        }
    }

    pub(crate) fn scope(&self) -> MutexGuard<'_, Scope> {
        // The scope's methods do not panic midway; a poisoned lock holds a whole scope.
        self.inner.scope.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The registration's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Ends the watch. Idempotent.
    pub fn close(&self) {
        self.inner.cancel.cancel();
        self.inner.waker.wake();
        for c in &self.inner.children {
            c.close();
        }
    }

    /// Whether [`close`](Self::close) was called (or the `Watch` dropped).
    pub fn is_closed(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    /// Resolves once the registration is closed.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn closed(&self) {
        self.inner.cancel.cancelled().await
    }

    /// Asks for a new full resync. Requests made before the transport serves one
    /// coalesce into that one.
    pub fn request_resync(&self) {
        self.inner.resync.store(true, Ordering::Release);
        self.inner.waker.wake();
        for c in &self.inner.children {
            c.request_resync();
        }
    }

    /// The prefixes watched now (normalized).
    pub fn prefixes(&self) -> PrefixSet {
        self.scope().set().clone()
    }

    /// Starts watching `prefix` too (the later cn-infra `Register`): a resync with
    /// [`ResyncReason::PrefixAdded`](crate::ResyncReason::PrefixAdded) listing it comes
    /// in order with the changes, and its changes follow that resync. Until then no
    /// change under it is delivered. False if `prefix` was asked for already (adding a
    /// prefix covered by one watched already reads nothing).
    pub fn add_prefix(&self, prefix: Prefix) -> bool {
        let added = self.scope().add(prefix.clone());
        if added {
            self.inner.reshaped.store(true, Ordering::Release);
            self.inner.waker.wake();
        }
        for c in &self.inner.children {
            c.add_prefix(prefix.clone());
        }
        added
    }

    /// Stops watching `prefix` (the later cn-infra `Unregister`): once this returns, no
    /// event carries a key that only `prefix` matched; keys another watched prefix
    /// matches go on. False if `prefix` was not asked for (as given, not normalized).
    pub fn remove_prefix(&self, prefix: &Prefix) -> bool {
        let removed = self.scope().remove(prefix);
        if removed {
            self.inner.reshaped.store(true, Ordering::Release);
        }
        for c in &self.inner.children {
            c.remove_prefix(prefix);
        }
        removed
    }

    /// Whether added prefixes wait for their resync.
    pub(crate) fn owes(&self) -> bool {
        self.reshaped_scope().is_some_and(|s| s.owes())
    }

    /// Whether the set changed since the transport last took it.
    pub(crate) fn rescoped(&self) -> bool {
        self.reshaped_scope().is_some_and(|s| s.dirty())
    }

    /// Takes the added prefixes owed a resync: the whole set, and the owed ones.
    pub(crate) fn take_owed(&self) -> Option<(PrefixSet, PrefixSet)> {
        self.reshaped_scope()?.take_owed()
    }

    /// Takes the set for a full resync, if it changed since the transport last took it.
    pub(crate) fn take_set(&self) -> Option<PrefixSet> {
        self.reshaped_scope()?.take_set()
    }

    /// The scope, once prefixes were added or removed (before, one atomic load: the
    /// transports ask on every poll).
    fn reshaped_scope(&self) -> Option<MutexGuard<'_, Scope>> {
        self.inner
            .reshaped
            .load(Ordering::Acquire)
            .then(|| self.scope())
    }

    /// Takes a pending resync request.
    pub(crate) fn take_resync_request(&self) -> bool {
        self.inner.resync.swap(false, Ordering::AcqRel)
    }

    /// Whether a resync request is pending, without taking it.
    pub(crate) fn resync_pending(&self) -> bool {
        self.inner.resync.load(Ordering::Acquire)
    }

    /// Registers the task to wake on [`close`](Self::close) and
    /// [`request_resync`](Self::request_resync). Check both again after registering.
    pub(crate) fn register_waker(&self, waker: &Waker) {
        self.inner.waker.register(waker);
    }

    /// Wakes the registered task ("there is something new").
    pub(crate) fn wake(&self) {
        self.inner.waker.wake();
    }

    /// A `Done` for an event at `revision`, recorded in [`acks`](Self::acks).
    pub(crate) fn done(&self, revision: Revision) -> Done {
        Done::tracked(self.inner.acks.clone(), revision)
    }

    /// How this registration's events (and its parts') were answered.
    pub fn acks(&self) -> AckStatus {
        self.inner
            .children
            .iter()
            .fold(self.inner.acks.status(), |acc, c| acc.merge(c.acks()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregate_closes_and_resyncs_parts() {
        let a = Registration::new("a", &[]);
        let b = Registration::new("b", &[]);
        let all = Registration::aggregate("all", &[], vec![a.clone(), b.clone()]);
        all.request_resync();
        assert!(a.take_resync_request() && b.take_resync_request());
        assert!(!a.take_resync_request());
        a.done(Revision(1)).ok();
        drop(b.done(Revision(2)));
        let s = all.acks();
        assert_eq!((s.answered_ok, s.dropped), (1, 1));
        all.close();
        assert!(a.is_closed() && b.is_closed());
    }
}
