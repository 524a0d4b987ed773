//! datasync-over-etcd against raw `etcd-client` calls doing the same work, same etcd
//! server, same run. Prints a table of medians and ratios.
//!
//! `cargo bench -p datasync-integration --bench etcd_overhead`
//! (`BENCH_RUNS` sets the runs per measurement, default 5; `BENCH_PAGE` the resync page size.)
#![allow(clippy::unwrap_used)] // a benchmark: failing loudly is the point

use std::time::Instant;

use datasync::{Event, Prefix, WatchOptions, Watcher};
use datasync_etcd::{EtcdConfig, EtcdStore};
use datasync_integration::EtcdServer;
use datasync_integration::bench::{
    etcd_inflight as raw_inflight, etcd_watch, median, quantile, store_inflight as ds_inflight,
    store_watch,
};
use futures_util::StreamExt;

const INFLIGHT_N: usize = 20_000;
const RESYNC_N: usize = 100_000;

/// A watch registration's initial resync of 100k keys: from `watch()` to the event.
async fn ds_resync(s: &EtcdStore) -> f64 {
    let t = Instant::now();
    let mut w = s
        .watch(
            "resync",
            &[Prefix::new("big/").unwrap()],
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

/// The same read done by hand: the prefix in one request, decoded into owned keys and
/// values as a consumer would hold them.
async fn raw_resync(kv: &mut etcd_client::KvClient) -> f64 {
    let t = Instant::now();
    let mut g = kv
        .get("big/", Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let values: Vec<(String, Vec<u8>)> = g
        .take_kvs()
        .into_iter()
        .map(|kv| {
            let (k, v) = kv.into_key_value();
            (String::from_utf8(k).unwrap(), v)
        })
        .collect();
    assert_eq!(values.len(), RESYNC_N);
    t.elapsed().as_secs_f64()
}

/// The contract's read done by hand: pages of `page` keys, all pinned to the first
/// page's revision, decoded into owned keys and values.
async fn raw_paged_resync(kv: &mut etcd_client::KvClient, page: usize) -> f64 {
    let t = Instant::now();
    let (mut from, end) = (b"big/".to_vec(), b"big0".to_vec());
    let mut rev = 0;
    let mut values: Vec<(String, Vec<u8>)> = Vec::new();
    loop {
        let mut opts = etcd_client::GetOptions::new()
            .with_range(end.clone())
            .with_limit(page as i64);
        if rev != 0 {
            opts = opts.with_revision(rev);
        }
        let mut g = kv.get(from.clone(), Some(opts)).await.unwrap();
        if rev == 0 {
            rev = g.header().unwrap().revision();
        }
        let more = g.more();
        for kv in g.take_kvs() {
            let (k, v) = kv.into_key_value();
            values.push((String::from_utf8(k).unwrap(), v));
        }
        if !more {
            break;
        }
        from = values.last().unwrap().0.as_bytes().to_vec();
        from.push(0);
    }
    assert_eq!(values.len(), RESYNC_N);
    t.elapsed().as_secs_f64()
}

fn main() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let etcd = EtcdServer::start().await.unwrap_or_else(|e| panic!("{e}"));
        let client = etcd.client().await.unwrap();
        let mut config = EtcdConfig::new([etcd.endpoint()]);
        if let Some(page) = std::env::var("BENCH_PAGE").ok().and_then(|v| v.parse().ok()) {
            config = config.with_page_size(page);
        }
        let page = config.page_size;
        let store = EtcdStore::connect(config).await.unwrap();
        let (mut di, mut ri, mut dw, mut rw) = (vec![], vec![], vec![], vec![]);
        for run in 0..runs {
            // Alternate which goes first, so neither always meets a fresher server.
            if run % 2 == 0 {
                di.push(ds_inflight(&store, &format!("ds{run}"), INFLIGHT_N).await);
                ri.push(raw_inflight(&client, &format!("raw{run}"), INFLIGHT_N).await);
            } else {
                ri.push(raw_inflight(&client, &format!("raw{run}"), INFLIGHT_N).await);
                di.push(ds_inflight(&store, &format!("ds{run}"), INFLIGHT_N).await);
            }
            dw.extend(store_watch(&store, &format!("dsw{run}/")).await);
            // The raw watch asks for previous values too: the contract needs them.
            rw.extend(etcd_watch(&client, &format!("raww{run}/"), true).await);
        }
        raw_inflight(&client, "big", RESYNC_N).await;
        let mut kv = client.kv_client().max_decoding_message_size(256 << 20);
        let (mut dr, mut rr, mut pr) = (vec![], vec![], vec![]);
        for run in 0..runs {
            if run % 2 == 0 {
                dr.push(ds_resync(&store).await);
                rr.push(raw_resync(&mut kv).await);
            } else {
                rr.push(raw_resync(&mut kv).await);
                dr.push(ds_resync(&store).await);
            }
            pr.push(raw_paged_resync(&mut kv, page).await);
        }

        let version = client.clone().status().await.unwrap().version().to_owned();
        println!("datasync-etcd vs raw etcd-client, etcd {version} on this machine, {runs} runs, medians; 256-byte values; resync pages of {page} keys");
        println!();
        println!("| work | datasync-etcd | raw etcd-client | overhead | goal |");
        println!("|---|---|---|---|---|");
        let (di, ri) = (median(&di), median(&ri));
        println!(
            "| 64 puts in flight | {di:.0} ops/s | {ri:.0} ops/s | {:+.1} % | <= 10 % |",
            (ri / di - 1.0) * 100.0
        );
        for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
            let (d, r) = (quantile(dw.clone(), q), quantile(rw.clone(), q));
            println!(
                "| watch put→event {name} | {} µs | {} µs | {:+.1} % | {} |",
                d.as_micros(),
                r.as_micros(),
                (d.as_secs_f64() / r.as_secs_f64() - 1.0) * 100.0,
                if q == 0.5 { "<= 10 %" } else { "" }
            );
        }
        let (dr, rr, pr) = (median(&dr), median(&rr), median(&pr));
        println!(
            "| resync of 100k keys (raw: one request) | {:.0} ms | {:.0} ms | {:+.1} % | <= 10 % |",
            dr * 1e3,
            rr * 1e3,
            (dr / rr - 1.0) * 100.0
        );
        println!(
            "| resync of 100k keys (raw: same pages, pinned) | {:.0} ms | {:.0} ms | {:+.1} % | |",
            dr * 1e3,
            pr * 1e3,
            (dr / pr - 1.0) * 100.0
        );
    });
}
