//! The embedded raft store against a real etcd and NATS JetStream KV (file storage,
//! with `sync_interval: always` and with its default), same machine, same run. Prints
//! two tables.
//!
//! `cargo bench -p datasync-integration --bench raft_vs_etcd`
//! (`BENCH_RUNS` sets the runs per measurement, default 3; medians are reported.)
//!
//! The workloads run as a task on the runtime, as an agent's plugins do, for both
//! stores. Run from `block_on` on the main thread instead, every call pays a wake-up of
//! a parked worker thread to hand its request over (~100 µs more per raft put here).
#![allow(clippy::unwrap_used)] // a benchmark: failing loudly is the point

use std::time::{Duration, Instant};

use datasync::{Prefix, ReadOptions, Writer};
use datasync_integration::bench::{
    PageWrites, child_figures, etcd_inflight, etcd_seq, etcd_watch, histograms, median,
    nats_server, quantile, store_inflight as raft_inflight, store_seq, store_watch,
};
use datasync_integration::{EtcdServer, proc};
use datasync_nats::NatsStore;
use datasync_raft::{RaftConfig, RaftStore};

const SEQ: usize = 1000;

/// The time each histogram of `names` counted per put of `SEQ` while `work` ran, and
/// its observations per put.
async fn mean_during<F: std::future::Future, const N: usize>(
    registry: &prometheus_client::registry::Registry,
    names: [&str; N],
    work: F,
) -> (F::Output, [(f64, f64); N]) {
    let before = histograms(registry, names);
    let out = work.await;
    let after = histograms(registry, names);
    let means = std::array::from_fn(|i| {
        let (sum, count) = after[i];
        let (d_sum, d_count) = (sum - before[i].0, count - before[i].1);
        (d_sum / SEQ as f64, d_count / SEQ as f64)
    });
    (out, means)
}

const WAL: &str = "etcd_disk_wal_fsync_duration_seconds";
const APPLY: &str = "datasync_raft_apply_duration_seconds";
/// From handing a write to openraft (`client_write`) to its answer.
const PROPOSAL: &str = "datasync_raft_proposal_duration_seconds";
const INFLIGHT_N: usize = 20_000;
const PREFIX_N: usize = 100_000;

/// The disk's floor for one durable write, in the file system of `dir`: the p50 of
/// `n` 4 KiB writes each followed by `fdatasync`, and the p50, mean and CPU per write of
/// `n` 4 KiB page writes with `O_DIRECT | O_DSYNC` (as the raft log writes; `None` where
/// the file system refuses `O_DIRECT`).
fn disk_floor(dir: &std::path::Path, n: usize) -> (Duration, Option<PageWrites>) {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let page = [7u8; 4096];
    let path = dir.join("floor");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&[0u8; 1 << 20]).unwrap();
    f.sync_all().unwrap();
    let mut synced = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f.write_all_at(&page, ((i % 256) * 4096) as u64).unwrap();
        f.sync_data().unwrap();
        synced.push(t.elapsed());
    }
    let direct = datasync_integration::bench::direct_page_writes(dir, 1, n);
    (quantile(synced, 0.5), direct)
}

/// Reads `prefix`'s `PREFIX_N` keys through the datasync API; seconds.
async fn read_all<S: Writer>(s: &S, prefix: &str) -> f64 {
    let t = Instant::now();
    let l = s
        .list(&Prefix::new(prefix).unwrap(), ReadOptions::new())
        .await
        .unwrap();
    assert_eq!(l.values.len(), PREFIX_N);
    t.elapsed().as_secs_f64()
}

/// One NATS configuration's figures over the runs.
#[derive(Default)]
struct NatsFigures {
    seq: Vec<f64>,
    seq50: Vec<f64>,
    inflight: Vec<f64>,
    watch: Vec<Duration>,
    read: Vec<f64>,
}

impl NatsFigures {
    async fn run(&mut self, s: &NatsStore, run: usize) {
        let (ops, p50) = store_seq(s, &format!("seq{run}"), SEQ).await;
        self.seq.push(ops);
        self.seq50.push(p50.as_secs_f64());
        self.inflight
            .push(raft_inflight(s, &format!("par{run}"), INFLIGHT_N).await);
        self.watch
            .extend(store_watch(s, &format!("watch{run}/")).await);
    }
}

/// Child mode: a fresh embedded store with 100k keys; prints its peak RSS in KiB.
async fn raft_rss_child(dir: &str) {
    let s = RaftStore::open(RaftConfig::new(dir)).await.unwrap();
    raft_inflight(&s, "rss", PREFIX_N).await;
    let l = s
        .list(&Prefix::new("rss/").unwrap(), ReadOptions::new())
        .await
        .unwrap();
    assert_eq!(l.values.len(), PREFIX_N);
    drop(l);
    println!("{}", proc::peak_rss_kib(std::process::id()).unwrap());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = datasync_integration::bench::runtime();
    if let Some(i) = args.iter().position(|a| a == "--raft-rss") {
        rt.block_on(raft_rss_child(&args[i + 1]));
        return;
    }
    let runs = datasync_integration::bench::runs(3);
    rt.block_on(async move { tokio::spawn(bench(runs)).await.unwrap() });
}

async fn bench(runs: usize) {
    let etcd = EtcdServer::start().await.unwrap_or_else(|e| panic!("{e}"));
    let client = etcd.client().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let raft = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    raft.register_metrics(&mut registry);
    // A sequential put's mean and its parts (the store's own timings), per run: the
    // log write, the apply, the rest of openraft's time (its proposal less both), and
    // the time outside openraft (the put less its proposal).
    let (mut put_mean, mut wal_mean, mut apply_mean) = (vec![], vec![], vec![]);
    let (mut raft_rest, mut outside) = (vec![], vec![]);
    // The bench process's scheduler figures over each sequential phase, by thread name.
    let mut sched_runs = vec![];

    let (mut rs, mut rs50, mut es, mut es50) = (vec![], vec![], vec![], vec![]);
    let (mut ri, mut ei) = (vec![], vec![]);
    let (mut rw, mut ew) = (vec![], vec![]);
    let (mut floor_sync, mut floor_direct, mut floor_mean, mut floor_cpu) =
        (vec![], vec![], vec![], vec![]);
    let (always, default) = (nats_server(true).await, nats_server(false).await);
    let (sa, sd) = (
        always.store().await.unwrap(),
        default.store().await.unwrap(),
    );
    let (mut na, mut nd) = (NatsFigures::default(), NatsFigures::default());
    for run in 0..runs {
        na.run(&sa, run).await;
        nd.run(&sd, run).await;
        let prefix = format!("seq{run}");
        let seq = store_seq(&raft, &prefix, SEQ);
        let before = proc::threads().unwrap();
        let ((ops, p50), [wal, apply, proposal]) =
            mean_during(&registry, [WAL, APPLY, PROPOSAL], seq).await;
        sched_runs.push(proc::by_name_since(&before, &proc::threads().unwrap()));
        assert!(
            (0.9..1.5).contains(&wal.1),
            "one log write per sequential put, not {}",
            wal.1
        );
        // Nothing else proposes meanwhile (the store's own proposals are not timed).
        assert_eq!(proposal.1, 1.0, "one proposal per sequential put");
        put_mean.push(1.0 / ops);
        wal_mean.push(wal.0);
        apply_mean.push(apply.0);
        raft_rest.push(proposal.0 - wal.0 - apply.0);
        outside.push(1.0 / ops - proposal.0);
        rs.push(ops);
        rs50.push(p50.as_secs_f64());
        let (ops, p50) = etcd_seq(&client, &format!("seq{run}"), SEQ).await;
        es.push(ops);
        es50.push(p50.as_secs_f64());
        ri.push(raft_inflight(&raft, &format!("par{run}"), INFLIGHT_N).await);
        ei.push(etcd_inflight(&client, &format!("par{run}"), INFLIGHT_N).await);
        rw.extend(store_watch(&raft, &format!("watch{run}/")).await);
        ew.extend(etcd_watch(&client, &format!("watch{run}/"), false).await);
        // The disk's floor, in each run, after the work it bounds (its thousands of
        // syncs must not weigh on the next measurement), once the writeback of that
        // work has settled.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let path = dir.path().to_owned();
        let (synced, direct) = tokio::task::spawn_blocking(move || disk_floor(&path, SEQ))
            .await
            .unwrap();
        floor_sync.push(synced.as_secs_f64());
        if let Some(f) = direct {
            floor_direct.push(f.p50.as_secs_f64());
            floor_mean.push(f.mean.as_secs_f64());
            floor_cpu.push(f.cpu.as_secs_f64());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    raft_inflight(&raft, "big", PREFIX_N).await;
    etcd_inflight(&client, "big", PREFIX_N).await;
    for (s, f) in [(&sa, &mut na), (&sd, &mut nd)] {
        raft_inflight(s, "big", PREFIX_N).await;
        for _ in 0..runs {
            f.read.push(read_all(s, "big/").await);
        }
    }
    let mut kv = client.kv_client().max_decoding_message_size(256 << 20);
    let (mut rr, mut er) = (vec![], vec![]);
    for _ in 0..runs {
        rr.push(read_all(&raft, "big/").await);
        let t = Instant::now();
        let g = kv
            .get("big/", Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .unwrap();
        assert_eq!(g.kvs().len(), PREFIX_N);
        er.push(t.elapsed().as_secs_f64());
    }
    // Both RSS figures hold exactly 100k keys, each in a fresh server that was written
    // and read once: the etcd above holds every run's keys too.
    let etcd_rss = {
        let fresh = EtcdServer::start().await.unwrap_or_else(|e| panic!("{e}"));
        let c = fresh.client().await.unwrap();
        etcd_inflight(&c, "rss", PREFIX_N).await;
        let g = c
            .kv_client()
            .max_decoding_message_size(256 << 20)
            .get("rss/", Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .unwrap();
        assert_eq!(g.kvs().len(), PREFIX_N);
        drop(g);
        proc::peak_rss_kib(fresh.pid()).unwrap() as f64 / 1024.0
    };
    let rss_dir = tempfile::tempdir().unwrap();
    let [raft_rss] = child_figures(&["--raft-rss", &rss_dir.path().display().to_string()]);
    let raft_rss = raft_rss / 1024.0;

    let ms = |s: f64| format!("{:.3} ms", s * 1e3);
    let us = |d: Duration| format!("{} µs", d.as_micros());
    let (rw50, rw99) = (quantile(rw.clone(), 0.5), quantile(rw, 0.99));
    let (ew50, ew99) = (quantile(ew.clone(), 0.5), quantile(ew, 0.99));
    let version = client.clone().status().await.unwrap().version().to_owned();
    println!(
        "embedded raft store vs etcd {version} on this machine, {runs} runs, medians; 256-byte values"
    );
    println!();
    println!("| work | raft | etcd | raft vs etcd | goal |");
    println!("|---|---|---|---|---|");
    let row = |work: &str, r: String, e: String, ratio: f64, unit: &str, goal: &str| {
        println!("| {work} | {r} | {e} | {ratio:.2}{unit} | {goal} |");
    };
    let (rs, es) = (median(&rs), median(&es));
    row(
        "sequential puts, 1 client (ops/s)",
        format!("{rs:.0}"),
        format!("{es:.0}"),
        rs / es,
        "×",
        ">= 2.5×",
    );
    row(
        "  p50 latency",
        ms(median(&rs50)),
        ms(median(&es50)),
        median(&rs50) / median(&es50),
        "× etcd",
        "",
    );
    let floor = if floor_direct.is_empty() {
        median(&floor_sync)
    } else {
        median(&floor_direct)
    };
    println!(
        "| disk floor p50: 4 KiB write + fdatasync / O_DIRECT+O_DSYNC page | {} / {} | | | |",
        ms(median(&floor_sync)),
        if floor_direct.is_empty() {
            "refused".to_owned()
        } else {
            ms(median(&floor_direct))
        },
    );
    println!(
        "|   sequential put p50 over the floor (the floor's share of a put) | {:.2}× ({:.0} %) | | | >= 85 % |",
        median(&rs50) / floor,
        100.0 * floor / median(&rs50),
    );
    let (put, wal, apply) = (median(&put_mean), median(&wal_mean), median(&apply_mean));
    let (raft_rest, outside) = (median(&raft_rest), median(&outside));
    let share = |part: f64| format!("{} ({:.0} %)", ms(part), 100.0 * part / put);
    println!(
        "|   sequential put, mean {}: log write (one frame, O_DIRECT+O_DSYNC) {}, apply {}, the rest of openraft's time (its core and state-machine tasks, hand-offs between them and to the caller) {}, outside openraft (the datasync API, the store's command, the bench's loop) {} | | | | |",
        ms(put),
        share(wal),
        share(apply),
        share(raft_rest),
        share(outside),
    );
    // Per sequential put, by thread name: CPU, time runnable but waiting for a CPU, times
    // put on a CPU, sleeps and switches while runnable (medians over the runs; threads
    // with under 1 µs of CPU left out).
    let names: std::collections::BTreeSet<&String> =
        sched_runs.iter().flat_map(|r| r.keys()).collect();
    let per_put = |name: &str, f: fn(&proc::Sched) -> f64| {
        let v: Vec<f64> = sched_runs
            .iter()
            .map(|r| r.get(name).map_or(0.0, f) / SEQ as f64)
            .collect();
        median(&v)
    };
    let threads: Vec<String> = names
        .into_iter()
        .filter(|n| per_put(n, |s| s.cpu.as_secs_f64()) >= 1e-6)
        .map(|n| {
            format!(
                "{n}: CPU {}, waiting {}, runs {:.1} (sleeps {:.1}, switched out while runnable {:.1})",
                ms(per_put(n, |s| s.cpu.as_secs_f64())),
                ms(per_put(n, |s| s.waiting.as_secs_f64())),
                per_put(n, |s| s.runs as f64),
                per_put(n, |s| s.sleeps as f64),
                per_put(n, |s| s.switched as f64),
            )
        })
        .collect();
    println!(
        "|   per sequential put, by thread name of this process (CPU, runnable but waiting for a CPU, times put on one: after a sleep, or after being switched out while runnable) | {} | | | |",
        threads.join("; "),
    );
    if !floor_mean.is_empty() {
        let floor_mean = median(&floor_mean);
        println!(
            "|   the log write's mean over the page-write floor's mean ({}; the probe's CPU per write {}) | {:.2}× | | | |",
            ms(floor_mean),
            ms(median(&floor_cpu)),
            wal / floor_mean,
        );
    }
    let (ri, ei) = (median(&ri), median(&ei));
    row(
        "64 puts in flight (ops/s)",
        format!("{ri:.0}"),
        format!("{ei:.0}"),
        ri / ei,
        "×",
        ">= 5×",
    );
    row(
        "watch put→event p50",
        us(rw50),
        us(ew50),
        rw50.as_secs_f64() / ew50.as_secs_f64(),
        "× etcd",
        "<= 0.5×",
    );
    row(
        "watch put→event p99",
        us(rw99),
        us(ew99),
        rw99.as_secs_f64() / ew99.as_secs_f64(),
        "× etcd",
        "",
    );
    let (rr, er) = (median(&rr), median(&er));
    row(
        "read a 100k-key prefix",
        ms(rr),
        ms(er),
        rr / er,
        "× etcd",
        "<= 0.33×",
    );
    row(
        "server peak RSS with 100k keys",
        format!("{raft_rss:.0} MiB"),
        format!("{etcd_rss:.0} MiB"),
        raft_rss / etcd_rss,
        "× etcd",
        "<= 0.5×",
    );

    // NATS: a fresh default server for its RSS, as for the others.
    let nats_rss = {
        let fresh = nats_server(false).await;
        let s = fresh.store().await.unwrap();
        raft_inflight(&s, "rss", PREFIX_N).await;
        read_all(&s, "rss/").await;
        proc::peak_rss_kib(fresh.pid()).unwrap() as f64 / 1024.0
    };
    println!();
    println!(
        "the same against NATS JetStream KV through datasync-nats (file storage; `always`: \
         sync_interval always, durable per write as raft and etcd; `default`: NATS as it comes, \
         synced every 2 min)"
    );
    println!();
    println!(
        "| work | raft | NATS always | NATS default | raft vs always | raft vs default | goal |"
    );
    println!("|---|---|---|---|---|---|---|");
    let faster = |r: f64, n: f64| r / n;
    let nrow =
        |work: &str, r: String, a: String, d: String, va: f64, vd: f64, unit: &str, goal: &str| {
            // NaN: no figure to compare with.
            let ratio = |v: f64| match v.is_nan() {
                true => "-".to_owned(),
                false => format!("{v:.2}{unit}"),
            };
            let (va, vd) = (ratio(va), ratio(vd));
            println!("| {work} | {r} | {a} | {d} | {va} | {vd} | {goal} |");
        };
    let (sa_ops, sd_ops) = (median(&na.seq), median(&nd.seq));
    nrow(
        "sequential puts, 1 client (ops/s)",
        format!("{rs:.0}"),
        format!("{sa_ops:.0}"),
        format!("{sd_ops:.0}"),
        faster(rs, sa_ops),
        faster(rs, sd_ops),
        "×",
        ">= 1× always",
    );
    let r50 = median(&rs50);
    let (a50, d50) = (median(&na.seq50), median(&nd.seq50));
    nrow(
        "  p50 latency",
        ms(r50),
        ms(a50),
        ms(d50),
        r50 / a50,
        r50 / d50,
        "×",
        "<= 1× always",
    );
    let (ai, di) = (median(&na.inflight), median(&nd.inflight));
    nrow(
        "64 puts in flight (ops/s)",
        format!("{ri:.0}"),
        format!("{ai:.0}"),
        format!("{di:.0}"),
        faster(ri, ai),
        faster(ri, di),
        "×",
        ">= 1× both",
    );
    for (name, q) in [("watch put→event p50", 0.5), ("watch put→event p99", 0.99)] {
        let r = if q == 0.5 { rw50 } else { rw99 };
        let a = quantile(na.watch.clone(), q);
        let d = quantile(nd.watch.clone(), q);
        let ratio = |n: Duration| r.as_secs_f64() / n.as_secs_f64();
        nrow(
            name,
            us(r),
            us(a),
            us(d),
            ratio(a),
            ratio(d),
            "×",
            "<= 1× always",
        );
    }
    let (ar, dr) = (median(&na.read), median(&nd.read));
    nrow(
        "read a 100k-key prefix",
        ms(rr),
        ms(ar),
        ms(dr),
        rr / ar,
        rr / dr,
        "×",
        "<= 1× always",
    );
    nrow(
        "server peak RSS with 100k keys",
        format!("{raft_rss:.0} MiB"),
        "-".to_owned(),
        format!("{nats_rss:.0} MiB"),
        f64::NAN,
        raft_rss / nats_rss,
        "×",
        "",
    );
    raft.shutdown().await;
}
