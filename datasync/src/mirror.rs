//! [`Mirror`]: applies a watch stream to an in-memory copy, checking the contract.

use std::collections::BTreeMap;

use crate::{Event, Key, Op, ResyncReason, Revision, Source, Value};

/// A rule of the contract that an applied event broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MirrorError {
    /// A change arrived before any resync of its source.
    #[error("change at {revision} from {from:?} before its first resync")]
    ChangeBeforeResync {
        /// The source.
        from: Source,
        /// The change's revision.
        revision: Revision,
    },
    /// An event's revision did not increase (a duplicate or a reordering).
    #[error("revision went from {previous} to {got} (source {from:?})")]
    RevisionNotIncreasing {
        /// The source.
        from: Source,
        /// The previous event's revision.
        previous: Revision,
        /// This event's revision.
        got: Revision,
    },
    /// A change's previous value disagrees with what this stream delivered before.
    #[error("key {key}: previous value {got:?}, but the stream had {expected:?}")]
    PrevMismatch {
        /// The key.
        key: Key,
        /// What the stream delivered before.
        expected: Option<Value>,
        /// What the change says.
        got: Option<Value>,
    },
    /// A Put without a value, or a Delete with one.
    #[error("key {key}: malformed {op:?} change")]
    Malformed {
        /// The key.
        key: Key,
        /// The operation.
        op: Op,
    },
}

#[derive(Debug, Default)]
struct SourceState {
    revision: Revision,
    values: BTreeMap<Key, (Value, Revision)>,
}

/// The state a consumer builds from one watch stream, kept per source.
///
/// Why `Mirror`: it holds a mirror of the watched keys, as a plugin would, and checks
/// the stream while it builds it. It is the reference consumer and the contract check
/// the conformance suite applies every event to, in one.
///
/// A resync replaces the state of its source only, so one source of a composite never
/// deletes another's keys. Every applied event is checked against the contract: revisions
/// strictly increase per source (except at a `StoreReset` resync: the store went back),
/// no change precedes the first resync, previous values match what this stream
/// delivered.
#[derive(Debug, Default)]
pub struct Mirror {
    sources: BTreeMap<Source, SourceState>,
}

impl Mirror {
    /// An empty mirror.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies `event` (its `Done` is not touched), or says which rule it breaks (the
    /// mirror is then unchanged).
    pub fn apply(&mut self, event: &Event) -> Result<(), MirrorError> {
        match event {
            Event::Resync(r) => {
                let st = self.sources.entry(r.source.clone()).or_default();
                // The one exception to increasing revisions: the store itself went back
                // (restored from a backup), which its resync says.
                if st.revision > r.revision && r.reason != ResyncReason::StoreReset {
                    return Err(MirrorError::RevisionNotIncreasing {
                        from: r.source.clone(),
                        previous: st.revision,
                        got: r.revision,
                    });
                }
                st.revision = r.revision;
                let fresh = r
                    .values()
                    .map(|kv| (kv.key.clone(), (kv.value.clone(), kv.revision)));
                if r.is_partial() {
                    // Only the listed prefixes are replaced.
                    st.values
                        .retain(|k, _| !r.prefixes.iter().any(|g| g.prefix.matches(k.as_str())));
                    st.values.extend(fresh);
                } else {
                    st.values = fresh.collect();
                }
                Ok(())
            }
            Event::Change(c) => {
                let Some(st) = self.sources.get_mut(&c.source) else {
                    return Err(MirrorError::ChangeBeforeResync {
                        from: c.source.clone(),
                        revision: c.revision,
                    });
                };
                if c.revision <= st.revision {
                    return Err(MirrorError::RevisionNotIncreasing {
                        from: c.source.clone(),
                        previous: st.revision,
                        got: c.revision,
                    });
                }
                for kc in &c.changes {
                    let expected = st.values.get(&kc.key).map(|(v, _)| v.clone());
                    if expected != kc.prev {
                        return Err(MirrorError::PrevMismatch {
                            key: kc.key.clone(),
                            expected,
                            got: kc.prev.clone(),
                        });
                    }
                    if (kc.op == Op::Put) != kc.value.is_some() {
                        return Err(MirrorError::Malformed {
                            key: kc.key.clone(),
                            op: kc.op,
                        });
                    }
                }
                for kc in &c.changes {
                    match &kc.value {
                        Some(v) => st.values.insert(kc.key.clone(), (v.clone(), c.revision)),
                        None => st.values.remove(&kc.key),
                    };
                }
                st.revision = c.revision;
                Ok(())
            }
        }
    }

    /// The last applied revision of `source`.
    pub fn revision(&self, source: &str) -> Option<Revision> {
        self.sources.get(source).map(|s| s.revision)
    }

    /// The value of `key` from `source`.
    pub fn get(&self, source: &str, key: &str) -> Option<&Value> {
        self.sources.get(source)?.values.get(key).map(|(v, _)| v)
    }

    /// All values of `source`, sorted by key, with their modification revisions.
    pub fn values(&self, source: &str) -> impl Iterator<Item = (&Key, &Value, Revision)> {
        self.sources
            .get(source)
            .into_iter()
            .flat_map(|s| s.values.iter().map(|(k, (v, r))| (k, v, *r)))
    }

    /// Number of keys held for `source`.
    pub fn len(&self, source: &str) -> usize {
        self.sources.get(source).map_or(0, |s| s.values.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Done, Resync};

    fn resync(rev: u64, reason: ResyncReason) -> Event {
        let (done, _waiter) = Done::channel();
        Event::Resync(Resync::new(
            Source::from(""),
            Revision(rev),
            reason,
            Vec::new(),
            done,
        ))
    }

    #[test]
    fn only_a_store_reset_may_go_back() {
        let mut m = Mirror::new();
        m.apply(&resync(10, ResyncReason::Initial)).unwrap();
        let back = m.apply(&resync(5, ResyncReason::Requested));
        assert!(matches!(
            back,
            Err(MirrorError::RevisionNotIncreasing { .. })
        ));
        m.apply(&resync(5, ResyncReason::StoreReset)).unwrap();
        assert_eq!(m.revision(""), Some(Revision(5)));
    }

    #[test]
    fn a_partial_resync_replaces_only_its_prefixes() {
        use crate::{Key, KeyValue, Prefix, PrefixValues, Value};
        let group = |p: &str, keys: &[&str]| PrefixValues {
            prefix: Prefix::new(p).unwrap(),
            values: keys
                .iter()
                .map(|k| KeyValue {
                    key: Key::new(k).unwrap(),
                    value: Value::from("v"),
                    revision: Revision(1),
                })
                .collect(),
        };
        let event = |rev, reason, groups| {
            let (done, _waiter) = Done::channel();
            Event::Resync(Resync::new(
                Source::from(""),
                Revision(rev),
                reason,
                groups,
                done,
            ))
        };
        let mut m = Mirror::new();
        let first = vec![group("a/", &["a/1", "a/2"]), group("b/", &["b/1"])];
        m.apply(&event(3, ResyncReason::Initial, first)).unwrap();
        let added = vec![group("b/", &["b/2"]), group("c/", &["c/1"])];
        m.apply(&event(4, ResyncReason::PrefixAdded, added))
            .unwrap();
        let keys: Vec<_> = m.values("").map(|(k, _, _)| k.to_string()).collect();
        assert_eq!(keys, ["a/1", "a/2", "b/2", "c/1"]);
        m.apply(&event(5, ResyncReason::Requested, vec![group("c/", &[])]))
            .unwrap();
        assert_eq!(m.len(""), 0, "a full resync replaces everything");
    }
}
