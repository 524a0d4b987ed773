//! The client half of exactly-once writes: request ids (see `storage::session`).

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::types::RequestId;

/// A client's request numbering: a random client id, a sequence, and which requests
/// still wait for an answer (the lowest is sent along, so the state machine can drop
/// the outcomes of the others).
#[derive(Debug)]
pub(crate) struct Requests {
    client: u64,
    next: AtomicU64,
    waiting: Mutex<BTreeSet<u64>>,
}

impl Requests {
    pub(crate) fn new() -> Self {
        Requests {
            client: fastrand::u64(1..),
            next: AtomicU64::new(1),
            waiting: Mutex::new(BTreeSet::new()),
        }
    }

    /// A new request's id, held until the ticket drops (the answer is in, or the caller
    /// gave up on it: either way it will not be sent again).
    pub(crate) fn begin(&self) -> Ticket<'_> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        waiting.insert(seq);
        let first_unacked = waiting.first().copied().unwrap_or(seq);
        Ticket {
            requests: self,
            id: RequestId {
                client: self.client,
                seq,
                first_unacked,
            },
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_unacked_is_the_oldest_request_still_waiting() {
        let r = Requests::new();
        let a = r.begin();
        let b = r.begin();
        assert_eq!((a.id.seq, a.id.first_unacked), (1, 1));
        assert_eq!((b.id.seq, b.id.first_unacked), (2, 1));
        drop(a);
        let c = r.begin();
        assert_eq!((c.id.seq, c.id.first_unacked), (3, 2));
        drop(b);
        drop(c);
        let d = r.begin();
        assert_eq!((d.id.seq, d.id.first_unacked), (4, 4));
        assert_eq!(d.id.client, r.client);
    }
}
