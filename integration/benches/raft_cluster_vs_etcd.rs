//! A 3-node embedded raft cluster against a 3-member etcd cluster, both on loopback on
//! this machine, same run. Prints a table.
//!
//! `cargo bench -p datasync-integration --bench raft_cluster_vs_etcd`
//! (`BENCH_RUNS` sets the runs per measurement, default 3; medians are reported.)
//!
//! Every member of both clusters shares the machine's 2 cores and one disk, so each
//! write costs three fsyncs on the same device. Writes go to the leader (and, in the
//! "through a follower" row, to a follower, which forwards: datasync-raft to its leader
//! over its own protocol, etcd internally); watches are on a follower. The "remote
//! client" rows write through a `RemoteStore` connected to the leader over loopback TCP,
//! as the CLI and other agents do: the fair match for etcd's gRPC client.
#![allow(clippy::unwrap_used)] // a benchmark: failing loudly is the point

use std::time::Duration;

use datasync_integration::EtcdCluster;
use datasync_integration::bench::{
    DEPTH, direct_page_writes, etcd_inflight, etcd_seq, etcd_watch_on, histograms, median,
    quantile, store_inflight, store_seq, store_watch_on,
};
use datasync_raft::testing::{TestCluster, test_secret};
use datasync_raft::{RaftStore, RemoteConfig, RemoteStore};
use prometheus_client::registry::Registry;

const SEQ: usize = 500;
const INFLIGHT_N: usize = 10_000;

fn main() {
    let rt = datasync_integration::bench::runtime();
    let runs = datasync_integration::bench::runs(3);
    rt.block_on(async move { tokio::spawn(bench(runs)).await.unwrap() });
}

#[derive(Default)]
struct Samples {
    seq: Vec<f64>,
    seq50: Vec<f64>,
    fseq: Vec<f64>,
    fseq50: Vec<f64>,
    inflight: Vec<f64>,
    finflight: Vec<f64>,
    rseq: Vec<f64>,
    rseq50: Vec<f64>,
    rinflight: Vec<f64>,
    watch: Vec<Duration>,
}

const WAL: &str = "etcd_disk_wal_fsync_duration_seconds";
const APPLY: &str = "datasync_raft_apply_duration_seconds";
const BATCH: &str = "datasync_raft_proposal_batch_size";

/// Each member's metrics, the leader's first.
struct Members(Vec<Registry>);

impl Members {
    fn of(leader: &RaftStore, nodes: &[RaftStore]) -> Self {
        let mut order: Vec<&RaftStore> = vec![leader];
        order.extend(nodes.iter().filter(|n| n.node_id() != leader.node_id()));
        Members(
            order
                .into_iter()
                .map(|n| {
                    let mut r = Registry::default();
                    n.register_metrics(&mut r);
                    r
                })
                .collect(),
        )
    }

    /// Each member's (sum, count) of every histogram the breakdown reads.
    fn read(&self) -> Vec<[(f64, f64); 3]> {
        self.0
            .iter()
            .map(|r| histograms(r, [WAL, APPLY, BATCH]))
            .collect()
    }

    /// Where the time of the `n` puts `work` makes goes, by the members' own metrics.
    /// Panics if the leader changed meanwhile: its rows would then be another member's.
    async fn during<F: std::future::Future>(
        &self,
        leader: &RaftStore,
        n: usize,
        work: F,
    ) -> (F::Output, Steps) {
        let led = leader.leader();
        assert_eq!(
            led,
            Some(leader.node_id()),
            "the leader changed before a phase"
        );
        let before = self.read();
        let (cpu0, t0) = (process_cpu(), std::time::Instant::now());
        let out = work.await;
        let (cpu1, wall) = (process_cpu(), t0.elapsed());
        let after = self.read();
        assert_eq!(
            leader.leader(),
            led,
            "the leader changed during a phase: its figures would be another member's; run the bench again"
        );
        let d = |m: usize, h: usize| {
            let (a, b) = (after[m][h], before[m][h]);
            (a.0 - b.0, a.1 - b.1)
        };
        // NaN (printed "–") where nothing was observed.
        let mean = |(sum, count): (f64, f64)| if count > 0.0 { sum / count } else { f64::NAN };
        let followers = (1..self.0.len())
            .map(|m| d(m, 0))
            .fold((0.0, 0.0), |(s, c), (ms, mc)| (s + ms, c + mc));
        let steps = Steps {
            log_writes: d(0, 0).1 / n as f64,
            leader_write: mean(d(0, 0)),
            follower_write: mean(followers),
            apply: mean(d(0, 1)),
            batch: mean(d(0, 2)),
            cores: (cpu1 - cpu0).as_secs_f64() / wall.as_secs_f64(),
        };
        (out, steps)
    }
}

/// This process's CPU time, threads that have exited included, in clock ticks (10 ms
/// here: over a phase of about a second, a few hundredths of a core).
fn process_cpu() -> Duration {
    datasync_integration::proc::cpu_time_of(std::process::id()).expect("this process's CPU time")
}

/// A workload's steps, from the members' metrics.
#[derive(Default, Clone, Copy)]
struct Steps {
    /// The leader's log writes per put.
    log_writes: f64,
    /// The mean time of one log write on the leader, and on a follower.
    leader_write: f64,
    follower_write: f64,
    /// The mean time of one apply on the leader.
    apply: f64,
    /// Puts per proposal batch on the leader.
    batch: f64,
    /// The bench process's CPU time over the wall time (all three members and the
    /// clients; the machine has 2 cores).
    cores: f64,
}

async fn bench(runs: usize) {
    let etcd = EtcdCluster::start(3)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let el = etcd.leader().await.expect("an etcd leader");
    let ef = (el + 1) % 3;
    let (eleader, efollower) = (
        etcd.client(el).await.unwrap(),
        etcd.client(ef).await.unwrap(),
    );
    let raft = TestCluster::start(3).await;
    let (rleader, rfollower) = (raft.leader().await.clone(), raft.follower().await.clone());
    let members = Members::of(&rleader, &raft.nodes);
    // Per run: (sequential to the leader, 64 in flight to the leader, 64 in flight from
    // the remote client).
    let mut steps: Vec<[(f64, Steps); 3]> = Vec::new();
    let remote = RemoteStore::connect(RemoteConfig::new(
        [rleader.cluster_addr().unwrap().to_owned()],
        test_secret(),
    ))
    .await
    .unwrap();

    let (mut r, mut e) = (Samples::default(), Samples::default());
    for run in 0..runs {
        let ((ops, p50), seq_steps) = members
            .during(
                &rleader,
                SEQ,
                store_seq(&rleader, &format!("seq{run}"), SEQ),
            )
            .await;
        r.seq.push(ops);
        r.seq50.push(p50.as_secs_f64());
        let (ops, p50) = etcd_seq(&eleader, &format!("seq{run}"), SEQ).await;
        e.seq.push(ops);
        e.seq50.push(p50.as_secs_f64());
        let (ops, p50) = store_seq(&rfollower, &format!("fseq{run}"), SEQ).await;
        r.fseq.push(ops);
        r.fseq50.push(p50.as_secs_f64());
        let (ops, p50) = etcd_seq(&efollower, &format!("fseq{run}"), SEQ).await;
        e.fseq.push(ops);
        e.fseq50.push(p50.as_secs_f64());
        let (par_ops, par_steps) = members
            .during(
                &rleader,
                INFLIGHT_N,
                store_inflight(&rleader, &format!("par{run}"), INFLIGHT_N),
            )
            .await;
        r.inflight.push(par_ops);
        e.inflight
            .push(etcd_inflight(&eleader, &format!("par{run}"), INFLIGHT_N).await);
        r.finflight
            .push(store_inflight(&rfollower, &format!("fpar{run}"), INFLIGHT_N).await);
        e.finflight
            .push(etcd_inflight(&efollower, &format!("fpar{run}"), INFLIGHT_N).await);
        let (ops, p50) = store_seq(&remote, &format!("rseq{run}"), SEQ).await;
        r.rseq.push(ops);
        r.rseq50.push(p50.as_secs_f64());
        let (rops, remote_steps) = members
            .during(
                &rleader,
                INFLIGHT_N,
                store_inflight(&remote, &format!("rpar{run}"), INFLIGHT_N),
            )
            .await;
        r.rinflight.push(rops);
        // A put's mean time: one at a time, or 64 at once.
        steps.push([
            (1.0 / r.seq[run], seq_steps),
            (DEPTH as f64 / par_ops, par_steps),
            (DEPTH as f64 / rops, remote_steps),
        ]);
        r.watch
            .extend(store_watch_on(&rleader, &rfollower, &format!("watch{run}/")).await);
        e.watch
            .extend(etcd_watch_on(&eleader, &efollower, &format!("watch{run}/"), true).await);
    }

    let ms = |s: f64| format!("{:.3} ms", s * 1e3);
    let us = |d: Duration| format!("{} µs", d.as_micros());
    let version = eleader.clone().status().await.unwrap().version().to_owned();
    println!(
        "3-node embedded raft cluster vs 3-member etcd {version} cluster, loopback, {runs} runs, medians (watch quantiles over all runs' events); 256-byte values"
    );
    println!();
    println!("| work | raft | etcd | raft vs etcd | goal |");
    println!("|---|---|---|---|---|");
    let row = |work: &str, a: String, b: String, ratio: f64, unit: &str, goal: &str| {
        println!("| {work} | {a} | {b} | {ratio:.2}{unit} | {goal} |");
    };
    let ops = |v: &[f64]| median(v);
    row(
        "64 puts in flight to the leader (ops/s)",
        format!("{:.0}", ops(&r.inflight)),
        format!("{:.0}", ops(&e.inflight)),
        ops(&r.inflight) / ops(&e.inflight),
        "×",
        ">= 6×",
    );
    row(
        "64 puts in flight through a follower (ops/s)",
        format!("{:.0}", ops(&r.finflight)),
        format!("{:.0}", ops(&e.finflight)),
        ops(&r.finflight) / ops(&e.finflight),
        "×",
        ">= 4×",
    );
    row(
        "sequential puts to the leader (ops/s)",
        format!("{:.0}", ops(&r.seq)),
        format!("{:.0}", ops(&e.seq)),
        ops(&r.seq) / ops(&e.seq),
        "×",
        ">= 2×",
    );
    row(
        "  p50 latency",
        ms(median(&r.seq50)),
        ms(median(&e.seq50)),
        median(&r.seq50) / median(&e.seq50),
        "× etcd",
        "",
    );
    row(
        "sequential puts through a follower (ops/s)",
        format!("{:.0}", ops(&r.fseq)),
        format!("{:.0}", ops(&e.fseq)),
        ops(&r.fseq) / ops(&e.fseq),
        "×",
        "",
    );
    row(
        "  p50 latency",
        ms(median(&r.fseq50)),
        ms(median(&e.fseq50)),
        median(&r.fseq50) / median(&e.fseq50),
        "× etcd",
        "",
    );
    row(
        "64 puts in flight from a remote client (ops/s)",
        format!("{:.0}", ops(&r.rinflight)),
        format!("{:.0}", ops(&e.inflight)),
        ops(&r.rinflight) / ops(&e.inflight),
        "×",
        ">= 4×",
    );
    row(
        "sequential puts from a remote client (ops/s)",
        format!("{:.0}", ops(&r.rseq)),
        format!("{:.0}", ops(&e.seq)),
        ops(&r.rseq) / ops(&e.seq),
        "×",
        "",
    );
    row(
        "  p50 latency",
        ms(median(&r.rseq50)),
        ms(median(&e.seq50)),
        median(&r.rseq50) / median(&e.seq50),
        "× etcd",
        "",
    );
    let (r50, r99) = (quantile(r.watch.clone(), 0.5), quantile(r.watch, 0.99));
    let (e50, e99) = (quantile(e.watch.clone(), 0.5), quantile(e.watch, 0.99));
    row(
        "watch on a follower: put→event p50",
        us(r50),
        us(e50),
        r50.as_secs_f64() / e50.as_secs_f64(),
        "× etcd",
        "",
    );
    row(
        "watch on a follower: put→event p99",
        us(r99),
        us(e99),
        r99.as_secs_f64() / e99.as_secs_f64(),
        "× etcd",
        "<= 0.5×",
    );
    println!();
    println!(
        "Where a raft put's time goes, by the members' own metrics: for each work the run with the median put time, whole (a put's mean time is 1/ops, times 64 for 64 in flight; cores busy in 10 ms clock ticks)"
    );
    println!();
    println!(
        "| work | put, mean | leader log writes per put | leader log write | follower log write | apply | puts per batch | cores busy |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (i, work) in [
        "sequential to the leader",
        "64 in flight to the leader",
        "64 in flight from a remote client",
    ]
    .iter()
    .enumerate()
    {
        // One run's figures together, so that they add up (medians per column might
        // each come from another run).
        let mut by_time: Vec<(f64, Steps)> = steps.iter().map(|s| s[i]).collect();
        by_time.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (put, st) = by_time[by_time.len() / 2];
        let or_dash = |v: f64, f: &dyn Fn(f64) -> String| match v.is_nan() {
            true => "–".to_owned(),
            false => f(v),
        };
        println!(
            "| {work} | {} | {:.3} | {} | {} | {} | {} | {:.2} |",
            ms(put),
            st.log_writes,
            or_dash(st.leader_write, &ms),
            or_dash(st.follower_write, &ms),
            or_dash(st.apply, &ms),
            or_dash(st.batch, &|b| format!("{b:.1}")),
            st.cores,
        );
    }
    // The device all three members share: what one synced page write costs alone,
    // and with two or three at once (a leader and its followers writing together).
    let dir = raft.dirs[0].path().to_owned();
    let floors = tokio::task::spawn_blocking(move || {
        [1, 2, 3].map(|w| direct_page_writes(&dir, w, SEQ).map(|f| ms(f.p50.as_secs_f64())))
    })
    .await
    .unwrap();
    println!();
    println!(
        "The shared disk: p50 of a 4 KiB O_DIRECT|O_DSYNC page write, 1 / 2 / 3 writers at once: {}",
        floors
            .map(|f| f.unwrap_or_else(|| "O_DIRECT refused".into()))
            .join(" / ")
    );
    for n in &raft.nodes {
        n.shutdown().await;
    }
}
