//! A linearizability checker for a store's keys, each a register with a revision.
//!
//! Clients record each call as it starts and ends ([`Recorder`]); [`check`] then asks
//! whether some order of the calls, consistent with real time (a call that ended
//! before another started comes first), explains every outcome on a model store.
//!
//! Keys are independent registers, so the history is split by key and each part is
//! checked alone (linearizability is compositional). Each part is searched with the
//! Wing–Gong–Lowe algorithm, as in Porcupine and Knossos: linearize a call whose
//! start precedes every pending end, backtrack when stuck, and never revisit a
//! (linearized set, model state) pair.
//!
//! A call whose outcome is unknown (an error after the request may have been sent)
//! may take effect at any time after it started, or never: it is given no end, so it
//! can always be placed last, where it changes nothing that is checked.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::{
    CasOutcome, DeleteOptions, Expect, Key, PutOptions, ReadOptions, Revision, StoreError, Value,
    Writer,
};

/// An operation on one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Put a value.
    Put(Value),
    /// Read the key (linearizably).
    Get,
    /// Compare-and-swap.
    Cas(Expect, Value),
    /// Delete the key.
    Delete,
}

/// What an operation returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A put, committed at this revision.
    Put(Revision),
    /// A read: the value and its mod revision, or nothing.
    Get(Option<(Value, Revision)>),
    /// A compare-and-swap: swapped at this revision, or `None` on a conflict.
    Cas(Option<Revision>),
    /// A delete: whether the key existed.
    Delete(bool),
    /// Not known: the call failed after it may have reached the store.
    Unknown,
}

/// One recorded call.
#[derive(Debug, Clone)]
pub struct Call {
    /// Who made it (for reports).
    pub client: usize,
    /// The key.
    pub key: Key,
    /// What was asked.
    pub op: Op,
    /// What came back.
    pub outcome: Outcome,
    /// When it started, in nanoseconds since the recorder was made.
    pub start: u64,
    /// When it ended; `None` when the outcome is unknown.
    pub end: Option<u64>,
}

/// Records calls from many clients at once. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Recorder {
    epoch: Instant,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            epoch: Instant::now(),
            calls: Arc::default(),
        }
    }
}

impl Recorder {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Nanoseconds since the recorder was made: take it before a call starts.
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Records one call of `client`: `op` on `key`, started at `start` (from
    /// [`now`](Self::now)) and ending now with `outcome`.
    pub fn record(&self, client: usize, key: Key, op: Op, start: u64, outcome: Outcome) {
        let end = (outcome != Outcome::Unknown).then(|| self.now());
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Call {
                client,
                key,
                op,
                outcome,
                start,
                end,
            });
    }

    /// Runs `op` on `key` against `store` and records it. Reads are linearizable; a
    /// write that fails is recorded with an unknown outcome, a read that fails not at
    /// all (it changed nothing). Returns the outcome.
    pub async fn run<W: Writer + ?Sized>(
        &self,
        store: &W,
        client: usize,
        key: &Key,
        op: Op,
    ) -> Outcome {
        let start = self.now();
        let outcome = match &op {
            Op::Put(v) => store
                .put(key, v.clone(), PutOptions::new())
                .await
                .map(Outcome::Put),
            Op::Get => store
                .get(key, ReadOptions::new())
                .await
                .map(|kv| Outcome::Get(kv.map(|kv| (kv.value, kv.revision)))),
            Op::Cas(expect, v) => store
                .compare_and_swap(key, *expect, v.clone(), PutOptions::new())
                .await
                .map(|o| {
                    Outcome::Cas(match o {
                        CasOutcome::Swapped(r) => Some(r),
                        CasOutcome::Conflict(_) => None,
                    })
                }),
            Op::Delete => store
                .delete(key, DeleteOptions::new())
                .await
                .map(|d| Outcome::Delete(d.count > 0)),
        };
        let outcome = match outcome {
            Ok(o) => o,
            Err(_) if op == Op::Get => return Outcome::Unknown,
            Err(StoreError::InvalidKey(_)) => panic!("the history uses valid keys"),
            Err(_) => Outcome::Unknown,
        };
        self.record(client, key.clone(), op, start, outcome.clone());
        outcome
    }

    /// The calls recorded so far.
    pub fn history(&self) -> Vec<Call> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A history that no order explains.
#[derive(Debug, Clone)]
pub struct Violation {
    /// The key whose calls cannot be linearized.
    pub key: Key,
    /// A call that ended before it could be placed, after the longest explainable
    /// prefix (the likeliest culprit, or the call it contradicts).
    pub stuck: Call,
    /// How many of the key's calls were placed at most.
    pub placed: usize,
    /// How many calls the key has.
    pub calls: usize,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "not linearizable: key {} ({} calls, at most {} placed); cannot place client {}'s \
             {:?} -> {:?} (start {} ns, end {:?})",
            self.key.as_str(),
            self.calls,
            self.placed,
            self.stuck.client,
            self.stuck.op,
            self.stuck.outcome,
            self.stuck.start,
            self.stuck.end
        )
    }
}

/// Checks a history; `Err` names a key whose calls no real-time order explains.
pub fn check(history: &[Call]) -> Result<(), Box<Violation>> {
    let mut by_key: BTreeMap<&Key, Vec<&Call>> = BTreeMap::new();
    for call in history {
        by_key.entry(&call.key).or_default().push(call);
    }
    for (key, calls) in by_key {
        check_key(&calls).map_err(|(stuck, placed)| {
            Box::new(Violation {
                key: key.clone(),
                stuck: stuck.clone(),
                placed,
                calls: calls.len(),
            })
        })?;
    }
    Ok(())
}

/// The model of one key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
struct Register {
    /// The value, and its mod revision unless an unknown-outcome write set it.
    value: Option<(Value, Option<Revision>)>,
    /// The highest revision a write to this key is known to have had.
    last: Revision,
}

impl Register {
    fn expect_holds(&self, expect: Expect) -> Option<bool> {
        match (expect, &self.value) {
            (Expect::Absent, v) => Some(v.is_none()),
            (Expect::Revision(_), None) => Some(false),
            (Expect::Revision(r), Some((_, Some(m)))) => Some(r == *m),
            (Expect::Revision(_), Some((_, None))) => None,
        }
    }

    fn write(&self, value: Option<Value>, rev: Option<Revision>) -> Option<Register> {
        match rev {
            Some(r) if r <= self.last => None,
            _ => Some(Register {
                value: value.map(|v| (v, rev)),
                last: rev.unwrap_or(self.last),
            }),
        }
    }

    /// The state after `op` returned `outcome`, or `None` if it could not have.
    fn step(&self, op: &Op, outcome: &Outcome) -> Option<Register> {
        match (op, outcome) {
            (Op::Put(v), Outcome::Put(r)) => self.write(Some(v.clone()), Some(*r)),
            (Op::Put(v), Outcome::Unknown) => self.write(Some(v.clone()), None),
            (Op::Get, Outcome::Get(None)) => self.value.is_none().then(|| self.clone()),
            (Op::Get, Outcome::Get(Some((v, r)))) => match &self.value {
                Some((mine, rev)) if mine == v && rev.is_none_or(|m| m == *r) => Some(Register {
                    value: Some((v.clone(), Some(*r))),
                    last: self.last.max(*r),
                }),
                _ => None,
            },
            (Op::Get, Outcome::Unknown) => Some(self.clone()),
            (Op::Cas(expect, v), Outcome::Cas(Some(r))) => (self.expect_holds(*expect)
                != Some(false))
            .then(|| self.write(Some(v.clone()), Some(*r)))
            .flatten(),
            (Op::Cas(expect, _), Outcome::Cas(None)) => {
                (self.expect_holds(*expect) != Some(true)).then(|| self.clone())
            }
            (Op::Cas(expect, v), Outcome::Unknown) => match self.expect_holds(*expect) {
                Some(false) => Some(self.clone()),
                _ => self.write(Some(v.clone()), None),
            },
            (Op::Delete, Outcome::Delete(existed)) => {
                (self.value.is_some() == *existed).then(|| Register {
                    value: None,
                    last: self.last,
                })
            }
            (Op::Delete, Outcome::Unknown) => Some(Register {
                value: None,
                last: self.last,
            }),
            _ => None,
        }
    }
}

/// A set of call indexes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn flip(&mut self, i: usize) {
        self.0[i / 64] ^= 1 << (i % 64);
    }
}

/// One key's calls: `Err((stuck call, most placed))` if no order explains them.
fn check_key<'a>(calls: &[&'a Call]) -> Result<(), (&'a Call, usize)> {
    // Entries: each call's start and, if known, its end, in time order (a start before
    // an end at the same instant: those calls overlap). Node 0 is the list head.
    #[derive(Clone, Copy)]
    enum Entry {
        Start(usize),
        End(usize),
    }
    let mut entries: Vec<(u64, u8, Entry)> = Vec::new();
    for (i, c) in calls.iter().enumerate() {
        entries.push((c.start, 0, Entry::Start(i)));
        if let Some(end) = c.end {
            entries.push((end, 1, Entry::End(i)));
        }
    }
    entries.sort_by_key(|e| (e.0, e.1));
    let n = entries.len();
    let entry: Vec<Entry> = entries.iter().map(|e| e.2).collect();
    // A doubly linked list over nodes 1..=n (node k is entry k-1); n+1 is the tail.
    let mut next: Vec<usize> = (1..=n + 2).collect();
    let mut prev: Vec<usize> = (0..n + 2).map(|i| i.saturating_sub(1)).collect();
    let mut end_node = vec![None; calls.len()];
    for (k, e) in entry.iter().enumerate() {
        if let Entry::End(i) = e {
            end_node[*i] = Some(k + 1);
        }
    }
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, node: usize| {
        let (p, x) = (prev[node], next[node]);
        next[p] = x;
        prev[x] = p;
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, node: usize| {
        let (p, x) = (prev[node], next[node]);
        next[p] = node;
        prev[x] = node;
    };
    let tail = n + 1;
    let mut state = Register::default();
    let mut placed = Bits::new(calls.len());
    let mut seen: HashSet<(Bits, Register)> = HashSet::new();
    let mut stack: Vec<(usize, usize, Register)> = Vec::new();
    // The deepest search's blocker: a call that ended before it could be placed.
    let (mut most, mut stuck) = (0, 0);
    let mut node = next[0];
    while next[0] != tail {
        match entry[node - 1] {
            Entry::Start(i) => {
                let call = calls[i];
                let mut moved = false;
                if let Some(after) = state.step(&call.op, &call.outcome) {
                    let mut bits = placed.clone();
                    bits.flip(i);
                    if seen.insert((bits.clone(), after.clone())) {
                        stack.push((node, i, state));
                        state = after;
                        placed = bits;
                        most = most.max(stack.len());
                        unlink(&mut next, &mut prev, node);
                        if let Some(e) = end_node[i] {
                            unlink(&mut next, &mut prev, e);
                        }
                        node = next[0];
                        moved = true;
                    }
                }
                if !moved {
                    node = next[node];
                }
            }
            Entry::End(i) => {
                // A call has ended that is not placed yet: undo the last choice.
                if stack.len() >= most {
                    stuck = i;
                }
                let Some((start, j, before)) = stack.pop() else {
                    return Err((calls[stuck], most));
                };
                if let Some(e) = end_node[j] {
                    relink(&mut next, &mut prev, e);
                }
                relink(&mut next, &mut prev, start);
                placed.flip(j);
                state = before;
                node = next[start];
            }
        }
        if node == tail {
            // No end is left unplaced: the remaining calls have unknown outcomes and
            // may never have taken effect.
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key::new("k").unwrap()
    }

    /// A call by `client` over `start..end` (no end: unknown outcome).
    fn call(client: usize, op: Op, outcome: Outcome, start: u64, end: Option<u64>) -> Call {
        Call {
            client,
            key: key(),
            op,
            outcome,
            start,
            end,
        }
    }

    fn put(v: &'static str) -> Op {
        Op::Put(v.into())
    }

    fn got(v: &'static str, r: u64) -> Outcome {
        Outcome::Get(Some((v.into(), Revision(r))))
    }

    #[test]
    fn sequential_and_overlapping_histories_pass() {
        let h = vec![
            call(0, put("a"), Outcome::Put(Revision(1)), 0, Some(10)),
            call(1, Op::Get, got("a", 1), 20, Some(30)),
            // Two overlapping puts: either order, the read decides which came last.
            call(0, put("b"), Outcome::Put(Revision(3)), 40, Some(60)),
            call(1, put("c"), Outcome::Put(Revision(2)), 45, Some(55)),
            call(2, Op::Get, got("b", 3), 70, Some(80)),
            call(
                0,
                Op::Cas(Expect::Revision(Revision(3)), "d".into()),
                Outcome::Cas(Some(Revision(4))),
                90,
                Some(100),
            ),
            call(1, Op::Delete, Outcome::Delete(true), 110, Some(120)),
            call(2, Op::Get, Outcome::Get(None), 130, Some(140)),
        ];
        check(&h).unwrap();
    }

    #[test]
    fn a_stale_read_is_flagged() {
        let h = vec![
            call(0, put("a"), Outcome::Put(Revision(1)), 0, Some(10)),
            call(0, put("b"), Outcome::Put(Revision(2)), 20, Some(30)),
            // Starts after "b" was acknowledged, yet sees "a".
            call(1, Op::Get, got("a", 1), 40, Some(50)),
        ];
        let v = check(&h).unwrap_err();
        assert_eq!(v.key, key());
        assert_eq!(v.calls, 3);
        assert_eq!(v.stuck.outcome, got("a", 1), "the stale read is named");
        assert!(v.to_string().contains("not linearizable"), "{v}");
    }

    #[test]
    fn a_lost_acknowledged_write_is_flagged() {
        let h = vec![
            call(0, put("a"), Outcome::Put(Revision(1)), 0, Some(10)),
            call(1, Op::Get, Outcome::Get(None), 20, Some(30)),
        ];
        check(&h).unwrap_err();
    }

    #[test]
    fn reads_that_disagree_on_order_are_flagged() {
        // Two concurrent puts; two later reads see them in opposite orders.
        let h = vec![
            call(0, put("a"), Outcome::Put(Revision(1)), 0, Some(100)),
            call(1, put("b"), Outcome::Put(Revision(2)), 0, Some(100)),
            call(2, Op::Get, got("a", 1), 110, Some(120)),
            call(3, Op::Get, got("b", 2), 130, Some(140)),
            call(2, Op::Get, got("a", 1), 150, Some(160)),
        ];
        check(&h).unwrap_err();
    }

    #[test]
    fn revisions_must_grow_in_the_order_writes_took_effect() {
        let h = vec![
            call(0, put("a"), Outcome::Put(Revision(5)), 0, Some(10)),
            call(0, put("b"), Outcome::Put(Revision(4)), 20, Some(30)),
        ];
        check(&h).unwrap_err();
    }

    #[test]
    fn a_double_swap_is_flagged() {
        // Both compare-and-swaps on the same revision claim success.
        let h = vec![
            call(0, put("a"), Outcome::Put(Revision(1)), 0, Some(10)),
            call(
                1,
                Op::Cas(Expect::Revision(Revision(1)), "x".into()),
                Outcome::Cas(Some(Revision(2))),
                20,
                Some(40),
            ),
            call(
                2,
                Op::Cas(Expect::Revision(Revision(1)), "y".into()),
                Outcome::Cas(Some(Revision(3))),
                20,
                Some(40),
            ),
        ];
        check(&h).unwrap_err();
    }

    #[test]
    fn unknown_outcomes_may_take_effect_late_or_never() {
        let late = vec![
            call(0, put("a"), Outcome::Put(Revision(1)), 0, Some(10)),
            call(1, put("b"), Outcome::Unknown, 20, None),
            call(2, Op::Get, got("a", 1), 30, Some(40)),
            call(2, Op::Get, got("b", 2), 50, Some(60)),
        ];
        check(&late).unwrap();
        let never = vec![
            call(0, put("a"), Outcome::Put(Revision(1)), 0, Some(10)),
            call(1, put("b"), Outcome::Unknown, 20, None),
            call(2, Op::Get, got("a", 1), 30, Some(40)),
        ];
        check(&never).unwrap();
        // But once seen, it cannot be unseen.
        let flicker = vec![
            call(0, put("a"), Outcome::Put(Revision(1)), 0, Some(10)),
            call(1, put("b"), Outcome::Unknown, 20, None),
            call(2, Op::Get, got("b", 2), 30, Some(40)),
            call(2, Op::Get, got("a", 1), 50, Some(60)),
        ];
        check(&flicker).unwrap_err();
    }

    #[test]
    fn keys_are_checked_apart() {
        let mut h = vec![call(0, put("a"), Outcome::Put(Revision(1)), 0, Some(10))];
        let mut other = call(1, Op::Get, Outcome::Get(None), 20, Some(30));
        other.key = Key::new("other").unwrap();
        h.push(other);
        check(&h).unwrap();
    }

    #[test]
    fn a_long_concurrent_history_is_checked_quickly() {
        // 4 clients, 400 overlapping calls on one key: memoization keeps this fast.
        let mut h = Vec::new();
        let mut rev = 0;
        let mut current: Option<(Value, Revision)> = None;
        for round in 0..100u64 {
            let t = round * 100;
            for c in 0..4u64 {
                if c == 0 {
                    rev += 1;
                    let v = Value::from(format!("v{round}"));
                    h.push(call(
                        0,
                        Op::Put(v.clone()),
                        Outcome::Put(Revision(rev)),
                        t,
                        Some(t + 50),
                    ));
                    current = Some((v, Revision(rev)));
                } else {
                    h.push(call(
                        c as usize,
                        Op::Get,
                        Outcome::Get(current.clone()),
                        t + 40 + c,
                        Some(t + 90),
                    ));
                }
            }
        }
        check(&h).unwrap();
        // One read in the middle sees a value overwritten two rounds before it began.
        let stale = h.iter().position(|c| c.start == 50 * 100 + 41).unwrap();
        h[stale].outcome = got("v48", 49);
        let v = check(&h).unwrap_err();
        assert_eq!(v.calls, 400);
    }
}
