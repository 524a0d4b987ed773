//! The resync driver (for transports): one registration's stream, kept continuous.
//!
//! A transport that follows a server-side watch (etcd, NATS, a raft member for a
//! `RemoteStore`) implements [`Upstream`]: read a snapshot of the registration's
//! prefixes at one revision, open a follower from a revision, and take the follower's
//! next item, saying when continuity is lost (as a [`Lost`]). [`drive`] does the rest,
//! the same way for every transport:
//!
//! - a resync waits for room in the queue first (so it is fresh when delivered), takes
//!   the pending resync request (requests made until then coalesce into it), and is
//!   retried with growing pauses (50 ms doubling to 2 s, from `backon`), each failure
//!   queued as `Interrupted`;
//! - a change the queue has no room for drops the follower and resyncs (`Overflow`)
//!   once the consumer has made room (rule 7);
//! - a requested resync is served once the consumer has taken what was queued;
//! - prefixes added to the registration are read alone at the last delivered revision
//!   L ([`Upstream::extend`]), queued as a `PrefixAdded` resync at L, and the whole
//!   set is followed from L + 1; a transport that cannot read at L (or fails to)
//!   gets a full resync with reason `PrefixAdded` instead;
//! - a follower that breaks is opened again from `last + 1` with the same pauses if the
//!   transport [`RESUMES`](Upstream::RESUMES) and the error is retryable; otherwise the
//!   consumer hears of it (`Interrupted`) and a resync (`Reconnect`) follows;
//! - a resync read below the last delivered revision is a `StoreReset`; a change at or
//!   below it is an error and a resync;
//! - closing the registration ends the task and releases the follower.
//!
//! The decisions are a pure [`State`] with [`State::step`] (unit-tested without I/O or
//! a server); [`drive`] only performs them.

mod state;
#[cfg(test)]
mod tests;

use crate::transport::relay::{Item, Relay};
use crate::{KeyChange, PrefixSet, PrefixValues, ResyncReason, Revision, StoreError};

pub use state::{Action, Effect, FIRST_PAUSE, Input, MAX_PAUSE, Pauses, Phase, State};

/// A snapshot of a registration's prefixes at one revision.
#[derive(Debug)]
pub struct Snapshot<F> {
    /// The revision R the values were read at.
    pub revision: Revision,
    /// The values, grouped per prefix.
    pub values: Vec<PrefixValues>,
    /// A follower from R + 1, if the transport opens one with the snapshot (`None`:
    /// the driver calls [`Upstream::resume`]).
    pub follower: Option<F>,
}

/// The next item of a follower.
#[derive(Debug)]
pub enum Next {
    /// The changes of one transaction under the registration's prefixes.
    Change(Revision, Vec<KeyChange>),
    /// A resync the store itself sent (a raft member's), passed on as it is.
    Resync(Revision, ResyncReason, Vec<PrefixValues>),
    /// Everything up to this revision was seen; nothing watched changed.
    Progress(Revision),
    /// A transient error to tell the consumer; the follower goes on.
    Interrupted(StoreError),
}

/// How a follower (or opening one) ended.
#[derive(Debug)]
pub enum Lost {
    /// Continuity is lost: a resync with this reason follows.
    Resync(ResyncReason),
    /// The follower broke (see [`Upstream::RESUMES`] for what follows).
    Broken(StoreError),
}

/// What a transport implements to be driven (see the module docs).
#[async_trait::async_trait]
pub trait Upstream: Send + 'static {
    /// An open server-side watch.
    type Follower: Send + 'static;

    /// Whether a broken follower can be opened again from the last revision without a
    /// resync (the store replays from any revision it retains, as etcd does).
    const RESUMES: bool;

    /// Whether the registration watches nothing (no follower is opened; the driver
    /// waits for a close, a request or added prefixes).
    fn idle(&self) -> bool {
        false
    }

    /// The prefixes to read and follow from now on (the consumer added or removed
    /// some): later snapshots and followers use them.
    fn rescope(&mut self, prefixes: PrefixSet);

    /// Reads `added` alone at revision `at` (the last delivered), for a resync of added
    /// prefixes (called only if the transport [`RESUMES`](Self::RESUMES)). Otherwise a
    /// full resync follows: `Lost::Resync` with its reason (`PrefixAdded` when the
    /// transport cannot, e.g. `at` was compacted; `StoreReset` when the store is not the
    /// one `at` came from), or `Lost::Broken` (told to the consumer, then `PrefixAdded`).
    ///
    /// # Cancel safety
    /// Dropped when the registration closes.
    async fn extend(&mut self, added: &PrefixSet, at: Revision) -> Result<Vec<PrefixValues>, Lost> {
        let _ = (added, at);
        Err(Lost::Resync(ResyncReason::PrefixAdded))
    }

    /// Reads every prefix at one revision.
    ///
    /// # Cancel safety
    /// Dropped when the registration closes.
    async fn snapshot(&mut self) -> Result<Snapshot<Self::Follower>, StoreError>;

    /// Opens a follower from `from`. A transport that cannot resume answers
    /// `Lost::Resync`.
    ///
    /// # Cancel safety
    /// Dropped when the registration closes.
    async fn resume(&mut self, from: Revision) -> Result<Self::Follower, Lost>;

    /// The next item of `follower`; `last` is the revision delivered last.
    ///
    /// # Cancel safety
    /// Must be cancel safe: it is raced against a close and a resync request, and a
    /// later call must go on where the cancelled one stopped.
    async fn next(&mut self, follower: &mut Self::Follower, last: Revision) -> Result<Next, Lost>;

    /// Releases a follower the driver no longer needs (dropping it is the default).
    async fn release(&mut self, follower: Self::Follower) {
        drop(follower);
    }
}

/// Where the driver starts: the initial resync at `revision` is already queued.
#[derive(Debug)]
pub struct Start<F> {
    /// The revision of the resync the consumer was given.
    pub revision: Revision,
    /// A follower from `revision + 1`, if one is open.
    pub follower: Option<F>,
    /// A resync owed already (opening the first follower found continuity lost).
    pub owed: Option<ResyncReason>,
}

/// Runs one registration until it is closed (see the module docs). Spawn it.
pub async fn drive<U: Upstream>(mut up: U, relay: Relay, start: Start<U::Follower>) {
    let reg = relay.producer().clone();
    let name = reg.name().to_owned();
    let phase = match (start.owed, &start.follower) {
        (Some(reason), _) => Phase::Resyncing(reason),
        (None, Some(_)) => Phase::Following,
        (None, None) if up.idle() => Phase::Following,
        (None, None) => Phase::Resuming,
    };
    let mut state = State::new(phase, start.revision, U::RESUMES);
    let mut follower = start.follower;
    loop {
        let mut error = None;
        let input = match state.action() {
            Action::Stop => break,
            Action::Pause(delay) => tokio::select! {
                _ = reg.closed() => Input::Closed,
                _ = tokio::time::sleep(delay) => Input::Paused,
            },
            Action::Resync(reason) => {
                if let Some(f) = follower.take() {
                    up.release(f).await;
                }
                let Some(permit) = relay.reserve().await else {
                    break;
                };
                reg.take_resync_request();
                if let Some(set) = reg.take_set() {
                    up.rescope(set);
                }
                let read = tokio::select! {
                    _ = reg.closed() => break,
                    read = up.snapshot() => read,
                };
                match read {
                    Ok(snap) => {
                        let reason = state.reason_for(reason, snap.revision);
                        tracing::debug!(registration = %name, ?reason, revision = %snap.revision, "resync");
                        permit.send(Item::Resync(snap.revision, reason, snap.values));
                        let open = snap.follower.is_some() || up.idle();
                        follower = snap.follower;
                        Input::Resynced {
                            revision: snap.revision,
                            open,
                        }
                    }
                    Err(e) => {
                        tracing::warn!(registration = %name, error = %e, "resync failed; retrying");
                        permit.send(Item::Interrupted(e));
                        Input::ResyncFailed
                    }
                }
            }
            Action::Extend => {
                let Some((set, added)) = reg.take_owed() else {
                    // A full resync paid them meanwhile.
                    state = state.step(Input::Extended { open: true }).1;
                    continue;
                };
                if let Some(f) = follower.take() {
                    up.release(f).await;
                }
                up.rescope(set);
                let Some(permit) = relay.reserve().await else {
                    break;
                };
                let last = state.last();
                // A transport that cannot resume could not follow on from `last`.
                let read = if U::RESUMES {
                    tokio::select! {
                        _ = reg.closed() => break,
                        read = up.extend(&added, last) => read,
                    }
                } else {
                    Err(Lost::Resync(ResyncReason::PrefixAdded))
                };
                match read {
                    Ok(values) => {
                        tracing::debug!(registration = %name, revision = %last, "resync of added prefixes");
                        permit.send(Item::Resync(last, ResyncReason::PrefixAdded, values));
                        Input::Extended { open: false }
                    }
                    Err(Lost::Resync(reason)) => Input::Lost(reason),
                    Err(Lost::Broken(e)) => {
                        tracing::warn!(registration = %name, error = %e, "reading added prefixes failed; resyncing");
                        permit.send(Item::Interrupted(e));
                        Input::Lost(ResyncReason::PrefixAdded)
                    }
                }
            }
            Action::Resume(from) => {
                let opened = tokio::select! {
                    _ = reg.closed() => break,
                    opened = up.resume(from) => opened,
                };
                match opened {
                    Ok(f) => {
                        follower = Some(f);
                        Input::Opened
                    }
                    Err(lost) => lost_input(lost, &mut error),
                }
            }
            Action::Follow => {
                // A request or added prefixes, once the consumer has taken what was queued.
                let asked = || {
                    if reg.resync_pending() {
                        Input::Requested
                    } else {
                        Input::Added
                    }
                };
                let Some(f) = follower.as_mut() else {
                    // Nothing to follow: wait for a close, a request or added prefixes.
                    tokio::select! {
                        _ = reg.closed() => break,
                        _ = relay.requested() => {}
                    }
                    state = state.step(asked()).1;
                    continue;
                };
                let next = tokio::select! {
                    biased;
                    _ = reg.closed() => None,
                    _ = relay.requested() => Some(Err(asked())),
                    next = up.next(f, state.last()) => Some(Ok(next)),
                };
                let next = match next {
                    None => None,
                    Some(Err(input)) => {
                        state = state.step(input).1;
                        continue;
                    }
                    Some(Ok(next)) => Some(next),
                };
                match next {
                    None => Input::Closed,
                    Some(Ok(Next::Change(rev, changes))) => {
                        if rev <= state.last() {
                            error = Some(StoreError::Unavailable(
                                format!("change at {rev}, at or before {}", state.last()).into(),
                            ));
                            Input::Stale
                        } else if relay.try_send(Item::Change(rev, changes)).is_err() {
                            if reg.is_closed() {
                                Input::Closed
                            } else {
                                tracing::debug!(registration = %name, "queue full: resync follows");
                                Input::QueueFull
                            }
                        } else {
                            Input::Change(rev)
                        }
                    }
                    Some(Ok(Next::Resync(rev, reason, values))) => {
                        if relay.try_send(Item::Resync(rev, reason, values)).is_err() {
                            if reg.is_closed() {
                                Input::Closed
                            } else {
                                Input::QueueFull
                            }
                        } else {
                            Input::Resynced {
                                revision: rev,
                                open: true,
                            }
                        }
                    }
                    Some(Ok(Next::Progress(rev))) => Input::Progress(rev),
                    Some(Ok(Next::Interrupted(e))) => {
                        let _ = relay.try_send(Item::Interrupted(e));
                        continue;
                    }
                    Some(Err(lost)) => lost_input(lost, &mut error),
                }
            }
        };
        let (effect, next) = state.step(input);
        state = next;
        match (effect, error) {
            (Effect::Report, Some(e)) => {
                tracing::warn!(registration = %name, error = %e, "watch lost continuity; resyncing");
                let _ = relay.try_send(Item::Interrupted(e));
            }
            (Effect::None, Some(e)) => {
                tracing::warn!(registration = %name, error = %e, resume = %state.last().next(), "watch broken; resuming");
            }
            _ => {}
        }
    }
    if let Some(f) = follower.take() {
        up.release(f).await;
    }
}

fn lost_input(lost: Lost, error: &mut Option<StoreError>) -> Input {
    match lost {
        Lost::Resync(reason) => Input::Lost(reason),
        Lost::Broken(e) => {
            let retryable = e.is_retryable();
            *error = Some(e);
            Input::Broken { retryable }
        }
    }
}
