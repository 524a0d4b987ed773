//! The queue between a remote transport's watch task and its [`Watch`] stream (for
//! transports).
//!
//! A transport that follows a server-side watch (etcd, NATS) runs one task per
//! registration. The task sends [`Item`]s through a [`Relay`]; the registration's stream
//! (a [`Watch`] made by [`channel`]) turns them into events and
//! attaches each event's `Done` only when the consumer takes it.
//!
//! The queue is bounded: [`Relay::try_send`] never waits, so a task that finds it full
//! drops its server-side watch and resyncs once [`Relay::reserve`] finds room (rule 7). A
//! requested resync is signalled to the task ([`Relay::requested`]) only once the consumer
//! has taken everything queued, so that every request made until then is served by that
//! one resync (rule 5).

use crate::transport::Producer;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::sync::{Notify, mpsc};

use crate::{
    Change, Event, KeyChange, PrefixValues, Resync, ResyncReason, Revision, Source, StoreError,
    Watch, WatchError,
};

/// What a watch task hands its stream.
#[derive(Debug)]
pub enum Item {
    /// A resync at a revision.
    Resync(Revision, ResyncReason, Vec<PrefixValues>),
    /// The changes of one transaction.
    Change(Revision, Vec<KeyChange>),
    /// A transient error; a resync or the continuation follows.
    Interrupted(StoreError),
}

/// A registration's queue: the task's side ([`Relay`]) and the consumer's side (the
/// returned [`Watch`]), holding at most `capacity` items.
pub fn channel(reg: &Producer, source: Source, capacity: usize) -> (Relay, Watch) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let demand = Arc::new(Notify::new());
    let stream = RelayStream {
        rx,
        reg: reg.clone(),
        demand: demand.clone(),
        source,
    };
    let relay = Relay {
        tx,
        reg: reg.clone(),
        demand,
    };
    (relay, Watch::new(reg.registration(), stream))
}

/// The task's side of a registration's queue.
#[derive(Debug)]
pub struct Relay {
    tx: mpsc::Sender<Item>,
    reg: Producer,
    demand: Arc<Notify>,
}

/// Room for one item, taken by [`Relay::reserve`].
#[derive(Debug)]
pub struct Permit<'a>(mpsc::Permit<'a, Item>);

impl Permit<'_> {
    /// Queues `item` in the reserved room.
    pub fn send(self, item: Item) {
        self.0.send(item)
    }
}

impl Relay {
    /// The registration's producer side.
    pub fn producer(&self) -> &Producer {
        &self.reg
    }

    /// Queues `item` if there is room; never waits. `Err` gives the item back: the queue
    /// is full (the consumer is behind) or the stream is gone.
    pub fn try_send(&self, item: Item) -> Result<(), Item> {
        self.tx.try_send(item).map_err(|e| e.into_inner())
    }

    /// Waits for room for one item; `None` once the registration is closed or its stream
    /// dropped.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn reserve(&self) -> Option<Permit<'_>> {
        tokio::select! {
            biased;
            _ = self.reg.closed() => None,
            p = self.tx.reserve() => p.ok().map(Permit),
        }
    }

    /// Resolves once the consumer waits for a pending resync request or for added
    /// prefixes (it has taken all that was queued). Take the request with
    /// [`Producer::take_resync_request`] when serving it, the prefixes with
    /// [`Producer::take_owed`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn requested(&self) {
        loop {
            self.demand.notified().await;
            // A request already served by another resync leaves a stale signal.
            if asks(&self.reg) {
                return;
            }
        }
    }
}

/// Whether the consumer waits for a resync or for prefixes it added.
fn asks(reg: &Producer) -> bool {
    reg.resync_pending() || reg.owes()
}

/// The consumer's side: turns queued items into events, attaching each `Done`.
#[derive(Debug)]
struct RelayStream {
    rx: mpsc::Receiver<Item>,
    reg: Producer,
    demand: Arc<Notify>,
    source: Source,
}

impl Stream for RelayStream {
    type Item = Result<Event, WatchError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let item = match this.rx.poll_recv(cx) {
            Poll::Pending => {
                this.reg.register_waker(cx.waker());
                if asks(&this.reg) {
                    this.demand.notify_one();
                }
                return Poll::Pending;
            }
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Ready(Some(item)) => item,
        };
        let source = this.source.clone();
        Poll::Ready(Some(match item {
            Item::Resync(rev, reason, values) => Ok(Event::Resync(Resync::new(
                source,
                rev,
                reason,
                values,
                this.reg.done(rev),
            ))),
            Item::Change(rev, changes) => Ok(Event::Change(Change::new(
                source,
                rev,
                changes,
                this.reg.done(rev),
            ))),
            Item::Interrupted(e) => Err(WatchError::Interrupted(e)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn full_queue_refuses_and_request_waits_for_drain() {
        let reg = Producer::new("r", &[]);
        let (relay, mut watch) = channel(&reg, Source::from(""), 1);
        let resync = || Item::Resync(Revision(1), ResyncReason::Initial, Vec::new());
        assert!(relay.try_send(resync()).is_ok());
        assert!(
            relay
                .try_send(Item::Change(Revision(2), Vec::new()))
                .is_err()
        );
        reg.registration().request_resync();
        // The consumer has not drained the queue: no demand yet.
        let early = tokio::time::timeout(std::time::Duration::from_millis(20), relay.requested());
        assert!(early.await.is_err());
        let ev = watch.next().await.expect("an event").expect("not an error");
        assert_eq!(ev.revision(), Revision(1));
        ev.into_done().ok();
        let pending = tokio::time::timeout(std::time::Duration::from_millis(20), watch.next());
        assert!(pending.await.is_err(), "nothing queued");
        tokio::time::timeout(std::time::Duration::from_secs(5), relay.requested())
            .await
            .expect("the drained consumer signals its request");
        reg.close();
        assert!(relay.reserve().await.is_none());
    }
}
