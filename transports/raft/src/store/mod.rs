//! [`RaftStore`]: the embedded store handle, a `datasync` `Watcher` and `Writer`.

use datasync::transport::Producer;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use datasync::transport::feed::{FeedStream, Start};
use datasync::{
    CasOutcome, Consistency, DeleteOptions, Deleted, Expect, Key, KeyValue, Limits, Listing,
    Prefix, PrefixSet, PutOptions, ReadOptions, Revision, Source, StoreError, Value, Watch,
    WatchOptions, Watcher, Writer,
};
use openraft::error::{CheckIsLeaderError, RaftError};
use openraft::{BasicNode, Raft};
use tokio_util::sync::CancellationToken;
use tracing::{instrument, warn};

use crate::OpenError;
use crate::cluster::{ClusterConfig, Node};
use crate::error::ClusterError;
use crate::members::{Members, Role};
use crate::network::wire::{Reply, Request};
use crate::once::Requests;
use crate::propose::{Proposals, ProposeError, Rejected, unavailable};
use crate::storage::lease::Clock;
use crate::storage::sm;
mod backup;
mod metrics;
pub use metrics::Health;
mod open;
mod records;
mod tasks;

use crate::types::{Command, NodeId, Outcome, RequestId, TypeConfig, expected_rev};

/// The longest [`RaftConfig::history_age`]: ten 365-day years (as `datasync::MAX_TTL`).
pub const MAX_HISTORY_AGE: Duration = Duration::from_secs(10 * 365 * 86_400);

/// Configuration of an embedded store.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RaftConfig {
    /// Data directory (created if missing). Default `./data`.
    pub dir: PathBuf,
    /// This node's id (default 1). Keep it across restarts.
    pub node_id: u64,
    /// Largest value accepted, in bytes (default 1 MiB; at most [`MAX_VALUE_SIZE`]).
    pub max_value_size: usize,
    /// Transactions kept for reads at past revisions and watches from them (default
    /// 10,000): on disk with the state (so across restarts; each costs about its keys'
    /// previous records) and in memory.
    pub history: usize,
    /// Compacts, on the leader, the history older than this (etcd's periodic
    /// auto-compaction): every tenth of it (1 s to 1 h), the revision the store was at
    /// this long ago becomes the compaction floor. `None` (the default): only
    /// [`history`](Self::history) and [`compact`](RaftStore::compact) bound it.
    pub history_age: Option<Duration>,
    /// Build a snapshot (and compact the log) after this many new log entries
    /// (default 20,000).
    pub snapshot_every: u64,
    /// Build a snapshot (and compact the log) also after this many bytes of new log
    /// entries (default 64 MiB): entries carry up to hundreds of writes each under load,
    /// so a count alone lets the log grow large. Between 64 KiB and 1 TiB.
    pub snapshot_log_bytes: u64,
    /// Log entries kept behind a snapshot, for lagging followers (default 1,000).
    pub keep_logs: u64,
    /// Largest log segment file, in bytes (default 64 MiB; at least 64 KiB). Compaction
    /// deletes whole segments, so the log's disk use stays within a few of these.
    pub log_segment: u64,
    /// Cluster membership; `None` (the default) runs a single node with no network.
    pub cluster: Option<ClusterConfig>,
    /// The monotonic clock TTLs are counted on (the system's; tests skew it).
    pub clock: Clock,
    /// Serve other processes of this host through a Unix socket in `dir` (default on;
    /// see [`RemoteStore::connect_local`](crate::RemoteStore::connect_local)).
    pub local_endpoint: bool,
    /// Whether this member, leading, turns versions on (off only to test what a build
    /// from before versions leaves).
    pub(crate) count_versions: bool,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            dir: PathBuf::from("data"),
            node_id: 1,
            max_value_size: 1 << 20,
            history: 10_000,
            history_age: None,
            snapshot_every: 20_000,
            snapshot_log_bytes: 64 << 20,
            keep_logs: 1_000,
            log_segment: crate::storage::SEGMENT,
            cluster: None,
            clock: Clock::default(),
            local_endpoint: true,
            count_versions: true,
        }
    }
}

impl RaftConfig {
    /// Defaults, with data in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        RaftConfig {
            dir: dir.into(),
            ..Default::default()
        }
    }

    /// Sets [`local_endpoint`](Self::local_endpoint).
    #[must_use]
    pub fn local_endpoint(mut self, on: bool) -> Self {
        self.local_endpoint = on;
        self
    }

    /// Acts as a build from before per-key versions: never turns them on (tests).
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    #[must_use]
    pub fn as_older_build(mut self) -> Self {
        self.count_versions = false;
        self
    }

    /// Sets [`history_age`](Self::history_age).
    #[must_use]
    pub fn history_age(mut self, age: Option<Duration>) -> Self {
        self.history_age = age;
        self
    }

    /// Sets [`max_value_size`](Self::max_value_size).
    #[must_use]
    pub fn max_value_size(mut self, n: usize) -> Self {
        self.max_value_size = n;
        self
    }

    /// Sets [`snapshot_every`](Self::snapshot_every) and [`keep_logs`](Self::keep_logs).
    #[must_use]
    pub fn snapshots(mut self, every: u64, keep_logs: u64) -> Self {
        self.snapshot_every = every;
        self.keep_logs = keep_logs;
        self
    }

    /// Sets [`snapshot_log_bytes`](Self::snapshot_log_bytes).
    #[must_use]
    pub fn snapshot_log_bytes(mut self, bytes: u64) -> Self {
        self.snapshot_log_bytes = bytes;
        self
    }

    /// Counts TTLs on `clock` (for tests of members whose clocks disagree).
    #[must_use]
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Sets [`log_segment`](Self::log_segment).
    #[must_use]
    pub fn log_segment(mut self, bytes: u64) -> Self {
        self.log_segment = bytes;
        self
    }

    /// Makes this store a cluster member with node id `node_id` (unique in the group,
    /// kept across restarts).
    #[must_use]
    pub fn cluster(mut self, node_id: u64, cluster: ClusterConfig) -> Self {
        self.node_id = node_id;
        self.cluster = Some(cluster);
        self
    }

    /// Checks the invariants.
    pub fn validate(&self) -> Result<(), OpenError> {
        if let Some(c) = &self.cluster {
            c.validate().map_err(OpenError::Config)?;
            let allowed = (c.heartbeat.as_millis() / 100).max(1) * CLUSTER_VALUE_PER_100MS as u128;
            if self.max_value_size as u128 > allowed {
                return Err(OpenError::Config(
                    "in a cluster, max_value_size must be at most 1 MiB per 100 ms of heartbeat (a value must reach a follower within one heartbeat)",
                ));
            }
        }
        if self.node_id == 0 {
            return Err(OpenError::Config("node_id must not be 0"));
        }
        if self.snapshot_every == 0 {
            return Err(OpenError::Config("snapshot_every must be positive"));
        }
        if self
            .history_age
            .is_some_and(|a| a < Duration::from_secs(1) || a > MAX_HISTORY_AGE)
        {
            return Err(OpenError::Config(
                "history_age must be between 1 second and 10 years",
            ));
        }
        if self.max_value_size == 0 || self.max_value_size > MAX_VALUE_SIZE {
            return Err(OpenError::Config(
                "max_value_size must be between 1 byte and 16 MiB",
            ));
        }
        if self.snapshot_every > 1 << 40 || self.keep_logs > 1 << 40 {
            return Err(OpenError::Config(
                "snapshot_every and keep_logs must be at most 2^40 entries",
            ));
        }
        if self.snapshot_log_bytes < 64 << 10 || self.snapshot_log_bytes > 1 << 40 {
            return Err(OpenError::Config(
                "snapshot_log_bytes must be between 64 KiB and 1 TiB",
            ));
        }
        if self.log_segment < 64 << 10 || self.log_segment > 1 << 30 {
            return Err(OpenError::Config(
                "log_segment must be between 64 KiB and 1 GiB (segments are preallocated)",
            ));
        }
        Ok(())
    }
}

/// The largest [`RaftConfig::max_value_size`] of a single node: 16 MiB. In a cluster
/// the bound is [`CLUSTER_VALUE_PER_100MS`] per 100 ms of heartbeat. Why: a value
/// travels to a follower in one append, which openraft 0.9 must finish within one
/// heartbeat interval; a leader commits nothing it cannot send in time. 1 MiB per
/// 100 ms is 10 MB/s for encoding, encryption, transfer, decoding and the follower's
/// write. (A value was encoded byte by byte until it became one byte string: then a
/// 4 MiB append took about 1.2 s in a debug build and never replicated.)
pub const MAX_VALUE_SIZE: usize = 16 << 20;

/// In a cluster, the value size allowed per 100 ms of heartbeat (see [`MAX_VALUE_SIZE`]).
pub const CLUSTER_VALUE_PER_100MS: usize = 1 << 20;

/// The embedded store. Cheap to clone; clones share the node.
#[derive(Debug, Clone)]
pub struct RaftStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// The Unix socket other processes reach this store through, once open. First, so
    /// that it is dropped (its files removed) while the store's lock is still held.
    local: std::sync::OnceLock<crate::local::LocalEndpoint>,
    raft: Raft<TypeConfig>,
    sm: Arc<sm::Shared>,
    config: RaftConfig,
    source: Source,
    stop: CancellationToken,
    ttl: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    proposals: Proposals,
    /// Set when this store is a cluster member.
    node: Option<Node>,
    /// This store's own writes' request ids, in a cluster (forwarding retries).
    requests: Requests,
}

/// A store that may have stopped (held by its own server, for remote clients).
#[derive(Debug)]
pub(crate) struct WeakStore(std::sync::Weak<Inner>);

impl WeakStore {
    pub(crate) fn upgrade(&self) -> Option<RaftStore> {
        self.0.upgrade().map(|inner| RaftStore { inner })
    }
}

impl RaftStore {
    pub(crate) fn downgrade(&self) -> WeakStore {
        WeakStore(Arc::downgrade(&self.inner))
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftStore")
            .field("node_id", &self.config.node_id)
            .field("dir", &self.config.dir)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The lease word of a TTL (a duration: see [`crate::storage::lease`]).
fn expiry(ttl: Option<Duration>) -> Option<u64> {
    ttl.map(crate::storage::lease::word)
}

fn read_error(e: RaftError<NodeId, CheckIsLeaderError<NodeId, BasicNode>>) -> StoreError {
    match e {
        RaftError::Fatal(_) => StoreError::Stopped,
        RaftError::APIError(e) => unavailable(e),
    }
}

impl RaftStore {
    /// Proposes `cmd` on this single node without [`Command::check`], as a hostile or
    /// older member could have: only for tests of apply's handling of invalid entries.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub async fn propose_unchecked(&self, cmd: Command) -> Result<Outcome, StoreError> {
        match self.inner.proposals.propose_unchecked(cmd).await {
            Ok((out, _)) => Ok(out),
            Err(ProposeError::Store(e)) => Err(e),
            Err(ProposeError::NotLeader(_)) => Err(StoreError::Unsupported("not the leader")),
        }
    }

    /// Proposes `cmd` and returns once it is committed (durable on a quorum) and
    /// applied on this member. On a follower the proposal is forwarded to the leader.
    ///
    /// Concurrent proposals are batched into one log entry, so they share one fsync.
    ///
    /// # Cancel safety
    /// Dropping the future does not withdraw a proposal already queued or forwarded.
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, StoreError> {
        // Checked here for a typed error even where it is forwarded; not again below.
        cmd.check()?;
        let Some(node) = &self.inner.node else {
            return match self.inner.proposals.propose_unchecked(cmd).await {
                Ok((out, _)) => Ok(out),
                Err(ProposeError::Store(e)) => Err(e),
                Err(ProposeError::NotLeader(_)) => Err(unavailable(Rejected(
                    "this single node does not lead".into(),
                ))),
            };
        };
        node.check_member()?;
        if node.leads() {
            // On the leader the write is proposed here, keeping its typed error. The copy
            // is for the rare case that leadership moved meanwhile and it is forwarded.
            // A leader cut off from its quorum cannot commit: the caller hears so in time.
            let proposed = self.inner.proposals.propose_unchecked(cmd.clone());
            match tokio::time::timeout(node.forward_timeout, proposed).await {
                Err(_) => return Err(StoreError::Timeout(node.forward_timeout)),
                Ok(Ok((out, _))) => return Ok(out),
                Ok(Err(ProposeError::Store(e))) => return Err(e),
                Ok(Err(ProposeError::NotLeader(_))) => {}
            }
        }
        match node.to_leader(|| Request::Propose(cmd.clone())).await? {
            (Reply::Proposed(Ok((out, index))), remote) => {
                if remote {
                    self.forwarded_applied(node, index).await?;
                }
                Ok(out)
            }
            (Reply::Proposed(Err(e)), _) => Err(e.into()),
            _ => Err(StoreError::Backend(Box::new(ClusterError::UnexpectedReply))),
        }
    }

    /// Waits until this member has applied the log up to `index`.
    async fn applied(&self, index: u64) -> Result<(), StoreError> {
        let timeout = self
            .inner
            .node
            .as_ref()
            .map_or(Duration::from_secs(10), |n| n.forward_timeout);
        self.inner
            .raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "apply here")
            .await
            .map(|_| ())
            .map_err(|e| match e {
                openraft::metrics::WaitError::Timeout(t, _) => StoreError::Timeout(t),
                openraft::metrics::WaitError::ShuttingDown => StoreError::Stopped,
            })
    }

    /// [`applied`](Self::applied) for a write this member forwarded and the leader
    /// committed: a member that has heard from no leader for a while (removed from the
    /// group, or cut off) may never apply it, so the wait ends then and the write's
    /// outcome is returned as the leader reported it (a committed write is not an
    /// unknown one). Such a member serves no reads until it hears a leader again.
    /// Before, a removed member held each such write for the whole forward timeout and
    /// then reported it as timed out.
    async fn forwarded_applied(&self, node: &Node, index: u64) -> Result<(), StoreError> {
        let leaderless = async {
            // Not at once: a member that has just started may not have heard yet.
            tokio::time::sleep(crate::cluster::LEADERLESS).await;
            while node.hears_leader() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::select! {
            r = self.applied(index) => r,
            () = leaderless => {
                tracing::debug!(index, "a forwarded write committed; this member hears no leader to apply it");
                Ok(())
            }
        }
    }

    /// The raft term this member is in.
    pub fn raft_term(&self) -> u64 {
        self.inner.raft.metrics().borrow().current_term
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.inner.config.node_id
    }

    /// The address other members reach this node at (cluster members only).
    pub fn cluster_addr(&self) -> Option<&str> {
        self.inner.node.as_ref().map(|n| n.addr.as_str())
    }

    /// The leader this node knows of now, if any.
    pub fn leader(&self) -> Option<u64> {
        self.inner.raft.metrics().borrow().current_leader
    }

    /// The committed group configuration, as this member has applied it.
    pub fn members(&self) -> Members {
        Members::from_stored(&self.inner.sm.membership.borrow())
    }

    /// Committed group configurations as this member applies them, starting with the
    /// current one. Only committed configuration counts: a crashed member stays a member
    /// until it is removed.
    pub fn observe_membership(&self) -> MembershipWatch {
        MembershipWatch {
            rx: self.inner.sm.membership.subscribe(),
            first: true,
        }
    }

    /// Adds node `id` at `addr` (routed to the leader): as a learner that receives the
    /// log, or as a voter (added as a learner first, made a voter once caught up). Making
    /// an existing learner a voter promotes it. Returns once the change is committed.
    /// A change while another is in flight waits for it, up to the forward timeout,
    /// then fails with [`ClusterError::InProgress`].
    pub async fn add_member(&self, id: u64, addr: &str, role: Role) -> Result<(), ClusterError> {
        let node = self.inner.node.as_ref().ok_or(ClusterError::NotClustered)?;
        let req = || Request::Join {
            id,
            addr: addr.to_owned(),
            voter: role == Role::Voter,
        };
        self.membership_change(node, true, req).await
    }

    /// Adds node `id` at `addr` as a learner (routed to the leader) without waiting
    /// for it to run or catch up: etcd's `member add`. Start the node afterwards with
    /// this id, joining the group: as a voter it becomes one once caught up; as a
    /// learner it stays one until [`promote_member`](Self::promote_member). Unlike
    /// etcd's, the new member never counts towards the quorum before it has the log.
    /// Refused when `id` is a member already (at another address, or a voter).
    pub async fn register_member(&self, id: u64, addr: &str) -> Result<(), ClusterError> {
        let node = self.inner.node.as_ref().ok_or(ClusterError::NotClustered)?;
        let req = || Request::Register {
            id,
            addr: addr.to_owned(),
        };
        self.membership_change(node, true, req).await
    }

    /// Makes learner `id` a voter (routed to the leader): etcd's `member promote`.
    /// Refused at once when `id` is no learner, or holds less than 90 % of the leader's
    /// log ([`Refusal::NotInSync`](crate::Refusal::NotInSync)).
    pub async fn promote_member(&self, id: u64) -> Result<(), ClusterError> {
        let node = self.inner.node.as_ref().ok_or(ClusterError::NotClustered)?;
        self.membership_change(node, true, || Request::Promote { id })
            .await
    }

    /// Reaches learner `id` at `addr` from now on (routed to the leader): etcd's
    /// `member update`. Restart the member listening there; until then the group
    /// cannot reach it. Refused for a voter ([`Refusal::VoterMove`](crate::Refusal):
    /// remove it and add it again), when `id` is no member, when another member has
    /// `addr`, and when `addr` is not `host:port`.
    pub async fn update_member(&self, id: u64, addr: &str) -> Result<(), ClusterError> {
        let node = self.inner.node.as_ref().ok_or(ClusterError::NotClustered)?;
        let req = || Request::Update {
            id,
            addr: addr.to_owned(),
        };
        // A member moved away no longer hears the change it is told to wait for.
        self.membership_change(node, id != node.id, req).await
    }

    /// Removes node `id` from the group (routed to the leader); the node keeps its data.
    /// Removing this node itself is leaving.
    pub async fn remove_member(&self, id: u64) -> Result<(), ClusterError> {
        let node = self.inner.node.as_ref().ok_or(ClusterError::NotClustered)?;
        // A node that left may never hear that its removal committed: only the others
        // wait to apply it.
        let wait = id != node.id;
        self.membership_change(node, wait, || Request::Leave { id })
            .await?;
        if !wait {
            node.left.store(true, std::sync::atomic::Ordering::Release);
            // Remembered across restarts: a restarted member that left must not wait
            // for a group that no longer replicates to it (see `caught_up`).
            if let Err(e) = std::fs::write(self.inner.config.dir.join(LEFT), b"left\n") {
                warn!(error = %e, "could not record that this member left");
            }
        }
        Ok(())
    }

    /// Whether this node has left its cluster ([`remove_member`](Self::remove_member)
    /// of itself): it then refuses writes, linearizable reads and new watches with
    /// [`ClusterError::Left`], and keeps its data for local reads.
    pub fn has_left(&self) -> bool {
        self.inner
            .node
            .as_ref()
            .is_some_and(|n| n.check_member().is_err())
    }

    async fn membership_change(
        &self,
        node: &Node,
        wait: bool,
        req: impl Fn() -> Request,
    ) -> Result<(), ClusterError> {
        match node.to_leader(req).await? {
            (Reply::Membership(Ok(_)), _) if !wait => Ok(()),
            (Reply::Membership(Ok(index)), _) => self
                .applied(index)
                .await
                .map_err(|_| ClusterError::NoLeader(node.forward_timeout)),
            (Reply::Membership(Err(e)), _) => {
                Err(crate::routing::membership_error(e, node.forward_timeout))
            }
            _ => Err(ClusterError::UnexpectedReply),
        }
    }

    /// The revision of the applied state.
    pub fn revision(&self) -> Revision {
        Revision(
            self.inner
                .sm
                .revision_now
                .load(std::sync::atomic::Ordering::Acquire),
        )
    }

    /// A hash of the whole applied key space; equal on replicas at the same revision.
    pub fn state_hash(&self) -> Result<u64, StoreError> {
        self.inner.sm.state_hash()
    }

    /// A hash of every key with its value, revisions and lease (the state without the
    /// client sessions [`state_hash`](Self::state_hash) covers too): equal on a store
    /// restored from a backup and on the store at the backup's revision.
    pub fn data_hash(&self) -> Result<u64, StoreError> {
        self.inner.sm.data_hash()
    }

    /// How many snapshots this member has installed from a leader since it opened
    /// (each resynced its watchers).
    pub fn snapshots_installed(&self) -> u64 {
        self.inner
            .sm
            .installed
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many log entries were past the state machine's durable applied state when
    /// this member opened: after a crash, those committed are re-applied (the count
    /// includes entries not committed yet).
    pub fn behind_at_open(&self) -> u64 {
        self.inner
            .sm
            .behind_at_open
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether this member follows a live leader (always, for a single node); see
    /// `Node::hears_leader`.
    pub(crate) fn hears_leader(&self) -> bool {
        self.inner.node.as_ref().is_none_or(|n| n.hears_leader())
    }

    /// How many watch registrations the store feeds.
    pub fn active_watches(&self) -> usize {
        self.inner.sm.lock().hub.active()
    }

    /// The log index this member's latest snapshot covers (`None`: no snapshot yet).
    pub fn snapshot_index(&self) -> Option<u64> {
        self.inner.raft.metrics().borrow().snapshot.map(|l| l.index)
    }

    /// Builds a snapshot of everything applied so far and compacts the log behind it;
    /// returns once the snapshot is built (the log's purge follows in the background).
    ///
    /// # Cancel safety
    /// Dropped before it returns, a build may be under way; nothing more is promised.
    pub async fn snapshot(&self) -> Result<(), StoreError> {
        let raft = &self.inner.raft;
        // The state machine's own index covers every write answered before this call;
        // the metrics may not show the last of them yet, but do show a replay at open.
        let sm = self
            .inner
            .sm
            .applied_index
            .load(std::sync::atomic::Ordering::Relaxed);
        let metrics = raft.metrics().borrow().last_applied.map(|l| l.index);
        let applied = metrics.max((sm > 0).then_some(sm));
        tasks::snapshot_covering(raft, applied).await?;
        tasks::purge_behind_snapshot(raft, self.inner.config.keep_logs).await
    }

    /// Stops the node; persisted state is kept for the next [`open`](Self::open).
    ///
    /// Returns once raft's tasks have let go of the data files (bounded by 10 s), so the
    /// directory can be opened again as soon as this handle and its clones are dropped.
    /// Open watches then end with `WatchError::Stopped`.
    pub async fn shutdown(&self) {
        if let Some(local) = self.inner.local.get() {
            local.close().await;
        }
        self.inner.stop.cancel();
        let ttl = self
            .inner
            .ttl
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(ttl) = ttl {
            let _ = ttl.await;
        }
        if let Err(e) = self.inner.raft.shutdown().await {
            warn!(error = %e, "raft shutdown");
        }
        // Watches end now, not when the last handle to the store is dropped.
        {
            let mut inner = self.inner.sm.lock();
            inner.hub.stop_all();
            inner.records.stop_all();
        }
        // The listener is closed once the server has ended, so the address can be
        // bound again.
        let server = self
            .inner
            .node
            .as_ref()
            .and_then(|n| n.server.lock().unwrap_or_else(|e| e.into_inner()).take());
        if let Some(server) = server
            && tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .is_err()
        {
            warn!("the cluster server did not stop within 10 s");
        }
        // Everything applied is stored before the files close.
        self.inner.sm.close();
        // openraft's storage workers end shortly after its core; wait for them.
        // The state machine is ours, and a member's service's.
        let ours = 1 + usize::from(self.inner.node.is_some());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&self.inner.sm) > ours || Arc::strong_count(&self.inner.sm.db) > 1 {
            if tokio::time::Instant::now() > deadline {
                warn!("data files still referenced after shutdown (watches held?)");
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits (up to the forward timeout) until a member that restarted after a crash
    /// holds at least what it held before: applies of its last second before the crash
    /// may be missing from its files until it replays its log, and it knows how far to
    /// replay only once a leader answers a read index. Until then, local reads and new
    /// watches are refused with [`ClusterError::CatchingUp`] (retryable) rather than
    /// served from an older state: a reader never sees a member's revision go back.
    /// After a clean stop nothing waits. A linearizable read waits on its read index
    /// instead, which covers this.
    pub(crate) async fn caught_up(&self) -> Result<(), StoreError> {
        let Some(node) = &self.inner.node else {
            return Ok(());
        };
        let mut rx = node.caught_up.subscribe();
        if *rx.borrow_and_update() {
            return Ok(());
        }
        tokio::select! {
            _ = self.inner.stop.cancelled() => Err(StoreError::Stopped),
            r = tokio::time::timeout(node.forward_timeout, rx.wait_for(|c| *c)) => match r {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(_)) => Err(StoreError::Stopped),
                Err(_) => Err(ClusterError::CatchingUp.into()),
            },
        }
    }

    pub(crate) async fn read_barrier(&self, opts: &ReadOptions) -> Result<(), StoreError> {
        if opts.consistency != Consistency::Linearizable {
            return self.caught_up().await;
        }
        let Some(node) = &self.inner.node else {
            return self
                .inner
                .raft
                .ensure_linearizable()
                .await
                .map(|_| ())
                .map_err(read_error);
        };
        node.check_member()?;
        if !node.leads() {
            return match node.to_leader(|| Request::ReadIndex).await? {
                (Reply::ReadIndex(Ok(index)), _) => self.applied(index).await,
                (Reply::ReadIndex(Err(e)), _) => Err(e.into()),
                _ => Err(StoreError::Backend(Box::new(ClusterError::UnexpectedReply))),
            };
        }
        // A leader cut off from its quorum cannot confirm it still leads.
        let confirmed = self.inner.raft.ensure_linearizable();
        match tokio::time::timeout(node.forward_timeout, confirmed).await {
            Err(_) => Err(StoreError::Timeout(node.forward_timeout)),
            Ok(r) => r.map(|_| ()).map_err(read_error),
        }
    }
}

/// The file in a member's data directory that says it left its group.
const LEFT: &str = "LEFT";

#[async_trait::async_trait]
impl Writer for RaftStore {
    fn limits(&self) -> Limits {
        Limits::new(self.inner.config.max_value_size)
    }

    async fn put(&self, key: &Key, value: Value, opts: PutOptions) -> Result<Revision, StoreError> {
        self.put_as(key, value, opts, None).await
    }

    async fn delete(&self, key: &Key, opts: DeleteOptions) -> Result<Deleted, StoreError> {
        self.delete_as(key, opts, None).await
    }

    async fn get(&self, key: &Key, opts: ReadOptions) -> Result<Option<KeyValue>, StoreError> {
        self.read_barrier(&opts).await?;
        match opts.revision {
            None => self.inner.sm.get_current(key).await,
            at => self.inner.sm.get(key, at),
        }
    }

    async fn list(&self, prefix: &Prefix, opts: ReadOptions) -> Result<Listing, StoreError> {
        self.read_barrier(&opts).await?;
        let sm = self.inner.sm.clone();
        let prefix = prefix.clone();
        let (revision, values) = crate::rt::blocking(move || sm.list(&prefix, opts.revision))
            .await
            .map_err(|e| StoreError::Backend(Box::new(e)))??;
        Ok(Listing { revision, values })
    }

    async fn compare_and_swap(
        &self,
        key: &Key,
        expect: Expect,
        value: Value,
        opts: PutOptions,
    ) -> Result<CasOutcome, StoreError> {
        self.compare_and_swap_as(key, expect, value, opts, None)
            .await
    }

    async fn txn(&self, txn: datasync::Txn) -> Result<datasync::TxnOutcome, StoreError> {
        self.txn_as(txn, None).await
    }
}

/// The writes, with the request id a remote client gave them (`None`: this store's own).
impl RaftStore {
    /// Proposes a client write exactly once: with `id`, or in a cluster (where a retry
    /// through another member or leader can repeat it) with an id of this store's; the
    /// state machine answers a repeat with the first outcome.
    async fn write(&self, cmd: Command, id: Option<RequestId>) -> Result<Outcome, StoreError> {
        let ticket;
        let id = match id {
            Some(id) => Some(id),
            None if self.inner.node.is_some() => {
                ticket = self.inner.requests.begin().await;
                Some(ticket.id)
            }
            None => None,
        };
        let cmd = match id {
            Some(id) => Command::Once {
                id,
                cmd: Box::new(cmd),
            },
            None => cmd,
        };
        match self.propose(cmd).await? {
            Outcome::Invalid(why) => Err(StoreError::Backend(why.into())),
            out => Ok(out),
        }
    }

    pub(crate) async fn put_as(
        &self,
        key: &Key,
        value: Value,
        opts: PutOptions,
        id: Option<RequestId>,
    ) -> Result<Revision, StoreError> {
        self.limits().check_put(&value, &opts)?;
        let cmd = Command::Put {
            key: key.as_str().to_owned(),
            value: value.as_bytes().to_vec(),
            expires_at_ms: expiry(opts.ttl),
        };
        match self.write(cmd, id).await? {
            Outcome::Written { revision } => Ok(Revision(revision)),
            other => Err(StoreError::Corrupted(format!("put applied as {other:?}"))),
        }
    }

    pub(crate) async fn delete_as(
        &self,
        key: &Key,
        opts: DeleteOptions,
        id: Option<RequestId>,
    ) -> Result<Deleted, StoreError> {
        let cmd = Command::Delete {
            key: key.as_str().to_owned(),
            prefix: opts.prefix,
        };
        match self.write(cmd, id).await? {
            Outcome::Deleted { count, revision } => Ok(Deleted {
                count,
                revision: Revision(revision),
            }),
            other => Err(StoreError::Corrupted(format!(
                "delete applied as {other:?}"
            ))),
        }
    }

    pub(crate) async fn compare_and_swap_as(
        &self,
        key: &Key,
        expect: Expect,
        value: Value,
        opts: PutOptions,
        id: Option<RequestId>,
    ) -> Result<CasOutcome, StoreError> {
        self.limits().check_put(&value, &opts)?;
        let cmd = Command::Cas {
            key: key.as_str().to_owned(),
            expect: expected_rev(expect),
            value: value.as_bytes().to_vec(),
            expires_at_ms: expiry(opts.ttl),
        };
        match self.write(cmd, id).await? {
            Outcome::Written { revision } => Ok(CasOutcome::Swapped(Revision(revision))),
            Outcome::Conflict { current } => {
                Ok(CasOutcome::Conflict(current.map(|(v, r)| KeyValue {
                    key: key.clone(),
                    value: Value::from(v),
                    revision: Revision(r),
                })))
            }
            other => Err(StoreError::Corrupted(format!(
                "compare-and-swap applied as {other:?}"
            ))),
        }
    }
}

#[async_trait::async_trait]
impl Watcher for RaftStore {
    #[instrument(level = "debug", skip_all, fields(name))]
    async fn watch(
        &self,
        name: &str,
        prefixes: &[Prefix],
        opts: WatchOptions,
    ) -> Result<Watch, StoreError> {
        if self.inner.stop.is_cancelled() {
            return Err(StoreError::Stopped);
        }
        if let Some(node) = &self.inner.node {
            node.check_member()?;
        }
        self.caught_up().await?;
        // A member behind the revision to resume from may only lag the leader (the
        // consumer read it elsewhere): it catches up before it answers `StoreReset`.
        if opts.resume.is_some_and(|r| r > self.revision()) {
            self.read_barrier(&ReadOptions::default()).await?;
        }
        let reg = Producer::new(name, prefixes);
        let set = PrefixSet::new(prefixes.iter().cloned());
        let sm = self.inner.sm.clone();
        let (feed, start) = {
            let reg = reg.clone();
            crate::rt::blocking(move || {
                let (feed, sub) =
                    sm.subscribe(&reg, set.clone(), opts.queue_capacity, opts.resume)?;
                let start = match sub {
                    sm::Subscribed::Replay(txns) => Start::Replay(txns),
                    sm::Subscribed::Read(tx, rev, reason) => {
                        Start::Resync(Revision(rev), reason, sm::Shared::read_prefixes(&tx, &set)?)
                    }
                };
                Ok::<_, StoreError>((feed, start))
            })
            .await
            .map_err(|e| StoreError::Backend(Box::new(e)))??
        };
        let stream = FeedStream::starting(
            sm::RaftSnapshots(Arc::downgrade(&self.inner.sm)),
            reg.clone(),
            self.inner.source.clone(),
            feed,
            start,
        );
        Ok(Watch::new(reg.registration(), stream))
    }
}

/// Committed group configurations of one member: the current one first, then each
/// change as it is applied. Ends when the store stops.
#[derive(Debug)]
pub struct MembershipWatch {
    rx: tokio::sync::watch::Receiver<crate::types::StoredMembership>,
    first: bool,
}

impl MembershipWatch {
    /// The next configuration; `None` once the store has stopped.
    ///
    /// # Cancel safety
    /// Cancel safe: a change not yet returned is returned by the next call.
    pub async fn next(&mut self) -> Option<Members> {
        if self.first {
            self.first = false;
        } else {
            self.rx.changed().await.ok()?;
        }
        Some(Members::from_stored(&self.rx.borrow_and_update()))
    }
}
