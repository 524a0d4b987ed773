//! The transport conformance suite (feature `testing`).
//!
//! Every transport runs the same suite, unchanged: implement [`Harness`] (a fresh, empty
//! store per test, and a count of the watches the store is serving) and expand
//! [`conformance_tests!`](crate::conformance_tests) in a test file. Each rule of the
//! contract (`docs/CONTRACT.md` in the repository) becomes separately named
//! `#[tokio::test]`s:
//!
//! ```text
//! // tests/conformance.rs of a transport crate, with datasync's `testing` feature on:
//! datasync::conformance_tests!(my_transport::testing::MyHarness::start().await);
//! ```
//!
//! A suite test returns `Err(Failure)` instead of panicking, so [`run_all`] can report
//! which rules a transport breaks; the suite's own tests use that to show it catches
//! deliberately broken transports. Waits are bounded: a transport that hangs fails with
//! "timed out … (deadlock?)".

#[cfg(test)]
mod broken;
pub mod linearizability;
pub mod process;
mod suite;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::StreamExt;

use crate::local::Local;
use crate::{Event, StoreError, Watch, Watcher, Writer};

pub use suite::*;

/// How long the suite waits for any one event or condition.
pub const WAIT: Duration = Duration::from_secs(15);

/// A transport under test.
#[async_trait::async_trait]
pub trait Harness: Send + Sync + 'static {
    /// The store type.
    type Store: Watcher + Writer + Clone + 'static;

    /// A fresh, empty store for one test (tests run concurrently).
    async fn store(&self) -> Self::Store;

    /// How many watch registrations `store` serves now (server-side watches for a
    /// remote store). Used to check that closing a registration releases it.
    async fn active_watches(&self, store: &Self::Store) -> usize;

    /// Whether the transport reads a prefix added to a live registration alone (its
    /// `PrefixAdded` resync lists only it), rather than resyncing every prefix.
    const READS_ADDED_PREFIXES_ALONE: bool = true;

    /// Whether the transport resumes a registration after a revision
    /// ([`WatchOptions::resume`](crate::WatchOptions::resume)) from the changes it
    /// retains, rather than beginning with an `Initial` resync.
    const RESUMES: bool = true;

    /// Whether the transport applies transactions over several keys
    /// ([`Writer::txn`]), rather than answering `Unsupported`.
    const TRANSACTIONS: bool = true;
}

/// The harness of the in-memory [`Local`] transport.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalHarness;

#[async_trait::async_trait]
impl Harness for LocalHarness {
    type Store = Local;
    async fn store(&self) -> Local {
        Local::new()
    }
    async fn active_watches(&self, store: &Local) -> usize {
        store.active_watches()
    }
}

/// A broken rule: what was expected and what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure(pub String);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failure {}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure(format!("store error: {e} ({e:?})"))
    }
}

impl From<crate::KeyError> for Failure {
    fn from(e: crate::KeyError) -> Self {
        Failure(format!("key error: {e}"))
    }
}

impl From<crate::MirrorError> for Failure {
    fn from(e: crate::MirrorError) -> Self {
        Failure(format!("contract broken: {e}"))
    }
}

/// What a suite test returns.
pub type Outcome = Result<(), Failure>;

/// Fails the current suite test with a message unless `cond` holds.
#[macro_export]
#[doc(hidden)]
macro_rules! __ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::testing::Failure(format!($($fmt)+)));
        }
    };
}
pub(crate) use crate::__ensure as ensure;

/// The next event of `watch`, skipping transient errors; fails on end of stream, a
/// terminal error or [`WAIT`].
pub async fn next_event(watch: &mut Watch) -> Result<Event, Failure> {
    loop {
        match tokio::time::timeout(WAIT, watch.next()).await {
            Err(_) => {
                return Err(Failure(format!(
                    "timed out after {WAIT:?} waiting for an event (deadlock?)"
                )));
            }
            Ok(None) => return Err(Failure("watch stream ended unexpectedly".into())),
            Ok(Some(Err(e))) if e.is_retryable() => continue,
            Ok(Some(Err(e))) => return Err(Failure(format!("watch failed: {e} ({e:?})"))),
            Ok(Some(Ok(ev))) => return Ok(ev),
        }
    }
}

/// Applies `watch`'s events to `mirror` (checking the contract, answering each `Done`)
/// until the mirror is at `revision` for the events' source; returns the reasons of the
/// resyncs seen.
pub async fn mirror_until(
    watch: &mut Watch,
    mirror: &mut crate::Mirror,
    revision: crate::Revision,
) -> Result<Vec<crate::ResyncReason>, Failure> {
    let mut reasons = Vec::new();
    let mut source: Option<crate::Source> = None;
    while source
        .as_deref()
        .is_none_or(|s| mirror.revision(s) < Some(revision))
    {
        let ev = next_event(watch).await?;
        source = Some(ev.source().clone());
        if let Event::Resync(r) = &ev {
            reasons.push(r.reason);
        }
        mirror
            .apply(&ev)
            .map_err(|e| Failure(format!("the stream broke the contract: {e}")))?;
        ev.into_done().ok();
    }
    Ok(reasons)
}

/// Polls `check` until it returns true, for up to [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, mut check: F) -> Outcome
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(Failure(format!(
        "timed out after {WAIT:?} waiting until {what}"
    )))
}

/// A suite test as a boxed function.
pub type TestFn<H> = for<'a> fn(&'a H) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

/// Runs every suite test against `harness`; returns each test's name and outcome.
pub async fn run_all<H: Harness>(harness: &H) -> Vec<(&'static str, Outcome)> {
    let mut out = Vec::new();
    for (name, test) in all::<H>() {
        out.push((name, test(harness).await));
    }
    out
}

/// Expands to one `#[tokio::test]` per suite test, each running against the harness
/// that `$harness` (an expression, may use `.await`) builds.
///
/// This macro also holds the one list of suite tests (the `@list` arm), from which
/// [`all`] is generated, so the two cannot drift apart.
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::conformance_tests!(@list @each $harness;);
    };
    (@list $($head:tt)*) => {
        $crate::conformance_tests!($($head)*
            rule1_resync_first_then_ordered_changes,
            rule2_handoff_starts_after_the_resync_revision,
            rule2_handoff_under_concurrent_writes,
            rule3_revisions_match_writes,
            rule4_prev_values_per_registration,
            rule4_absent_delete_and_empty_value,
            rule5_requested_resyncs_coalesce,
            rule5_close_releases_the_watch,
            rule6_done_answers_and_drops_are_reported,
            rule7_slow_consumer_is_isolated_and_resynced,
            rule8_put_get_list_delete,
            rule8_ttl_expiry_emits_delete_with_prev,
            rule8_huge_ttls_are_refused_or_kept,
            rule8_compare_and_swap,
            rule8_cas_is_linearizable_read_modify_write,
            rule8_update_is_a_read_modify_write,
            rule9_bad_input_gets_typed_errors,
            keys_unicode_prefixes_match_a_model,
            rule10_prefixes_added_and_removed_on_a_live_registration,
            rule11_resume_after_a_revision,
            rule12_transactions,
        );
    };
    (@each $harness:expr; $($name:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let harness = $harness;
                if let Err(failure) = $crate::testing::$name(&harness).await {
                    panic!("{}: {}", stringify!($name), failure);
                }
            }
        )+
    };
    (@all; $($name:ident),+ $(,)?) => {
        /// Every suite test, in order, by name.
        pub fn all<H: Harness>() -> Vec<(&'static str, TestFn<H>)> {
            vec![$((stringify!($name), (|h| Box::pin($name(h))) as TestFn<H>)),+]
        }
    };
}
