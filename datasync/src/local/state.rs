//! The store's state: versioned keys, TTL deadlines and the registrations to feed.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

use tokio::time::Instant;

use crate::transport::feed::{Hub, Txn};
use crate::{
    Key, KeyChange, KeyValue, Op, Prefix, PrefixSet, PrefixValues, Revision, StoreError, Value,
};

#[derive(Debug)]
struct Version {
    revision: Revision,
    /// `None`: deleted at `revision`.
    value: Option<Value>,
}

#[derive(Debug, Default)]
struct History {
    /// Ascending by revision; never empty while in the map.
    versions: Vec<Version>,
    expiry: Option<(Instant, u64)>,
}

impl History {
    fn latest(&self) -> Option<(&Value, Revision)> {
        let v = self.versions.last()?;
        v.value.as_ref().map(|val| (val, v.revision))
    }

    fn at(&self, rev: Revision) -> Option<(&Value, Revision)> {
        let idx = self.versions.partition_point(|v| v.revision <= rev);
        let v = self.versions.get(idx.checked_sub(1)?)?;
        v.value.as_ref().map(|val| (val, v.revision))
    }
}

#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) revision: Revision,
    compacted: Revision,
    /// Every key with a retained version. Point lookups hash: a B-tree search costs a
    /// few dozen string compares, the hot path of every write.
    keys: HashMap<Key, History>,
    /// The same keys in order, for prefix scans; touched only when a key comes or goes.
    order: BTreeSet<Key>,
    /// Every version written, oldest first, for compaction.
    written: VecDeque<(Revision, Key)>,
    /// TTL deadlines; the `u64` makes entries unique.
    expiries: BTreeMap<(Instant, u64), Key>,
    next_expiry_id: u64,
    pub(super) hub: Hub,
}

/// A write to apply in one transaction.
pub(super) enum Mutation {
    Put {
        key: Key,
        value: Value,
        deadline: Option<Instant>,
    },
    Delete(Key),
}

impl State {
    pub(super) fn latest(&self, key: &str) -> Option<KeyValue> {
        let (k, h) = self.keys.get_key_value(key)?;
        let (value, revision) = h.latest()?;
        Some(KeyValue {
            key: k.clone(),
            value: value.clone(),
            revision,
        })
    }

    fn check_read(&self, rev: Option<Revision>) -> Result<Revision, StoreError> {
        let rev = rev.unwrap_or(self.revision);
        if rev > self.revision {
            return Err(StoreError::FutureRevision {
                requested: rev,
                current: self.revision,
            });
        }
        if rev < self.compacted {
            return Err(StoreError::Compacted {
                requested: rev,
                compacted: self.compacted,
            });
        }
        Ok(rev)
    }

    pub(super) fn get(
        &self,
        key: &str,
        rev: Option<Revision>,
    ) -> Result<Option<KeyValue>, StoreError> {
        let rev = self.check_read(rev)?;
        Ok(self.keys.get_key_value(key).and_then(|(k, h)| {
            h.at(rev).map(|(value, revision)| KeyValue {
                key: k.clone(),
                value: value.clone(),
                revision,
            })
        }))
    }

    fn under<'a>(
        &'a self,
        prefix: &'a Prefix,
    ) -> impl Iterator<Item = (&'a Key, &'a History)> + 'a {
        self.order
            .range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
            .take_while(move |k| prefix.matches(k.as_str()))
            .filter_map(|k| self.keys.get(k).map(|h| (k, h)))
    }

    pub(super) fn list(
        &self,
        prefix: &Prefix,
        rev: Option<Revision>,
    ) -> Result<(Revision, Vec<KeyValue>), StoreError> {
        let rev = self.check_read(rev)?;
        let values = self
            .under(prefix)
            .filter_map(|(k, h)| {
                let (value, revision) = if rev == self.revision {
                    h.latest()
                } else {
                    h.at(rev)
                }?;
                Some(KeyValue {
                    key: k.clone(),
                    value: value.clone(),
                    revision,
                })
            })
            .collect();
        Ok((rev, values))
    }

    /// The current values of every prefix of `set`.
    pub(super) fn snapshot(&self, set: &PrefixSet) -> Vec<PrefixValues> {
        set.prefixes()
            .iter()
            .map(|p| PrefixValues {
                prefix: p.clone(),
                values: self.list(p, None).map(|(_, v)| v).unwrap_or_default(),
            })
            .collect()
    }

    pub(super) fn live_keys_under(&self, prefix: &Prefix) -> Vec<Key> {
        self.under(prefix)
            .filter(|(_, h)| h.latest().is_some())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Applies `mutations` as one transaction at the next revision. Deletes of absent keys
    /// change nothing; if nothing changes, no revision is used and `None` is returned.
    /// Returns the revision and the number of keys changed.
    pub(super) fn commit(
        &mut self,
        mutations: Vec<Mutation>,
        history: u64,
    ) -> Option<(Revision, u64)> {
        let revision = self.revision.next();
        let mut changes = Vec::with_capacity(mutations.len());
        for m in mutations {
            match m {
                Mutation::Put {
                    key,
                    value,
                    deadline,
                } => {
                    let h = match self.keys.entry(key.clone()) {
                        Entry::Occupied(e) => e.into_mut(),
                        Entry::Vacant(e) => {
                            self.order.insert(key.clone());
                            e.insert(History::default())
                        }
                    };
                    let prev = h.latest().map(|(v, _)| v.clone());
                    h.versions.push(Version {
                        revision,
                        value: Some(value.clone()),
                    });
                    let old = h.expiry.take();
                    if let Some(d) = deadline {
                        let id = self.next_expiry_id;
                        self.next_expiry_id += 1;
                        h.expiry = Some((d, id));
                        self.expiries.insert((d, id), key.clone());
                    }
                    if let Some(old) = old {
                        self.expiries.remove(&old);
                    }
                    self.written.push_back((revision, key.clone()));
                    changes.push(KeyChange {
                        key,
                        op: Op::Put,
                        value: Some(value),
                        prev,
                    });
                }
                Mutation::Delete(key) => {
                    let Some(h) = self.keys.get_mut(key.as_str()) else {
                        continue;
                    };
                    let Some(prev) = h.latest().map(|(v, _)| v.clone()) else {
                        continue;
                    };
                    h.versions.push(Version {
                        revision,
                        value: None,
                    });
                    if let Some(old) = h.expiry.take() {
                        self.expiries.remove(&old);
                    }
                    self.written.push_back((revision, key.clone()));
                    changes.push(KeyChange {
                        key,
                        op: Op::Delete,
                        value: None,
                        prev: Some(prev),
                    });
                }
            }
        }
        if changes.is_empty() {
            return None;
        }
        changes.sort_by(|a, b| a.key.cmp(&b.key));
        let count = changes.len() as u64;
        self.revision = revision;
        self.hub.publish(Arc::new(Txn { revision, changes }));
        if revision.0 - self.compacted.0 > history.saturating_mul(2) {
            self.compact(Revision(revision.0 - history));
        }
        Some((revision, count))
    }

    /// The transactions after revision `after`, oldest first, rebuilt from the
    /// retained versions (for a watch that resumes from `after`); else the reason of
    /// the resync it gets instead: `StoreReset` past the current revision, `Compacted`
    /// before the oldest revision a read still works at.
    pub(super) fn since(&self, after: Revision) -> Result<VecDeque<Arc<Txn>>, crate::ResyncReason> {
        if after > self.revision {
            return Err(crate::ResyncReason::StoreReset);
        }
        if after < self.compacted {
            return Err(crate::ResyncReason::Compacted);
        }
        let start = self.written.partition_point(|(r, _)| *r <= after);
        // `written` holds each transaction's keys together, in revision order.
        let mut txns: Vec<(Revision, Vec<KeyChange>)> = Vec::new();
        for (revision, key) in self.written.range(start..) {
            // Every version after the compaction is kept, and the newest at or before it.
            let Some(h) = self.keys.get(key.as_str()) else {
                continue;
            };
            let i = h.versions.partition_point(|v| v.revision < *revision);
            let Some(value) = h.versions.get(i).map(|v| v.value.clone()) else {
                continue;
            };
            let prev = i.checked_sub(1).and_then(|j| h.versions[j].value.clone());
            let change = KeyChange {
                key: key.clone(),
                op: if value.is_some() { Op::Put } else { Op::Delete },
                value,
                prev,
            };
            match txns.last_mut() {
                Some((r, changes)) if r == revision => changes.push(change),
                _ => txns.push((*revision, vec![change])),
            }
        }
        Ok(txns
            .into_iter()
            .map(|(revision, mut changes)| {
                changes.sort_by(|a, b| a.key.cmp(&b.key));
                Arc::new(Txn { revision, changes })
            })
            .collect())
    }

    /// Forgets history before `upto`; reads at `upto` and later still work.
    fn compact(&mut self, upto: Revision) {
        while let Some((rev, _)) = self.written.front() {
            if *rev > upto {
                break;
            }
            let Some((_, key)) = self.written.pop_front() else {
                break;
            };
            let Some(h) = self.keys.get_mut(key.as_str()) else {
                continue;
            };
            // Keep the newest version at or before `upto`, and everything after it.
            let keep_from = h
                .versions
                .partition_point(|v| v.revision <= upto)
                .saturating_sub(1);
            h.versions.drain(..keep_from);
            if h.versions.len() == 1
                && h.versions[0].value.is_none()
                && h.versions[0].revision <= upto
            {
                self.keys.remove(key.as_str());
                self.order.remove(key.as_str());
            }
        }
        self.compacted = upto;
    }

    /// The keys whose TTL ran out by `now`.
    pub(super) fn due(&self, now: Instant) -> Vec<Key> {
        self.expiries
            .range(..=(now, u64::MAX))
            .map(|(_, k)| k.clone())
            .collect()
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.expiries.keys().next().map(|(d, _)| *d)
    }
}
