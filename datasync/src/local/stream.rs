//! The event stream of one local registration.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::sync::mpsc;

use super::Shared;
use super::state::Txn;
use crate::{
    Change, Event, PrefixSet, PrefixValues, Registration, Resync, ResyncReason, Revision, Source,
    StoreError, WatchError,
};

/// Where the stream stands.
#[derive(Debug)]
enum State {
    /// A resync is ready to be delivered.
    Resync(Revision, ResyncReason, Vec<PrefixValues>),
    /// Delivering changes from the queue.
    Streaming,
}

#[derive(Debug)]
pub(super) struct LocalStream {
    pub(super) shared: Arc<Shared>,
    pub(super) reg: Registration,
    pub(super) source: Source,
    pub(super) prefixes: PrefixSet,
    pub(super) rx: mpsc::Receiver<Arc<Txn>>,
    pub(super) overflowed: Arc<AtomicBool>,
    state: State,
}

impl LocalStream {
    pub(super) fn new(
        shared: Arc<Shared>,
        reg: Registration,
        source: Source,
        prefixes: PrefixSet,
        rx: mpsc::Receiver<Arc<Txn>>,
        overflowed: Arc<AtomicBool>,
        initial: (Revision, Vec<PrefixValues>),
    ) -> Self {
        LocalStream {
            shared,
            reg,
            source,
            prefixes,
            rx,
            overflowed,
            state: State::Resync(initial.0, ResyncReason::Initial, initial.1),
        }
    }

    /// Takes a fresh snapshot if the registration overflowed or asked for one. Queued
    /// changes are discarded: the snapshot supersedes them. Done under the store lock, so
    /// no transaction can slip between the snapshot and the re-enabled queue.
    fn resync_if_needed(&mut self) {
        let reason = if self.overflowed.load(Ordering::Acquire) {
            ResyncReason::Overflow
        } else if self.reg.take_resync_request() {
            ResyncReason::Requested
        } else {
            return;
        };
        let st = self.shared.lock();
        while self.rx.try_recv().is_ok() {}
        let values = st.snapshot(&self.prefixes);
        self.overflowed.store(false, Ordering::Release);
        // An overflow may have coincided with a request: one resync serves both.
        self.reg.take_resync_request();
        self.state = State::Resync(st.revision, reason, values);
    }

    fn change(&self, txn: &Txn) -> Event {
        let changes: Vec<_> = txn
            .changes
            .iter()
            .filter(|c| self.prefixes.matches(c.key.as_str()))
            .cloned()
            .collect();
        // The store only queues transactions that touch our prefixes.
        debug_assert!(!changes.is_empty());
        Event::Change(Change::new(
            self.source.clone(),
            txn.revision,
            changes,
            self.reg.done(txn.revision),
        ))
    }
}

impl Stream for LocalStream {
    type Item = Result<Event, WatchError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.reg.is_closed() {
                return Poll::Ready(None);
            }
            match std::mem::replace(&mut this.state, State::Streaming) {
                State::Resync(revision, reason, values) => {
                    let done = this.reg.done(revision);
                    let ev = Resync::new(this.source.clone(), revision, reason, values, done);
                    return Poll::Ready(Some(Ok(Event::Resync(ev))));
                }
                State::Streaming => {}
            }
            this.resync_if_needed();
            if matches!(this.state, State::Resync(..)) {
                continue;
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(txn)) => {
                    return Poll::Ready(Some(Ok(this.change(&txn))));
                }
                Poll::Ready(None) => {
                    // The store dropped this registration: say so, then end.
                    this.reg.close();
                    return Poll::Ready(Some(Err(WatchError::Stopped(StoreError::Stopped))));
                }
                Poll::Pending => {
                    this.reg.register_waker(cx.waker());
                    // Re-check what may have been signalled before the waker was in place.
                    if this.reg.is_closed()
                        || this.overflowed.load(Ordering::Acquire)
                        || this.reg.resync_pending()
                    {
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}
