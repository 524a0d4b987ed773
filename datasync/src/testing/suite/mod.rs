//! The suite tests, one function per named test.

use std::collections::BTreeSet;

use super::{Failure, Harness, Outcome, TestFn, ensure, eventually, next_event};
use crate::{
    DeleteOptions, DoneError, Event, Key, Mirror, Op, Prefix, PutOptions, ReadOptions,
    ResyncReason, Revision, StoreError, Value, Watch, WatchOptions, Watcher, Writer,
};

mod reshape;
mod resume;
mod txn;
mod writes;
pub use reshape::*;
pub use resume::*;
pub use txn::*;
pub use writes::*;

crate::conformance_tests!(@list @all;);

pub(super) fn key(s: &str) -> Key {
    Key::new(s).expect("suite keys are valid")
}

pub(super) fn prefix(s: &str) -> Prefix {
    Prefix::new(s).expect("suite prefixes are valid")
}

pub(super) async fn put<S: Writer>(
    s: &S,
    k: &str,
    v: impl Into<Value>,
) -> Result<Revision, Failure> {
    Ok(s.put(&key(k), v.into(), PutOptions::new()).await?)
}

pub(super) async fn watch<S: Watcher>(
    s: &S,
    name: &str,
    prefixes: &[&str],
) -> Result<Watch, Failure> {
    let p: Vec<_> = prefixes.iter().map(|p| prefix(p)).collect();
    Ok(s.watch(name, &p, WatchOptions::default()).await?)
}

/// Applies the next event to `mirror` (checking the contract) and answers it.
pub(super) async fn apply_next(w: &mut Watch, mirror: &mut Mirror) -> Result<Event, Failure> {
    let ev = next_event(w).await?;
    mirror.apply(&ev)?;
    Ok(ev)
}

pub(super) fn answer(ev: Event) {
    ev.into_done().ok();
}

/// Applies and answers events until `mirror` has reached `rev` for the default source.
pub(super) async fn catch_up(w: &mut Watch, mirror: &mut Mirror, rev: Revision) -> Outcome {
    while mirror.revision("").is_none_or(|r| r < rev) {
        answer(apply_next(w, mirror).await?);
    }
    Ok(())
}

/// The mirror holds exactly what the store lists under `p`.
pub async fn same_as_store<S: Writer>(s: &S, mirror: &Mirror, p: &str) -> Outcome {
    let listing = s.list(&prefix(p), ReadOptions::new()).await?;
    let store: Vec<_> = listing
        .values
        .iter()
        .map(|kv| (kv.key.as_str().to_owned(), kv.value.clone()))
        .collect();
    let mine: Vec<_> = mirror
        .values("")
        .filter(|(k, _, _)| k.as_str().starts_with(p))
        .map(|(k, v, _)| (k.as_str().to_owned(), v.clone()))
        .collect();
    ensure!(
        store == mine,
        "consumer state differs from the store under {p:?}:\n store: {store:?}\n consumer: {mine:?}"
    );
    Ok(())
}

/// Rule 1: the first event is a resync of everything under the prefixes at one
/// revision, sorted and grouped per prefix; changes follow in revision order, only for
/// watched keys.
pub async fn rule1_resync_first_then_ordered_changes<H: Harness>(h: &H) -> Outcome {
    let s = h.store().await;
    put(&s, "r1/b/2", "b2").await?;
    put(&s, "r1/a/1", "a1").await?;
    put(&s, "r1/b/1", "b1").await?;
    let r0 = put(&s, "r1/c/1", "c1").await?;
    let mut w = watch(&s, "r1", &["r1/b/", "r1/a/"]).await?;
    let ev = next_event(&mut w).await?;
    let Event::Resync(rs) = &ev else {
        return Err(Failure(format!("first event is not a resync: {ev:?}")));
    };
    ensure!(
        rs.reason == ResyncReason::Initial,
        "first resync has reason {:?}",
        rs.reason
    );
    ensure!(
        rs.revision >= r0,
        "resync at {} is older than the last write {r0}",
        rs.revision
    );
    let groups: Vec<(String, Vec<String>)> = rs
        .prefixes
        .iter()
        .map(|g| {
            let keys = g
                .values
                .iter()
                .map(|kv| kv.key.as_str().to_owned())
                .collect();
            (g.prefix.as_str().to_owned(), keys)
        })
        .collect();
    let want = vec![
        ("r1/a/".to_owned(), vec!["r1/a/1".to_owned()]),
        (
            "r1/b/".to_owned(),
            vec!["r1/b/1".to_owned(), "r1/b/2".to_owned()],
        ),
    ];
    ensure!(groups == want, "resync groups {groups:?}, want {want:?}");
    let mut mirror = Mirror::new();
    mirror.apply(&ev)?;
    answer(ev);
    let mut revs = Vec::new();
    for i in 0..20 {
        let k = if i % 2 == 0 {
            format!("r1/a/{i}")
        } else {
            format!("r1/c/{i}")
        };
        let r = put(&s, &k, format!("v{i}")).await?;
        if i % 2 == 0 {
            revs.push(r);
        }
    }
    for want in revs {
        let ev = apply_next(&mut w, &mut mirror).await?;
        let Event::Change(c) = &ev else {
            return Err(Failure(format!("expected a change at {want}, got {ev:?}")));
        };
        ensure!(c.revision == want, "change at {}, want {want}", c.revision);
        ensure!(
            c.changes
                .iter()
                .all(|kc| kc.key.as_str().starts_with("r1/a/")),
            "unwatched key delivered: {:?}",
            c.changes
        );
        answer(ev);
    }
    same_as_store(&s, &mirror, "r1/a/").await
}

/// Rule 2: the resync at R already contains the write at R: the change stream starts
/// at R+1 (no replay of R, nothing skipped).
pub async fn rule2_handoff_starts_after_the_resync_revision<H: Harness>(h: &H) -> Outcome {
    let s = h.store().await;
    put(&s, "r2/x", "1").await?;
    let r = put(&s, "r2/y", "2").await?;
    let mut w = watch(&s, "r2", &["r2/"]).await?;
    let mut mirror = Mirror::new();
    let ev = apply_next(&mut w, &mut mirror).await?;
    ensure!(
        matches!(&ev, Event::Resync(rs) if rs.revision == r && rs.len() == 2),
        "want a resync at {r} with 2 values, got {ev:?}"
    );
    answer(ev);
    let r2 = put(&s, "r2/z", "3").await?;
    let ev = apply_next(&mut w, &mut mirror).await?;
    ensure!(
        matches!(&ev, Event::Change(c) if c.revision == r2 && c.changes.len() == 1 && c.changes[0].key.as_str() == "r2/z"),
        "want the change at {r2} of r2/z, got {ev:?}"
    );
    answer(ev);
    same_as_store(&s, &mirror, "r2/").await
}

/// Rule 2: a watch started during a stream of writes sees each write exactly once —
/// in the resync or as a change — and ends equal to the store.
pub async fn rule2_handoff_under_concurrent_writes<H: Harness>(h: &H) -> Outcome {
    let s = h.store().await;
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut revs = Vec::new();
            let mut started_tx = Some(started_tx);
            for i in 0..300u32 {
                let k = format!("r2c/{}", i % 40);
                revs.push(
                    s.put(&key(&k), Value::from(format!("{i}")), PutOptions::new())
                        .await?,
                );
                if i == 50 {
                    started_tx.take().map(|tx| tx.send(()));
                }
                tokio::task::yield_now().await;
            }
            Ok::<_, StoreError>(revs)
        })
    };
    // Register while the writer is in full flow.
    let _ = started.await;
    let mut w = watch(&s, "r2c", &["r2c/"]).await?;
    let revs = writer
        .await
        .map_err(|e| Failure(format!("writer panicked: {e}")))??;
    let last = *revs.last().ok_or_else(|| Failure("no writes".into()))?;
    let mut mirror = Mirror::new();
    let mut resync_rev = None;
    let mut seen = Vec::new();
    while mirror.revision("").is_none_or(|r| r < last) {
        let ev = apply_next(&mut w, &mut mirror).await?;
        match &ev {
            Event::Resync(rs) => {
                ensure!(
                    resync_rev.is_none(),
                    "unexpected second resync ({:?})",
                    rs.reason
                );
                resync_rev = Some(rs.revision);
            }
            Event::Change(c) => seen.push(c.revision),
        }
        answer(ev);
    }
    let r = resync_rev.ok_or_else(|| Failure("no resync".into()))?;
    let want: Vec<_> = revs.iter().copied().filter(|x| *x > r).collect();
    ensure!(
        seen == want,
        "after a resync at {r}, changes {seen:?}, want every later write once: {want:?}"
    );
    same_as_store(&s, &mirror, "r2c/").await
}

/// Rule 3: an event's revision is the revision the write returned; revisions strictly
/// increase; a prefix delete reports its count, and its changes carry revisions up to
/// the one it returned.
pub async fn rule3_revisions_match_writes<H: Harness>(h: &H) -> Outcome {
    let s = h.store().await;
    let mut w = watch(&s, "r3", &["r3/"]).await?;
    let mut mirror = Mirror::new();
    answer(apply_next(&mut w, &mut mirror).await?);
    let mut revs = Vec::new();
    for k in ["r3/d/1", "r3/d/2", "r3/d/3", "r3/e"] {
        revs.push(put(&s, k, "v").await?);
    }
    ensure!(
        revs.windows(2).all(|p| p[0] < p[1]),
        "put revisions not increasing: {revs:?}"
    );
    for want in &revs {
        let ev = apply_next(&mut w, &mut mirror).await?;
        ensure!(
            ev.revision() == *want,
            "event at {}, write returned {want}",
            ev.revision()
        );
        answer(ev);
    }
    let del = s
        .delete(&key("r3/d/"), DeleteOptions::new().prefix())
        .await?;
    ensure!(
        del.count == 3,
        "prefix delete removed {} keys, want 3",
        del.count
    );
    let mut deleted = BTreeSet::new();
    while deleted.len() < 3 {
        let ev = apply_next(&mut w, &mut mirror).await?;
        let Event::Change(c) = &ev else {
            return Err(Failure(format!("want the deletes, got {ev:?}")));
        };
        ensure!(
            c.revision <= del.revision,
            "delete event at {} after {}",
            c.revision,
            del.revision
        );
        for kc in &c.changes {
            ensure!(kc.op == Op::Delete, "want deletes, got {kc:?}");
            ensure!(
                kc.prev == Some(Value::from("v")),
                "delete of {} lacks its previous value",
                kc.key
            );
            deleted.insert(kc.key.as_str().to_owned());
        }
        answer(ev);
    }
    ensure!(
        mirror.revision("") == Some(del.revision),
        "the last delete event is at {:?}, the delete returned {}",
        mirror.revision(""),
        del.revision
    );
    same_as_store(&s, &mirror, "r3/").await
}

/// Rule 4: previous values are right for every registration, even two watching the
/// same key and consuming at different times.
pub async fn rule4_prev_values_per_registration<H: Harness>(h: &H) -> Outcome {
    let s = h.store().await;
    let mut a = watch(&s, "r4a", &["r4/"]).await?;
    let mut b = watch(&s, "r4b", &["r4/k"]).await?;
    put(&s, "r4/k", "v1").await?;
    put(&s, "r4/k", "v2").await?;
    s.delete(&key("r4/k"), DeleteOptions::new()).await?;
    put(&s, "r4/k", "v3").await?;
    let want = [
        (Op::Put, Some(Value::from("v1")), None),
        (Op::Put, Some(Value::from("v2")), Some(Value::from("v1"))),
        (Op::Delete, None, Some(Value::from("v2"))),
        (Op::Put, Some(Value::from("v3")), None),
    ];
    // One registration drains everything before the other reads anything.
    for (name, w) in [("r4a", &mut a), ("r4b", &mut b)] {
        let mut mirror = Mirror::new();
        answer(apply_next(w, &mut mirror).await?);
        for (op, value, prev) in &want {
            let ev = apply_next(w, &mut mirror).await?;
            let Event::Change(c) = &ev else {
                return Err(Failure(format!("{name}: want a change, got {ev:?}")));
            };
            let kc = &c.changes[0];
            ensure!(
                c.changes.len() == 1 && kc.op == *op && kc.value == *value && kc.prev == *prev,
                "{name}: got {kc:?}, want op {op:?} value {value:?} prev {prev:?}"
            );
            answer(ev);
        }
    }
    Ok(())
}

/// Rule 4: deleting an absent key emits nothing; an empty value is a real value.
pub async fn rule4_absent_delete_and_empty_value<H: Harness>(h: &H) -> Outcome {
    let s = h.store().await;
    let mut w = watch(&s, "r4e", &["r4e/"]).await?;
    let mut mirror = Mirror::new();
    answer(apply_next(&mut w, &mut mirror).await?);
    let del = s.delete(&key("r4e/absent"), DeleteOptions::new()).await?;
    ensure!(
        del.count == 0,
        "deleting an absent key reports {} deleted",
        del.count
    );
    let pdel = s
        .delete(&key("r4e/none/"), DeleteOptions::new().prefix())
        .await?;
    ensure!(
        pdel.count == 0,
        "deleting an empty prefix reports {} deleted",
        pdel.count
    );
    let r = put(&s, "r4e/empty", Value::default()).await?;
    let ev = apply_next(&mut w, &mut mirror).await?;
    ensure!(
        matches!(&ev, Event::Change(c) if c.revision == r && c.changes[0].op == Op::Put && c.changes[0].value == Some(Value::default())),
        "want the put of an empty value at {r} as the next event, got {ev:?}"
    );
    answer(ev);
    let got = s.get(&key("r4e/empty"), ReadOptions::new()).await?;
    ensure!(
        got.as_ref().is_some_and(|kv| kv.value.is_empty()),
        "get of an empty value returned {got:?}"
    );
    put(&s, "r4e/empty", "x").await?;
    let ev = apply_next(&mut w, &mut mirror).await?;
    ensure!(
        matches!(&ev, Event::Change(c) if c.changes[0].prev == Some(Value::default())),
        "the previous value of an empty value must be Some(empty), got {ev:?}"
    );
    answer(ev);
    Ok(())
}

/// Rule 5: a requested resync arrives at the current revision with the current state;
/// requests made together coalesce into one; changes go on from there.
pub async fn rule5_requested_resyncs_coalesce<H: Harness>(h: &H) -> Outcome {
    let s = h.store().await;
    let mut w = watch(&s, "r5", &["r5/"]).await?;
    let mut mirror = Mirror::new();
    answer(apply_next(&mut w, &mut mirror).await?);
    let r = put(&s, "r5/a", "1").await?;
    catch_up(&mut w, &mut mirror, r).await?;
    for _ in 0..3 {
        w.registration().request_resync();
    }
    let ev = apply_next(&mut w, &mut mirror).await?;
    ensure!(
        matches!(&ev, Event::Resync(rs) if rs.reason == ResyncReason::Requested && rs.revision >= r && rs.len() == 1),
        "want one requested resync at {r} or later holding r5/a, got {ev:?}"
    );
    answer(ev);
    let r2 = put(&s, "r5/a", "2").await?;
    let ev = apply_next(&mut w, &mut mirror).await?;
    ensure!(
        matches!(&ev, Event::Change(c) if c.revision == r2 && c.changes[0].prev == Some(Value::from("1"))),
        "want the change at {r2} with prev \"1\" (requests must coalesce), got {ev:?}"
    );
    answer(ev);
    Ok(())
}

/// Rule 5: closing (or dropping) a registration ends its stream and releases its
/// watch in the store.
pub async fn rule5_close_releases_the_watch<H: Harness>(h: &H) -> Outcome {
    let s = h.store().await;
    let mut a = watch(&s, "r5c-a", &["r5c/"]).await?;
    let b = watch(&s, "r5c-b", &["r5c/"]).await?;
    let mut c = watch(&s, "r5c-c", &["r5c/"]).await?;
    answer(next_event(&mut c).await?);
    let n = h.active_watches(&s).await;
    ensure!(n == 3, "store serves {n} watches, want 3");
    a.registration().close();
    let end = tokio::time::timeout(super::WAIT, futures_util::StreamExt::next(&mut a)).await;
    ensure!(
        matches!(end, Ok(None)),
        "a closed registration's stream must end, got {end:?}"
    );
    drop(b);
    eventually("closed and dropped watches are released", || async {
        h.active_watches(&s).await == 1
    })
    .await?;
    let r = put(&s, "r5c/k", "v").await?;
    let ev = next_event(&mut c).await?;
    ensure!(ev.revision() == r, "the open watch must go on, got {ev:?}");
    answer(ev);
    Ok(())
}

/// Rule 6: answers are recorded; a dropped `Done` is reported as an error, never as
/// success; a late answer is harmless.
pub async fn rule6_done_answers_and_drops_are_reported<H: Harness>(h: &H) -> Outcome {
    let s = h.store().await;
    let mut w = watch(&s, "r6", &["r6/"]).await?;
    let reg = w.registration().clone();
    drop(next_event(&mut w).await?.into_done());
    eventually("the dropped resync Done is reported", || async {
        let a = reg.acks();
        a.dropped == 1 && matches!(a.last_error, Some((_, DoneError::Dropped)))
    })
    .await?;
    let ok = reg.acks().answered_ok;
    ensure!(ok == 0, "a dropped Done counted as {ok} successful answers");
    put(&s, "r6/a", "1").await?;
    next_event(&mut w).await?.into_done().fail("cannot apply");
    eventually("the failed change is reported", || async {
        let a = reg.acks();
        a.failed == 1 && matches!(&a.last_error, Some((_, DoneError::Failed(e))) if e.to_string() == "cannot apply")
    })
    .await?;
    let r = put(&s, "r6/b", "2").await?;
    next_event(&mut w).await?.into_done().ok();
    eventually("the answered change is acknowledged", || async {
        let a = reg.acks();
        a.answered_ok == 1 && a.acknowledged == r
    })
    .await?;
    put(&s, "r6/c", "3").await?;
    let late = next_event(&mut w).await?.into_done();
    drop(w);
    late.ok();
    Ok(())
}

/// Rule 7: a consumer that does not read never delays writes or another consumer; when
/// it reads again it gets a resync (never a stream with holes) and ends equal to the
/// store.
pub async fn rule7_slow_consumer_is_isolated_and_resynced<H: Harness>(h: &H) -> Outcome {
    let s = h.store().await;
    let p = [prefix("r7/")];
    let mut slow = s
        .watch("r7-slow", &p, WatchOptions::default().queue_capacity(4))
        .await?;
    let mut fast = s.watch("r7-fast", &p, WatchOptions::default()).await?;
    let mut fast_mirror = Mirror::new();
    answer(apply_next(&mut fast, &mut fast_mirror).await?);
    let mut revs = Vec::new();
    for i in 0..200 {
        let k = format!("r7/{}", i % 50);
        let r = tokio::time::timeout(super::WAIT, put(&s, &k, format!("{i}")))
            .await
            .map_err(|_| Failure("a write waited for a slow consumer".into()))??;
        revs.push(r);
    }
    let last = *revs.last().ok_or_else(|| Failure("no writes".into()))?;
    for want in &revs {
        let ev = apply_next(&mut fast, &mut fast_mirror).await?;
        ensure!(
            ev.revision() == *want,
            "fast consumer got {}, want {want}",
            ev.revision()
        );
        answer(ev);
    }
    let mut mirror = Mirror::new();
    let mut prev: Option<Revision> = None;
    let mut resynced = false;
    while mirror.revision("").is_none_or(|r| r < last) {
        let ev = apply_next(&mut slow, &mut mirror).await?;
        match &ev {
            Event::Resync(rs) => {
                resynced |= rs.reason != ResyncReason::Initial;
                prev = Some(rs.revision);
            }
            Event::Change(c) => {
                if let Some(p) = prev {
                    let skipped: Vec<_> = revs
                        .iter()
                        .filter(|r| **r > p && **r < c.revision)
                        .collect();
                    ensure!(
                        skipped.is_empty(),
                        "hole in the stream: {skipped:?} between {p} and {}",
                        c.revision
                    );
                }
                prev = Some(c.revision);
            }
        }
        answer(ev);
    }
    ensure!(
        resynced,
        "a consumer 200 events behind a queue of 4 must be resynced"
    );
    same_as_store(&s, &mirror, "r7/").await
}
