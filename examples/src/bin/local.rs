//! Two dependent plugins on the in-memory transport: ordered startup resync, live changes
//! with previous values, a rejected change reported through `Done`, a TTL expiry, a prefix
//! delete and an operator-requested resync.
//!
//! Run: `cargo run -p datasync-examples --bin local`

use std::collections::BTreeMap;
use std::error::Error;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datasync::coordinator::{
    Coordinator, CoordinatorConfig, CoordinatorHandle, Handler, PluginSpec, Registry,
};
use datasync::local::Local;
use datasync::{DeleteOptions, Event, Key, KeyChange, Op, Prefix, PutOptions, Value, Writer};

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Interface {
    mtu: u32,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Route {
    via: String,
}

/// Interfaces known to the agent, shared by both plugins.
type Interfaces = Arc<Mutex<BTreeMap<String, u32>>>;

fn show(plugin: &str, c: &KeyChange, revision: datasync::Revision) {
    let text = |v: &Option<Value>| {
        v.as_ref().map_or("-".to_owned(), |v| {
            String::from_utf8_lossy(v.as_bytes()).into_owned()
        })
    };
    println!(
        "  [{plugin}] change r{revision}: {:?} {} prev={} now={}",
        c.op,
        c.key,
        text(&c.prev),
        text(&c.value)
    );
}

struct InterfacesPlugin(Interfaces);

#[async_trait::async_trait]
impl Handler for InterfacesPlugin {
    async fn handle(&self, event: Event) {
        let mut ifaces = self.0.lock().expect("not poisoned");
        match event {
            Event::Resync(r) => {
                ifaces.clear();
                for kv in r.values() {
                    let name = kv.key.as_str().trim_start_matches("if/").to_owned();
                    match kv.value.json::<Interface>() {
                        Ok(i) => {
                            ifaces.insert(name, i.mtu);
                        }
                        Err(e) => println!("  [interfaces] skipping {}: {e}", kv.key),
                    }
                }
                println!(
                    "  [interfaces] resync r{} ({:?}): {:?}",
                    r.revision, r.reason, *ifaces
                );
                r.done.ok();
            }
            Event::Change(c) => {
                for kc in &c.changes {
                    show("interfaces", kc, c.revision);
                    let name = kc.key.as_str().trim_start_matches("if/").to_owned();
                    match kc.value.as_ref().map(Value::json::<Interface>) {
                        Some(Ok(i)) => {
                            ifaces.insert(name, i.mtu);
                        }
                        Some(Err(e)) => return c.done.fail(e),
                        None => {
                            ifaces.remove(&name);
                        }
                    }
                }
                c.done.ok();
            }
            other => other.into_done().ok(),
        }
    }
}

struct RoutesPlugin(Interfaces);

impl RoutesPlugin {
    fn check(&self, key: &Key, value: &Value) -> Result<(), String> {
        let route: Route = value.json().map_err(|e| format!("{key}: {e}"))?;
        if self
            .0
            .lock()
            .expect("not poisoned")
            .contains_key(&route.via)
        {
            Ok(())
        } else {
            Err(format!("{key}: interface {:?} does not exist", route.via))
        }
    }
}

#[async_trait::async_trait]
impl Handler for RoutesPlugin {
    async fn handle(&self, event: Event) {
        match event {
            Event::Resync(r) => {
                let checked: Result<Vec<_>, _> = r
                    .values()
                    .map(|kv| self.check(&kv.key, &kv.value).map(|()| kv.key.as_str()))
                    .collect();
                match checked {
                    Ok(routes) => {
                        println!(
                            "  [routes] resync r{} ({:?}): {routes:?}",
                            r.revision, r.reason
                        );
                        r.done.ok();
                    }
                    Err(e) => r.done.fail(e),
                }
            }
            Event::Change(c) => {
                for kc in &c.changes {
                    show("routes", kc, c.revision);
                    if let (Op::Put, Some(v)) = (kc.op, &kc.value) {
                        if let Err(e) = self.check(&kc.key, v) {
                            println!("  [routes] rejected: {e}");
                            return c.done.fail(e);
                        }
                    }
                }
                c.done.ok();
            }
            other => other.into_done().ok(),
        }
    }
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn print_status(c: &CoordinatorHandle) {
    let st = c.status();
    println!("  status after {} pass(es):", st.passes);
    for p in &st.plugins {
        let err = p
            .last_error
            .as_ref()
            .map(|(r, e)| format!(" last error at r{r}: {e}"));
        println!(
            "    {:<10} {:?} at r{}, {} resyncs, {} changes, {} failures{}",
            p.name,
            p.state,
            p.revision,
            p.resyncs,
            p.changes,
            p.failures,
            err.unwrap_or_default()
        );
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let store = Local::new();
    let key = |k: &str| Key::new(k);
    store
        .put(
            &key("if/eth0")?,
            r#"{"mtu":1500}"#.into(),
            PutOptions::new(),
        )
        .await?;
    store
        .put(
            &key("rt/default")?,
            r#"{"via":"eth0"}"#.into(),
            PutOptions::new(),
        )
        .await?;

    let ifaces = Interfaces::default();
    let mut registry = Registry::new();
    // Registered routes first on purpose: the order comes from the dependency alone.
    registry.add(
        PluginSpec::new(
            "routes",
            vec![Prefix::new("rt/")?],
            Arc::new(RoutesPlugin(ifaces.clone())),
        )
        .after("interfaces"),
    );
    registry.add(PluginSpec::new(
        "interfaces",
        vec![Prefix::new("if/")?],
        Arc::new(InterfacesPlugin(ifaces.clone())),
    ));

    println!("1. startup: one snapshot, plugins in dependency order");
    let config = CoordinatorConfig::default().retry_failed_after(None);
    let coordinator = Coordinator::start(&store, registry, config).await?;
    coordinator.ready().await;

    println!("2. live changes, with previous values");
    store
        .put(
            &key("if/eth1")?,
            r#"{"mtu":9000}"#.into(),
            PutOptions::new(),
        )
        .await?;
    store
        .put(
            &key("rt/storage")?,
            r#"{"via":"eth1"}"#.into(),
            PutOptions::new(),
        )
        .await?;
    store
        .put(
            &key("if/eth1")?,
            r#"{"mtu":1500}"#.into(),
            PutOptions::new(),
        )
        .await?;
    settle().await;

    println!("3. a route to a missing interface is rejected through Done");
    store
        .put(
            &key("rt/bad")?,
            r#"{"via":"eth9"}"#.into(),
            PutOptions::new(),
        )
        .await?;
    settle().await;
    let routes = coordinator.status();
    let routes = routes.plugin("routes").ok_or("routes plugin missing")?;
    assert_eq!(routes.failures, 1, "the rejection must be reported");

    println!("4. a TTL key expires as a Delete with its previous value");
    let ttl = PutOptions::new().ttl(Duration::from_millis(300));
    store
        .put(&key("if/tmp0")?, r#"{"mtu":68}"#.into(), ttl)
        .await?;
    let gone = async {
        while ifaces.lock().expect("not poisoned").contains_key("tmp0") {
            settle().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), gone)
        .await
        .map_err(|_| "the TTL key did not expire within 10 s")?;

    println!("5. a prefix delete");
    store.delete(&key("rt/bad")?, DeleteOptions::new()).await?;
    let deleted = store
        .delete(&key("rt/")?, DeleteOptions::new().prefix())
        .await?;
    println!(
        "  deleted {} routes at r{}",
        deleted.count, deleted.revision
    );
    settle().await;

    println!("6. an operator asks for a full resync: same order, current state");
    coordinator.request_resync();
    settle().await;
    print_status(&coordinator);
    let st = coordinator.status();
    assert_eq!(st.passes, 2);
    assert!(
        st.plugins
            .iter()
            .all(|p| p.state == datasync::coordinator::PluginState::Ready)
    );
    coordinator.shutdown().await;
    println!("done");
    Ok(())
}
