//! datasync: keep an agent's plugins in sync with a key-value store.
//!
//! WIP
#![cfg_attr(docsrs, feature(doc_cfg))]

mod composite;
pub mod coordinator;
mod done;
mod error;
mod event;
mod key;
pub mod local;
mod mirror;
mod revision;
#[cfg(any(test, feature = "testing"))]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
mod value;
mod watch;
mod write;

pub use composite::{CompositeError, CompositeWatcher, CompositeWriter};
pub use done::{AckStatus, BoxError, Done, DoneError, DoneWaiter};
pub use error::{Result, StoreError, WatchError};
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
    CasOutcome, Consistency, DeleteOptions, Deleted, Expect, Limits, Listing, PutOptions,
    ReadOptions, Store, TypedPutError, Writer, WriterExt,
};
