//! datasync-over-NATS against raw async-nats KV calls doing the same work, same
//! nats-server, same run. Prints a table of medians and overheads.
//!
//! `cargo bench -p datasync-integration --bench nats_overhead`
//! (`BENCH_RUNS` sets the runs per measurement, default 5; resyncs run three times as
//! often.)
//! `BENCH_ONLY=watch` (or `inflight`, `resync`) runs one measurement, for profiling.
//! Throughput and resync overheads are medians of per-run ratios (datasync and raw
//! timed back to back, order alternating); latencies are quantiles over all runs.
#![allow(clippy::unwrap_used)] // a benchmark: failing loudly is the point

use std::time::Instant;

use async_nats::jetstream::kv;
use datasync::{Event, Prefix, WatchOptions, Watcher};
use datasync_integration::bench::{
    median, nats_inflight, nats_watch, quantile, store_inflight, store_watch,
};
use datasync_integration::{NatsServer, proc};
use datasync_nats::NatsStore;
use futures_util::StreamExt;

const INFLIGHT_N: usize = 20_000;
const RESYNC_N: usize = 100_000;

/// A watch registration's initial resync of 100k keys: from `watch()` to the event.
async fn ds_resync(s: &NatsStore, prefix: &str) -> f64 {
    let t = Instant::now();
    let mut w = s
        .watch(
            "resync",
            &[Prefix::new(format!("{prefix}/")).unwrap()],
            WatchOptions::default(),
        )
        .await
        .unwrap();
    let ev = w.next().await.unwrap().unwrap();
    let Event::Resync(rs) = &ev else {
        panic!("{ev:?}")
    };
    assert_eq!(rs.len(), RESYNC_N);
    let took = t.elapsed().as_secs_f64();
    ev.into_done().ok();
    took
}

/// The same read by hand: a KV watch with history (the last value of every key, then
/// live), read until the server says nothing is pending, into owned keys and values.
async fn raw_resync(kv: &kv::Store, prefix: &str) -> f64 {
    let t = Instant::now();
    let mut w = kv.watch_with_history(format!("{prefix}.>")).await.unwrap();
    let mut values: Vec<(String, bytes::Bytes)> = Vec::new();
    while let Some(e) = w.next().await {
        let e = e.unwrap();
        let last = e.delta == 0;
        values.push((e.key, e.value));
        if last {
            break;
        }
    }
    assert_eq!(values.len(), RESYNC_N);
    t.elapsed().as_secs_f64()
}

/// [`RESYNC_N`] keys under `prefix`, written in an order unrelated to key order.
async fn shuffled_load(kv: &kv::Store, prefix: &str) {
    let v = bytes::Bytes::from(datasync_integration::bench::value());
    let tasks: Vec<_> = (0..64usize)
        .map(|w| {
            let (kv, v, prefix) = (kv.clone(), v.clone(), prefix.to_owned());
            tokio::spawn(async move {
                for i in (w..RESYNC_N).step_by(64) {
                    // A bijection of 0..RESYNC_N that scatters neighbours.
                    let k = (i * 7919) % RESYNC_N;
                    kv.put(format!("{prefix}.{k:07}"), v.clone()).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

fn main() {
    let runs = datasync_integration::bench::runs(5);
    let rt = datasync_integration::bench::runtime();
    rt.block_on(async move {
        let nats = NatsServer::start().await.unwrap_or_else(|e| panic!("{e}"));
        let store = nats.store().await.unwrap();
        let js = async_nats::jetstream::new(store.client().clone());
        let kv = js.get_key_value("datasync").await.unwrap();
        let only = std::env::var("BENCH_ONLY").unwrap_or_default();
        let does = |what: &str| only.is_empty() || only == what;
        let (mut di, mut ri, mut dw, mut rw) = (vec![], vec![], vec![], vec![]);
        for run in 0..runs {
            // Alternate which goes first, so neither always meets a fresher server.
            if !does("inflight") {
            } else if run % 2 == 0 {
                di.push(store_inflight(&store, &format!("ds{run}"), INFLIGHT_N).await);
                ri.push(nats_inflight(&kv, &format!("raw{run}"), INFLIGHT_N).await);
            } else {
                ri.push(nats_inflight(&kv, &format!("raw{run}"), INFLIGHT_N).await);
                di.push(store_inflight(&store, &format!("ds{run}"), INFLIGHT_N).await);
            }
            if !does("watch") {
            } else if run % 2 == 0 {
                dw.extend(store_watch(&store, &format!("dsw{run}/")).await);
                rw.extend(nats_watch(&kv, &format!("raww{run}")).await);
            } else {
                rw.extend(nats_watch(&kv, &format!("raww{run}")).await);
                dw.extend(store_watch(&store, &format!("dsw{run}/")).await);
            }
        }
        if does("resync") {
            nats_inflight(&kv, "big", RESYNC_N).await;
            shuffled_load(&kv, "mix").await;
        }
        // Per key order of the load: in key order ("big"), or not ("mix").
        let mut rows = Vec::new();
        for prefix in ["big", "mix"] {
        let (mut dr, mut rr, mut dc, mut rc) = (vec![], vec![], vec![], vec![]);
        // Client CPU around a whole call (dropping what it read included).
        async fn cpu<F: Future<Output = f64>>(cpu: &mut Vec<f64>, f: F) -> f64 {
            let c0 = proc::cpu_time();
            let wall = f.await;
            cpu.push((proc::cpu_time() - c0).as_secs_f64());
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            wall
        }
        // Resyncs vary most (the server's garbage collector): three times the runs, and a
        // pause after each, so that cleaning up one (consumer deletion) does not land in
        // the next.
        for run in 0..3 * runs {
            if !does("resync") {
            } else if run % 2 == 0 {
                dr.push(cpu(&mut dc, ds_resync(&store, prefix)).await);
                rr.push(cpu(&mut rc, raw_resync(&kv, prefix)).await);
            } else {
                rr.push(cpu(&mut rc, raw_resync(&kv, prefix)).await);
                dr.push(cpu(&mut dc, ds_resync(&store, prefix)).await);
            }
        }
        rows.push((prefix, dr, rr, dc, rc));
        }
        let peak = proc::peak_rss_kib(nats.pid()).unwrap_or(0);

        let version = store.client().server_info().version;
        println!("datasync-nats vs raw async-nats KV, nats-server {version} (file storage, default sync) on this machine, {runs} runs; 256-byte values");
        println!();
        println!("| work | datasync-nats | raw async-nats | overhead | goal |");
        println!("|---|---|---|---|---|");
        let paired = datasync_integration::bench::paired_overhead;
        if does("inflight") {
            println!(
                "| 64 puts in flight | {:.0} ops/s | {:.0} ops/s | {:+.1} % | <= 10 % |",
                median(&di),
                median(&ri),
                paired(&ri, &di)
            );
        }
        for (name, q) in [("p50", 0.5), ("p99", 0.99)].into_iter().filter(|_| does("watch")) {
            let (d, r) = (quantile(dw.clone(), q), quantile(rw.clone(), q));
            println!(
                "| watch put→event {name} | {} µs | {} µs | {:+.1} % | {} |",
                d.as_micros(),
                r.as_micros(),
                (d.as_secs_f64() / r.as_secs_f64() - 1.0) * 100.0,
                if q == 0.5 { "<= 10 %" } else { "" }
            );
        }
        if !does("resync") {
            return;
        }
        for (prefix, dr, rr, dc, rc) in &rows {
            let order = if *prefix == "big" {
                "written in key order"
            } else {
                "written in shuffled order"
            };
            println!(
                "| resync of 100k keys {order}, wall time | {:.0} ms | {:.0} ms | {:+.1} % | <= 10 % |",
                median(dr) * 1e3,
                median(rr) * 1e3,
                paired(dr, rr)
            );
            println!(
                "| resync of 100k keys {order}, client CPU | {:.0} ms | {:.0} ms | {:+.1} % | |",
                median(dc) * 1e3,
                median(rc) * 1e3,
                paired(dc, rc)
            );
        }
        println!();
        println!("nats-server peak RSS: {} MiB", peak / 1024);
    });
}
