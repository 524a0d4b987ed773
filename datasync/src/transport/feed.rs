//! Fan-out from a store's commit path to its watch registrations (for transports).
//!
//! A transport that applies transactions itself (`local`, the raft state machine) keeps a
//! [`Hub`] under the same lock that orders its commits and calls [`Hub::publish`] with
//! every committed [`Txn`]. Each registration gets a [`Feed`]: a bounded queue of shared
//! transactions. The hub never waits: a registration whose queue is full stops being fed
//! and is flagged; its stream sees [`Feed::pending_resync`], and, under the same commit
//! lock, calls [`Feed::rearm`] (which discards what is queued — the resync supersedes it)
//! and takes a snapshot. Because rearming and snapshotting happen under the lock that
//! also serializes publication, no transaction falls between the snapshot and the queue.
//!
//! Dispatch is by prefix: the hub indexes registrations by each prefix they watch, and
//! a change looks up the byte-prefixes of its key that have that length of some
//! indexed prefix, so a write costs the same beside ten thousand registrations it does
//! not concern as beside none (`cargo bench -p datasync --bench local`).
//!
//! Prefixes added to a live registration are read the same way, under the lock, at the
//! current revision C ([`Snapshots::extend`]); the queue is kept, and the stream delivers
//! what it holds up to C before that partial resync, so it comes in order.

use crate::transport::Producer;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::sync::mpsc;

use crate::{
    Change, Event, KeyChange, PrefixSet, PrefixValues, Resync, ResyncReason, Revision, Source,
    StoreError, WatchError,
};

/// One committed transaction: every change carries its revision. Changes sorted by key.
#[derive(Debug)]
pub struct Txn {
    /// The transaction's revision.
    pub revision: Revision,
    /// The changed keys, sorted.
    pub changes: Vec<KeyChange>,
}

const NONE: u8 = 0;
const OVERFLOW: u8 = 1;
const SNAPSHOT: u8 = 2;

#[derive(Debug)]
struct Sub {
    reg: Producer,
    prefixes: PrefixSet,
    tx: mpsc::Sender<Arc<Txn>>,
    flag: Arc<AtomicU8>,
}

impl Sub {
    fn is_gone(&self) -> bool {
        self.reg.is_closed() || self.tx.is_closed()
    }

    fn flag(&self, why: u8) {
        // Keep the first reason; any flag means "resync".
        let _ = self
            .flag
            .compare_exchange(NONE, why, Ordering::AcqRel, Ordering::Acquire);
        self.reg.wake();
    }
}

/// The registrations a store feeds. Keep it under the store's commit lock.
#[derive(Debug, Default)]
pub struct Hub {
    /// Registrations by id (ids only grow: this is subscription order).
    subs: BTreeMap<u64, Sub>,
    /// The ids of the registrations watching each prefix.
    by_prefix: BTreeMap<String, BTreeSet<u64>>,
    /// The lengths (in bytes) of the prefixes in `by_prefix`, with how many have each:
    /// the only byte-prefixes of a key worth looking up.
    lengths: BTreeMap<usize, usize>,
    /// After [`Hub::stop_all`], new feeds end at once.
    stopped: bool,
    next_id: u64,
    delivered: u64,
    overflows: u64,
}

/// What a [`Hub`] has done, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HubStats {
    /// Registrations fed.
    pub active: usize,
    /// Of those, registrations whose queue overflowed or whose state jumped, waiting
    /// for their resync.
    pub behind: usize,
    /// Transactions queued for their registrations and not yet taken.
    pub queued: usize,
    /// Transactions queued for a registration, since the hub was made (one per
    /// registration it concerns).
    pub delivered: u64,
    /// Queues that overflowed, since the hub was made (each costs a resync).
    pub overflows: u64,
}

impl Hub {
    /// Ends every feed: their streams report `Stopped` and end (the store stopped).
    pub fn stop_all(&mut self) {
        self.subs.clear();
        self.by_prefix.clear();
        self.lengths.clear();
        self.stopped = true;
    }

    fn index(&mut self, id: u64, prefixes: &PrefixSet) {
        for p in prefixes.prefixes() {
            let ids = self
                .by_prefix
                .entry(p.as_str().to_owned())
                .or_insert_with(|| {
                    *self.lengths.entry(p.as_str().len()).or_default() += 1;
                    BTreeSet::new()
                });
            ids.insert(id);
        }
    }

    fn unindex(&mut self, id: u64, prefixes: &PrefixSet) {
        for p in prefixes.prefixes() {
            let Some(ids) = self.by_prefix.get_mut(p.as_str()) else {
                continue;
            };
            ids.remove(&id);
            if ids.is_empty() {
                self.by_prefix.remove(p.as_str());
                let len = p.as_str().len();
                if let Some(n) = self.lengths.get_mut(&len) {
                    *n -= 1;
                    if *n == 0 {
                        self.lengths.remove(&len);
                    }
                }
            }
        }
    }

    fn remove(&mut self, id: u64) {
        if let Some(sub) = self.subs.remove(&id) {
            self.unindex(id, &sub.prefixes);
        }
    }

    /// Releases the registrations closed since the last call.
    fn prune(&mut self) {
        let gone: Vec<u64> = self
            .subs
            .iter()
            .filter(|(_, s)| s.is_gone())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.remove(id);
        }
    }

    /// Registers a feed of the transactions touching `prefixes`, with a queue of
    /// `capacity` transactions.
    pub fn subscribe(&mut self, reg: &Producer, prefixes: PrefixSet, capacity: usize) -> Feed {
        self.prune();
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let flag = Arc::new(AtomicU8::new(NONE));
        let id = self.next_id;
        self.next_id += 1;
        // Stopped: the sender goes at once, and the stream reports `Stopped`.
        if !self.stopped {
            self.index(id, &prefixes);
            self.subs.insert(
                id,
                Sub {
                    reg: reg.clone(),
                    prefixes: prefixes.clone(),
                    tx,
                    flag: flag.clone(),
                },
            );
        }
        Feed {
            id,
            rx,
            stash: None,
            flag,
            reg: reg.clone(),
            prefixes,
        }
    }

    fn set_prefixes(&mut self, id: u64, prefixes: &PrefixSet) {
        let Some(old) = self.subs.get(&id).map(|s| s.prefixes.clone()) else {
            return;
        };
        self.unindex(id, &old);
        self.index(id, prefixes);
        if let Some(sub) = self.subs.get_mut(&id) {
            sub.prefixes = prefixes.clone();
        }
    }

    /// Offers `txn` to every registration it concerns. Never waits.
    pub fn publish(&mut self, txn: Arc<Txn>) {
        // The prefixes hit, each once (a transaction may have many keys under one),
        // then their registrations, each once.
        let mut prefixes: Vec<&String> = Vec::new();
        for c in &txn.changes {
            let key = c.key.as_str();
            for &len in self.lengths.range(..=key.len()).map(|(l, _)| l) {
                // Not a character boundary: no prefix (valid UTF-8) ends there.
                if let Some((p, _)) = key.get(..len).and_then(|p| self.by_prefix.get_key_value(p)) {
                    prefixes.push(p);
                }
            }
        }
        prefixes.sort_unstable();
        prefixes.dedup();
        let mut hit: Vec<u64> = prefixes
            .iter()
            .filter_map(|p| self.by_prefix.get(*p))
            .flatten()
            .copied()
            .collect();
        hit.sort_unstable();
        hit.dedup();
        let mut gone = Vec::new();
        for id in hit {
            let Some(sub) = self.subs.get(&id) else {
                continue;
            };
            if sub.is_gone() {
                gone.push(id);
                continue;
            }
            if sub.flag.load(Ordering::Acquire) != NONE {
                continue;
            }
            match sub.tx.try_send(txn.clone()) {
                Ok(()) => self.delivered += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::debug!(registration = sub.reg.name(), "queue full: resync follows");
                    sub.flag(OVERFLOW);
                    self.overflows += 1;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => gone.push(id),
            }
        }
        for id in gone {
            self.remove(id);
        }
    }

    /// Makes every registration resync (the state jumped, e.g. a snapshot was installed).
    pub fn resync_all(&mut self) {
        self.prune();
        for s in self.subs.values() {
            s.flag(SNAPSHOT);
        }
    }

    /// How many registrations are fed (closed ones are released).
    pub fn active(&mut self) -> usize {
        self.prune();
        self.subs.len()
    }

    /// Counts for metrics (closed registrations are released first).
    pub fn stats(&mut self) -> HubStats {
        self.prune();
        HubStats {
            active: self.subs.len(),
            behind: self
                .subs
                .values()
                .filter(|s| s.flag.load(Ordering::Acquire) != NONE)
                .count(),
            queued: self
                .subs
                .values()
                .map(|s| s.tx.max_capacity() - s.tx.capacity())
                .sum(),
            delivered: self.delivered,
            overflows: self.overflows,
        }
    }
}

/// The consumer side of one registration's queue.
#[derive(Debug)]
pub struct Feed {
    id: u64,
    rx: mpsc::Receiver<Arc<Txn>>,
    /// A transaction taken from the queue after a partial resync's revision, delivered
    /// after it.
    stash: Option<Arc<Txn>>,
    flag: Arc<AtomicU8>,
    reg: Producer,
    prefixes: PrefixSet,
}

impl Feed {
    /// The registration's prefixes.
    pub fn prefixes(&self) -> &PrefixSet {
        &self.prefixes
    }

    /// Why this registration needs a resync, if it does: overflow, a state jump, or a
    /// request on the registration.
    pub fn pending_resync(&self) -> Option<ResyncReason> {
        match self.flag.load(Ordering::Acquire) {
            OVERFLOW => Some(ResyncReason::Overflow),
            SNAPSHOT => Some(ResyncReason::SnapshotInstalled),
            _ if self.reg.resync_pending() => Some(ResyncReason::Requested),
            _ => None,
        }
    }

    /// Call under the store's commit lock, right before taking the resync snapshot:
    /// discards the queue, clears the flags (a request included), takes the prefixes
    /// to read (see [`prefixes`](Self::prefixes)) and resumes feeding.
    pub fn rearm(&mut self, hub: &mut Hub) {
        while self.rx.try_recv().is_ok() {}
        self.stash = None;
        self.reg.take_resync_request();
        if let Some(set) = self.reg.take_set() {
            hub.set_prefixes(self.id, &set);
            self.prefixes = set;
        }
        self.flag.store(NONE, Ordering::Release);
    }

    /// Call under the store's commit lock: feeds the registration's current set from
    /// now on, and returns the prefixes added and owed a resync, to read at the current
    /// revision (`None` if none are: prefixes were only removed, and are no longer fed).
    pub fn extend(&mut self, hub: &mut Hub) -> Option<PrefixSet> {
        let (set, owed) = match self.reg.take_owed() {
            Some((set, owed)) => (set, Some(owed)),
            None => (self.reg.take_set()?, None),
        };
        hub.set_prefixes(self.id, &set);
        self.prefixes = set;
        owed
    }

    /// The next queued transaction at or below `revision`, without waiting.
    fn try_recv_upto(&mut self, revision: Revision) -> Option<Arc<Txn>> {
        let txn = self.stash.take().or_else(|| self.rx.try_recv().ok())?;
        if txn.revision <= revision {
            Some(txn)
        } else {
            self.stash = Some(txn);
            None
        }
    }

    /// Polls for the next transaction; registers the task to be woken on close, resync
    /// request, added prefixes or overflow as well.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Arc<Txn>>> {
        if let Some(txn) = self.stash.take() {
            return Poll::Ready(Some(txn));
        }
        match self.rx.poll_recv(cx) {
            Poll::Pending => {
                self.reg.register_waker(cx.waker());
                // Re-check what may have been signalled before the waker was in place.
                if self.reg.is_closed() || self.pending_resync().is_some() || self.reg.owes() {
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            }
            ready => ready,
        }
    }

    /// The change event of `txn` for this registration (its keys only), with its `Done`.
    pub fn change_event(&self, source: &Source, txn: &Txn) -> Event {
        let changes: Vec<_> = txn
            .changes
            .iter()
            .filter(|c| self.prefixes.matches(c.key.as_str()))
            .cloned()
            .collect();
        Event::Change(Change::new(
            source.clone(),
            txn.revision,
            changes,
            self.reg.done(txn.revision),
        ))
    }
}

/// How a store re-reads its state for a resync (for [`FeedStream`]).
pub trait Snapshots: Send + Sync + 'static {
    /// Under the lock that orders [`Hub::publish`]: call [`Feed::rearm`] and pin the
    /// state at the current revision; then return that state under the feed's prefixes.
    fn resnapshot(&self, feed: &mut Feed) -> Result<(Revision, Vec<PrefixValues>), StoreError>;

    /// Under the same lock: call [`Feed::extend`]; if it returns prefixes, pin the
    /// state at the current revision and return it under those prefixes.
    #[allow(clippy::type_complexity)]
    fn extend(&self, feed: &mut Feed) -> Result<Option<(Revision, Vec<PrefixValues>)>, StoreError>;
}

/// How a [`FeedStream`] begins (read under the lock its feed was subscribed under).
#[derive(Debug)]
pub enum Start {
    /// With this resync.
    Resync(Revision, ResyncReason, Vec<PrefixValues>),
    /// With these transactions, the ones after the revision the consumer resumed from
    /// ([`WatchOptions::resume`](crate::WatchOptions::resume)) up to the one the feed
    /// was subscribed at, oldest first, as the store's history holds them. Those that
    /// touch none of the prefixes are skipped.
    Replay(VecDeque<Arc<Txn>>),
}

#[derive(Debug)]
enum StreamState {
    /// A resync is ready to be delivered.
    Resync(Revision, ResyncReason, Vec<PrefixValues>),
    /// Transactions from the history to deliver before the feed's (see [`Start::Replay`]).
    Replay(VecDeque<Arc<Txn>>),
    /// A resync of added prefixes, read at this revision, is delivered once the queued
    /// transactions up to it are.
    Extended(Revision, Vec<PrefixValues>),
    /// Delivering changes; `Some` when a resync failed and must be tried again.
    Streaming(Option<ResyncReason>),
}

/// A registration's event stream over a [`Feed`]: its initial resync, then changes,
/// and a fresh resync whenever the feed overflowed, the state jumped or one was
/// requested.
#[derive(Debug)]
pub struct FeedStream<S> {
    snapshots: S,
    reg: Producer,
    source: Source,
    feed: Feed,
    state: StreamState,
}

impl<S: Snapshots> FeedStream<S> {
    /// Starts with the resync `initial` (taken when `feed` was subscribed).
    pub fn new(
        snapshots: S,
        reg: Producer,
        source: Source,
        feed: Feed,
        initial: (Revision, Vec<PrefixValues>),
    ) -> Self {
        let start = Start::Resync(initial.0, ResyncReason::Initial, initial.1);
        Self::starting(snapshots, reg, source, feed, start)
    }

    /// Starts as `start` says.
    pub fn starting(snapshots: S, reg: Producer, source: Source, feed: Feed, start: Start) -> Self {
        let state = match start {
            Start::Resync(revision, reason, values) => {
                StreamState::Resync(revision, reason, values)
            }
            Start::Replay(txns) => StreamState::Replay(txns),
        };
        FeedStream {
            snapshots,
            reg,
            source,
            feed,
            state,
        }
    }
}

impl<S> FeedStream<S> {
    /// The stream's end, if a failed read means the store stopped (it said so, or it
    /// no longer feeds this registration): retrying would only spin.
    fn stopped(&mut self, e: &StoreError) -> Option<Poll<Option<Result<Event, WatchError>>>> {
        if !matches!(e, StoreError::Stopped) && !self.feed.rx.is_closed() {
            return None;
        }
        self.reg.close();
        Some(Poll::Ready(Some(Err(WatchError::Stopped(
            StoreError::Stopped,
        )))))
    }
}

impl<S: Snapshots + Unpin> Stream for FeedStream<S> {
    type Item = Result<Event, WatchError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.reg.is_closed() {
                return Poll::Ready(None);
            }
            let retry = match std::mem::replace(&mut this.state, StreamState::Streaming(None)) {
                StreamState::Resync(revision, reason, values) => {
                    let done = this.reg.done(revision);
                    let ev = Resync::new(this.source.clone(), revision, reason, values, done);
                    return Poll::Ready(Some(Ok(Event::Resync(ev))));
                }
                // A full resync, when one is due, covers the added prefixes too.
                StreamState::Extended(revision, values) if this.feed.pending_resync().is_none() => {
                    if let Some(txn) = this.feed.try_recv_upto(revision) {
                        this.state = StreamState::Extended(revision, values);
                        return Poll::Ready(Some(Ok(this.feed.change_event(&this.source, &txn))));
                    }
                    let done = this.reg.done(revision);
                    let reason = ResyncReason::PrefixAdded;
                    let ev = Resync::new(this.source.clone(), revision, reason, values, done);
                    return Poll::Ready(Some(Ok(Event::Resync(ev))));
                }
                StreamState::Extended(..) => None,
                // A resync due supersedes what is left; prefixes added wait for the end.
                StreamState::Replay(mut txns) if this.feed.pending_resync().is_none() => {
                    let prefixes = &this.feed.prefixes;
                    let touches =
                        |t: &Txn| t.changes.iter().any(|c| prefixes.matches(c.key.as_str()));
                    while let Some(txn) = txns.pop_front() {
                        if touches(&txn) {
                            if !txns.is_empty() {
                                this.state = StreamState::Replay(txns);
                            }
                            return Poll::Ready(Some(Ok(this
                                .feed
                                .change_event(&this.source, &txn))));
                        }
                    }
                    None
                }
                StreamState::Replay(_) => None,
                StreamState::Streaming(retry) => retry,
            };
            if let Some(reason) = retry.or_else(|| this.feed.pending_resync()) {
                match this.snapshots.resnapshot(&mut this.feed) {
                    Ok((revision, values)) => {
                        this.state = StreamState::Resync(revision, reason, values);
                        continue;
                    }
                    Err(e) => {
                        if let Some(end) = this.stopped(&e) {
                            return end;
                        }
                        // Transient: say so, and try the resync again on the next poll.
                        this.state = StreamState::Streaming(Some(reason));
                        return Poll::Ready(Some(Err(WatchError::Interrupted(e))));
                    }
                }
            }
            if this.reg.rescoped() {
                match this.snapshots.extend(&mut this.feed) {
                    Ok(Some((revision, values))) => {
                        this.state = StreamState::Extended(revision, values);
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        if let Some(end) = this.stopped(&e) {
                            return end;
                        }
                        // The owed prefixes may have been taken: a full resync pays them.
                        this.state = StreamState::Streaming(Some(ResyncReason::PrefixAdded));
                        return Poll::Ready(Some(Err(WatchError::Interrupted(e))));
                    }
                }
            }
            return match this.feed.poll_recv(cx) {
                Poll::Ready(Some(txn)) => {
                    Poll::Ready(Some(Ok(this.feed.change_event(&this.source, &txn))))
                }
                Poll::Ready(None) => {
                    // The store dropped this registration: say so, then end.
                    this.reg.close();
                    Poll::Ready(Some(Err(WatchError::Stopped(StoreError::Stopped))))
                }
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{Key, Op, Prefix};

    fn txn(rev: u64, key: &str) -> Arc<Txn> {
        Arc::new(Txn {
            revision: Revision(rev),
            changes: vec![KeyChange {
                key: Key::new(key).unwrap(),
                op: Op::Put,
                value: Some("v".into()),
                prev: None,
            }],
        })
    }

    #[test]
    fn stats_count_what_was_queued_taken_and_overflowed() {
        let mut hub = Hub::default();
        let prefixes = [Prefix::new("a/").unwrap()];
        let reg = Producer::new("r", &prefixes);
        let mut feed = hub.subscribe(&reg, PrefixSet::new(prefixes.clone()), 2);
        hub.publish(txn(1, "a/1"));
        hub.publish(txn(2, "b/1"));
        let s = hub.stats();
        assert_eq!(
            (s.active, s.queued, s.delivered, s.overflows, s.behind),
            (1, 1, 1, 0, 0)
        );
        hub.publish(txn(3, "a/2"));
        hub.publish(txn(4, "a/3"));
        let s = hub.stats();
        assert_eq!((s.queued, s.delivered, s.overflows, s.behind), (2, 2, 1, 1));
        feed.rearm(&mut hub);
        let s = hub.stats();
        assert_eq!((s.queued, s.behind), (0, 0));
        drop(feed);
        reg.close();
        assert_eq!(hub.stats().active, 0);
    }

    /// Dispatch by prefix gives each registration every transaction with a key under
    /// one of its prefixes, once, and nothing else; nested, empty and non-ASCII prefixes
    /// included, and a closed registration leaves the index.
    #[test]
    fn each_registration_gets_exactly_the_keys_under_its_prefixes() {
        let mut hub = Hub::default();
        let sets: [&[&str]; 6] = [
            &[""],
            &["a/"],
            &["a/b/"],
            &["a/", "a/b/c"],
            &["é"],
            &["p/é", "x"],
        ];
        let mut feeds = Vec::new();
        for (i, set) in sets.iter().enumerate() {
            let prefixes: Vec<Prefix> = set.iter().map(|p| Prefix::new(*p).unwrap()).collect();
            let reg = Producer::new(&format!("r{i}"), &prefixes);
            feeds.push((
                reg.clone(),
                hub.subscribe(&reg, PrefixSet::new(prefixes), 64),
            ));
        }
        let keys = ["a/b/c", "a/x", "éa", "ê", "p/éz", "p/ê", "x", "a", "b/é"];
        for (rev, k) in keys.iter().enumerate() {
            hub.publish(txn(rev as u64 + 1, k));
        }
        for ((_, feed), set) in feeds.iter_mut().zip(sets) {
            let mut got = Vec::new();
            while let Ok(t) = feed.rx.try_recv() {
                got.push(t.changes[0].key.as_str().to_owned());
            }
            let want: Vec<String> = keys
                .iter()
                .filter(|k| set.iter().any(|p| k.starts_with(p)))
                .map(|k| k.to_string())
                .collect();
            assert_eq!(got, want, "registration on {set:?}");
        }
        // A transaction of many keys under one prefix reaches its registrations once.
        let change = |k: &str| KeyChange {
            key: Key::new(k).unwrap(),
            op: Op::Delete,
            value: None,
            prev: Some("v".into()),
        };
        hub.publish(Arc::new(Txn {
            revision: Revision(100),
            changes: vec![change("a/1"), change("a/2"), change("a/b/3")],
        }));
        for ((_, feed), want) in feeds.iter_mut().zip([1, 1, 1, 1, 0, 0]) {
            let mut n = 0;
            while feed.rx.try_recv().is_ok() {
                n += 1;
            }
            assert_eq!(n, want);
        }
        // Closed registrations leave the index: nothing is looked up for them.
        for (reg, _) in feeds.drain(1..) {
            reg.close();
        }
        assert_eq!(hub.stats().active, 1);
        assert_eq!(hub.by_prefix.keys().collect::<Vec<_>>(), [""]);
        assert_eq!(hub.lengths.keys().collect::<Vec<_>>(), [&0]);
    }
}
