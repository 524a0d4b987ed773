//! How cost grows with the number of keys: 10k, 100k and 1M values of 256 bytes on the
//! embedded raft store, a real etcd and NATS JetStream KV (file storage, with
//! `sync_interval: always` and with its default), same machine, same run. Prints a
//! table and writes the per-key curves as `docs/key_scale.svg`.
//!
//! `cargo bench -p datasync-integration --bench key_scale`
//! (`BENCH_RUNS` sets the runs per size, default 1, medians reported;
//! `BENCH_MAX_KEYS` caps the sizes, e.g. 100000 for a quick look, whose plot goes to the
//! temp dir.)
//!
//! Each size and store starts fresh: a new server (the raft store in a child process
//! of its own, as an agent holds it) is loaded with N keys at 64 puts in flight, then
//! - resync: a new `watch` of the keys' prefix, timed to its resync event in hand and
//!   to `Done` after every value is read (raft and NATS through their datasync
//!   transports; etcd through `datasync-etcd`);
//! - listing: every key read back at once (raft and NATS: datasync `list`; etcd: one
//!   raw range request, the figure the resync goal is set against);
//! - memory: the server process's peak RSS after the load and after the reads (the raft
//!   child's holds the bench's client and the values it read as well: an embedded
//!   store's reader is its own process);
//! - disk: the bytes the server's files take after the load, and
//!   after a compaction (raft: history compacted to the current revision and a snapshot
//!   that purges the log; etcd: compact and defragment; NATS keeps one message per key
//!   and has nothing to compact), each once they have not changed for 2 s.
#![allow(clippy::unwrap_used)]
// a benchmark: failing loudly is the point
// Each store's figures are filled in as they are measured, one step after another.
#![allow(clippy::field_reassign_with_default)]

use std::path::Path;
use std::time::{Duration, Instant};

use datasync::{Event, Prefix, ReadOptions, WatchOptions, Watcher, Writer};
use datasync_integration::bench::{
    child_figures, etcd_inflight, medians, nats_server, store_inflight, to_line,
};
use datasync_integration::plot::{self, Metric};
use datasync_integration::{EtcdServer, proc};
use datasync_raft::{RaftConfig, RaftStore};
use futures_util::StreamExt;

const SIZES: [usize; 3] = [10_000, 100_000, 1_000_000];
const STORES: [&str; 4] = ["raft", "etcd", "NATS always", "NATS default"];

/// One store's figures at one size (times in seconds, memory in KiB, disk in bytes).
#[derive(Clone, Copy, Default)]
struct Figures {
    load: f64,
    first: f64,
    done: f64,
    list: f64,
    rss_load: f64,
    rss_peak: f64,
    disk_load: f64,
    /// NaN where the store has nothing to compact.
    disk_compacted: f64,
}

impl Figures {
    fn to_array(self) -> [f64; 8] {
        [
            self.load,
            self.first,
            self.done,
            self.list,
            self.rss_load,
            self.rss_peak,
            self.disk_load,
            self.disk_compacted,
        ]
    }

    fn from_array(f: [f64; 8]) -> Figures {
        let [
            load,
            first,
            done,
            list,
            rss_load,
            rss_peak,
            disk_load,
            disk_compacted,
        ] = f;
        Figures {
            load,
            first,
            done,
            list,
            rss_load,
            rss_peak,
            disk_load,
            disk_compacted,
        }
    }

    fn median(runs: &[Figures]) -> Figures {
        let runs: Vec<[f64; 8]> = runs.iter().map(|f| f.to_array()).collect();
        Figures::from_array(medians(&runs))
    }
}

/// Times a new watch of `k/` on `s` holding `n` keys: (resync event in hand, `Done`).
async fn resync<S: Watcher>(s: &S, n: usize) -> (f64, f64) {
    let t = Instant::now();
    let mut w = s
        .watch(
            "bench",
            &[Prefix::new("k/").unwrap()],
            WatchOptions::default(),
        )
        .await
        .unwrap();
    let Some(Ok(Event::Resync(r))) = w.next().await else {
        panic!("no resync")
    };
    let first = t.elapsed().as_secs_f64();
    let bytes: usize = r
        .values()
        .map(|kv| kv.key.as_str().len() + kv.value.len())
        .sum();
    assert_eq!(r.len(), n);
    assert!(bytes >= n * datasync_integration::bench::VALUE);
    r.done.ok();
    (first, t.elapsed().as_secs_f64())
}

/// Times a datasync listing of `k/` on `s` holding `n` keys.
async fn list<S: Writer>(s: &S, n: usize) -> f64 {
    let t = Instant::now();
    let l = s
        .list(&Prefix::new("k/").unwrap(), ReadOptions::new())
        .await
        .unwrap();
    assert_eq!(l.values.len(), n);
    t.elapsed().as_secs_f64()
}

/// The bytes under `dir` once they have stopped changing for 2 s (a snapshot's build
/// and the log purge after it finish in the background), at most after a minute.
async fn settled_disk(dir: &Path) -> f64 {
    let (mut last, mut same) = (proc::disk_usage(dir), 0);
    for _ in 0..120 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = proc::disk_usage(dir);
        same = if now == last { same + 1 } else { 0 };
        last = now;
        if same == 4 {
            break;
        }
    }
    last as f64
}

fn peak_kib(pid: u32) -> f64 {
    proc::peak_rss_kib(pid).unwrap() as f64
}

/// Child mode: the raft store's figures for `n` keys, in this fresh process.
async fn raft_child(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let me = std::process::id();
    let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    let mut f = Figures::default();
    f.load = n as f64 / store_inflight(&s, "k", n).await;
    f.rss_load = peak_kib(me);
    f.disk_load = settled_disk(dir.path()).await;
    if std::env::var_os("BENCH_DISK_DETAIL").is_some() {
        detail("raft after load", dir.path());
    }
    (f.first, f.done) = resync(&s, n).await;
    f.list = list(&s, n).await;
    f.rss_peak = peak_kib(me);
    s.compact(s.revision()).await.unwrap();
    s.snapshot().await.unwrap();
    f.disk_compacted = settled_disk(dir.path()).await;
    if std::env::var_os("BENCH_DISK_DETAIL").is_some() {
        detail("raft after compaction", dir.path());
    }
    s.shutdown().await;
    println!("{}", to_line(f.to_array()));
}

/// With `BENCH_DISK_DETAIL` set: the bytes under each file of `dir`, on stderr.
fn detail(what: &str, dir: &Path) {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            match e.path().is_dir() {
                true => todo.push(e.path()),
                false => files.push(e.path()),
            }
        }
    }
    files.sort();
    for f in files {
        let name = f.strip_prefix(dir).unwrap().display().to_string();
        eprintln!("{what}: {name} {} KiB", proc::disk_usage(&f) / 1024);
    }
}

fn raft_in_child(n: usize) -> Figures {
    Figures::from_array(child_figures(&["--raft-child", &n.to_string()]))
}

async fn etcd(n: usize) -> Figures {
    let etcd = EtcdServer::start().await.unwrap_or_else(|e| panic!("{e}"));
    let mut client = etcd.client().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut f = Figures::default();
    f.load = n as f64 / etcd_inflight(&client, "k", n).await;
    f.rss_load = peak_kib(etcd.pid());
    f.disk_load = settled_disk(&etcd.data_dir()).await;
    let store = etcd.store().await.unwrap();
    (f.first, f.done) = resync(&store, n).await;
    drop(store);
    let mut kv = client.kv_client().max_decoding_message_size(1 << 30);
    let t = Instant::now();
    let g = kv
        .get("k/", Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(g.kvs().len(), n);
    f.list = t.elapsed().as_secs_f64();
    let rev = g.header().unwrap().revision();
    drop(g);
    f.rss_peak = peak_kib(etcd.pid());
    client
        .compact(
            rev,
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await
        .unwrap();
    client.defragment().await.unwrap();
    f.disk_compacted = settled_disk(&etcd.data_dir()).await;
    f
}

/// NATS with `sync_interval: always`, or as it comes.
async fn nats(n: usize, always: bool) -> Figures {
    let server = nats_server(always).await;
    let s = server.store().await.unwrap();
    let mut f = Figures {
        // Nothing to compact.
        disk_compacted: f64::NAN,
        ..Figures::default()
    };
    f.load = n as f64 / store_inflight(&s, "k", n).await;
    f.rss_load = peak_kib(server.pid());
    f.disk_load = settled_disk(&server.store_dir()).await;
    (f.first, f.done) = resync(&s, n).await;
    f.list = list(&s, n).await;
    f.rss_peak = peak_kib(server.pid());
    f
}

fn main() {
    let rt = datasync_integration::bench::runtime();
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--raft-child") {
        rt.block_on(raft_child(args[i + 1].parse().unwrap()));
        return;
    }
    let runs = datasync_integration::bench::runs(1);
    let max: usize = std::env::var("BENCH_MAX_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(usize::MAX);
    rt.block_on(async move { tokio::spawn(bench(runs, max)).await.unwrap() });
}

async fn bench(runs: usize, max: usize) {
    let sizes: Vec<usize> = SIZES.into_iter().filter(|&n| n <= max).collect();
    // results[size][store]
    let mut results: Vec<[Figures; 4]> = Vec::new();
    for &n in &sizes {
        let mut per: [Vec<Figures>; 4] = Default::default();
        for _ in 0..runs {
            per[0].push(
                tokio::task::spawn_blocking(move || raft_in_child(n))
                    .await
                    .unwrap(),
            );
            per[1].push(etcd(n).await);
            per[2].push(nats(n, true).await);
            per[3].push(nats(n, false).await);
        }
        let row = per.map(|runs| Figures::median(&runs));
        eprintln!("{n} keys measured");
        results.push(row);
    }
    print_tables(&sizes, &results, runs);
    // A capped run's plot goes to the temp dir: the README shows the full one.
    let path = match sizes.len() == SIZES.len() {
        true => Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/key_scale.svg"),
        false => std::env::temp_dir().join("key_scale.svg"),
    };
    if !sizes.is_empty() {
        plot(&path, &sizes, &results);
        println!();
        println!("plot written to {}", path.display());
    }
}

fn print_tables(sizes: &[usize], results: &[[Figures; 4]], runs: usize) {
    let ms = |s: f64| format!("{:.0} ms", s * 1e3);
    let mib = |k: f64| format!("{:.0} MiB", k / 1024.0);
    let disk = |b: f64| match b.is_nan() {
        true => "-".to_owned(),
        false => format!("{:.0} MiB", b / (1 << 20) as f64),
    };
    println!(
        "key scale: 256-byte values, 64 puts in flight to load; {runs} run(s) per size, medians"
    );
    println!();
    println!(
        "| keys | store | load | resync: event / Done | listing | peak RSS after load / reads | disk after load / compaction |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (n, row) in sizes.iter().zip(results) {
        for (name, f) in STORES.iter().zip(row) {
            let list = match *name {
                "etcd" => format!("{} (range read)", ms(f.list)),
                _ => ms(f.list),
            };
            println!(
                "| {n} | {name} | {} | {} / {} | {list} | {} / {} | {} / {} |",
                ms(f.load),
                ms(f.first),
                ms(f.done),
                mib(f.rss_load),
                mib(f.rss_peak),
                disk(f.disk_load),
                disk(f.disk_compacted),
            );
        }
    }
    println!();
    println!("per key (µs of load, µs of resync to Done, bytes on disk after the load):");
    println!();
    println!("| store | {} |", map_join(sizes, |n| format!("{n} keys")));
    println!("|---|{}|", map_join(sizes, |_| "---".to_owned()));
    for (i, name) in STORES.iter().enumerate() {
        let cells = sizes
            .iter()
            .zip(results)
            .map(|(&n, row)| {
                let f = row[i];
                let n = n as f64;
                format!(
                    "{:.1} / {:.2} / {:.0}",
                    f.load / n * 1e6,
                    f.done / n * 1e6,
                    f.disk_load / n
                )
            })
            .collect::<Vec<_>>()
            .join(" | ");
        println!("| {name} | {cells} |");
    }
    let (Some(&n), Some(last)) = (sizes.last(), results.last()) else {
        return;
    };
    let (r, e) = (last[0], last[1]);
    println!();
    println!("at {n} keys, raft vs etcd:");
    println!();
    println!("| measure | ratio | goal |");
    println!("|---|---|---|");
    println!(
        "| resync to Done vs etcd's range read | {:.2}× | <= 0.33× |",
        r.done / e.list
    );
    println!(
        "| peak RSS after load / after reads | {:.2}× / {:.2}× | <= 0.35× |",
        r.rss_load / e.rss_load,
        r.rss_peak / e.rss_peak
    );
    println!(
        "| disk after load / after compaction | {:.2}× / {:.2}× | <= 0.5× |",
        r.disk_load / e.disk_load,
        r.disk_compacted / e.disk_compacted
    );
    println!("| load time | {:.2}× | |", r.load / e.load);
}

fn map_join(sizes: &[usize], f: impl Fn(usize) -> String) -> String {
    sizes.iter().map(|&n| f(n)).collect::<Vec<_>>().join(" | ")
}

/// The per-key curves, one line per store: load and resync time, disk and memory.
fn plot(path: &Path, sizes: &[usize], results: &[[Figures; 4]]) {
    let specs: [(&str, &str, Metric<Figures>); 4] = [
        ("load at 64 in flight", "µs per key", |f, n| {
            f.load / n * 1e6
        }),
        ("resync until Done", "µs per key", |f, n| f.done / n * 1e6),
        ("disk after the load", "bytes per key", |f, n| {
            f.disk_load / n
        }),
        ("server peak RSS after reads", "bytes per key", |f, n| {
            f.rss_peak * 1024.0 / n
        }),
    ];
    let panels = plot::per_store(&specs, &STORES, sizes, results);
    plot::svg(path, "keys", &panels).unwrap();
}
