//! Rule 11: resuming a registration after a revision the consumer holds.

use super::{answer, key, prefix, put, same_as_store, watch};
use crate::testing::{Failure, Harness, Outcome, ensure, next_event};
use crate::{DeleteOptions, Event, Mirror, ResyncReason, Revision, WatchOptions, Watcher, Writer};

/// Rule 11: a registration resumed after revision R (`WatchOptions::resume`) begins,
/// on a transport that resumes, with the changes after R under its prefixes (previous
/// values as the consumer's state at R has them, none outside the prefixes) and no
/// resync, then follows live; a store behind R gets a `StoreReset` resync. A
/// transport that does not resume begins with an `Initial` resync.
pub async fn rule11_resume_after_a_revision<H: Harness>(h: &H) -> Outcome {
    let s = h.store().await;
    put(&s, "r11/a/1", "a1").await?;
    put(&s, "r11/a/2", "a2").await?;
    let mut m = Mirror::new();
    let mut w = watch(&s, "r11", &["r11/a/"]).await?;
    let ev = next_event(&mut w).await?;
    m.apply(&ev)?;
    answer(ev);
    let r = put(&s, "r11/a/3", "a3").await?;
    while m.revision("").is_none_or(|at| at < r) {
        let ev = next_event(&mut w).await?;
        m.apply(&ev)?;
        answer(ev);
    }
    w.registration().close();
    drop(w);

    // While the consumer is away: an overwrite, a delete, a write elsewhere, a create.
    let overwrite = put(&s, "r11/a/1", "a1'").await?;
    let deleted = s
        .delete(&key("r11/a/2"), DeleteOptions::default())
        .await?
        .revision;
    put(&s, "r11/b/1", "elsewhere").await?;
    let created = put(&s, "r11/a/4", "a4").await?;

    let opts = WatchOptions::default().resume(r);
    let mut w = s.watch("r11", &[prefix("r11/a/")], opts).await?;
    let mut changes = Vec::new();
    while m.revision("").is_none_or(|at| at < created) {
        let ev = next_event(&mut w).await?;
        m.apply(&ev)?;
        match &ev {
            Event::Change(c) => changes.push(c.revision),
            Event::Resync(rs) => {
                ensure!(
                    !H::RESUMES,
                    "a resumed stream resynced ({:?} at {}) instead of replaying from {r}",
                    rs.reason,
                    rs.revision
                );
                ensure!(
                    rs.reason == ResyncReason::Initial && changes.is_empty(),
                    "a transport that does not resume began with {:?} after {changes:?}",
                    rs.reason
                );
            }
        }
        answer(ev);
    }
    if H::RESUMES {
        ensure!(
            changes == [overwrite, deleted, created],
            "resumed after {r}: changes at {changes:?}, want {:?}",
            [overwrite, deleted, created]
        );
    }
    same_as_store(&s, &m, "r11/a/").await?;

    // Live changes follow the replay.
    let live = put(&s, "r11/a/5", "a5").await?;
    while m.revision("").is_none_or(|at| at < live) {
        let ev = next_event(&mut w).await?;
        m.apply(&ev)?;
        ensure!(
            matches!(ev, Event::Change(_)),
            "a resync after the replay: {ev:?}"
        );
        answer(ev);
    }
    same_as_store(&s, &m, "r11/a/").await?;
    w.registration().close();
    drop(w);

    // The seam: resumed while a writer overwrites three keys, the replay hands over
    // to the live changes with no change lost or doubled (the mirror checks each
    // previous value and revision).
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut last = Revision::ZERO;
            for i in 0..60 {
                last = put(&s, &format!("r11/a/s{}", i % 3), format!("{i}")).await?;
            }
            Ok::<_, Failure>(last)
        })
    };
    let opts = WatchOptions::default().resume(live);
    let mut w = s.watch("r11", &[prefix("r11/a/")], opts).await?;
    let last = writer
        .await
        .map_err(|e| Failure(format!("the writer panicked: {e}")))??;
    while m.revision("").is_none_or(|at| at < last) {
        let ev = next_event(&mut w).await?;
        m.apply(&ev)?;
        ensure!(
            !H::RESUMES || matches!(ev, Event::Change(_)),
            "a resync while resuming under writes: {ev:?}"
        );
        answer(ev);
    }
    same_as_store(&s, &m, "r11/a/").await?;

    // A revision this store has not reached: it is not the store the consumer's state
    // came from, or it went back. Also the last revision there is.
    for ahead in [Revision(last.0 + 1_000), Revision(u64::MAX)] {
        let opts = WatchOptions::default().resume(ahead);
        let mut w = s.watch("r11-ahead", &[prefix("r11/a/")], opts).await?;
        let ev = next_event(&mut w).await?;
        let want = if H::RESUMES {
            ResyncReason::StoreReset
        } else {
            ResyncReason::Initial
        };
        match &ev {
            Event::Resync(rs) if rs.reason == want => {
                let mut fresh = Mirror::new();
                fresh.apply(&ev)?;
                same_as_store(&s, &fresh, "r11/a/").await?;
            }
            other => {
                return Err(Failure(format!(
                    "resumed after {ahead}, ahead of the store: {other:?}, want a {want:?} resync"
                )));
            }
        }
        answer(ev);
    }
    Ok(())
}
