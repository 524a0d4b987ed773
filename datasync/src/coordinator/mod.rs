//! The resync coordinator: drives registered plugins through resync in a fixed order.
//!
//! Plugins register at link time ([`crate::register_plugin!`], collected with
//! `inventory`) or at run time ([`Registry::add`]). [`Registry::resolve`] orders them:
//! declared dependencies first, ties by name — never link order or hash order; duplicate
//! names, missing dependencies and cycles are errors at startup.
//!
//! The coordinator holds **one** watch registration over the union of all plugins'
//! prefixes, so every pass works from one consistent snapshot at one revision R: plugin 1
//! gets its slice and answers, then plugin 2, and so on. Changes from R+1 then go to each
//! plugin they concern, in plugin order, one revision at a time; the store's `Done` is
//! answered once every plugin has answered (first error wins). Every wait has a timeout,
//! and a timeout is a failure — never success, as it was in cn-infra.
//!
//! Over a [`crate::CompositeWatcher`] each part (source) resyncs on its own: a pass
//! hands every plugin that source's resync, and plugins replace only what that source
//! gave them ([`Plugin::handle`]). [`CoordinatorHandle::ready`] waits for a pass of
//! every source; a part whose watch stops is marked in [`SourceStatus::stopped`] while
//! the others go on. When the store's watch ends or fails for good, the coordinator
//! closes the plugins and says why in [`CoordinatorStatus::stopped`]
//! ([`CoordinatorHandle::stopped`] resolves): an agent must not look ready then.
//!
//! Any new resync from the store (a loss of continuity), a plugin's or operator's request
//! ([`CoordinatorHandle::request_resync`]) starts a new pass in the same order. Requests
//! made during a pass set one flag on the registration, so they coalesce into one
//! follow-up pass. A plugin that fails its resync (after the configured attempts) is
//! marked failed and gets no changes until a later pass succeeds; the others go on.
//! Passes after a failed one wait [`CoordinatorConfig::retry_failed_after`], doubling
//! with each failed pass in a row (up to 32 times), so a plugin that keeps failing on
//! one bad key cannot keep the others in passes.
//!
//! A failed or timed-out change follows the plugin's [`OnChangeFailure`]: by default
//! the plugin is marked [`PluginState::OutOfSync`] with the first change it did not
//! apply, gets no more changes, and a pass follows shortly to resync it. A plugin's
//! `handle` is never cancelled: one still running when its time is up keeps running,
//! the plugin counts as timed out, and it gets no event until that call has returned.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use datasync::coordinator::{Coordinator, CoordinatorConfig, Plugin, PluginSpec, Registry};
//! use datasync::{local::Local, Event, Prefix};
//!
//! struct Print;
//! #[async_trait::async_trait]
//! impl Plugin for Print {
//!     async fn handle(&self, event: Event) {
//!         println!("{} at {}", if matches!(event, Event::Resync(_)) { "resync" } else { "change" }, event.revision());
//!         event.into_done().ok();
//!     }
//! }
//!
//! let store = Local::new();
//! let mut registry = Registry::new();
//! registry.add(PluginSpec::new("ifaces", vec![Prefix::new("if/")?], Arc::new(Print)));
//! registry.add(PluginSpec::new("routes", vec![Prefix::new("rt/")?], Arc::new(Print)).after("ifaces"));
//! let coordinator = Coordinator::start(&store, registry, CoordinatorConfig::default()).await?;
//! coordinator.ready().await;
//! assert_eq!(coordinator.status().passes, 1);
//! coordinator.shutdown().await;
//! # Ok(()) }
//! ```

mod registry;
mod run;
mod status;

pub use registry::{
    OnChangeFailure, Plugin, PluginContext, PluginRegistration, PluginSpec, Registry, RegistryError,
};
pub use run::{Coordinator, CoordinatorConfig, CoordinatorError, CoordinatorHandle, ResyncTrigger};
pub use status::{CoordinatorStatus, PluginState, PluginStatus, SourceStatus};

#[cfg(test)]
mod tests;
