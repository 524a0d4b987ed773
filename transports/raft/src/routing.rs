//! Routing a request to the leader, for a member forwarding a write and for a remote
//! client or a joining node: redirects, elections and unreachable members.

use std::time::Duration;

use tokio::time::Instant;

use crate::error::ClusterError;
use crate::members::Refusal;
use crate::network::NetError;
use crate::network::client::Pool;
use crate::network::wire::{Reply, Request, ServiceError, WireError};
use crate::types::NodeId;

impl Reply {
    pub(crate) fn error(&self) -> Option<&ServiceError> {
        // A member that is stopping (or left) did nothing with a client's call.
        static STOPPED: ServiceError = ServiceError::Stopped;
        match self {
            Reply::Proposed(Err(e)) | Reply::ReadIndex(Err(e)) | Reply::Membership(Err(e)) => {
                Some(e)
            }
            Reply::Client(Err(WireError::Stopped)) => Some(&STOPPED),
            _ => None,
        }
    }
}

/// Asks `seeds` (any member) for a membership change (a join, a leave); the request is
/// routed to the leader. Returns the change's log index.
pub(crate) async fn change_membership(
    pool: &Pool,
    seeds: &[String],
    req: impl Fn() -> Request,
    timeout: Duration,
) -> Result<u64, ClusterError> {
    let mut next_seed = seeds.iter().cycle();
    let (reply, _) = route(
        timeout,
        Duration::ZERO,
        |hint| hint.or_else(|| next_seed.next().map(|s| (0, s.clone()))),
        |(_, addr)| {
            let req = req();
            async move { Ok((pool.get(&addr).call(req, timeout).await?, true)) }
        },
    )
    .await?;
    match reply {
        Reply::Membership(Ok(index)) => Ok(index),
        Reply::Membership(Err(e)) => Err(membership_error(e, timeout)),
        _ => Err(ClusterError::UnexpectedReply),
    }
}

/// The retry loop shared by forwarding and joining: `pick` chooses a target (given a
/// redirect hint), `send` calls it. A redirect is followed at once; a target that cannot
/// be reached, no known leader, or a change in progress is retried with backoff until
/// `timeout`. A call that failed after it was sent is not retried (its outcome is
/// unknown).
///
/// `last_try`: no attempt after the first starts in this last part of the time (at most
/// a quarter of it), for a caller whose attempts get only the time left. Why: such an
/// attempt sent with almost no time left can only time out, and its timeout would turn
/// "no member could take the call" (every attempt refused) into "the call failed after
/// it was sent" (outcome unknown). A remote client pinned to one refusing member got
/// that depending on where its backoff ended. Callers that give every attempt its own
/// full time pass zero.
pub(crate) async fn route<F, Fut>(
    timeout: Duration,
    last_try: Duration,
    mut pick: impl FnMut(Option<(NodeId, String)>) -> Option<(NodeId, String)>,
    mut send: F,
) -> Result<(Reply, bool), ClusterError>
where
    F: FnMut((NodeId, String)) -> Fut,
    Fut: std::future::Future<Output = Result<(Reply, bool), NetError>>,
{
    let deadline = Instant::now() + timeout;
    // The last moment an attempt may start (the first one always does).
    let last_start = deadline - last_try.min(timeout / 4);
    let mut hint = None;
    let mut pauses = datasync::transport::resync::Pauses::between(
        Duration::from_millis(5),
        Duration::from_millis(200),
    );
    let mut in_progress = false;
    loop {
        let redirected = hint.is_some();
        match pick(hint.take()) {
            None => {}
            Some(target) => match send(target).await {
                Ok((reply, remote)) => match reply.error() {
                    Some(ServiceError::NotLeader { leader }) => hint = leader.clone(),
                    Some(ServiceError::InProgress) => in_progress = true,
                    Some(ServiceError::Stopped) if !remote => return Err(ClusterError::Stopped),
                    Some(ServiceError::Stopped) => {}
                    _ => return Ok((reply, remote)),
                },
                Err(e @ (NetError::AuthFailed(_) | NetError::Version(_))) => {
                    return Err(ClusterError::Unauthenticated(e));
                }
                Err(e) if e.not_sent() => {}
                Err(e) => return Err(ClusterError::Net(e)),
            },
        }
        if hint.is_none() || redirected {
            let left = last_start.saturating_duration_since(Instant::now());
            tokio::time::sleep(pauses.next_pause().min(left)).await;
        }
        if Instant::now() >= last_start {
            return Err(if in_progress {
                ClusterError::InProgress
            } else {
                ClusterError::NoLeader(timeout)
            });
        }
    }
}

/// The least time a remote client's attempt after the first is given (a quarter of the
/// whole time if that is less): see [`route`].
pub(crate) const LAST_TRY: Duration = Duration::from_secs(1);

/// A refused membership change as a [`ClusterError`] (redirects, changes in progress
/// and stops are handled by [`route`] before).
pub(crate) fn membership_error(e: ServiceError, timeout: Duration) -> ClusterError {
    match e {
        ServiceError::Refused(Refusal::NotClustered) => ClusterError::NotClustered,
        ServiceError::Refused(r) => ClusterError::Refused(r),
        ServiceError::InProgress => ClusterError::InProgress,
        ServiceError::Stopped => ClusterError::Stopped,
        ServiceError::NotLeader { .. } | ServiceError::NoQuorum => ClusterError::NoLeader(timeout),
        ServiceError::Store(_) => ClusterError::UnexpectedReply,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member that refuses every call (stopping, or hearing from no leader) makes
    /// `route` give up with "no leader", never with a call sent too late to be
    /// answered.
    #[tokio::test(start_paused = true)]
    async fn no_attempt_starts_too_late_to_be_answered() {
        for timeout in [Duration::from_millis(300), Duration::from_secs(15)] {
            let start = Instant::now();
            let deadline = start + timeout;
            let mut starts = Vec::new();
            let routed = route(
                timeout,
                LAST_TRY,
                |_| Some((1, "member".to_owned())),
                |_| {
                    starts.push(Instant::now());
                    async { Ok((Reply::Client(Err(WireError::Stopped)), true)) }
                },
            )
            .await;
            assert!(
                matches!(routed, Err(ClusterError::NoLeader(t)) if t == timeout),
                "{routed:?}"
            );
            assert!(starts.len() > 2, "the refusing member is asked again");
            let least = LAST_TRY.min(timeout / 4);
            for s in &starts {
                assert!(
                    deadline - *s >= least,
                    "{timeout:?}: an attempt started {:?} before the deadline",
                    deadline - *s
                );
            }
            // It gave up when no attempt could start any more, not earlier.
            assert!(
                Instant::now() >= deadline - least,
                "{:?}",
                Instant::now() - start
            );
        }
    }
}
