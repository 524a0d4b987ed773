//! Rule 12: transactions over several keys.

use std::time::Duration;

use super::{answer, apply_next, key, prefix, put, same_as_store, watch};
use crate::testing::{Failure, Harness, Outcome, ensure, next_event};
use crate::{
    DeleteOptions, Event, Expect, KeyChange, Mirror, Op, PutOptions, ReadOptions, Revision,
    StoreError, Txn, Value, Writer,
};

/// The one change a transaction made, applied to `mirror` and answered; fails if the
/// next event is anything else.
async fn one_change(
    w: &mut crate::Watch,
    mirror: &mut Mirror,
    at: Revision,
) -> Result<Vec<KeyChange>, Failure> {
    let ev = apply_next(w, mirror).await?;
    let Event::Change(c) = &ev else {
        return Err(Failure(format!(
            "want the transaction's change, got {ev:?}"
        )));
    };
    ensure!(
        c.revision == at,
        "a change at {}, the transaction returned {at} (a transaction in pieces?)",
        c.revision
    );
    let changes = c.changes.clone();
    answer(ev);
    Ok(changes)
}

fn summary(changes: &[KeyChange]) -> Vec<(String, Op, Option<Value>, Option<Value>)> {
    changes
        .iter()
        .map(|c| {
            (
                c.key.as_str().to_owned(),
                c.op,
                c.value.clone(),
                c.prev.clone(),
            )
        })
        .collect()
}

/// Rule 12: a transaction's conditions choose its branch, whose writes (puts, deletes
/// of keys and prefixes, TTLs) are applied at one revision and seen as one change with
/// previous values; a branch that changes nothing takes no revision and emits nothing;
/// conditions on stale and absent keys fail; an ambiguous transaction is refused and
/// writes nothing. A transport without transactions answers `Unsupported` and writes
/// nothing.
pub async fn rule12_transactions<H: Harness>(h: &H) -> Outcome {
    let s = h.store().await;
    let (a, b, d) = (key("r12/a"), key("r12/b"), key("r12/d"));
    let r1 = put(&s, "r12/a", "1").await?;
    put(&s, "r12/c/x", "x").await?;
    let r3 = put(&s, "r12/c/y", "y").await?;
    let moved = Txn::new()
        .when(&a, Expect::Revision(r1))
        .when(&b, Expect::Absent)
        .put(&b, "2", PutOptions::new())
        .put(&a, "1b", PutOptions::new())
        .delete(&key("r12/c/"), DeleteOptions::new().prefix())
        .or_put(&d, "lost", PutOptions::new());
    if !H::TRANSACTIONS {
        let refused = s.txn(moved).await;
        ensure!(
            matches!(refused, Err(StoreError::Unsupported(_))),
            "a transport without transactions must answer Unsupported, got {refused:?}"
        );
        let now = s.list(&prefix("r12/"), ReadOptions::new()).await?;
        ensure!(
            now.revision == r3 && now.values.len() == 3,
            "the refused transaction wrote: {now:?}"
        );
        return Ok(());
    }
    let mut w = watch(&s, "r12", &["r12/"]).await?;
    let mut mirror = Mirror::new();
    answer(apply_next(&mut w, &mut mirror).await?);

    // Both conditions hold: four keys change at one revision, one event.
    let out = s.txn(moved).await?;
    ensure!(
        out.succeeded && out.revision > r3,
        "a transaction whose conditions hold: {out:?}"
    );
    let changes = summary(&one_change(&mut w, &mut mirror, out.revision).await?);
    let v = |s: &'static str| Some(Value::from(s));
    let none: Option<Value> = None;
    let want = vec![
        ("r12/a".to_owned(), Op::Put, v("1b"), v("1")),
        ("r12/b".to_owned(), Op::Put, v("2"), none.clone()),
        ("r12/c/x".to_owned(), Op::Delete, none.clone(), v("x")),
        ("r12/c/y".to_owned(), Op::Delete, none.clone(), v("y")),
    ];
    ensure!(
        changes == want,
        "the transaction's change:\n got  {changes:?}\n want {want:?}"
    );
    // All or nothing: the revision before it shows none of it.
    let before = s
        .list(
            &prefix("r12/"),
            ReadOptions::new().at(Revision(out.revision.0 - 1)),
        )
        .await?;
    let keys: Vec<_> = before.values.iter().map(|kv| kv.key.as_str()).collect();
    ensure!(
        keys == ["r12/a", "r12/c/x", "r12/c/y"],
        "at the revision before the transaction the store held {keys:?}"
    );

    // Every condition must hold: here two do (one on a deleted key, which is absent)
    // and the last does not (a deleted key is at no revision, not at the one that
    // deleted it); the other branch, at its own revision.
    let stale = Txn::new()
        .when(&a, Expect::Revision(out.revision))
        .when(&key("r12/c/x"), Expect::Absent)
        .when(&key("r12/c/y"), Expect::Revision(out.revision))
        .put(&a, "lost", PutOptions::new())
        .or_put(&d, "3", PutOptions::new())
        .or_delete(&key("r12/b"), DeleteOptions::new().prefix());
    let other = s.txn(stale).await?;
    ensure!(
        !other.succeeded && other.revision > out.revision,
        "a transaction whose last condition fails: {other:?}"
    );
    let changes = summary(&one_change(&mut w, &mut mirror, other.revision).await?);
    let want = vec![
        ("r12/b".to_owned(), Op::Delete, none.clone(), v("2")),
        ("r12/d".to_owned(), Op::Put, v("3"), none.clone()),
    ];
    ensure!(
        changes == want,
        "the other branch's change:\n got  {changes:?}\n want {want:?}"
    );
    // And a stale revision alone fails too.
    let old = s
        .txn(
            Txn::new()
                .when(&a, Expect::Revision(r1))
                .put(&a, "lost", PutOptions::new()),
        )
        .await?;
    ensure!(
        !old.succeeded && old.revision == other.revision,
        "a condition on a stale revision: {old:?}"
    );

    // Branches that change nothing take no revision and emit nothing: a failed
    // condition with no other branch (`Revision(0)` holds for no key, absent or not),
    // and deletes of absent keys.
    let nothing = [
        Txn::new()
            .when(&d, Expect::Absent)
            .put(&d, "lost", PutOptions::new()),
        Txn::new()
            .when(&key("r12/none"), Expect::Revision(Revision::ZERO))
            .put(&d, "lost", PutOptions::new()),
        Txn::new()
            .delete(&key("r12/none"), DeleteOptions::new())
            .delete(&key("r12/c/"), DeleteOptions::new().prefix()),
    ];
    for (i, t) in nothing.into_iter().enumerate() {
        let out = s.txn(t).await?;
        ensure!(
            out.succeeded == (i == 2) && out.revision == other.revision,
            "transaction {i} changes nothing, yet answered {out:?} (store at {})",
            other.revision
        );
    }

    // As many conditions as a transaction may have, the last on revision 0: all are
    // decided (each is one condition to the store, also `Revision(0)`), and it fails.
    let mut most = Txn::new().put(&d, "lost", PutOptions::new());
    for i in 1..crate::MAX_TXN_OPS {
        most = most.when(&key(&format!("r12/m{i}")), Expect::Absent);
    }
    let most = most.when(&key("r12/m0"), Expect::Revision(Revision::ZERO));
    let out = s.txn(most).await?;
    ensure!(
        !out.succeeded && out.revision == other.revision,
        "{} conditions, the last on revision 0: {out:?}",
        crate::MAX_TXN_OPS
    );

    // Refused as given, nothing written.
    let twice = Txn::new()
        .put(&a, "x", PutOptions::new())
        .put(&a, "y", PutOptions::new());
    let refused = s.txn(twice).await;
    ensure!(
        matches!(refused, Err(StoreError::InvalidTxn(_))),
        "a branch that puts a key twice: {refused:?}"
    );

    // A TTL put in a transaction expires as a delete with its previous value, not
    // before its TTL.
    let ttl = PutOptions::new().ttl(Duration::from_secs(1));
    let sent = std::time::Instant::now();
    let leased = s
        .txn(
            Txn::new()
                .when(&d, Expect::Revision(other.revision))
                .put(&key("r12/t"), "t", ttl)
                .put(&d, "4", PutOptions::new()),
        )
        .await?;
    ensure!(
        leased.succeeded && leased.revision > other.revision,
        "a transaction with a TTL put: {leased:?} (the nothing-changing ones took a revision?)"
    );
    let changes = one_change(&mut w, &mut mirror, leased.revision).await?;
    ensure!(
        changes.len() == 2,
        "the TTL transaction's change: {changes:?}"
    );
    let ev = next_event(&mut w).await?;
    mirror.apply(&ev)?;
    let Event::Change(c) = &ev else {
        return Err(Failure(format!("want the expiry, got {ev:?}")));
    };
    ensure!(
        sent.elapsed() >= Duration::from_secs(1),
        "a TTL of 1 s expired after {:?}",
        sent.elapsed()
    );
    let expiry = summary(&c.changes);
    ensure!(
        expiry == [("r12/t".to_owned(), Op::Delete, none, v("t"))],
        "the TTL put's expiry: {expiry:?}"
    );
    answer(ev);
    same_as_store(&s, &mirror, "r12/").await
}
