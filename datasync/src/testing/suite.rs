//! The suite tests, one function per named test.

use std::collections::BTreeSet;
use std::time::Duration;

use super::{Failure, Harness, Outcome, TestFn, ensure, eventually, next_event};
use crate::{
    CasOutcome, DeleteOptions, DoneError, Event, Expect, Key, Mirror, Op, Prefix, PutOptions,
    ReadOptions, ResyncReason, Revision, StoreError, Value, Watch, WatchOptions, Watcher, Writer,
    WriterExt,
};

crate::conformance_tests!(@list @all;);

fn key(s: &str) -> Key {
    Key::new(s).expect("suite keys are valid")
}

fn prefix(s: &str) -> Prefix {
    Prefix::new(s).expect("suite prefixes are valid")
}

async fn put<S: Writer>(s: &S, k: &str, v: impl Into<Value>) -> Result<Revision, Failure> {
    Ok(s.put(&key(k), v.into(), PutOptions::new()).await?)
}

async fn watch<S: Watcher>(s: &S, name: &str, prefixes: &[&str]) -> Result<Watch, Failure> {
    let p: Vec<_> = prefixes.iter().map(|p| prefix(p)).collect();
    Ok(s.watch(name, &p, WatchOptions::default()).await?)
}

/// Applies the next event to `mirror` (checking the contract) and answers it.
async fn apply_next(w: &mut Watch, mirror: &mut Mirror) -> Result<Event, Failure> {
    let ev = next_event(w).await?;
    mirror.apply(&ev)?;
    Ok(ev)
}

fn answer(ev: Event) {
    ev.into_done().ok();
}

/// Applies and answers events until `mirror` has reached `rev` for the default source.
async fn catch_up(w: &mut Watch, mirror: &mut Mirror, rev: Revision) -> Outcome {
    while mirror.revision("").is_none_or(|r| r < rev) {
        answer(apply_next(w, mirror).await?);
    }
    Ok(())
}

/// The mirror holds exactly what the store lists under `p`.
async fn same_as_store<S: Writer>(s: &S, mirror: &Mirror, p: &str) -> Outcome {
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

/// Rule 8: put, get, list (also at a past revision), delete of a key and of a prefix.
pub async fn rule8_put_get_list_delete<H: Harness>(h: &H) -> Outcome {
    let s = h.store().await;
    let r1 = put(&s, "r8/b", "1").await?;
    let r2 = put(&s, "r8/a", "2").await?;
    put(&s, "r8x", "outside").await?;
    let got = s.get(&key("r8/b"), ReadOptions::new()).await?;
    ensure!(
        got.as_ref()
            .is_some_and(|kv| kv.value == Value::from("1") && kv.revision == r1),
        "get r8/b returned {got:?}"
    );
    ensure!(
        s.get(&key("r8/none"), ReadOptions::new()).await?.is_none(),
        "get of an absent key"
    );
    let l = s.list(&prefix("r8/"), ReadOptions::new()).await?;
    let keys: Vec<_> = l.values.iter().map(|kv| kv.key.as_str()).collect();
    ensure!(keys == ["r8/a", "r8/b"], "list returned {keys:?}");
    ensure!(
        l.revision >= r2,
        "list at {} older than the last write {r2}",
        l.revision
    );
    let r3 = put(&s, "r8/b", "3").await?;
    let old = s.get(&key("r8/b"), ReadOptions::new().at(r2)).await?;
    ensure!(
        old.as_ref().is_some_and(|kv| kv.value == Value::from("1")),
        "get at {r2} returned {old:?}, want the value before {r3}"
    );
    let old = s.list(&prefix("r8/"), ReadOptions::new().at(r1)).await?;
    ensure!(
        old.values.len() == 1 && old.revision == r1,
        "list at {r1} returned {old:?}"
    );
    let future = s
        .get(&key("r8/b"), ReadOptions::new().at(Revision(r3.0 + 1000)))
        .await;
    ensure!(
        matches!(future, Err(StoreError::FutureRevision { .. })),
        "a read at a future revision must fail with FutureRevision, got {future:?}"
    );
    // Revisions past i64::MAX (a backend with signed revisions must not wrap them).
    for far in [Revision(1 << 63), Revision(u64::MAX)] {
        let got = s.get(&key("r8/b"), ReadOptions::new().at(far)).await;
        ensure!(
            matches!(got, Err(StoreError::FutureRevision { .. })),
            "a read at {far} must fail with FutureRevision, got {got:?}"
        );
        let got = s.list(&prefix("r8/"), ReadOptions::new().at(far)).await;
        ensure!(
            matches!(got, Err(StoreError::FutureRevision { .. })),
            "a listing at {far} must fail with FutureRevision, got {got:?}"
        );
        let got = s
            .compare_and_swap(
                &key("r8/b"),
                Expect::Revision(far),
                "x".into(),
                PutOptions::new(),
            )
            .await?;
        ensure!(
            matches!(&got, CasOutcome::Conflict(Some(kv)) if kv.value == Value::from("3")),
            "a compare-and-swap expecting revision {far} must conflict, got {got:?}"
        );
    }
    let d = s.delete(&key("r8/a"), DeleteOptions::new()).await?;
    ensure!(d.count == 1 && d.revision > r3, "delete returned {d:?}");
    put(&s, "r8/c", "4").await?;
    let d = s.delete(&key("r8/"), DeleteOptions::new().prefix()).await?;
    ensure!(d.count == 2, "prefix delete removed {}, want 2", d.count);
    let left = s.list(&prefix("r8"), ReadOptions::new()).await?;
    let keys: Vec<_> = left.values.iter().map(|kv| kv.key.as_str()).collect();
    ensure!(keys == ["r8x"], "after the prefix delete: {keys:?}");
    Ok(())
}

/// Rule 8: a TTL key expires as a Delete change carrying its previous value; a short TTL
/// is not rounded to zero; a put without TTL removes an earlier TTL.
pub async fn rule8_ttl_expiry_emits_delete_with_prev<H: Harness>(h: &H) -> Outcome {
    let s = h.store().await;
    let mut w = watch(&s, "r8t", &["r8t/"]).await?;
    let mut mirror = Mirror::new();
    answer(apply_next(&mut w, &mut mirror).await?);
    let ttl = |d| PutOptions::new().ttl(d);
    let r = s
        .put(
            &key("r8t/short"),
            "s".into(),
            ttl(Duration::from_millis(300)),
        )
        .await?;
    let got = s.get(&key("r8t/short"), ReadOptions::new()).await?;
    ensure!(
        got.is_some(),
        "a 300 ms TTL key vanished at once (rounded to zero?)"
    );
    s.put(&key("r8t/kept"), "k".into(), ttl(Duration::from_secs(1)))
        .await?;
    let kept = put(&s, "r8t/kept", "forever").await?;
    catch_up(&mut w, &mut mirror, kept).await?;
    let mut expired = false;
    while !expired {
        let ev = apply_next(&mut w, &mut mirror).await?;
        if let Event::Change(c) = &ev {
            for kc in &c.changes {
                ensure!(
                    kc.key.as_str() == "r8t/short" && kc.op == Op::Delete,
                    "unexpected change {kc:?} (a put without TTL must clear the TTL)"
                );
                ensure!(
                    kc.prev == Some(Value::from("s")),
                    "expiry lacks the previous value: {kc:?}"
                );
                ensure!(
                    c.revision > r,
                    "expiry at {} not after the put at {r}",
                    c.revision
                );
                expired = true;
            }
        }
        answer(ev);
    }
    ensure!(
        s.get(&key("r8t/short"), ReadOptions::new())
            .await?
            .is_none(),
        "expired key is still readable"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = s.get(&key("r8t/kept"), ReadOptions::new()).await?;
    ensure!(
        got.is_some_and(|kv| kv.value == Value::from("forever")),
        "a put without TTL must cancel the earlier TTL"
    );
    let zero = s
        .put(&key("r8t/zero"), "z".into(), ttl(Duration::ZERO))
        .await;
    ensure!(
        matches!(zero, Err(StoreError::InvalidTtl(_))),
        "a zero TTL must be refused, got {zero:?}"
    );
    Ok(())
}

/// Rule 8: compare-and-swap on a key's revision, create-if-absent included.
pub async fn rule8_compare_and_swap<H: Harness>(h: &H) -> Outcome {
    let s = h.store().await;
    let k = key("r8c/k");
    let cas = |e, v: &'static str| s.compare_and_swap(&k, e, v.into(), PutOptions::new());
    let CasOutcome::Swapped(r1) = cas(Expect::Absent, "1").await? else {
        return Err(Failure("create-if-absent on an absent key failed".into()));
    };
    let again = cas(Expect::Absent, "x").await?;
    ensure!(
        matches!(&again, CasOutcome::Conflict(Some(kv)) if kv.revision == r1 && kv.value == Value::from("1")),
        "create-if-absent on an existing key returned {again:?}"
    );
    let CasOutcome::Swapped(r2) = cas(Expect::Revision(r1), "2").await? else {
        return Err(Failure("swap at the current revision failed".into()));
    };
    ensure!(r2 > r1, "swap revision {r2} not after {r1}");
    let stale = cas(Expect::Revision(r1), "y").await?;
    ensure!(
        matches!(&stale, CasOutcome::Conflict(Some(kv)) if kv.revision == r2),
        "swap at a stale revision returned {stale:?}"
    );
    let absent = s
        .compare_and_swap(
            &key("r8c/none"),
            Expect::Revision(r1),
            "z".into(),
            PutOptions::new(),
        )
        .await?;
    ensure!(
        matches!(absent, CasOutcome::Conflict(None)),
        "swap of an absent key returned {absent:?}"
    );
    let v = s.get(&k, ReadOptions::new()).await?;
    ensure!(
        v.is_some_and(|kv| kv.value == Value::from("2")),
        "the conflicting swaps wrote"
    );
    Ok(())
}

/// Rule 8: concurrent increments through compare-and-swap lose nothing.
pub async fn rule8_cas_is_linearizable_read_modify_write<H: Harness>(h: &H) -> Outcome {
    let s = h.store().await;
    let k = key("r8l/counter");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let s = s.clone();
        let k = k.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while mine.len() < 25 {
                let cur = s.get(&k, ReadOptions::new()).await?;
                let (expect, n) = match &cur {
                    None => (Expect::Absent, 0u64),
                    Some(kv) => {
                        let n = std::str::from_utf8(kv.value.as_bytes())
                            .ok()
                            .and_then(|t| t.parse().ok())
                            .unwrap_or(u64::MAX);
                        (Expect::Revision(kv.revision), n)
                    }
                };
                let next = Value::from(format!("{}", n.wrapping_add(1)));
                if let CasOutcome::Swapped(r) = s
                    .compare_and_swap(&k, expect, next, PutOptions::new())
                    .await?
                {
                    mine.push((r, n + 1));
                }
            }
            Ok::<_, StoreError>(mine)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(
            t.await
                .map_err(|e| Failure(format!("task panicked: {e}")))??,
        );
    }
    let final_value = s.get(&k, ReadOptions::new()).await?.map(|kv| kv.value);
    ensure!(
        final_value == Some(Value::from("200")),
        "200 increments left {final_value:?}"
    );
    all.sort();
    let values: Vec<u64> = all.iter().map(|(_, n)| *n).collect();
    ensure!(
        values == (1..=200).collect::<Vec<_>>(),
        "swaps in revision order must count 1..=200, got {values:?}"
    );
    Ok(())
}

/// Rule 8: `update` (read-modify-write on compare-and-swap) creates, leaves alone, and
/// under concurrent writers loses no increment and writes none twice.
pub async fn rule8_update_is_a_read_modify_write<H: Harness>(h: &H) -> Outcome {
    let s = h.store().await;
    let k = key("r8u/counter");
    let count = |v: Option<&Value>| -> u64 {
        v.and_then(|v| std::str::from_utf8(v.as_bytes()).ok()?.parse().ok())
            .unwrap_or(0)
    };
    let first = s
        .update(
            &k,
            |v| Some(Value::from((count(v) + 1).to_string())),
            PutOptions::new(),
        )
        .await?;
    ensure!(
        matches!(first, crate::Updated::Written(_)),
        "an update of an absent key creates it: {first:?}"
    );
    let left = s.update(&k, |_| None, PutOptions::new()).await?;
    ensure!(
        matches!(&left, crate::Updated::Unchanged(Some(kv)) if kv.value == Value::from("1")),
        "an update that returns None writes nothing and reports what it saw: {left:?}"
    );
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (s, k) = (s.clone(), k.clone());
        tasks.push(tokio::spawn(async move {
            let mut revisions = Vec::new();
            for _ in 0..10 {
                let inc = |v: Option<&Value>| Some(Value::from((count(v) + 1).to_string()));
                match s.update(&k, inc, PutOptions::new()).await? {
                    crate::Updated::Written(r) => revisions.push(r),
                    other => return Err(StoreError::Backend(format!("{other:?}").into())),
                }
            }
            Ok::<_, StoreError>(revisions)
        }));
    }
    let mut revisions = Vec::new();
    for t in tasks {
        revisions.extend(
            t.await
                .map_err(|e| Failure(format!("task panicked: {e}")))??,
        );
    }
    let final_value = s.get(&k, ReadOptions::new()).await?.map(|kv| kv.value);
    ensure!(
        final_value == Some(Value::from("41")),
        "1 + 40 concurrent increments left {final_value:?}"
    );
    revisions.sort();
    revisions.dedup();
    ensure!(revisions.len() == 40, "40 writes, each at its own revision");
    Ok(())
}

/// Rule 9: bad input is refused with a typed error and changes nothing; an undecodable
/// value is an error for that value only.
pub async fn rule9_bad_input_gets_typed_errors<H: Harness>(h: &H) -> Outcome {
    let s = h.store().await;
    ensure!(
        Key::new("").is_err() && Key::new("a\0b").is_err(),
        "invalid keys accepted"
    );
    let mut w = watch(&s, "r9", &["r9/"]).await?;
    let mut mirror = Mirror::new();
    answer(apply_next(&mut w, &mut mirror).await?);
    let max = s.limits().max_value_size;
    let big = s
        .put(
            &key("r9/big"),
            Value::from(vec![7u8; max + 1]),
            PutOptions::new(),
        )
        .await;
    ensure!(
        matches!(big, Err(StoreError::ValueTooLarge { size, max: m }) if size == max + 1 && m == max),
        "an oversized value must fail with ValueTooLarge, got {big:?}"
    );
    ensure!(
        s.get(&key("r9/big"), ReadOptions::new()).await?.is_none(),
        "a refused value was stored"
    );
    let r = put(&s, "r9/garbage", "{not json").await?;
    let ev = apply_next(&mut w, &mut mirror).await?;
    let Event::Change(c) = &ev else {
        return Err(Failure(format!("want the garbage put, got {ev:?}")));
    };
    ensure!(
        c.revision == r,
        "want the change at {r}, got {}",
        c.revision
    );
    let decoded = c.changes[0]
        .value
        .as_ref()
        .map(|v| v.json::<std::collections::BTreeMap<String, String>>());
    ensure!(
        matches!(decoded, Some(Err(crate::DecodeError::Json { .. }))),
        "want a JSON decode error for that value, got {decoded:?}"
    );
    answer(ev);
    let r = put(&s, "r9/fine", "{}").await?;
    let ev = apply_next(&mut w, &mut mirror).await?;
    ensure!(
        ev.revision() == r,
        "the stream must go on after a bad value, got {ev:?}"
    );
    answer(ev);
    Ok(())
}

/// How many generated cases [`keys_unicode_prefixes_match_a_model`] runs: 16, or
/// `DATASYNC_PROPTEST_CASES` for longer runs.
fn proptest_cases() -> u32 {
    std::env::var("DATASYNC_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16)
}

/// Key tails and prefixes: short strings over characters that stress byte-ordered
/// ranges (the last ASCII character, two-, three- and four-byte characters next to each
/// other, the ends of the surrogate gap, U+10FFFF) and any other character keys may
/// hold.
fn unicode_cases() -> impl proptest::strategy::Strategy<Value = (Vec<String>, Vec<String>)> {
    use proptest::prelude::*;
    use proptest::sample::Index;
    let ch = prop_oneof![
        Just('a'),
        Just('b'),
        Just('/'),
        Just('.'),
        Just('~'),
        // The first two-byte character keys may hold (C1 controls are refused).
        Just('\u{a0}'),
        Just('é'),
        Just('ê'),
        Just('\u{7ff}'),
        Just('\u{800}'),
        Just('日'),
        Just('本'),
        Just('\u{d7ff}'),
        Just('\u{e000}'),
        Just('\u{ffff}'),
        Just('\u{10000}'),
        Just('\u{10ffff}'),
        any::<char>().prop_filter("characters keys may hold", |c| Key::new(c.to_string())
            .is_ok()),
    ];
    let text = |max| {
        proptest::collection::vec(ch.clone(), 0..max)
            .prop_map(|c| c.into_iter().collect::<String>())
    };
    let keys = proptest::collection::vec(
        text(6).prop_filter("keys are not empty", |k| !k.is_empty()),
        1..10,
    );
    // Prefixes: cuts of the keys (so some are prefixes of others, and some end inside a
    // run of multi-byte characters) and arbitrary strings.
    let cuts = proptest::collection::vec((any::<Index>(), any::<Index>()), 1..4);
    (keys, cuts, proptest::collection::vec(text(3), 0..2)).prop_map(|(keys, cuts, mut other)| {
        let mut prefixes: Vec<String> = cuts
            .iter()
            .map(|(k, cut)| {
                let key = k.get(&keys);
                let n = cut.index(key.chars().count() + 1);
                key.chars().take(n).collect()
            })
            .collect();
        prefixes.append(&mut other);
        (keys, prefixes)
    })
}

/// Rule 8 and rule 1 over generated keys: for keys and prefixes of any Unicode
/// (multi-byte last characters, prefixes that are prefixes of each other), `list` and
/// the initial resync return exactly the keys of a model that start with the prefix,
/// and later writes reach a watch exactly when their key is under one of its prefixes.
/// A transport may refuse a key it cannot represent ([`crate::KeyError::Unrepresentable`]).
pub async fn keys_unicode_prefixes_match_a_model<H: Harness>(h: &H) -> Outcome {
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::{Config, TestRng, TestRunner};
    // Generated up front: proptest's strategies are not `Send`.
    let cases = {
        let config = Config {
            cases: proptest_cases(),
            ..Config::default()
        };
        let mut runner = TestRunner::new_with_rng(config, TestRng::deterministic_rng(config_rng()));
        let strategy = unicode_cases();
        (0..runner.config().cases)
            .map(|case| {
                strategy
                    .new_tree(&mut runner)
                    .map(|t| t.current())
                    .map_err(|e| Failure(format!("generating case {case}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    let s = h.store().await;
    for (case, (tails, prefix_tails)) in cases.into_iter().enumerate() {
        let ns = format!("pu{case}/");
        let mut model = std::collections::BTreeMap::<String, Value>::new();
        for (i, tail) in tails.iter().enumerate() {
            let k = Key::new(format!("{ns}{tail}"))?;
            let v = Value::from(format!("v{i}"));
            match s.put(&k, v.clone(), PutOptions::new()).await {
                Ok(_) => {
                    model.insert(k.as_str().to_owned(), v);
                }
                Err(StoreError::InvalidKey(crate::KeyError::Unrepresentable { .. })) => {}
                Err(e) => return Err(Failure(format!("case {case}: put {k:?}: {e}"))),
            }
        }
        let under =
            |model: &std::collections::BTreeMap<String, Value>, p: &str| -> Vec<(String, Value)> {
                model
                    .iter()
                    .filter(|(k, _)| k.starts_with(p))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            };
        let prefixes: Vec<Prefix> = prefix_tails
            .iter()
            .map(|t| Prefix::new(format!("{ns}{t}")))
            .collect::<Result<_, _>>()?;
        for p in &prefixes {
            let listing = s.list(p, ReadOptions::new()).await?;
            let got: Vec<_> = listing
                .values
                .iter()
                .map(|kv| (kv.key.as_str().to_owned(), kv.value.clone()))
                .collect();
            let want = under(&model, p.as_str());
            ensure!(
                got == want,
                "case {case}: list({p:?}) returned {got:?}, the model has {want:?} (keys {tails:?})"
            );
        }
        let mut w = s
            .watch(&format!("pu{case}"), &prefixes, WatchOptions::default())
            .await?;
        let ev = next_event(&mut w).await?;
        let Event::Resync(rs) = &ev else {
            return Err(Failure(format!(
                "case {case}: first event is not a resync: {ev:?}"
            )));
        };
        for g in &rs.prefixes {
            let got: Vec<_> = g
                .values
                .iter()
                .map(|kv| (kv.key.as_str().to_owned(), kv.value.clone()))
                .collect();
            let want = under(&model, g.prefix.as_str());
            ensure!(
                got == want,
                "case {case}: the resync of {:?} holds {got:?}, the model has {want:?}",
                g.prefix
            );
        }
        let mut mirror = Mirror::new();
        mirror.apply(&ev)?;
        answer(ev);
        // Rewrite every key, then a sentinel under the first prefix, and follow the
        // stream to it: the mirror must hold exactly the watched part of the model.
        let keys: Vec<String> = model.keys().cloned().collect();
        for (i, k) in keys.iter().enumerate() {
            let v = Value::from(format!("w{i}"));
            s.put(&key(k), v.clone(), PutOptions::new()).await?;
            model.insert(k.clone(), v);
        }
        let sentinel = key(&format!("{}~end", prefixes[0]));
        let last = s.put(&sentinel, "end".into(), PutOptions::new()).await?;
        model.insert(sentinel.as_str().to_owned(), Value::from("end"));
        catch_up(&mut w, &mut mirror, last).await?;
        let got: Vec<_> = mirror
            .values("")
            .map(|(k, v, _)| (k.as_str().to_owned(), v.clone()))
            .collect();
        let want: Vec<_> = model
            .iter()
            .filter(|(k, _)| prefixes.iter().any(|p| p.matches(k)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        ensure!(
            got == want,
            "case {case}: after the rewrites the watch of {prefixes:?} holds {got:?}, the model has {want:?}"
        );
        drop(w);
        s.delete(&key(&ns), DeleteOptions::new().prefix()).await?;
    }
    Ok(())
}

/// The seed algorithm of the suite's generated cases (fixed, so a failure repeats).
fn config_rng() -> proptest::test_runner::RngAlgorithm {
    proptest::test_runner::RngAlgorithm::ChaCha
}

/// Rule 8: a TTL above [`crate::MAX_TTL`] (up to `Duration::MAX`) is refused with a
/// typed error, not a panic, an overflow or an immediate expiry; `MAX_TTL` itself is
/// accepted and the key stays.
pub async fn rule8_huge_ttls_are_refused_or_kept<H: Harness>(h: &H) -> Outcome {
    let s = h.store().await;
    let mut w = watch(&s, "r8h", &["r8h/"]).await?;
    let mut mirror = Mirror::new();
    answer(apply_next(&mut w, &mut mirror).await?);
    for ttl in [
        Duration::MAX,
        crate::MAX_TTL + Duration::from_nanos(1),
        Duration::from_secs(u64::MAX / 1000),
    ] {
        let k = key("r8h/refused");
        let got = s.put(&k, "x".into(), PutOptions::new().ttl(ttl)).await;
        ensure!(
            matches!(got, Err(StoreError::InvalidTtl(t)) if t == ttl),
            "a TTL of {ttl:?} must be refused with InvalidTtl, got {got:?}"
        );
        let cas = s
            .compare_and_swap(&k, Expect::Absent, "x".into(), PutOptions::new().ttl(ttl))
            .await;
        ensure!(
            matches!(cas, Err(StoreError::InvalidTtl(_))),
            "a compare-and-swap with a TTL of {ttl:?} must be refused, got {cas:?}"
        );
        ensure!(
            s.get(&k, ReadOptions::new()).await?.is_none(),
            "a refused TTL put was stored"
        );
    }
    let k = key("r8h/longest");
    let r = s
        .put(&k, "kept".into(), PutOptions::new().ttl(crate::MAX_TTL))
        .await?;
    let ttl_1 = key("r8h/day");
    s.put(
        &ttl_1,
        "d".into(),
        PutOptions::new().ttl(Duration::from_secs(86_400)),
    )
    .await?;
    let last = put(&s, "r8h/after", "a").await?;
    catch_up(&mut w, &mut mirror, last).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let end = put(&s, "r8h/end", "e").await?;
    catch_up(&mut w, &mut mirror, end).await?;
    for k in [&k, &ttl_1] {
        ensure!(
            mirror.get("", k.as_str()).is_some(),
            "a key with a long TTL was deleted at once: {k:?} (put at {r})"
        );
        ensure!(
            s.get(k, ReadOptions::new()).await?.is_some(),
            "a key with a long TTL is no longer readable: {k:?}"
        );
    }
    s.delete(&key("r8h/"), DeleteOptions::new().prefix())
        .await?;
    Ok(())
}
