//! Reads of the state machine: current and past revisions, listings (split scans),
//! the state hash, and resync snapshots for watch streams.

use std::collections::BTreeMap;
use std::sync::Mutex;

use datasync::transport::feed::{Feed, Snapshots};
use datasync::{Key, KeyValue, Prefix, PrefixValues, Revision, StoreError, Value};
use redb::{ReadTransaction, ReadableDatabase, ReadableTable};

use crate::records::{KeyRange, RangeEnd, Record};
use crate::storage::tables::{CLIENTS, KV, LEASE_OBJS, SM_META, Stored};

use super::*;

impl Shared {
    /// Reads `key` at the current revision, without holding up applies: once the
    /// writer has stored everything applied before the call, redb's latest state holds
    /// every write acknowledged before it.
    pub(crate) async fn get_current(&self, key: &Key) -> Result<Option<KeyValue>, StoreError> {
        self.pending.caught_up().await?;
        let tx = self.db.begin_read().map_err(read_failed)?;
        let t = tx.open_table(KV).map_err(read_failed)?;
        t.get(key.as_str())
            .map_err(read_failed)?
            .map(|v| stored_kv(key.as_str(), v.value()))
            .transpose()
    }

    /// Reads `key`, at the current revision or at `at`.
    pub(crate) fn get(
        &self,
        key: &Key,
        at: Option<Revision>,
    ) -> Result<Option<KeyValue>, StoreError> {
        let (tx, undo) = self.pin_at(at)?;
        let t = tx.open_table(KV).map_err(read_failed)?;
        let mut cur = match t.get(key.as_str()).map_err(read_failed)? {
            Some(v) => Some(decoded(v.value())?),
            None => None,
        };
        for before in undo.iter().rev() {
            if let Some((_, b)) = before.iter().find(|(k, _)| k == key) {
                cur = b.clone();
            }
        }
        Ok(cur.map(|s| KeyValue {
            key: key.clone(),
            value: s.value,
            revision: Revision(s.mod_rev),
        }))
    }

    /// Lists `prefix`, at the current revision or at `at`.
    pub(crate) fn list(
        &self,
        prefix: &Prefix,
        at: Option<Revision>,
    ) -> Result<(Revision, Vec<KeyValue>), StoreError> {
        let (tx, undo) = self.pin_at(at)?;
        let mut values = scan(&tx, prefix)?;
        let rev = at.map_or_else(|| undo_base(&tx), Ok)?;
        if !undo.is_empty() {
            let mut map: BTreeMap<Key, (Value, u64)> = values
                .into_iter()
                .map(|kv| (kv.key, (kv.value, kv.revision.0)))
                .collect();
            for before in undo.iter().rev() {
                for (k, before) in before {
                    if !prefix.matches(k.as_str()) {
                        continue;
                    }
                    match before {
                        Some(b) => map.insert(k.clone(), (b.value.clone(), b.mod_rev)),
                        None => map.remove(k),
                    };
                }
            }
            values = map
                .into_iter()
                .map(|(key, (value, r))| KeyValue {
                    key,
                    value,
                    revision: Revision(r),
                })
                .collect();
        }
        Ok((rev, values))
    }

    /// The records in `range`, at the current revision or at `at`, in key order.
    pub(crate) fn range(
        &self,
        range: &KeyRange,
        at: Option<Revision>,
    ) -> Result<(Revision, Vec<Record>), StoreError> {
        let (tx, undo) = self.pin_at(at)?;
        let rev = at.map_or_else(|| undo_base(&tx), Ok)?;
        let t = tx.open_table(KV).map_err(read_failed)?;
        let mut map: BTreeMap<String, Stored> = BTreeMap::new();
        let start = range.start.as_str();
        let items = match &range.end {
            RangeEnd::Single => {
                if let Some(v) = t.get(start).map_err(read_failed)? {
                    map.insert(start.to_owned(), decoded(v.value())?);
                }
                None
            }
            RangeEnd::Before(end) if end.as_str() <= start => None,
            RangeEnd::Before(end) => Some(t.range::<&str>(start..end.as_str())),
            RangeEnd::Unbounded => Some(t.range::<&str>(start..)),
        };
        if let Some(items) = items {
            for item in items.map_err(read_failed)? {
                let (k, v) = item.map_err(read_failed)?;
                map.insert(k.value().to_owned(), decoded(v.value())?);
            }
        }
        for before in undo.iter().rev() {
            for (k, before) in before {
                if !range.contains(k.as_str()) {
                    continue;
                }
                match before {
                    Some(b) => map.insert(k.as_str().to_owned(), b.clone()),
                    None => map.remove(k.as_str()),
                };
            }
        }
        let records = map
            .into_iter()
            .map(|(k, s)| {
                Ok(Record {
                    key: Key::from_stored(&k)
                        .map_err(|e| StoreError::Corrupted(format!("stored key {k:?}: {e}")))?,
                    value: s.value,
                    create_revision: Revision(s.create_rev),
                    mod_revision: Revision(s.mod_rev),
                    version: s.version,
                    lease: crate::records::lease_id_of(s.expires_at_ms).unwrap_or(0),
                })
            })
            .collect::<Result<_, StoreError>>()?;
        Ok((rev, records))
    }

    /// The oldest revision a read can still be at: the history's reach.
    pub(crate) fn oldest_readable(&self) -> u64 {
        self.lock().oldest_readable()
    }

    /// The oldest revision a watch can start from.
    pub(crate) fn oldest_watchable(&self) -> u64 {
        self.lock().oldest_watchable()
    }

    /// Pins the current state and the undo records needed to go back to `at`.
    fn pin_at(&self, at: Option<Revision>) -> Result<(ReadTransaction, Vec<Before>), StoreError> {
        let inner = self.lock();
        let (tx, current) = self.pin(&inner)?;
        let Some(Revision(at)) = at else {
            return Ok((tx, Vec::new()));
        };
        if at > current {
            return Err(StoreError::FutureRevision {
                requested: Revision(at),
                current: Revision(current),
            });
        }
        let oldest = inner.oldest_readable();
        if at < oldest {
            return Err(StoreError::Compacted {
                requested: Revision(at),
                compacted: Revision(oldest),
            });
        }
        let undo = inner
            .history
            .iter()
            .filter(|u| u.revision > at)
            .map(|u| u.before.clone())
            .collect();
        Ok((tx, undo))
    }

    /// A hash of the whole key space (keys, values, revisions): equal on replicas that
    /// applied the same log. FNV-1a, 64 bits.
    pub(crate) fn state_hash(&self) -> Result<u64, StoreError> {
        self.hash(true)
    }

    /// [`state_hash`](Self::state_hash) of the keys alone, without client sessions.
    pub(crate) fn data_hash(&self) -> Result<u64, StoreError> {
        self.hash(false)
    }

    fn hash(&self, sessions: bool) -> Result<u64, StoreError> {
        self.settle()?;
        let tx = self.db.begin_read().map_err(read_failed)?;
        let t = tx.open_table(KV).map_err(read_failed)?;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for b in bytes.iter().chain(&(bytes.len() as u64).to_le_bytes()) {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        for item in t.iter().map_err(read_failed)? {
            let (k, v) = item.map_err(read_failed)?;
            feed(k.value().as_bytes());
            feed(v.value());
        }
        let meta = tx.open_table(SM_META).map_err(read_failed)?;
        let versions = meta
            .get("versions")
            .map_err(read_failed)?
            .is_some_and(|v| bincode::deserialize::<bool>(v.value()).unwrap_or(false));
        feed(&[u8::from(versions)]);
        // Lease objects are data: a replica without one would keep its keys forever.
        let objs = tx.open_table(LEASE_OBJS).map_err(read_failed)?;
        for item in objs.iter().map_err(read_failed)? {
            let (k, v) = item.map_err(read_failed)?;
            feed(&k.value().to_le_bytes());
            feed(v.value());
        }
        if !sessions {
            return Ok(h);
        }
        // Client sessions are replicated state too: a replica that lost them would
        // apply a retried write again.
        let clients = tx.open_table(CLIENTS).map_err(read_failed)?;
        for item in clients.iter().map_err(read_failed)? {
            let (k, v) = item.map_err(read_failed)?;
            feed(&k.value().to_le_bytes());
            feed(v.value());
        }
        Ok(h)
    }

    /// The earliest deadline of a key's TTL or a lease object, if any, and now on the
    /// same clock.
    pub(crate) fn next_expiry(&self) -> (Option<tokio::time::Instant>, tokio::time::Instant) {
        let inner = self.lock();
        let next = match (inner.leases.next(), inner.objs.next()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        (next, self.clock.now())
    }

    /// Lease objects that ran out by `now`, with their last renewal (at most `limit`).
    pub(crate) fn due_leases(&self, now: tokio::time::Instant, limit: usize) -> Vec<(u64, u64)> {
        self.lock().objs.due(now, limit)
    }

    /// Lease object `id`'s TTL in milliseconds, time left on this member's clock, and
    /// its keys.
    pub(crate) fn lease_info(&self, id: u64) -> Option<(u64, std::time::Duration, Vec<Key>)> {
        let now = self.clock.now();
        self.lock().objs.describe(id, now)
    }

    /// Whether records count versions yet.
    pub(crate) fn versions(&self) -> bool {
        self.lock().versions
    }

    /// Every lease object's id.
    pub(crate) fn lease_ids(&self) -> Vec<u64> {
        self.lock().objs.ids()
    }

    /// Keys whose lease ran out by `now`, with their mod revisions (at most `limit`).
    pub(crate) fn due(&self, now: tokio::time::Instant, limit: usize) -> Vec<(String, u64)> {
        self.lock().leases.due(now, limit)
    }
}

/// Listings longer than this are read from both ends at once, on two threads.
pub(super) const SPLIT_AFTER: usize = 4096;
/// How often (in keys) each end of a split scan checks whether the two have met.
pub(super) const MEET_EVERY: usize = 256;

fn decoded(v: &[u8]) -> Result<Stored, StoreError> {
    Stored::decode(v).map_err(|e| StoreError::Corrupted(e.to_string()))
}

pub(super) fn stored_kv(k: &str, v: &[u8]) -> Result<KeyValue, StoreError> {
    let s = decoded(v)?;
    Ok(KeyValue {
        key: Key::from_stored(k)
            .map_err(|e| StoreError::Corrupted(format!("stored key {k:?}: {e}")))?,
        value: s.value,
        revision: Revision(s.mod_rev),
    })
}

pub(super) type Item<'a> = Result<
    (
        redb::AccessGuard<'a, &'static str>,
        redb::AccessGuard<'a, &'static [u8]>,
    ),
    redb::StorageError,
>;

/// One end of a split scan (`side` 0 forward, 1 backward): reads `items` into `out`
/// until they run out or, checked every [`MEET_EVERY`] keys, this end has reached the
/// last key the other end published.
pub(super) fn read_until_met<'a>(
    items: impl Iterator<Item = Item<'a>>,
    out: &mut Vec<KeyValue>,
    met: &Mutex<[Option<Key>; 2]>,
    side: usize,
    prefix: &Prefix,
) -> Result<(), StoreError> {
    for (n, item) in items.enumerate() {
        let (k, v) = item.map_err(read_failed)?;
        if !prefix.matches(k.value()) {
            continue;
        }
        out.push(stored_kv(k.value(), v.value())?);
        if (n + 1) % MEET_EVERY == 0 {
            let mut m = met.lock().unwrap_or_else(|e| e.into_inner());
            m[side] = out.last().map(|kv| kv.key.clone());
            if let [Some(f), Some(b)] = &*m
                && f >= b
            {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Every value under `prefix`, in key order.
///
/// Each key is checked against the prefix as well as bounded by the range: the range is
/// only as right as [`Prefix::range_end`], and a key outside the prefix in a listing or
/// a resync would be a phantom that never gets an update.
///
/// Why two threads for long listings: most of a long scan is redb fetching pages its
/// cache does not hold, one read and one allocation at a time, and a cache that holds
/// a large prefix would cost its size in resident memory. Reading from both ends of the
/// range at once, on two cores, halves that time; the two meet in the middle.
pub(super) fn scan(tx: &ReadTransaction, prefix: &Prefix) -> Result<Vec<KeyValue>, StoreError> {
    let t = tx.open_table(KV).map_err(read_failed)?;
    let end = prefix.range_end();
    let range = |t: &redb::ReadOnlyTable<&'static str, &'static [u8]>| match &end {
        Some(e) => t.range::<&str>(prefix.as_str()..e.as_str()),
        None => t.range::<&str>(prefix.as_str()..),
    };
    let mut fwd = range(&t).map_err(read_failed)?;
    let mut out = Vec::new();
    for item in fwd.by_ref() {
        let (k, v) = item.map_err(read_failed)?;
        if !prefix.matches(k.value()) {
            continue;
        }
        out.push(stored_kv(k.value(), v.value())?);
        if out.len() == SPLIT_AFTER {
            break;
        }
    }
    if out.len() < SPLIT_AFTER
        || crate::rt::inline()
        || std::thread::available_parallelism().map_or(1, |n| n.get()) < 2
    {
        return Ok(out);
    }
    // The last key each end has read (forward, backward).
    let met = Mutex::new([None, None]);
    let back = std::thread::scope(|scope| {
        let helper = scope.spawn(|| -> Result<Vec<KeyValue>, StoreError> {
            let t = tx.open_table(KV).map_err(read_failed)?;
            let mut back = Vec::new();
            read_until_met(
                range(&t).map_err(read_failed)?.rev(),
                &mut back,
                &met,
                1,
                prefix,
            )?;
            Ok(back)
        });
        read_until_met(fwd, &mut out, &met, 0, prefix)?;
        helper
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })?;
    // `out` holds the range from its start, `back` from its end (descending); together
    // they cover it, overlapping where they met.
    if let Some(low) = back.last() {
        let cut = out.partition_point(|kv| kv.key < low.key);
        out.truncate(cut);
    }
    out.extend(back.into_iter().rev());
    Ok(out)
}

/// Resync snapshots for watch streams. Weak: a watch must not keep a stopped store's
/// files open; once the store is gone its hub drops and the stream reports `Stopped`.
#[derive(Debug, Clone)]
pub(crate) struct RaftSnapshots(pub(crate) std::sync::Weak<Shared>);

impl Snapshots for RaftSnapshots {
    fn resnapshot(&self, feed: &mut Feed) -> Result<(Revision, Vec<PrefixValues>), StoreError> {
        let shared = self.0.upgrade().ok_or(StoreError::Stopped)?;
        let (tx, rev) = {
            let mut inner = shared.lock();
            feed.rearm(&mut inner.hub);
            shared.pin(&inner)?
        };
        // Read outside the lock: the read transaction is a consistent snapshot.
        Ok((Revision(rev), Shared::read_prefixes(&tx, feed.prefixes())?))
    }

    fn extend(&self, feed: &mut Feed) -> Result<Option<(Revision, Vec<PrefixValues>)>, StoreError> {
        let shared = self.0.upgrade().ok_or(StoreError::Stopped)?;
        let (tx, rev, added) = {
            let mut inner = shared.lock();
            let Some(added) = feed.extend(&mut inner.hub) else {
                return Ok(None);
            };
            let (tx, rev) = shared.pin(&inner)?;
            (tx, rev, added)
        };
        Ok(Some((Revision(rev), Shared::read_prefixes(&tx, &added)?)))
    }
}
