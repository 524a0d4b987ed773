//! datasync-netconfig: two plugins with a dependency, the shape of a real agent's
//! network configuration. `interfaces` keeps a device's interfaces in sync with
//! `net/if/<name>` (an [`Interface`] protobuf message, `{"mtu": 1500}` as JSON);
//! `routes` installs `net/rt/<name>` (a [`Route`], `{"via": "eth0"}`) only through an
//! interface the device has: a change to a route
//! through a missing interface is rejected through `Done` with an error naming the
//! route and the interface. The coordinator then resyncs `routes`, which keeps such a
//! route pending (reported) and installs it once the interface appears, so one route
//! cannot keep the plugin from the others.
//!
//! Dependent state, the pattern to copy:
//! - A change is checked whole before any of it is applied: a transaction with one
//!   bad value fails through `Done` and changes nothing, never half.
//! - What depends on something missing waits instead of failing the resync: a route
//!   whose interface is gone (deleted, or not there yet) is set aside as pending, not
//!   left installed, and comes back when the interface does.
//! - Per source: each resync replaces only what its source gave (a
//!   [`datasync::CompositeWatcher`] part), so two stores under one composite can each
//!   hold interfaces and routes. An interface or route two sources both hold is the
//!   last writer's, and a source's delete removes only what it owns.
//!
//! Why the order matters: at every resync the coordinator hands `interfaces` its
//! snapshot and waits for its `Done` before `routes` gets the same revision's, because
//! `routes` declares it runs after `interfaces`. So a resync never finds a route whose
//! interface is merely not applied yet; a pending route really has no interface.
//!
//! The registered plugins (linked into an agent with `use datasync_netconfig as _;`)
//! configure [`Device::global`], the process's one device, as a real network stack is
//! one per host. [`InterfacesPlugin::new`] and [`RoutesPlugin::new`] build the pair on
//! a device and prefixes of one's own (the examples do), with a [`Report`] of what they
//! do (default: `tracing` at info).

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use datasync::coordinator::{Plugin, PluginContext};
use datasync::{Event, Key, KeyChange, Op, Revision, Source, Value};

/// The interfaces plugin's name.
pub const INTERFACES: &str = "interfaces";
/// The routes plugin's name.
pub const ROUTES: &str = "routes";
/// The registered interfaces plugin's prefix.
pub const INTERFACES_PREFIX: &str = "net/if/";
/// The registered routes plugin's prefix.
pub const ROUTES_PREFIX: &str = "net/rt/";

datasync::register_plugin! {
    name: INTERFACES,
    deps: [],
    prefixes: [INTERFACES_PREFIX],
    factory: |_ctx: &PluginContext| Arc::new(InterfacesPlugin::new(INTERFACES_PREFIX, Device::global())),
}

datasync::register_plugin! {
    name: ROUTES,
    deps: [INTERFACES],
    prefixes: [ROUTES_PREFIX],
    factory: |_ctx: &PluginContext| Arc::new(RoutesPlugin::new(ROUTES_PREFIX, Device::global())),
}

/// An interface's configuration: the protobuf message stored under `net/if/`
/// (`message Interface { uint32 mtu = 1; }`), `{"mtu": 1500}` as JSON.
#[derive(Clone, PartialEq, Eq, prost::Message, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    /// The MTU.
    #[prost(uint32, tag = "1")]
    pub mtu: u32,
}

/// A route's configuration: the protobuf message stored under `net/rt/`
/// (`message Route { string via = 1; }`), `{"via": "eth0"}` as JSON.
#[derive(Clone, PartialEq, Eq, prost::Message, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// The interface the route goes through.
    #[prost(string, tag = "1")]
    pub via: String,
}

datasync::register_model!(name: "netconfig.Interface", prefix: INTERFACES_PREFIX, message: Interface);
datasync::register_model!(name: "netconfig.Route", prefix: ROUTES_PREFIX, message: Route);

/// The MTUs an interface may have (IPv4's minimum to the largest frame).
pub const MTU: std::ops::RangeInclusive<u32> = 68..=65535;

/// `v` as an interface: a message whose MTU is in [`MTU`].
fn interface(v: &Value) -> Result<Interface, String> {
    let i: Interface = v.proto().map_err(|e| e.to_string())?;
    if !MTU.contains(&i.mtu) {
        return Err(format!("mtu {} is outside {MTU:?}", i.mtu));
    }
    Ok(i)
}

impl Interface {
    /// The stored value of an interface with `mtu`.
    pub fn value(mtu: u32) -> Value {
        Value::from(prost::Message::encode_to_vec(&Interface { mtu }))
    }
}

impl Route {
    /// The stored value of a route through `via`.
    pub fn value(via: &str) -> Value {
        Value::from(prost::Message::encode_to_vec(&Route {
            via: via.to_owned(),
        }))
    }
}

/// A value as JSON if it is an `M`, else its text (lossy).
fn render<M>(v: &Value) -> String
where
    M: prost::Message + Default + serde::Serialize,
{
    match v
        .proto::<M>()
        .ok()
        .and_then(|m| serde_json::to_string(&m).ok())
    {
        Some(json) => json,
        None => String::from_utf8_lossy(v.as_bytes()).into_owned(),
    }
}

/// What the plugins configure: interfaces (name → MTU) and installed routes (name →
/// interface). Cheap to clone; clones share the state.
#[derive(Debug, Clone, Default)]
pub struct Device(Arc<Mutex<DeviceState>>);

/// The state of a [`Device`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceState {
    /// Interfaces: name → MTU.
    pub interfaces: BTreeMap<String, u32>,
    /// Installed routes: name → interface.
    pub routes: BTreeMap<String, String>,
    /// Routes the store holds whose interface the device does not have (yet): name →
    /// interface. Installed when the interface appears; back here if it goes.
    pub pending: BTreeMap<String, String>,
    /// The source each interface came from.
    interface_sources: BTreeMap<String, Source>,
    /// The source each route (installed or pending) came from.
    route_sources: BTreeMap<String, Source>,
}

impl DeviceState {
    /// A resync of `source`'s interfaces: its others go, other sources' stay.
    fn resync_interfaces(&mut self, source: &Source, new: BTreeMap<String, u32>) {
        let gone: Vec<String> = owned_by(&self.interface_sources, source)
            .filter(|n| !new.contains_key(*n))
            .cloned()
            .collect();
        for n in gone {
            self.interfaces.remove(&n);
            self.interface_sources.remove(&n);
        }
        for (n, mtu) in new {
            self.interface_sources.insert(n.clone(), source.clone());
            self.interfaces.insert(n, mtu);
        }
        self.reconcile();
    }

    /// A resync of `source`'s routes (name → interface): its others go, other
    /// sources' stay.
    fn resync_routes(&mut self, source: &Source, new: BTreeMap<String, String>) {
        let gone: Vec<String> = owned_by(&self.route_sources, source)
            .filter(|n| !new.contains_key(*n))
            .cloned()
            .collect();
        for n in gone {
            self.remove_route(&n);
        }
        for (n, via) in new {
            self.put_route(source, n, via);
        }
        self.reconcile();
    }

    fn put_route(&mut self, source: &Source, name: String, via: String) {
        self.routes.remove(&name);
        self.route_sources.insert(name.clone(), source.clone());
        self.pending.insert(name, via);
    }

    fn remove_route(&mut self, name: &str) {
        self.routes.remove(name);
        self.pending.remove(name);
        self.route_sources.remove(name);
    }

    /// Installs the pending routes whose interface exists, and sets aside installed
    /// ones whose interface is gone.
    fn reconcile(&mut self) {
        let (ready, waiting): (BTreeMap<_, _>, BTreeMap<_, _>) = std::mem::take(&mut self.pending)
            .into_iter()
            .chain(std::mem::take(&mut self.routes))
            .partition(|(_, via)| self.interfaces.contains_key(via));
        self.routes = ready;
        self.pending = waiting;
    }
}

impl Device {
    /// The process's device, which the registered plugins configure.
    pub fn global() -> Device {
        static GLOBAL: LazyLock<Device> = LazyLock::new(Device::default);
        GLOBAL.clone()
    }

    /// The state now.
    pub fn state(&self) -> MutexGuard<'_, DeviceState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn owned_by<'a>(
    owners: &'a BTreeMap<String, Source>,
    source: &'a Source,
) -> impl Iterator<Item = &'a String> {
    owners
        .iter()
        .filter(move |(_, s)| *s == source)
        .map(|(n, _)| n)
}

/// Whether `source` may delete `name`: it owns it, or nobody does.
fn may_delete(owners: &BTreeMap<String, Source>, name: &str, source: &Source) -> bool {
    owners.get(name).is_none_or(|s| s == source)
}

/// Where the plugins report what they do, a line at a time.
pub type Report = Arc<dyn Fn(&str) + Send + Sync>;

fn log_report() -> Report {
    Arc::new(|line: &str| tracing::info!("{line}"))
}

/// One key change as a report line, values shown by `render`.
fn describe(
    plugin: &str,
    c: &KeyChange,
    revision: Revision,
    render: fn(&Value) -> String,
) -> String {
    let text = |v: &Option<Value>| v.as_ref().map_or("-".to_owned(), render);
    format!(
        "[{plugin}] change r{revision}: {:?} {} prev={} now={}",
        c.op,
        c.key,
        text(&c.prev),
        text(&c.value)
    )
}

fn name<'a>(prefix: &str, key: &'a Key) -> &'a str {
    key.as_str().strip_prefix(prefix).unwrap_or(key.as_str())
}

/// What each plugin of the pair holds: its prefix, its device, where it reports.
struct Parts {
    prefix: String,
    device: Device,
    report: Report,
}

impl Parts {
    fn new(prefix: &str, device: Device) -> Self {
        Parts {
            prefix: prefix.to_owned(),
            device,
            report: log_report(),
        }
    }
}

impl std::fmt::Debug for Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parts")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Keeps a [`Device`]'s interfaces in sync with a prefix.
#[derive(Debug)]
pub struct InterfacesPlugin(Parts);

impl InterfacesPlugin {
    /// Interfaces under `prefix`, configured on `device`.
    pub fn new(prefix: &str, device: Device) -> Self {
        InterfacesPlugin(Parts::new(prefix, device))
    }

    /// Reports through `report` instead of `tracing`.
    #[must_use]
    pub fn report(mut self, report: Report) -> Self {
        self.0.report = report;
        self
    }
}

#[async_trait::async_trait]
impl Plugin for InterfacesPlugin {
    async fn handle(&self, event: Event) {
        match event {
            Event::Resync(r) => {
                let mut interfaces = BTreeMap::new();
                for kv in r.values() {
                    match interface(&kv.value) {
                        Ok(i) => {
                            interfaces.insert(name(&self.0.prefix, &kv.key).to_owned(), i.mtu);
                        }
                        // One bad value is reported, and does not hold up the others.
                        Err(e) => {
                            (self.0.report)(&format!("[interfaces] skipping {}: {e}", kv.key))
                        }
                    }
                }
                (self.0.report)(&format!(
                    "[interfaces] resync r{} ({:?}) of source {:?}: {:?}",
                    r.revision, r.reason, r.source, interfaces
                ));
                self.0
                    .device
                    .state()
                    .resync_interfaces(&r.source, interfaces);
                r.done.ok();
            }
            Event::Change(c) => {
                // Checked whole first: a bad value changes nothing.
                let mut ops = Vec::with_capacity(c.changes.len());
                for kc in &c.changes {
                    (self.0.report)(&describe(INTERFACES, kc, c.revision, render::<Interface>));
                    let n = name(&self.0.prefix, &kc.key).to_owned();
                    match kc.value.as_ref().map(interface) {
                        Some(Ok(i)) => ops.push((n, Some(i.mtu))),
                        Some(Err(e)) => return c.done.fail(format!("{}: {e}", kc.key)),
                        None => ops.push((n, None)),
                    }
                }
                let mut device = self.0.device.state();
                for (n, mtu) in ops {
                    match mtu {
                        Some(mtu) => {
                            device.interface_sources.insert(n.clone(), c.source.clone());
                            device.interfaces.insert(n, mtu);
                        }
                        None if may_delete(&device.interface_sources, &n, &c.source) => {
                            device.interfaces.remove(&n);
                            device.interface_sources.remove(&n);
                        }
                        None => {}
                    }
                }
                device.reconcile();
                drop(device);
                c.done.ok();
            }
            other => other.into_done().ok(),
        }
    }
}

/// Installs routes under a prefix on a [`Device`], only through its interfaces.
#[derive(Debug)]
pub struct RoutesPlugin(Parts);

impl RoutesPlugin {
    /// Routes under `prefix`, installed on `device`.
    pub fn new(prefix: &str, device: Device) -> Self {
        RoutesPlugin(Parts::new(prefix, device))
    }

    /// Reports through `report` instead of `tracing`.
    #[must_use]
    pub fn report(mut self, report: Report) -> Self {
        self.0.report = report;
        self
    }

    /// The route's interface, if the device has it; else why not (`Ok(Err(via))`:
    /// only the interface is missing; `Err`: the value is not a route).
    fn check(&self, key: &Key, value: &Value) -> Result<Result<String, String>, String> {
        let route: Route = value.proto().map_err(|e| format!("{key}: {e}"))?;
        if route.via.is_empty() {
            return Err(format!("{key}: a route needs an interface (via)"));
        }
        if self.0.device.state().interfaces.contains_key(&route.via) {
            Ok(Ok(route.via))
        } else {
            Ok(Err(route.via))
        }
    }
}

#[async_trait::async_trait]
impl Plugin for RoutesPlugin {
    async fn handle(&self, event: Event) {
        match event {
            // A route whose interface is missing waits for it (installed when the
            // interface plugin adds it), and a value that is no route is skipped and
            // reported: neither holds up the others. Failing the resync on one would
            // keep the plugin from every later change until that key is fixed (the
            // coordinator resyncs a plugin that rejected a change, so a route rejected
            // below comes back here).
            Event::Resync(r) => {
                let mut all = BTreeMap::new();
                for kv in r.values() {
                    let n = name(&self.0.prefix, &kv.key).to_owned();
                    match self.check(&kv.key, &kv.value) {
                        Ok(Ok(via)) => {
                            all.insert(n, via);
                        }
                        Ok(Err(via)) => {
                            (self.0.report)(&format!(
                                "[routes] {}: waiting for interface {via:?}",
                                kv.key
                            ));
                            all.insert(n, via);
                        }
                        Err(e) => (self.0.report)(&format!("[routes] skipping {e}")),
                    }
                }
                (self.0.report)(&format!(
                    "[routes] resync r{} ({:?}) of source {:?}: {:?}",
                    r.revision,
                    r.reason,
                    r.source,
                    all.keys().collect::<Vec<_>>()
                ));
                self.0.device.state().resync_routes(&r.source, all);
                r.done.ok();
            }
            Event::Change(c) => {
                // Checked whole first: one route that cannot be installed changes
                // nothing.
                let mut ops = Vec::with_capacity(c.changes.len());
                for kc in &c.changes {
                    (self.0.report)(&describe(ROUTES, kc, c.revision, render::<Route>));
                    let n = name(&self.0.prefix, &kc.key).to_owned();
                    match (kc.op, &kc.value) {
                        (Op::Put, Some(v)) => match self.check(&kc.key, v) {
                            Ok(Ok(via)) => ops.push((n, Some(via))),
                            Ok(Err(via)) => {
                                let e = format!("{}: interface {via:?} does not exist", kc.key);
                                (self.0.report)(&format!("[routes] rejected: {e}"));
                                return c.done.fail(e);
                            }
                            Err(e) => {
                                (self.0.report)(&format!("[routes] rejected: {e}"));
                                return c.done.fail(e);
                            }
                        },
                        _ => ops.push((n, None)),
                    }
                }
                let mut device = self.0.device.state();
                for (n, via) in ops {
                    match via {
                        Some(via) => device.put_route(&c.source, n, via),
                        None if may_delete(&device.route_sources, &n, &c.source) => {
                            device.remove_route(&n)
                        }
                        None => {}
                    }
                }
                device.reconcile();
                drop(device);
                c.done.ok();
            }
            other => other.into_done().ok(),
        }
    }
}
