//! Validated keys and prefixes.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// Longest key (and prefix) accepted, in bytes. Transports may accept less.
pub const MAX_KEY_LEN: usize = 4096;

/// Why a string is not a valid [`Key`] or [`Prefix`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key is empty (a prefix may be empty, a key may not).
    #[error("key is empty")]
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`] (or a transport's own limit).
    #[error("key is {len} bytes, the limit is {max}")]
    TooLong {
        /// Length of the rejected key.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The key contains a NUL or another ASCII control character.
    #[error("key contains control character {byte:#04x} at byte {position}")]
    ControlCharacter {
        /// The offending byte.
        byte: u8,
        /// Its position in the key.
        position: usize,
    },
    /// The key contains a character that would let it drive a terminal or hide what
    /// it says: a C1 control (U+0080–U+009F) or a bidirectional formatting character
    /// (U+061C, U+200E, U+200F, U+202A–U+202E, U+2066–U+2069).
    #[error("key contains forbidden character {ch:?} at byte {position}")]
    ForbiddenCharacter {
        /// The character.
        ch: char,
        /// Its byte position in the key.
        position: usize,
    },
    /// The key is not UTF-8 (only from [`Key::from_bytes`]).
    #[error("key is not valid UTF-8")]
    NotUtf8,
    /// The key cannot be represented by a particular backend.
    #[error("key {key:?} cannot be stored by {backend}: {reason}")]
    Unrepresentable {
        /// The key.
        key: String,
        /// Which backend refused it.
        backend: &'static str,
        /// Why.
        reason: &'static str,
    },
}

fn check(s: &str) -> Result<(), KeyError> {
    check_stored(s)?;
    // Only non-ASCII text can hold the others.
    if !s.is_ascii()
        && let Some((position, ch)) = s.char_indices().find(|(_, c)| forbidden(*c))
    {
        return Err(KeyError::ForbiddenCharacter { ch, position });
    }
    Ok(())
}

/// The rule keys were first written under: length, no C0 control or DEL.
fn check_stored(s: &str) -> Result<(), KeyError> {
    if s.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong {
            len: s.len(),
            max: MAX_KEY_LEN,
        });
    }
    if let Some(position) = s.bytes().position(|b| b < 0x20 || b == 0x7f) {
        return Err(KeyError::ControlCharacter {
            byte: s.as_bytes()[position],
            position,
        });
    }
    Ok(())
}

/// C1 controls and bidirectional formatting characters: printed raw they drive a
/// terminal (U+009B is CSI) or reorder what a reader sees.
fn forbidden(c: char) -> bool {
    matches!(c, '\u{80}'..='\u{9f}' | '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A validated, non-empty key. Cheap to clone. Keys order by their bytes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(Arc<str>);

impl Key {
    /// Validates `key`: non-empty, at most [`MAX_KEY_LEN`] bytes, no control characters
    /// (C0, DEL, C1) and no bidirectional formatting characters.
    pub fn new(key: impl AsRef<str>) -> Result<Self, KeyError> {
        let s = key.as_ref();
        if s.is_empty() {
            return Err(KeyError::Empty);
        }
        check(s)?;
        Ok(Key(Arc::from(s)))
    }

    /// A key a store already holds, checked by the rule it was written under: not
    /// empty, at most [`MAX_KEY_LEN`] bytes, no C0 control or DEL. A key written before
    /// [`Key::new`] refused C1 controls and bidirectional formatting characters stays
    /// readable and deletable (and a replicated log written then applies the same on
    /// every member). For a transport's own records only: anything from outside goes
    /// through [`Key::new`].
    #[doc(hidden)]
    pub fn from_stored(key: impl AsRef<str>) -> Result<Self, KeyError> {
        let s = key.as_ref();
        if s.is_empty() {
            return Err(KeyError::Empty);
        }
        check_stored(s)?;
        Ok(Key(Arc::from(s)))
    }

    /// Validates raw bytes as a key (they must be UTF-8).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        Self::new(std::str::from_utf8(bytes).map_err(|_| KeyError::NotUtf8)?)
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key with `prefix` removed, if it starts with it.
    pub fn strip_prefix(&self, prefix: &Prefix) -> Option<&str> {
        self.0.strip_prefix(prefix.as_str())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Key {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for Key {
    type Error = KeyError;
    fn try_from(s: &str) -> Result<Self, KeyError> {
        Key::new(s)
    }
}

impl TryFrom<String> for Key {
    type Error = KeyError;
    fn try_from(s: String) -> Result<Self, KeyError> {
        Key::new(s)
    }
}

/// A validated key prefix. The empty prefix matches every key.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix(Arc<str>);

impl Prefix {
    /// Validates `prefix` like a key, except that it may be empty.
    pub fn new(prefix: impl AsRef<str>) -> Result<Self, KeyError> {
        let s = prefix.as_ref();
        check(s)?;
        Ok(Prefix(Arc::from(s)))
    }

    /// The prefix that matches every key.
    pub fn all() -> Self {
        Prefix(Arc::from(""))
    }

    /// The prefix as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `key` lies under this prefix.
    pub fn matches(&self, key: &str) -> bool {
        key.starts_with(&*self.0)
    }

    /// Whether every key under `other` also lies under `self`.
    pub fn covers(&self, other: &Prefix) -> bool {
        other.0.starts_with(&*self.0)
    }

    /// The smallest string greater than every key under this prefix, for range scans;
    /// `None` when the range is unbounded.
    ///
    /// UTF-8 orders by code point, so the bound is the prefix with its last character
    /// replaced by the next one (skipping surrogates); a last character of U+10FFFF is
    /// dropped and the one before it incremented instead.
    pub fn range_end(&self) -> Option<String> {
        let mut chars: Vec<char> = self.0.chars().collect();
        while let Some(last) = chars.pop() {
            let next = match last {
                '\u{d7ff}' => Some('\u{e000}'),
                c => char::from_u32(c as u32 + 1),
            };
            if let Some(next) = next {
                chars.push(next);
                return Some(chars.into_iter().collect());
            }
        }
        None
    }
}

impl fmt::Debug for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<&str> for Prefix {
    type Error = KeyError;
    fn try_from(s: &str) -> Result<Self, KeyError> {
        Prefix::new(s)
    }
}

impl From<Key> for Prefix {
    fn from(key: Key) -> Self {
        Prefix(key.0)
    }
}

/// A normalized set of prefixes: sorted, duplicates and covered prefixes removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixSet(Vec<Prefix>);

impl PrefixSet {
    /// Normalizes `prefixes`.
    pub fn new(prefixes: impl IntoIterator<Item = Prefix>) -> Self {
        let mut all: Vec<Prefix> = prefixes.into_iter().collect();
        all.sort();
        let mut out: Vec<Prefix> = Vec::with_capacity(all.len());
        for p in all {
            // After sorting, a covering prefix comes before everything it covers.
            if !out.last().is_some_and(|last| last.covers(&p)) {
                out.push(p);
            }
        }
        PrefixSet(out)
    }

    /// Whether any prefix matches `key`.
    pub fn matches(&self, key: &str) -> bool {
        // Few prefixes per registration: a linear scan beats a search.
        self.0.iter().any(|p| p.matches(key))
    }

    /// The normalized prefixes, sorted.
    pub fn prefixes(&self) -> &[Prefix] {
        &self.0
    }

    /// Whether the set is empty (matches nothing).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether every key under `prefix` matches the set.
    pub fn covers(&self, prefix: &Prefix) -> bool {
        self.0.iter().any(|p| p.covers(prefix))
    }

    /// The keys both sets match, as a set.
    pub fn intersect(&self, other: &PrefixSet) -> PrefixSet {
        let mine = self.0.iter().filter(|p| other.covers(p));
        let theirs = other.0.iter().filter(|p| self.covers(p));
        PrefixSet::new(mine.chain(theirs).cloned())
    }

    /// The keys either set matches, as a set.
    pub fn union(&self, other: &PrefixSet) -> PrefixSet {
        PrefixSet::new(self.0.iter().chain(&other.0).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_keys() {
        assert_eq!(Key::new(""), Err(KeyError::Empty));
        assert!(matches!(
            Key::new("a\0b"),
            Err(KeyError::ControlCharacter {
                byte: 0,
                position: 1
            })
        ));
        assert!(matches!(
            Key::new("x".repeat(MAX_KEY_LEN + 1)),
            Err(KeyError::TooLong { .. })
        ));
        assert_eq!(Key::from_bytes(&[0xff, 0xfe]), Err(KeyError::NotUtf8));
        assert!(Key::new("x".repeat(MAX_KEY_LEN)).is_ok());
        assert!(Prefix::new("").is_ok());
        assert!(Prefix::new("a\nb").is_err());
    }

    #[test]
    fn rejects_terminal_and_bidi_characters() {
        for (k, ch, position) in [
            ("a\u{9b}31m", '\u{9b}', 1),
            ("\u{80}", '\u{80}', 0),
            ("é\u{9f}", '\u{9f}', 2),
            ("x\u{202e}gpj.exe", '\u{202e}', 1),
            ("x\u{2066}", '\u{2066}', 1),
            ("x\u{200f}", '\u{200f}', 1),
            ("x\u{61c}", '\u{61c}', 1),
        ] {
            assert_eq!(
                Key::new(k),
                Err(KeyError::ForbiddenCharacter { ch, position }),
                "{k:?}"
            );
            assert!(Prefix::new(k).is_err(), "{k:?}");
        }
        // A key stored before the rule reads back.
        assert!(Key::from_stored("x\u{202e}").is_ok());
        assert!(Key::from_stored("x\u{1b}").is_err());
        // Their neighbours are fine.
        for k in [
            "\u{a0}", "\u{7e}", "\u{2010}", "\u{2065}", "\u{206a}", "日本",
        ] {
            assert!(Key::new(k).is_ok(), "{k:?}");
        }
    }

    #[test]
    fn prefix_set_normalizes() {
        let p = |s: &str| Prefix::new(s).unwrap();
        let set = PrefixSet::new([p("a/b/"), p("c/"), p("a/"), p("a/")]);
        assert_eq!(set.prefixes(), &[p("a/"), p("c/")]);
        assert!(set.matches("a/b/c"));
        assert!(!set.matches("b"));
        assert_eq!(PrefixSet::new([p(""), p("x")]).prefixes(), &[p("")]);
    }

    #[test]
    fn range_end() {
        assert_eq!(
            Prefix::new("a/").unwrap().range_end().as_deref(),
            Some("a0")
        );
        assert_eq!(Prefix::all().range_end(), None);
        // Multi-byte last characters: the next character, not a shorter prefix's end.
        let end = |s: &str| Prefix::new(s).unwrap().range_end();
        assert_eq!(end("p/é").as_deref(), Some("p/ê"));
        assert_eq!(end("é").as_deref(), Some("ê"));
        assert_eq!(end("p/日").as_deref(), Some("p/旦"));
        assert_eq!(end("a\u{d7ff}").as_deref(), Some("a\u{e000}"));
        assert_eq!(end("a\u{10ffff}").as_deref(), Some("b"));
        assert_eq!(end("\u{10ffff}\u{10ffff}"), None);
    }

    /// Every string under a prefix sorts below its range end, and every string outside
    /// the prefix that sorts at or above the prefix sorts at or above the end.
    #[test]
    fn range_end_bounds_exactly() {
        use proptest::prelude::*;
        let chars = prop_oneof![
            Just('a'),
            Just('z'),
            Just('\u{7e}'),
            Just('\u{80}'),
            Just('é'),
            Just('ê'),
            Just('\u{7ff}'),
            Just('\u{800}'),
            Just('\u{d7ff}'),
            Just('\u{e000}'),
            Just('\u{ffff}'),
            Just('\u{10000}'),
            Just('\u{10ffff}'),
            any::<char>(),
        ];
        let string =
            proptest::collection::vec(chars, 0..5).prop_map(|c| c.into_iter().collect::<String>());
        proptest!(|(prefix in string.clone(), key in string)| {
            let p = Prefix(Arc::from(prefix.as_str()));
            match p.range_end() {
                Some(end) => {
                    prop_assert!(end.as_str() > prefix.as_str());
                    let inside = key.as_str() >= prefix.as_str() && key.as_str() < end.as_str();
                    prop_assert_eq!(inside, p.matches(&key), "key {:?} end {:?}", key, end);
                }
                None => prop_assert!(key.as_str() < prefix.as_str() || p.matches(&key)),
            }
        });
    }
}
