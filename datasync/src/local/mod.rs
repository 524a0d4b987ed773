//! `local`: the in-memory transport, the reference implementation of the contract.
//!
//! Everything happens under one mutex: a write commits, gets the next revision and is
//! offered to every registration's bounded queue before the lock is released; a watch
//! takes its snapshot and joins the fan-out under the same lock. That single ordering
//! point is what makes the resync/changes hand-off gap-free (rule 2). A registration
//! whose queue is full stops being fed; its next poll discards what was queued and
//! delivers a fresh resync (rule 7) — the writer never waits for a consumer.
//!
//! Reads at a past revision keep per-key versions for the last
//! [`LocalConfig::history`] revisions (older ones are compacted, then reads fail with
//! [`StoreError::Compacted`]).
//!
//! Operations never wait for I/O, so each one spends tokio's cooperative budget
//! (`consume_budget`): a task that writes in a tight loop still yields now and then, and
//! the consumers it wakes get to run instead of starving in its worker's queue.
//!
//! TTLs run on tokio time, so tests can pause and advance the clock. Expired keys are
//! removed by a background task and, lazily, before any operation, so no read ever sees a
//! key past its deadline.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use datasync::{local::Local, Event, Key, Prefix, PutOptions, Watcher, WatchOptions, Writer};
//! use futures_util::StreamExt;
//!
//! let store = Local::new();
//! store.put(&Key::new("cfg/a")?, "1".into(), PutOptions::new()).await?;
//! let mut watch = store.watch("demo", &[Prefix::new("cfg/")?], WatchOptions::default()).await?;
//! let Some(Ok(Event::Resync(resync))) = watch.next().await else { panic!() };
//! assert_eq!(resync.len(), 1);
//! resync.done.ok();
//! # Ok(()) }
//! ```

mod state;

use crate::transport::Producer;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::instrument;

use self::state::{Mutation, State};
use crate::transport::feed::{Feed, FeedStream, Snapshots, Start};
use crate::{
    CasOutcome, DeleteOptions, Deleted, Expect, Key, KeyValue, Limits, Listing, Prefix, PrefixSet,
    PutOptions, ReadOptions, ResyncReason, Revision, Source, StoreError, Txn, TxnOp, TxnOutcome,
    Value, Watch, WatchOptions, Watcher, Writer,
};

/// Configuration of a [`Local`] store.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LocalConfig {
    /// Largest value accepted, in bytes (default 1 MiB).
    pub max_value_size: usize,
    /// Revisions of history kept for reads at a past revision (default 10,000).
    pub history: u64,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            max_value_size: 1 << 20,
            history: 10_000,
        }
    }
}

impl LocalConfig {
    /// Sets [`max_value_size`](Self::max_value_size).
    #[must_use]
    pub fn max_value_size(mut self, n: usize) -> Self {
        self.max_value_size = n;
        self
    }

    /// Sets [`history`](Self::history) (at least 1).
    #[must_use]
    pub fn history(mut self, n: u64) -> Self {
        self.history = n.max(1);
        self
    }
}

/// The in-memory store. Cheap to clone; clones share the store.
///
/// Must be created inside a tokio runtime (it spawns the TTL task).
#[derive(Debug, Clone)]
pub struct Local {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    config: LocalConfig,
    source: Source,
    /// Wakes the TTL task when an earlier deadline appears.
    ttl_changed: Arc<Notify>,
    stop: CancellationToken,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under the lock cannot leave the state half-written: every mutation
        // completes before anything that may panic. Keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks and removes every key whose TTL ran out.
    fn lock_fresh(&self) -> MutexGuard<'_, State> {
        let mut st = self.lock();
        if st.next_deadline().is_some() {
            expire(&mut st, Instant::now(), self.config.history);
        }
        st
    }
}

/// Resync snapshots of the local store.
#[derive(Debug)]
struct LocalSnapshots(Arc<Shared>);

impl Snapshots for LocalSnapshots {
    fn resnapshot(
        &self,
        feed: &mut Feed,
    ) -> Result<(Revision, Vec<crate::PrefixValues>), StoreError> {
        // Expired keys go first: a resync never holds a key past its TTL.
        let mut st = self.0.lock_fresh();
        feed.rearm(&mut st.hub);
        Ok((st.revision, st.snapshot(feed.prefixes())))
    }

    fn extend(
        &self,
        feed: &mut Feed,
    ) -> Result<Option<(Revision, Vec<crate::PrefixValues>)>, StoreError> {
        let mut st = self.0.lock_fresh();
        let Some(added) = feed.extend(&mut st.hub) else {
            return Ok(None);
        };
        Ok(Some((st.revision, st.snapshot(&added))))
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn expire(st: &mut State, now: Instant, history: u64) {
    if st.next_deadline().is_some_and(|d| d <= now) {
        let due = st.due(now);
        st.commit(due.into_iter().map(Mutation::Delete).collect(), history);
    }
}

impl Default for Local {
    fn default() -> Self {
        Self::new()
    }
}

impl Local {
    /// An empty store with the default configuration.
    pub fn new() -> Self {
        Self::with_config(LocalConfig::default())
    }

    /// An empty store.
    pub fn with_config(config: LocalConfig) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            config,
            source: Source::from(""),
            ttl_changed: Arc::new(Notify::new()),
            stop: CancellationToken::new(),
        });
        tokio::spawn(ttl_task(
            Arc::downgrade(&shared),
            shared.ttl_changed.clone(),
            shared.stop.clone(),
        ));
        Local { shared }
    }

    /// The current revision.
    pub fn revision(&self) -> Revision {
        self.shared.lock().revision
    }

    /// How many registrations the store is feeding (closed ones are released).
    pub fn active_watches(&self) -> usize {
        self.shared.lock().hub.active()
    }

    /// Commits a put under `st`, then releases the lock and, for a TTL, wakes the TTL
    /// task. The wake must follow the commit: woken earlier, the task could look, find
    /// no deadline and go back to sleep with the wake-up spent.
    fn commit_put(
        &self,
        mut st: MutexGuard<'_, State>,
        key: &Key,
        value: Value,
        opts: &PutOptions,
    ) -> Revision {
        let deadline = opts.ttl.map(|t| Instant::now() + t);
        let m = Mutation::Put {
            key: key.clone(),
            value,
            deadline,
        };
        let rev = st.commit(vec![m], self.shared.config.history);
        let rev = rev.map_or(st.revision, |(r, _)| r);
        drop(st);
        if deadline.is_some() {
            self.shared.ttl_changed.notify_one();
        }
        rev
    }
}

async fn ttl_task(shared: Weak<Shared>, changed: Arc<Notify>, stop: CancellationToken) {
    loop {
        let next = match shared.upgrade() {
            Some(s) => {
                let mut st = s.lock();
                expire(&mut st, Instant::now(), s.config.history);
                st.next_deadline()
            }
            None => return,
        };
        let sleep = async {
            match next {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = changed.notified() => {}
            _ = sleep => {}
        }
    }
}

#[async_trait::async_trait]
impl Writer for Local {
    fn limits(&self) -> Limits {
        Limits::new(self.shared.config.max_value_size)
    }

    async fn put(&self, key: &Key, value: Value, opts: PutOptions) -> Result<Revision, StoreError> {
        tokio::task::coop::consume_budget().await;
        self.limits().check_put(&value, &opts)?;
        let st = self.shared.lock_fresh();
        Ok(self.commit_put(st, key, value, &opts))
    }

    async fn delete(&self, key: &Key, opts: DeleteOptions) -> Result<Deleted, StoreError> {
        tokio::task::coop::consume_budget().await;
        let mut st = self.shared.lock_fresh();
        let keys = if opts.prefix {
            st.live_keys_under(&Prefix::from(key.clone()))
        } else {
            vec![key.clone()]
        };
        let mutations: Vec<_> = keys.into_iter().map(Mutation::Delete).collect();
        let before = st.revision;
        match st.commit(mutations, self.shared.config.history) {
            Some((revision, count)) => Ok(Deleted { count, revision }),
            None => Ok(Deleted {
                count: 0,
                revision: before,
            }),
        }
    }

    async fn get(&self, key: &Key, opts: ReadOptions) -> Result<Option<KeyValue>, StoreError> {
        tokio::task::coop::consume_budget().await;
        self.shared.lock_fresh().get(key.as_str(), opts.revision)
    }

    async fn list(&self, prefix: &Prefix, opts: ReadOptions) -> Result<Listing, StoreError> {
        tokio::task::coop::consume_budget().await;
        let (revision, values) = self.shared.lock_fresh().list(prefix, opts.revision)?;
        Ok(Listing { revision, values })
    }

    async fn compare_and_swap(
        &self,
        key: &Key,
        expect: Expect,
        value: Value,
        opts: PutOptions,
    ) -> Result<CasOutcome, StoreError> {
        tokio::task::coop::consume_budget().await;
        self.limits().check_put(&value, &opts)?;
        let st = self.shared.lock_fresh();
        let current = st.latest(key.as_str());
        if !expect.holds(current.as_ref()) {
            return Ok(CasOutcome::Conflict(current));
        }
        Ok(CasOutcome::Swapped(self.commit_put(st, key, value, &opts)))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        tokio::task::coop::consume_budget().await;
        txn.validate(&self.limits())?;
        let mut st = self.shared.lock_fresh();
        let succeeded = txn
            .when
            .iter()
            .all(|(key, expect)| expect.holds(st.latest(key.as_str()).as_ref()));
        let branch = if succeeded { txn.then } else { txn.otherwise };
        let now = Instant::now();
        let mut ttl = false;
        let mut mutations = Vec::with_capacity(branch.len());
        for op in branch {
            match op {
                TxnOp::Put { key, value, opts } => {
                    ttl |= opts.ttl.is_some();
                    let deadline = opts.ttl.map(|t| now + t);
                    mutations.push(Mutation::Put {
                        key,
                        value,
                        deadline,
                    });
                }
                TxnOp::Delete { key, opts } if opts.prefix => mutations.extend(
                    st.live_keys_under(&Prefix::from(key))
                        .into_iter()
                        .map(Mutation::Delete),
                ),
                TxnOp::Delete { key, .. } => mutations.push(Mutation::Delete(key)),
            }
        }
        let revision = match st.commit(mutations, self.shared.config.history) {
            Some((r, _)) => r,
            None => st.revision,
        };
        drop(st);
        if ttl {
            self.shared.ttl_changed.notify_one();
        }
        Ok(TxnOutcome {
            succeeded,
            revision,
        })
    }
}

#[async_trait::async_trait]
impl Watcher for Local {
    #[instrument(level = "debug", skip_all, fields(name))]
    async fn watch(
        &self,
        name: &str,
        prefixes: &[Prefix],
        opts: WatchOptions,
    ) -> Result<Watch, StoreError> {
        let reg = Producer::new(name, prefixes);
        let prefixes = PrefixSet::new(prefixes.iter().cloned());
        let (feed, start) = {
            let mut st = self.shared.lock_fresh();
            let replay = match opts.resume {
                Some(r) => st.since(r).map_err(Some),
                None => Err(None),
            };
            let start = match replay {
                Ok(txns) => Start::Replay(txns),
                Err(reason) => Start::Resync(
                    st.revision,
                    reason.unwrap_or(ResyncReason::Initial),
                    st.snapshot(&prefixes),
                ),
            };
            let feed = st.hub.subscribe(&reg, prefixes, opts.queue_capacity);
            (feed, start)
        };
        let stream = FeedStream::starting(
            LocalSnapshots(self.shared.clone()),
            reg.clone(),
            self.shared.source.clone(),
            feed,
            start,
        );
        Ok(Watch::new(reg.registration(), stream))
    }
}

#[cfg(test)]
mod tests;
