//! Helpers shared by the transport tests (they panic: a failed helper is a failed test).

use datasync::testing::next_event;
use datasync::{Event, Key, Mirror, Prefix, ReadOptions, Watch, Writer};

/// A key; panics if invalid.
pub fn key(s: &str) -> Key {
    Key::new(s).unwrap_or_else(|e| panic!("bad test key {s:?}: {e}"))
}

/// A prefix; panics if invalid.
pub fn prefix(s: &str) -> Prefix {
    Prefix::new(s).unwrap_or_else(|e| panic!("bad test prefix {s:?}: {e}"))
}

/// The next event (transient errors skipped); panics on end, error or timeout.
pub async fn next(w: &mut Watch) -> Event {
    next_event(w).await.unwrap_or_else(|f| panic!("{f}"))
}

/// Panics unless the mirror's values under `p` equal the store's.
pub async fn assert_same<S: Writer>(store: &S, mirror: &Mirror, p: &str) {
    let listing = store
        .list(&prefix(p), ReadOptions::new())
        .await
        .unwrap_or_else(|e| panic!("list {p}: {e}"));
    let want: Vec<_> = listing
        .values
        .iter()
        .map(|kv| (kv.key.clone(), kv.value.clone()))
        .collect();
    let got: Vec<_> = mirror
        .values("")
        .filter(|(k, _, _)| k.as_str().starts_with(p))
        .map(|(k, v, _)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(got, want, "consumer state differs from the store under {p}");
}
