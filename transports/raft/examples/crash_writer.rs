//! Test helper for `tests/crash.rs`: writes to the store in `<dir>` from 8 concurrent
//! tasks until killed, printing `ACK <key> <revision>` for every acknowledged write.
//!
//! Run: `cargo run -p datasync-raft --example crash_writer -- <dir> <tag>`

use std::io::Write;

use datasync::{Key, PutOptions, Writer};
use datasync_raft::{RaftConfig, RaftStore};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(dir), Some(tag)) = (args.next(), args.next()) else {
        return Err("usage: crash_writer <dir> <tag>".into());
    };
    // Small snapshot interval: crashes also land during snapshots and log purges.
    let store = RaftStore::open(RaftConfig::new(&dir).snapshots(200, 50)).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    for task in 0..8 {
        let (store, tx, tag) = (store.clone(), tx.clone(), tag.clone());
        tokio::spawn(async move {
            for i in 0u64.. {
                let key = format!("{tag}/{task}/{i}");
                let k = Key::new(&key).expect("valid key");
                match store
                    .put(&k, format!("{i}").into(), PutOptions::new())
                    .await
                {
                    Ok(rev) => {
                        if tx.send(format!("ACK {key} {rev}")).is_err() {
                            return;
                        }
                    }
                    Err(e) => eprintln!("put {key}: {e}"),
                }
            }
        });
    }
    drop(tx);
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY")?;
    out.flush()?;
    while let Some(line) = rx.recv().await {
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    Ok(())
}
