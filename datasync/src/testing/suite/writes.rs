//! The suite's tests of writes and reads (rules 8 and 9), including generated keys.

use std::time::Duration;

use super::{answer, apply_next, catch_up, key, prefix, put, watch};
use crate::testing::{Failure, Harness, Outcome, ensure, next_event};
use crate::{
    CasOutcome, DeleteOptions, Event, Expect, Key, Mirror, Op, Prefix, PutOptions, ReadOptions,
    Revision, StoreError, Value, WatchOptions, Watcher, Writer, WriterExt,
};

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
    // An absent key has no revision, not revision 0 (etcd's mod revision of one).
    let zero = s
        .compare_and_swap(
            &key("r8c/none"),
            Expect::Revision(Revision::ZERO),
            "z".into(),
            PutOptions::new(),
        )
        .await?;
    ensure!(
        matches!(zero, CasOutcome::Conflict(None)),
        "swap of an absent key at revision 0 returned {zero:?}"
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
