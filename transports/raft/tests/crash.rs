//! Crash safety: a child process writing under load is killed with SIGKILL at random
//! points; after every restart each acknowledged write is present and the revision never
//! goes backwards. `DATASYNC_CRASH_CYCLES` sets the number of cycles (default 20) for a
//! longer soak.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use datasync::{Key, ReadOptions, Revision, Value, Writer};
use datasync_raft::testing::example_binary;
use datasync_raft::{RaftConfig, RaftStore};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// A small deterministic generator for kill delays.
fn delay_ms(cycle: u64) -> u64 {
    let x = (cycle + 1)
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    20 + (x >> 33) % 280
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let cycles: u64 = std::env::var("DATASYNC_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let bin = example_binary("crash_writer");
    let dir = tempfile::tempdir().unwrap();
    let mut last_revision = Revision::ZERO;
    let mut total_acked = 0usize;
    for cycle in 0..cycles {
        let mut child = Command::new(&bin)
            .arg(dir.path())
            .arg(format!("c{cycle}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the writer");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("writer did not start within 30 s")
            .expect("read stdout");
        assert_eq!(
            ready.as_deref(),
            Some("READY"),
            "cycle {cycle}: writer failed to open the store"
        );
        let mut acked: BTreeMap<String, u64> = BTreeMap::new();
        // The random delay starts at the first acknowledgement: kills land mid-load.
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("no write acknowledged within 30 s")
            .expect("read stdout")
            .unwrap_or_else(|| panic!("cycle {cycle}: the writer exited by itself"));
        record(&mut acked, &first);
        let kill_at = tokio::time::Instant::now() + Duration::from_millis(delay_ms(cycle));
        loop {
            tokio::select! {
                line = lines.next_line() => match line.expect("read stdout") {
                    Some(l) => record(&mut acked, &l),
                    None => panic!("cycle {cycle}: the writer exited by itself"),
                },
                _ = tokio::time::sleep_until(kill_at) => break,
            }
        }
        child.start_kill().expect("SIGKILL");
        child.wait().await.expect("reap");
        // Lines already written before the kill are acknowledged writes too.
        while let Some(l) = lines.next_line().await.expect("read stdout") {
            record(&mut acked, &l);
        }
        assert!(
            !acked.is_empty(),
            "cycle {cycle}: nothing was acknowledged before the kill"
        );
        total_acked += acked.len();

        let store = RaftStore::open(RaftConfig::new(dir.path()).snapshots(200, 50))
            .await
            .unwrap_or_else(|e| panic!("cycle {cycle}: reopen after SIGKILL failed: {e}"));
        // Before any read that could wait: open returns only with the log re-applied.
        let at_open = store.revision();
        let max_acked = Revision(*acked.values().max().unwrap());
        assert!(
            at_open >= max_acked,
            "cycle {cycle}: revision {at_open} at open, behind acknowledged {max_acked}"
        );
        for (key, rev) in &acked {
            let got = store
                .get(&Key::new(key).unwrap(), ReadOptions::new())
                .await
                .unwrap_or_else(|e| panic!("cycle {cycle}: get {key}: {e}"));
            let i = key.rsplit('/').next().unwrap().to_owned();
            let kv =
                got.unwrap_or_else(|| panic!("cycle {cycle}: acknowledged write {key}@{rev} lost"));
            assert_eq!(
                kv.value,
                Value::from(i),
                "cycle {cycle}: {key} has a wrong value"
            );
            assert_eq!(
                kv.revision,
                Revision(*rev),
                "cycle {cycle}: {key} has a wrong revision"
            );
        }
        let now = store.revision();
        assert!(
            now >= max_acked,
            "cycle {cycle}: revision {now} behind acknowledged {max_acked}"
        );
        assert!(
            now >= last_revision,
            "cycle {cycle}: revision went back from {last_revision} to {now}"
        );
        last_revision = now;
        store.shutdown().await;
    }
    eprintln!(
        "{cycles} SIGKILL cycles, {total_acked} acknowledged writes verified, final revision {last_revision}"
    );
}

fn record(acked: &mut BTreeMap<String, u64>, line: &str) {
    let mut parts = line.split(' ');
    if let (Some("ACK"), Some(key), Some(rev)) = (parts.next(), parts.next(), parts.next()) {
        acked.insert(key.to_owned(), rev.parse().expect("revision"));
    }
}
