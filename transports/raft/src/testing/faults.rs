//! Fault injection for tests: a switchboard that every call between members of one
//! process consults, modelled on the routers of openraft's and raft-rs's test suites.
//!
//! Faults act on messages, per direction: a request from A to B travels the link A→B
//! and its reply travels B→A. A lost message is a black hole, as a real partition is:
//! the caller hears nothing and times out, not knowing whether the request ran (a lost
//! reply means it did). Delays are drawn per message, so calls on one connection can
//! overtake each other. The real network code runs underneath; only delivery is faked.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::network::link::{Fate, Link};

/// Shared fault settings: give clones to the members' [`ClusterConfig`]s
/// ([`ClusterConfig::faults`]), then change them while the cluster runs. Members are named by the address they advertise.
///
/// [`ClusterConfig`]: crate::ClusterConfig
/// [`ClusterConfig::faults`]: crate::ClusterConfig::faults
#[derive(Debug, Clone, Default)]
pub struct Faults {
    inner: Arc<Mutex<Links>>,
}

#[derive(Debug, Default)]
struct Links {
    /// Directed links that lose every message: from → to.
    cut: HashMap<String, HashSet<String>>,
    /// The chance that any message is lost.
    drop: f64,
    /// The range each message's delay is drawn from.
    delay: (Duration, Duration),
    /// Replies to writes to turn into "stopping", per link (from → to): how many more.
    stopped: HashMap<(String, String), usize>,
}

impl Links {
    fn cut_one(&mut self, from: &str, to: &str) {
        self.cut
            .entry(from.to_owned())
            .or_default()
            .insert(to.to_owned());
    }
}

impl Faults {
    /// A switchboard with every link healthy.
    pub fn new() -> Self {
        Self::default()
    }

    fn links(&self) -> std::sync::MutexGuard<'_, Links> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Loses every message from `from` to `to` (one way).
    pub fn cut(&self, from: &str, to: &str) {
        self.links().cut_one(from, to);
    }

    /// Cuts every link between the two groups, both ways.
    pub fn partition<A: AsRef<str>, B: AsRef<str>>(&self, a: &[A], b: &[B]) {
        let mut links = self.links();
        for x in a {
            for y in b {
                links.cut_one(x.as_ref(), y.as_ref());
                links.cut_one(y.as_ref(), x.as_ref());
            }
        }
    }

    /// Loses each message with probability `p` (0.0 to 1.0), on every link.
    pub fn drop_rate(&self, p: f64) {
        self.links().drop = p.clamp(0.0, 1.0);
    }

    /// Delays each message by a time drawn uniformly from `min..=max`, on every link.
    pub fn delay(&self, min: Duration, max: Duration) {
        self.links().delay = (min, max.max(min));
    }

    /// Replaces the next `n` answers to writes (a forwarded proposal, a remote client's
    /// call) that travel from `from` to `to` with "this member is stopping", after the
    /// write ran: what a member that stops between committing a write and answering it
    /// says. The caller retries elsewhere, as it would then.
    pub fn stop_replies(&self, from: &str, to: &str, n: usize) {
        self.links()
            .stopped
            .insert((from.to_owned(), to.to_owned()), n);
    }

    /// Restores every cut link (loss and delay stay as set).
    pub fn heal(&self) {
        self.links().cut.clear();
    }

    /// Makes every link healthy again: no cuts, loss or delay.
    pub fn reset(&self) {
        *self.links() = Links::default();
    }
}

impl Link for Faults {
    /// The fate of one message from `from` to `to`.
    fn fate(&self, from: &str, to: &str) -> Fate {
        let links = self.links();
        if links
            .cut
            .get(from)
            .is_some_and(|to_set| to_set.contains(to))
            || (links.drop > 0.0 && fastrand::f64() < links.drop)
        {
            return Fate::Lost;
        }
        let (min, max) = links.delay;
        let spread = (max - min).as_micros() as u64;
        Fate::Delivered(min + Duration::from_micros(fastrand::u64(0..=spread)))
    }

    /// Whether this answer from `from` to `to` is to be replaced (see
    /// [`Faults::stop_replies`]); counts it.
    fn take_stopped(&self, from: &str, to: &str) -> bool {
        let mut links = self.links();
        match links.stopped.get_mut(&(from.to_owned(), to.to_owned())) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
}

impl crate::ClusterConfig {
    /// Sends every message of this member through `faults` (fault-injection tests).
    #[must_use]
    pub fn faults(mut self, faults: Faults) -> Self {
        self.link = Some(Arc::new(faults));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_are_directed_and_partitions_are_not() {
        let f = Faults::new();
        let ok = Fate::Delivered(Duration::ZERO);
        f.cut("a", "b");
        assert_eq!(f.fate("a", "b"), Fate::Lost);
        assert_eq!(f.fate("b", "a"), ok);
        f.partition(&["c"], &["a", "b"]);
        for (x, y) in [("c", "a"), ("a", "c"), ("c", "b"), ("b", "c")] {
            assert_eq!(f.fate(x, y), Fate::Lost, "{x}->{y}");
        }
        f.drop_rate(1.0);
        f.heal();
        assert_eq!(f.fate("b", "c"), Fate::Lost, "healing keeps the loss rate");
        f.reset();
        assert_eq!(f.fate("a", "b"), ok);
    }

    #[test]
    fn drops_and_delays_are_drawn_per_message() {
        let f = Faults::new();
        f.drop_rate(0.3);
        f.delay(Duration::from_millis(2), Duration::from_millis(4));
        let fates: Vec<_> = (0..10_000).map(|_| f.fate("a", "b")).collect();
        let lost = fates.iter().filter(|x| **x == Fate::Lost).count();
        assert!((2500..3500).contains(&lost), "{lost} of 10000 lost at 30%");
        for fate in fates {
            if let Fate::Delivered(d) = fate {
                assert!(d >= Duration::from_millis(2) && d <= Duration::from_millis(4));
            }
        }
    }
}
