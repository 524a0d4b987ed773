//! How a write's watch latency and an idle watch's memory grow with the number of
//! watches, on the embedded raft store and on a real etcd, same machine, same run.
//! Prints a table.
//!
//! `cargo bench -p datasync-integration --bench watch_scale`
//! (`BENCH_RUNS` sets the runs per size, default 3; medians are reported.)
//!
//! For each size R, a fresh store gets R idle watches, each on its own prefix (on the
//! raft store: `watch` registrations of the embedded store, each past its resync, in a
//! child process of their own so that no earlier run's freed memory hides their cost;
//! on etcd: R watches multiplexed on one watch stream of `etcd-client`, as etcd's own
//! Go client does, each confirmed created), then one more watch on the benchmark's
//! prefix times put → event, 500 times. Memory per idle watch is the growth of the
//! resident set of the process that holds them (the child for the raft store, the etcd
//! server for etcd; Go's heap grows by steps, so etcd's small sizes are rough) divided
//! by R. The raft store's figures are in-process, etcd's over loopback gRPC: the
//! latency ratio compares what a plugin on each would see.
#![allow(clippy::unwrap_used)] // a benchmark: failing loudly is the point

use std::time::Duration;

use datasync::{Prefix, WatchOptions, Watcher};
use datasync_integration::bench::{etcd_watch, median, quantile, store_watch};
use datasync_integration::{EtcdServer, proc};
use datasync_raft::{RaftConfig, RaftStore};
use futures_util::StreamExt;

const SIZES: [usize; 3] = [1, 100, 10_000];

struct Row {
    p50: Duration,
    p99: Duration,
    kib_per_watch: f64,
}

/// Child mode: one raft row of `idle` watches; prints p50 and p99 (ns) and KiB/watch.
async fn raft_child(idle: usize) {
    let r = raft_row(idle).await;
    println!(
        "{} {} {}",
        r.p50.as_nanos(),
        r.p99.as_nanos(),
        r.kib_per_watch
    );
}

/// A raft row, measured in a fresh child process.
fn raft_row_in_child(idle: usize) -> Row {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--raft-child", &idle.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let f: Vec<f64> = text
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect();
    Row {
        p50: Duration::from_nanos(f[0] as u64),
        p99: Duration::from_nanos(f[1] as u64),
        kib_per_watch: f[2],
    }
}

async fn raft_row(idle: usize) -> Row {
    let dir = tempfile::tempdir().unwrap();
    let store = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = proc::rss_kib(std::process::id()).unwrap();
    let mut watches = Vec::with_capacity(idle);
    for i in 0..idle {
        let p = Prefix::new(format!("idle/{i:05}/")).unwrap();
        let mut w = store
            .watch("idle", &[p], WatchOptions::default())
            .await
            .unwrap();
        let first = w.next().await.unwrap().unwrap();
        first.into_done().ok();
        watches.push(w);
    }
    let after = proc::rss_kib(std::process::id()).unwrap();
    let lat = store_watch(&store, "hot/").await;
    let row = Row {
        p50: quantile(lat.clone(), 0.5),
        p99: quantile(lat, 0.99),
        kib_per_watch: after.saturating_sub(before) as f64 / idle as f64,
    };
    drop(watches);
    store.shutdown().await;
    row
}

async fn etcd_row(idle: usize) -> Row {
    let etcd = EtcdServer::start().await.unwrap_or_else(|e| panic!("{e}"));
    let client = etcd.client().await.unwrap();
    // Settled after start.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = proc::rss_kib(etcd.pid()).unwrap();
    let mut streams = Vec::with_capacity(idle);
    for i in 0..idle {
        let opts = etcd_client::WatchOptions::new()
            .with_prefix()
            .with_prev_key();
        let stream = client
            .clone()
            .watch(format!("idle/{i:05}/"), Some(opts))
            .await
            .unwrap();
        streams.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = proc::rss_kib(etcd.pid()).unwrap();
    let lat = etcd_watch(&client, "hot/", true).await;
    Row {
        p50: quantile(lat.clone(), 0.5),
        p99: quantile(lat, 0.99),
        kib_per_watch: after.saturating_sub(before) as f64 / idle as f64,
    }
}

fn main() {
    let rt = datasync_integration::bench::runtime();
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--raft-child") {
        rt.block_on(raft_child(args[i + 1].parse().unwrap()));
        return;
    }
    let runs = datasync_integration::bench::runs(3);
    rt.block_on(async move { tokio::spawn(bench(runs)).await.unwrap() });
}

async fn bench(runs: usize) {
    println!(
        "watch scale: embedded raft store (in-process) vs etcd (loopback gRPC), {runs} runs per size, medians; p99 of 500 samples is noisy"
    );
    println!();
    println!(
        "| idle watches | raft put→event p50 / p99 | etcd p50 / p99 | p99 ratio | raft KiB per idle watch | etcd KiB per idle watch |"
    );
    println!("|---|---|---|---|---|---|");
    let ms = |d: f64| d * 1000.0;
    for idle in SIZES {
        let (mut r50, mut r99, mut rk) = (vec![], vec![], vec![]);
        let (mut e50, mut e99, mut ek) = (vec![], vec![], vec![]);
        for _ in 0..runs {
            let r = tokio::task::spawn_blocking(move || raft_row_in_child(idle))
                .await
                .unwrap();
            r50.push(r.p50.as_secs_f64());
            r99.push(r.p99.as_secs_f64());
            rk.push(r.kib_per_watch);
            let e = etcd_row(idle).await;
            e50.push(e.p50.as_secs_f64());
            e99.push(e.p99.as_secs_f64());
            ek.push(e.kib_per_watch);
        }
        let per = |v: &[f64]| match idle {
            1 => "-".to_owned(),
            _ => format!("{:.2}", median(v)),
        };
        println!(
            "| {idle} | {:.3} / {:.3} ms | {:.3} / {:.3} ms | {:.2}x | {} | {} |",
            ms(median(&r50)),
            ms(median(&r99)),
            ms(median(&e50)),
            ms(median(&e99)),
            median(&r99) / median(&e99),
            per(&rk),
            per(&ek),
        );
    }
}
