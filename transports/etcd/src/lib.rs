//! datasync-etcd: a datasync transport for etcd v3, on the `etcd-client` crate.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use datasync::{Key, PutOptions, Writer};
//! use datasync_etcd::{EtcdConfig, EtcdStore};
//!
//! let config = EtcdConfig::new(["http://127.0.0.1:2379"]).with_namespace("agent1/");
//! let store = EtcdStore::connect(config).await?;
//! let rev = store.put(&Key::new("config/a")?, "1".into(), PutOptions::new()).await?;
//! println!("committed at etcd revision {rev}");
//! # Ok(()) }
//! ```
//!
//! How it keeps the contract:
//! - **Revisions** are etcd's: one per etcd transaction, so a prefix delete is one change
//!   event at one revision.
//! - **Resync**: every prefix of a registration is read at one revision R: the first page's
//!   header revision, then every further page and prefix pinned to R. The watch starts at
//!   R+1 with previous values, so nothing falls between the two (see `watch` for how
//!   continuity is kept after that).
//! - **Previous values** come from etcd (`prev_kv`), correct for every registration.
//!   etcd looks a previous value up when it sends the event, and drops it without an
//!   error if compaction passed it meanwhile; an event missing it becomes a `Compacted`
//!   resync, never a change that looks like a create (see `watch`).
//! - **TTL** puts use shared leases (see `lease`): keys live at least their TTL, rounded
//!   up to etcd's whole seconds and its minimum lease TTL (2 s by default). Expiry
//!   arrives as a Delete with the previous value. [`Session`] keeps keys alive for as
//!   long as the process wants them.
//! - **Compare-and-swap** is one etcd transaction comparing `mod_revision` (or
//!   `create_revision == 0` for create-if-absent).
//! - **Errors**: an unreachable or restarting etcd gives `StoreError::Unavailable` (or
//!   `Timeout`), both retryable; ordinary calls reconnect by themselves.
//! - **Namespace**: [`EtcdConfig::namespace`] is prepended to every key written and
//!   trimmed from every key read, like cn-infra's agent prefix. Keys under the namespace
//!   that datasync cannot represent (written by other clients) are skipped and logged.

mod config;
mod error;
mod keys;
mod lease;
mod session;
mod store;
mod watch;

pub use config::EtcdConfig;
pub use session::Session;
pub use store::EtcdStore;
