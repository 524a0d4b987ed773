//! Watch registrations: a resync at R, then one etcd watch from R+1, kept continuous.
//!
//! Each registration runs one task ([`datasync::transport::resync::drive`], which owns the
//! recovery loop) over one etcd watch stream covering all its prefixes (so every change
//! of one transaction arrives in one event); this module is its [`Upstream`]: the
//! snapshot, opening a watch from a revision, and what each response means.
//!
//! Continuity, case by case:
//! - the stream breaks (etcd restarted, network lost): the watch is re-created from the
//!   last delivered revision + 1 with backoff. etcd replays from there, so the consumer
//!   sees no gap and no duplicate, and no resync is needed;
//! - etcd cancels the watch because that revision is compacted (`compact_revision`), or
//!   for any other reason: a resync (`Compacted` / `Reconnect`);
//! - a response header shows a revision below what was delivered, or another cluster id
//!   (etcd restored from a backup): a resync (`StoreReset`);
//! - the consumer falls `queue_capacity` events behind: the watch is cancelled (a slow
//!   consumer never holds etcd's stream or anybody else), and once the consumer has made
//!   room, a resync (`Overflow`) at the then current revision follows what it had queued;
//! - a resync request: once the consumer has taken what was queued (so that requests
//!   made until then coalesce), the watch is cancelled, a resync read, the watch
//!   re-created.
//!
//! Progress notifications advance the resume point while nothing under the prefixes
//! changes, so a reconnect does not replay revisions the consumer does not care about.

use datasync::transport::Producer;
use std::collections::VecDeque;

use datasync::transport::relay::{self, Item};
use datasync::transport::resync::{self, Lost, Next, Snapshot, Start, Upstream};
use datasync::{
    KeyChange, Op, Prefix, PrefixSet, PrefixValues, ResyncReason, Revision, StoreError, Value,
    Watch, WatchOptions, Watcher,
};

use crate::EtcdStore;
use crate::error::{revision, store_error, timed};

pub(crate) async fn start(
    store: EtcdStore,
    name: &str,
    prefixes: &[Prefix],
    opts: WatchOptions,
) -> Result<Watch, StoreError> {
    let reg = Producer::new(name, prefixes);
    let set = PrefixSet::new(prefixes.iter().cloned());
    let source = store.inner.source.clone();
    let (relay, watch) = relay::channel(&reg, source, opts.queue_capacity);
    // Resuming: etcd replays from `r + 1`, or cancels the watch as compacted, or shows
    // a revision below `r` in its header (another store): see `check`.
    let (rev, cluster) = match opts.resume {
        Some(r) => (r, 0),
        None => {
            let (rev, values, cluster) = store.snapshot(&set).await?;
            relay
                .try_send(Item::Resync(rev, ResyncReason::Initial, values))
                .map_err(|_| StoreError::Backend("watch queue refused the first resync".into()))?;
            (rev, cluster)
        }
    };
    let mut up = EtcdWatch {
        store,
        set,
        reg,
        cluster,
        buffered: VecDeque::new(),
    };
    // The server-side watch is live when `watch()` returns (a compaction meanwhile is
    // left to the driver, which resyncs).
    let mut start = Start {
        revision: rev,
        follower: None,
        owed: None,
    };
    // etcd's revisions are `i64`: past them, the store is behind, with nothing to ask.
    if opts.resume.is_some_and(|r| r.0 >= i64::MAX as u64) {
        start.owed = Some(ResyncReason::StoreReset);
    } else if !up.set.is_empty() {
        match up.open(rev).await {
            Ok(open) => start.follower = Some(open),
            Err(Lost::Broken(e)) => return Err(e),
            Err(Lost::Resync(reason)) => start.owed = Some(reason),
        }
    }
    tokio::spawn(resync::drive(up, relay, start));
    Ok(watch)
}

/// One registration's side of etcd: a watch of the registration's range from a
/// revision, with `prev_kv` and progress notifications.
struct EtcdWatch {
    store: EtcdStore,
    set: PrefixSet,
    reg: Producer,
    /// The cluster id seen at the last resync (0: unknown).
    cluster: u64,
    /// Changes of a response not yet handed to the driver, one per revision, or how
    /// the response showed continuity lost.
    buffered: VecDeque<Result<Next, Lost>>,
}

/// An open etcd watch and its id.
type Follower = (etcd_client::WatchStream, i64);

#[async_trait::async_trait]
impl Upstream for EtcdWatch {
    type Follower = Follower;
    // etcd replays from any revision it has not compacted.
    const RESUMES: bool = true;

    fn idle(&self) -> bool {
        self.set.is_empty()
    }

    fn rescope(&mut self, prefixes: PrefixSet) {
        self.set = prefixes;
    }

    async fn extend(&mut self, added: &PrefixSet, at: Revision) -> Result<Vec<PrefixValues>, Lost> {
        match self.store.snapshot_at(added, at).await {
            // Another cluster (restored from a backup) may hold `at` with other values.
            Ok((_, cluster)) if self.cluster != 0 && cluster != 0 && cluster != self.cluster => {
                Err(Lost::Resync(ResyncReason::StoreReset))
            }
            Ok((values, _)) => Ok(values),
            // Too old to read: a full resync.
            Err(StoreError::Compacted { .. }) => Err(Lost::Resync(ResyncReason::PrefixAdded)),
            // The store is behind what was delivered: it went back.
            Err(StoreError::FutureRevision { .. }) => Err(Lost::Resync(ResyncReason::StoreReset)),
            Err(e) => Err(Lost::Broken(e)),
        }
    }

    async fn snapshot(&mut self) -> Result<Snapshot<Follower>, StoreError> {
        let (revision, values, cluster) = self.store.snapshot(&self.set).await?;
        self.cluster = cluster;
        Ok(Snapshot {
            revision,
            values,
            follower: None,
        })
    }

    async fn resume(&mut self, from: Revision) -> Result<Follower, Lost> {
        self.buffered.clear();
        self.open(Revision(from.0.saturating_sub(1))).await
    }

    async fn next(&mut self, (ws, _): &mut Follower, last: Revision) -> Result<Next, Lost> {
        loop {
            if let Some(item) = self.buffered.pop_front() {
                return item;
            }
            let resp = match ws.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    return Err(Lost::Broken(StoreError::Unavailable(
                        "etcd ended the watch stream".into(),
                    )));
                }
                Err(e) => return Err(Lost::Broken(store_error(e))),
            };
            self.check(&resp, last)?;
            if resp.events().is_empty() {
                // A progress notification: every event up to its revision was sent.
                if let Some(h) = resp.header() {
                    return Ok(Next::Progress(
                        revision(h.revision()).map_err(Lost::Broken)?,
                    ));
                }
                continue;
            }
            self.buffer(resp.events());
        }
    }

    async fn release(&mut self, (mut ws, id): Follower) {
        // Release the server-side watch now; dropping the stream ends it too.
        let _ = ws.cancel(id).await;
    }
}

impl EtcdWatch {
    /// Whether a response shows a store that went back (a revision below what was
    /// delivered, or another cluster: etcd restored from a backup), or a cancelled
    /// watch.
    fn check(&self, resp: &etcd_client::WatchResponse, last: Revision) -> Result<(), Lost> {
        if let Some(h) = resp.header() {
            let behind = h.revision() > 0 && (h.revision() as u64) < last.0;
            let other = self.cluster != 0 && h.cluster_id() != 0 && h.cluster_id() != self.cluster;
            if behind || other {
                tracing::warn!(registration = self.reg.name(), revision = h.revision(), seen = %last, "etcd went back in time (restored?)");
                return Err(Lost::Resync(ResyncReason::StoreReset));
            }
        }
        if resp.canceled() {
            return Err(Lost::Resync(if resp.compact_revision() > 0 {
                ResyncReason::Compacted
            } else {
                tracing::warn!(
                    registration = self.reg.name(),
                    reason = resp.cancel_reason(),
                    "etcd cancelled the watch"
                );
                ResyncReason::Reconnect
            }));
        }
        Ok(())
    }

    /// Opens an etcd watch from `last + 1` and waits until etcd has created it. A
    /// watch that knows no cluster yet (one resuming) stays on the cluster its
    /// creation shows.
    async fn open(&mut self, last: Revision) -> Result<Follower, Lost> {
        let (start, end) = self.store.inner.ns.covering_range(&self.set);
        let opts = etcd_client::WatchOptions::new()
            .with_range(end)
            .with_start_revision(last.next().0 as i64)
            .with_prev_key()
            .with_progress_notify();
        let mut client = self.store.watch_client();
        let mut ws = match timed(self.store.timeout(), client.watch(start, Some(opts))).await {
            Ok(Ok(ws)) => {
                self.store
                    .inner
                    .watch_streams
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                ws
            }
            Ok(Err(e)) => return Err(Lost::Broken(store_error(e))),
            Err(e) => return Err(Lost::Broken(e)),
        };
        loop {
            let resp = match timed(self.store.timeout(), ws.message()).await {
                Ok(Ok(Some(resp))) => resp,
                Ok(Ok(None)) => {
                    return Err(Lost::Broken(StoreError::Unavailable(
                        "etcd ended the watch stream".into(),
                    )));
                }
                Ok(Err(e)) => return Err(Lost::Broken(store_error(e))),
                Err(e) => return Err(Lost::Broken(e)),
            };
            self.check(&resp, last)?;
            if resp.created() {
                if self.cluster == 0 {
                    self.cluster = resp.header().map_or(0, |h| h.cluster_id());
                }
                return Ok((ws, resp.watch_id()));
            }
        }
    }

    /// Buffers one change per revision (etcd never splits a revision across
    /// responses), up to an event that lost its previous value.
    fn buffer(&mut self, events: &[etcd_client::Event]) {
        let mod_rev = |e: &etcd_client::Event| e.kv().map_or(0, |kv| kv.mod_revision());
        for txn in events.chunk_by(|a, b| mod_rev(a) == mod_rev(b)) {
            let rev = match revision(mod_rev(&txn[0])) {
                Ok(rev) => rev,
                Err(e) => {
                    self.buffered.push_back(Err(Lost::Broken(e)));
                    return;
                }
            };
            if let Some(e) = txn.iter().find(|e| lost_prev(e)) {
                // Compaction passed the previous revision while the event was in flight:
                // etcd sends it without `prev_kv`. Deliver no guess; resync from here.
                tracing::warn!(
                    registration = self.reg.name(),
                    key = %String::from_utf8_lossy(e.kv().map_or(&[][..], |kv| kv.key())),
                    revision = rev.0,
                    "etcd sent a change without its previous value (compacted): resync follows"
                );
                self.buffered
                    .push_back(Err(Lost::Resync(ResyncReason::Compacted)));
                return;
            }
            let mut changes: Vec<_> = txn.iter().filter_map(|e| self.change(e)).collect();
            if changes.is_empty() {
                // Only keys outside the prefixes (the watched range covers them): the
                // resume point still moves past it.
                self.buffered.push_back(Ok(Next::Progress(rev)));
            } else {
                changes.sort_by(|a, b| a.key.cmp(&b.key));
                self.buffered.push_back(Ok(Next::Change(rev, changes)));
            }
        }
    }

    /// The change `ev` makes to a watched key; `None` for keys outside the watch.
    fn change(&self, ev: &etcd_client::Event) -> Option<KeyChange> {
        let kv = ev.kv()?;
        let key = self.store.decode_key(kv.key())?;
        if !self.set.matches(key.as_str()) {
            return None;
        }
        let prev = ev.prev_kv().map(|p| Value::from(p.value().to_vec()));
        Some(match ev.event_type() {
            etcd_client::EventType::Put => KeyChange {
                key,
                op: Op::Put,
                value: Some(Value::from(kv.value().to_vec())),
                prev,
            },
            etcd_client::EventType::Delete => KeyChange {
                key,
                op: Op::Delete,
                value: None,
                prev,
            },
        })
    }
}

/// Whether etcd dropped `ev`'s previous value: a delete always had one, and so did a
/// put to a key created before this revision.
fn lost_prev(ev: &etcd_client::Event) -> bool {
    let Some(kv) = ev.kv() else {
        return false;
    };
    let put = ev.event_type() == etcd_client::EventType::Put;
    prev_missing(
        put,
        kv.create_revision(),
        kv.mod_revision(),
        ev.prev_kv().is_some(),
    )
}

/// [`lost_prev`] on the event's fields.
fn prev_missing(put: bool, create_revision: i64, mod_revision: i64, has_prev: bool) -> bool {
    !has_prev && (!put || create_revision != mod_revision)
}

#[async_trait::async_trait]
impl Watcher for EtcdStore {
    async fn watch(
        &self,
        name: &str,
        prefixes: &[Prefix],
        opts: WatchOptions,
    ) -> Result<Watch, StoreError> {
        start(self.clone(), name, prefixes, opts).await
    }
}

#[cfg(test)]
mod tests {
    use super::prev_missing;

    #[test]
    fn a_change_without_its_previous_value_is_detected() {
        // A create has no previous value; an update or a delete without one lost it.
        assert!(!prev_missing(true, 7, 7, false));
        assert!(prev_missing(true, 3, 7, false));
        assert!(prev_missing(false, 3, 7, false));
        assert!(!prev_missing(true, 3, 7, true));
        assert!(!prev_missing(false, 3, 7, true));
    }
}
