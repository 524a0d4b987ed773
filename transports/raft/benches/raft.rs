//! Embedded raft store benchmark (prints a table). `cargo bench -p datasync-raft --bench raft`.
#![allow(clippy::unwrap_used)] // a benchmark: failing loudly is the point

use std::time::{Duration, Instant};

use datasync::{Key, PutOptions, Value, Writer};
use datasync_raft::{RaftConfig, RaftStore};

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p) as usize]
}

async fn sequential(store: &RaftStore, n: usize) -> (f64, Duration) {
    let v = Value::from(vec![b'v'; 256]);
    let mut lat = Vec::with_capacity(n);
    let t = Instant::now();
    for i in 0..n {
        let s = Instant::now();
        store
            .put(
                &Key::new(format!("seq/{i:06}")).unwrap(),
                v.clone(),
                PutOptions::new(),
            )
            .await
            .unwrap();
        lat.push(s.elapsed());
    }
    (n as f64 / t.elapsed().as_secs_f64(), pct(&mut lat, 0.5))
}

async fn in_flight(store: &RaftStore, n: usize, depth: usize) -> f64 {
    let v = Value::from(vec![b'v'; 256]);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..depth {
        let (store, v) = (store.clone(), v.clone());
        tasks.push(tokio::spawn(async move {
            for i in (w..n).step_by(depth) {
                store
                    .put(
                        &Key::new(format!("par/{i:07}")).unwrap(),
                        v.clone(),
                        PutOptions::new(),
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
        let (ops, p50) = sequential(&store, 2000).await;
        println!("sequential: {ops:.0} ops/s, p50 {p50:?}");
        let ops = in_flight(&store, 20000, 64).await;
        println!("64 in flight: {ops:.0} ops/s");
        store.shutdown().await;
    });
}
