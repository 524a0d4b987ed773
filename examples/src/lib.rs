//! The steps shared by the runnable scenarios in `src/bin/`, on the plugin pair of
//! `datasync-netconfig`: interfaces under `if/`, and routes under `rt/` that depend on
//! them (a route through a missing interface is rejected through `Done`).

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use datasync::coordinator::{
    Coordinator, CoordinatorConfig, CoordinatorHandle, PluginSpec, Registry,
};
use datasync::{DeleteOptions, Key, Prefix, PutOptions, Watcher, Writer};
use datasync_netconfig::{Device, Interface, InterfacesPlugin, Report, Route, RoutesPlugin};

/// The device the example plugins configure (interfaces and routes).
pub type Interfaces = Device;

/// What the plugins report goes to stdout, indented.
fn stdout() -> Report {
    Arc::new(|line: &str| println!("  {line}"))
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
            Arc::new(RoutesPlugin::new("rt/", ifaces.clone()).report(stdout())),
        )
        .after("interfaces"),
    );
    registry.add(PluginSpec::new(
        "interfaces",
        vec![Prefix::new("if/")?],
        Arc::new(InterfacesPlugin::new("if/", ifaces.clone()).report(stdout())),
    ));
    Ok(registry)
}

/// Steps 1 to 5 on one store: the plugins start on a device of their own (one
/// snapshot, in dependency order), then the [`walkthrough`]. Returns the running
/// coordinator and the device.
pub async fn first_run<S: Watcher + Writer>(
    store: &S,
) -> Result<(CoordinatorHandle, Interfaces), Box<dyn Error>> {
    let ifaces = Interfaces::default();
    println!("1. startup: one snapshot, plugins in dependency order");
    let coordinator = start(store, &ifaces).await?;
    walkthrough(store, &coordinator, &ifaces).await?;
    Ok((coordinator, ifaces))
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
    println!("2. live changes, with previous values");
    store
        .put(&key("if/eth1")?, Interface::value(9000), PutOptions::new())
        .await?;
    store
        .put(&key("rt/storage")?, Route::value("eth1"), PutOptions::new())
        .await?;
    store
        .put(&key("if/eth1")?, Interface::value(1500), PutOptions::new())
        .await?;
    settle().await;
    if let Some(kv) = store.get(&key("if/eth1")?, Default::default()).await? {
        let bytes: Vec<String> = kv
            .value
            .as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        println!(
            "  if/eth1 holds a protobuf netconfig.Interface, {} bytes: {} = {:?}",
            bytes.len(),
            bytes.join(" "),
            kv.value.proto::<Interface>()?
        );
    }

    println!("3. a route to a missing interface is rejected through Done");
    store
        .put(&key("rt/bad")?, Route::value("eth9"), PutOptions::new())
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
        .put(&key("if/tmp0")?, Interface::value(68), ttl)
        .await?;
    let has_tmp0 = || ifaces.state().interfaces.contains_key("tmp0");
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
            Interface::value(1500),
            PutOptions::new(),
        )
        .await?;
    store
        .put(
            &Key::new("rt/default")?,
            Route::value("eth0"),
            PutOptions::new(),
        )
        .await?;
    Ok(())
}
