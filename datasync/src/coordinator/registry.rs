//! Plugin registration (link time through `inventory`, or at run time) and ordering.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use crate::{Event, KeyError, Prefix, Writer};

/// A plugin: what it does with its events.
///
/// Every event carries a `Done`; answer it, now or later (e.g. from a task the plugin
/// spawns): the coordinator waits for it (with a timeout) before it moves on to the next
/// plugin. A plugin whose work is a function of the event answers with its result:
///
/// ```
/// use datasync::coordinator::Plugin;
/// use datasync::{BoxError, Change, Event, Resync};
///
/// struct Counter;
/// impl Counter {
///     async fn resync(&self, r: &Resync) -> Result<(), BoxError> { Ok(()) }
///     async fn change(&self, c: &Change) -> Result<(), BoxError> { Ok(()) }
/// }
///
/// #[async_trait::async_trait]
/// impl Plugin for Counter {
///     async fn handle(&self, event: Event) {
///         let result = match &event {
///             Event::Resync(r) => self.resync(r).await,
///             Event::Change(c) => self.change(c).await,
///             _ => Ok(()), // `Event` may grow
///         };
///         event.into_done().answer(result);
///     }
/// }
/// ```
///
/// Why one method and not `resync` and `change`: the `Done` is the contract (as in
/// cn-infra), and only the plugin knows when its work is done; a plugin that applies
/// asynchronously keeps the `Done` and answers it when it has. An `Err` answer fails the
/// event, and the coordinator records the error in the plugin's status.
#[async_trait::async_trait]
pub trait Plugin: Send + Sync + 'static {
    /// Handles one event: a [`crate::Resync`] of the plugin's prefixes, or a
    /// [`crate::Change`] restricted to them. The `Done` may be answered after this
    /// returns.
    ///
    /// A resync replaces what the plugin holds **from its source** (`resync.source`)
    /// only: over a [`crate::CompositeWatcher`] each part resyncs alone, and the
    /// others' state must stay. Over a plain store there is one source.
    async fn handle(&self, event: Event);

    /// Called once when the coordinator shuts down, after the last event, dependents
    /// before what they depend on. Release what the plugin holds here.
    async fn close(&self) {}
}

/// What a plugin factory gets.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PluginContext {
    /// Where the plugin writes.
    pub writer: Arc<dyn Writer>,
    /// Every plugin's settings (e.g. its section of the agent's config file), by plugin
    /// name.
    pub settings: Arc<BTreeMap<String, serde_json::Value>>,
    /// The coordinator these plugins run under, once it runs.
    resync: Arc<std::sync::OnceLock<Request>>,
}

/// How a context asks its coordinator for a pass.
#[derive(Clone)]
struct Request(Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Request")
    }
}

impl PluginContext {
    /// A context writing to `writer`, with no settings.
    pub fn new(writer: Arc<dyn Writer>) -> Self {
        PluginContext {
            writer,
            settings: Arc::default(),
            resync: Arc::default(),
        }
    }

    /// Where [`request_resync`](Self::request_resync) goes (set by
    /// `PluginContext::attach`, in `run`). The first binding holds.
    pub(super) fn bind_resync(&self, request: Arc<dyn Fn() + Send + Sync>) {
        let _ = self.resync.set(Request(request));
    }

    /// Asks for a resync pass (every plugin, in order; reason `Requested`): what a
    /// plugin does when it finds its own state wrong. `false` if the context is not
    /// attached to a running coordinator yet (whose first pass is still to come).
    pub fn request_resync(&self) -> bool {
        match self.resync.get() {
            Some(request) => {
                (request.0)();
                true
            }
            None => false,
        }
    }

    /// Sets every plugin's settings.
    #[must_use]
    pub fn with_settings(mut self, settings: BTreeMap<String, serde_json::Value>) -> Self {
        self.settings = Arc::new(settings);
        self
    }

    /// The settings of plugin `name` (`Null` if it has none). A section whose name
    /// differs only by `_` for `-` counts too (`file_mirror` for `file-mirror`: what an
    /// environment variable can spell).
    pub fn settings_for(&self, name: &str) -> &serde_json::Value {
        let norm = |s: &str| s.replace('_', "-");
        self.settings
            .get(name)
            .or_else(|| {
                self.settings
                    .iter()
                    .find(|(k, _)| norm(k) == norm(name))
                    .map(|(_, v)| v)
            })
            .unwrap_or(&serde_json::Value::Null)
    }
}

/// A plugin registered at link time. Submit one with [`crate::register_plugin!`].
///
/// A crate that nothing references is not linked, and its registrations never run:
/// binaries and tests must reference every plugin crate (`use my_plugin as _;`).
#[derive(Debug)]
pub struct PluginRegistration {
    /// Unique name.
    pub name: &'static str,
    /// Plugins that must be resynced before this one.
    pub deps: &'static [&'static str],
    /// Watched prefixes.
    pub prefixes: &'static [&'static str],
    /// Builds the plugin.
    pub factory: fn(&PluginContext) -> Arc<dyn Plugin>,
    /// What a failed or timed-out change does.
    pub on_change_failure: OnChangeFailure,
}

inventory::collect!(PluginRegistration);

/// Registers a plugin at link time.
///
/// ```
/// use std::sync::Arc;
/// use datasync::coordinator::{Plugin, PluginContext};
///
/// struct Routes;
/// #[async_trait::async_trait]
/// impl Plugin for Routes {
///     async fn handle(&self, event: datasync::Event) {
///         event.into_done().ok();
///     }
/// }
///
/// datasync::register_plugin! {
///     name: "routes",
///     deps: ["interfaces"],
///     prefixes: ["config/routes/"],
///     factory: |_ctx: &PluginContext| Arc::new(Routes),
/// }
/// ```
///
/// An optional last field, `on_change_failure: OnChangeFailure::Report` (or `Retry {
/// attempts: 3 }`), sets what a failed change does (default `Resync`).
#[macro_export]
macro_rules! register_plugin {
    (name: $name:expr, deps: [$($dep:expr),* $(,)?], prefixes: [$($p:expr),* $(,)?], factory: $factory:expr $(,)?) => {
        $crate::register_plugin! {
            name: $name,
            deps: [$($dep),*],
            prefixes: [$($p),*],
            factory: $factory,
            on_change_failure: $crate::coordinator::OnChangeFailure::Resync,
        }
    };
    (name: $name:expr, deps: [$($dep:expr),* $(,)?], prefixes: [$($p:expr),* $(,)?], factory: $factory:expr, on_change_failure: $policy:expr $(,)?) => {
        $crate::inventory::submit! {
            $crate::coordinator::PluginRegistration {
                name: $name,
                deps: &[$($dep),*],
                prefixes: &[$($p),*],
                factory: $factory,
                on_change_failure: $policy,
            }
        }
    };
}

/// A plugin ready to be ordered and run.
#[derive(Clone)]
pub struct PluginSpec {
    /// Unique name.
    pub name: String,
    /// Plugins that must be resynced before this one.
    pub deps: Vec<String>,
    /// Watched prefixes.
    pub prefixes: Vec<Prefix>,
    /// The plugin.
    pub plugin: Arc<dyn Plugin>,
    /// What a failed or timed-out change does (default [`OnChangeFailure::Resync`]).
    pub on_change_failure: OnChangeFailure,
}

/// What the coordinator does when a plugin fails a change, or does not answer it in
/// time: the plugin then holds something other than the store.
///
/// Why resync by default: most plugins' state depends on what they accepted (a route
/// needs its interface), so a rejected change leaves a plugin whose later changes would
/// build on state it does not have; only a resync puts it back on the store's state.
/// A plugin that cannot take a value should skip and report it in its resync (as the
/// netconfig plugins do), or the resync fails too, and that plugin waits out a
/// growing backoff between passes while the others go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnChangeFailure {
    /// The plugin gets no more changes; a resync pass follows after
    /// [`retry_backoff`](super::CoordinatorConfig::retry_backoff), and the plugin is
    /// ready again once its resync succeeds.
    #[default]
    Resync,
    /// The same change is handed over again, up to `attempts` times in all, with
    /// `retry_backoff` between; if it still fails, as [`OnChangeFailure::Resync`].
    Retry {
        /// Attempts in all, at least 1.
        attempts: u32,
    },
    /// Only reported (status, log); the plugin stays ready and gets the next changes.
    /// For plugins whose state does not build on what they accepted.
    Report,
}

impl fmt::Debug for PluginSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginSpec")
            .field("name", &self.name)
            .field("deps", &self.deps)
            .field("prefixes", &self.prefixes)
            .field("on_change_failure", &self.on_change_failure)
            .finish_non_exhaustive()
    }
}

impl PluginSpec {
    /// A plugin with no dependencies.
    pub fn new(name: &str, prefixes: Vec<Prefix>, plugin: Arc<dyn Plugin>) -> Self {
        PluginSpec {
            name: name.to_owned(),
            deps: Vec::new(),
            prefixes,
            plugin,
            on_change_failure: OnChangeFailure::default(),
        }
    }

    /// Sets what a failed or timed-out change does.
    #[must_use]
    pub fn on_change_failure(mut self, policy: OnChangeFailure) -> Self {
        self.on_change_failure = policy;
        self
    }

    /// Adds a dependency.
    #[must_use]
    pub fn after(mut self, dep: &str) -> Self {
        self.deps.push(dep.to_owned());
        self
    }
}

/// The plugin set cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// Two plugins share a name.
    #[error("plugin {0:?} is registered twice")]
    Duplicate(String),
    /// A plugin depends on one that is not registered.
    #[error("plugin {plugin:?} depends on {missing:?}, which is not registered")]
    MissingDependency {
        /// The dependent plugin.
        plugin: String,
        /// The missing dependency.
        missing: String,
    },
    /// Dependencies form a cycle among these plugins.
    #[error("dependency cycle among plugins {0:?}")]
    Cycle(Vec<String>),
    /// A plugin declares an invalid prefix.
    #[error("plugin {plugin:?} declares invalid prefix {prefix:?}: {error}")]
    InvalidPrefix {
        /// The plugin.
        plugin: String,
        /// The prefix as declared.
        prefix: String,
        /// Why it is invalid.
        error: KeyError,
    },
}

/// Collects plugins and puts them in resync order.
#[derive(Debug, Default)]
pub struct Registry {
    plugins: Vec<PluginSpec>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every plugin registered with [`crate::register_plugin!`] in the linked crates.
    pub fn from_inventory(ctx: &PluginContext) -> Result<Self, RegistryError> {
        let mut reg = Registry::new();
        for r in inventory::iter::<PluginRegistration> {
            let prefixes = r
                .prefixes
                .iter()
                .map(|p| {
                    Prefix::new(p).map_err(|error| RegistryError::InvalidPrefix {
                        plugin: r.name.to_owned(),
                        prefix: (*p).to_owned(),
                        error,
                    })
                })
                .collect::<Result<_, _>>()?;
            reg.add(PluginSpec {
                name: r.name.to_owned(),
                deps: r.deps.iter().map(|d| (*d).to_owned()).collect(),
                prefixes,
                plugin: (r.factory)(ctx),
                on_change_failure: r.on_change_failure,
            });
        }
        Ok(reg)
    }

    /// Adds a plugin at run time.
    pub fn add(&mut self, spec: PluginSpec) -> &mut Self {
        self.plugins.push(spec);
        self
    }

    /// The plugins added so far, sorted by name.
    pub fn specs(&self) -> impl Iterator<Item = &PluginSpec> {
        let mut specs: Vec<_> = self.plugins.iter().collect();
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        specs.into_iter()
    }

    /// Names of the plugins added so far, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<_> = self.plugins.iter().map(|p| p.name.as_str()).collect();
        names.sort_unstable();
        names
    }

    /// The plugins in resync order: dependencies first (Kahn's algorithm), ties by name.
    /// Link order and hash order never matter.
    pub fn resolve(self) -> Result<Vec<PluginSpec>, RegistryError> {
        let mut by_name: BTreeMap<String, PluginSpec> = BTreeMap::new();
        for p in self.plugins {
            if by_name.contains_key(&p.name) {
                return Err(RegistryError::Duplicate(p.name));
            }
            by_name.insert(p.name.clone(), p);
        }
        let mut pending: BTreeMap<&str, usize> = BTreeMap::new();
        let mut dependents: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for p in by_name.values() {
            let deps: BTreeSet<&str> = p.deps.iter().map(String::as_str).collect();
            for d in &deps {
                if !by_name.contains_key(*d) {
                    return Err(RegistryError::MissingDependency {
                        plugin: p.name.clone(),
                        missing: (*d).to_owned(),
                    });
                }
                dependents.entry(d).or_default().push(&p.name);
            }
            pending.insert(&p.name, deps.len());
        }
        let mut ready: BTreeSet<&str> = pending
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(k, _)| *k)
            .collect();
        let mut order: Vec<String> = Vec::with_capacity(by_name.len());
        while let Some(next) = ready.pop_first() {
            order.push(next.to_owned());
            pending.remove(next);
            for d in dependents.get(next).into_iter().flatten() {
                if let Some(n) = pending.get_mut(d) {
                    *n -= 1;
                    if *n == 0 {
                        ready.insert(d);
                    }
                }
            }
        }
        if !pending.is_empty() {
            return Err(RegistryError::Cycle(
                pending.keys().map(|k| (*k).to_owned()).collect(),
            ));
        }
        Ok(order
            .into_iter()
            .filter_map(|n| by_name.remove(&n))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nop;
    #[async_trait::async_trait]
    impl Plugin for Nop {
        async fn handle(&self, event: Event) {
            event.into_done().ok();
        }
    }

    fn spec(name: &str, deps: &[&str]) -> PluginSpec {
        let mut s = PluginSpec::new(name, vec![], Arc::new(Nop));
        for d in deps {
            s = s.after(d);
        }
        s
    }

    fn order(specs: Vec<PluginSpec>) -> Result<Vec<String>, RegistryError> {
        let mut r = Registry::new();
        for s in specs {
            r.add(s);
        }
        Ok(r.resolve()?.into_iter().map(|p| p.name).collect())
    }

    #[test]
    fn dependencies_first_ties_by_name() {
        let got = order(vec![
            spec("routes", &["interfaces"]),
            spec("zeta", &[]),
            spec("acl", &["interfaces", "routes"]),
            spec("interfaces", &[]),
            spec("alpha", &[]),
        ])
        .unwrap();
        assert_eq!(got, ["alpha", "interfaces", "routes", "acl", "zeta"]);
        // Insertion order does not matter.
        let again = order(vec![
            spec("alpha", &[]),
            spec("interfaces", &[]),
            spec("acl", &["routes", "interfaces"]),
            spec("zeta", &[]),
            spec("routes", &["interfaces"]),
        ])
        .unwrap();
        assert_eq!(got, again);
    }

    #[test]
    fn startup_errors() {
        assert_eq!(
            order(vec![spec("a", &[]), spec("a", &[])]),
            Err(RegistryError::Duplicate("a".into()))
        );
        assert_eq!(
            order(vec![spec("a", &["ghost"])]),
            Err(RegistryError::MissingDependency {
                plugin: "a".into(),
                missing: "ghost".into()
            })
        );
        assert_eq!(
            order(vec![spec("a", &["b"]), spec("b", &["a"]), spec("c", &[])]),
            Err(RegistryError::Cycle(vec!["a".into(), "b".into()]))
        );
    }
}
