//! Proposing commands on this node's raft: group commit above openraft.
//!
//! openraft 0.9 waits for each log append to be flushed before it starts the next, so
//! one client write per entry means one fsync per write. The proposer task drains every
//! queued proposal into one `Command::Batch` entry while the previous entries commit;
//! under concurrency many writes share one entry and one fsync.
//!
//! How many batches are in flight is the caller's choice ([`Proposals::start`]): on one
//! node one, since an apply is short (redb's writes are on the state machine's writer
//! thread) and openraft answers a batch only once the next batch's log write is done;
//! a single batch in flight collects every caller the last one answered. A cluster
//! keeps two, so one batch replicates while the next is written.
//!
//! A batch that opens within [`GATHER_RECENT`] of batches answering several writers
//! waits for as many proposals to be queued (at most half the commit time of the batch
//! that answered last, and [`GATHER_MAX`]). Why: a batch's cost is mostly per batch (a
//! log write and its sync on every member, a replication round, a redb commit per
//! member), and writers whose answer travels further come back later: a remote
//! client's writes cross loopback TCP twice, so without the wait its batches held 21
//! puts against 29 in process (3 members, 64 in flight). Answers that arrive during the
//! wait raise the count, so with a cluster's two batches in flight a closed loop of
//! writers can gather into one batch at a time: measured faster here (`raft_cluster_vs_etcd`),
//! since the per-batch cost dominates. The wait is a yield loop: tokio's timer has 1 ms
//! ticks, much longer than the wait.
//!
//! What it costs: writers that come back at different speeds make the quick ones wait
//! for the slow ones, up to the window on every batch. A wait that runs out (writers
//! that do not come back at once) turns it off for the next [`GATHER_SKIP`] batches, so
//! a workload that is not a closed loop pays it about once in that many. Under the
//! simulator (`rt::inline`) it is off: it waits on the wall clock, which a simulation
//! cannot replay.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use datasync::StoreError;
use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use openraft::Raft;
use openraft::error::{ClientWriteError, RaftError};
use openraft::raft::ClientWriteResponse;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::types::{Command, NodeId, Outcome, TypeConfig, leader_of};

/// A proposal did not commit here.
#[derive(Debug)]
pub(crate) enum ProposeError {
    /// This node does not lead: the leader's id and address, if known. Nothing was
    /// proposed.
    NotLeader(Option<(NodeId, String)>),
    /// Any other failure.
    Store(StoreError),
}

/// What a committed proposal returns: its outcome and the log index it committed at.
pub(crate) type Committed = Result<(Outcome, u64), ProposeError>;

/// A command waiting to be proposed, and where its outcome goes.
struct Proposal {
    cmd: Command,
    reply: oneshot::Sender<Committed>,
}

/// The way to the proposer, and what is in flight. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Proposals {
    queue: mpsc::Sender<Proposal>,
    raft: Raft<TypeConfig>,
    /// Writes in flight, batches and direct ones.
    inflight: Arc<AtomicUsize>,
    /// Whether the last batch held several writes: writes are concurrent, so they go
    /// through the proposer rather than directly.
    busy: Arc<AtomicBool>,
    /// Client writes waiting for their outcome here.
    pending: Arc<AtomicUsize>,
    metrics: Metrics,
}

impl std::fmt::Debug for Proposals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proposals")
            .field("inflight", &self.inflight.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// raft did not accept a proposal.
#[derive(Debug, thiserror::Error)]
#[error("raft rejected the proposal: {0}")]
pub(crate) struct Rejected(pub(crate) String);

pub(crate) fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Unavailable(Box::new(e))
}

/// How a failed `client_write` is reported (by reference: one batch answers many).
fn write_error(
    e: &RaftError<NodeId, ClientWriteError<NodeId, openraft::BasicNode>>,
) -> ProposeError {
    match e {
        RaftError::Fatal(_) => ProposeError::Store(StoreError::Stopped),
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            ProposeError::NotLeader(leader_of(f))
        }
        RaftError::APIError(_) => ProposeError::Store(unavailable(Rejected(e.to_string()))),
    }
}

impl Proposals {
    /// Starts the proposer task.
    pub(crate) fn start(
        raft: Raft<TypeConfig>,
        in_flight: usize,
        stop: CancellationToken,
        metrics: &Metrics,
    ) -> Self {
        let (queue, rx) = mpsc::channel(8192);
        let p = Proposals {
            queue,
            raft: raft.clone(),
            inflight: Arc::new(AtomicUsize::new(0)),
            busy: Arc::new(AtomicBool::new(false)),
            pending: Arc::new(AtomicUsize::new(0)),
            metrics: metrics.clone(),
        };
        tokio::spawn(proposer(
            raft,
            rx,
            in_flight.max(1),
            p.inflight.clone(),
            p.busy.clone(),
            stop,
            metrics.clone(),
        ));
        p
    }

    /// Client writes waiting for their outcome here.
    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Proposes `cmd`: directly when nothing is in flight or queued, else through the
    /// proposer task, which batches.
    ///
    /// Why the direct path: on this VM a thread that parked during the ~200 µs log write
    /// takes 30–50 µs to wake, and a lone writer would pay that twice, handing its
    /// proposal to the proposer task and getting the answer back. Under concurrency
    /// writes queue and batch: something is in flight, or the last batch held several
    /// writes (when it has just answered them, nothing is in flight yet).
    ///
    /// # Cancel safety
    /// Dropping the future does not withdraw a proposal already queued, or one already
    /// handed to raft on the direct path (its time is recorded up to the drop).
    pub(crate) async fn propose(&self, cmd: Command) -> Committed {
        cmd.check().map_err(ProposeError::Store)?;
        self.propose_unchecked(cmd).await
    }

    /// [`Proposals::propose`] without [`Command::check`]: for a command its caller has
    /// checked, or a test that needs an invalid entry in the log.
    pub(crate) async fn propose_unchecked(&self, cmd: Command) -> Committed {
        self.pending.fetch_add(1, Ordering::Relaxed);
        let _pending = InFlight(&self.pending);
        let out = self.propose_inner(cmd).await;
        match &out {
            Ok(_) => {
                self.metrics.committed.inc();
            }
            Err(ProposeError::Store(_)) => {
                self.metrics.failed.inc();
            }
            // Nothing was proposed.
            Err(ProposeError::NotLeader(_)) => {}
        }
        out
    }

    /// Proposes a command of the store's own (the versions marker) straight to raft,
    /// outside the batching and the client-write metrics.
    pub(crate) async fn propose_internal(&self, cmd: Command) -> Committed {
        cmd.check().map_err(ProposeError::Store)?;
        committed(write(&self.raft, cmd, None).await)
    }

    async fn propose_inner(&self, cmd: Command) -> Committed {
        if !self.busy.load(Ordering::Relaxed)
            && self.queue.capacity() == self.queue.max_capacity()
            && self
                .inflight
                .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let _done = InFlight(&self.inflight);
            self.metrics.batch_size.observe(1.0);
            return committed(write(&self.raft, cmd, Some(&self.metrics.proposal)).await);
        }
        let (reply, rx) = oneshot::channel();
        self.queue
            .send(Proposal { cmd, reply })
            .await
            .map_err(|_| ProposeError::Store(StoreError::Stopped))?;
        rx.await
            .map_err(|_| ProposeError::Store(StoreError::Stopped))?
    }
}

/// Why a `client_write` gave no outcome.
enum Unanswered {
    Raft(Box<RaftError<NodeId, ClientWriteError<NodeId, openraft::BasicNode>>>),
    Timeout,
}

impl Unanswered {
    /// The error each caller gets (by reference: one batch answers many).
    fn error(&self) -> ProposeError {
        match self {
            Unanswered::Raft(e) => write_error(e),
            Unanswered::Timeout => ProposeError::Store(StoreError::Timeout(WRITE_WITHIN)),
        }
    }
}

/// A lone write's outcome.
fn committed(written: Result<ClientWriteResponse<TypeConfig>, Unanswered>) -> Committed {
    written
        .map(|r| (r.data, r.log_id.index))
        .map_err(|e| e.error())
}

/// Records a proposal's time when dropped, so a write its caller gave up on counts too.
struct Timer<'a>(Option<&'a Histogram>, std::time::Instant);

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        if let Some(h) = self.0 {
            h.observe(crate::metrics::since(self.1));
        }
    }
}

/// `client_write` within [`WRITE_WITHIN`]; its time goes to `proposal`, if given.
///
/// # Cancel safety
/// Dropping the future does not withdraw a write raft already took; its time is
/// recorded up to the drop.
async fn write(
    raft: &Raft<TypeConfig>,
    cmd: Command,
    proposal: Option<&Histogram>,
) -> Result<ClientWriteResponse<TypeConfig>, Unanswered> {
    let _timer = Timer(proposal, std::time::Instant::now());
    match tokio::time::timeout(WRITE_WITHIN, raft.client_write(cmd)).await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => Err(Unanswered::Raft(Box::new(e))),
        Err(_) => Err(Unanswered::Timeout),
    }
}

/// Counts a write in flight until dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Batches in flight on one node, and in a cluster. Measured with 64 writers on one
/// node: 1 gives ~150k puts/s, 2 ~140k, 3 ~90k (the writes a batch holds hear back
/// only after the next batch's log write, so with more in flight they miss more
/// batches and each is smaller).
pub(crate) const IN_FLIGHT_SINGLE: usize = 1;
pub(crate) const IN_FLIGHT_CLUSTER: usize = 2;

/// A batch closes at this many proposals or bytes of keys and values, so one log entry
/// stays well within a network frame.
const BATCH_MAX: usize = 1024;

/// The longest a batch waits for the writers the last batches answered (see the
/// module's docs). Measured with 64 writers (`remote_overhead`): 50 µs was too short for
/// a remote client on one node, 200–500 µs gained as much as 1 ms in a cluster.
const GATHER_MAX: Duration = Duration::from_micros(500);
/// A batch waits only for writers answered this recently.
const GATHER_RECENT: Duration = Duration::from_millis(1);
/// No wait below this window (a batch that failed fast).
const GATHER_MIN: Duration = Duration::from_micros(10);
/// Batches that close without waiting after a wait ran out.
const GATHER_SKIP: u32 = 8;

/// How long a proposal waits for raft's answer before it reports an unknown outcome.
///
/// Why a bound: openraft 0.9 can leave a write unanswered when its leader loses the
/// term around it (the simulation found a leader whose first proposal never came back,
/// seed 1796819930667185384); the slot that write held then blocked every later
/// proposal on that member, and no lease expired while it led. A write that timed out
/// may still commit (callers retry with the same request id).
const WRITE_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);
const BATCH_BYTES: usize = 4 << 20;

fn size(cmd: &Command) -> usize {
    match cmd {
        Command::Put { key, value, .. } | Command::Cas { key, value, .. } => {
            key.len() + value.len()
        }
        Command::Delete { key, .. } => key.len(),
        Command::Batch(b) => b.iter().map(size).sum(),
        Command::Once { cmd, .. } => size(cmd),
        Command::Expire { keys } => keys.iter().map(|(k, _)| k.len() + 8).sum(),
        Command::LeaseGrant { .. }
        | Command::LeaseKeepAlive { .. }
        | Command::LeaseRevoke { .. } => 16,
        Command::LeaseExpire { ids } => ids.len() * 16,
        Command::CountVersions | Command::Compact { .. } => 0,
        Command::Txn(t) => {
            let range = |r: &crate::records::KeyRange| {
                r.start.len()
                    + match &r.end {
                        crate::records::RangeEnd::Before(e) => e.len(),
                        _ => 0,
                    }
            };
            let compares: usize = t
                .compares
                .iter()
                .map(|c| match &c.target {
                    crate::records::CompareTarget::Value(v) => range(&c.range) + v.len(),
                    _ => range(&c.range) + 16,
                })
                .sum();
            let ops: usize = t
                .ops()
                .map(|op| match op {
                    crate::records::TxnOp::Put { key, value, .. } => key.len() + value.len(),
                    crate::records::TxnOp::Delete { range: r, .. } => range(r),
                })
                .sum();
            compares + ops
        }
    }
}

async fn proposer(
    raft: Raft<TypeConfig>,
    mut queue: mpsc::Receiver<Proposal>,
    in_flight: usize,
    inflight_count: Arc<AtomicUsize>,
    busy: Arc<AtomicBool>,
    stop: CancellationToken,
    metrics: Metrics,
) {
    let mut inflight = FuturesUnordered::new();
    let mut carry: Option<Proposal> = None;
    let gathers = !crate::rt::inline();
    let mut answered = Answered::default();
    // Batches left to close without waiting.
    let mut skip = 0u32;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => tokio::select! {
                _ = stop.cancelled() => return,
                Some(done) = inflight.next(), if !inflight.is_empty() => {
                    answered.record(done);
                    continue;
                }
                p = queue.recv(), if inflight.len() < in_flight => match p {
                    Some(p) => p,
                    None => break,
                },
            },
        };
        // The callers a batch answered are woken together: let them queue their next
        // writes before this batch closes, or it closes on the first of them.
        tokio::task::yield_now().await;
        let window = (answered.last_commit / 2).min(GATHER_MAX);
        // Writers answered longer ago than [`GATHER_RECENT`] are taken as not coming
        // back at once (a stale count would make an occasional writer wait); and a
        // batch that failed fast leaves no window worth a wait.
        let recent = answered.at.elapsed() < GATHER_RECENT && window >= GATHER_MIN;
        if gathers && answered.writers > 1 && recent && skip == 0 {
            let t = std::time::Instant::now();
            while queue.len() + 1 < answered.writers.min(BATCH_MAX) {
                if t.elapsed() >= window {
                    skip = GATHER_SKIP;
                    break;
                }
                // Batches still in flight go on answering meanwhile.
                if let Some(Some(done)) = inflight.next().now_or_never() {
                    answered.record(done);
                }
                tokio::task::yield_now().await;
            }
        } else {
            skip = skip.saturating_sub(1);
        }
        answered.writers = 0;
        let mut bytes = size(&first.cmd);
        let mut batch = vec![first];
        while batch.len() < BATCH_MAX && bytes < BATCH_BYTES {
            match queue.try_recv() {
                Ok(p) => {
                    bytes += size(&p.cmd);
                    if bytes > BATCH_BYTES {
                        carry = Some(p);
                        break;
                    }
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        inflight_count.fetch_add(1, Ordering::AcqRel);
        busy.store(batch.len() > 1, Ordering::Relaxed);
        let count = inflight_count.clone();
        let raft = raft.clone();
        let (sizes, proposal) = (metrics.batch_size.clone(), metrics.proposal.clone());
        let (n, t) = (batch.len(), std::time::Instant::now());
        inflight.push(async move {
            let _done = InFlight(&count);
            // Counted where it is proposed (and timed), not before: the proposer can stop
            // first.
            sizes.observe(n as f64);
            commit(raft, batch, &proposal).await;
            (n, t.elapsed())
        });
        if carry.is_some() && inflight.len() >= in_flight {
            tokio::select! {
                _ = stop.cancelled() => return,
                done = inflight.next() => if let Some(done) = done {
                    answered.record(done);
                },
            }
        }
    }
    while inflight.next().await.is_some() {}
}

/// What the batches answered since the last batch closed.
struct Answered {
    /// Writers answered.
    writers: usize,
    /// When the last batch answered, and how long it took to commit.
    at: std::time::Instant,
    last_commit: Duration,
}

impl Default for Answered {
    fn default() -> Self {
        Answered {
            writers: 0,
            at: std::time::Instant::now(),
            last_commit: Duration::ZERO,
        }
    }
}

impl Answered {
    /// A batch of `n` writers answered after `took`.
    fn record(&mut self, (n, took): (usize, Duration)) {
        self.writers += n;
        (self.at, self.last_commit) = (std::time::Instant::now(), took);
    }
}

/// Proposes one batch and answers its callers.
async fn commit(raft: Raft<TypeConfig>, batch: Vec<Proposal>, proposal: &Histogram) {
    let (mut cmds, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
    let cmd = if cmds.len() == 1 {
        cmds.remove(0)
    } else {
        Command::Batch(cmds)
    };
    match write(&raft, cmd, Some(proposal)).await {
        Ok(resp) => {
            let index = resp.log_id.index;
            match resp.data {
                Outcome::Batch(outs) if outs.len() == replies.len() && replies.len() > 1 => {
                    for (reply, out) in replies.into_iter().zip(outs) {
                        let _ = reply.send(Ok((out, index)));
                    }
                }
                out if replies.len() == 1 => {
                    for reply in replies {
                        let _ = reply.send(Ok((out.clone(), index)));
                    }
                }
                other => {
                    for reply in replies {
                        let _ = reply.send(Err(ProposeError::Store(StoreError::Corrupted(
                            format!("batch applied as {other:?}"),
                        ))));
                    }
                }
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.error()));
            }
        }
    }
}
