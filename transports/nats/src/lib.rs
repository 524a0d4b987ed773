//! datasync-nats: a datasync transport for NATS JetStream Key-Value, on `async-nats`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use datasync::{Key, PutOptions, Writer};
//! use datasync_nats::{NatsConfig, NatsStore};
//!
//! let config = NatsConfig::new(["nats://127.0.0.1:4222"]).with_bucket("agent1");
//! let store = NatsStore::connect(config).await?; // creates the bucket if missing
//! let rev = store.put(&Key::new("config/a")?, "1".into(), PutOptions::new()).await?;
//! println!("committed at stream sequence {rev}");
//! # Ok(()) }
//! ```
//!
//! How it keeps the contract on a server that has no transactions and no previous
//! values:
//! - **Revisions** are the bucket's stream sequences. Every NATS write is one message,
//!   so every change is its own event; a **prefix delete is one delete marker per key**,
//!   each at its own revision (the returned revision is the last one), not one
//!   transaction.
//! - **Keys** map losslessly onto NATS subjects, `/` becoming the token separator (see
//!   the table in `keys`); a key longer than 3 KiB once mapped is refused with
//!   `KeyError::Unrepresentable`. Subjects other clients wrote that are not such a
//!   mapping are skipped (and logged).
//! - **Resync** reads the last version of every watched subject through one consumer,
//!   at one revision R (see `NatsStore` internals, `snapshot`), including the empty
//!   bucket (the consumer's pending count, not a `seen_current` flag, ends it); the same
//!   consumer then delivers the changes from R+1.
//! - **Previous values** come from a per-registration cache seeded by each resync.
//! - **Consumers**: every registration holds one consumer on the bucket's stream while
//!   it runs, and so does a `list`, a read at a past revision or a prefix delete while
//!   it reads (a released consumer is deleted in the background). nats-server 2.15
//!   refuses a stream's 1001st consumer unless the stream or the server says otherwise
//!   (`jetstream { limits { default_max_consumers: N } }`); past it, `watch` and those
//!   reads fail with `StoreError::Backend` ("maximum consumers limit reached"). The
//!   `watch_scale` bench raises it to hold 10,000 registrations.
//! - **Continuity**: a lost message, a silent or ended consumer, a reconnect: a new
//!   resync (see `watch`).
//! - **TTL** is NATS's per-message TTL, rounded up to whole seconds (never to zero). The
//!   bucket is created with limit markers, so an expiry writes a delete marker that
//!   watchers see as a Delete with the previous value. A TTL put replaces the key's
//!   kept versions (a rollup), so that its expiry leaves the key absent rather than
//!   bringing an older version back. A watcher away for longer than
//!   [`NatsConfig::marker_ttl`] learns of an expiry by its next resync.
//! - **Compare-and-swap** publishes with `Nats-Expected-Last-Subject-Sequence`, after
//!   reading the key's last version (a delete marker there means "absent").
//! - **Transactions over several keys** (`Writer::txn`) answer `StoreError::Unsupported`.
//!   JetStream's atomic batch publish (server 2.12) commits several messages all or
//!   nothing, with per-message expected sequences, but each message at a sequence of
//!   its own: watchers would see several changes at several revisions, where the
//!   contract (rule 3) promises one change at one revision.
//! - **Reads at a past revision** use the versions the bucket keeps, judged by the
//!   bucket's own limits as its stream reports them (a bucket made elsewhere, e.g. by
//!   `nats kv add` with a history of 1, is read by its limits, not by
//!   [`NatsConfig::history`]); a `get` reads the key's own subject only. Where versions
//!   up to that revision may have been dropped (a key's history full, a rollup) the
//!   read fails with `StoreError::Compacted`. On a bucket where whole keys can vanish
//!   through the stream's own limits (age, count, size), or through per-message TTLs
//!   on a bucket without expiry markers, they do so at no revision and
//!   leave no trace: once the stream has removed a message, reads at revisions from it
//!   on fail with `Compacted`, but for the present one. With per-message TTLs (the
//!   buckets this crate makes), a version whose TTL ran out is removed at no revision
//!   too: a key's last one leaves an expiry marker that expires in turn
//!   ([`NatsConfig::marker_ttl`] later), one followed by a later version just goes. So
//!   an answer at a past revision that rests on a key's absence (a `get` of a key with
//!   no version kept at or below it, and every listing) fails with `Compacted` once the
//!   stream has removed any sequence up to that revision (a history drop cannot be told
//!   from an expiry); a key with a version kept at or below it is read exactly.
//! - **Keys written by other clients** that are no encoding of a datasync key (an
//!   escape where none is needed, `=2F` for `/`, bytes outside the alphabet) are
//!   skipped as foreign, never read as another key.
//! - **Flow control**: a consumer's flow-control requests are answered, and so is a
//!   heartbeat that says the consumer is stalled on one (its answer was lost), so a
//!   watch never stalls silently.
//! - **Errors**: an unreachable or restarting server gives `StoreError::Unavailable` or
//!   `Timeout` (retryable); refused credentials are final.

mod bucket;
mod config;
mod consumer;
mod error;
mod keys;
mod store;
mod watch;

#[cfg(feature = "testing")]
pub mod testing;

pub use config::{Auth, NatsConfig};
pub use keys::MAX_SUBJECT_KEY;
pub use store::NatsStore;
