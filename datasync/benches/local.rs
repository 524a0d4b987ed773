//! Benchmark of the `local` transport. Prints a table; run with
//! `cargo bench -p datasync --bench local` (`-- --quick` for a smaller run).
//!
//! - change events/s: one writer task puts N keys as fast as it can; one consumer task
//!   receives every change event and answers its `Done`; time from the first put to the
//!   last event. Overflow resyncs (if the consumer fell behind) are reported.
//! - resync: M keys of 256 bytes are loaded, then a new watch is timed until its resync
//!   has been received, every value touched and its `Done` answered.
//! - puts beside idle watches: sequential puts to a key one drained watch matches, while
//!   R other watches (each on its own prefix) match none of them: what each write pays
//!   for registrations it does not concern.

#![allow(clippy::unwrap_used)] // a benchmark: failing loudly is the point

use std::time::{Duration, Instant};

use datasync::local::Local;
use datasync::{Event, Key, Prefix, PutOptions, Value, WatchOptions, Watcher, Writer};
use futures_util::StreamExt;

const RUNS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

struct EventsRun {
    per_sec: f64,
    changes: u64,
    resyncs: u64,
}

async fn change_events(n: u64) -> EventsRun {
    let store = Local::new();
    let keys: Vec<Key> = (0..1024)
        .map(|i| Key::new(format!("bench/k{i:04}")).unwrap())
        .collect();
    let value = Value::from(vec![b'x'; 256]);
    let mut watch = store
        .watch(
            "bench",
            &[Prefix::new("bench/").unwrap()],
            WatchOptions::default().queue_capacity(65_536),
        )
        .await
        .unwrap();
    let Some(Ok(first)) = watch.next().await else {
        panic!("no resync")
    };
    first.into_done().ok();
    let consumer = tokio::spawn(async move {
        let (mut changes, mut resyncs) = (0u64, 0u64);
        while let Some(Ok(ev)) = watch.next().await {
            let last = ev.revision().get() >= n;
            match &ev {
                Event::Change(c) => changes += c.changes.len() as u64,
                _ => resyncs += 1,
            }
            ev.into_done().ok();
            if last {
                break;
            }
        }
        (changes, resyncs)
    });
    let start = Instant::now();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..n {
                let k = &keys[(i % 1024) as usize];
                store
                    .put(k, value.clone(), PutOptions::new())
                    .await
                    .unwrap();
            }
        })
    };
    writer.await.unwrap();
    let (changes, resyncs) = consumer.await.unwrap();
    EventsRun {
        per_sec: n as f64 / start.elapsed().as_secs_f64(),
        changes,
        resyncs,
    }
}

struct ResyncRun {
    load: Duration,
    resync: Duration,
    rss_after_load: f64,
}

async fn resync(m: usize) -> ResyncRun {
    let store = Local::new();
    let t = Instant::now();
    for i in 0..m {
        let key = Key::new(format!("cfg/item/{i:08}")).unwrap();
        let mut v = vec![b'v'; 256];
        v[..8].copy_from_slice(&(i as u64).to_le_bytes());
        store
            .put(&key, Value::from(v), PutOptions::new())
            .await
            .unwrap();
    }
    let load = t.elapsed();
    let rss_after_load = rss_mib();
    let t = Instant::now();
    let mut watch = store
        .watch(
            "bench",
            &[Prefix::new("cfg/").unwrap()],
            WatchOptions::default(),
        )
        .await
        .unwrap();
    let Some(Ok(Event::Resync(r))) = watch.next().await else {
        panic!("no resync")
    };
    let bytes: usize = r
        .values()
        .map(|kv| kv.value.len() + kv.key.as_str().len())
        .sum();
    assert_eq!(r.len(), m);
    assert!(bytes >= m * 256);
    r.done.ok();
    ResyncRun {
        load,
        resync: t.elapsed(),
        rss_after_load,
    }
}

/// Puts/s of `n` sequential puts matched by one drained watch, beside `idle` watches on
/// other prefixes.
async fn puts_beside_idle_watches(idle: usize, n: u64) -> f64 {
    let store = Local::new();
    let mut idle_watches = Vec::with_capacity(idle);
    for i in 0..idle {
        let p = Prefix::new(format!("idle/{i:05}/")).unwrap();
        idle_watches.push(
            store
                .watch("idle", &[p], WatchOptions::default())
                .await
                .unwrap(),
        );
    }
    let mut hot = store
        .watch(
            "hot",
            &[Prefix::new("hot/").unwrap()],
            WatchOptions::default().queue_capacity(65_536),
        )
        .await
        .unwrap();
    let Some(Ok(first)) = hot.next().await else {
        panic!("no resync")
    };
    first.into_done().ok();
    let consumer = tokio::spawn(async move {
        let mut seen = 0;
        while seen < n {
            match hot.next().await {
                Some(Ok(Event::Change(c))) => {
                    seen += c.changes.len() as u64;
                    Event::Change(c).into_done().ok();
                }
                Some(Ok(ev)) => {
                    ev.into_done().ok();
                }
                _ => panic!("the hot watch ended"),
            }
        }
    });
    let key = Key::new("hot/k").unwrap();
    let value = Value::from(vec![b'x'; 64]);
    let started = Instant::now();
    for _ in 0..n {
        store
            .put(&key, value.clone(), PutOptions::new())
            .await
            .unwrap();
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    consumer.await.unwrap();
    drop(idle_watches);
    rate
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (n, m) = if quick {
        (100_000, 100_000)
    } else {
        (1_000_000, 1_000_000)
    };
    let rt = if std::env::var("BENCH_CURRENT_THREAD").is_ok() {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    };
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let fanout: Vec<(usize, f64)> = [0, 100, 10_000]
        .into_iter()
        .map(|idle| {
            let runs: Vec<f64> = (0..RUNS)
                .map(|_| rt.block_on(puts_beside_idle_watches(idle, 20_000)))
                .collect();
            (idle, median(runs))
        })
        .collect();
    if only == "fanout" {
        for (idle, rate) in &fanout {
            println!("puts/s beside {idle} idle watches: {rate:.0}");
        }
        return;
    }
    let mut rates = Vec::new();
    let (mut changes, mut resyncs) = (0, 0);
    for _ in 0..if only == "resync" { 0 } else { RUNS } {
        let r = rt.block_on(change_events(n));
        rates.push(r.per_sec);
        changes += r.changes;
        resyncs += r.resyncs;
    }
    if only == "events" {
        println!(
            "events/s: {:.0} ({changes} changes, {resyncs} resyncs)",
            median(rates)
        );
        return;
    }
    let mut resync_times = Vec::new();
    let mut load_rates = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..RUNS {
        let r = rt.block_on(resync(m));
        if only == "resync" {
            println!("resync {:?}, load {:?}", r.resync, r.load);
            continue;
        }
        resync_times.push(r.resync.as_secs_f64());
        load_rates.push(m as f64 / r.load.as_secs_f64());
        rss.push(r.rss_after_load);
    }
    println!(
        "local transport, {} runs each, medians (2 tokio workers)",
        RUNS
    );
    println!();
    println!("| work | result | goal |");
    println!("|---|---|---|");
    println!(
        "| change events/s, 1 writer -> 1 consumer answering every Done ({n} puts) | {:.0} | >= 1,000,000 |",
        median(rates)
    );
    println!(
        "|   events delivered as changes / overflow resyncs (all runs) | {changes} / {resyncs} | |"
    );
    println!(
        "| resync of {m} keys x 256 B: watch -> values in hand -> Done | {:.3} s | < 1 s |",
        median(resync_times)
    );
    println!(
        "| sequential puts/s while loading {m} keys | {:.0} | |",
        median(load_rates)
    );
    println!(
        "| process RSS after loading {m} keys | {:.0} MiB | |",
        median(rss)
    );
    let base = fanout[0].1;
    for (idle, rate) in &fanout[1..] {
        println!(
            "| sequential puts/s to a key 1 watch matches, beside {idle} idle watches | {rate:.0} ({:.2}x of none) | flat |",
            rate / base
        );
    }
}
