//! The event stream of one local registration.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;

use super::Shared;
use crate::feed::Feed;
use crate::{
    Event, PrefixValues, Registration, Resync, ResyncReason, Revision, Source, StoreError,
    WatchError,
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
    shared: Arc<Shared>,
    reg: Registration,
    source: Source,
    feed: Feed,
    state: State,
}

impl LocalStream {
    pub(super) fn new(
        shared: Arc<Shared>,
        reg: Registration,
        source: Source,
        feed: Feed,
        initial: (Revision, Vec<PrefixValues>),
    ) -> Self {
        LocalStream {
            shared,
            reg,
            source,
            feed,
            state: State::Resync(initial.0, ResyncReason::Initial, initial.1),
        }
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
            if let State::Resync(revision, reason, values) =
                std::mem::replace(&mut this.state, State::Streaming)
            {
                let done = this.reg.done(revision);
                let ev = Resync::new(this.source.clone(), revision, reason, values, done);
                return Poll::Ready(Some(Ok(Event::Resync(ev))));
            }
            if let Some(reason) = this.feed.pending_resync() {
                // Under the store lock, so nothing slips between snapshot and queue.
                let st = this.shared.lock();
                this.feed.rearm();
                let values = st.snapshot(this.feed.prefixes());
                this.state = State::Resync(st.revision, reason, values);
                continue;
            }
            return match this.feed.poll_recv(cx) {
                Poll::Ready(Some(txn)) => {
                    Poll::Ready(Some(Ok(this.feed.change_event(&this.source, &txn))))
                }
                Poll::Ready(None) => {
                    // The store dropped this registration: say so, then end.
                    this.reg.close();
                    Poll::Ready(Some(Err(WatchError::Stopped(StoreError::Stopped))))
                }
                Poll::Pending => Poll::Pending,
            };
        }
    }
}
