//! The pure state of one registration's stream, and its transitions.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

use crate::{ResyncReason, Revision};

/// The first pause after a failure; pauses double up to [`MAX_PAUSE`].
pub const FIRST_PAUSE: Duration = Duration::from_millis(50);
/// The longest pause between two tries.
pub const MAX_PAUSE: Duration = Duration::from_secs(2);

/// Pauses between tries: doubling from a first pause up to a longest one, without end
/// (`backon`'s exponential backoff, no jitter). Every retry loop of the transports
/// uses one.
#[derive(Debug)]
pub struct Pauses {
    builder: ExponentialBuilder,
    backoff: ExponentialBackoff,
    max: Duration,
}

impl Default for Pauses {
    /// From [`FIRST_PAUSE`] to [`MAX_PAUSE`].
    fn default() -> Self {
        Pauses::between(FIRST_PAUSE, MAX_PAUSE)
    }
}

impl Pauses {
    /// From `first`, doubling, up to `max`.
    pub fn between(first: Duration, max: Duration) -> Pauses {
        let builder = ExponentialBuilder::new()
            .with_min_delay(first)
            .with_max_delay(max)
            .without_max_times();
        Pauses {
            builder,
            backoff: builder.build(),
            max,
        }
    }

    /// The next pause.
    pub fn next_pause(&mut self) -> Duration {
        self.backoff.next().unwrap_or(self.max)
    }

    /// Starts over from the first pause (after a success).
    pub fn reset(&mut self) {
        self.backoff = self.builder.build();
    }
}

/// Where a registration's stream is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Delivering changes from `last + 1` (a follower is open, or nothing is watched).
    Following,
    /// The follower broke; it is opened again from `last + 1` (a transport that
    /// [resumes](super::Upstream::RESUMES)).
    Resuming,
    /// A resync is owed, for this reason.
    Resyncing(ResyncReason),
    /// Prefixes were added: read them alone at `last` if the transport can, else
    /// resync.
    Extending,
    /// Waiting, then `then`.
    Pausing {
        /// How long.
        delay: Duration,
        /// The phase after the pause.
        then: Box<Phase>,
    },
    /// The registration is closed: nothing more happens.
    Closed,
}

/// What happened, as the driver saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A resync at this revision was queued; `open`: changes follow from it without
    /// opening anything (a follower came with the snapshot, or nothing is watched).
    Resynced {
        /// The resync's revision.
        revision: Revision,
        /// Whether a follower is open.
        open: bool,
    },
    /// Reading a resync failed (its error was queued as `Interrupted`).
    ResyncFailed,
    /// A follower opened at `last + 1`.
    Opened,
    /// A change at this revision was queued.
    Change(Revision),
    /// Every change up to this revision was seen (nothing watched changed).
    Progress(Revision),
    /// The store sent a change at or below the last revision: the hand-off or the
    /// store is not what it must be.
    Stale,
    /// The registration's queue had no room for a change.
    QueueFull,
    /// The consumer asked for a resync and has taken all that was queued.
    Requested,
    /// The consumer added prefixes and has taken all that was queued.
    Added,
    /// The added prefixes were served: their resync at `last` was queued (`open`:
    /// false, a follower of the whole set is opened next), or none were owed after
    /// all (`open`: true, the follower was kept).
    Extended {
        /// Whether a follower is open.
        open: bool,
    },
    /// The transport lost continuity.
    Lost(ResyncReason),
    /// The follower broke; `retryable`: the same call may succeed later.
    Broken {
        /// Whether the break is transient.
        retryable: bool,
    },
    /// A pause ended.
    Paused,
    /// The registration was closed.
    Closed,
}

/// What the driver does for the input's error, besides the new phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Nothing.
    None,
    /// Queue the input's error for the consumer as `Interrupted`.
    Report,
}

/// What the driver does next, read off the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Take the follower's next item (or, with none, wait for a close or a request).
    Follow,
    /// Open a follower from this revision.
    Resume(Revision),
    /// Wait for room, take the resync request, read a resync and queue it.
    Resync(ResyncReason),
    /// Take the added prefixes; read them at `last` and queue that resync.
    Extend,
    /// Sleep (a close ends it early).
    Pause(Duration),
    /// End the task.
    Stop,
}

/// One registration's stream: its phase, the revision the consumer's state is at, and
/// the pauses between failed tries.
#[derive(Debug)]
pub struct State {
    phase: Phase,
    last: Revision,
    resumes: bool,
    pauses: Pauses,
}

impl State {
    /// A stream whose consumer has the state at `last`, in `phase`; `resumes`: the
    /// transport can open a follower from any retained revision.
    pub fn new(phase: Phase, last: Revision, resumes: bool) -> State {
        State {
            phase,
            last,
            resumes,
            pauses: Pauses::default(),
        }
    }

    /// The phase.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The revision the consumer's state is at.
    pub fn last(&self) -> Revision {
        self.last
    }

    /// What to do next.
    pub fn action(&self) -> Action {
        match &self.phase {
            Phase::Following => Action::Follow,
            Phase::Resuming => Action::Resume(self.last.next()),
            Phase::Resyncing(reason) => Action::Resync(*reason),
            Phase::Extending => Action::Extend,
            Phase::Pausing { delay, .. } => Action::Pause(*delay),
            Phase::Closed => Action::Stop,
        }
    }

    /// The reason a resync owed for `owed` is delivered with, read at `at`: a store
    /// whose revision went back was reset (restored from a backup), whatever else
    /// happened.
    pub fn reason_for(&self, owed: ResyncReason, at: Revision) -> ResyncReason {
        if at < self.last {
            ResyncReason::StoreReset
        } else {
            owed
        }
    }

    fn pause_then(&mut self, then: Phase) -> Phase {
        let delay = self.pauses.next_pause();
        Phase::Pausing {
            delay,
            then: Box::new(then),
        }
    }

    /// The transition for `input`.
    pub fn step(mut self, input: Input) -> (Effect, State) {
        if self.phase == Phase::Closed {
            return (Effect::None, self);
        }
        let mut effect = Effect::None;
        self.phase = match (input, std::mem::replace(&mut self.phase, Phase::Closed)) {
            (Input::Closed, _) => Phase::Closed,
            (Input::Paused, Phase::Pausing { then, .. }) => *then,
            (Input::Resynced { revision, open }, _) => {
                self.last = revision;
                self.pauses.reset();
                if open {
                    Phase::Following
                } else {
                    Phase::Resuming
                }
            }
            (Input::ResyncFailed, Phase::Resyncing(reason)) => {
                self.pause_then(Phase::Resyncing(reason))
            }
            (Input::Opened, _) => {
                self.pauses.reset();
                Phase::Following
            }
            (Input::Change(rev), phase) => {
                self.last = rev;
                phase
            }
            (Input::Progress(rev), phase) => {
                self.last = self.last.max(rev);
                phase
            }
            (Input::Stale, _) => {
                effect = Effect::Report;
                Phase::Resyncing(ResyncReason::Reconnect)
            }
            (Input::QueueFull, _) => Phase::Resyncing(ResyncReason::Overflow),
            (Input::Requested, _) => Phase::Resyncing(ResyncReason::Requested),
            (Input::Added, Phase::Following) => Phase::Extending,
            (Input::Extended { open: true }, Phase::Extending) => Phase::Following,
            (Input::Extended { open: false }, Phase::Extending) => {
                // Only a transport that resumes reads added prefixes alone.
                if self.resumes {
                    Phase::Resuming
                } else {
                    Phase::Resyncing(ResyncReason::PrefixAdded)
                }
            }
            (Input::Lost(reason), _) => Phase::Resyncing(reason),
            (Input::Broken { retryable: true }, _) if self.resumes => {
                self.pause_then(Phase::Resuming)
            }
            (Input::Broken { .. }, _) => {
                // Not resumable here: the consumer hears of it, and a resync follows
                // after a pause (a break that persists while reads work must not become
                // a loop of full resyncs).
                effect = Effect::Report;
                self.pause_then(Phase::Resyncing(ResyncReason::Reconnect))
            }
            // An input the phase does not expect (a late pause end, a failure after a
            // close) changes nothing.
            (_, phase) => phase,
        };
        (effect, self)
    }
}
