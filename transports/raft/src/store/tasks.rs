//! The store's background tasks: lease expiry and compaction by age (on the leader), and a restarted
//! member's catch-up gate.

use std::sync::Arc;
use std::time::Duration;

use openraft::Raft;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use datasync::{Revision, StoreError};

use super::{Inner, RaftStore};
use crate::network::wire::{Reply, Request};
use crate::propose::{Proposals, ProposeError};
use crate::storage::sm;
use crate::types::{Command, NodeId, TypeConfig};

/// Counts the leader changes this member sees (`etcd_server_leader_changes_seen_total`):
/// each time raft reports a leader other than the last one it reported.
pub(super) async fn count_leader_changes(
    raft: Raft<TypeConfig>,
    changes: prometheus_client::metrics::counter::Counter,
    stop: CancellationToken,
) {
    let mut metrics = raft.metrics();
    let mut last = None;
    loop {
        let leader = metrics.borrow_and_update().current_leader;
        if leader.is_some() && leader != last {
            changes.inc();
            last = leader;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            r = metrics.changed() => if r.is_err() { return },
        }
    }
}

/// Triggers snapshots until one covers log index `target`. openraft ignores a trigger
/// while a build runs, and a build that started earlier may end short of `target`, so
/// the trigger is repeated as soon as a build ends, or every second.
///
/// # Cancel safety
/// Dropped before it returns, a build may be under way; nothing more is promised.
pub(super) async fn snapshot_covering(
    raft: &Raft<TypeConfig>,
    target: Option<u64>,
) -> Result<(), StoreError> {
    let index =
        |m: &openraft::RaftMetrics<NodeId, openraft::BasicNode>| m.snapshot.map(|l| l.index);
    loop {
        let seen = index(&raft.metrics().borrow());
        raft.trigger()
            .snapshot()
            .await
            .map_err(|_| StoreError::Stopped)?;
        let built = raft
            .wait(Some(Duration::from_secs(1)))
            .metrics(
                |m| index(m) >= target || index(m) != seen,
                "a snapshot is built",
            )
            .await;
        match built {
            Ok(m) if index(&m) >= target => return Ok(()),
            Ok(_) | Err(openraft::metrics::WaitError::Timeout(..)) => continue,
            Err(openraft::metrics::WaitError::ShuttingDown) => return Err(StoreError::Stopped),
        }
    }
}

/// Builds a snapshot each time another [`RaftConfig::snapshot_log_bytes`] of log were
/// appended (openraft counts entries only), one that covers what was applied at the
/// crossing.
///
/// [`RaftConfig::snapshot_log_bytes`]: super::RaftConfig::snapshot_log_bytes
pub(super) async fn snapshot_by_log_bytes(
    raft: Raft<TypeConfig>,
    growth: Arc<crate::storage::wal::Growth>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = growth.crossed.notified() => {}
        }
        let target = raft.metrics().borrow().last_applied.map(|l| l.index);
        tokio::select! {
            _ = stop.cancelled() => return,
            built = snapshot_covering(&raft, target) => if built.is_err() { return },
        }
    }
}

/// Purges the log behind the last snapshot, but for `keep` entries. openraft does
/// that itself only when a build moves its snapshot on. The snapshot it starts with is
/// the state as it is (see `storage::sm::snapshot`), so after a restart a build at the
/// same index would leave the log from before the restart in place.
pub(super) async fn purge_behind_snapshot(
    raft: &Raft<TypeConfig>,
    keep: u64,
) -> Result<(), StoreError> {
    let at = raft.metrics().borrow().snapshot;
    if let Some(at) = at
        && at.index > keep
    {
        raft.trigger()
            .purge_log(at.index - keep)
            .await
            .map_err(|_| StoreError::Stopped)?;
    }
    Ok(())
}

/// Opens the read gate of a member that restarted after a crash (see
/// [`RaftStore::caught_up`]) once it has applied a read index from a leader: the first
/// one it gets, waited for as long as it takes (a member that applies slower than a
/// busy group writes would never reach a fresh index each time). Retries with growing
/// pauses; ends when the store stops.
pub(super) async fn catch_up(inner: std::sync::Weak<Inner>, stop: CancellationToken) {
    let mut pauses = datasync::transport::resync::Pauses::between(
        Duration::from_millis(50),
        Duration::from_secs(1),
    );
    let mut target = None;
    loop {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let store = RaftStore { inner };
        let Some(node) = &store.inner.node else {
            return;
        };
        let attempt = async {
            if target.is_none()
                && let Ok((Reply::ReadIndex(Ok(index)), _)) =
                    node.to_leader(|| Request::ReadIndex).await
            {
                target = Some(index);
            }
            match target {
                Some(index) => store.applied(index).await.is_ok(),
                None => false,
            }
        };
        let done = tokio::select! {
            _ = stop.cancelled() => return,
            done = attempt => done,
        };
        if done {
            debug!(node = node.id, "caught up with the group after a restart");
            store.inner.sm.set_complete(true);
            node.caught_up.send_replace(true);
            return;
        }
        drop(store);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pauses.next_pause()) => {}
        }
    }
}

/// Proposes the expiry of due leases, on the leader only; turns versions on once (with
/// `count_versions`) when it leads a group that has not.
pub(super) async fn ttl_task(
    count_versions: bool,
    proposals: Proposals,
    sm: Arc<sm::Shared>,
    raft: Raft<TypeConfig>,
    id: NodeId,
    stop: CancellationToken,
) {
    loop {
        // A leader of this build turns versions on once for the whole group.
        if count_versions
            && !sm.versions()
            && raft.metrics().borrow().current_leader == Some(id)
            && let Err(e) = proposals.propose_internal(Command::CountVersions).await
        {
            tracing::debug!(error = ?e, "counting versions not committed; retrying");
        }
        let (next, now) = sm.next_expiry();
        let wait = match next {
            Some(at) if at <= now => {
                // Only the leader decides expiry; followers apply its Expire command.
                if raft.metrics().borrow().current_leader == Some(id) {
                    // Keys' TTLs first, then lease objects (one command each: the
                    // proposer batches commands, and a batch holds no batch).
                    let keys = sm.due(now, 1024);
                    let cmd = if keys.is_empty() {
                        let ids = sm.due_leases(now, 1024);
                        (!ids.is_empty()).then_some(Command::LeaseExpire { ids })
                    } else {
                        Some(Command::Expire { keys })
                    };
                    match cmd {
                        None => Duration::from_millis(10),
                        Some(cmd) => match proposals.propose(cmd).await {
                            Ok(_) => continue,
                            Err(e) => {
                                let e = match e {
                                    ProposeError::Store(e) => e.to_string(),
                                    ProposeError::NotLeader(_) => "not the leader".into(),
                                };
                                warn!(error = %e, "lease expiry not committed; retrying");
                                Duration::from_millis(100)
                            }
                        },
                    }
                } else {
                    Duration::from_millis(100)
                }
            }
            Some(at) => (at - now).min(Duration::from_secs(1)),
            None => Duration::from_secs(1),
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = sm.ttl_changed.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Compacts the history older than `age` (etcd's periodic auto-compaction): every
/// tenth of `age` (1 s to 1 h) it notes the revision, and the leader compacts to the
/// newest one noted at least `age` ago. Why samples and not commit times: a revision
/// carries no time, and the floor only needs to be old enough. Every member samples (a
/// sample is taken after what it saw committed, so a new leader's older samples are as
/// safe as its own); only the leader proposes.
pub(super) async fn compact_by_age(
    inner: std::sync::Weak<Inner>,
    age: Duration,
    stop: CancellationToken,
) {
    let every = (age / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut noted: std::collections::VecDeque<(tokio::time::Instant, Revision)> =
        std::collections::VecDeque::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let store = RaftStore { inner };
        let now = tokio::time::Instant::now();
        noted.push_back((now, store.revision()));
        // Keep only the newest sample at least `age` old, and the ones after it.
        while noted.len() > 1 && now.duration_since(noted[1].0) >= age {
            noted.pop_front();
        }
        let Some(&(at, floor)) = noted.front() else {
            continue;
        };
        let leads = store.inner.node.as_ref().is_none_or(|n| n.leads());
        if now.duration_since(at) < age || !leads || floor <= store.compacted_revision() {
            continue;
        }
        match store.compact(floor).await {
            Ok(()) => tracing::debug!(%floor, "history older than {age:?} compacted"),
            Err(e) => tracing::debug!(error = %e, %floor, "compaction by age not done"),
        }
    }
}
