//! How a write's watch latency, its CPU cost and an idle watch's memory grow with the
//! number of watch registrations, on the embedded raft store, a real etcd and NATS
//! JetStream KV (`sync_interval: always`, durable per write as the others), same
//! machine, same run. Prints a table and writes the curves as `docs/watch_scale.svg`.
//!
//! `cargo bench -p datasync-integration --bench watch_scale`
//! (`BENCH_RUNS` sets the runs per size, default 3; medians are reported; a run of
//! fewer writes its plot to the temp dir.)
//!
//! For each size R, a fresh store gets R idle registrations, each on its own prefix,
//! and 100 more on one shared prefix, each drained by a task of its own (on the raft
//! store: `watch` registrations of the embedded store, in a child process of their own
//! so that no earlier run's freed memory hides their cost; on NATS: `datasync-nats`
//! watches, one JetStream consumer each; on etcd: raw `etcd-client` watches with
//! previous values, each on a gRPC watch stream of its own, as `datasync-etcd` holds a
//! registration, each confirmed created). Then:
//! - one match: put → event on one more registration, 500 times;
//! - 100 matches: put on the shared prefix → the last of its 100 registrations has it,
//!   200 times;
//! - CPU per write: 2,000 sequential puts that one drained registration matches: the
//!   CPU time of the process holding the store over them (user + system, exited
//!   threads included), less what it spends in as long a time with no writes (its
//!   background: timers, heartbeats of consumers), over 2,000. The process is the raft
//!   child, which holds the bench's writer and watchers too, or the etcd or NATS
//!   server, whose clients are in the bench process. (Sequential: at 64 in flight,
//!   NATS beside 10,000 consumers let puts time out after 5 s.)
//! - memory per idle registration: the growth of that process's resident set over R
//!   (Go's heap grows by steps, so etcd's and NATS's small sizes are rough).
//!
//! The raft store's figures are in-process, etcd's and NATS's over loopback: the
//! latencies compare what a plugin on each would see.
#![allow(clippy::unwrap_used)] // a benchmark: failing loudly is the point

use std::path::Path;
use std::time::{Duration, Instant};

use datasync::{Event, Key, Prefix, PutOptions, Value, WatchOptions, Watcher, Writer};
use datasync_integration::bench::{
    child_figures, etcd_seq, etcd_watch, medians, quantile, store_seq, store_watch, to_line, value,
};
use datasync_integration::plot::{self, Metric};
use datasync_integration::{EtcdServer, NatsServer, proc};
use datasync_raft::{RaftConfig, RaftStore};
use futures_util::StreamExt;
use tokio::sync::mpsc;

const SIZES: [usize; 3] = [1, 100, 10_000];
const STORES: [&str; 3] = ["raft", "etcd", "NATS always"];
/// Registrations on the one shared prefix.
const SHARED: usize = 100;
/// Puts timed to reach all [`SHARED`] registrations.
const FAN_N: usize = 200;
/// Sequential puts over which CPU per write is measured.
const CPU_N: usize = 2_000;

#[derive(Clone, Copy)]
struct Row {
    p50: f64,
    p99: f64,
    fan50: f64,
    fan99: f64,
    cpu_us: f64,
    /// Background CPU with no writes, in % of one core.
    idle_pct: f64,
    kib_per_watch: f64,
}

impl Row {
    fn to_array(self) -> [f64; 7] {
        [
            self.p50,
            self.p99,
            self.fan50,
            self.fan99,
            self.cpu_us,
            self.idle_pct,
            self.kib_per_watch,
        ]
    }

    fn from_array(f: [f64; 7]) -> Row {
        let [p50, p99, fan50, fan99, cpu_us, idle_pct, kib_per_watch] = f;
        Row {
            p50,
            p99,
            fan50,
            fan99,
            cpu_us,
            idle_pct,
            kib_per_watch,
        }
    }

    fn median(runs: &[Row]) -> Row {
        let runs: Vec<[f64; 7]> = runs.iter().map(|r| r.to_array()).collect();
        Row::from_array(medians(&runs))
    }
}

fn cpu_of(pid: u32) -> Duration {
    proc::cpu_time_of(pid).unwrap()
}

/// CPU of `pid` over `writes` (run once), and over as long a time without writes after.
async fn cpu_busy_idle(pid: u32, writes: impl std::future::Future<Output = ()>) -> Cpu {
    let (c0, t0) = (cpu_of(pid), Instant::now());
    writes.await;
    let (c1, window) = (cpu_of(pid), t0.elapsed());
    tokio::time::sleep(window).await;
    Cpu {
        busy: c1.saturating_sub(c0),
        idle: cpu_of(pid).saturating_sub(c1),
        window,
    }
}

struct Cpu {
    busy: Duration,
    idle: Duration,
    window: Duration,
}

/// Put → the last of the [`SHARED`] registrations has it, [`FAN_N`] times; `arrived`
/// carries the key of every change any of them sees.
async fn fan_latency<F, Fut>(
    mut put: F,
    arrived: &mut mpsc::UnboundedReceiver<String>,
) -> Vec<Duration>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut lat = Vec::with_capacity(FAN_N);
    for i in 0..FAN_N {
        let k = format!("shared/{i:06}");
        let t = Instant::now();
        put(k.clone()).await;
        let mut seen = 0;
        let all = async {
            while seen < SHARED {
                if arrived.recv().await.unwrap() == k {
                    seen += 1;
                }
            }
        };
        // A registration that lost continuity gets the key in a resync, not a change.
        if tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .is_err()
        {
            panic!("{k}: {seen} of {SHARED} shared registrations saw it as a change in 10 s");
        }
        lat.push(t.elapsed());
    }
    lat
}

/// A datasync registration on `prefix`, past its resync, drained by a task that sends
/// the key of every change it sees to `tx`.
async fn drained<S: Watcher>(s: &S, prefix: &str, tx: mpsc::UnboundedSender<String>) {
    let mut w = s
        .watch(
            "drained",
            &[Prefix::new(prefix).unwrap()],
            WatchOptions::default(),
        )
        .await
        .unwrap();
    w.next().await.unwrap().unwrap().into_done().ok();
    tokio::spawn(async move {
        while let Some(Ok(ev)) = w.next().await {
            if let Event::Change(c) = &ev {
                for kc in &c.changes {
                    // The receiver goes away when its measurement is over.
                    tx.send(kc.key.as_str().to_owned()).ok();
                }
            }
            ev.into_done().ok();
        }
    });
}

/// A row through the datasync API (the raft store, NATS); `pid` holds the store.
async fn datasync_row<S: Watcher + Writer + Clone + 'static>(s: &S, idle: usize, pid: u32) -> Row {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = proc::rss_kib(pid).unwrap();
    let mut watches = Vec::with_capacity(idle);
    for i in 0..idle {
        let p = Prefix::new(format!("idle/{i:05}/")).unwrap();
        let mut w = s
            .watch("idle", &[p], WatchOptions::default())
            .await
            .unwrap();
        w.next().await.unwrap().unwrap().into_done().ok();
        watches.push(w);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = proc::rss_kib(pid).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    for _ in 0..SHARED {
        drained(s, "shared/", tx.clone()).await;
    }
    let one = store_watch(s, "hot/").await;
    let v = Value::from(value());
    let fan = fan_latency(
        |k| {
            let (s, v) = (s.clone(), v.clone());
            async move {
                s.put(&Key::new(k).unwrap(), v, PutOptions::new())
                    .await
                    .unwrap();
            }
        },
        &mut rx,
    )
    .await;
    drop(rx);
    drained(s, "cpu/", mpsc::unbounded_channel().0).await;
    let cpu = cpu_busy_idle(pid, async {
        store_seq(s, "cpu", CPU_N).await;
    })
    .await;
    drop(watches);
    row(one, fan, cpu, after.saturating_sub(before), idle)
}

fn row(one: Vec<Duration>, fan: Vec<Duration>, cpu: Cpu, kib: u64, idle: usize) -> Row {
    let s = |d: Duration| d.as_secs_f64();
    Row {
        p50: s(quantile(one.clone(), 0.5)),
        p99: s(quantile(one, 0.99)),
        fan50: s(quantile(fan.clone(), 0.5)),
        fan99: s(quantile(fan, 0.99)),
        cpu_us: cpu.busy.saturating_sub(cpu.idle).as_secs_f64() * 1e6 / CPU_N as f64,
        idle_pct: 100.0 * cpu.idle.as_secs_f64() / cpu.window.as_secs_f64(),
        kib_per_watch: kib as f64 / idle as f64,
    }
}

/// Child mode: one raft row, measured in this fresh process.
async fn raft_child(idle: usize) {
    let dir = tempfile::tempdir().unwrap();
    let store = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    let r = datasync_row(&store, idle, std::process::id()).await;
    store.shutdown().await;
    println!("{}", to_line(r.to_array()));
}

fn raft_row_in_child(idle: usize) -> Row {
    Row::from_array(child_figures(&["--raft-child", &idle.to_string()]))
}

async fn nats_row(idle: usize) -> Row {
    // nats-server 2.15 refuses a stream's 1001st consumer unless told otherwise, and
    // every registration is a consumer.
    let settings = "sync_interval: always, limits { default_max_consumers: 20000 }";
    let server = NatsServer::start_with_jetstream(settings)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let s = server.store().await.unwrap();
    let row = datasync_row(&s, idle, server.pid()).await;
    drop((s, server));
    // Its registrations' tasks end and the client stops reconnecting before the next
    // measurement.
    tokio::time::sleep(Duration::from_secs(5)).await;
    row
}

/// A raw etcd watch of `prefix` (with previous values, as datasync asks for), created,
/// drained by a task that sends each event's key to `tx`.
async fn etcd_drained(c: &etcd_client::Client, prefix: &str, tx: mpsc::UnboundedSender<String>) {
    let opts = etcd_client::WatchOptions::new()
        .with_prefix()
        .with_prev_key();
    let mut stream = c.clone().watch(prefix, Some(opts)).await.unwrap();
    let created = stream.message().await.unwrap().unwrap();
    assert!(created.created());
    tokio::spawn(async move {
        while let Ok(Some(resp)) = stream.message().await {
            for e in resp.events() {
                if let Some(kv) = e.kv() {
                    tx.send(String::from_utf8_lossy(kv.key()).into_owned()).ok();
                }
            }
        }
    });
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
        let mut stream = client
            .clone()
            .watch(format!("idle/{i:05}/"), Some(opts))
            .await
            .unwrap();
        // The client returns once the request is sent.
        assert!(stream.message().await.unwrap().unwrap().created());
        streams.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = proc::rss_kib(etcd.pid()).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    for _ in 0..SHARED {
        etcd_drained(&client, "shared/", tx.clone()).await;
    }
    let one = etcd_watch(&client, "hot/", true).await;
    let fan = fan_latency(
        |k| {
            let mut c = client.clone();
            async move {
                c.put(k, value(), None).await.unwrap();
            }
        },
        &mut rx,
    )
    .await;
    drop(rx);
    etcd_drained(&client, "cpu/", mpsc::unbounded_channel().0).await;
    let cpu = cpu_busy_idle(etcd.pid(), async {
        etcd_seq(&client, "cpu", CPU_N).await;
    })
    .await;
    drop(streams);
    row(one, fan, cpu, after.saturating_sub(before), idle)
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
    let mut results: Vec<[Row; 3]> = Vec::new();
    for idle in SIZES {
        let mut per: [Vec<Row>; 3] = Default::default();
        for _ in 0..runs {
            per[0].push(
                tokio::task::spawn_blocking(move || raft_row_in_child(idle))
                    .await
                    .unwrap(),
            );
            per[1].push(etcd_row(idle).await);
            per[2].push(nats_row(idle).await);
        }
        eprintln!("{idle} idle registrations measured");
        results.push(per.map(|runs| Row::median(&runs)));
    }
    println!(
        "watch scale: embedded raft store (in-process) vs etcd and NATS always (loopback), \
         {runs} runs per size, medians; a p99 of 500 or 200 samples is noisy"
    );
    println!();
    println!(
        "| idle registrations | store | 1 match: put→event p50 / p99 | 100 matches: put→last of 100 p50 / p99 | CPU per write | background CPU | KiB per idle registration |"
    );
    println!("|---|---|---|---|---|---|---|");
    let ms = |s: f64| format!("{:.3}", s * 1e3);
    for (idle, row) in SIZES.iter().zip(&results) {
        for (name, r) in STORES.iter().zip(row) {
            let kib = match idle {
                1 => "-".to_owned(),
                _ => format!("{:.2}", r.kib_per_watch),
            };
            println!(
                "| {idle} | {name} | {} / {} ms | {} / {} ms | {:.1} µs | {:.1} % | {kib} |",
                ms(r.p50),
                ms(r.p99),
                ms(r.fan50),
                ms(r.fan99),
                r.cpu_us,
                r.idle_pct,
            );
        }
    }
    println!();
    println!("raft vs etcd / vs NATS always:");
    println!();
    println!("| idle registrations | 1 match p99 | 100 matches p99 | CPU per write | goal |");
    println!("|---|---|---|---|---|");
    for (idle, [r, e, n]) in SIZES.iter().zip(&results) {
        println!(
            "| {idle} | {:.2}× / {:.2}× | {:.2}× / {:.2}× | {:.2}× / {:.2}× | p99 <= 0.5× etcd |",
            r.p99 / e.p99,
            r.p99 / n.p99,
            r.fan99 / e.fan99,
            r.fan99 / n.fan99,
            r.cpu_us / e.cpu_us,
            r.cpu_us / n.cpu_us,
        );
    }
    // A quick run's plot goes to the temp dir: the README shows a 3-run one.
    let path = match runs >= 3 {
        true => Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/watch_scale.svg"),
        false => std::env::temp_dir().join("watch_scale.svg"),
    };
    let specs: [(&str, &str, Metric<Row>); 4] = [
        ("put→event p50, 1 match", "ms", |r, _| r.p50 * 1e3),
        ("put→last of 100 p50", "ms", |r, _| r.fan50 * 1e3),
        ("server CPU per write", "µs", |r, _| r.cpu_us),
        // Memory per registration at one registration is noise.
        ("memory per idle registration", "KiB", |r, n| {
            match n > 1.0 {
                true => r.kib_per_watch,
                false => f64::NAN,
            }
        }),
    ];
    let panels = plot::per_store(&specs, &STORES, &SIZES, &results);
    plot::svg(&path, "idle registrations", &panels).unwrap();
    println!();
    println!("plot written to {}", path.display());
}
