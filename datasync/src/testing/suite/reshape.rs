//! Rule 10: prefixes added to and removed from a live registration.

use super::{answer, apply_next, prefix, put, same_as_store, watch};
use crate::testing::{Failure, Harness, Outcome, ensure};
use crate::{Event, Mirror, ResyncReason, Revision, Watch, Writer};

/// Applies events until `mirror` reaches `rev`, checking each with `check`; returns
/// how many were resyncs.
async fn through(
    w: &mut Watch,
    mirror: &mut Mirror,
    rev: Revision,
    mut check: impl FnMut(&Event) -> Outcome,
) -> Result<usize, Failure> {
    let mut resyncs = 0;
    while mirror.revision("").is_none_or(|r| r < rev) {
        let ev = apply_next(w, mirror).await?;
        check(&ev)?;
        resyncs += usize::from(matches!(ev, Event::Resync(_)));
        answer(ev);
    }
    Ok(resyncs)
}

fn keys(ev: &Event) -> Vec<String> {
    match ev {
        Event::Change(c) => c.changes.iter().map(|c| c.key.to_string()).collect(),
        Event::Resync(r) => r.values().map(|kv| kv.key.to_string()).collect(),
    }
}

/// Checks that the stream resyncs `added` (as `PrefixAdded`, listing it, and only it
/// if `alone`) before any change under it, and never shows a key under `never`.
fn added_in_order(added: &str, never: &str, alone: bool) -> impl FnMut(&Event) -> Outcome {
    let added = added.to_owned();
    let never = never.to_owned();
    let mut seen = false;
    move |ev| {
        ensure!(
            keys(ev).iter().all(|k| !k.starts_with(&never)),
            "the stream carries a key under {never:?}, which is not watched: {ev:?}"
        );
        match ev {
            Event::Resync(r) => {
                ensure!(
                    r.reason == ResyncReason::PrefixAdded && r.is_partial(),
                    "want a PrefixAdded resync, got {:?}",
                    r.reason
                );
                ensure!(
                    r.prefixes.iter().any(|g| g.prefix.as_str() == added),
                    "the resync does not list the added prefix {added:?}: {r:?}"
                );
                ensure!(
                    !alone || r.prefixes.len() == 1,
                    "the transport reads added prefixes alone, but its resync lists {:?}",
                    r.prefixes
                        .iter()
                        .map(|g| g.prefix.as_str())
                        .collect::<Vec<_>>()
                );
                seen = true;
            }
            Event::Change(c) => ensure!(
                seen || c
                    .changes
                    .iter()
                    .all(|kc| !kc.key.as_str().starts_with(&added)),
                "a change under {added:?} came before its resync: {c:?}"
            ),
        }
        Ok(())
    }
}

/// Rule 10: a prefix added to a live registration gets a resync of its own
/// (`PrefixAdded`, in order with the changes, the `Mirror` checking every previous
/// value across it), then its changes; a removed prefix stops at once, keys under it
/// written meanwhile come with its resync when it is added again.
pub async fn rule10_prefixes_added_and_removed_on_a_live_registration<H: Harness>(
    h: &H,
) -> Outcome {
    let s = h.store().await;
    put(&s, "r10/a/1", "a1").await?;
    put(&s, "r10/b/1", "b1").await?;
    put(&s, "r10/c/1", "c1").await?;
    let mut w = watch(&s, "r10", &["r10/a/"]).await?;
    let reg = w.registration().clone();
    let mut m = Mirror::new();
    answer(apply_next(&mut w, &mut m).await?);
    put(&s, "r10/b/2", "b2").await?;
    put(&s, "r10/a/2", "a2").await?;

    ensure!(
        reg.add_prefix(prefix("r10/b/")),
        "add_prefix(new) returned false"
    );
    ensure!(
        !reg.add_prefix(prefix("r10/b/")),
        "add_prefix(twice) returned true"
    );
    // One transaction over both prefixes before the add is served: its b/ part must
    // not reach the consumer before b/'s resync (the Mirror has no b/1 to delete).
    s.delete(&super::key("r10/"), crate::DeleteOptions::new().prefix())
        .await?;
    put(&s, "r10/a/1", "a1").await?;
    put(&s, "r10/b/1", "b1").await?;
    ensure!(
        reg.prefixes().prefixes() == [prefix("r10/a/"), prefix("r10/b/")],
        "prefixes() after the add: {:?}",
        reg.prefixes()
    );
    put(&s, "r10/b/3", "b3").await?;
    put(&s, "r10/a/3", "a3").await?;
    // The resync may come after changes written before the add was served.
    let mut check = added_in_order("r10/b/", "r10/c/", H::READS_ADDED_PREFIXES_ALONE);
    let rb = put(&s, "r10/b/4", "b4").await?;
    let mut resyncs = through(&mut w, &mut m, rb, &mut check).await?;
    let rb = put(&s, "r10/b/5", "b5").await?;
    resyncs += through(&mut w, &mut m, rb, &mut check).await?;
    ensure!(
        resyncs > 0,
        "no resync of the added prefix before its change at {rb}"
    );
    same_as_store(&s, &m, "r10/a/").await?;
    same_as_store(&s, &m, "r10/b/").await?;

    ensure!(
        reg.remove_prefix(&prefix("r10/a/")),
        "remove_prefix(watched) returned false"
    );
    ensure!(
        !reg.remove_prefix(&prefix("r10/a/")),
        "remove_prefix(twice) returned true"
    );
    put(&s, "r10/a/4", "a4").await?;
    s.delete(&super::key("r10/a/1"), Default::default()).await?;
    let rb = put(&s, "r10/b/6", "b6").await?;
    through(&mut w, &mut m, rb, |ev| {
        ensure!(
            keys(ev).iter().all(|k| !k.starts_with("r10/a/")),
            "a removed prefix is still delivered: {ev:?}"
        );
        Ok(())
    })
    .await?;
    same_as_store(&s, &m, "r10/b/").await?;

    ensure!(
        reg.add_prefix(prefix("r10/a/")),
        "adding a removed prefix again returned false"
    );
    let mut check = added_in_order("r10/a/", "r10/c/", H::READS_ADDED_PREFIXES_ALONE);
    let ra = put(&s, "r10/a/5", "a5").await?;
    let mut resyncs = through(&mut w, &mut m, ra, &mut check).await?;
    let ra = put(&s, "r10/a/6", "a6").await?;
    resyncs += through(&mut w, &mut m, ra, &mut check).await?;
    ensure!(
        resyncs > 0,
        "no resync of the prefix added again before its change at {ra}"
    );
    // The mirror held a/1 (deleted while removed) and lacked a/4: the resync fixed both,
    // and a/5's previous value (none) was checked against it.
    same_as_store(&s, &m, "r10/a/").await?;
    same_as_store(&s, &m, "r10/b/").await?;
    Ok::<(), Failure>(())
}
