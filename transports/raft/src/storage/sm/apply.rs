//! Apply: committed commands become revisions, change events and undo records.

use std::sync::Arc;

use datasync::transport::feed::Txn as FeedTxn;
use datasync::{Key, KeyChange, Op, Revision, Value};
use openraft::EntryPayload;
use redb::ReadableDatabase;

use crate::records::{
    Compare, CompareOp, CompareTarget, KeyRange, OpResult, PrevRecord, RangeEnd, Txn, TxnOp,
    TxnOutcome,
};
use crate::storage::lease::{self, LeaseObj, LeaseObjs, Leases};
use crate::storage::session::{Seen, Sessions};
use crate::storage::tables::{KV, Stored};
use crate::types::{
    Command, Entry, LeaseOutcome, Outcome, StorageError, StoredMembership, lease_id_of,
};

use super::writer::{Queue, Work, Write, WriterFailed, store_works};
use super::*;

/// Where apply reads a key's current record: pending writes first, then redb.
pub(super) struct View<'a> {
    kv: redb::ReadOnlyTable<&'static str, &'static [u8]>,
    pending: &'a mut PendingState,
    writes: Vec<Write>,
    lease_written: bool,
    leases: &'a mut Leases,
    /// When this apply runs, on the lease clock (and its wall clock).
    now: tokio::time::Instant,
    wall_ms: u64,
    sessions: &'a mut Sessions,
    /// The log index of the entry being applied.
    index: u64,
    objs: &'a mut LeaseObjs,
    /// Lease objects changed, for the writer (`None`: ended).
    obj_writes: Vec<(u64, Option<Vec<u8>>)>,
    /// Whether records count versions (see [`crate::storage::tables::Stored`]).
    versions: &'a mut bool,
    /// Set when a `CountVersions` entry turned it on in this apply.
    versions_on: bool,
    /// The history up to here goes once this apply is done (`Command::Compact`).
    compact: Option<u64>,
}

/// A key's change event, and its record before the change.
pub(super) type Change = (KeyChange, Option<Stored>);

impl View<'_> {
    fn current(&self, key: &str) -> Result<Option<Stored>, StorageError> {
        if let Some((_, rec)) = self.pending.keys.get(key) {
            return Ok(rec.clone());
        }
        match self.kv.get(key).map_err(rd)? {
            Some(v) => Ok(Some(Stored::decode(v.value()).map_err(rd)?)),
            None => Ok(None),
        }
    }

    fn record(&mut self, key: &Key, revision: u64, record: Option<Stored>) {
        self.pending
            .keys
            .insert(key.clone(), (revision, record.clone()));
        self.writes.push(Write {
            key: key.clone(),
            record,
        });
    }

    fn put(
        &mut self,
        key: &str,
        value: Vec<u8>,
        expires: Option<u64>,
        rev: u64,
    ) -> Result<Change, StorageError> {
        // 0 is "no lease" in a stored record: a command carrying it has none.
        let expires = expires.filter(|w| *w != 0);
        let prev = self.current(key)?;
        let rec = Stored {
            mod_rev: rev,
            create_rev: prev.as_ref().map_or(rev, |p| p.create_rev),
            expires_at_ms: expires.unwrap_or(0),
            version: match (*self.versions, &prev) {
                (true, Some(p)) => p.version.saturating_add(1),
                _ => 1,
            },
            versioned: *self.versions,
            value: Value::from(value),
        };
        self.lease_written |= expires.is_some();
        let value = rec.value.clone();
        let key = Key::from_stored(key).map_err(wr)?;
        if let Some(old) = prev.as_ref().and_then(|p| lease_id_of(p.expires_at_ms)) {
            self.objs.detach(old, &key);
        }
        match expires {
            // On a lease object: it expires with the lease (a txn checked it exists).
            Some(word) if lease_id_of(word).is_some() => {
                self.leases.clear(&key);
                self.objs.attach(word & !crate::types::LEASE_ID_FLAG, &key);
            }
            Some(word) => {
                let ttl = lease::ttl_of(word, self.wall_ms);
                self.leases.set(&key, self.now + ttl, rev)
            }
            None => self.leases.clear(&key),
        }
        self.record(&key, rev, Some(rec));
        Ok((
            KeyChange {
                key,
                op: Op::Put,
                value: Some(value),
                prev: prev.as_ref().map(|p| p.value.clone()),
            },
            prev,
        ))
    }

    fn delete(&mut self, key: &str, rev: u64) -> Result<Option<Change>, StorageError> {
        let Some(prev) = self.current(key)? else {
            return Ok(None);
        };
        let key = Key::from_stored(key).map_err(wr)?;
        self.leases.clear(&key);
        if let Some(old) = lease_id_of(prev.expires_at_ms) {
            self.objs.detach(old, &key);
        }
        self.record(&key, rev, None);
        Ok(Some((
            KeyChange {
                key,
                op: Op::Delete,
                value: None,
                prev: Some(prev.value.clone()),
            },
            Some(prev),
        )))
    }

    /// Keys under `prefix` in redb or among the pending writes (including ones deleted
    /// since, which `delete` skips).
    fn keys_under(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let mut keys = std::collections::BTreeSet::new();
        for item in self.kv.range(prefix..).map_err(rd)? {
            let (k, _) = item.map_err(rd)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            keys.insert(k.value().to_owned());
        }
        let pending = self.pending.keys.range::<str, _>((
            std::ops::Bound::Included(prefix),
            std::ops::Bound::Unbounded,
        ));
        keys.extend(
            pending
                .map(|(k, _)| k.as_str())
                .take_while(|k| k.starts_with(prefix))
                .map(str::to_owned),
        );
        Ok(keys.into_iter().collect())
    }

    /// Keys in `range` in redb or among the pending writes (including ones deleted
    /// since, which `delete` skips), in key order.
    fn keys_in(&self, range: &KeyRange) -> Result<Vec<String>, StorageError> {
        let start = range.start.as_str();
        let end = match &range.end {
            RangeEnd::Single => return Ok(vec![range.start.clone()]),
            RangeEnd::Before(e) if e.as_str() <= start => return Ok(Vec::new()),
            RangeEnd::Before(e) => std::ops::Bound::Excluded(e.as_str()),
            RangeEnd::Unbounded => std::ops::Bound::Unbounded,
        };
        let bounds = (std::ops::Bound::Included(start), end);
        let mut keys = std::collections::BTreeSet::new();
        for item in self.kv.range::<&str>(bounds).map_err(rd)? {
            let (k, _) = item.map_err(rd)?;
            keys.insert(k.value().to_owned());
        }
        keys.extend(
            self.pending
                .keys
                .range::<str, _>(bounds)
                .map(|(k, _)| k.as_str().to_owned()),
        );
        Ok(keys.into_iter().collect())
    }

    /// Whether `c` holds on every key in its range (on an absent key's zeros if none
    /// is there; a value compare on no key fails, as in etcd).
    fn holds(&self, c: &Compare) -> Result<bool, StorageError> {
        let mut found = false;
        for k in self.keys_in(&c.range)? {
            if let Some(s) = self.current(&k)? {
                found = true;
                if !compare(c, Some(&s)) {
                    return Ok(false);
                }
            }
        }
        Ok(found || (!matches!(c.target, CompareTarget::Value(_)) && compare(c, None)))
    }

    /// Stores lease object `id` (its TTL from now on this replica).
    fn set_obj(&mut self, id: u64, obj: LeaseObj) {
        self.objs.set(id, obj, self.now);
        self.obj_writes
            .push((id, Some(bincode::serialize(&obj).unwrap_or_default())));
        self.lease_written = true;
    }

    /// Ends lease object `id` (if it exists), deleting its keys at `rev`.
    fn end_obj(&mut self, id: u64, rev: u64) -> Result<Option<Vec<Change>>, StorageError> {
        let Some(keys) = self.objs.remove(id) else {
            return Ok(None);
        };
        self.obj_writes.push((id, None));
        let mut changes = Vec::new();
        for k in keys {
            changes.extend(self.delete(k.as_str(), rev)?);
        }
        Ok(Some(changes))
    }

    /// A lease command at revision `rev` (used if it deletes keys).
    fn lease(&mut self, cmd: Command, rev: u64) -> Result<(Outcome, Vec<Change>), StorageError> {
        let index = self.index;
        Ok(match cmd {
            Command::LeaseGrant { id, ttl_ms } => {
                if self.objs.get(id).is_some() {
                    return Ok((Outcome::Lease(LeaseOutcome::Exists), vec![]));
                }
                let obj = LeaseObj {
                    ttl_ms,
                    renewed: index,
                };
                self.set_obj(id, obj);
                (Outcome::Lease(LeaseOutcome::Alive { ttl_ms }), vec![])
            }
            Command::LeaseKeepAlive { id } => match self.objs.get(id) {
                None => (Outcome::Lease(LeaseOutcome::NotFound(id)), vec![]),
                Some(mut obj) => {
                    obj.renewed = index;
                    self.set_obj(id, obj);
                    let ttl_ms = obj.ttl_ms;
                    (Outcome::Lease(LeaseOutcome::Alive { ttl_ms }), vec![])
                }
            },
            Command::LeaseRevoke { id } => match self.end_obj(id, rev)? {
                None => (Outcome::Lease(LeaseOutcome::NotFound(id)), vec![]),
                Some(changes) => {
                    let count = changes.len() as u64;
                    let revision = if count == 0 { rev - 1 } else { rev };
                    let out = LeaseOutcome::Revoked { count, revision };
                    (Outcome::Lease(out), changes)
                }
            },
            Command::LeaseExpire { ids } => {
                let mut changes = Vec::new();
                for (id, renewed) in ids {
                    if self.objs.get(id).is_some_and(|o| o.renewed == renewed) {
                        changes.extend(self.end_obj(id, rev)?.unwrap_or_default());
                    }
                }
                changes.sort_by(|a, b| a.0.key.cmp(&b.0.key));
                let count = changes.len() as u64;
                let revision = if count == 0 { rev - 1 } else { rev };
                (Outcome::Deleted { count, revision }, changes)
            }
            _ => return Err(wr(crate::storage::tables::CorruptValue(0))),
        })
    }

    /// A transaction at revision `rev`: its compares, then one branch's writes.
    fn txn(&mut self, t: Txn, rev: u64) -> Result<(Outcome, Vec<Change>), StorageError> {
        let mut succeeded = true;
        for c in &t.compares {
            if !self.holds(c)? {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded { t.success } else { t.failure };
        // A put on a lease that does not exist fails the whole txn, before any write.
        for op in &ops {
            if let TxnOp::Put {
                expires_at_ms: Some(w),
                ..
            } = op
                && let Some(id) = lease_id_of(*w)
                && self.objs.get(id).is_none()
            {
                return Ok((Outcome::Lease(LeaseOutcome::NotFound(id)), vec![]));
            }
        }
        let mut changes = Vec::new();
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                TxnOp::Put {
                    key,
                    value,
                    expires_at_ms,
                    prev_kv,
                } => {
                    let c = self.put(&key, value, expires_at_ms, rev)?;
                    let prev = c.1.as_ref().filter(|_| prev_kv);
                    results.push(OpResult::Put(prev.map(|s| prev_record(&key, s))));
                    changes.push(c);
                }
                TxnOp::Delete { range, prev_kv } => {
                    let (mut count, mut prev) = (0, Vec::new());
                    for k in self.keys_in(&range)? {
                        let Some(c) = self.delete(&k, rev)? else {
                            continue;
                        };
                        count += 1;
                        if let (true, Some(s)) = (prev_kv, &c.1) {
                            prev.push(prev_record(&k, s));
                        }
                        changes.push(c);
                    }
                    results.push(OpResult::Deleted { count, prev });
                }
            }
        }
        // One event lists a transaction's keys in order, as a prefix delete does.
        changes.sort_by(|a, b| a.0.key.cmp(&b.0.key));
        let revision = if changes.is_empty() { rev - 1 } else { rev };
        let outcome = TxnOutcome {
            succeeded,
            revision,
            results,
        };
        Ok((Outcome::Txn(outcome), changes))
    }

    /// Applies one command as revision `rev` (used only if something changes).
    fn apply(&mut self, cmd: Command, rev: u64) -> Result<(Outcome, Vec<Change>), StorageError> {
        Ok(match cmd {
            Command::Put {
                key,
                value,
                expires_at_ms,
            } => {
                let c = self.put(&key, value, expires_at_ms, rev)?;
                (Outcome::Written { revision: rev }, vec![c])
            }
            Command::Cas {
                key,
                expect,
                value,
                expires_at_ms,
            } => {
                let cur = self.current(&key)?;
                if cur.as_ref().map(|c| c.mod_rev) != expect {
                    let current = cur.map(|c| (c.value.as_bytes().to_vec(), c.mod_rev));
                    return Ok((Outcome::Conflict { current }, vec![]));
                }
                let c = self.put(&key, value, expires_at_ms, rev)?;
                (Outcome::Written { revision: rev }, vec![c])
            }
            Command::Delete { key, prefix } => {
                let keys = if prefix {
                    self.keys_under(&key)?
                } else {
                    vec![key]
                };
                let mut changes = Vec::new();
                for k in keys {
                    changes.extend(self.delete(&k, rev)?);
                }
                let count = changes.len() as u64;
                let revision = if count == 0 { rev - 1 } else { rev };
                (Outcome::Deleted { count, revision }, changes)
            }
            Command::Txn(t) => self.txn(*t, rev)?,
            Command::CountVersions => {
                if !*self.versions {
                    *self.versions = true;
                    self.versions_on = true;
                }
                (Outcome::Unchanged, vec![])
            }
            Command::Compact { revision } => {
                // At most the revision before this command's: the same on every
                // member, however entries are batched.
                self.compact = self.compact.max(Some(revision.min(rev - 1)));
                (Outcome::Unchanged, vec![])
            }
            c @ (Command::LeaseGrant { .. }
            | Command::LeaseKeepAlive { .. }
            | Command::LeaseRevoke { .. }
            | Command::LeaseExpire { .. }) => self.lease(c, rev)?,
            // `apply_command` unrolls batches and request ids before they get here.
            Command::Batch(_) | Command::Once { .. } => {
                return Err(wr(crate::storage::tables::CorruptValue(0)));
            }
            Command::Expire { keys } => {
                let mut changes = Vec::new();
                for (k, mod_rev) in keys {
                    if self.current(&k)?.is_some_and(|c| c.mod_rev == mod_rev) {
                        changes.extend(self.delete(&k, rev)?);
                    }
                }
                changes.sort_by(|a, b| a.0.key.cmp(&b.0.key));
                let count = changes.len() as u64;
                let revision = if count == 0 { rev - 1 } else { rev };
                (Outcome::Deleted { count, revision }, changes)
            }
        })
    }
}

/// Whether a compare holds on a key's record (`None`: absent, all zeros).
fn compare(c: &Compare, s: Option<&Stored>) -> bool {
    use std::cmp::Ordering;
    let ord = match &c.target {
        CompareTarget::Value(v) => s.map_or(&[][..], |s| s.value.as_bytes()).cmp(v.as_slice()),
        CompareTarget::Version(n) => s.map_or(0, |s| s.version).cmp(n),
        CompareTarget::CreateRevision(n) => s.map_or(0, |s| s.create_rev).cmp(n),
        CompareTarget::ModRevision(n) => s.map_or(0, |s| s.mod_rev).cmp(n),
        CompareTarget::Lease(n) => s
            .and_then(|s| crate::records::lease_id_of(s.expires_at_ms))
            .unwrap_or(0)
            .cmp(n),
    };
    match c.op {
        CompareOp::Equal => ord == Ordering::Equal,
        CompareOp::NotEqual => ord != Ordering::Equal,
        CompareOp::Greater => ord == Ordering::Greater,
        CompareOp::Less => ord == Ordering::Less,
    }
}

fn prev_record(key: &str, s: &Stored) -> PrevRecord {
    PrevRecord {
        key: key.to_owned(),
        value: s.value.as_bytes().to_vec(),
        create_revision: s.create_rev,
        mod_revision: s.mod_rev,
        version: s.version,
        lease: lease_id_of(s.expires_at_ms).unwrap_or(0),
    }
}

pub(super) type Published = Vec<Arc<Undo>>;

/// Applies one command (a batch: each part in order), recording what it published.
///
/// Total on a command's content: an invalid command (see [`Command::check`]) changes
/// nothing and answers [`Outcome::Invalid`]. An error here is fatal to the replica and
/// comes back on every restart, so it is kept for storage failures.
pub(super) fn apply_command(
    a: &mut View<'_>,
    cmd: Command,
    revision: &mut u64,
    txns: &mut Published,
) -> Result<Outcome, StorageError> {
    if let Command::Batch(cmds) = cmd {
        let mut outs = Vec::with_capacity(cmds.len());
        for c in cmds {
            outs.push(match c {
                Command::Batch(_) => invalid(&c, "a batch inside a batch".into()),
                c => apply_command(a, c, revision, txns)?,
            });
        }
        return Ok(Outcome::Batch(outs));
    }
    if let Err(e) = cmd.check_single() {
        return Ok(invalid(&cmd, e.to_string()));
    }
    if let Command::Once { id, cmd } = cmd {
        return Ok(match a.sessions.seen(&id) {
            Seen::Repeat(out) => out,
            Seen::Forgotten => Outcome::Invalid(format!(
                "request {} of client {:x} was answered and forgotten: not applied again",
                id.seq, id.client
            )),
            Seen::Full => Outcome::Invalid(format!(
                "client {:x} has {} requests in flight: request {} not applied",
                id.client,
                crate::storage::session::MAX_OUTCOMES,
                id.seq
            )),
            Seen::First => {
                let out = apply_command(a, *cmd, revision, txns)?;
                a.sessions.record(&id, out.clone(), a.index);
                out
            }
        });
    }
    let (outcome, changes) = a.apply(cmd, *revision + 1)?;
    if !changes.is_empty() {
        *revision += 1;
        let (changes, before): (Vec<_>, Vec<_>) = changes.into_iter().unzip();
        // Each key's record as just written (create revision, version, lease), for
        // record watches: what a read of it returns.
        let after = changes
            .iter()
            .map(|c| {
                let r = a.pending.keys.get(&c.key).and_then(|(_, r)| r.as_ref());
                r.map(|r| After {
                    create_rev: r.create_rev,
                    version: r.version,
                    lease: lease_id_of(r.expires_at_ms).unwrap_or(0),
                })
            })
            .collect();
        let keys = changes.iter().map(|c| c.key.clone());
        txns.push(Arc::new(Undo {
            revision: *revision,
            before: keys.zip(before).collect(),
            after,
            txn: Arc::new(FeedTxn {
                revision: Revision(*revision),
                changes,
            }),
        }));
    }
    Ok(outcome)
}

/// The outcome of an invalid command that reached the log, logged once per replica.
pub(super) fn invalid(cmd: &Command, why: String) -> Outcome {
    tracing::error!(?cmd, %why, "skipping an invalid command in the log");
    Outcome::Invalid(why)
}

/// Applies `entries`: outcomes and events from the applied state (redb's plus pending
/// writes), the writes handed to the writer thread.
///
/// Why a writer thread: inserting into redb and committing took about 80% of an apply,
/// and openraft answers a batch's callers only after its apply, while the next batch
/// waits for their new proposals. Acknowledged writes are durable in the log either
/// way; redb is the log's applied image, replayed from its last durable commit after a
/// crash, as before. Readers see pending writes by waiting for the writer ([`Pending::settle`]).
pub(super) fn apply_batch(
    shared: &Shared,
    entries: Vec<Entry>,
) -> Result<Vec<Outcome>, StorageError> {
    let start = std::time::Instant::now();
    // Held across publish: watch snapshots pin state under the same lock.
    let mut guard = shared.lock();
    let inner = &mut *guard;
    let mut pending = shared.pending.lock();
    if let Some(why) = &pending.failed {
        return Err(wr(WriterFailed(why.clone())));
    }
    // Opened under the pending lock: the writer drops pending records only after
    // committing them, and under that lock, so each key is in one or the other.
    let rtx = shared.db.begin_read().map_err(rd)?;
    let mut revision = inner.revision;
    let mut outcomes = Vec::with_capacity(entries.len());
    let mut txns: Published = Vec::new();
    let mut membership = None;
    let mut applied = None;
    let mut view = View {
        kv: rtx.open_table(KV).map_err(rd)?,
        pending: &mut pending,
        writes: Vec::new(),
        lease_written: false,
        leases: &mut inner.leases,
        now: shared.clock.now(),
        wall_ms: shared.clock.wall_ms(),
        sessions: &mut inner.sessions,
        index: 0,
        objs: &mut inner.objs,
        obj_writes: Vec::new(),
        versions: &mut inner.versions,
        versions_on: false,
        compact: None,
    };
    for e in entries {
        applied = Some(e.log_id);
        view.index = e.log_id.index;
        match e.payload {
            EntryPayload::Blank => outcomes.push(Outcome::Unchanged),
            EntryPayload::Membership(m) => {
                membership = Some(StoredMembership::new(Some(e.log_id), m));
                outcomes.push(Outcome::Unchanged);
            }
            EntryPayload::Normal(cmd) => {
                outcomes.push(apply_command(&mut view, cmd, &mut revision, &mut txns)?);
            }
        }
    }
    let compacted = view.compact.map(|to| to.max(inner.compacted));
    let history_cut = (revision + 1)
        .saturating_sub(shared.history_len as u64)
        .max(compacted.unwrap_or(inner.compacted));
    if let Some(a) = applied {
        shared
            .applied_index
            .fetch_max(a.index, std::sync::atomic::Ordering::Relaxed);
    }
    let work = Work {
        history: txns.clone(),
        history_cut,
        compacted,
        writes: view.writes,
        applied,
        revision,
        membership: membership.clone(),
        sessions: view.sessions.take_dirty(),
        lease_objs: view.obj_writes,
        versions_on: view.versions_on,
    };
    let leases_set = view.lease_written;
    let inline = match &inner.writer {
        Some(Queue::Thread(w)) => match w.send(work) {
            Ok(()) => None,
            Err(_) => return Err(wr(WriterFailed("the writer has stopped".into()))),
        },
        Some(Queue::Inline { .. }) => Some(work),
        None => return Err(wr(WriterFailed("the writer has stopped".into()))),
    };
    pending.queued += 1;
    drop(pending);
    if let (Some(work), Some(Queue::Inline { durable_at })) = (inline, &mut inner.writer) {
        store_works(&shared.db, &shared.pending, vec![work], durable_at);
    }
    inner.revision = revision;
    shared
        .revision_now
        .store(revision, std::sync::atomic::Ordering::Release);
    for undo in txns {
        inner.records.publish(&undo);
        inner.hub.publish(undo.txn.clone());
        inner.history.push_back(undo);
        if inner.history.len() > shared.history_len {
            inner.history.pop_front();
        }
    }
    // Revision `to`'s own change stays, for watches from `to` (etcd keeps it too);
    // the floor refuses reads before it.
    if let Some(to) = compacted {
        while inner.history.front().is_some_and(|u| u.revision < to) {
            inner.history.pop_front();
        }
        inner.compacted = to;
    }
    drop(guard);
    if leases_set {
        shared.ttl_changed.notify_one();
    }
    if let Some(m) = membership {
        shared.membership.send_replace(m);
    }
    shared.metrics.apply.observe(crate::metrics::since(start));
    Ok(outcomes)
}

/// Whether applying `entries` is quick enough to run on the async worker. A thread hop
/// to the blocking pool and back costs ~60 µs here; with redb's writes on the writer
/// thread, a batch of 256 puts applies in about that.
pub(super) fn small(entries: &[Entry]) -> bool {
    let commands: usize = entries
        .iter()
        .map(|e| match &e.payload {
            EntryPayload::Normal(Command::Batch(b)) => b.len(),
            _ => 1,
        })
        .sum();
    commands <= 256
}
