//! The example plugins shared by the runnable scenarios in `src/bin/`: interfaces, and
//! routes that depend on them (a route through a missing interface is rejected through
//! `Done`).

use std::collections::BTreeMap;
use std::error::Error;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datasync::coordinator::{
    Coordinator, CoordinatorConfig, CoordinatorHandle, Handler, PluginSpec, Registry,
};
use datasync::{
    DeleteOptions, Event, Key, KeyChange, Op, Prefix, PutOptions, Value, Watcher, Writer,
};

/// An interface's configuration (JSON under `if/<name>`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Interface {
    /// The MTU.
    pub mtu: u32,
}

/// A route's configuration (JSON under `rt/<name>`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Route {
    /// The interface the route goes through.
    pub via: String,
}

/// Interfaces known to the agent, shared by both plugins: name → MTU.
pub type Interfaces = Arc<Mutex<BTreeMap<String, u32>>>;

/// Prints one key change.
pub fn show(plugin: &str, c: &KeyChange, revision: datasync::Revision) {
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

/// Keeps [`Interfaces`] in sync with `if/`.
#[derive(Debug)]
pub struct InterfacesPlugin(pub Interfaces);

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

/// Accepts routes under `rt/` only through a known interface; rejects others through
/// `Done`.
#[derive(Debug)]
pub struct RoutesPlugin(pub Interfaces);

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

/// Gives the plugins a moment to take what was written.
pub async fn settle() {
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Prints every plugin's status.
pub fn print_status(c: &CoordinatorHandle) {
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

/// Starts the coordinator with both plugins (no retries, so a failure stays visible)
/// and waits for the first pass.
pub async fn start(
    store: &dyn Watcher,
    ifaces: &Interfaces,
) -> Result<CoordinatorHandle, Box<dyn Error>> {
    let config = CoordinatorConfig::default().retry_failed_after(None);
    let coordinator = Coordinator::start(store, registry(ifaces)?, config).await?;
    coordinator.ready().await;
    Ok(coordinator)
}

/// A registry with both plugins; routes are added first on purpose: the order comes
/// from the declared dependency alone.
pub fn registry(ifaces: &Interfaces) -> Result<Registry, datasync::KeyError> {
    let mut registry = Registry::new();
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
    Ok(registry)
}

/// Steps shared by the scenarios, on any store the coordinator runs on: live changes
/// with previous values, a route rejected through `Done`, a TTL key expiring, a prefix
/// delete. Checks what it shows, so running a scenario tests it.
pub async fn walkthrough<S: Writer>(
    store: &S,
    coordinator: &CoordinatorHandle,
    ifaces: &Interfaces,
) -> Result<(), Box<dyn Error>> {
    let key = |k: &str| Key::new(k);
    let json = |s: &str| Value::from(s.to_owned());
    println!("2. live changes, with previous values");
    store
        .put(&key("if/eth1")?, json(r#"{"mtu":9000}"#), PutOptions::new())
        .await?;
    store
        .put(
            &key("rt/storage")?,
            json(r#"{"via":"eth1"}"#),
            PutOptions::new(),
        )
        .await?;
    store
        .put(&key("if/eth1")?, json(r#"{"mtu":1500}"#), PutOptions::new())
        .await?;
    settle().await;

    println!("3. a route to a missing interface is rejected through Done");
    store
        .put(
            &key("rt/bad")?,
            json(r#"{"via":"eth9"}"#),
            PutOptions::new(),
        )
        .await?;
    let failures = || {
        coordinator
            .status()
            .plugin("routes")
            .map_or(0, |p| p.failures)
    };
    let reported = async {
        while failures() == 0 {
            settle().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), reported)
        .await
        .map_err(|_| "the rejection was not reported within 10 s")?;
    if failures() != 1 {
        return Err(format!("one rejection, {} failures reported", failures()).into());
    }

    println!("4. a TTL key expires as a Delete with its previous value");
    let ttl = PutOptions::new().ttl(Duration::from_millis(300));
    store
        .put(&key("if/tmp0")?, json(r#"{"mtu":68}"#), ttl)
        .await?;
    let has_tmp0 = || ifaces.lock().expect("not poisoned").contains_key("tmp0");
    let until = |want: bool| async move {
        while has_tmp0() != want {
            settle().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), until(true))
        .await
        .map_err(|_| "the TTL key never arrived")?;
    tokio::time::timeout(Duration::from_secs(20), until(false))
        .await
        .map_err(|_| "the TTL key did not expire within 20 s")?;

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
    Ok(())
}

/// Writes the scenarios' starting state: one interface and a default route through it.
pub async fn seed<S: Writer>(store: &S) -> Result<(), Box<dyn Error>> {
    store
        .put(
            &Key::new("if/eth0")?,
            r#"{"mtu":1500}"#.into(),
            PutOptions::new(),
        )
        .await?;
    store
        .put(
            &Key::new("rt/default")?,
            r#"{"via":"eth0"}"#.into(),
            PutOptions::new(),
        )
        .await?;
    Ok(())
}
