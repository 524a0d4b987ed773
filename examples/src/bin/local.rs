//! Two dependent plugins on the in-memory transport: ordered startup resync, live changes
//! with previous values, a rejected change reported through `Done`, a TTL expiry, a prefix
//! delete and an operator-requested resync.
//!
//! Run: `cargo run -p datasync-examples --bin local`

use std::error::Error;

use datasync::coordinator::PluginState;
use datasync::local::Local;
use datasync_examples::{first_run, print_status, seed, settle};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let store = Local::new();
    seed(&store).await?;
    let (coordinator, _device) = first_run(&store).await?;

    println!("6. an operator asks for a full resync: same order, current state");
    // Passes so far: the startup one, and the one that resynced routes after it
    // rejected a change.
    let before = coordinator.status().passes;
    coordinator.request_resync();
    settle().await;
    print_status(&coordinator);
    let st = coordinator.status();
    assert_eq!(st.passes, before + 1);
    assert!(st.plugins.iter().all(|p| p.state == PluginState::Ready));
    coordinator.shutdown().await;
    println!("done");
    Ok(())
}
