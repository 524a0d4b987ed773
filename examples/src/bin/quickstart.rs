//! The quickstart: two dependent plugins on the embedded raft store — no server to set
//! up, the data durable on local disk. Ordered startup resync, live changes with
//! previous values, a change rejected through `Done`, a TTL key expiring, a prefix
//! delete, then a restart that resyncs the same state from disk.
//!
//! Run: `cargo run -p datasync-examples --bin quickstart [DATA_DIR]`
//! (without `DATA_DIR`, a fresh temporary directory, removed at the end).

use std::collections::BTreeMap;
use std::error::Error;
use std::path::PathBuf;

use datasync::coordinator::{CoordinatorHandle, PluginState};
use datasync::{Prefix, ReadOptions, Revision, Writer};
use datasync_examples::{Interfaces, first_run, print_status, seed, start};
use datasync_raft::{RaftConfig, RaftStore};

/// The revision every plugin's last resync was at.
fn resynced_at(c: &CoordinatorHandle) -> Vec<(String, Revision)> {
    c.status()
        .plugins
        .iter()
        .map(|p| (p.name.clone(), p.revision))
        .collect()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let temp;
    let dir = match std::env::args_os().nth(1) {
        Some(d) => PathBuf::from(d),
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_owned()
        }
    };
    println!("embedded raft store in {}", dir.display());
    let store = RaftStore::open(RaftConfig::new(&dir)).await?;
    if store
        .list(&Prefix::all(), ReadOptions::new())
        .await?
        .values
        .is_empty()
    {
        seed(&store).await?;
    }
    let (coordinator, ifaces) = first_run(&store).await?;
    print_status(&coordinator);
    let before = store.list(&Prefix::all(), ReadOptions::new()).await?;
    let known: BTreeMap<String, u32> = ifaces.state().interfaces.clone();

    println!("6. restart: shut down, open the same directory, resync from disk");
    coordinator.shutdown().await;
    store.shutdown().await;
    drop(store); // the last handle: closes the data files
    let store = RaftStore::open(RaftConfig::new(&dir)).await?;
    let again = Interfaces::default();
    let coordinator = start(&store, &again).await?;
    print_status(&coordinator);
    let after = store.list(&Prefix::all(), ReadOptions::new()).await?;
    assert_eq!(
        after, before,
        "the store must come back with the same state and revision"
    );
    assert_eq!(
        again.state().interfaces,
        known,
        "plugins resync the same state"
    );
    let st = coordinator.status();
    assert!(st.plugins.iter().all(|p| p.state == PluginState::Ready));
    for (name, rev) in resynced_at(&coordinator) {
        assert_eq!(
            rev, before.revision,
            "{name} resynced at r{rev}, not r{}",
            before.revision
        );
    }
    println!(
        "  same {} keys at r{} after the restart",
        after.values.len(),
        after.revision
    );
    coordinator.shutdown().await;
    store.shutdown().await;
    println!("done");
    Ok(())
}
