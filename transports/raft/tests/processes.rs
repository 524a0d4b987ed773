//! Three members as separate processes on loopback (the `cluster_node` example), driven
//! through remote clients: the leader is killed with SIGKILL under load, writes go on
//! after the re-election, every acknowledged write survives, and the killed member,
//! restarted behind the retained log, catches up by snapshot; watchers resync and end
//! with the store's state. A member killed and restarted alone serves no state older
//! than it served before.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datasync::testing::mirror_until;
use datasync::testing::process::Process;
use datasync::{
    Consistency, Key, Mirror, Prefix, PutOptions, ReadOptions, ResyncReason, Value, WatchOptions,
    Watcher, Writer,
};
use datasync_raft::testing::{example_binary, test_secret, wait_until};
use datasync_raft::{RemoteConfig, RemoteStore};
use futures_util::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};

/// What a member process last reported.
#[derive(Debug, Default, Clone, Copy)]
struct Status {
    leader: u64,
    revision: u64,
    installed: u64,
}

/// A member process; killed when dropped.
struct Node {
    id: u64,
    addr: String,
    process: Process,
    status: Arc<Mutex<Status>>,
}

impl Node {
    async fn start(id: u64, dir: &Path, listen: &str, join: Option<&str>) -> Node {
        let mut cmd = Command::new(example_binary("cluster_node"));
        cmd.arg(id.to_string()).arg(dir).arg(listen);
        if let Some(seed) = join {
            cmd.arg(seed);
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut process = Process::spawn_once("cluster_node", cmd).expect("spawn a member");
        let stdout = process.child().stdout.take().unwrap();
        let stdout = tokio::process::ChildStdout::from_std(stdout).unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("the member did not start within 60 s")
            .unwrap()
            .unwrap_or_else(|| panic!("member {id} exited at start"));
        let addr = ready
            .strip_prefix("READY ")
            .unwrap_or_else(|| panic!("member {id}: {ready}"))
            .to_owned();
        let status = Arc::new(Mutex::new(Status::default()));
        let report = status.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let f: Vec<u64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                if let [leader, revision, installed] = f[..] {
                    *report.lock().unwrap() = Status {
                        leader,
                        revision,
                        installed,
                    };
                }
            }
        });
        Node {
            id,
            addr,
            process,
            status,
        }
    }

    fn status(&self) -> Status {
        *self.status.lock().unwrap()
    }
}

async fn remote(endpoints: Vec<String>) -> RemoteStore {
    RemoteStore::connect(RemoteConfig::new(endpoints, test_secret()))
        .await
        .unwrap()
}

type Acked = Arc<Mutex<BTreeMap<String, u64>>>;

/// Writers that put unique keys through `store` until `stop`, recording each write
/// acknowledged (a failed one is of unknown outcome: not recorded, not retried).
fn writers(store: &RemoteStore, acked: &Acked, stop: &Arc<AtomicBool>, tag: &str) {
    for w in 0..4 {
        let (store, acked, stop) = (store.clone(), acked.clone(), stop.clone());
        let tag = tag.to_owned();
        tokio::spawn(async move {
            for i in 0u64.. {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let k = format!("load/{tag}/{w}/{i:05}");
                let v = Value::from(i.to_string());
                match store
                    .put(&Key::new(&k).unwrap(), v, PutOptions::new())
                    .await
                {
                    Ok(rev) => {
                        acked.lock().unwrap().insert(k, rev.0);
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_the_leader_under_load() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (mut nodes, leader) = three_members(&dirs).await;
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let li = nodes.iter().position(|n| n.id == leader).unwrap();

    let client = remote(addrs.clone()).await;
    // A watcher served by the leader (its address first).
    let mut on_leader = addrs.clone();
    on_leader.swap(0, li);
    let watcher = remote(on_leader).await;
    let prefix = Prefix::new("load/").unwrap();
    let mut w = watcher
        .watch("w", std::slice::from_ref(&prefix), WatchOptions::default())
        .await
        .unwrap();
    let mut mirror = Mirror::new();

    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    writers(&client, &acked, &stop, "a");
    wait_until("200 writes acknowledged", || {
        acked.lock().unwrap().len() >= 200
    })
    .await;

    // SIGKILL the leader mid-load.
    let mut killed = nodes.remove(li);
    killed.process.kill();
    let at_kill = acked.lock().unwrap().len();
    // Writes go on after the re-election, and run far past the killed member's log
    // (snapshots every 50 entries, 5 kept).
    wait_until("writes continue after the re-election", || {
        acked.lock().unwrap().len() >= at_kill + 1500
    })
    .await;
    let new_leader = nodes[0].status().leader;
    assert!(
        new_leader != 0 && new_leader != leader,
        "a new leader: {new_leader}"
    );

    // The killed member comes back on its address, behind the retained log.
    let back = Node::start(
        killed.id,
        dirs[killed.id as usize - 1].path(),
        &killed.addr,
        None,
    )
    .await;
    drop(killed);
    nodes.push(back);
    stop.store(true, Ordering::Relaxed);
    // Let in-flight writes finish, then read the final revision.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let listing = client.list(&prefix, ReadOptions::new()).await.unwrap();
    let target = listing.revision;
    let back = nodes.last().unwrap();
    wait_until("the restarted member catches up", || {
        back.status().revision >= target.0
    })
    .await;
    assert!(
        back.status().installed > 0,
        "the restarted member caught up by snapshot"
    );

    // Every acknowledged write is there, with its revision, also on the restarted
    // member's own replica.
    let acked = acked.lock().unwrap().clone();
    let on_back = remote(vec![back.addr.clone()]).await;
    let local = ReadOptions::new().consistency(Consistency::Local);
    let replica = on_back.list(&prefix, local).await.unwrap();
    for l in [&listing, &replica] {
        let stored: BTreeMap<_, _> = l
            .values
            .iter()
            .map(|kv| (kv.key.as_str().to_owned(), kv.revision.0))
            .collect();
        for (k, rev) in &acked {
            assert_eq!(stored.get(k), Some(rev), "acknowledged write {k}");
        }
    }
    assert_eq!(
        replica.values, listing.values,
        "the replica equals the cluster"
    );

    // The leader's watcher moved to a survivor with a resync and holds the final state;
    // a watcher on the restarted member starts from its caught-up replica.
    let reasons = mirror_until(&mut w, &mut mirror, target).await.unwrap();
    assert!(
        reasons.contains(&ResyncReason::Reconnect),
        "the watcher resynced after the kill: {reasons:?}"
    );
    let mut fresh = on_back
        .watch(
            "fresh",
            std::slice::from_ref(&prefix),
            WatchOptions::default(),
        )
        .await
        .unwrap();
    let mut fresh_mirror = Mirror::new();
    mirror_until(&mut fresh, &mut fresh_mirror, target)
        .await
        .unwrap();
    for m in [&mirror, &fresh_mirror] {
        let held: Vec<_> = m
            .values("")
            .map(|(k, v, r)| (k.clone(), v.clone(), r))
            .collect();
        let stored: Vec<_> = listing
            .values
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone(), kv.revision))
            .collect();
        assert_eq!(held, stored, "a watcher ends with the store's state");
    }
}

/// Three members; returns them, started and agreeing on a leader, with the leader's id.
async fn three_members(dirs: &[tempfile::TempDir]) -> (Vec<Node>, u64) {
    let mut nodes = vec![Node::start(1, dirs[0].path(), "127.0.0.1:0", None).await];
    let seed = nodes[0].addr.clone();
    for id in 2..=3u64 {
        let dir = dirs[id as usize - 1].path();
        nodes.push(Node::start(id, dir, "127.0.0.1:0", Some(&seed)).await);
    }
    wait_until("the members agree on a leader", || {
        let l = nodes[0].status().leader;
        l != 0 && nodes.iter().all(|n| n.status().leader == l)
    })
    .await;
    let leader = nodes[0].status().leader;
    (nodes, leader)
}

/// A member's state machine commits durably about once a second, so after a SIGKILL its
/// files may hold less than it had applied and served; its log holds the rest, but only
/// a leader can say how far that log is committed. Restarted alone, it must refuse local
/// reads and new watches rather than serve the older state; once the others are back it
/// serves everything again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restarted_after_a_crash_never_serves_older_state() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (mut nodes, leader) = three_members(&dirs).await;
    let fi = nodes.iter().position(|n| n.id != leader).unwrap();
    let (fid, faddr) = (nodes[fi].id, nodes[fi].addr.clone());
    let short = |addr: &str| {
        RemoteStore::connect(
            RemoteConfig::new([addr.to_owned()], test_secret()).timeout(Duration::from_secs(2)),
        )
    };
    let on_f = short(&faddr).await.unwrap();
    let prefix = Prefix::new("g/").unwrap();
    let local = ReadOptions::new().consistency(Consistency::Local);
    // Two writes a second apart: the state machine commits durably about once a
    // second, so its files then hold an applied state (a clean-close record needs one).
    for w in ["w/0", "w/1"] {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        on_f.put(&Key::new(w).unwrap(), Value::from("x"), PutOptions::new())
            .await
            .unwrap();
    }
    // Fewer writes than a snapshot's 50 entries (a snapshot commits durably), in well
    // under a second: the last of them are applied but not yet durable in redb.
    for i in 0..30 {
        let k = Key::new(format!("g/{i:03}")).unwrap();
        on_f.put(&k, Value::from(i.to_string()), PutOptions::new())
            .await
            .unwrap();
    }
    let before = on_f.list(&prefix, local).await.unwrap();
    assert_eq!(before.values.len(), 30, "the follower serves every write");
    drop(on_f);
    for n in &mut nodes {
        n.process.kill();
    }

    // The follower alone: no leader can tell it how far its log is committed.
    let back = Node::start(fid, dirs[fid as usize - 1].path(), &faddr, None).await;
    let client = short(&back.addr).await.unwrap();
    let older = |l: &datasync::Listing| l.revision < before.revision || l.values != before.values;
    match client.list(&prefix, local).await {
        Ok(l) => assert!(
            !older(&l),
            "a restarted member served an older state: {} keys at r{}, after serving {} at r{}",
            l.values.len(),
            l.revision.0,
            before.values.len(),
            before.revision.0
        ),
        Err(e) => eprintln!("refused while catching up, as it should: {e}"),
    }
    if let Ok(mut w) = client
        .watch(
            "early",
            std::slice::from_ref(&prefix),
            WatchOptions::default(),
        )
        .await
    {
        let first = tokio::time::timeout(Duration::from_secs(2), w.next()).await;
        if let Ok(Some(Ok(datasync::Event::Resync(r)))) = first {
            let values: Vec<_> = r.values().cloned().collect();
            assert!(
                r.revision >= before.revision && values == before.values,
                "a watch on a restarted member began with an older state: {} keys at r{}",
                values.len(),
                r.revision.0
            );
        }
    }

    // Stopped cleanly while still behind, it must not take its files for complete.
    let mut back = back;
    let exit = back
        .process
        .stop(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("a clean stop within 30 s: {e}"));
    assert!(exit.success(), "clean stop: {exit:?}");
    drop(client);
    let back = Node::start(fid, dirs[fid as usize - 1].path(), &faddr, None).await;
    let client = short(&back.addr).await.unwrap();
    match client.list(&prefix, local).await {
        Ok(l) => assert!(
            !older(&l),
            "after a clean stop while catching up, a member served an older state: {} keys at r{}",
            l.values.len(),
            l.revision.0
        ),
        Err(e) => eprintln!("still refused after a clean stop, as it should: {e}"),
    }

    // The others come back; the member catches up and serves everything it had.
    let mut others = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        if i != fi {
            others.push(Node::start(n.id, dirs[n.id as usize - 1].path(), &n.addr, None).await);
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match client.list(&prefix, local).await {
            Ok(l) if !older(&l) => break,
            Ok(l) => panic!(
                "a member that caught up served an older state: {} keys at r{}",
                l.values.len(),
                l.revision.0
            ),
            Err(e) if tokio::time::Instant::now() > deadline => {
                panic!("the restarted member did not catch up within 60 s: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    drop((back, others));
}
