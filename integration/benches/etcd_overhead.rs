//! datasync-over-etcd against raw `etcd-client` calls doing the same work, same etcd
//! server, same run. Prints a table of medians and ratios.
//!
//! `cargo bench -p datasync-integration --bench etcd_overhead`
//! (`BENCH_RUNS` sets the runs per measurement, default 5; `BENCH_PAGE` the resync page size.)
//! Times are medians; the resync overhead is the median of per-run ratios.
#![allow(clippy::unwrap_used)] // a benchmark: failing loudly is the point

use std::time::Instant;

use datasync::{Event, Prefix, WatchOptions, Watcher};
use datasync_etcd::{EtcdConfig, EtcdStore};
use datasync_integration::bench::{
    etcd_inflight as raw_inflight, etcd_watch, median, quantile, store_inflight as ds_inflight,
    store_watch,
};
use datasync_integration::{EtcdServer, proc};
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
    let runs = datasync_integration::bench::runs(5);
    let rt = datasync_integration::bench::runtime();
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
        let (mut dc, mut rc) = (vec![], vec![]);
        // Client CPU around a whole call (dropping what it read included).
        async fn cpu<F: Future<Output = f64>>(cpu: &mut Vec<f64>, f: F) -> f64 {
            let c0 = proc::cpu_time();
            let wall = f.await;
            cpu.push((proc::cpu_time() - c0).as_secs_f64());
            wall
        }
        for run in 0..runs {
            if run % 2 == 0 {
                dr.push(cpu(&mut dc, ds_resync(&store)).await);
                rr.push(cpu(&mut rc, raw_resync(&mut kv)).await);
            } else {
                rr.push(cpu(&mut rc, raw_resync(&mut kv)).await);
                dr.push(cpu(&mut dc, ds_resync(&store)).await);
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
        // etcd's own pauses move single timings by tens of percent between runs, in both
        // directions; each run times datasync and raw back to back (order alternating), so
        // the median of the per-run ratios is the estimate that cancels that drift.
        let paired = datasync_integration::bench::paired_overhead;
        for (what, raw, goal) in [
            ("one request", &rr, "<= 10 %"),
            ("same pages, pinned", &pr, ""),
        ] {
            println!(
                "| resync of 100k keys (raw: {what}) | {:.0} ms | {:.0} ms | {:+.1} % | {goal} |",
                median(&dr) * 1e3,
                median(raw) * 1e3,
                paired(&dr, raw)
            );
        }
        // etcd does the same work for both (one identical range request): what datasync
        // adds is the client's extra CPU, as a share of the whole raw resync.
        let (dcpu, rcpu) = (median(&dc), median(&rc));
        println!(
            "| resync of 100k keys, client CPU | {:.0} ms | {:.0} ms | {:+.1} % of the raw resync's time | <= 10 % |",
            dcpu * 1e3,
            rcpu * 1e3,
            (dcpu - rcpu) / median(&rr) * 100.0
        );
    });
}
