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
    etcd_inflight, etcd_seq, etcd_watch_on, median, quantile, store_inflight, store_seq,
    store_watch_on,
};
use datasync_raft::testing::{TestCluster, test_secret};
use datasync_raft::{RemoteConfig, RemoteStore};

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
    rseq: Vec<f64>,
    rseq50: Vec<f64>,
    rinflight: Vec<f64>,
    watch: Vec<Duration>,
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
    let remote = RemoteStore::connect(RemoteConfig::new(
        [rleader.cluster_addr().unwrap().to_owned()],
        test_secret(),
    ))
    .await
    .unwrap();

    let (mut r, mut e) = (Samples::default(), Samples::default());
    for run in 0..runs {
        let (ops, p50) = store_seq(&rleader, &format!("seq{run}"), SEQ).await;
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
        r.inflight
            .push(store_inflight(&rleader, &format!("par{run}"), INFLIGHT_N).await);
        e.inflight
            .push(etcd_inflight(&eleader, &format!("par{run}"), INFLIGHT_N).await);
        let (ops, p50) = store_seq(&remote, &format!("rseq{run}"), SEQ).await;
        r.rseq.push(ops);
        r.rseq50.push(p50.as_secs_f64());
        r.rinflight
            .push(store_inflight(&remote, &format!("rpar{run}"), INFLIGHT_N).await);
        r.watch
            .extend(store_watch_on(&rleader, &rfollower, &format!("watch{run}/")).await);
        e.watch
            .extend(etcd_watch_on(&eleader, &efollower, &format!("watch{run}/"), true).await);
    }

    let ms = |s: f64| format!("{:.3} ms", s * 1e3);
    let us = |d: Duration| format!("{} µs", d.as_micros());
    let version = eleader.clone().status().await.unwrap().version().to_owned();
    println!(
        "3-node embedded raft cluster vs 3-member etcd {version} cluster, loopback, {runs} runs, medians; 256-byte values"
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
        ">= 2×",
    );
    row(
        "sequential puts to the leader (ops/s)",
        format!("{:.0}", ops(&r.seq)),
        format!("{:.0}", ops(&e.seq)),
        ops(&r.seq) / ops(&e.seq),
        "×",
        "",
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
        "",
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
        "",
    );
    for n in &raft.nodes {
        n.shutdown().await;
    }
}
