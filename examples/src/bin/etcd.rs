//! The same two dependent plugins on etcd v3: ordered startup resync, live changes with
//! previous values, a change rejected through `Done`, a TTL key expiring (an etcd lease),
//! a prefix delete, then the agent restarting: one new resync of the same state, in the
//! same order, at the revision etcd is at.
//!
//! Run: `cargo run -p datasync-examples --features etcd --bin etcd -- http://127.0.0.1:2379`
//! (needs an etcd v3 server and, to build, `protoc`). It works in a namespace of its
//! own, deleted at the end.

use std::collections::BTreeMap;
use std::error::Error;
use std::time::Duration;

use datasync::coordinator::PluginState;
use datasync::{DeleteOptions, Key, Prefix, ReadOptions, Writer};
use datasync_etcd::{EtcdConfig, EtcdStore};
use datasync_examples::{Interfaces, first_run, print_status, seed, start};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let url = std::env::args()
        .nth(1)
        .ok_or("usage: etcd http://HOST:PORT (an etcd v3 server)")?;
    let namespace = format!("example_{}/", std::process::id());
    let config = EtcdConfig::new([url.clone()])
        .with_namespace(namespace.clone())
        .with_wait_for_server(Duration::from_secs(20));
    let store = EtcdStore::connect(config).await?;
    println!("etcd on {url}, namespace {namespace}");
    seed(&store).await?;
    let (coordinator, ifaces) = first_run(&store).await?;
    print_status(&coordinator);
    let before = store.list(&Prefix::all(), ReadOptions::new()).await?;
    let known: BTreeMap<String, u32> = ifaces.state().interfaces.clone();

    println!("6. the agent restarts: one resync of what etcd holds, in the same order");
    coordinator.shutdown().await;
    let again = Interfaces::default();
    let coordinator = start(&store, &again).await?;
    print_status(&coordinator);
    if again.state().interfaces != known {
        return Err("the plugins did not resync the same state".into());
    }
    let st = coordinator.status();
    if !st.plugins.iter().all(|p| p.state == PluginState::Ready) {
        return Err("a plugin is not ready".into());
    }
    for p in &st.plugins {
        if p.revision < before.revision {
            return Err(format!(
                "{} resynced at r{}, before r{}",
                p.name, p.revision, before.revision
            )
            .into());
        }
    }
    println!(
        "  {} keys, resynced at r{} or later",
        before.values.len(),
        before.revision
    );
    coordinator.shutdown().await;
    // Everything this run wrote is under its namespace; the empty key is not valid, so
    // each top-level prefix is deleted.
    for p in ["if/", "rt/"] {
        store
            .delete(&Key::new(p)?, DeleteOptions::new().prefix())
            .await?;
    }
    println!("done");
    Ok(())
}
