//! The same `etcd-client` workloads against the built-in store's etcd endpoint and a
//! real etcd, same machine, same run: does the gRPC layer keep the store's lead?
//!
//! `cargo bench -p datasync-integration --bench etcd_api` (`BENCH_RUNS` sets the runs,
//! default 3). Prints medians over the runs and ratios (ours / etcd's; for
//! throughput, ours over etcd's: above 1 is faster).
//!
//! Each server runs in a process of its own, as a user would run it: etcd, and this
//! bench's binary again (`--serve DIR`) with the store and its endpoint on a runtime of
//! two workers, as many as etcd's `GOMAXPROCS` here. The client is the same for both.
#![allow(clippy::unwrap_used)] // a benchmark: failing loudly is the point

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use datasync_etcd_api::EtcdApi;
use datasync_integration::bench::{
    etcd_inflight, etcd_seq, etcd_watch, median, quantile, runs, runtime, value,
};
use datasync_integration::{EtcdServer, proc};
use datasync_raft::{RaftConfig, RaftStore};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};

const SEQ_N: usize = 2_000;
const INFLIGHT_N: usize = 20_000;
const RANGE_N: usize = 100_000;
const TXN_N: usize = 2_000;

/// One run's figures for one server.
#[derive(Debug, Default, Clone)]
struct Run {
    seq: f64,
    seq_p50: f64,
    inflight: f64,
    watch_p50: f64,
    watch_p99: f64,
    range: f64,
    txn: f64,
    rss: f64,
    server_cpu: f64,
    client_cpu: f64,
    get_p50: f64,
}

/// A table row: its name, the figure, its unit, its goal.
type Row = (&'static str, fn(&Run) -> f64, &'static str, &'static str);

/// `n` sequential txns, each with two compares and two puts; ops/s.
async fn txns(c: &etcd_client::Client, prefix: &str, n: usize) -> f64 {
    let mut kv = c.kv_client();
    let t = Instant::now();
    for i in 0..n {
        let (a, b) = (format!("{prefix}/a{i:06}"), format!("{prefix}/b{i:06}"));
        let txn = Txn::new()
            .when([
                Compare::version(a.clone(), CompareOp::Equal, 0),
                Compare::version(b.clone(), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(a, value(), None), TxnOp::put(b, value(), None)]);
        let resp = kv.txn(txn).await.expect("benchmark txn");
        assert!(resp.succeeded());
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// p50 of `SEQ_N` sequential serializable gets of one key, in ms: a round trip
/// through the client, gRPC and the server, with no disk and no consensus.
async fn gets(c: &etcd_client::Client, prefix: &str) -> f64 {
    let mut kv = c.kv_client();
    let key = format!("{prefix}/k");
    kv.put(key.clone(), value(), None)
        .await
        .expect("benchmark put");
    let opts = etcd_client::GetOptions::new().with_serializable();
    let mut lat = Vec::with_capacity(SEQ_N);
    for _ in 0..SEQ_N {
        let t = Instant::now();
        let resp = kv
            .get(key.clone(), Some(opts.clone()))
            .await
            .expect("benchmark get");
        lat.push(t.elapsed());
        assert_eq!(resp.kvs().len(), 1);
    }
    quantile(lat, 0.5).as_secs_f64() * 1e3
}

/// Loads `RANGE_N` keys (64 in flight), then reads them in one range; seconds.
async fn range(c: &etcd_client::Client, prefix: &str) -> f64 {
    etcd_inflight(c, prefix, RANGE_N).await;
    // 100k values of 256 B are about 28 MB: past the client's default 4 MiB.
    let mut kv = c.kv_client().max_decoding_message_size(64 << 20);
    let t = Instant::now();
    let resp = kv
        .get(
            format!("{prefix}/"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("benchmark range");
    assert_eq!(resp.kvs().len(), RANGE_N);
    t.elapsed().as_secs_f64()
}

/// One run against the server in process `pid`.
async fn run(c: &etcd_client::Client, round: usize, pid: u32) -> Run {
    let p = |what: &str| format!("{what}{round}");
    let (seq, seq_p50) = etcd_seq(c, &p("seq"), SEQ_N).await;
    let cpu = || (proc::cpu_time_of(pid).unwrap(), proc::cpu_time());
    let (server0, client0) = cpu();
    let inflight = etcd_inflight(c, &p("fl"), INFLIGHT_N).await;
    let (server1, client1) = cpu();
    let per_put = |d: std::time::Duration| d.as_secs_f64() * 1e6 / INFLIGHT_N as f64;
    let lat = etcd_watch(c, &format!("{}/", p("w")), true).await;
    Run {
        seq,
        seq_p50: seq_p50.as_secs_f64() * 1e3,
        inflight,
        watch_p50: quantile(lat.clone(), 0.5).as_secs_f64() * 1e3,
        watch_p99: quantile(lat, 0.99).as_secs_f64() * 1e3,
        range: range(c, &p("r")).await * 1e3,
        txn: txns(c, &p("t"), TXN_N).await,
        rss: 0.0,
        server_cpu: per_put(server1 - server0),
        client_cpu: per_put(client1 - client0),
        get_p50: gets(c, &p("g")).await,
    }
}

/// The child: the store and its etcd endpoint, serving until stdin closes.
async fn serve(dir: &str) {
    let store = RaftStore::open(RaftConfig::new(dir)).await.unwrap();
    let api = EtcdApi::new(store.clone())
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    println!("{}", api.addr());
    tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new()))
        .await
        .unwrap()
        .unwrap();
    api.stop().await;
    store.shutdown().await;
}

/// Our server, in a child process; killed when dropped (its stdin closes first).
struct Ours {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Ours {
    fn start() -> Ours {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .arg("--serve")
            .arg(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut addr = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut addr)
            .unwrap();
        assert!(
            !addr.trim().is_empty(),
            "the store's process ended before it served: {:?}",
            child.wait()
        );
        Ours {
            child,
            addr: addr.trim().to_owned(),
            _dir: dir,
        }
    }
}

impl Drop for Ours {
    fn drop(&mut self) {
        // A closed stdin asks it to shut down; after 5 s it is killed.
        drop(self.child.stdin.take());
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--serve") {
        runtime().block_on(serve(&args[i + 1]));
        return;
    }
    let runs = runs(3);
    runtime().block_on(async {
        let etcd = EtcdServer::start().await.unwrap_or_else(|e| panic!("{e}"));
        let theirs = etcd.client().await.unwrap();
        let server = Ours::start();
        let ours = etcd_client::Client::connect([server.addr.clone()], None)
            .await
            .unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        // Interleaved, so drift of the machine falls on both alike.
        for round in 0..runs {
            a.push(run(&ours, round, server.child.id()).await);
            b.push(run(&theirs, round, etcd.pid()).await);
            eprintln!("run {} of {runs} done", round + 1);
        }
        // Both servers hold the same keys now: every run's.
        let rss = |pid| proc::peak_rss_kib(pid).unwrap() as f64 / 1024.0;
        for (runs, pid) in [(&mut a, server.child.id()), (&mut b, etcd.pid())] {
            let mib = rss(pid);
            runs.iter_mut().for_each(|r| r.rss = mib);
        }
        let m = |v: &[Run], f: fn(&Run) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
        println!("etcd-client against the built-in store's etcd endpoint vs a real etcd ({runs} runs, medians)");
        println!();
        println!("| workload | built-in store | etcd | ratio | goal |");
        println!("|---|---|---|---|---|");
        let rows: [Row; 11] = [
            ("sequential puts", |r| r.seq, "ops/s", "-"),
            ("sequential put p50", |r| r.seq_p50, "ms", "-"),
            ("sequential serializable get p50 (no disk)", |r| r.get_p50, "ms", "-"),
            ("64 puts in flight", |r| r.inflight, "ops/s", "≥ 2x"),
            ("  server CPU per put", |r| r.server_cpu, "µs", "-"),
            ("  client CPU per put (the same client)", |r| r.client_cpu, "µs", "-"),
            ("watch put→event p50", |r| r.watch_p50, "ms", "≤ 0.5x"),
            ("watch put→event p99", |r| r.watch_p99, "ms", "-"),
            ("100k-key range read", |r| r.range, "ms", "-"),
            ("txn (2 compares, 2 puts), sequential", |r| r.txn, "ops/s", "-"),
            ("server peak RSS", |r| r.rss, "MiB", "-"),
        ];
        for (name, f, unit, goal) in rows {
            let (x, y) = (m(&a, f), m(&b, f));
            let ratio = x / y;
            let met = match goal {
                "≥ 2x" => format!("≥ 2x — {}", if ratio >= 2.0 { "met" } else { "not met" }),
                "≤ 0.5x" => format!("≤ 0.5x — {}", if ratio <= 0.5 { "met" } else { "not met" }),
                _ => "-".to_owned(),
            };
            println!("| {name} | {x:.2} {unit} | {y:.2} {unit} | {ratio:.2}x | {met} |");
        }
        drop(server);
    });
}
