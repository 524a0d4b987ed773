//! The `Done` callback that answers every event.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::Revision;

/// A boxed error from a consumer.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Why an event was not acknowledged successfully.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum DoneError {
    /// The `Done` was dropped without an answer.
    #[error("Done dropped without an answer")]
    Dropped,
    /// The consumer reported a failure.
    #[error("consumer failed: {0}")]
    Failed(#[source] Arc<dyn StdError + Send + Sync + 'static>),
    /// No answer arrived within the configured time.
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

impl DoneError {
    /// Wraps a consumer's error.
    pub fn failed(err: impl Into<BoxError>) -> Self {
        DoneError::Failed(Arc::from(err.into()))
    }
}

/// Answers one event.
///
/// A [`Done`] is a one-shot token consumed by value: [`Done::ok`], [`Done::fail`] or
/// [`Done::complete`]. Dropping it unanswered is not silent success: the waiter receives
/// [`DoneError::Dropped`] (and a warning is logged), so nothing ever hangs on a forgotten
/// callback. Answering after the waiter has gone (a timeout, a closed registration) is
/// harmless: the answer is discarded. A token cannot be answered twice; that is enforced
/// by the type system.
///
/// Who waits depends on where the token came from:
/// - [`Done::channel`]: a [`DoneWaiter`] future (the coordinator uses this, with a timeout);
/// - a transport's event: the registration's acknowledgement record
///   ([`crate::Registration::acks`]), which counts answers, failures and drops;
/// - [`Done::split`]: the parent token, answered once every child has been (first error
///   wins).
#[must_use = "every event must be answered: call ok(), fail() or complete()"]
#[derive(Debug)]
pub struct Done {
    slot: Option<Slot>,
}

#[derive(Debug)]
enum Slot {
    Channel(oneshot::Sender<Result<(), DoneError>>),
    Tracked(Arc<Acks>, Revision),
    Group(Arc<Group>),
}

impl Done {
    /// A token and the future that resolves with its answer.
    pub fn channel() -> (Done, DoneWaiter) {
        let (tx, rx) = oneshot::channel();
        (
            Done {
                slot: Some(Slot::Channel(tx)),
            },
            DoneWaiter(rx),
        )
    }

    pub(crate) fn tracked(acks: Arc<Acks>, revision: Revision) -> Done {
        Done {
            slot: Some(Slot::Tracked(acks, revision)),
        }
    }

    /// Reports success.
    pub fn ok(self) {
        self.complete(Ok(()));
    }

    /// Reports a failure.
    pub fn fail(self, err: impl Into<BoxError>) {
        self.complete(Err(DoneError::failed(err)));
    }

    /// Reports success or the error of `result`: a plugin's answer from its work.
    pub fn answer<E: Into<BoxError>>(self, result: Result<(), E>) {
        match result {
            Ok(()) => self.ok(),
            Err(e) => self.fail(e),
        }
    }

    /// Reports `result`.
    pub fn complete(mut self, result: Result<(), DoneError>) {
        if let Some(slot) = self.slot.take() {
            slot.answer(result);
        }
    }

    /// Splits this token into `n` children. This token is answered once all children
    /// have been: success if all succeeded, else the first error. `n == 0` answers
    /// success at once.
    pub fn split(self, n: usize) -> Vec<Done> {
        if n == 0 {
            self.ok();
            return Vec::new();
        }
        let group = Arc::new(Group {
            state: Mutex::new(GroupState {
                remaining: n,
                first_error: None,
                parent: Some(self),
            }),
        });
        (0..n)
            .map(|_| Done {
                slot: Some(Slot::Group(group.clone())),
            })
            .collect()
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            if let Slot::Tracked(acks, revision) = &slot {
                tracing::warn!(registration = %acks.name, %revision, "Done dropped without an answer");
            }
            slot.answer(Err(DoneError::Dropped));
        }
    }
}

impl Slot {
    fn answer(self, result: Result<(), DoneError>) {
        match self {
            // The waiter may be gone (timed out, closed): a late answer is discarded.
            Slot::Channel(tx) => drop(tx.send(result)),
            Slot::Tracked(acks, revision) => acks.record(revision, result),
            Slot::Group(group) => group.answer(result),
        }
    }
}

/// Resolves with the answer of the [`Done`] it was created with.
///
/// # Cancel safety
/// Dropping the waiter is fine; a later answer is then discarded.
#[derive(Debug)]
pub struct DoneWaiter(oneshot::Receiver<Result<(), DoneError>>);

impl Future for DoneWaiter {
    type Output = Result<(), DoneError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(DoneError::Dropped)))
    }
}

#[derive(Debug)]
struct Group {
    state: Mutex<GroupState>,
}

#[derive(Debug)]
struct GroupState {
    remaining: usize,
    first_error: Option<DoneError>,
    parent: Option<Done>,
}

impl Group {
    fn answer(&self, result: Result<(), DoneError>) {
        let finished = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = result {
                st.first_error.get_or_insert(e);
            }
            st.remaining -= 1;
            if st.remaining == 0 {
                st.parent.take().map(|p| (p, st.first_error.take()))
            } else {
                None
            }
        };
        if let Some((parent, err)) = finished {
            parent.complete(err.map_or(Ok(()), Err));
        }
    }
}

/// A registration's record of how its events were answered.
#[derive(Debug, Default)]
pub(crate) struct Acks {
    name: Arc<str>,
    acknowledged: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    last_error: Mutex<Option<(Revision, DoneError)>>,
}

impl Acks {
    pub(crate) fn new(name: Arc<str>) -> Self {
        Acks {
            name,
            ..Default::default()
        }
    }

    fn record(&self, revision: Revision, result: Result<(), DoneError>) {
        match result {
            Ok(()) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                self.acknowledged.fetch_max(revision.0, Ordering::Relaxed);
            }
            Err(e) => {
                if matches!(e, DoneError::Dropped) {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                } else {
                    tracing::debug!(registration = %self.name, %revision, error = %e, "event failed");
                    self.failed.fetch_add(1, Ordering::Relaxed);
                }
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some((revision, e));
            }
        }
    }

    pub(crate) fn status(&self) -> AckStatus {
        AckStatus {
            acknowledged: Revision(self.acknowledged.load(Ordering::Relaxed)),
            answered_ok: self.ok.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

/// How the events of a registration were answered so far.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct AckStatus {
    /// Highest revision answered with success.
    pub acknowledged: Revision,
    /// Events answered with success.
    pub answered_ok: u64,
    /// Events answered with a failure.
    pub failed: u64,
    /// Events whose `Done` was dropped unanswered.
    pub dropped: u64,
    /// The latest failure or drop, with the revision of its event.
    pub last_error: Option<(Revision, DoneError)>,
}

impl AckStatus {
    pub(crate) fn merge(mut self, other: AckStatus) -> AckStatus {
        self.acknowledged = self.acknowledged.max(other.acknowledged);
        self.answered_ok += other.answered_ok;
        self.failed += other.failed;
        self.dropped += other.dropped;
        if self.last_error.is_none() {
            self.last_error = other.last_error;
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_reach_the_waiter() {
        let (d, w) = Done::channel();
        d.ok();
        assert!(w.await.is_ok());
        let (d, w) = Done::channel();
        d.fail("boom");
        assert!(matches!(w.await, Err(DoneError::Failed(e)) if e.to_string() == "boom"));
    }

    #[tokio::test]
    async fn dropping_reports_an_error() {
        let (d, w) = Done::channel();
        drop(d);
        assert!(matches!(w.await, Err(DoneError::Dropped)));
    }

    #[test]
    fn late_answer_is_harmless() {
        let (d, w) = Done::channel();
        drop(w);
        d.ok();
    }

    #[tokio::test]
    async fn split_waits_for_all_and_first_error_wins() {
        let (d, w) = Done::channel();
        let mut kids = d.split(3);
        let c = kids.pop().unwrap();
        let b = kids.pop().unwrap();
        let a = kids.pop().unwrap();
        a.ok();
        b.fail("first");
        let mut w = w;
        assert!(futures_util::poll!(&mut w).is_pending());
        c.fail("second");
        assert!(matches!(w.await, Err(DoneError::Failed(e)) if e.to_string() == "first"));

        let (d, w) = Done::channel();
        assert!(d.split(0).is_empty());
        assert!(w.await.is_ok());
    }

    #[test]
    fn tracked_counts() {
        let acks = Arc::new(Acks::new("t".into()));
        Done::tracked(acks.clone(), Revision(3)).ok();
        Done::tracked(acks.clone(), Revision(2)).ok();
        Done::tracked(acks.clone(), Revision(4)).fail("x");
        drop(Done::tracked(acks.clone(), Revision(5)));
        let s = acks.status();
        assert_eq!(
            (s.acknowledged, s.answered_ok, s.failed, s.dropped),
            (Revision(3), 2, 1, 1)
        );
        assert!(matches!(
            s.last_error,
            Some((Revision(5), DoneError::Dropped))
        ));
    }
}
