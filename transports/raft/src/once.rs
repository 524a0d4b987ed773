//! The client half of exactly-once writes: request ids (see `storage::session`).

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

use crate::storage::session::MAX_OUTCOMES;
use crate::types::RequestId;

/// A client's request numbering: a random client id, a sequence, and which requests
/// still wait for an answer (the lowest is sent along, so the state machine can drop
/// the outcomes of the others).
#[derive(Debug)]
pub(crate) struct Requests {
    client: u64,
    next: AtomicU64,
    waiting: Mutex<BTreeSet<u64>>,
    /// Wakes requests waiting for room in the window.
    room: Notify,
}

impl Requests {
    pub(crate) fn new() -> Self {
        Requests {
            client: fastrand::u64(1..),
            next: AtomicU64::new(1),
            waiting: Mutex::new(BTreeSet::new()),
            room: Notify::new(),
        }
    }

    /// A new request's id, held until the ticket drops (the answer is in, or the caller
    /// gave up on it: either way it will not be sent again).
    ///
    /// Waits while the oldest request still waiting is [`MAX_OUTCOMES`] requests back:
    /// the state machine keeps that many outcomes per client and refuses more, and it
    /// must never drop the outcome slot of a request that is still on its way.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is taken until it returns.
    pub(crate) async fn begin(&self) -> Ticket<'_> {
        loop {
            let room = self.room.notified();
            {
                let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
                let seq = self.next.load(Ordering::Relaxed);
                let first_unacked = waiting.first().copied().unwrap_or(seq);
                if seq - first_unacked < MAX_OUTCOMES as u64 {
                    self.next.store(seq + 1, Ordering::Relaxed);
                    waiting.insert(seq);
                    return Ticket {
                        requests: self,
                        id: RequestId {
                            client: self.client,
                            seq,
                            first_unacked,
                        },
                    };
                }
            }
            room.await;
        }
    }
}

/// One request in flight; every retry of it carries [`Ticket::id`].
#[derive(Debug)]
pub(crate) struct Ticket<'a> {
    requests: &'a Requests,
    pub(crate) id: RequestId,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.requests
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id.seq);
        self.requests.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_unacked_is_the_oldest_request_still_waiting() {
        let r = Requests::new();
        let a = r.begin().await;
        let b = r.begin().await;
        assert_eq!((a.id.seq, a.id.first_unacked), (1, 1));
        assert_eq!((b.id.seq, b.id.first_unacked), (2, 1));
        drop(a);
        let c = r.begin().await;
        assert_eq!((c.id.seq, c.id.first_unacked), (3, 2));
        drop(b);
        drop(c);
        let d = r.begin().await;
        assert_eq!((d.id.seq, d.id.first_unacked), (4, 4));
        assert_eq!(d.id.client, r.client);
    }

    /// A request stuck while the client goes on: the client waits for room before the
    /// state machine would have to refuse.
    #[tokio::test]
    async fn a_client_keeps_its_window() {
        let r = Requests::new();
        let stuck = r.begin().await;
        for _ in 1..MAX_OUTCOMES {
            drop(r.begin().await);
        }
        let blocked = tokio::time::timeout(std::time::Duration::from_millis(50), r.begin()).await;
        assert!(blocked.is_err(), "no room while the stuck request waits");
        drop(stuck);
        let next = r.begin().await;
        assert_eq!(next.id.first_unacked, next.id.seq);
    }
}
