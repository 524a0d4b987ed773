//! datasync: keep an agent's plugins in sync with a key-value store.
//!
//! A consumer **watches** key prefixes and gets one ordered stream: first a
//! [`Resync`] (every value under its prefixes at one revision R), then [`Change`]s from
//! R+1 on (key, [`Op`], current and previous value, revision). It answers every event
//! through its [`Done`]. Whenever the transport loses continuity (a reconnect, a
//! compaction, a queue overflow, a snapshot install), another resync follows; the stream
//! never resumes silently past a gap. Writes go through [`Writer`]: put (with TTL),
//! delete (of a key or a prefix, returning the count), get/list at a revision,
//! compare-and-swap on a key's revision, and transactions over several keys ([`Txn`])
//! where the store has them.
//!
//! The rules every transport keeps, with the tests that check them, are in the
//! repository's `docs/CONTRACT.md`; `docs/ARCHITECTURE.md` maps the crates and modules.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use datasync::{local::Local, DeleteOptions, Event, Key, Mirror, Prefix, PutOptions,
//!     Watcher, WatchOptions, Writer};
//! use futures_util::StreamExt;
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Iface { mtu: u32 }
//!
//! let store = Local::new(); // or the raft, etcd or NATS transport: same traits
//! store.put(&Key::new("if/eth0")?, r#"{"mtu":1500}"#.into(), PutOptions::new()).await?;
//!
//! let mut watch = store.watch("ifaces", &[Prefix::new("if/")?], WatchOptions::default()).await?;
//! let mut state = Mirror::new(); // applies events and checks the contract as it goes
//!
//! // 1. One resync with everything under the prefixes at one revision.
//! let Some(Ok(event)) = watch.next().await else { unreachable!() };
//! state.apply(&event)?;
//! if let Event::Resync(resync) = event {
//!     for kv in resync.values() {
//!         let iface: Iface = kv.value.json()?; // decode errors are per value
//!         assert_eq!(iface.mtu, 1500);
//!     }
//!     resync.done.ok(); // dropping it unanswered would be reported as an error
//! }
//!
//! // 2. Then changes, with previous values, in revision order.
//! let ttl = PutOptions::new().ttl(Duration::from_secs(30));
//! let rev = store.put(&Key::new("if/eth1")?, r#"{"mtu":9000}"#.into(), ttl).await?;
//! let Some(Ok(Event::Change(change))) = watch.next().await else { unreachable!() };
//! assert_eq!((change.revision, change.changes[0].prev.is_none()), (rev, true));
//! change.done.ok();
//!
//! let deleted = store.delete(&Key::new("if/")?, DeleteOptions::new().prefix()).await?;
//! assert_eq!(deleted.count, 2);
//! # Ok(()) }
//! ```
//!
//! The pieces:
//! - [`Key`], [`Prefix`], [`Revision`], [`Value`] (lazy [`Proto`] / [`Json`] decoding);
//! - [`Watcher`] → [`Watch`] (a `Stream` of [`Event`]s) and its [`Registration`] (close,
//!   request a resync, read acknowledgement status); [`Writer`] and its options;
//! - [`local`]: the in-memory transport, the reference implementation of the contract;
//! - [`CompositeWatcher`] / [`CompositeWriter`]: several stores behind one trait, each
//!   source's resync scoped to that source;
//! - [`coordinator`]: drives registered plugins through resync in a fixed order;
//! - [`transport`], for transports only: the producer's side of a registration, the
//!   resync driver and the queues;
//! - `testing` (feature `testing`): the conformance suite every transport runs unchanged.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod composite;
pub mod coordinator;
mod done;
mod error;
mod event;
mod key;
pub mod local;
mod mirror;
pub mod model;
mod revision;
mod scope;
#[cfg(any(test, feature = "testing"))]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
pub mod transport;
mod value;
mod watch;
mod write;

pub use composite::{CompositeError, CompositeWatcher, CompositeWriter};
pub use done::{AckStatus, BoxError, Done, DoneError, DoneWaiter};
pub use error::{Result, StoreError, WatchError, error_chain};
pub use event::{
    Change, Event, KeyChange, KeyValue, Op, PrefixValues, Resync, ResyncReason, Source,
};
#[doc(hidden)]
pub use inventory;
pub use key::{Key, KeyError, MAX_KEY_LEN, Prefix, PrefixSet};
pub use mirror::{Mirror, MirrorError};
pub use revision::Revision;
pub use value::{Codec, DecodeError, EncodeError, Json, Proto, Value};
pub use watch::{Registration, Watch, WatchOptions, Watcher};
pub use write::{
    CasOutcome, Consistency, DeleteOptions, Deleted, Expect, Limits, Listing, MAX_TTL, MAX_TXN_OPS,
    PutOptions, ReadOptions, Store, Txn, TxnOp, TxnOutcome, TypedPutError, UPDATE_ATTEMPTS,
    Updated, Writer, WriterExt,
};
