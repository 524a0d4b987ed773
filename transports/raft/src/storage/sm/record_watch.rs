//! Watches of whole records over a key range (etcd's watch): each committed revision's
//! records after and before it, from now or replayed from the history.
//!
//! Why from the history and not the hub's feed: an etcd watch carries create revisions,
//! versions and previous records, which the undo history holds for every revision
//! (with the change that made it), and may start at a past revision, which only the
//! history can replay. A watch that falls behind (its queue fills) replays from the
//! history too, under the commit lock, so it resumes exactly where it stopped; once the
//! history no longer reaches back that far, it ends with `Compacted`, as an etcd watch
//! is cancelled with its compact revision.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use datasync::{Op, Revision, StoreError, Value};
use futures_util::Stream;
use tokio::sync::mpsc;

use super::{Inner, Shared, Undo};
use crate::records::{KeyRange, Record, RecordChanges, RecordEvent};
use crate::storage::tables::Stored;

/// Revisions a record watch's queue holds before it falls behind and replays.
const QUEUE: usize = 1024;

#[derive(Debug)]
struct Sub {
    range: KeyRange,
    tx: mpsc::Sender<Arc<Undo>>,
    behind: Arc<AtomicBool>,
}

/// The record watches a state machine feeds (kept in [`Inner`], under the commit lock).
#[derive(Debug, Default)]
pub(crate) struct RecordSubs {
    subs: BTreeMap<u64, Sub>,
    next_id: u64,
}

impl RecordSubs {
    /// Offers a committed revision to every watch whose range it touches.
    pub(super) fn publish(&mut self, undo: &Arc<Undo>) {
        if self.subs.is_empty() {
            return;
        }
        self.subs.retain(|_, s| {
            if s.tx.is_closed() {
                return false;
            }
            if s.behind.load(Ordering::Acquire) {
                return true;
            }
            let touched = undo
                .txn
                .changes
                .iter()
                .any(|c| s.range.contains(c.key.as_str()));
            if touched && s.tx.try_send(undo.clone()).is_err() {
                // Full (closed is caught above): replay from the history once drained.
                s.behind.store(true, Ordering::Release);
            }
            true
        });
    }

    /// The state jumped (a snapshot was installed, a backup restored): the history
    /// that would carry a watch across is gone, so each ends as compacted once it has
    /// delivered what it holds (its queue closes, flagged behind).
    pub(super) fn all_behind(&mut self) {
        for s in std::mem::take(&mut self.subs).into_values() {
            s.behind.store(true, Ordering::Release);
        }
    }

    /// How many watches are fed (closed ones are released first).
    pub(crate) fn active(&mut self) -> usize {
        self.subs.retain(|_, s| !s.tx.is_closed());
        self.subs.len()
    }

    /// Ends every watch (the store stopped).
    pub(crate) fn stop_all(&mut self) {
        self.subs.clear();
    }
}

/// A watch of the records in a key range: every revision that changed one of them,
/// in order, with each record after and before; ends with an error when it cannot go
/// on (`Compacted`: the history no longer reaches where it stood; `Stopped`).
#[derive(Debug)]
pub struct RecordWatch {
    shared: Weak<Shared>,
    id: u64,
    range: KeyRange,
    rx: mpsc::Receiver<Arc<Undo>>,
    behind: Arc<AtomicBool>,
    /// Revisions replayed from the history, still to deliver.
    replay: VecDeque<Arc<Undo>>,
    /// The lowest revision not yet delivered.
    next: u64,
    /// The store's revision when the watch was registered.
    registered_at: u64,
    done: bool,
}

impl Shared {
    /// Starts a record watch of `range`: changes after now, or from revision `from`
    /// (replayed from the history when it still holds it, else `Compacted`).
    pub(crate) fn watch_records(
        self: &Arc<Self>,
        range: KeyRange,
        from: Option<Revision>,
    ) -> Result<RecordWatch, StoreError> {
        let mut inner = self.lock();
        let current = inner.revision;
        let next = from.map_or(current + 1, |r| r.0.max(1));
        let mut replay = VecDeque::new();
        replayed(&inner, next, &mut replay)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let behind = Arc::new(AtomicBool::new(false));
        let subs = &mut inner.records;
        let id = subs.next_id;
        subs.next_id += 1;
        subs.subs.insert(
            id,
            Sub {
                range: range.clone(),
                tx,
                behind: behind.clone(),
            },
        );
        Ok(RecordWatch {
            shared: Arc::downgrade(self),
            id,
            range,
            rx,
            behind,
            replay,
            next,
            registered_at: current,
            done: false,
        })
    }
}

/// The history's revisions from `next` on into `out`; `Compacted` when it no longer
/// holds `next` (every revision is in the history while it is retained).
fn replayed(inner: &Inner, next: u64, out: &mut VecDeque<Arc<Undo>>) -> Result<(), StoreError> {
    if next > inner.revision {
        return Ok(());
    }
    let oldest = inner.oldest_watchable();
    if next < oldest {
        // `compacted` names the last revision a watch cannot start from.
        return Err(StoreError::Compacted {
            requested: Revision(next),
            compacted: Revision(oldest - 1),
        });
    }
    out.extend(inner.history.iter().filter(|u| u.revision >= next).cloned());
    Ok(())
}

fn record(key: &datasync::Key, s: &Stored) -> Record {
    Record {
        key: key.clone(),
        value: s.value.clone(),
        create_revision: Revision(s.create_rev),
        mod_revision: Revision(s.mod_rev),
        version: s.version,
        lease: crate::records::lease_id_of(s.expires_at_ms).unwrap_or(0),
    }
}

/// The events of one revision in `range`, with the records after and before; the
/// record after a put follows from the one before, as apply made it.
fn changes(undo: &Undo, range: &KeyRange) -> Option<RecordChanges> {
    let rev = undo.revision;
    let events: Vec<RecordEvent> = undo
        .entries()
        .filter(|(c, _, _)| range.contains(c.key.as_str()))
        .map(|(c, before, after)| {
            let prev = before.as_ref().map(|b| record(&c.key, b));
            let record = match (c.op, after) {
                (Op::Put, Some(a)) => Record {
                    key: c.key.clone(),
                    value: c.value.clone().unwrap_or_default(),
                    create_revision: Revision(a.create_rev),
                    mod_revision: Revision(rev),
                    version: a.version,
                    lease: a.lease,
                },
                _ => Record {
                    key: c.key.clone(),
                    value: Value::default(),
                    create_revision: Revision(0),
                    mod_revision: Revision(rev),
                    version: 0,
                    lease: 0,
                },
            };
            RecordEvent {
                op: c.op,
                record,
                prev,
            }
        })
        .collect();
    (!events.is_empty()).then_some(RecordChanges {
        revision: Revision(rev),
        events,
    })
}

impl RecordWatch {
    /// The store's revision when the watch was registered: every change after it (and
    /// from its start revision, if given) comes through it.
    pub fn registered_at(&self) -> Revision {
        Revision(self.registered_at)
    }

    /// The revision up to which this watch has delivered every change, if it has
    /// nothing queued: no event at or below it is still to come. `None` while it has
    /// changes to deliver or is catching up.
    pub fn progress(&self) -> Option<Revision> {
        let shared = self.shared.upgrade()?;
        let inner = shared.lock();
        let idle = self.replay.is_empty() && self.rx.is_empty();
        (idle && !self.behind.load(Ordering::Acquire)).then_some(Revision(inner.revision))
    }

    /// Replays from the history after falling behind: under the commit lock, what is
    /// queued is dropped (the history has it) and feeding resumes.
    fn catch_up(&mut self) -> Result<(), StoreError> {
        let shared = self.shared.upgrade().ok_or(StoreError::Stopped)?;
        let inner = shared.lock();
        while self.rx.try_recv().is_ok() {}
        self.behind.store(false, Ordering::Release);
        self.replay.clear();
        replayed(&inner, self.next, &mut self.replay)
    }

    fn take(&mut self, undo: &Undo) -> Option<RecordChanges> {
        if undo.revision < self.next {
            return None;
        }
        self.next = undo.revision + 1;
        changes(undo, &self.range)
    }
}

impl Stream for RecordWatch {
    type Item = Result<RecordChanges, StoreError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(undo) = this.replay.pop_front() {
                if let Some(c) = this.take(&undo) {
                    return Poll::Ready(Some(Ok(c)));
                }
                continue;
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(undo)) => {
                    if let Some(c) = this.take(&undo) {
                        return Poll::Ready(Some(Ok(c)));
                    }
                }
                Poll::Ready(None) => {
                    this.done = true;
                    if !this.behind.load(Ordering::Acquire) {
                        return Poll::Ready(Some(Err(StoreError::Stopped)));
                    }
                    let now = this
                        .shared
                        .upgrade()
                        .map_or(this.next, |s| s.lock().revision);
                    return Poll::Ready(Some(Err(StoreError::Compacted {
                        requested: Revision(this.next),
                        compacted: Revision(now),
                    })));
                }
                // Behind: the queue filled (and has been drained since) or the state
                // jumped; a full queue is never empty, so no wake-up is missed here.
                Poll::Pending if this.behind.load(Ordering::Acquire) => {
                    if let Err(e) = this.catch_up() {
                        this.done = true;
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for RecordWatch {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.lock().records.subs.remove(&self.id);
        }
    }
}
