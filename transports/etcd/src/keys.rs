//! The mapping between datasync keys and etcd keys: an optional namespace prefix.

use datasync::{Key, KeyError, Prefix, PrefixSet};

/// The bytes every etcd key of this store starts with (cn-infra's "agent prefix").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Namespace(Vec<u8>);

/// etcd's "no upper bound" range end.
const UNBOUNDED: &[u8] = b"\0";

impl Namespace {
    pub(crate) fn new(prefix: &str) -> Self {
        Namespace(prefix.as_bytes().to_vec())
    }

    /// The etcd key of `key`.
    pub(crate) fn key(&self, key: &Key) -> Vec<u8> {
        self.join(key.as_str())
    }

    fn join(&self, s: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() + s.len());
        out.extend_from_slice(&self.0);
        out.extend_from_slice(s.as_bytes());
        out
    }

    /// The etcd range `[start, end)` of every key under `prefix`.
    pub(crate) fn range(&self, prefix: &Prefix) -> (Vec<u8>, Vec<u8>) {
        let start = self.join(prefix.as_str());
        let end = range_end(&start);
        // etcd wants a non-empty key: "\0" is the smallest one.
        let start = if start.is_empty() { vec![0] } else { start };
        (start, end)
    }

    /// One etcd range covering every prefix of `set` (one watch per registration, so the
    /// changes of one transaction arrive together; keys between disjoint prefixes are
    /// filtered out on our side).
    pub(crate) fn covering_range(&self, set: &PrefixSet) -> (Vec<u8>, Vec<u8>) {
        let ranges: Vec<_> = set.prefixes().iter().map(|p| self.range(p)).collect();
        let start = ranges.iter().map(|r| r.0.clone()).min().unwrap_or_default();
        let end = if ranges.iter().any(|r| r.1 == UNBOUNDED) {
            UNBOUNDED.to_vec()
        } else {
            ranges.iter().map(|r| r.1.clone()).max().unwrap_or_default()
        };
        (start, end)
    }

    /// The datasync key of an etcd key: `None` outside the namespace, an error if the
    /// rest is not a valid key (written by another client).
    pub(crate) fn decode(&self, raw: &[u8]) -> Option<Result<Key, KeyError>> {
        raw.strip_prefix(self.0.as_slice()).map(Key::from_bytes)
    }
}

/// The smallest byte string greater than every string starting with `start`
/// (etcd's `GetPrefixRangeEnd`); `"\0"` when there is none.
fn range_end(start: &[u8]) -> Vec<u8> {
    let mut end = start.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    UNBOUNDED.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        Prefix::new(s).expect("valid prefix")
    }

    #[test]
    fn namespace_maps_both_ways() {
        let ns = Namespace::new("agent1/");
        let k = Key::new("config/a").expect("valid key");
        assert_eq!(ns.key(&k), b"agent1/config/a");
        assert_eq!(ns.decode(b"agent1/config/a"), Some(Ok(k)));
        assert_eq!(ns.decode(b"agent2/config/a"), None);
        assert!(matches!(ns.decode(b"agent1/\x01"), Some(Err(_))));
        assert!(matches!(ns.decode(b"agent1/"), Some(Err(KeyError::Empty))));
    }

    #[test]
    fn ranges() {
        let ns = Namespace::default();
        assert_eq!(ns.range(&p("a/")), (b"a/".to_vec(), b"a0".to_vec()));
        assert_eq!(ns.range(&Prefix::all()), (b"\0".to_vec(), b"\0".to_vec()));
        let ns = Namespace::new("n/");
        assert_eq!(ns.range(&Prefix::all()), (b"n/".to_vec(), b"n0".to_vec()));
        assert_eq!(range_end(b"a\xff\xff"), b"b".to_vec());
        assert_eq!(range_end(b"\xff"), b"\0".to_vec());
        let set = PrefixSet::new([p("b/"), p("a/x"), p("c")]);
        assert_eq!(
            ns.covering_range(&set),
            (b"n/a/x".to_vec(), b"n/d".to_vec())
        );
    }
}
