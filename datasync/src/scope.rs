//! What a live registration watches: the prefixes asked for, the ones owed a resync,
//! and the ones its stream carries (pure logic, behind the registration's lock).
//!
//! Why three sets: adding a prefix is served by the transport later (a resync of the
//! added prefix, in order with the changes), and removing one takes effect at once.
//! `carried` is what the consumer's state is consistent for: it grows only when a
//! resync covering a prefix reaches the consumer, and shrinks at once on a removal. The
//! [`Watch`](crate::Watch) drops every change outside it, so a transport that still
//! follows a removed prefix, or already follows an added one before its resync, never
//! shows the consumer a change it has no state for.

use crate::{Event, Prefix, PrefixSet, PrefixValues, ResyncReason};

#[derive(Debug)]
pub(crate) struct Scope {
    /// As asked, in order, without duplicates.
    asked: Vec<Prefix>,
    /// `asked`, normalized.
    set: PrefixSet,
    /// Prefixes of `set` the transport owes a resync of (added since it last looked).
    owed: PrefixSet,
    /// What the stream's events carry to the consumer.
    carried: PrefixSet,
    /// `set` changed since the transport last took it.
    dirty: bool,
}

impl Scope {
    pub(crate) fn new(prefixes: &[Prefix]) -> Scope {
        let mut asked: Vec<Prefix> = Vec::with_capacity(prefixes.len());
        for p in prefixes {
            if !asked.contains(p) {
                asked.push(p.clone());
            }
        }
        let set = PrefixSet::new(asked.iter().cloned());
        Scope {
            asked,
            carried: set.clone(),
            set,
            owed: PrefixSet::default(),
            dirty: false,
        }
    }

    pub(crate) fn set(&self) -> &PrefixSet {
        &self.set
    }

    /// Adds `p`; false if it was asked for already.
    pub(crate) fn add(&mut self, p: Prefix) -> bool {
        if self.asked.contains(&p) {
            return false;
        }
        self.asked.push(p.clone());
        self.set = PrefixSet::new(self.asked.iter().cloned());
        self.dirty = true;
        // Already carried (under a wider prefix): nothing to read.
        if !self.carried.covers(&p) {
            self.owed = self.owed.union(&PrefixSet::new([p]));
        }
        true
    }

    /// Removes `p`; false if it was not asked for.
    pub(crate) fn remove(&mut self, p: &Prefix) -> bool {
        let Some(i) = self.asked.iter().position(|a| a == p) else {
            return false;
        };
        self.asked.remove(i);
        self.set = PrefixSet::new(self.asked.iter().cloned());
        self.dirty = true;
        // What stays asked under a removed prefix stays carried (or owed): the consumer's
        // state for it was and is consistent.
        self.carried = self.carried.intersect(&self.set);
        self.owed = self.owed.intersect(&self.set);
        true
    }

    pub(crate) fn owes(&self) -> bool {
        !self.owed.is_empty()
    }

    /// Whether the set changed since the transport last took it.
    pub(crate) fn dirty(&self) -> bool {
        self.dirty
    }

    /// For a resync of the added prefixes only: the whole set, and the prefixes owed.
    pub(crate) fn take_owed(&mut self) -> Option<(PrefixSet, PrefixSet)> {
        if self.owed.is_empty() {
            return None;
        }
        self.dirty = false;
        Some((self.set.clone(), std::mem::take(&mut self.owed)))
    }

    /// For a full resync: the set, if it changed since the transport last took it.
    pub(crate) fn take_set(&mut self) -> Option<PrefixSet> {
        self.owed = PrefixSet::default();
        std::mem::take(&mut self.dirty).then(|| self.set.clone())
    }

    /// Cuts `event` down to what the consumer watches now; `None` when nothing is left
    /// of a change.
    pub(crate) fn restrict(&mut self, event: Event) -> Option<Event> {
        match event {
            Event::Resync(mut r) => {
                let listed = PrefixSet::new(r.prefixes.iter().map(|g| g.prefix.clone()));
                let now = listed.intersect(&self.set);
                self.carried = if r.reason == ResyncReason::PrefixAdded {
                    self.carried.union(&now)
                } else {
                    now
                };
                r.prefixes = restrict_groups(std::mem::take(&mut r.prefixes), &self.set);
                Some(Event::Resync(r))
            }
            Event::Change(mut c) => {
                c.changes.retain(|kc| self.carried.matches(kc.key.as_str()));
                if c.changes.is_empty() {
                    // Nothing the consumer watches: answered here.
                    c.done.ok();
                    None
                } else {
                    Some(Event::Change(c))
                }
            }
        }
    }
}

/// Keeps what `set` matches of sorted groups, splitting a group whose prefix is wider
/// than the set's prefixes under it.
fn restrict_groups(groups: Vec<PrefixValues>, set: &PrefixSet) -> Vec<PrefixValues> {
    let mut out = Vec::with_capacity(groups.len());
    for g in groups {
        if set.covers(&g.prefix) {
            out.push(g);
            continue;
        }
        for q in set.prefixes().iter().filter(|q| g.prefix.covers(q)) {
            out.push(PrefixValues {
                prefix: q.clone(),
                values: g
                    .values
                    .iter()
                    .filter(|kv| q.matches(kv.key.as_str()))
                    .cloned()
                    .collect(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Change, Done, Key, KeyChange, KeyValue, Resync, Revision, Source, Value};

    fn p(s: &str) -> Prefix {
        Prefix::new(s).unwrap()
    }

    fn set(ps: &[&str]) -> PrefixSet {
        PrefixSet::new(ps.iter().map(|s| p(s)))
    }

    fn kv(k: &str) -> KeyValue {
        KeyValue {
            key: Key::new(k).unwrap(),
            value: Value::from("v"),
            revision: Revision(1),
        }
    }

    fn resync(reason: ResyncReason, groups: &[(&str, &[&str])]) -> Event {
        let prefixes = groups
            .iter()
            .map(|(g, keys)| PrefixValues {
                prefix: p(g),
                values: keys.iter().map(|k| kv(k)).collect(),
            })
            .collect();
        let (done, _) = Done::channel();
        Event::Resync(Resync::new(
            Source::from(""),
            Revision(5),
            reason,
            prefixes,
            done,
        ))
    }

    fn change(keys: &[&str]) -> Event {
        let changes = keys
            .iter()
            .map(|k| KeyChange {
                key: Key::new(k).unwrap(),
                op: crate::Op::Put,
                value: Some(Value::from("v")),
                prev: None,
            })
            .collect();
        let (done, _) = Done::channel();
        Event::Change(Change::new(Source::from(""), Revision(6), changes, done))
    }

    fn keys(ev: &Option<Event>) -> Vec<String> {
        match ev {
            Some(Event::Change(c)) => c.changes.iter().map(|c| c.key.to_string()).collect(),
            Some(Event::Resync(r)) => r.values().map(|kv| kv.key.to_string()).collect(),
            None => Vec::new(),
        }
    }

    #[test]
    fn sets_intersect_and_unite_by_the_keys_they_match() {
        assert_eq!(
            set(&["a/", "b/x"]).intersect(&set(&["a/b/", "b/"])),
            set(&["a/b/", "b/x"])
        );
        assert_eq!(set(&["a/"]).intersect(&set(&["b/"])), set(&[]));
        assert_eq!(
            set(&["a/b/"]).union(&set(&["a/", "c/"])),
            set(&["a/", "c/"])
        );
        assert!(set(&["a/"]).covers(&p("a/b")) && !set(&["a/b"]).covers(&p("a/")));
    }

    #[test]
    fn an_added_prefix_is_owed_until_taken_and_carried_once_its_resync_passes() {
        let mut s = Scope::new(&[p("a/")]);
        assert!(!s.add(p("a/")), "asked already");
        assert!(s.add(p("a/x/")) && !s.owes(), "covered: nothing to read");
        assert!(s.add(p("b/")) && s.owes());
        // Changes under b/ before its resync are dropped.
        assert_eq!(keys(&s.restrict(change(&["a/1", "b/1"]))), ["a/1"]);
        assert!(s.restrict(change(&["b/1"])).is_none());
        let (all, owed) = s.take_owed().unwrap();
        assert_eq!((all, owed), (set(&["a/", "b/"]), set(&["b/"])));
        assert!(s.take_owed().is_none() && s.take_set().is_none());
        s.restrict(resync(ResyncReason::PrefixAdded, &[("b/", &["b/1"])]));
        assert_eq!(keys(&s.restrict(change(&["a/1", "b/1"]))), ["a/1", "b/1"]);
    }

    #[test]
    fn a_removed_prefix_stops_at_once_and_what_it_covered_stays() {
        let mut s = Scope::new(&[p("a/"), p("a/b/"), p("c/")]);
        assert!(!s.remove(&p("x/")));
        assert!(s.remove(&p("a/")) && !s.owes());
        assert_eq!(s.set(), &set(&["a/b/", "c/"]));
        assert_eq!(
            keys(&s.restrict(change(&["a/1", "a/b/1", "c/1"]))),
            ["a/b/1", "c/1"]
        );
        // A full resync read before the removal is cut to what is watched now.
        let r = s.restrict(resync(
            ResyncReason::Overflow,
            &[("a/", &["a/1", "a/b/1", "a/b/2"]), ("c/", &["c/1"])],
        ));
        let Some(Event::Resync(r)) = &r else { panic!() };
        let groups: Vec<_> = r.prefixes.iter().map(|g| g.prefix.to_string()).collect();
        assert_eq!(groups, ["a/b/", "c/"]);
        assert_eq!(r.len(), 3);
        assert_eq!(s.take_set(), Some(set(&["a/b/", "c/"])));
    }

    #[test]
    fn removing_a_wide_prefix_that_was_owed_leaves_the_narrow_one_owed() {
        let mut s = Scope::new(&[]);
        s.add(p("a/"));
        s.add(p("a/b/"));
        assert_eq!(s.owed, set(&["a/"]));
        s.remove(&p("a/"));
        assert_eq!(s.take_owed().map(|o| o.1), Some(set(&["a/b/"])));
        // Re-adding a removed prefix owes it again; a full resync pays every debt.
        s.add(p("z/"));
        s.remove(&p("z/"));
        s.add(p("z/"));
        assert!(s.owes());
        assert_eq!(s.take_set(), Some(set(&["a/b/", "z/"])));
        assert!(!s.owes());
        // The full resync (listing z/) makes z/ carried.
        s.restrict(resync(
            ResyncReason::Requested,
            &[("a/b/", &[]), ("z/", &["z/1"])],
        ));
        assert_eq!(keys(&s.restrict(change(&["z/1"]))), ["z/1"]);
    }
}
