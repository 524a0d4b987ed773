use std::sync::Arc;

use futures_util::StreamExt;

use super::*;
use crate::local::{Local, LocalConfig};
use crate::{
    DeleteOptions, Event, Key, Mirror, Prefix, PutOptions, ReadOptions, ResyncReason, StoreError,
    Value, WatchOptions, Watcher, Writer,
};

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

async fn next(w: &mut crate::Watch) -> Event {
    crate::testing::next_event(w).await.expect("next event")
}

#[tokio::test]
async fn one_source_resync_never_deletes_another_sources_keys() {
    let (a, b) = (Local::new(), Local::new());
    a.put(&key("cfg/x"), "from a".into(), PutOptions::new())
        .await
        .unwrap();
    b.put(&key("cfg/y"), "from b".into(), PutOptions::new())
        .await
        .unwrap();
    let composite = CompositeWatcher::new()
        .with("a", Arc::new(a.clone()))
        .with("b", Arc::new(b.clone()));
    let mut w = composite
        .watch(
            "c",
            &[Prefix::new("cfg/").unwrap()],
            WatchOptions::default().queue_capacity(1),
        )
        .await
        .unwrap();
    let mut mirror = Mirror::new();
    for _ in 0..2 {
        let ev = next(&mut w).await;
        assert!(matches!(&ev, Event::Resync(r) if r.reason == ResyncReason::Initial));
        mirror.apply(&ev).unwrap();
        ev.into_done().ok();
    }
    // Source b overflows its queue of one while nobody reads; its state changes.
    b.delete(&key("cfg/y"), DeleteOptions::new()).await.unwrap();
    for i in 0..5 {
        b.put(&key(&format!("cfg/z{i}")), "z".into(), PutOptions::new())
            .await
            .unwrap();
    }
    let mut resynced = false;
    while mirror.len("b") != 5 {
        let ev = next(&mut w).await;
        assert_eq!(&**ev.source(), "b");
        resynced |= matches!(&ev, Event::Resync(r) if r.reason == ResyncReason::Overflow);
        mirror.apply(&ev).unwrap();
        ev.into_done().ok();
    }
    assert!(resynced, "b must have been resynced");
    assert_eq!(mirror.get("a", "cfg/x"), Some(&Value::from("from a")));
    assert_eq!(mirror.get("b", "cfg/y"), None);
}

#[tokio::test]
async fn aggregated_registration_closes_and_reports_all_parts() {
    let (a, b) = (Local::new(), Local::new());
    let composite = CompositeWatcher::new()
        .with("a", Arc::new(a.clone()))
        .with("b", Arc::new(b.clone()));
    let mut w = composite
        .watch("c", &[Prefix::all()], WatchOptions::default())
        .await
        .unwrap();
    assert_eq!((a.active_watches(), b.active_watches()), (1, 1));
    let first = next(&mut w).await;
    let second = next(&mut w).await;
    first.into_done().ok();
    drop(second.into_done());
    let acks = w.registration().acks();
    assert_eq!((acks.answered_ok, acks.dropped), (1, 1));
    w.registration().request_resync();
    let sources: Vec<_> = [next(&mut w).await, next(&mut w).await]
        .into_iter()
        .map(|ev| {
            assert!(matches!(&ev, Event::Resync(r) if r.reason == ResyncReason::Requested));
            let s = ev.source().to_string();
            ev.into_done().ok();
            s
        })
        .collect();
    assert!(sources.contains(&"a".to_owned()) && sources.contains(&"b".to_owned()));
    w.registration().close();
    assert!(w.next().await.is_none());
    assert_eq!((a.active_watches(), b.active_watches()), (0, 0));
}

#[tokio::test]
async fn nested_composites_qualify_sources() {
    let inner = CompositeWatcher::new().with("x", Arc::new(Local::new()));
    let outer = CompositeWatcher::new().with("outer", Arc::new(inner));
    let mut w = outer
        .watch("n", &[Prefix::all()], WatchOptions::default())
        .await
        .unwrap();
    let ev = next(&mut w).await;
    assert_eq!(&**ev.source(), "outer/x");
    ev.into_done().ok();
}

#[tokio::test]
async fn writer_fans_out_and_reports_each_part() {
    let big = Local::new();
    let small = Local::with_config(LocalConfig::default().max_value_size(4));
    let w = CompositeWriter::new()
        .with("big", Arc::new(big.clone()))
        .with("small", Arc::new(small.clone()));
    assert_eq!(w.limits().max_value_size, 4);
    w.put(&key("k"), "abc".into(), PutOptions::new())
        .await
        .unwrap();
    for part in [&big, &small] {
        let got = part.get(&key("k"), ReadOptions::new()).await.unwrap();
        assert_eq!(got.unwrap().value, Value::from("abc"));
    }
    let err = w
        .put(&key("k"), "too long".into(), PutOptions::new())
        .await
        .unwrap_err();
    let StoreError::Composite(c) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(c.failed(), 1);
    assert!(c.results[0].1.is_ok());
    assert!(
        matches!(c.results[1], (ref n, Err(StoreError::ValueTooLarge { .. })) if &**n == "small")
    );
    assert!(!err.is_retryable());
    let d = w.delete(&key("k"), DeleteOptions::new()).await.unwrap();
    assert_eq!(d.count, 1);
    assert!(
        small
            .get(&key("k"), ReadOptions::new())
            .await
            .unwrap()
            .is_none()
    );
    let cas = w
        .compare_and_swap(
            &key("k"),
            crate::Expect::Absent,
            "v".into(),
            PutOptions::new(),
        )
        .await;
    assert!(matches!(cas, Err(StoreError::Unsupported(_))));
    let empty = CompositeWriter::new();
    assert!(
        empty
            .put(&key("k"), "v".into(), PutOptions::new())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn parts_with_one_name_are_refused() {
    let (a, b) = (Local::new(), Local::new());
    let twice = CompositeWatcher::new()
        .with("x", Arc::new(a.clone()))
        .with("x", Arc::new(b.clone()));
    let got = twice
        .watch("w", &[Prefix::all()], WatchOptions::default())
        .await;
    assert!(matches!(got, Err(StoreError::Unsupported(_))), "{got:?}");
    // `a/b` beside a nested `a` with a part `b`: the same source name.
    let nested = CompositeWatcher::new().with("b", Arc::new(b));
    let clash = CompositeWatcher::new()
        .with("a/b", Arc::new(a))
        .with("a", Arc::new(nested));
    let got = clash
        .watch("w", &[Prefix::all()], WatchOptions::default())
        .await;
    assert!(matches!(got, Err(StoreError::Unsupported(_))), "{got:?}");
}

#[tokio::test]
async fn added_and_removed_prefixes_reach_every_part() {
    let (a, b) = (Local::new(), Local::new());
    for (s, k) in [(&a, "x/a"), (&b, "x/b"), (&a, "y/a"), (&b, "y/b")] {
        s.put(&key(k), "v".into(), PutOptions::new()).await.unwrap();
    }
    let composite = CompositeWatcher::new()
        .with("a", Arc::new(a.clone()))
        .with("b", Arc::new(b.clone()));
    let x = Prefix::new("x/").unwrap();
    let y = Prefix::new("y/").unwrap();
    let mut w = composite
        .watch("c", std::slice::from_ref(&x), WatchOptions::default())
        .await
        .unwrap();
    let mut mirror = Mirror::new();
    for _ in 0..2 {
        let ev = next(&mut w).await;
        mirror.apply(&ev).unwrap();
        ev.into_done().ok();
    }
    let reg = w.registration().clone();
    assert!(reg.add_prefix(y.clone()));
    assert_eq!(reg.prefixes().prefixes(), [x.clone(), y.clone()]);
    let mut added = Vec::new();
    while added.len() < 2 {
        let ev = next(&mut w).await;
        if let Event::Resync(r) = &ev {
            assert!(r.is_partial() && r.prefixes.len() == 1 && r.prefixes[0].prefix == y);
            added.push(r.source.to_string());
        }
        mirror.apply(&ev).unwrap();
        ev.into_done().ok();
    }
    added.sort();
    assert_eq!(added, ["a", "b"]);
    assert_eq!((mirror.len("a"), mirror.len("b")), (2, 2));
    assert!(reg.remove_prefix(&x));
    a.put(&key("x/a2"), "v".into(), PutOptions::new())
        .await
        .unwrap();
    b.put(&key("y/b2"), "v".into(), PutOptions::new())
        .await
        .unwrap();
    let ev = next(&mut w).await;
    assert!(
        matches!(&ev, Event::Change(c) if &*c.source == "b" && c.changes[0].key.as_str() == "y/b2"),
        "the removed x/ is not delivered by either part: {ev:?}"
    );
    ev.into_done().ok();
}
