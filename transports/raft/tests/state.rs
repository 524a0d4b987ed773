//! The state machine under concurrent writes: reads see every acknowledged write at
//! once (redb is written behind the apply path), conditions and prefix deletes see
//! writes not yet stored, and long listings (read from both ends) are whole and ordered.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::sync::Arc;

use datasync::{
    CasOutcome, Consistency, DeleteOptions, Expect, Key, Prefix, PutOptions, ReadOptions, Revision,
    Value, Writer,
};
use datasync_raft::{RaftConfig, RaftStore};

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

async fn store() -> (tempfile::TempDir, RaftStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    (dir, s)
}

/// Puts `keys` from 64 tasks at once, so they batch.
async fn put_all(s: &RaftStore, keys: Vec<String>) {
    let keys = Arc::new(keys);
    let tasks: Vec<_> = (0..64)
        .map(|w| {
            let (s, keys) = (s.clone(), keys.clone());
            tokio::spawn(async move {
                for k in keys.iter().skip(w).step_by(64) {
                    s.put(&key(k), Value::from(k.clone()), PutOptions::new())
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_listings_are_whole_and_in_order() {
    let (_dir, s) = store().await;
    // Around the length where a listing starts reading from both ends, and where the
    // two ends check whether they have met; with neighbours on both sides.
    let sizes = [
        1,
        4095,
        4096,
        4097,
        4096 + 255,
        4096 + 256,
        4096 + 257,
        12_345,
    ];
    let mut all = Vec::new();
    for n in sizes {
        all.push(format!("p{n}-before"));
        all.push(format!("p{n}0after"));
        all.extend((0..n).map(|i| format!("p{n}/{i:06}")));
    }
    put_all(&s, all).await;
    for n in sizes {
        let l = s
            .list(&Prefix::new(format!("p{n}/")).unwrap(), ReadOptions::new())
            .await
            .unwrap();
        let got: Vec<&str> = l.values.iter().map(|kv| kv.key.as_str()).collect();
        let want: Vec<String> = (0..n).map(|i| format!("p{n}/{i:06}")).collect();
        assert_eq!(got, want, "listing of {n} keys");
        for kv in &l.values {
            assert_eq!(kv.value.as_bytes(), kv.key.as_str().as_bytes());
        }
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_is_read_at_once() {
    let (_dir, s) = store().await;
    let tasks: Vec<_> = (0..64)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    let k = key(&format!("rw/{w:02}/{i:03}"));
                    let rev = s
                        .put(&k, Value::from(format!("{i}")), PutOptions::new())
                        .await
                        .unwrap();
                    for c in [Consistency::Local, Consistency::Linearizable] {
                        let got = s
                            .get(&k, ReadOptions::new().consistency(c))
                            .await
                            .unwrap()
                            .expect("an acknowledged write is read");
                        assert_eq!(got.revision, rev);
                    }
                    let mine = s
                        .list(
                            &Prefix::new(format!("rw/{w:02}/")).unwrap(),
                            ReadOptions::new().consistency(Consistency::Local),
                        )
                        .await
                        .unwrap();
                    assert_eq!(mine.values.len(), i + 1);
                    assert!(mine.revision >= rev);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_see_writes_not_yet_stored() {
    let (_dir, s) = store().await;
    for round in 0..20 {
        // Many create-if-absent writes to one key, batched together: exactly one wins.
        let k = key(&format!("cas/{round}"));
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let (s, k) = (s.clone(), k.clone());
                tokio::spawn(async move {
                    s.compare_and_swap(
                        &k,
                        Expect::Absent,
                        Value::from(format!("{i}")),
                        PutOptions::new(),
                    )
                    .await
                    .unwrap()
                })
            })
            .collect();
        let mut won: Vec<Revision> = Vec::new();
        for t in tasks {
            if let CasOutcome::Swapped(r) = t.await.unwrap() {
                won.push(r);
            }
        }
        assert_eq!(won.len(), 1, "round {round}: one create-if-absent wins");
        // A counter incremented by CAS from many tasks loses no increment.
        let c = key(&format!("counter/{round}"));
        s.put(&c, Value::from("0"), PutOptions::new())
            .await
            .unwrap();
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (s, c) = (s.clone(), c.clone());
                tokio::spawn(async move {
                    loop {
                        let cur = s.get(&c, ReadOptions::new()).await.unwrap().unwrap();
                        let n: u64 = std::str::from_utf8(cur.value.as_bytes())
                            .unwrap()
                            .parse()
                            .unwrap();
                        let next = Value::from(format!("{}", n + 1));
                        match s
                            .compare_and_swap(
                                &c,
                                Expect::Revision(cur.revision),
                                next,
                                PutOptions::new(),
                            )
                            .await
                            .unwrap()
                        {
                            CasOutcome::Swapped(_) => return,
                            CasOutcome::Conflict(_) => continue,
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let v = s.get(&c, ReadOptions::new()).await.unwrap().unwrap();
        assert_eq!(v.value.as_bytes(), b"16");
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_delete_covers_writes_not_yet_stored() {
    let (_dir, s) = store().await;
    for round in 0..20 {
        let prefix = format!("del{round}/");
        let keys: Vec<String> = (0..200).map(|i| format!("{prefix}{i:03}")).collect();
        // Half the keys stored (hashing the state waits for that); the other half put
        // concurrently with the prefix delete, so some share its batch.
        put_all(&s, keys[..100].to_vec()).await;
        s.state_hash().unwrap();
        let puts: Vec<_> = keys[100..]
            .iter()
            .map(|k| {
                let (s, k) = (s.clone(), key(k));
                tokio::spawn(async move {
                    let r = s
                        .put(&k, Value::from("v"), PutOptions::new())
                        .await
                        .unwrap();
                    (k, r)
                })
            })
            .collect();
        let del = {
            let (s, k) = (s.clone(), key(&prefix));
            tokio::spawn(async move { s.delete(&k, DeleteOptions::new().prefix()).await.unwrap() })
        };
        let mut revs = Vec::new();
        for p in puts {
            revs.push(p.await.unwrap());
        }
        let d = del.await.unwrap();
        let before = revs.iter().filter(|(_, r)| *r < d.revision).count() as u64;
        assert_eq!(d.count, 100 + before, "round {round}");
        let mut after: Vec<&str> = revs
            .iter()
            .filter(|(_, r)| *r > d.revision)
            .map(|(k, _)| k.as_str())
            .collect();
        after.sort_unstable();
        let l = s
            .list(&Prefix::new(&prefix).unwrap(), ReadOptions::new())
            .await
            .unwrap();
        let left: Vec<&str> = l.values.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(left, after, "round {round}: what the delete did not cover");
    }
    s.shutdown().await;
}
