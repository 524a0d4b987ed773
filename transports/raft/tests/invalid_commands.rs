//! Commands that apply cannot carry out (an empty key, a batch inside a batch) are
//! refused where they enter, and one that reaches the log anyway is skipped with an
//! error outcome on every replica, before and after a restart: never fatal.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use datasync::{Key, PutOptions, ReadOptions, StoreError, Writer};
use datasync_raft::types::{Command, Outcome};
use datasync_raft::{RaftConfig, RaftStore};

fn put(k: &str) -> Command {
    Command::Put {
        key: k.into(),
        value: b"v".to_vec(),
        expires_at_ms: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propose_refuses_invalid_commands() {
    let dir = tempfile::tempdir().unwrap();
    let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    let got = s.propose(put("")).await;
    assert!(matches!(got, Err(StoreError::InvalidKey(_))), "{got:?}");
    let got = s
        .propose(Command::Batch(vec![Command::Batch(vec![put("a")])]))
        .await;
    assert!(matches!(got, Err(StoreError::Unsupported(_))), "{got:?}");
    let got = s
        .propose(Command::Expire {
            keys: vec![("bad\u{1}".into(), 1)],
        })
        .await;
    assert!(matches!(got, Err(StoreError::InvalidKey(_))), "{got:?}");
    s.put(&Key::new("ok").unwrap(), "v".into(), PutOptions::new())
        .await
        .unwrap();
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_entry_in_the_log_is_skipped_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let k = |s: &str| Key::new(s).unwrap();
    {
        let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
        let got = s.propose_unchecked(put("")).await.unwrap();
        assert!(matches!(got, Outcome::Invalid(_)), "{got:?}");
        let got = s
            .propose_unchecked(Command::Batch(vec![
                put("a/1"),
                Command::Batch(vec![put("a/x")]),
                put(""),
                put("a/2"),
            ]))
            .await
            .unwrap();
        let Outcome::Batch(outs) = got else {
            panic!("want a batch outcome, got {got:?}")
        };
        assert!(
            matches!(
                outs.as_slice(),
                [
                    Outcome::Written { .. },
                    Outcome::Invalid(_),
                    Outcome::Invalid(_),
                    Outcome::Written { .. }
                ]
            ),
            "{outs:?}"
        );
        // The replica goes on.
        s.put(&k("a/3"), "v3".into(), PutOptions::new())
            .await
            .unwrap();
        s.shutdown().await;
    }
    // The restart replays the same entries (redb may not have stored them yet): it must
    // open, and the valid writes are there.
    let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    for key in ["a/1", "a/2", "a/3"] {
        assert!(
            s.get(&k(key), ReadOptions::new()).await.unwrap().is_some(),
            "{key} lost"
        );
    }
    assert!(
        s.get(&k("a/x"), ReadOptions::new())
            .await
            .unwrap()
            .is_none(),
        "a nested batch was applied"
    );
    s.put(&k("a/4"), "v4".into(), PutOptions::new())
        .await
        .unwrap();
    s.shutdown().await;
}

/// A key written before keys refused bidirectional formatting and C1 characters (here
/// proposed as an old member would have): it applies, the store reopens with it, reads
/// list it and a prefix delete removes it. New writes of such a key are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_stored_under_the_older_rule_stay_readable() {
    use datasync::{DeleteOptions, Prefix};
    let dir = tempfile::tempdir().unwrap();
    let old = "legacy/x\u{202e}y";
    {
        let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
        let got = s.propose_unchecked(put(old)).await.unwrap();
        assert!(matches!(got, Outcome::Written { .. }), "{got:?}");
        assert!(Key::new(old).is_err(), "new writes are refused");
        s.shutdown().await;
    }
    let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    let l = s
        .list(&Prefix::new("legacy/").unwrap(), ReadOptions::new())
        .await
        .unwrap();
    assert_eq!(l.values.len(), 1);
    assert_eq!(l.values[0].key.as_str(), old);
    let d = s
        .delete(&Key::new("legacy/").unwrap(), DeleteOptions::new().prefix())
        .await
        .unwrap();
    assert_eq!(d.count, 1);
    s.shutdown().await;
}
