//! Lease deadlines on a monotonic clock.
//!
//! Why not deadlines in the log: a deadline is a reading of some member's wall clock,
//! and members' clocks disagree (a follower 30 s behind would make a 10 s TTL expire at
//! once) or step. The log carries each lease's duration instead; every replica counts
//! it from its own apply of the write, on its own monotonic clock, and only the leader
//! turns a deadline it reached into an `Expire` command. A new leader counts from its
//! own apply, never before the old leader's, so a leader change never expires a key
//! early; it may give a key up to the replication delay more. At open, every lease gets
//! its full TTL again (etcd's rule after a leader change): the time a store was down is
//! not measured, so nothing expires for it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use datasync::Key;

use crate::types::TTL_FLAG;

/// The lease word of `ttl`: rounded up to whole milliseconds, never to zero. TTLs are
/// at most [`datasync::MAX_TTL`], far below the flag bit.
pub(crate) fn word(ttl: Duration) -> u64 {
    let ms = u64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    TTL_FLAG | ms.clamp(1, !TTL_FLAG)
}

/// The TTL a nonzero lease word stands for, counted from now (`wall_ms`, this
/// member's [`Clock::wall_ms`], is read only for an older version's absolute word).
pub(crate) fn ttl_of(word: u64, wall_ms: u64) -> Duration {
    if word & TTL_FLAG != 0 {
        return Duration::from_millis(word & !TTL_FLAG);
    }
    Duration::from_millis(word.saturating_sub(wall_ms).max(1))
}

/// The clocks a store reads: the runtime's monotonic clock (`tokio::time`, so paused or
/// simulated time in a test that pauses or simulates it) and the system's wall clock, both shifted by
/// one offset that tests move to give members clocks that disagree. The store reads
/// time only through this (the wall clock only for lease words older versions wrote),
/// so a test that skews it skews everything the store could measure a TTL with.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    /// The system's monotonic clock.
    pub fn new() -> Self {
        Self::default()
    }

    /// Now, on this clock.
    pub fn now(&self) -> Instant {
        let offset = self.offset_ms.load(Ordering::Relaxed);
        let base = Instant::now();
        let by = Duration::from_millis(offset.unsigned_abs());
        if offset >= 0 {
            base + by
        } else {
            base.checked_sub(by).unwrap_or(base)
        }
    }

    /// Now on this member's wall clock, in Unix milliseconds.
    pub fn wall_ms(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        now.saturating_add(self.offset_ms.load(Ordering::Relaxed))
            .max(0) as u64
    }

    /// Moves this clock forward by `by` (for tests: a member whose clock runs ahead).
    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// Moves this clock back by `by` (for tests: a member whose clock lags).
    pub fn rewind(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.offset_ms.fetch_sub(ms, Ordering::Relaxed);
    }
}

/// A lease object as stored (and in snapshots): its TTL and the log index of its last
/// grant or keep-alive (which `LeaseExpire` names, so it is replicated state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct LeaseObj {
    pub(crate) ttl_ms: u64,
    pub(crate) renewed: u64,
}

/// A lease object as this replica keeps it.
#[derive(Debug)]
struct Obj {
    stored: LeaseObj,
    deadline: Instant,
    keys: BTreeSet<Key>,
}

/// The lease objects (etcd's leases) and their keys, with deadlines on this replica's
/// clock, counted from its apply of the last grant or keep-alive (and from open: the
/// full TTL again, as for per-key TTLs).
#[derive(Debug, Default)]
pub(crate) struct LeaseObjs {
    by_id: std::collections::BTreeMap<u64, Obj>,
    by_deadline: BTreeSet<(Instant, u64)>,
}

impl LeaseObjs {
    /// Sets lease `id` (new, renewed or loaded), keeping its keys.
    pub(crate) fn set(&mut self, id: u64, stored: LeaseObj, now: Instant) {
        let deadline = now + Duration::from_millis(stored.ttl_ms);
        let keys = match self.by_id.remove(&id) {
            Some(old) => {
                self.by_deadline.remove(&(old.deadline, id));
                old.keys
            }
            None => BTreeSet::new(),
        };
        self.by_deadline.insert((deadline, id));
        self.by_id.insert(
            id,
            Obj {
                stored,
                deadline,
                keys,
            },
        );
    }

    /// Lease `id` as stored, if it exists.
    pub(crate) fn get(&self, id: u64) -> Option<LeaseObj> {
        self.by_id.get(&id).map(|o| o.stored)
    }

    /// Removes lease `id`; its keys.
    pub(crate) fn remove(&mut self, id: u64) -> Option<BTreeSet<Key>> {
        let o = self.by_id.remove(&id)?;
        self.by_deadline.remove(&(o.deadline, id));
        Some(o.keys)
    }

    /// `key` is attached to lease `id` (if it exists).
    pub(crate) fn attach(&mut self, id: u64, key: &Key) {
        if let Some(o) = self.by_id.get_mut(&id) {
            o.keys.insert(key.clone());
        }
    }

    /// `key` is no longer attached to lease `id`.
    pub(crate) fn detach(&mut self, id: u64, key: &Key) {
        if let Some(o) = self.by_id.get_mut(&id) {
            o.keys.remove(key);
        }
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.by_deadline.first().map(|(d, _)| *d)
    }

    /// Leases whose deadline is at or before `now`, with their last renewal, at most
    /// `limit`, earliest first.
    pub(crate) fn due(&self, now: Instant, limit: usize) -> Vec<(u64, u64)> {
        self.by_deadline
            .iter()
            .take_while(|(d, _)| *d <= now)
            .take(limit)
            .filter_map(|(_, id)| self.by_id.get(id).map(|o| (*id, o.stored.renewed)))
            .collect()
    }

    /// Lease `id`'s TTL, time left on this replica's clock, and keys.
    pub(crate) fn describe(&self, id: u64, now: Instant) -> Option<(u64, Duration, Vec<Key>)> {
        let o = self.by_id.get(&id)?;
        Some((
            o.stored.ttl_ms,
            o.deadline.saturating_duration_since(now),
            o.keys.iter().cloned().collect(),
        ))
    }

    /// Every lease's id.
    pub(crate) fn ids(&self) -> Vec<u64> {
        self.by_id.keys().copied().collect()
    }
}

/// The deadline of every key with a lease, as this replica counts it.
#[derive(Debug, Default)]
pub(crate) struct Leases {
    by_deadline: BTreeSet<(Instant, Key)>,
    /// Deadline and the mod revision of the version the lease belongs to.
    by_key: HashMap<Key, (Instant, u64)>,
}

impl Leases {
    /// `key`, at `mod_rev`, expires at `deadline` (replacing any earlier lease).
    pub(crate) fn set(&mut self, key: &Key, deadline: Instant, mod_rev: u64) {
        self.clear(key);
        self.by_deadline.insert((deadline, key.clone()));
        self.by_key.insert(key.clone(), (deadline, mod_rev));
    }

    /// `key` has no lease (any more).
    pub(crate) fn clear(&mut self, key: &Key) {
        if let Some((deadline, _)) = self.by_key.remove(key) {
            self.by_deadline.remove(&(deadline, key.clone()));
        }
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.by_deadline.first().map(|(d, _)| *d)
    }

    /// Keys whose deadline is at or before `now`, with their mod revisions, at most
    /// `limit`, earliest first.
    pub(crate) fn due(&self, now: Instant, limit: usize) -> Vec<(String, u64)> {
        self.by_deadline
            .iter()
            .take_while(|(d, _)| *d <= now)
            .take(limit)
            .filter_map(|(_, k)| {
                self.by_key
                    .get(k)
                    .map(|(_, rev)| (k.as_str().to_owned(), *rev))
            })
            .collect()
    }

    /// How many keys have a lease.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> Key {
        Key::new(s).expect("valid key")
    }

    #[test]
    fn lease_words_round_trip_and_never_round_to_zero() {
        assert_eq!(
            ttl_of(word(Duration::from_secs(10)), 0),
            Duration::from_secs(10)
        );
        assert_eq!(
            ttl_of(word(Duration::from_nanos(1)), 0),
            Duration::from_millis(1)
        );
        assert_eq!(
            ttl_of(word(datasync::MAX_TTL), 0),
            datasync::MAX_TTL,
            "the longest TTL fits the word"
        );
        // A legacy absolute deadline in the past leaves the shortest TTL, not none.
        assert_eq!(ttl_of(1, 5_000), Duration::from_millis(1));
        assert_eq!(ttl_of(9_000, 5_000), Duration::from_millis(4_000));
    }

    #[test]
    fn leases_are_replaced_cleared_and_due_in_deadline_order() {
        let clock = Clock::new();
        let t0 = clock.now();
        let mut l = Leases::default();
        l.set(&key("a"), t0 + Duration::from_secs(5), 1);
        l.set(&key("b"), t0 + Duration::from_secs(1), 2);
        l.set(&key("a"), t0 + Duration::from_secs(2), 3);
        assert_eq!(l.len(), 2);
        assert_eq!(l.next(), Some(t0 + Duration::from_secs(1)));
        assert!(l.due(t0, 10).is_empty());
        assert_eq!(
            l.due(t0 + Duration::from_secs(3), 10),
            vec![("b".to_owned(), 2), ("a".to_owned(), 3)]
        );
        assert_eq!(l.due(t0 + Duration::from_secs(3), 1).len(), 1);
        l.clear(&key("b"));
        assert_eq!(
            l.due(t0 + Duration::from_secs(9), 10),
            vec![("a".to_owned(), 3)]
        );
        l.clear(&key("a"));
        assert_eq!(l.next(), None);
    }

    #[test]
    fn a_clock_moves_by_its_offset() {
        let c = Clock::new();
        let skewed = c.clone();
        let before = Instant::now();
        skewed.advance(Duration::from_secs(30));
        assert!(
            c.now() >= before + Duration::from_secs(30),
            "clones share the offset"
        );
        skewed.rewind(Duration::from_secs(60));
        assert!(c.now() <= Instant::now());
    }
}
