//! The pair on the in-memory transport under the real coordinator: ordered resync,
//! a route through a missing interface rejected through `Done`, and the registered pair
//! linked in, `routes` after `interfaces`.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::sync::{Arc, Mutex};
use std::time::Duration;

use datasync::coordinator::{
    Coordinator, CoordinatorConfig, CoordinatorHandle, PluginContext, PluginSpec, PluginState,
    Registry,
};
use datasync::local::Local;
use datasync::{Event, Key, Prefix, PutOptions, Value, Writer};
use datasync_netconfig::{Device, Interface, InterfacesPlugin, Report, Route, RoutesPlugin};

/// The stored value for `v`: JSON of an interface (`if/…`) or route (`rt/…`) as its
/// protobuf message, anything else as it is (a value the plugins cannot decode).
fn value(k: &str, v: &str) -> Value {
    let (ifc, rt) = (
        serde_json::from_str::<Interface>(v),
        serde_json::from_str::<Route>(v),
    );
    match (k.contains("if/"), k.contains("rt/"), ifc, rt) {
        (true, _, Ok(i), _) => Interface::value(i.mtu),
        (_, true, _, Ok(r)) => Route::value(&r.via),
        _ => Value::from(v.to_owned()),
    }
}

async fn put(store: &Local, k: &str, v: &str) {
    store
        .put(&Key::new(k).unwrap(), value(k, v), PutOptions::new())
        .await
        .unwrap();
}

/// Both plugins on `store` with their own device; routes added first, on purpose.
async fn start(
    store: &Local,
    device: &Device,
    lines: &Arc<Mutex<Vec<String>>>,
) -> CoordinatorHandle {
    let log = lines.clone();
    let report: Report = Arc::new(move |l: &str| log.lock().unwrap().push(l.to_owned()));
    let mut registry = Registry::new();
    let routes = RoutesPlugin::new("rt/", device.clone()).report(report.clone());
    registry.add(
        PluginSpec::new(
            "routes",
            vec![Prefix::new("rt/").unwrap()],
            Arc::new(routes),
        )
        .after("interfaces"),
    );
    let ifaces = InterfacesPlugin::new("if/", device.clone()).report(report);
    registry.add(PluginSpec::new(
        "interfaces",
        vec![Prefix::new("if/").unwrap()],
        Arc::new(ifaces),
    ));
    let config = CoordinatorConfig::default().retry_failed_after(None);
    let c = Coordinator::start(store, registry, config).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), c.ready())
        .await
        .expect("the first pass ends (deadlock?)");
    c
}

async fn until(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_in_dependency_order_then_changes() {
    let store = Local::new();
    put(&store, "if/eth0", r#"{"mtu":1500}"#).await;
    put(&store, "rt/default", r#"{"via":"eth0"}"#).await;
    let (device, lines) = (Device::default(), Arc::default());
    let c = start(&store, &device, &lines).await;
    {
        let l = lines.lock().unwrap();
        assert!(l[0].starts_with("[interfaces] resync"), "{l:?}");
        assert!(l[1].starts_with("[routes] resync"), "{l:?}");
    }
    let st = device.state().clone();
    assert_eq!(st.interfaces.get("eth0"), Some(&1500));
    assert_eq!(st.routes.get("default").map(String::as_str), Some("eth0"));
    assert!(
        c.status()
            .plugins
            .iter()
            .all(|p| p.state == PluginState::Ready)
    );

    put(&store, "if/eth1", r#"{"mtu":9000}"#).await;
    put(&store, "rt/storage", r#"{"via":"eth1"}"#).await;
    until("the route through eth1 is installed", || {
        device.state().routes.contains_key("storage")
    })
    .await;
    // A change's report carries previous and current value and revision.
    put(&store, "if/eth1", r#"{"mtu":1500}"#).await;
    until("eth1's MTU changes", || {
        device.state().interfaces.get("eth1") == Some(&1500)
    })
    .await;
    assert!(
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(r#"prev={"mtu":9000} now={"mtu":1500}"#)),
        "{:?}",
        lines.lock().unwrap()
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_through_a_missing_interface_is_rejected_through_done() {
    let store = Local::new();
    put(&store, "if/eth0", r#"{"mtu":1500}"#).await;
    let (device, lines) = (Device::default(), Arc::default());
    let c = start(&store, &device, &lines).await;
    put(&store, "rt/bad", r#"{"via":"eth9"}"#).await;
    until("the rejection is reported", || {
        c.status().plugin("routes").is_some_and(|p| p.failures == 1)
    })
    .await;
    let st = c.status();
    let routes = st.plugin("routes").unwrap();
    let (_, err) = routes.last_error.clone().unwrap();
    assert!(
        err.to_string()
            .contains(r#"rt/bad: interface "eth9" does not exist"#),
        "{err}"
    );
    assert!(!device.state().routes.contains_key("bad"));
    // The interfaces plugin is untouched by the other's failure.
    assert_eq!(st.plugin("interfaces").unwrap().failures, 0);
    // The coordinator resyncs routes: the route waits for its interface, the plugin is
    // ready for the others, and the route is installed once the interface appears.
    until("routes is resynced with the route pending", || {
        c.status()
            .plugin("routes")
            .is_some_and(|p| p.state == PluginState::Ready)
            && device.state().pending.contains_key("bad")
    })
    .await;
    put(&store, "rt/ok", r#"{"via":"eth0"}"#).await;
    put(&store, "if/eth9", r#"{"mtu":1500}"#).await;
    until("the pending route is installed with its interface", || {
        let d = device.state();
        d.routes.get("bad").is_some_and(|v| v == "eth9")
            && d.routes.contains_key("ok")
            && d.pending.is_empty()
    })
    .await;
    assert_eq!(c.status().plugin("routes").unwrap().failures, 1);
    // A bad interface value is refused through Done too.
    put(&store, "if/eth2", "not json").await;
    until("the bad interface is reported", || {
        c.status()
            .plugin("interfaces")
            .is_some_and(|p| p.failures == 1)
    })
    .await;
    c.shutdown().await;
}

#[tokio::test]
async fn the_registered_pair_is_linked_and_ordered() {
    let ctx = PluginContext::new(Arc::new(Local::new()));
    let order = Registry::from_inventory(&ctx).unwrap().resolve().unwrap();
    let names: Vec<_> = order.iter().map(|p| p.name.as_str()).collect();
    let (i, r) = (
        names.iter().position(|n| *n == "interfaces").unwrap(),
        names.iter().position(|n| *n == "routes").unwrap(),
    );
    assert!(i < r, "routes after interfaces: {names:?}");
    // Declared, not an accident of names: the order holds whatever they are called.
    assert_eq!(order[r].deps, ["interfaces"]);
    assert_eq!(order[i].prefixes, [Prefix::new("net/if/").unwrap()]);
}

/// Two stores under one composite, the pair over it: neither source's resync removes
/// what the other gave, through passes and per-source deletes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sources_keep_their_interfaces_and_routes_through_passes() {
    let (one, two) = (Local::new(), Local::new());
    put(&one, "if/eth0", r#"{"mtu":1500}"#).await;
    put(&one, "rt/a", r#"{"via":"eth0"}"#).await;
    put(&two, "if/eth1", r#"{"mtu":9000}"#).await;
    put(&two, "rt/b", r#"{"via":"eth1"}"#).await;
    // Across sources: two's route through one's interface.
    put(&two, "rt/c", r#"{"via":"eth0"}"#).await;
    let composite = datasync::CompositeWatcher::new()
        .with("one", Arc::new(one.clone()))
        .with("two", Arc::new(two.clone()));
    let device = Device::default();
    let mut registry = Registry::new();
    registry.add(
        PluginSpec::new(
            "routes",
            vec![Prefix::new("rt/").unwrap()],
            Arc::new(RoutesPlugin::new("rt/", device.clone())),
        )
        .after("interfaces"),
    );
    registry.add(PluginSpec::new(
        "interfaces",
        vec![Prefix::new("if/").unwrap()],
        Arc::new(InterfacesPlugin::new("if/", device.clone())),
    ));
    let c = Coordinator::start(&composite, registry, CoordinatorConfig::default())
        .await
        .unwrap();
    c.ready().await;
    let full = || {
        let d = device.state();
        d.interfaces.len() == 2
            && d.routes.keys().map(String::as_str).collect::<Vec<_>>() == ["a", "b", "c"]
            && d.pending.is_empty()
    };
    assert!(full(), "{:?}", *device.state());
    for _ in 0..2 {
        let before = c.status().passes;
        c.request_resync();
        until("both sources' passes", || c.status().passes >= before + 2).await;
        assert!(full(), "{:?}", *device.state());
    }
    // One's interface goes: the routes through it wait, the others stay.
    one.delete(
        &Key::new("if/eth0").unwrap(),
        datasync::DeleteOptions::new(),
    )
    .await
    .unwrap();
    until("routes through eth0 pending", || {
        let d = device.state();
        d.pending.keys().map(String::as_str).collect::<Vec<_>>() == ["a", "c"]
            && d.routes.keys().map(String::as_str).collect::<Vec<_>>() == ["b"]
    })
    .await;
    c.shutdown().await;
}

/// A transaction with one route that cannot be installed changes nothing (the
/// coordinator then resyncs the plugin; here the handler is called directly to see the
/// state in between).
#[tokio::test]
async fn a_change_is_applied_whole_or_not_at_all() {
    use datasync::coordinator::Plugin;
    use datasync::{Change, Done, KeyChange, Op, Revision, Source};
    let device = Device::default();
    let routes = RoutesPlugin::new("rt/", device.clone());
    let ifaces = InterfacesPlugin::new("if/", device.clone());
    let put_change = |k: &str, v: &str| KeyChange {
        key: Key::new(k).unwrap(),
        op: Op::Put,
        value: Some(value(k, v)),
        prev: None,
    };
    let send = |changes: Vec<KeyChange>, revision: u64| {
        let (done, waiter) = Done::channel();
        (
            Event::Change(Change::new(
                Source::from(""),
                Revision(revision),
                changes,
                done,
            )),
            waiter,
        )
    };
    let (ev, waiter) = send(vec![put_change("if/eth0", r#"{"mtu":1500}"#)], 1);
    ifaces.handle(ev).await;
    waiter.await.unwrap();
    let (ev, waiter) = send(
        vec![
            put_change("rt/good", r#"{"via":"eth0"}"#),
            put_change("rt/bad", r#"{"via":"eth9"}"#),
        ],
        2,
    );
    routes.handle(ev).await;
    assert!(waiter.await.is_err());
    assert!(device.state().routes.is_empty(), "{:?}", *device.state());
    let (ev, waiter) = send(
        vec![
            put_change("if/eth1", r#"{"mtu":1500}"#),
            put_change("if/eth2", "not json"),
        ],
        3,
    );
    ifaces.handle(ev).await;
    assert!(waiter.await.is_err());
    assert_eq!(device.state().interfaces.len(), 1, "{:?}", *device.state());
    // A message, but not a usable interface: refused the same way.
    let (ev, waiter) = send(vec![put_change("if/eth3", r#"{"mtu":0}"#)], 4);
    ifaces.handle(ev).await;
    let err = waiter.await.unwrap_err();
    assert!(err.to_string().contains("mtu 0 is outside"), "{err}");
    assert_eq!(device.state().interfaces.len(), 1, "{:?}", *device.state());
}
