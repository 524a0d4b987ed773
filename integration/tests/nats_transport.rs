//! `datasync-nats` against a real nats-server: restarts under load, consumers lost,
//! key mapping with plain NATS clients, the empty bucket, history limits, auth,
//! unreachable servers. (The contract itself is checked by `conformance_nats`.)
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::sync::{Arc, Mutex};
use std::time::Duration;

use datasync::{
    Event, KeyError, Mirror, Op, PutOptions, ReadOptions, ResyncReason, Revision, StoreError,
    WatchOptions, Watcher, Writer,
};
use datasync_integration::testkit::{assert_same, key, next, prefix};
use datasync_integration::{NatsServer, free_port};
use datasync_nats::{Auth, NatsConfig, NatsStore};
use futures_util::StreamExt;

async fn server() -> NatsServer {
    NatsServer::start().await.unwrap_or_else(|e| panic!("{e}"))
}

async fn connect(url: &str) -> NatsStore {
    NatsStore::connect(NatsConfig::new([url]).with_request_timeout(Duration::from_secs(1)))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_under_write_load_resyncs_and_loses_nothing() {
    let mut nats = server().await;
    let store = connect(&nats.url()).await;
    let mut w = store
        .watch("load", &[prefix("load/")], WatchOptions::default())
        .await
        .unwrap();
    let mut mirror = Mirror::new();
    let ev = next(&mut w).await;
    mirror.apply(&ev).unwrap();
    ev.into_done().ok();

    // A writer that keeps writing, retrying what fails while the server is down.
    let acked = Arc::new(Mutex::new(Vec::<Revision>::new()));
    let writer = {
        let (store, acked) = (store.clone(), acked.clone());
        tokio::spawn(async move {
            for i in 0..600u32 {
                let k = key(&format!("load/{}", i % 50));
                loop {
                    match store
                        .put(&k, format!("{i}").into(), PutOptions::new())
                        .await
                    {
                        Ok(r) => {
                            acked.lock().unwrap().push(r);
                            break;
                        }
                        // The client may also hold a write across a short outage and
                        // complete it once the server is back: both are fine.
                        Err(e) => {
                            assert!(e.is_retryable(), "a write failed for good: {e:?}");
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    // Consume while the server dies and comes back.
    let consume = {
        let acked = acked.clone();
        async move {
            let acked = &acked;
            let mut changes = Vec::new();
            let mut resyncs = Vec::new();
            loop {
                let done = acked.lock().unwrap().len() == 600;
                let last = acked.lock().unwrap().last().copied();
                if done && mirror.revision("") >= last {
                    return (mirror, changes, resyncs);
                }
                let ev = next(&mut w).await;
                mirror.apply(&ev).unwrap();
                match &ev {
                    Event::Change(c) => changes.push(c.revision),
                    Event::Resync(r) => resyncs.push((r.revision, r.reason)),
                    _ => unreachable!("datasync has two kinds of event"),
                }
                ev.into_done().ok();
            }
        }
    };
    let consumer = tokio::spawn(consume);
    tokio::time::sleep(Duration::from_millis(300)).await;
    nats.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    nats.start_again().await.unwrap();
    writer.await.unwrap();
    let (mirror, changes, resyncs) = consumer.await.unwrap();

    assert!(
        resyncs.iter().any(|(_, r)| *r == ResyncReason::Reconnect),
        "the outage must end in a Reconnect resync, got {resyncs:?}"
    );
    // Every acknowledged write was delivered as a change or is covered by a later resync.
    for r in acked.lock().unwrap().iter() {
        assert!(
            changes.contains(r) || resyncs.iter().any(|(rr, _)| rr >= r),
            "write at {r} neither delivered nor covered by a resync"
        );
    }
    assert_same(&store, &mirror, "load/").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_deleted_on_the_server_becomes_a_resync() {
    let nats = server().await;
    let store = connect(&nats.url()).await;
    store
        .put(&key("c/a"), "1".into(), PutOptions::new())
        .await
        .unwrap();
    let mut w = store
        .watch("c", &[prefix("c/")], WatchOptions::default())
        .await
        .unwrap();
    let mut mirror = Mirror::new();
    let ev = next(&mut w).await;
    mirror.apply(&ev).unwrap();
    ev.into_done().ok();
    // An operator removes every consumer of the bucket.
    let js = async_nats::jetstream::new(store.client().clone());
    let stream = js.get_stream("KV_datasync").await.unwrap();
    let names: Vec<String> = stream.consumer_names().map(|n| n.unwrap()).collect().await;
    assert_eq!(names.len(), 1, "one watch, one consumer");
    stream.delete_consumer(&names[0]).await.unwrap();
    let r = store
        .put(&key("c/b"), "2".into(), PutOptions::new())
        .await
        .unwrap();
    // The watch notices (the server ends the consumer, or its heartbeats stop) and resyncs.
    loop {
        let ev = next(&mut w).await;
        mirror.apply(&ev).unwrap();
        let resynced = matches!(&ev, Event::Resync(rs) if rs.reason == ResyncReason::Reconnect);
        ev.into_done().ok();
        if resynced {
            break;
        }
    }
    assert!(mirror.revision("") >= Some(r));
    assert_same(&store, &mirror, "c/").await;
    // And it goes on from there.
    let r = store
        .put(&key("c/c"), "3".into(), PutOptions::new())
        .await
        .unwrap();
    let ev = next(&mut w).await;
    assert!(matches!(&ev, Event::Change(c) if c.revision == r), "{ev:?}");
    ev.into_done().ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_bucket_and_empty_prefix_resyncs_end() {
    let nats = server().await;
    let store = connect(&nats.url()).await;
    let mut w = store
        .watch("empty", &[prefix("none/")], WatchOptions::default())
        .await
        .unwrap();
    let ev = next(&mut w).await;
    assert!(
        matches!(&ev, Event::Resync(rs) if rs.is_empty() && rs.revision == Revision(0)),
        "{ev:?}"
    );
    ev.into_done().ok();
    store
        .put(&key("other"), "x".into(), PutOptions::new())
        .await
        .unwrap();
    let mut w2 = store
        .watch("empty2", &[prefix("none/")], WatchOptions::default())
        .await
        .unwrap();
    let ev = next(&mut w2).await;
    assert!(
        matches!(&ev, Event::Resync(rs) if rs.is_empty() && rs.revision == Revision(1)),
        "a resync of an empty prefix is at the bucket's revision: {ev:?}"
    );
    ev.into_done().ok();
    let r = store
        .put(&key("none/a"), "1".into(), PutOptions::new())
        .await
        .unwrap();
    for w in [&mut w, &mut w2] {
        let ev = next(w).await;
        assert!(matches!(&ev, Event::Change(c) if c.revision == r), "{ev:?}");
        ev.into_done().ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_map_to_subjects_that_plain_nats_clients_share() {
    let nats = server().await;
    let store = connect(&nats.url()).await;
    let js = async_nats::jetstream::new(store.client().clone());
    let kv = js.get_key_value("datasync").await.unwrap();
    // A plain NATS client's dotted key reads as a /-separated datasync key.
    kv.put("config.if.eth0", "up".into()).await.unwrap();
    // A key NATS could not hold as is.
    let odd = key("config/if/eth0.100 (vlan)");
    store
        .put(&odd, "vlan".into(), PutOptions::new())
        .await
        .unwrap();
    let raw = kv.get("config.if.eth0=2E100=20=28vlan=29").await.unwrap();
    assert_eq!(raw.as_deref(), Some(&b"vlan"[..]));
    // A foreign key that is no mapping of a datasync key is skipped, not fatal.
    kv.put("config.if.bad=ZZ", "?".into()).await.unwrap();
    let l = store
        .list(&prefix("config/if/"), ReadOptions::new())
        .await
        .unwrap();
    let keys: Vec<_> = l.values.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["config/if/eth0", "config/if/eth0.100 (vlan)"]);
    // A prefix ending mid-segment filters on our side.
    let l = store
        .list(&prefix("config/if/eth0."), ReadOptions::new())
        .await
        .unwrap();
    assert_eq!(l.values.len(), 1);
    let mut w = store
        .watch("if", &[prefix("config/if/e")], WatchOptions::default())
        .await
        .unwrap();
    let ev = next(&mut w).await;
    assert!(matches!(&ev, Event::Resync(rs) if rs.len() == 2), "{ev:?}");
    ev.into_done().ok();
    kv.put("config.if.lo", "up".into()).await.unwrap();
    kv.put("config.if.eth1", "down".into()).await.unwrap();
    let ev = next(&mut w).await;
    let Event::Change(c) = &ev else {
        panic!("{ev:?}")
    };
    assert_eq!(c.changes[0].key.as_str(), "config/if/eth1");
    ev.into_done().ok();
    // A key too long once mapped is refused with a typed error, and nothing is written.
    let long = key(&format!("x/{}", ".".repeat(1100)));
    let err = store.put(&long, "v".into(), PutOptions::new()).await;
    assert!(
        matches!(
            err,
            Err(StoreError::InvalidKey(KeyError::Unrepresentable {
                backend: "nats",
                ..
            }))
        ),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_at_a_revision_the_bucket_no_longer_keeps_are_compacted() {
    let nats = server().await;
    let store = NatsStore::connect(NatsConfig::new([nats.url()]).with_history(2))
        .await
        .unwrap();
    let k = key("h/k");
    let r1 = store.put(&k, "1".into(), PutOptions::new()).await.unwrap();
    let r2 = store.put(&k, "2".into(), PutOptions::new()).await.unwrap();
    let at = |r| store.get(&k, ReadOptions::new().at(r));
    assert_eq!(at(r1).await.unwrap().unwrap().value, "1".into());
    // A key created later was simply absent then (nothing has been removed yet).
    let r3 = store
        .put(&key("h/new"), "n".into(), PutOptions::new())
        .await
        .unwrap();
    let new = key("h/new");
    let new_at = |r| store.get(&new, ReadOptions::new().at(r));
    assert!(new_at(r2).await.unwrap().is_none());
    store.put(&k, "3".into(), PutOptions::new()).await.unwrap();
    assert_eq!(at(r2).await.unwrap().unwrap().value, "2".into());
    let gone = at(r1).await;
    assert!(
        matches!(gone, Err(StoreError::Compacted { requested, .. }) if requested == r1),
        "version 1 of 3 with a history of 2: {gone:?}"
    );
    // Once a sequence up to r2 is removed (version 1), the absence of a key at r2 can
    // no longer be told from a TTL'd version of it that expired: on a bucket with
    // per-message TTLs, the read says so.
    let unknown = new_at(r2).await;
    assert!(
        matches!(unknown, Err(StoreError::Compacted { requested, .. }) if requested == r2),
        "{unknown:?}"
    );
    assert!(new_at(r3).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_is_raised_to_the_marker_ttl_and_expires_as_a_delete() {
    let nats = server().await;
    let store = connect(&nats.url()).await;
    let mut w = store
        .watch("t", &[prefix("t/")], WatchOptions::default())
        .await
        .unwrap();
    next(&mut w).await.into_done().ok();
    let start = tokio::time::Instant::now();
    let r = store
        .put(
            &key("t/k"),
            "v".into(),
            PutOptions::new().ttl(Duration::from_millis(100)),
        )
        .await
        .unwrap();
    next(&mut w).await.into_done().ok();
    let ev = next(&mut w).await;
    let lived = start.elapsed();
    let Event::Change(c) = &ev else {
        panic!("{ev:?}")
    };
    assert!(c.revision > r);
    assert_eq!(c.changes[0].op, Op::Delete);
    assert_eq!(c.changes[0].prev, Some("v".into()));
    ev.into_done().ok();
    let floor = store.config().marker_ttl;
    assert!(
        lived >= floor,
        "a TTL below the marker TTL lives at least the marker TTL: lived {lived:?}, marker {floor:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_checked() {
    let nats = NatsServer::start_with(&["--user", "agent", "--pass", "s3cret"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let config = |auth| NatsConfig::new([nats.url()]).with_auth(auth);
    let store = NatsStore::connect(config(Auth::UserPassword("agent".into(), "s3cret".into())))
        .await
        .unwrap();
    let r = store
        .put(&key("a"), "1".into(), PutOptions::new())
        .await
        .unwrap();
    assert_eq!(
        store
            .get(&key("a"), ReadOptions::new())
            .await
            .unwrap()
            .unwrap()
            .revision,
        r
    );
    for auth in [
        Auth::UserPassword("agent".into(), "wrong".into()),
        Auth::None,
    ] {
        let err = NatsStore::connect(config(auth)).await.unwrap_err();
        assert!(
            matches!(err, StoreError::Unauthenticated(_)) && !err.is_retryable(),
            "refused credentials are final and say so: {err:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_retryable_or_waited_for() {
    let port = free_port().unwrap();
    let url = format!("nats://127.0.0.1:{port}");
    let err = NatsStore::connect(NatsConfig::new([url.clone()]))
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    // With a wait, connecting succeeds once a server comes up on that port.
    let waiting = tokio::spawn(NatsStore::connect(
        NatsConfig::new([url]).with_wait_for_server(Duration::from_secs(20)),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "it must wait for the server");
    let _nats = NatsServer::start_on(Some(port), &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let store = waiting.await.unwrap().unwrap();
    store
        .put(&key("up"), "1".into(), PutOptions::new())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_trusted_ca_works_and_an_untrusted_server_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    datasync_integration::testkit::certificates(dir.path());
    let file = |f: &str| dir.path().join(f);
    let nats = NatsServer::start_tls(&file("server.crt"), &file("server.key"), &file("ca.crt"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let store = NatsStore::connect(NatsConfig::new([nats.url()]).with_tls(Some(file("ca.crt"))))
        .await
        .unwrap();
    let r = store
        .put(&key("tls/k"), "secret".into(), PutOptions::new())
        .await
        .unwrap();
    let mut w = store
        .watch("tls", &[prefix("tls/")], WatchOptions::default())
        .await
        .unwrap();
    let ev = next(&mut w).await;
    assert_eq!(ev.revision(), r);
    ev.into_done().ok();
    // A client that does not trust the test CA must not get through.
    let untrusting = NatsStore::connect(NatsConfig::new([nats.url()]).with_tls(None)).await;
    assert!(
        untrusting.is_err(),
        "connected without trusting the server's CA"
    );
}

/// A bucket made elsewhere (as `nats kv add` makes one: history 1) is read by its own
/// limits: the overwritten version is `Compacted`, never "absent".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_made_elsewhere_is_read_by_its_own_history() {
    use async_nats::jetstream::kv;
    let nats = server().await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_key_value(kv::Config {
        bucket: "made-elsewhere".into(),
        history: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    // This store's own setting says 16; the bucket keeps 1.
    let store = NatsStore::connect(
        NatsConfig::new([nats.url()])
            .with_bucket("made-elsewhere")
            .with_history(16),
    )
    .await
    .unwrap();
    let k = key("k");
    let r1 = store.put(&k, "1".into(), PutOptions::new()).await.unwrap();
    let r2 = store.put(&k, "2".into(), PutOptions::new()).await.unwrap();
    let got = store.get(&k, ReadOptions::new().at(r1)).await;
    assert!(
        matches!(got, Err(StoreError::Compacted { requested, .. }) if requested == r1),
        "{got:?}"
    );
    let got = store.get(&k, ReadOptions::new().at(r2)).await.unwrap();
    assert_eq!(got.unwrap().value, "2".into());
}

/// A bucket with an age limit loses whole keys: a read from before they went is
/// `Compacted`, never "absent".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_with_an_age_limit_refuses_reads_from_before_what_it_dropped() {
    use async_nats::jetstream::kv;
    let nats = server().await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_key_value(kv::Config {
        bucket: "aged".into(),
        history: 8,
        max_age: Duration::from_secs(1),
        ..Default::default()
    })
    .await
    .unwrap();
    let store = NatsStore::connect(NatsConfig::new([nats.url()]).with_bucket("aged"))
        .await
        .unwrap();
    let r1 = store
        .put(&key("old"), "1".into(), PutOptions::new())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r2 = store
        .put(&key("new"), "2".into(), PutOptions::new())
        .await
        .unwrap();
    let got = store.get(&key("old"), ReadOptions::new().at(r1)).await;
    assert!(
        matches!(got, Err(StoreError::Compacted { requested, .. }) if requested == r1),
        "the key aged out: {got:?}"
    );
    let l = store.list(&prefix(""), ReadOptions::new().at(r2)).await;
    assert_eq!(
        l.unwrap().values.len(),
        1,
        "after the drop, reads are exact"
    );
}

/// `get` at a revision reads the key's own versions: a sibling that shares its name
/// as a prefix (`h/kk` for `h/k`) and overflowed its history does not make it
/// `Compacted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_past_read_of_a_key_ignores_its_siblings_history() {
    let nats = server().await;
    let store = NatsStore::connect(NatsConfig::new([nats.url()]).with_history(2))
        .await
        .unwrap();
    let r0 = store
        .put(&key("h/k"), "v".into(), PutOptions::new())
        .await
        .unwrap();
    for i in 0..3 {
        store
            .put(&key("h/kk"), i.to_string().into(), PutOptions::new())
            .await
            .unwrap();
    }
    let got = store.get(&key("h/k"), ReadOptions::new().at(r0)).await;
    assert_eq!(got.unwrap().unwrap().value, "v".into());
}

/// Keys other clients wrote with escapes our encoding never makes are foreign: they
/// are skipped, and never read as (or mixed with) the key they look like.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_canonical_foreign_keys_are_skipped() {
    let nats = server().await;
    let store = connect(&nats.url()).await;
    let js = async_nats::jetstream::new(store.client().clone());
    let kv = js.get_key_value("datasync").await.unwrap();
    store
        .put(&key("a/b"), "ours".into(), PutOptions::new())
        .await
        .unwrap();
    kv.put("a=2Fb", "theirs".into()).await.unwrap();
    kv.put("=61", "theirs".into()).await.unwrap();
    let l = store.list(&prefix(""), ReadOptions::new()).await.unwrap();
    let got: Vec<_> = l
        .values
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.clone()))
        .collect();
    assert_eq!(got, [("a/b", "ours".into())]);
    let mut w = store
        .watch("all", &[prefix("")], WatchOptions::default())
        .await
        .unwrap();
    let ev = next(&mut w).await;
    assert!(matches!(&ev, Event::Resync(r) if r.len() == 1), "{ev:?}");
    ev.into_done().ok();
}

/// A lost flow-control answer stalls the server's delivery while its heartbeats go
/// on; the consumer answers the stall and the resync completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_flow_control_answer_does_not_stall_a_watch() {
    let nats = server().await;
    let store = connect(&nats.url()).await;
    let value: datasync::Value = vec![b'x'; 512 * 1024].into();
    for i in 0..96 {
        store
            .put(
                &key(&format!("big/{i:03}")),
                value.clone(),
                PutOptions::new(),
            )
            .await
            .unwrap();
    }
    datasync_nats::testing::drop_flow_control_answers(1);
    // The resync's snapshot is read while the watch registers.
    let (_w, ev) = tokio::time::timeout(Duration::from_secs(30), async {
        let mut w = store
            .watch("big", &[prefix("big/")], WatchOptions::default())
            .await
            .unwrap();
        let ev = next(&mut w).await;
        (w, ev)
    })
    .await
    .expect("the resync completes");
    assert!(matches!(&ev, Event::Resync(r) if r.len() == 96), "{ev:?}");
    ev.into_done().ok();

    assert_eq!(
        datasync_nats::testing::flow_control_answers_dropped(),
        1,
        "the server asked for flow control, and one answer was lost"
    );
}

/// A bucket made elsewhere that takes per-message TTLs without expiry markers: an
/// expired key just goes, so a read from before it went is `Compacted`, not "absent".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttls_without_markers_make_older_reads_compacted() {
    use async_nats::jetstream::stream;
    let nats = server().await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(stream::Config {
        name: "KV_nomarkers".into(),
        subjects: vec!["$KV.nomarkers.>".into()],
        max_messages_per_subject: 8,
        allow_rollup: true,
        allow_direct: true,
        allow_message_ttl: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let store = NatsStore::connect(NatsConfig::new([nats.url()]).with_bucket("nomarkers"))
        .await
        .unwrap();
    let r1 = store
        .put(
            &key("lease"),
            "1".into(),
            PutOptions::new().ttl(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    store
        .put(&key("later"), "2".into(), PutOptions::new())
        .await
        .unwrap();
    let got = store.get(&key("lease"), ReadOptions::new().at(r1)).await;
    assert!(
        matches!(got, Err(StoreError::Compacted { requested, .. }) if requested == r1),
        "the key expired without a marker: {got:?}"
    );
}

/// A bucket with 1 s expiry markers, and its revision of `lease` = "1" with a 1 s TTL.
async fn lease_bucket(nats: &NatsServer, bucket: &str) -> (NatsStore, Revision) {
    let mut config = NatsConfig::new([nats.url()]).with_bucket(bucket);
    config.marker_ttl = Duration::from_secs(1);
    let store = NatsStore::connect(config).await.unwrap();
    let ttl = PutOptions::new().ttl(Duration::from_secs(1));
    let r = store.put(&key("lease"), "1".into(), ttl).await.unwrap();
    (store, r)
}

/// A key whose TTL expired and whose expiry marker then expired too leaves no trace in
/// the bucket: a read from before its expiry that rests on its absence is `Compacted`,
/// never "absent" (issue 16); a fresh one is still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_expiry_marker_expired_too_reads_compacted_not_absent() {
    let nats = server().await;
    let (store, r1) = lease_bucket(&nats, "markers").await;
    let r2 = store
        .put(&key("other"), "2".into(), PutOptions::new())
        .await
        .unwrap();
    let fresh = store.get(&key("lease"), ReadOptions::new().at(r1)).await;
    assert!(
        matches!(&fresh, Ok(Some(kv)) if kv.value == "1".into()),
        "a read at a fresh revision is answered: {fresh:?}"
    );
    // Wait until the key's every message, its expiry marker included, has gone.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let stream = async_nats::jetstream::new(client)
        .get_stream("KV_markers")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut seen_marker = false;
    loop {
        match stream
            .get_last_raw_message_by_subject("$KV.markers.lease")
            .await
        {
            Ok(m) => seen_marker |= m.sequence > r1.0,
            Err(_) if seen_marker => break,
            Err(e) => panic!("the key's last message went without a marker first: {e}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the expiry marker never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = store.get(&key("lease"), ReadOptions::new().at(r1)).await;
    assert!(
        matches!(got, Err(StoreError::Compacted { requested, .. }) if requested == r1),
        "the key had a value at {r1}; with no trace of it left, the read must say so: {got:?}"
    );
    let listed = store.list(&prefix(""), ReadOptions::new().at(r2)).await;
    assert!(
        matches!(listed, Err(StoreError::Compacted { .. })),
        "a listing at {r2} would miss the key: {listed:?}"
    );
    // A key with a version kept at or below the revision is still read exactly.
    let other = store.get(&key("other"), ReadOptions::new().at(r2)).await;
    assert!(
        matches!(&other, Ok(Some(kv)) if kv.value == "2".into()),
        "{other:?}"
    );
}

/// A TTL'd version overwritten before its TTL ran out is removed when it does, with no
/// marker (a later version stands): a read from when it was the value is `Compacted`,
/// never "absent".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_version_overwritten_before_it_expired_reads_compacted_not_absent() {
    let nats = server().await;
    let (store, r1) = lease_bucket(&nats, "overwritten").await;
    store
        .put(&key("lease"), "2".into(), PutOptions::new())
        .await
        .unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let stream = async_nats::jetstream::new(client)
        .get_stream("KV_overwritten")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while stream.get_raw_message(r1.0).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the TTL'd version never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = store.get(&key("lease"), ReadOptions::new().at(r1)).await;
    assert!(
        matches!(got, Err(StoreError::Compacted { requested, .. }) if requested == r1),
        "the key was \"1\" at {r1}: {got:?}"
    );
    let now = store.get(&key("lease"), ReadOptions::new()).await.unwrap();
    assert_eq!(now.map(|kv| kv.value), Some("2".into()));
}
