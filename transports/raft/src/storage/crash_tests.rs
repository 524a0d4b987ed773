//! Crash points of a follower's whole storage (the log and redb together), at every
//! operation that changes a file: appends and applies (the state machine's commits,
//! durable or not), a snapshot built here, a leader's snapshot installed, the log purge
//! that follows it, and a clean close. The log's own operations (truncation, segment
//! rolls) have their crash tests in `wal.rs`.
//!
//! After each crash (clean or torn, with or without the unsynced writes), the store must
//! open, its state machine must equal the model at the index it says it applied (never a
//! partial apply, never past its log), its stored snapshot must be the model's state at
//! the snapshot's index, the log must hold every entry after that index,
//! every acknowledged append must still be there (in the log or in the applied state),
//! and re-applying the log must reach the model's state at the log's end.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{CommittedLeaderId, EntryPayload, RaftSnapshotBuilder, SnapshotMeta};
use redb::{Database, ReadableDatabase, ReadableTable};

use super::log::{LogStore, applied};
use super::tables::{KV, SM_META, Stored};
use super::{crash, open, sm};
use crate::types::{Command, Entry, LogId, NodeId, SnapshotData};

const SEGMENT: u64 = 64 << 10;
/// Local entries before the crash points, and in all.
const SETUP: u64 = 20;
const LOCAL: u64 = 25;
/// The leader's snapshot's index, and the entries after it.
const INSTALL: u64 = 40;
const LAST: u64 = 45;

type Model = BTreeMap<String, Vec<u8>>;

fn id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

/// Entry `index` (the log starts at 0) of term `term`: a put of one of seven keys (values say who wrote them).
fn entry(term: u64, index: u64) -> Entry {
    let value = format!("t{term}-{index}-{}", "x".repeat(300)).into_bytes();
    Entry {
        log_id: id(term, index),
        payload: EntryPayload::Normal(Command::Put {
            key: format!("k/{}", index % 7),
            value,
            expires_at_ms: None,
        }),
    }
}

/// The state after entries `from..=to` of `term` over `base`.
fn model(mut base: Model, term: u64, from: u64, to: u64) -> Model {
    for i in from..=to {
        if let EntryPayload::Normal(Command::Put { key, value, .. }) = entry(term, i).payload {
            base.insert(key, value);
        }
    }
    base
}

/// A follower's entries are term 1 up to `LOCAL`; the leader's are term 2.
fn expected_at(a: LogId) -> Option<Model> {
    match (a.leader_id.term, a.index) {
        (1, i) if i <= LOCAL => Some(model(Model::new(), 1, 0, i)),
        (2, i) if i >= INSTALL => {
            Some(model(model(Model::new(), 2, 0, INSTALL), 2, INSTALL + 1, i))
        }
        _ => None,
    }
}

struct Parts {
    db: Arc<Database>,
    log: LogStore,
    sm: sm::StateMachine,
    shared: Arc<sm::Shared>,
}

fn parts(dir: &Path) -> Result<Parts, super::OpenError> {
    let (db, wal) = open(dir, SEGMENT)?;
    let shared = sm::Shared::new(db.clone(), 100, crate::Clock::new())
        .map_err(|e| super::OpenError::State(Box::new(e)))?;
    Ok(Parts {
        log: LogStore::new(db.clone(), wal, Some(1)),
        sm: sm::StateMachine::new(shared.clone()),
        db,
        shared,
    })
}

fn kv(db: &Database) -> Model {
    let tx = db.begin_read().expect("read");
    let t = tx.open_table(KV).expect("table");
    t.iter()
        .expect("iter")
        .map(|item| {
            let (k, v) = item.expect("item");
            let rec = Stored::decode(v.value()).expect("a stored record decodes");
            (k.value().to_owned(), rec.value.as_bytes().to_vec())
        })
        .collect()
}

fn installed(db: &Database) -> Option<LogId> {
    let tx = db.begin_read().expect("read");
    let t = tx.open_table(SM_META).expect("table");
    t.get("installed")
        .expect("get")
        .and_then(|v| bincode::deserialize::<Option<LogId>>(v.value()).expect("decodes"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// The leader's snapshot at `INSTALL`.
fn leader_snapshot(
    rt: &tokio::runtime::Runtime,
) -> (SnapshotMeta<NodeId, openraft::BasicNode>, Vec<u8>) {
    let dir = tempfile::tempdir().expect("temp dir");
    rt.block_on(async {
        let mut p = parts(dir.path()).expect("opens");
        for i in 0..=INSTALL {
            p.log.wal_append(vec![entry(2, i)]).expect("append");
            p.sm.apply(vec![entry(2, i)]).await.expect("apply");
        }
        let snap =
            p.sm.get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .expect("snapshot");
        let data = snap.snapshot.into_bytes().await.expect("encodes");
        p.shared.close();
        (snap.meta, data)
    })
}

/// A follower at `SETUP`, copied before each run.
fn follower(rt: &tokio::runtime::Runtime) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    rt.block_on(async {
        let mut p = parts(dir.path()).expect("opens");
        for i in 0..=SETUP {
            p.log.wal_append(vec![entry(1, i)]).expect("append");
            p.sm.apply(vec![entry(1, i)]).await.expect("apply");
        }
        p.shared.close();
    });
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for item in std::fs::read_dir(from).expect("read dir") {
        let item = item.expect("item");
        if item.file_type().expect("type").is_dir() {
            copy_dir(&item.path(), &to.join(item.file_name()));
        } else {
            std::fs::copy(item.path(), to.join(item.file_name())).expect("copy");
        }
    }
}

/// Runs the workload on `dir` with `plan` armed; returns the plan after the crash (its
/// unsynced writes undone if it says so) and the appends acknowledged.
fn run(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    snapshot: &(SnapshotMeta<NodeId, openraft::BasicNode>, Vec<u8>),
    plan: crash::Plan,
) -> (crash::Plan, Vec<LogId>) {
    crash::arm(Some(plan));
    let mut acked = Vec::new();
    rt.block_on(async {
        let Ok(mut p) = parts(dir) else { return };
        let steps = async {
            for i in SETUP + 1..=LOCAL {
                p.log.wal_append(vec![entry(1, i)]).map_err(|_| ())?;
                acked.push(id(1, i));
                p.sm.apply(vec![entry(1, i)]).await.map_err(|_| ())?;
            }
            p.sm.get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .map_err(|_| ())?;
            let (meta, data) = snapshot;
            p.sm.install_snapshot(meta, Box::new(SnapshotData::bytes(data.clone())))
                .await
                .map_err(|_| ())?;
            p.log.purge(id(2, INSTALL)).await.map_err(|_| ())?;
            for i in INSTALL + 1..=LAST {
                p.log.wal_append(vec![entry(2, i)]).map_err(|_| ())?;
                acked.push(id(2, i));
                p.sm.apply(vec![entry(2, i)]).await.map_err(|_| ())?;
            }
            p.shared.close();
            Ok::<(), ()>(())
        };
        let _ = steps.await;
        // Dropped while the crash point holds: nothing of a close reaches the files.
        drop(p);
    });
    (crash::arm(None).expect("armed"), acked)
}

/// What is wrong with the store in `dir` after a crash, if anything.
fn check(rt: &tokio::runtime::Runtime, dir: &Path, acked: &[LogId]) -> Result<(), String> {
    let mut p = parts(dir).map_err(|e| format!("does not open: {e} ({e:?})"))?;
    let a = applied(&p.db)
        .map_err(|e| e.to_string())?
        .ok_or("nothing applied")?;
    let state = kv(&p.db);
    let want = expected_at(a).ok_or_else(|| format!("applied {a} is no state the run had"))?;
    if state != want {
        return Err(format!("the state machine at {a} differs from the model's"));
    }
    let (purged, last) = {
        let mem = p.log.mem();
        (mem.purged, mem.last)
    };
    if purged.is_some_and(|pu| pu.index > a.index) {
        return Err(format!(
            "the log is purged to {purged:?}, past the applied {a}"
        ));
    }
    // A log behind the applied state is one only an installed snapshot may leave (open
    // checks it); openraft then drops it. Otherwise it continues from the applied index.
    let replay = match last {
        Some(l) if l.index > a.index => p.log.wal_read(a.index + 1).map_err(|e| e.to_string())?,
        _ => Vec::new(),
    };
    if last.is_some_and(|l| l.index < a.index) && installed(&p.db) != Some(a) {
        return Err(format!("the log ends at {last:?}, before the applied {a}"));
    }
    for (n, e) in replay.iter().enumerate() {
        if e.log_id.index != a.index + 1 + n as u64 {
            return Err(format!(
                "the log skips from {} to {}",
                a.index + n as u64,
                e.log_id
            ));
        }
    }
    // Acknowledged appends of the leader's term are never lost; the follower's own are
    // kept unless the leader's snapshot replaced them.
    for ack in acked {
        let held = ack.index <= a.index
            && (ack.leader_id.term == a.leader_id.term || a.leader_id.term == 2)
            || replay.iter().any(|e| e.log_id == *ack);
        let replaced = ack.leader_id.term == 1 && a.leader_id.term == 2;
        if !held && !replaced {
            return Err(format!(
                "the acknowledged entry {ack} is gone (applied {a}, log to {last:?})"
            ));
        }
    }
    // The snapshot served now (the state as it is, made durable first) is the state at
    // its index.
    if let Some(snap) = rt
        .block_on(p.sm.get_current_snapshot())
        .map_err(|e| e.to_string())?
    {
        let at = snap.meta.last_log_id.ok_or("a snapshot of nothing")?;
        let fresh = tempfile::tempdir().expect("temp dir");
        let mut q = parts(fresh.path()).map_err(|e| e.to_string())?;
        rt.block_on(q.sm.install_snapshot(&snap.meta, snap.snapshot))
            .map_err(|e| e.to_string())?;
        let want =
            expected_at(at).ok_or_else(|| format!("a snapshot at {at}: no state the run had"))?;
        if kv(&q.db) != want {
            return Err(format!(
                "the stored snapshot at {at} differs from the model's"
            ));
        }
        q.shared.close();
    }
    // Re-applying the log reaches the model's state at its end.
    if let Some(end) = replay.last().map(|e| e.log_id) {
        rt.block_on(p.sm.apply(replay.clone()))
            .map_err(|e| e.to_string())?;
        p.shared.settle().map_err(|e| e.to_string())?;
        let want = expected_at(end)
            .ok_or_else(|| format!("the log ends at {end}, no state the run had"))?;
        if kv(&p.db) != want {
            return Err(format!(
                "re-applying {} to {end} does not reach the model",
                a.index + 1
            ));
        }
    }
    p.shared.close();
    Ok(())
}

/// Every file operation of the workload, in turn, is where the process stops: cleanly
/// or tearing the write, keeping or losing what was not synced.
#[test]
fn every_crash_point_of_a_followers_storage_recovers() {
    crate::rt::set_inline(true);
    let rt = runtime();
    let snapshot = leader_snapshot(&rt);
    let base = follower(&rt);
    let work = tempfile::tempdir().expect("temp dir");
    // Count the operations, and check the run without a crash.
    let dir = work.path().join("count");
    copy_dir(base.path(), &dir);
    let (plan, acked) = run(
        &rt,
        &dir,
        &snapshot,
        crash::Plan {
            at: u64::MAX,
            ..Default::default()
        },
    );
    let ops = plan.count;
    assert!(ops > 15, "only {ops} operations counted");
    check(&rt, &dir, &acked).unwrap_or_else(|e| panic!("without a crash: {e}"));
    let mut failures = Vec::new();
    let (mut tore, mut lost) = (0, 0);
    for torn in [false, true] {
        for lose in [false, true] {
            for at in 1..=ops {
                let dir = work.path().join(format!("{torn}-{lose}-{at}"));
                copy_dir(base.path(), &dir);
                let plan = crash::Plan {
                    at,
                    torn,
                    lose,
                    ..Default::default()
                };
                let (plan, acked) = run(&rt, &dir, &snapshot, plan);
                assert!(plan.dead, "operation {at} of {ops} was not reached");
                tore += usize::from(plan.tore);
                lost += plan.lost;
                if let Err(e) = check(&rt, &dir, &acked) {
                    failures.push(format!(
                        "at operation {at}/{ops} (torn {torn}, losing unsynced {lose}): {e}"
                    ));
                }
                std::fs::remove_dir_all(&dir).expect("clean up");
            }
        }
    }
    crate::rt::set_inline(false);
    assert!(
        tore > 0 && lost > 0,
        "no write was torn ({tore}) or lost ({lost})"
    );
    assert!(
        failures.is_empty(),
        "{} of {} crashes:\n{}",
        failures.len(),
        ops * 4,
        failures.join("\n")
    );
}
