//! Exactly-once client writes: each client's recent outcomes, kept by the state
//! machine (in redb and in snapshots), so a retried write answers its first outcome.
//!
//! Why here: a member or remote client retries a write when the member it asked
//! answers "stopping", which can come after the write was proposed or committed. Only
//! the replicated state knows whether it was applied; so every client write carries a
//! [`RequestId`], and apply looks it up first. Every replica keeps the same table
//! (apply is deterministic, eviction goes by log index), so a retry through another
//! member or after a leader change finds it too.
//!
//! Bounds: a client's outcomes below its `first_unacked` are dropped as each request
//! applies; a client keeps at most [`MAX_OUTCOMES`] requests in flight (our clients
//! wait for room, see `once::Requests`), and a request past that is refused unapplied
//! ([`Seen::Full`]) — never by dropping an outcome above `first_unacked`, which could
//! belong to a request still waiting and make it look answered. At most
//! [`MAX_SESSIONS`] clients are kept, the one whose last request is oldest evicted
//! first. A retry whose outcome was dropped is refused ([`Seen::Forgotten`]), never
//! applied again; a retry from a client evicted since (10,000 newer clients in
//! between) would apply again.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::types::{Outcome, RequestId};

/// Clients whose outcomes are kept.
pub(crate) const MAX_SESSIONS: usize = 10_000;
/// Outcomes kept per client: its requests in flight at most.
pub(crate) const MAX_OUTCOMES: usize = 1024;

/// One client's recent outcomes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Session {
    /// Log index of the client's last request (eviction order, equal on every replica).
    last_index: u64,
    /// Requests below this were answered and their outcomes dropped.
    floor: u64,
    outcomes: BTreeMap<u64, Outcome>,
}

/// What the table knows of a request.
#[derive(Debug, PartialEq)]
pub(crate) enum Seen {
    /// Not applied yet.
    First,
    /// Applied before, with this outcome.
    Repeat(Outcome),
    /// Below what the client acknowledged: applied before, outcome dropped.
    Forgotten,
    /// Not applied yet, but the client has [`MAX_OUTCOMES`] outcomes it has not
    /// acknowledged: refused unapplied (the client may try it again later).
    Full,
}

/// Every client's session, and which changed since they were last stored.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    map: HashMap<u64, Session>,
    dirty: BTreeSet<u64>,
}

impl Sessions {
    /// The table from stored records (`client`, bincode [`Session`]).
    pub(crate) fn load(
        records: impl IntoIterator<Item = (u64, Vec<u8>)>,
    ) -> Result<Self, bincode::Error> {
        let mut map = HashMap::new();
        for (client, bytes) in records {
            map.insert(client, bincode::deserialize(&bytes)?);
        }
        Ok(Sessions {
            map,
            dirty: BTreeSet::new(),
        })
    }

    /// What is known of `id`.
    pub(crate) fn seen(&self, id: &RequestId) -> Seen {
        let Some(s) = self.map.get(&id.client) else {
            return Seen::First;
        };
        match s.outcomes.get(&id.seq) {
            Some(out) => Seen::Repeat(out.clone()),
            None if id.seq < s.floor => Seen::Forgotten,
            // Past the client's window, or more outcomes kept than it may have.
            None if id.seq.saturating_sub(id.first_unacked) >= MAX_OUTCOMES as u64
                || (s.outcomes.len() >= MAX_OUTCOMES
                    && s.outcomes.range(id.first_unacked..).count() >= MAX_OUTCOMES) =>
            {
                Seen::Full
            }
            None => Seen::First,
        }
    }

    /// Records the outcome of `id`, applied at log `index`.
    pub(crate) fn record(&mut self, id: &RequestId, outcome: Outcome, index: u64) {
        let s = self.map.entry(id.client).or_default();
        s.last_index = index;
        s.floor = s.floor.max(id.first_unacked);
        s.outcomes.insert(id.seq, outcome);
        while let Some(e) = s.outcomes.first_entry()
            && *e.key() < s.floor
        {
            e.remove();
        }
        self.dirty.insert(id.client);
        if self.map.len() > MAX_SESSIONS {
            let oldest = self
                .map
                .iter()
                .min_by_key(|(client, s)| (s.last_index, **client))
                .map(|(client, _)| *client);
            if let Some(c) = oldest {
                self.map.remove(&c);
                self.dirty.insert(c);
            }
        }
    }

    /// The sessions changed since the last call, encoded (`None`: evicted).
    pub(crate) fn take_dirty(&mut self) -> Vec<(u64, Option<Vec<u8>>)> {
        std::mem::take(&mut self.dirty)
            .into_iter()
            .map(|c| {
                let bytes = self.map.get(&c).map(encode);
                (c, bytes)
            })
            .collect()
    }
}

fn encode(s: &Session) -> Vec<u8> {
    // A struct of integers and outcomes: bincode cannot fail on it.
    bincode::serialize(s).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(client: u64, seq: u64, first_unacked: u64) -> RequestId {
        RequestId {
            client,
            seq,
            first_unacked,
        }
    }

    fn written(revision: u64) -> Outcome {
        Outcome::Written { revision }
    }

    #[test]
    fn a_repeat_answers_the_first_outcome_until_acknowledged() {
        let mut s = Sessions::default();
        assert_eq!(s.seen(&id(1, 1, 1)), Seen::First);
        s.record(&id(1, 1, 1), written(5), 10);
        s.record(&id(1, 2, 1), written(6), 11);
        assert_eq!(s.seen(&id(1, 1, 1)), Seen::Repeat(written(5)));
        assert_eq!(s.seen(&id(2, 1, 1)), Seen::First, "clients are apart");
        // Request 3 says 1 and 2 were answered: their outcomes go.
        s.record(&id(1, 3, 3), written(7), 12);
        assert_eq!(s.seen(&id(1, 1, 1)), Seen::Forgotten);
        assert_eq!(s.seen(&id(1, 2, 1)), Seen::Forgotten);
        assert_eq!(s.seen(&id(1, 3, 3)), Seen::Repeat(written(7)));
        // Stored and loaded, the table answers the same.
        let dirty = s.take_dirty();
        assert_eq!(dirty.len(), 1);
        let loaded =
            Sessions::load(dirty.into_iter().map(|(c, b)| (c, b.expect("kept")))).expect("loads");
        assert_eq!(loaded.seen(&id(1, 3, 3)), Seen::Repeat(written(7)));
        assert_eq!(loaded.seen(&id(1, 2, 3)), Seen::Forgotten);
    }

    #[test]
    fn outcomes_and_sessions_are_bounded() {
        let mut s = Sessions::default();
        // Request 0 waits (its answer is not in) while the rest of the window applies:
        // a request past the window is refused unapplied, and request 0 still applies
        // when it arrives.
        let max = MAX_OUTCOMES as u64;
        for seq in 1..max {
            assert_eq!(s.seen(&id(1, seq, 0)), Seen::First);
            s.record(&id(1, seq, 0), written(seq), seq);
        }
        assert_eq!(s.seen(&id(1, max, 0)), Seen::Full);
        assert_eq!(
            s.seen(&id(1, 0, 0)),
            Seen::First,
            "a waiting request is not lost"
        );
        s.record(&id(1, 0, 0), written(0), 2000);
        // Once the client acknowledges them, there is room again.
        let next = id(1, max, max);
        assert_eq!(s.seen(&next), Seen::First);
        s.record(&next, written(1), 2001);
        assert_eq!(s.map[&1].outcomes.len(), 1);
        assert_eq!(s.seen(&id(1, 0, 0)), Seen::Forgotten);
        for client in 2..(MAX_SESSIONS as u64 + 2) {
            s.record(&id(client, 0, 0), written(client), 100_000 + client);
        }
        assert_eq!(s.map.len(), MAX_SESSIONS);
        assert!(
            !s.map.contains_key(&1),
            "the client with the oldest request goes"
        );
        let dirty = s.take_dirty();
        assert!(
            dirty.contains(&(1, None)),
            "an eviction is stored as a removal"
        );
    }
}
