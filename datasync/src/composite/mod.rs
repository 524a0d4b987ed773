//! Composites: several stores behind one [`crate::Watcher`] or [`crate::Writer`].
//!
//! cn-infra merged the resyncs of its sources into one, so a resync of one source deleted
//! the keys of another. Here every event names its [`crate::Source`] (the part's name), a
//! resync covers its source only, and [`crate::Mirror`] (or any consumer that keeps state
//! per source) never lets one part erase another.

mod watcher;
mod writer;

pub use crate::error::CompositeError;
pub use watcher::CompositeWatcher;
pub use writer::CompositeWriter;

#[cfg(test)]
mod tests;
