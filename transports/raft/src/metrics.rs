//! Prometheus metrics of a store: its commit path, raft, and watches
//! ([`RaftStore::register_metrics`](crate::RaftStore::register_metrics)).
//!
//! Where etcd measures the same thing the name and buckets are etcd's, so dashboards
//! built for etcd apply: `etcd_disk_wal_fsync_duration_seconds` (here one log frame's
//! `O_DSYNC` write, the log's whole durability cost), `etcd_disk_backend_commit_duration_seconds`
//! (a redb commit of the state machine's writer), `etcd_server_has_leader`,
//! `etcd_server_is_leader`, `etcd_server_leader_changes_seen_total`,
//! `etcd_server_proposals_applied_total` (a gauge of the applied index, as etcd's),
//! `etcd_server_proposals_failed_total`, `etcd_server_proposals_pending`,
//! `etcd_debugging_mvcc_{watcher,slow_watcher,events}_total`,
//! `etcd_debugging_mvcc_current_revision`, `etcd_mvcc_db_total_size_in_bytes`.
//! What etcd does not have, or means otherwise, is `datasync_raft_*` and
//! `datasync_watch_*`: client writes committed are counted per write
//! (`datasync_raft_client_writes_committed_total`), since many share one log entry;
//! `datasync_raft_proposal_duration_seconds` is the time from handing one log entry's
//! write (a lone write or a batch) to openraft until it answers or the write is given
//! up (on one node with one write at a time, its mean less the log write's and the
//! apply's is openraft's own share of a write; in a cluster it also holds replication,
//! and under load a batch is answered only after the next batch's log write);
//! etcd's `proposals_committed_total` (the commit index) has no counterpart, as
//! openraft 0.9 does not report the commit index. The backend commit histogram counts
//! durable commits only (the writer commits without fsync in between, as etcd's
//! batch does).
//!
//! Why histograms and counters are updated where things happen but gauges are read at
//! scrape time: a gauge read then (raft's metrics, the hub, the file size) is exact and
//! costs the commit path nothing.

use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// What the store measures as it runs. Shared by the log, the state machine, the
/// proposer and the network; cheap to clone (every metric is an `Arc`).
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    pub(crate) wal_fsync: Histogram,
    pub(crate) backend_commit: Histogram,
    pub(crate) apply: Histogram,
    pub(crate) proposal: Histogram,
    pub(crate) batch_size: Histogram,
    pub(crate) committed: Counter,
    pub(crate) failed: Counter,
    pub(crate) leader_changes: Counter,
    pub(crate) snapshots_sent: Counter,
}

/// etcd's disk buckets: 1 ms to 8 s, doubling.
fn disk_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 14))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            wal_fsync: disk_buckets(),
            backend_commit: disk_buckets(),
            // etcd's apply buckets: 100 µs to 3.3 s.
            apply: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            proposal: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            committed: Counter::default(),
            failed: Counter::default(),
            leader_changes: Counter::default(),
            snapshots_sent: Counter::default(),
        }
    }
}

/// Seconds since `start`, for a histogram.
pub(crate) fn since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}
