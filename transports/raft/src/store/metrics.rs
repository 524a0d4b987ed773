//! [`RaftStore::register_metrics`]: the registered metrics, and the gauges read at
//! scrape time (see [`crate::metrics`]).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::{RaftStore, WeakStore};

/// Whether a store can serve ([`RaftStore::health`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// The leader this member knows of now. (A leader cut off from its quorum still
    /// names itself: see `serving`.)
    pub leader: Option<u64>,
    /// Whether this member serves clients: it is still a member, and hears a live
    /// leader (a single node always does).
    pub serving: bool,
    /// The raft term.
    pub term: u64,
    /// The revision of the applied state.
    pub revision: u64,
    /// Why the store cannot serve at all, if it cannot: it was shut down, raft stopped
    /// on a fatal error, or the state machine's writer failed. It does not recover:
    /// restart the process.
    pub stopped: Option<String>,
    /// The size of the state machine's database file, in bytes.
    pub db_bytes: u64,
    /// The index of the last entry in this member's log.
    pub last_log_index: u64,
    /// The index of the last entry applied to its state.
    pub applied_index: u64,
}

impl Health {
    /// Ready to serve: running, a member that hears a live leader.
    pub fn ready(&self) -> bool {
        self.stopped.is_none() && self.leader.is_some() && self.serving
    }
}

impl RaftStore {
    /// Whether the store can serve, and what an operator checks first. Takes no lock
    /// an apply or a snapshot install holds.
    pub fn health(&self) -> Health {
        let inner = &self.inner;
        let raft = inner.raft.metrics().borrow().clone();
        let stopped = if inner.stop.is_cancelled() {
            Some("the store was shut down".to_owned())
        } else if let Err(fatal) = &raft.running_state {
            Some(format!("raft stopped: {fatal}"))
        } else {
            inner.sm.writer_stopped()
        };
        Health {
            leader: raft.current_leader,
            serving: self.hears_leader() && !self.has_left(),
            term: raft.current_term,
            revision: self.revision().0,
            stopped,
            db_bytes: db_bytes(&inner.config.dir),
            last_log_index: raft.last_log_index.unwrap_or(0),
            applied_index: raft.last_applied.map_or(0, |l| l.index),
        }
    }

    /// Adds this store's metrics to `registry`: histograms and counters as they are
    /// updated, gauges read at each scrape. The registry does not keep the store open;
    /// once it is gone its gauges are no longer reported.
    pub fn register_metrics(&self, registry: &mut Registry) {
        let m = self.inner.sm.metrics().clone();
        registry.register(
            "etcd_disk_wal_fsync_duration_seconds",
            "Time of one durable raft log write (one frame of entries, O_DSYNC).",
            m.wal_fsync,
        );
        registry.register(
            "etcd_disk_backend_commit_duration_seconds",
            "Time of one commit of applied state to the database.",
            m.backend_commit,
        );
        registry.register(
            "datasync_raft_apply_duration_seconds",
            "Time to apply one batch of committed log entries.",
            m.apply,
        );
        registry.register(
            "datasync_raft_proposal_duration_seconds",
            "Time from handing a client write (or a batch of them) to raft until raft answers (committed and applied, or failed) or the write is given up.",
            m.proposal,
        );
        registry.register(
            "datasync_raft_proposal_batch_size",
            "Client writes proposed together in one log entry.",
            m.batch_size,
        );
        registry.register(
            "datasync_raft_client_writes_committed",
            "Client writes this member proposed that committed (several share a log entry).",
            m.committed,
        );
        registry.register(
            "etcd_server_proposals_failed",
            "Client writes this member proposed that failed or timed out.",
            m.failed,
        );
        registry.register(
            "etcd_server_leader_changes_seen",
            "Leader changes this member has seen.",
            m.leader_changes,
        );
        registry.register(
            "datasync_raft_snapshots_sent",
            "Snapshots this member sent to followers in full.",
            m.snapshots_sent,
        );
        registry.register_collector(Box::new(Gauges(self.downgrade())));
    }
}

/// The gauges, read at scrape time.
#[derive(Debug)]
struct Gauges(WeakStore);

fn gauge(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn int(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

impl Collector for Gauges {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(store) = self.0.upgrade() else {
            return Ok(());
        };
        let inner = &store.inner;
        let raft = inner.raft.metrics().borrow().clone();
        let health = store.health();
        let hub = inner.sm.lock().hub.stats();
        // A leader cut off from its quorum still names itself (openraft 0.9 does not
        // step down): a member counts a leader only while it hears one.
        let leader = health.leader.filter(|_| health.serving);
        let e = &mut e;
        gauge(
            e,
            "etcd_server_has_leader",
            "1 if this member hears a live leader.",
            i64::from(leader.is_some()),
        )?;
        gauge(
            e,
            "etcd_server_is_leader",
            "1 if this member leads and hears from a quorum.",
            i64::from(leader == Some(inner.config.node_id)),
        )?;
        gauge(
            e,
            "datasync_raft_term",
            "The current raft term.",
            int(health.term),
        )?;
        let index = |l: Option<u64>| int(l.unwrap_or(0));
        gauge(
            e,
            "datasync_raft_last_log_index",
            "Index of the last entry in this member's log.",
            index(raft.last_log_index),
        )?;
        gauge(
            e,
            "etcd_server_proposals_applied_total",
            "Index of the last log entry applied to the state machine (as etcd's).",
            index(raft.last_applied.map(|l| l.index)),
        )?;
        gauge(
            e,
            "datasync_raft_snapshot_index",
            "Last log index in this member's latest snapshot.",
            index(raft.snapshot.map(|l| l.index)),
        )?;
        counter(
            e,
            "datasync_raft_snapshots_installed",
            "Snapshots installed from a leader since the store opened.",
            inner
                .sm
                .installed
                .load(std::sync::atomic::Ordering::Relaxed),
        )?;
        gauge(
            e,
            "etcd_server_proposals_pending",
            "Client writes queued or in flight on this member.",
            int(inner.proposals.pending()),
        )?;
        gauge(
            e,
            "etcd_debugging_mvcc_current_revision",
            "The store's revision.",
            int(health.revision),
        )?;
        gauge(
            e,
            "etcd_debugging_mvcc_watcher_total",
            "Watch registrations fed.",
            int(hub.active),
        )?;
        gauge(
            e,
            "etcd_debugging_mvcc_slow_watcher_total",
            "Watch registrations behind: their queue overflowed, a resync follows.",
            int(hub.behind),
        )?;
        gauge(
            e,
            "datasync_watch_queued_events",
            "Transactions queued for watch registrations, not yet taken.",
            int(hub.queued),
        )?;
        counter(
            e,
            "etcd_debugging_mvcc_events",
            "Transactions queued for a watch registration (one per registration).",
            hub.delivered,
        )?;
        counter(
            e,
            "datasync_watch_overflows",
            "Watch queues that overflowed (each costs that registration a resync).",
            hub.overflows,
        )?;
        gauge(
            e,
            "etcd_mvcc_db_total_size_in_bytes",
            "Size of the state machine's database file.",
            int(health.db_bytes),
        )?;
        gauge(
            e,
            "datasync_raft_writer_up",
            "1 while the state machine's writer stores applied state.",
            i64::from(inner.sm.writer_stopped().is_none()),
        )?;
        Ok(())
    }
}

fn db_bytes(dir: &std::path::Path) -> u64 {
    std::fs::metadata(crate::storage::db_path(dir)).map_or(0, |m| m.len())
}
