//! What a remote client pays over a call in the member's own process: the same reads
//! and writes, on the same store, in-process and through a `RemoteStore` on loopback
//! TCP, interleaved in each run. Prints a table.
//!
//! `cargo bench -p datasync-integration --bench remote_overhead`
//! (`BENCH_RUNS` sets the runs, default 5; `BENCH_NODES` the members, default 1;
//! `BENCH_ONLY=reads` or `puts` runs only the remote side's 64 in flight for 5 s, to
//! profile.)
//!
//! A read with local consistency touches no disk and no consensus: its remote figure
//! less its in-process one is the client protocol's own cost (framing, sealing,
//! encoding, the tasks on both sides and loopback TCP).
#![allow(clippy::unwrap_used)] // a benchmark: failing loudly is the point

use std::time::{Duration, Instant};

use datasync::{Consistency, Key, PutOptions, ReadOptions, Value, Writer};
use datasync_integration::bench::{
    histogram, inflight, median, quantile, store_inflight, store_seq, value,
};
use datasync_integration::proc::cpu_time;
use datasync_raft::testing::{TestCluster, test_secret};
use datasync_raft::{RemoteConfig, RemoteStore};
use prometheus_client::registry::Registry;

const SEQ: usize = 2_000;
const INFLIGHT_N: usize = 20_000;

fn main() {
    let rt = datasync_integration::bench::runtime();
    let runs = datasync_integration::bench::runs(5).max(1);
    let nodes: u64 = std::env::var("BENCH_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    rt.block_on(async move { tokio::spawn(bench(runs, nodes)).await.unwrap() });
}

/// `n` sequential local reads of `key`: the p50.
async fn get_seq<S: Writer>(s: &S, key: &Key, n: usize) -> Duration {
    let opts = ReadOptions::new().consistency(Consistency::Local);
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.get(key, opts).await.unwrap().unwrap();
        lat.push(t.elapsed());
    }
    quantile(lat, 0.5)
}

/// `n` local reads of `key` from `bench::DEPTH` tasks: ops/s.
async fn get_inflight<S: Writer + Clone + 'static>(s: &S, key: &Key, n: usize) -> f64 {
    let (s, key) = (s.clone(), key.clone());
    inflight(n, move |_| {
        let (s, key) = (s.clone(), key.clone());
        async move {
            let opts = ReadOptions::new().consistency(Consistency::Local);
            s.get(&key, opts).await.unwrap().unwrap();
        }
    })
    .await
}

/// Ops/s and CPU per op of `work`, which makes `n` ops.
async fn timed<F: std::future::Future<Output = f64>>(n: usize, work: F) -> (f64, f64) {
    let c0 = cpu_time();
    let ops = work.await;
    (ops, (cpu_time() - c0).as_secs_f64() / n as f64)
}

#[derive(Default)]
struct Side {
    get50: Vec<f64>,
    get_ops: Vec<f64>,
    get_cpu: Vec<f64>,
    put50: Vec<f64>,
    put_ops: Vec<f64>,
    put_cpu: Vec<f64>,
    batch: Vec<f64>,
}

async fn bench(runs: usize, nodes: u64) {
    let cluster = TestCluster::start(nodes).await;
    let leader = cluster.leader().await.clone();
    let remote = RemoteStore::connect(RemoteConfig::new(
        [leader.cluster_addr().unwrap().to_owned()],
        test_secret(),
    ))
    .await
    .unwrap();
    let mut registry = Registry::default();
    leader.register_metrics(&mut registry);
    let key = Key::new("probe/key").unwrap();
    leader
        .put(&key, Value::from(value()), PutOptions::new())
        .await
        .unwrap();
    // Warm both paths.
    get_seq(&leader, &key, 200).await;
    get_seq(&remote, &key, 200).await;

    // A profile's workload: remote reads, or remote puts, 64 in flight, for 5 s.
    if let Ok(only @ ("reads" | "puts")) = std::env::var("BENCH_ONLY").as_deref() {
        let t = Instant::now();
        let mut i = 0;
        while t.elapsed() < Duration::from_secs(5) {
            match only {
                "reads" => get_inflight(&remote, &key, INFLIGHT_N).await,
                _ => store_inflight(&remote, &format!("p{i}"), INFLIGHT_N).await,
            };
            i += 1;
        }
        return;
    }
    let (mut d, mut r) = (Side::default(), Side::default());
    for run in 0..runs {
        let mut sides = [
            (&mut d, &leader as &dyn WriterDyn, "d"),
            (&mut r, &remote as &dyn WriterDyn, "r"),
        ];
        // Each side goes first in every other run (the second writes to a larger store).
        if run % 2 == 1 {
            sides.reverse();
        }
        for (side, s, name) in sides {
            side.get50
                .push(s.get_seq(&key, SEQ).await.as_secs_f64() * 1e6);
            let (ops, c) = s.get_inflight_timed(&key, INFLIGHT_N).await;
            side.get_ops.push(ops);
            side.get_cpu.push(c * 1e6);
            side.put50.push(
                s.put_seq(&format!("{name}seq{run}"), SEQ / 4)
                    .await
                    .as_secs_f64()
                    * 1e6,
            );
            let b0 = histogram(&registry, "datasync_raft_proposal_batch_size");
            let (ops, c) = s
                .put_inflight_timed(&format!("{name}par{run}"), INFLIGHT_N)
                .await;
            let b1 = histogram(&registry, "datasync_raft_proposal_batch_size");
            side.put_ops.push(ops);
            side.put_cpu.push(c * 1e6);
            side.batch.push((b1.0 - b0.0) / (b1.1 - b0.1));
            // The batch sizes are the leader's: another member's would not count them.
            assert_eq!(
                leader.leader(),
                Some(leader.node_id()),
                "the leader changed during a run; run the bench again"
            );
        }
    }

    println!(
        "remote client vs in-process calls, {nodes}-member raft store, loopback TCP, {runs} runs interleaved, medians; 256-byte values"
    );
    println!();
    println!("| work | in process | remote | remote − in process | remote / in process |");
    println!("|---|---|---|---|---|");
    let row = |work: &str, a: &[f64], b: &[f64], unit: &str, prec: usize| {
        let (a, b) = (median(a), median(b));
        println!(
            "| {work} | {a:.prec$} {unit} | {b:.prec$} {unit} | {:.prec$} {unit} | {:.2}× |",
            b - a,
            b / a
        );
    };
    row("sequential local read p50", &d.get50, &r.get50, "µs", 1);
    row(
        "64 local reads in flight",
        &d.get_ops,
        &r.get_ops,
        "ops/s",
        0,
    );
    row("  process CPU per read", &d.get_cpu, &r.get_cpu, "µs", 1);
    row("sequential put p50", &d.put50, &r.put50, "µs", 1);
    row("64 puts in flight", &d.put_ops, &r.put_ops, "ops/s", 0);
    row("  process CPU per put", &d.put_cpu, &r.put_cpu, "µs", 1);
    row("  puts per batch", &d.batch, &r.batch, "", 1);
}

/// The two stores behind one object, so the runs can loop over them.
#[async_trait::async_trait]
trait WriterDyn: Sync {
    async fn get_seq(&self, key: &Key, n: usize) -> Duration;
    async fn get_inflight_timed(&self, key: &Key, n: usize) -> (f64, f64);
    async fn put_seq(&self, prefix: &str, n: usize) -> Duration;
    async fn put_inflight_timed(&self, prefix: &str, n: usize) -> (f64, f64);
}

#[async_trait::async_trait]
impl<S: Writer + Clone + 'static> WriterDyn for S {
    async fn get_seq(&self, key: &Key, n: usize) -> Duration {
        get_seq(self, key, n).await
    }
    async fn get_inflight_timed(&self, key: &Key, n: usize) -> (f64, f64) {
        timed(n, get_inflight(self, key, n)).await
    }
    async fn put_seq(&self, prefix: &str, n: usize) -> Duration {
        store_seq(self, prefix, n).await.1
    }
    async fn put_inflight_timed(&self, prefix: &str, n: usize) -> (f64, f64) {
        timed(n, store_inflight(self, prefix, n)).await
    }
}
