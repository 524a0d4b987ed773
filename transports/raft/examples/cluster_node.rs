//! Test helper for `tests/processes.rs`: one cluster member in a process of its own,
//! with the test secret and small snapshots (every 50 entries, 5 kept), until killed.
//! Prints `READY <addr>` once open, then `STATUS <leader> <revision> <snapshots
//! installed>` every 50 ms; SIGTERM shuts the store down cleanly.
//!
//! Run: `cargo run -p datasync-raft --example cluster_node -- <id> <dir> <listen> [<join>]`

use std::io::Write;
use std::time::Duration;

use datasync_raft::testing::test_secret;
use datasync_raft::{ClusterConfig, RaftConfig, RaftStore};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(id), Some(dir), Some(listen)) = (args.next(), args.next(), args.next()) else {
        return Err("usage: cluster_node <id> <dir> <listen> [<join>]".into());
    };
    let mut cluster = ClusterConfig::new(listen.parse()?, test_secret());
    if let Some(seed) = args.next() {
        cluster = cluster.join([seed]);
    }
    let config = RaftConfig::new(&dir)
        .snapshots(50, 5)
        .cluster(id.parse()?, cluster);
    let store = RaftStore::open(config).await?;
    println!("READY {}", store.cluster_addr().unwrap_or_default());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let line = format!(
            "STATUS {} {} {}",
            store.leader().unwrap_or(0),
            store.revision().0,
            store.snapshots_installed()
        );
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{line}")?;
            out.flush()?;
        }
        tokio::select! {
            _ = term.recv() => {
                store.shutdown().await;
                return Ok(());
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}
