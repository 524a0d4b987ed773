//! The lossless mapping between datasync keys and NATS KV keys (subjects).
//!
//! NATS KV keys are subjects: non-empty tokens of `[-_=/a-zA-Z0-9]` separated by `.`,
//! and subject wildcards (`>`) match whole tokens only. datasync keys are any UTF-8
//! without control characters, and prefixes end anywhere. The mapping:
//!
//! | datasync | NATS |
//! |---|---|
//! | `/` | `.` (the token separator: `config/if/eth0` is `config.if.eth0`) |
//! | `-`, `_`, `a-z`, `A-Z`, `0-9` | themselves |
//! | any other byte (`.`, `=`, space, each byte of a non-ASCII character, …) | `=XX`, two upper-case hex digits |
//! | an empty segment (a leading, trailing or doubled `/`) | the token `=` alone |
//!
//! So keys written by plain NATS clients in the usual dotted style read back as
//! `/`-separated datasync keys. A prefix watch subscribes to the subject filter of the
//! prefix's whole segments followed by `>`; a prefix that ends mid-segment (`config/i`)
//! is filtered again on our side after decoding. A key longer than
//! [`MAX_SUBJECT_KEY`] bytes once mapped is refused with
//! [`KeyError::Unrepresentable`]; subjects that do not decode (written by other clients)
//! are skipped. Decoding is canonical: it accepts exactly what encoding produces (an
//! escape of a byte that needs none, or of `/`, is foreign), so two NATS keys never
//! read as one datasync key.

use datasync::{Key, KeyError, Prefix};

/// Longest mapped key accepted, in bytes (NATS limits a protocol line to 4 KiB, which
/// holds the subject, a reply subject and sizes).
pub const MAX_SUBJECT_KEY: usize = 3072;

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

fn encode_segment(seg: &str, out: &mut String) {
    if seg.is_empty() {
        out.push('=');
        return;
    }
    for &b in seg.as_bytes() {
        if plain(b) {
            out.push(b as char);
        } else {
            out.push('=');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
    }
}

fn unrepresentable(key: &str, reason: &'static str) -> KeyError {
    KeyError::Unrepresentable {
        key: key.to_owned(),
        backend: "nats",
        reason,
    }
}

/// The NATS KV key of `key`.
pub(crate) fn encode(key: &Key) -> Result<String, KeyError> {
    let mut out = String::with_capacity(key.as_str().len());
    for (i, seg) in key.as_str().split('/').enumerate() {
        if i > 0 {
            out.push('.');
        }
        encode_segment(seg, &mut out);
    }
    if out.len() > MAX_SUBJECT_KEY {
        return Err(unrepresentable(
            key.as_str(),
            "longer than 3072 bytes once mapped to a NATS subject",
        ));
    }
    Ok(out)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The datasync key of a NATS KV key; `None` if it is not the mapping of one.
#[cfg(test)]
pub(crate) fn decode(nats: &str) -> Option<Key> {
    decode_with(nats, &mut Vec::new())
}

/// [`decode`], building the key in `bytes` (cleared first; reused across calls so that
/// a decoded key costs one allocation, the key's own).
pub(crate) fn decode_with(nats: &str, bytes: &mut Vec<u8>) -> Option<Key> {
    bytes.clear();
    for (i, token) in nats.split('.').enumerate() {
        if i > 0 {
            bytes.push(b'/');
        }
        if token == "=" {
            continue;
        }
        let t = token.as_bytes();
        if t.is_empty() {
            return None;
        }
        let mut j = 0;
        while j < t.len() {
            match t[j] {
                b'=' => {
                    let hi = hex(*t.get(j + 1)?)?;
                    let lo = hex(*t.get(j + 2)?)?;
                    let b = hi << 4 | lo;
                    // Only what `encode` escapes: `a=2Fb` is not `a/b`, nor `=61` `a`
                    // (one datasync key, one NATS key).
                    if plain(b) || b == b'/' {
                        return None;
                    }
                    bytes.push(b);
                    j += 3;
                }
                // `/` is in NATS's key alphabet but never in a mapped key.
                b if plain(b) => {
                    bytes.push(b);
                    j += 1;
                }
                _ => return None,
            }
        }
    }
    Key::from_bytes(bytes).ok()
}

/// The subject filter (below the bucket's prefix) that covers every key under `prefix`:
/// its whole segments followed by `>`. Keys it matches must still be checked against
/// the prefix when it ends mid-segment.
pub(crate) fn filter(prefix: &Prefix) -> String {
    let p = prefix.as_str();
    let mut out = String::new();
    // Everything before the last `/` is whole segments; the rest is a partial one.
    if let Some(cut) = p.rfind('/') {
        for seg in p[..cut].split('/') {
            encode_segment(seg, &mut out);
            out.push('.');
        }
    }
    out.push('>');
    out
}

/// Whether subject filter `a` covers every subject `b` covers (both from [`filter`]).
pub(crate) fn covers(a: &str, b: &str) -> bool {
    let head = a.trim_end_matches('>');
    b.starts_with(head)
}

/// The filters of `prefixes` without those another one covers, sorted.
pub(crate) fn filters(prefixes: &[Prefix]) -> Vec<String> {
    let mut all: Vec<String> = prefixes.iter().map(filter).collect();
    all.sort();
    all.dedup();
    // Not by sorting alone: a covered filter can sort before the one covering it
    // ("a.0.>" < "a.>", as digits, `-` and `=` sort below `>`), and JetStream refuses
    // a consumer whose filters overlap.
    let covered = |f: &String| all.iter().any(|o| o != f && covers(o, f));
    all.iter().filter(|f| !covered(f)).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> Key {
        Key::new(s).expect("valid key")
    }

    #[test]
    fn round_trips_every_shape() {
        for k in [
            "config/interfaces/eth0",
            "a",
            "a/",
            "/a",
            "a//b",
            "/",
            "//",
            "a.b",
            "a=b",
            "x=2E",
            "key with spaces",
            "ünïcödé/日本",
            "r8x",
            "-_Az09",
            "a/b/c/d/e/f",
            "tab\u{7f}",
        ] {
            let Ok(k) = Key::new(k) else { continue };
            let n = encode(&k).expect("encodes");
            assert!(
                !n.is_empty() && !n.starts_with('.') && !n.ends_with('.') && !n.contains(".."),
                "{n:?} is not a valid NATS key"
            );
            assert!(
                n.bytes().all(|b| plain(b) || b == b'.' || b == b'='),
                "{n:?} leaves the NATS key alphabet"
            );
            assert_eq!(decode(&n), Some(k.clone()), "{k:?} -> {n:?}");
        }
    }

    #[test]
    fn slashes_become_tokens() {
        assert_eq!(
            encode(&key("config/if/eth0")).as_deref(),
            Ok("config.if.eth0")
        );
        assert_eq!(encode(&key("a.b")).as_deref(), Ok("a=2Eb"));
        assert_eq!(encode(&key("a/")).as_deref(), Ok("a.="));
        assert_eq!(decode("config.if.eth0"), Some(key("config/if/eth0")));
    }

    #[test]
    fn foreign_subjects_do_not_decode() {
        for bad in ["a..b", "", "a=2", "a=zz", "a=2e", "a/b", "a.", ".a", "=00"] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn decoding_is_canonical() {
        for foreign in ["a=2Fb", "=61", "a=2D", "a=5F", "x.=30"] {
            assert_eq!(decode(foreign), None, "{foreign:?}");
        }
        // Every NATS key of up to 5 characters over an alphabet of escapes, plain bytes
        // and separators: one that decodes is exactly the encoding of its key.
        let alphabet: Vec<char> = "a=2F6E1.-".chars().collect();
        let mut n = 0;
        let mut word = Vec::new();
        fn each(alphabet: &[char], word: &mut Vec<char>, depth: usize, n: &mut usize) {
            let s: String = word.iter().collect();
            if let Some(k) = decode(&s) {
                assert_eq!(
                    encode(&k).as_deref(),
                    Ok(s.as_str()),
                    "{s:?} reads as {k:?}"
                );
                *n += 1;
            }
            if depth == 0 {
                return;
            }
            for c in alphabet {
                word.push(*c);
                each(alphabet, word, depth - 1, n);
                word.pop();
            }
        }
        each(&alphabet, &mut word, 5, &mut n);
        assert!(n > 1000, "only {n} keys decoded: the check checks little");
    }

    #[test]
    fn long_keys_are_refused() {
        let k = key(&".".repeat(1100));
        assert!(matches!(
            encode(&k),
            Err(KeyError::Unrepresentable {
                backend: "nats",
                ..
            })
        ));
    }

    #[test]
    fn filters_cover_the_prefix() {
        let f = |p: &str| filter(&Prefix::new(p).expect("valid prefix"));
        assert_eq!(f(""), ">");
        assert_eq!(f("r8"), ">");
        assert_eq!(f("r8/"), "r8.>");
        assert_eq!(f("config/if/eth"), "config.if.>");
        assert_eq!(f("a.b/"), "a=2Eb.>");
        let p: Vec<Prefix> = ["a/b/", "a/", "c/d", "a/b/c/"]
            .iter()
            .map(|p| Prefix::new(*p).expect("valid prefix"))
            .collect();
        assert_eq!(filters(&p), vec!["a.>", "c.>"]);
        // A covered filter that sorts before its cover (digits, `-` and `=` sort below
        // `>`) is dropped too: JetStream refuses overlapping filters.
        let p: Vec<Prefix> = ["a/0/", "a/x", "b/é/", "b/"]
            .iter()
            .map(|s| Prefix::new(s).expect("valid prefix"))
            .collect();
        assert_eq!(filters(&p), vec!["a.>", "b.>"]);
        // A prefix's keys all match its filter.
        for (p, k) in [("a/", "a/"), ("a/", "a/x/y"), ("a/x", "a/xyz"), ("", "q")] {
            let subject = encode(&key(k)).expect("encodes");
            let head = f(p).trim_end_matches('>').to_owned();
            assert!(
                subject.starts_with(&head) && subject.len() > head.len(),
                "{k:?} escapes the filter of {p:?}"
            );
        }
    }
}
