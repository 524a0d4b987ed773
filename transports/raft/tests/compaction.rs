//! Log compaction keeps the disk bounded: a three-node cluster under a steady write
//! load over a fixed set of keys writes many times its state to the log, yet each
//! member's log stays within what the snapshot settings retain, and its database stops
//! growing once it holds the state and its history window (100 revisions here: at the
//! default 10,000 the window alone outgrows the first half of the load).
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use datasync::{Key, PutOptions, Value, Writer};
use datasync_raft::testing::{TestCluster, converged};
use datasync_raft::{RaftConfig, RaftStore};

/// Bytes allocated under `path` (not apparent lengths: segments are preallocated).
fn disk_use(path: &Path) -> u64 {
    let meta = std::fs::metadata(path).unwrap();
    if !meta.is_dir() {
        return meta.blocks() * 512;
    }
    std::fs::read_dir(path)
        .unwrap()
        .map(|e| disk_use(&e.unwrap().path()))
        .sum()
}

const MIB: u64 = 1 << 20;

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / MIB as f64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_write_load_keeps_the_disk_bounded() {
    // A snapshot every 200 entries with 50 kept behind it; 256 KiB log segments.
    let tune = |c: RaftConfig| {
        let mut c = c.snapshots(200, 50).log_segment(256 << 10);
        c.history = 100;
        c
    };
    let c = TestCluster::start_with(3, tune).await;
    let leader = c.leader().await.clone();
    let value = Value::from(vec![b'x'; 1024]);
    let (rounds, per_round, writers) = (10u64, 2_000u64, 16u64);
    // Per round, per member: (database, log) bytes on disk.
    let mut sizes: Vec<Vec<(u64, u64)>> = Vec::new();
    for round in 0..rounds {
        let mut tasks = Vec::new();
        for w in 0..writers {
            let (store, value) = (leader.clone(), value.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..per_round / writers {
                    // 256 keys, overwritten again and again: the state stays ~256 KiB.
                    let k = Key::new(format!("k/{}", (w * 1000 + i + round) % 256)).unwrap();
                    store
                        .put(&k, value.clone(), PutOptions::new())
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let row = c
            .dirs
            .iter()
            .map(|d| {
                let total = disk_use(d.path());
                let log = disk_use(&d.path().join("log"));
                (total - log, log)
            })
            .collect();
        sizes.push(row);
    }
    converged(&c.nodes.iter().collect::<Vec<&RaftStore>>()).await;
    let written = rounds * per_round * 1024;
    eprintln!("values written: {} MiB", written / MIB);
    eprintln!("writes   database and log per member (MiB)");
    for (round, row) in sizes.iter().enumerate() {
        let cells: Vec<_> = row
            .iter()
            .map(|(db, log)| format!("{} + {}", mib(*db), mib(*log)))
            .collect();
        eprintln!(
            "{:>6}   {}",
            (round as u64 + 1) * per_round,
            cells.join("   ")
        );
    }
    // What the snapshot settings retain: at most 250 entries, each one batch of at most
    // `writers` puts (a value and its key, command and frame overhead), plus the
    // segment being written, its preallocated spare, and two more for entries appended
    // while a snapshot is built. Batches grow with the writers that wait together, so
    // the bound goes by entries times the largest batch, not by entries alone.
    let log_bound = 250 * writers * (1024 + 128) + 4 * (256 << 10);
    let half = sizes.len() / 2;
    for member in 0..3 {
        let max = |rows: &[Vec<(u64, u64)>], f: fn(&(u64, u64)) -> u64| {
            rows.iter().map(|r| f(&r[member])).max().unwrap()
        };
        let (db_early, db_late) = (max(&sizes[..half], |s| s.0), max(&sizes[half..], |s| s.0));
        let log_max = max(&sizes, |s| s.1);
        assert!(
            db_late <= db_early + db_early / 4,
            "member {member}: the database keeps growing ({db_early} then {db_late} bytes)"
        );
        assert!(
            log_max <= log_bound,
            "member {member}: {log_max} bytes of log, though 250 entries (at most {log_bound} bytes) are retained"
        );
        assert!(
            db_late + log_max < written / 3,
            "member {member}: disk use is not bounded by the state"
        );
    }
}
