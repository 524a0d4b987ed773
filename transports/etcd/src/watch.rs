//! Watch registrations: a resync at R, then one etcd watch from R+1, kept continuous.
//!
//! Each registration runs one task that owns one etcd watch stream covering all its
//! prefixes (so every change of one transaction arrives in one event), and feeds a
//! bounded queue that the registration's [`Watch`] stream drains.
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

use datasync::relay::{self, Item, Relay};
use datasync::{
    KeyChange, Op, Prefix, PrefixSet, Registration, ResyncReason, Revision, StoreError, Value,
    Watch, WatchOptions,
};

use crate::EtcdStore;
use crate::error::{store_error, timed};
use crate::store::Backoff;

pub(crate) async fn start(
    store: EtcdStore,
    name: &str,
    prefixes: &[Prefix],
    opts: WatchOptions,
) -> Result<Watch, StoreError> {
    let reg = Registration::new(name);
    let set = PrefixSet::new(prefixes.iter().cloned());
    let (rev, values, cluster) = store.snapshot(&set).await?;
    let source = store.inner.source.clone();
    let (relay, watch) = relay::channel(&reg, source, opts.queue_capacity);
    relay
        .try_send(Item::Resync(rev, ResyncReason::Initial, values))
        .map_err(|_| StoreError::Backend("watch queue refused the first resync".into()))?;
    let mut task = Task {
        store,
        set,
        reg,
        relay,
        last: rev,
        cluster,
        first: None,
    };
    // The server-side watch is live when `watch()` returns (a compaction meanwhile is
    // left to the task, which resyncs).
    if !task.set.is_empty() {
        match task.open().await {
            Ok(open) => task.first = Some(open),
            Err(Flow::Broken(e)) => return Err(e),
            Err(_) => {}
        }
    }
    tokio::spawn(task.run());
    Ok(watch)
}

struct Task {
    store: EtcdStore,
    set: PrefixSet,
    reg: Registration,
    relay: Relay,
    /// The revision the consumer's state is at: the resume point is `last + 1`.
    last: Revision,
    /// The cluster id seen at the last resync (0: unknown).
    cluster: u64,
    /// The etcd watch opened by `start`, for the first `follow`.
    first: Option<(etcd_client::WatchStream, i64)>,
}

/// How following the etcd watch ended.
enum Flow {
    Closed,
    Resync(ResyncReason),
    Broken(StoreError),
}

impl Task {
    async fn run(mut self) {
        let name = self.reg.name().to_owned();
        let mut pending: Option<ResyncReason> = None;
        let mut backoff = Backoff::default();
        loop {
            if self.reg.is_closed() {
                return;
            }
            if let Some(reason) = pending.take() {
                // Wait for room first, so the snapshot is fresh when it is delivered.
                let Some(permit) = self.relay.reserve().await else {
                    return;
                };
                self.reg.take_resync_request();
                match self.store.snapshot(&self.set).await {
                    Ok((rev, values, cluster)) => {
                        tracing::debug!(registration = %name, ?reason, %rev, "resync");
                        permit.send(Item::Resync(rev, reason, values));
                        self.last = rev;
                        self.cluster = cluster;
                        backoff.reset();
                    }
                    Err(e) => {
                        tracing::warn!(registration = %name, error = %e, "resync failed; retrying");
                        permit.send(Item::Interrupted(e));
                        pending = Some(reason);
                        self.pause(&mut backoff).await;
                        continue;
                    }
                }
            }
            match self.follow(&mut backoff).await {
                Flow::Closed => return,
                Flow::Resync(reason) => pending = Some(reason),
                Flow::Broken(e) if e.is_retryable() => {
                    tracing::warn!(registration = %name, error = %e, resume = %self.last.next(), "etcd watch broken; resuming");
                    self.pause(&mut backoff).await;
                }
                Flow::Broken(e) => {
                    // Not transient (e.g. permission revoked): tell the consumer, and keep
                    // trying through resyncs, so the watch never dies quietly.
                    tracing::warn!(registration = %name, error = %e, "etcd refused the watch");
                    let _ = self.relay.try_send(Item::Interrupted(e));
                    pending = Some(ResyncReason::Reconnect);
                    self.pause(&mut backoff).await;
                }
            }
        }
    }

    async fn pause(&self, backoff: &mut Backoff) {
        tokio::select! {
            _ = self.reg.closed() => {}
            _ = tokio::time::sleep(backoff.next()) => {}
        }
    }

    /// Whether a response shows a store that went back: a revision below what was
    /// delivered, or another cluster (etcd restored from a backup).
    fn went_back(&self, resp: &etcd_client::WatchResponse) -> bool {
        let Some(h) = resp.header() else {
            return false;
        };
        let behind = h.revision() > 0 && (h.revision() as u64) < self.last.0;
        let other = self.cluster != 0 && h.cluster_id() != 0 && h.cluster_id() != self.cluster;
        if behind || other {
            tracing::warn!(registration = self.reg.name(), revision = h.revision(), seen = %self.last, "etcd went back in time (restored?)");
        }
        behind || other
    }

    /// Opens an etcd watch from `last + 1` and waits until etcd has created it.
    async fn open(&self) -> Result<(etcd_client::WatchStream, i64), Flow> {
        let (start, end) = self.store.inner.ns.covering_range(&self.set);
        let opts = etcd_client::WatchOptions::new()
            .with_range(end)
            .with_start_revision(self.last.next().0 as i64)
            .with_prev_key()
            .with_progress_notify();
        let mut client = self.store.watch_client();
        let mut ws = match timed(self.store.timeout(), client.watch(start, Some(opts))).await {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => return Err(Flow::Broken(store_error(e))),
            Err(e) => return Err(Flow::Broken(e)),
        };
        loop {
            let resp = match timed(self.store.timeout(), ws.message()).await {
                Ok(Ok(Some(resp))) => resp,
                Ok(Ok(None)) => {
                    return Err(Flow::Broken(StoreError::Unavailable(
                        "etcd ended the watch stream".into(),
                    )));
                }
                Ok(Err(e)) => return Err(Flow::Broken(store_error(e))),
                Err(e) => return Err(Flow::Broken(e)),
            };
            if self.went_back(&resp) {
                return Err(Flow::Resync(ResyncReason::StoreReset));
            }
            if resp.canceled() {
                return Err(Flow::Resync(if resp.compact_revision() > 0 {
                    ResyncReason::Compacted
                } else {
                    ResyncReason::Reconnect
                }));
            }
            if resp.created() {
                return Ok((ws, resp.watch_id()));
            }
        }
    }

    /// Follows one etcd watch from `last + 1` until it ends.
    async fn follow(&mut self, backoff: &mut Backoff) -> Flow {
        if self.set.is_empty() {
            // Nothing to watch: wait for a close or a request.
            return tokio::select! {
                _ = self.reg.closed() => Flow::Closed,
                _ = self.relay.requested() => Flow::Resync(ResyncReason::Requested),
            };
        }
        let (mut ws, id) = match self.first.take() {
            Some(open) => open,
            None => match self.open().await {
                Ok(open) => open,
                Err(flow) => return flow,
            },
        };
        backoff.reset();
        let flow = loop {
            let msg = tokio::select! {
                biased;
                _ = self.reg.closed() => break Flow::Closed,
                _ = self.relay.requested() => break Flow::Resync(ResyncReason::Requested),
                msg = ws.message() => msg,
            };
            let resp = match msg {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    break Flow::Broken(StoreError::Unavailable(
                        "etcd ended the watch stream".into(),
                    ));
                }
                Err(e) => break Flow::Broken(store_error(e)),
            };
            if self.went_back(&resp) {
                break Flow::Resync(ResyncReason::StoreReset);
            }
            if resp.canceled() {
                break Flow::Resync(if resp.compact_revision() > 0 {
                    ResyncReason::Compacted
                } else {
                    tracing::warn!(
                        registration = self.reg.name(),
                        reason = resp.cancel_reason(),
                        "etcd cancelled the watch"
                    );
                    ResyncReason::Reconnect
                });
            }
            if resp.events().is_empty() {
                // A progress notification: every event up to its revision was sent.
                if let Some(h) = resp.header() {
                    self.last = self.last.max(Revision(h.revision() as u64));
                }
                continue;
            }
            match self.deliver(resp.events()) {
                Ok(()) => {}
                Err(flow) => break flow,
            }
        };
        // Release the server-side watch now; dropping the stream ends it too.
        let _ = ws.cancel(id).await;
        flow
    }

    /// Queues one change event per revision (etcd never splits a revision across
    /// responses); an event the queue has no room for ends the watch with `Overflow`.
    fn deliver(&mut self, events: &[etcd_client::Event]) -> Result<(), Flow> {
        let revision = |e: &etcd_client::Event| e.kv().map_or(0, |kv| kv.mod_revision());
        for txn in events.chunk_by(|a, b| revision(a) == revision(b)) {
            let rev = Revision(revision(&txn[0]) as u64);
            if let Some(e) = txn.iter().find(|e| lost_prev(e)) {
                // Compaction passed the previous revision while the event was in flight:
                // etcd sends it without `prev_kv`. Deliver no guess; resync from here.
                tracing::warn!(
                    registration = self.reg.name(),
                    key = %String::from_utf8_lossy(e.kv().map_or(&[][..], |kv| kv.key())),
                    revision = rev.0,
                    "etcd sent a change without its previous value (compacted): resync follows"
                );
                return Err(Flow::Resync(ResyncReason::Compacted));
            }
            let mut changes: Vec<_> = txn.iter().filter_map(|e| self.change(e)).collect();
            if !changes.is_empty() {
                changes.sort_by(|a, b| a.key.cmp(&b.key));
                if self.relay.try_send(Item::Change(rev, changes)).is_err() {
                    if self.reg.is_closed() {
                        return Err(Flow::Closed);
                    }
                    tracing::debug!(registration = self.reg.name(), "queue full: resync follows");
                    return Err(Flow::Resync(ResyncReason::Overflow));
                }
            }
            self.last = rev;
        }
        Ok(())
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
