//! Workloads shared by the benchmarks, run the same way against any store or raw etcd.

use std::time::{Duration, Instant};

use datasync::{Event, Key, Prefix, PutOptions, Value, WatchOptions, Watcher, Writer};
use futures_util::StreamExt;

/// Value size of every benchmark write.
pub const VALUE: usize = 256;
/// Writes in flight at once.
pub const DEPTH: usize = 64;
/// Writes timed per watch-latency run.
pub const WATCH_N: usize = 500;

/// The median.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A NATS server with JetStream syncing every write to disk (`sync_interval: always`:
/// durable as raft and etcd are), or as NATS comes (no configuration: synced every two
/// minutes).
pub async fn nats_server(always: bool) -> crate::NatsServer {
    let started = match always {
        true => crate::NatsServer::start_with_jetstream("sync_interval: always").await,
        false => crate::NatsServer::start().await,
    };
    started.unwrap_or_else(|e| panic!("{e}"))
}

/// Runs this bench's binary again with `args` (a child mode measuring in a fresh
/// process, its stderr passed through) and returns the figures it prints.
pub fn child_figures<const N: usize>(args: &[&str]) -> [f64; N] {
    let exe = std::env::current_exe().expect("the bench's own binary");
    let out = std::process::Command::new(exe)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("the bench's child process");
    assert!(
        out.status.success(),
        "the child {args:?} failed (stderr above)"
    );
    from_line(String::from_utf8_lossy(&out.stdout).trim())
}

/// Figures as one line of numbers (a child process's answer to the bench).
pub fn to_line<const N: usize>(f: [f64; N]) -> String {
    f.map(|x| x.to_string()).join(" ")
}

/// A line of [`to_line`] back into its figures.
pub fn from_line<const N: usize>(line: &str) -> [f64; N] {
    let v: Vec<f64> = line
        .split_whitespace()
        .map(|w| w.parse().expect("a child's figure"))
        .collect();
    v.try_into().expect("a child's figures, all of them")
}

/// The median of each figure over the runs.
pub fn medians<const N: usize>(runs: &[[f64; N]]) -> [f64; N] {
    std::array::from_fn(|i| median(&runs.iter().map(|r| r[i]).collect::<Vec<_>>()))
}

/// Total seconds (or units) and count of the histogram `name` in `registry`, read as a
/// scrape would.
pub fn histogram(registry: &prometheus_client::registry::Registry, name: &str) -> (f64, f64) {
    let [h] = histograms(registry, [name]);
    h
}

/// [`histogram`] of each of `names`, from one scrape.
pub fn histograms<const N: usize>(
    registry: &prometheus_client::registry::Registry,
    names: [&str; N],
) -> [(f64, f64); N] {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).expect("metrics encode");
    names.map(|name| {
        let field = |suffix: &str| {
            let head = format!("{name}_{suffix} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&head))
                .unwrap_or_else(|| panic!("no {name}_{suffix} in the metrics"))
                .parse::<f64>()
                .expect("a metric's value")
        };
        (field("sum"), field("count"))
    })
}

/// The `q` quantile.
pub fn quantile(mut v: Vec<Duration>, q: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * q) as usize]
}

/// A benchmark value.
pub fn value() -> Vec<u8> {
    vec![b'v'; VALUE]
}

fn bench_key(s: String) -> Key {
    Key::new(s).expect("benchmark keys are valid")
}

/// `n` operations from [`DEPTH`] tasks, `put(i)` making the `i`-th; ops/s.
pub async fn inflight<F, Fut>(n: usize, put: F) -> f64
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let t = Instant::now();
    let tasks: Vec<_> = (0..DEPTH)
        .map(|w| {
            let put = put.clone();
            tokio::spawn(async move {
                for i in (w..n).step_by(DEPTH) {
                    put(i).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("benchmark task");
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// `n` puts under `prefix` from [`DEPTH`] tasks; ops/s.
pub async fn store_inflight<S: Writer + Clone + 'static>(s: &S, prefix: &str, n: usize) -> f64 {
    let (s, v, prefix) = (s.clone(), Value::from(value()), prefix.to_owned());
    inflight(n, move |i| {
        let (s, v) = (s.clone(), v.clone());
        let k = bench_key(format!("{prefix}/{i:07}"));
        async move {
            s.put(&k, v, PutOptions::new())
                .await
                .expect("benchmark put");
        }
    })
    .await
}

/// `n` sequential puts under `prefix` from one task; ops/s and p50 latency.
pub async fn store_seq<S: Writer>(s: &S, prefix: &str, n: usize) -> (f64, Duration) {
    let v = Value::from(value());
    let mut lat = Vec::new();
    let t = Instant::now();
    for i in 0..n {
        let k = bench_key(format!("{prefix}/{i:06}"));
        let s0 = Instant::now();
        s.put(&k, v.clone(), PutOptions::new())
            .await
            .expect("benchmark put");
        lat.push(s0.elapsed());
    }
    (n as f64 / t.elapsed().as_secs_f64(), quantile(lat, 0.5))
}

/// The same with raw `etcd-client` puts.
pub async fn etcd_seq(c: &etcd_client::Client, prefix: &str, n: usize) -> (f64, Duration) {
    let mut c = c.clone();
    let mut lat = Vec::new();
    let t = Instant::now();
    for i in 0..n {
        let s0 = Instant::now();
        c.put(format!("{prefix}/{i:06}"), value(), None)
            .await
            .expect("benchmark put");
        lat.push(s0.elapsed());
    }
    (n as f64 / t.elapsed().as_secs_f64(), quantile(lat, 0.5))
}

/// The same with raw `etcd-client` puts.
pub async fn etcd_inflight(c: &etcd_client::Client, prefix: &str, n: usize) -> f64 {
    let (c, prefix) = (c.clone(), prefix.to_owned());
    inflight(n, move |i| {
        let (mut c, k) = (c.clone(), format!("{prefix}/{i:07}"));
        async move {
            c.put(k, value(), None).await.expect("benchmark put");
        }
    })
    .await
}

/// Put → change event latency through a store's own watch, [`WATCH_N`] times.
pub async fn store_watch<S: Watcher + Writer>(s: &S, prefix: &str) -> Vec<Duration> {
    store_watch_on(s, s, prefix).await
}

/// Put through `writer` → change event on `watcher`'s watch (another member of the same
/// store), [`WATCH_N`] times.
pub async fn store_watch_on<W: Writer, S: Watcher>(
    writer: &W,
    watcher: &S,
    prefix: &str,
) -> Vec<Duration> {
    let s = writer;
    let p = Prefix::new(prefix).expect("benchmark prefix");
    let mut w = watcher
        .watch("bench", &[p], WatchOptions::default())
        .await
        .expect("benchmark watch");
    let first = w.next().await.expect("resync").expect("resync");
    first.into_done().ok();
    let v = Value::from(value());
    let mut lat = Vec::new();
    for i in 0..WATCH_N {
        let k = bench_key(format!("{prefix}{i:06}"));
        let t = Instant::now();
        s.put(&k, v.clone(), PutOptions::new())
            .await
            .expect("benchmark put");
        loop {
            let ev = w.next().await.expect("event").expect("event");
            let hit = matches!(&ev, Event::Change(c) if c.changes.iter().any(|kc| kc.key == k));
            ev.into_done().ok();
            if hit {
                break;
            }
        }
        lat.push(t.elapsed());
    }
    lat
}

/// The same with a raw `etcd-client` put and watch (`prev_kv` asked for when
/// `prev` is set, as datasync's contract needs it).
pub async fn etcd_watch(c: &etcd_client::Client, prefix: &str, prev: bool) -> Vec<Duration> {
    etcd_watch_on(c, c, prefix, prev).await
}

/// The same with puts through `writer` and the watch on `watcher` (clients of two
/// members of one cluster).
pub async fn etcd_watch_on(
    writer: &etcd_client::Client,
    watcher: &etcd_client::Client,
    prefix: &str,
    prev: bool,
) -> Vec<Duration> {
    let mut opts = etcd_client::WatchOptions::new().with_prefix();
    if prev {
        opts = opts.with_prev_key();
    }
    let mut stream = watcher
        .clone()
        .watch(prefix, Some(opts))
        .await
        .expect("benchmark watch");
    // The client returns once the request is sent: a put before the server created
    // the watch would never be seen.
    let created = stream.message().await.expect("created").expect("created");
    assert!(created.created(), "the watch's first answer: {created:?}");
    let mut c = writer.clone();
    let mut lat = Vec::new();
    for i in 0..WATCH_N {
        let k = format!("{prefix}{i:06}");
        let t = Instant::now();
        c.put(k.clone(), value(), None)
            .await
            .expect("benchmark put");
        'wait: loop {
            let resp = stream.message().await.expect("event").expect("event");
            for e in resp.events() {
                if e.kv().is_some_and(|kv| kv.key() == k.as_bytes()) {
                    break 'wait;
                }
            }
        }
        lat.push(t.elapsed());
    }
    lat
}

/// `n` raw async-nats KV puts under `prefix` (a NATS key prefix, `.`-separated) from
/// [`DEPTH`] tasks; ops/s.
pub async fn nats_inflight(kv: &async_nats::jetstream::kv::Store, prefix: &str, n: usize) -> f64 {
    let (kv, v, prefix) = (kv.clone(), bytes::Bytes::from(value()), prefix.to_owned());
    inflight(n, move |i| {
        let (kv, v, k) = (kv.clone(), v.clone(), format!("{prefix}.{i:07}"));
        async move {
            kv.put(k, v).await.expect("benchmark put");
        }
    })
    .await
}

/// Put → entry latency through a raw async-nats KV put and watch of `prefix.>`,
/// [`WATCH_N`] times.
pub async fn nats_watch(kv: &async_nats::jetstream::kv::Store, prefix: &str) -> Vec<Duration> {
    let mut w = kv
        .watch(format!("{prefix}.>"))
        .await
        .expect("benchmark watch");
    let v = bytes::Bytes::from(value());
    let mut lat = Vec::new();
    for i in 0..WATCH_N {
        let k = format!("{prefix}.{i:06}");
        let t = Instant::now();
        kv.put(&k, v.clone()).await.expect("benchmark put");
        loop {
            let e = w.next().await.expect("entry").expect("entry");
            if e.key == k {
                break;
            }
        }
        lat.push(t.elapsed());
    }
    lat
}

/// Runs per measurement: `BENCH_RUNS`, else `default`.
pub fn runs(default: usize) -> usize {
    std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The runtime every bench runs on: 2 tokio workers, as many as the machine has cores.
/// `BENCH_MAX_BLOCKING` caps its blocking threads (tokio's default: 512), to show what
/// spreading blocking work over threads costs in memory (see the README's key-scale
/// section).
pub fn runtime() -> tokio::runtime::Runtime {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = std::env::var("BENCH_MAX_BLOCKING")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n: &usize| *n > 0)
    {
        b.max_blocking_threads(n);
    }
    b.worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// How much more `a` took than `b`, in percent: the median of the per-run ratios. Each
/// run times both back to back, so the ratio cancels the server's drift between runs.
pub fn paired_overhead(a: &[f64], b: &[f64]) -> f64 {
    let ratios: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    (median(&ratios) - 1.0) * 100.0
}

/// What [`direct_page_writes`] measured, per write.
#[derive(Debug, Clone, Copy)]
pub struct PageWrites {
    /// The median time of a write.
    pub p50: Duration,
    /// The mean time of a write.
    pub mean: Duration,
    /// The writing threads' CPU time (the system call's).
    pub cpu: Duration,
}

/// The disk's floor with `writers` writing at once (members sharing one disk): `n` 4 KiB
/// page writes with `O_DIRECT | O_DSYNC` (as the raft log writes), each writer on a
/// file of its own in `dir`, all started together. `None` where the file system refuses
/// `O_DIRECT` (at the open or at a write).
pub fn direct_page_writes(dir: &std::path::Path, writers: usize, n: usize) -> Option<PageWrites> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let files: Vec<std::fs::File> = (0..writers)
        .map(|w| {
            let path = dir.join(format!("floor{w}"));
            std::fs::write(&path, vec![0u8; 1 << 20]).expect("a probe file");
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .expect("a synced probe file");
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
                .open(&path)
                .ok()
        })
        .collect::<Option<_>>()?;
    let start = std::sync::Barrier::new(writers);
    let times: Vec<(Vec<Duration>, Duration)> = std::thread::scope(|s| {
        let handles: Vec<_> = files
            .iter()
            .map(|f| {
                let start = &start;
                s.spawn(move || {
                    // O_DIRECT wants an aligned buffer: an aligned page inside a larger one.
                    let buf = vec![7u8; 8192];
                    let off = (4096 - buf.as_ptr() as usize % 4096) % 4096;
                    let page = &buf[off..off + 4096];
                    start.wait();
                    let cpu = crate::proc::thread_cpu_time();
                    let times = (0..n)
                        .map(|i| {
                            let t = std::time::Instant::now();
                            f.write_all_at(page, ((i % 256) * 4096) as u64).ok()?;
                            Some(t.elapsed())
                        })
                        .collect::<Option<Vec<_>>>()?;
                    let cpu = crate::proc::thread_cpu_time().saturating_sub(cpu);
                    Some((times, cpu))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a probe thread"))
            .collect::<Option<Vec<_>>>()
    })?;
    let cpu: Duration = times.iter().map(|(_, cpu)| *cpu).sum();
    let times: Vec<Duration> = times.into_iter().flat_map(|(t, _)| t).collect();
    let count = times.len().max(1) as u32;
    let mean = times.iter().sum::<Duration>() / count;
    Some(PageWrites {
        p50: quantile(times, 0.5),
        mean,
        cpu: cpu / count,
    })
}
