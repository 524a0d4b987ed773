//! The driver's transitions, without I/O: the pure state machine first, then [`drive`]
//! over a scripted upstream under paused time.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::*;
use crate::transport::{Producer, relay};
use crate::{Event, Key, KeyChange, Op, Registration, Source, Value, Watch, WatchError};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn paused(state: &State) -> Option<(Duration, Phase)> {
    match state.phase() {
        Phase::Pausing { delay, then } => Some((*delay, (**then).clone())),
        _ => None,
    }
}

#[test]
fn changes_move_the_revision_and_losses_owe_a_resync() {
    let s = State::new(Phase::Following, Revision(1), true);
    let (_, s) = s.step(Input::Change(Revision(4)));
    assert_eq!((s.phase(), s.last()), (&Phase::Following, Revision(4)));
    let (_, s) = s.step(Input::Progress(Revision(3)));
    assert_eq!(s.last(), Revision(4), "progress never goes back");
    let (_, s) = s.step(Input::Progress(Revision(9)));
    assert_eq!(s.last(), Revision(9));
    for (input, reason) in [
        (Input::QueueFull, ResyncReason::Overflow),
        (Input::Requested, ResyncReason::Requested),
        (
            Input::Lost(ResyncReason::Compacted),
            ResyncReason::Compacted,
        ),
        (
            Input::Lost(ResyncReason::StoreReset),
            ResyncReason::StoreReset,
        ),
    ] {
        let s = State::new(Phase::Following, Revision(1), true);
        let (effect, s) = s.step(input);
        assert_eq!(effect, Effect::None);
        assert_eq!(s.action(), Action::Resync(reason));
    }
    let s = State::new(Phase::Following, Revision(5), true);
    let (effect, s) = s.step(Input::Stale);
    assert_eq!(effect, Effect::Report);
    assert_eq!(s.action(), Action::Resync(ResyncReason::Reconnect));
}

#[test]
fn a_resync_below_the_last_revision_is_a_store_reset() {
    let s = State::new(
        Phase::Resyncing(ResyncReason::Compacted),
        Revision(7),
        false,
    );
    assert_eq!(
        s.reason_for(ResyncReason::Compacted, Revision(3)),
        ResyncReason::StoreReset
    );
    assert_eq!(
        s.reason_for(ResyncReason::Compacted, Revision(7)),
        ResyncReason::Compacted
    );
    let (_, s) = s.step(Input::Resynced {
        revision: Revision(3),
        open: false,
    });
    assert_eq!(s.last(), Revision(3));
    assert_eq!(s.action(), Action::Resume(Revision(4)));
}

#[test]
fn a_break_resumes_with_growing_pauses_where_the_transport_resumes() {
    let mut s = State::new(Phase::Following, Revision(2), true);
    let mut pauses = Vec::new();
    for _ in 0..8 {
        let (effect, next) = s.step(Input::Broken { retryable: true });
        assert_eq!(effect, Effect::None, "a resumable break is not reported");
        let (delay, then) = paused(&next).expect("a pause");
        assert_eq!(then, Phase::Resuming);
        pauses.push(delay.as_millis());
        let (_, next) = next.step(Input::Paused);
        assert_eq!(next.action(), Action::Resume(Revision(3)));
        s = next;
    }
    assert_eq!(pauses, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
    // An open follower starts the pauses over.
    let (_, s) = s.step(Input::Opened);
    let (_, s) = s.step(Input::Broken { retryable: true });
    assert_eq!(paused(&s).expect("a pause").0, ms(50));
}

#[test]
fn a_break_that_cannot_resume_is_reported_and_resynced() {
    for (resumes, retryable) in [(false, true), (false, false), (true, false)] {
        let s = State::new(Phase::Following, Revision(2), resumes);
        let (effect, s) = s.step(Input::Broken { retryable });
        assert_eq!(
            effect,
            Effect::Report,
            "resumes {resumes}, retryable {retryable}"
        );
        assert_eq!(s.action(), Action::Pause(ms(50)));
        let (_, s) = s.step(Input::Paused);
        assert_eq!(s.action(), Action::Resync(ResyncReason::Reconnect));
    }
}

#[test]
fn failed_resyncs_back_off_and_a_success_starts_over() {
    let mut s = State::new(Phase::Resyncing(ResyncReason::Overflow), Revision(2), false);
    let mut pauses = Vec::new();
    for _ in 0..3 {
        let (_, next) = s.step(Input::ResyncFailed);
        let (delay, then) = paused(&next).expect("a pause");
        assert_eq!(
            then,
            Phase::Resyncing(ResyncReason::Overflow),
            "the reason is kept"
        );
        pauses.push(delay.as_millis());
        s = next.step(Input::Paused).1;
    }
    assert_eq!(pauses, [50, 100, 200]);
    let (_, s) = s.step(Input::Resynced {
        revision: Revision(9),
        open: true,
    });
    assert_eq!((s.action(), s.last()), (Action::Follow, Revision(9)));
    let (_, s) = s.step(Input::Lost(ResyncReason::Reconnect));
    let (_, s) = s.step(Input::ResyncFailed);
    assert_eq!(paused(&s).expect("a pause").0, ms(50));
}

#[test]
fn a_close_ends_every_phase_for_good() {
    let phases = [
        Phase::Following,
        Phase::Resuming,
        Phase::Resyncing(ResyncReason::Requested),
        Phase::Pausing {
            delay: ms(50),
            then: Box::new(Phase::Resuming),
        },
    ];
    for phase in phases {
        let (_, s) = State::new(phase, Revision(1), true).step(Input::Closed);
        assert_eq!(s.action(), Action::Stop);
        for input in [Input::Opened, Input::Requested, Input::Paused, Input::Stale] {
            let (effect, after) = State::new(Phase::Closed, Revision(1), true).step(input);
            assert_eq!((effect, after.action()), (Effect::None, Action::Stop));
        }
    }
}

// --- The driver over a scripted upstream.

type Follower = mpsc::UnboundedReceiver<Result<Next, Lost>>;

/// What the fake was asked, and when.
type Log = Arc<Mutex<Vec<(Instant, String)>>>;

struct Fake<const RESUMES: bool> {
    /// Each snapshot's answer: a revision (and whether a follower comes with it), or an
    /// error.
    snapshots: VecDeque<Result<(u64, bool), StoreError>>,
    /// Followers handed out by snapshots and resumes, in order.
    followers: VecDeque<Follower>,
    /// Each read of added prefixes: read (true), cannot (false), or an error.
    extends: VecDeque<Result<bool, StoreError>>,
    /// The prefixes read (a snapshot lists each, without values).
    set: PrefixSet,
    log: Log,
    released: Arc<Mutex<usize>>,
}

impl<const R: bool> Fake<R> {
    fn note(&self, what: String) {
        self.log.lock().expect("log").push((Instant::now(), what));
    }
}

#[async_trait::async_trait]
impl<const R: bool> Upstream for Fake<R> {
    type Follower = Follower;
    const RESUMES: bool = R;

    async fn snapshot(&mut self) -> Result<Snapshot<Follower>, StoreError> {
        self.note("snapshot".into());
        match self.snapshots.pop_front() {
            Some(Ok((rev, with))) => Ok(Snapshot {
                revision: Revision(rev),
                values: empty_groups(&self.set),
                follower: if with {
                    self.followers.pop_front()
                } else {
                    None
                },
            }),
            Some(Err(e)) => Err(e),
            None => std::future::pending().await,
        }
    }

    fn rescope(&mut self, prefixes: PrefixSet) {
        let all: Vec<_> = prefixes.prefixes().iter().map(|p| p.to_string()).collect();
        self.note(format!("rescope {}", all.join(" ")));
        self.set = prefixes;
    }

    async fn extend(&mut self, added: &PrefixSet, at: Revision) -> Result<Vec<PrefixValues>, Lost> {
        let all: Vec<_> = added.prefixes().iter().map(|p| p.to_string()).collect();
        self.note(format!("extend {} at {}", all.join(" "), at.0));
        match self.extends.pop_front() {
            Some(Ok(true)) => Ok(empty_groups(added)),
            Some(Ok(false)) => Err(Lost::Resync(ResyncReason::PrefixAdded)),
            Some(Err(e)) => Err(Lost::Broken(e)),
            None => std::future::pending().await,
        }
    }

    async fn resume(&mut self, from: Revision) -> Result<Follower, Lost> {
        self.note(format!("resume {}", from.0));
        match self.followers.pop_front() {
            Some(f) => Ok(f),
            None => std::future::pending().await,
        }
    }

    async fn next(&mut self, f: &mut Follower, _last: Revision) -> Result<Next, Lost> {
        match f.recv().await {
            Some(item) => item,
            None => std::future::pending().await,
        }
    }

    async fn release(&mut self, _f: Follower) {
        *self.released.lock().expect("count") += 1;
    }
}

struct Run {
    watch: Watch,
    reg: Registration,
    task: tokio::task::JoinHandle<()>,
    log: Log,
    released: Arc<Mutex<usize>>,
}

/// Starts a driver after an initial resync at r1, following `follower`.
fn run<const R: bool>(
    snapshots: Vec<Result<(u64, bool), StoreError>>,
    followers: Vec<Follower>,
    capacity: usize,
) -> Run {
    run_with::<R>(snapshots, followers, capacity, Vec::new())
}

/// [`run`], with the answers to reads of added prefixes.
fn run_with<const R: bool>(
    snapshots: Vec<Result<(u64, bool), StoreError>>,
    mut followers: Vec<Follower>,
    capacity: usize,
    extends: Vec<Result<bool, StoreError>>,
) -> Run {
    let producer = Producer::new("t", &[crate::Prefix::new("k").expect("valid")]);
    let reg = producer.registration();
    let (relay, watch) = relay::channel(&producer, Source::from(""), capacity);
    relay
        .try_send(relay::Item::Resync(
            Revision(1),
            ResyncReason::Initial,
            Vec::new(),
        ))
        .expect("room");
    let first = followers.remove(0);
    let log = Log::default();
    let released = Arc::new(Mutex::new(0));
    let up = Fake::<R> {
        snapshots: snapshots.into(),
        followers: followers.into(),
        extends: extends.into(),
        set: PrefixSet::new([crate::Prefix::new("k").expect("valid")]),
        log: log.clone(),
        released: released.clone(),
    };
    let start = Start {
        revision: Revision(1),
        follower: Some(first),
        owed: None,
    };
    let task = tokio::spawn(drive(up, relay, start));
    Run {
        watch,
        reg,
        task,
        log,
        released,
    }
}

fn empty_groups(set: &PrefixSet) -> Vec<PrefixValues> {
    set.prefixes()
        .iter()
        .map(|p| PrefixValues {
            prefix: p.clone(),
            values: Vec::new(),
        })
        .collect()
}

fn follower() -> (mpsc::UnboundedSender<Result<Next, Lost>>, Follower) {
    mpsc::unbounded_channel()
}

fn change(rev: u64) -> Result<Next, Lost> {
    change_of(rev, "k")
}

fn change_of(rev: u64, key: &str) -> Result<Next, Lost> {
    let key = Key::new(key).expect("valid");
    Ok(Next::Change(
        Revision(rev),
        vec![KeyChange {
            key,
            op: Op::Put,
            value: Some(Value::from("v")),
            prev: None,
        }],
    ))
}

/// The next event or error, as (kind, revision or reason).
async fn next(w: &mut Watch) -> String {
    let item = tokio::time::timeout(Duration::from_secs(60), w.next())
        .await
        .expect("an item within 60 s")
        .expect("the stream goes on");
    match item {
        Ok(Event::Resync(r)) => {
            let s = format!("resync {} {:?}", r.revision.0, r.reason);
            r.done.ok();
            s
        }
        Ok(Event::Change(c)) => {
            let s = format!("change {}", c.revision.0);
            c.done.ok();
            s
        }
        Err(WatchError::Interrupted(_)) => "interrupted".into(),
        Err(e) => format!("error {e}"),
    }
}

#[tokio::test(start_paused = true)]
async fn compaction_resyncs_with_its_reason_and_follows_the_new_follower() {
    let (tx1, f1) = follower();
    let (tx2, f2) = follower();
    let mut r = run::<false>(vec![Ok((5, true))], vec![f1, f2], 8);
    assert_eq!(next(&mut r.watch).await, "resync 1 Initial");
    tx1.send(change(2)).expect("open");
    tx1.send(Err(Lost::Resync(ResyncReason::Compacted)))
        .expect("open");
    assert_eq!(next(&mut r.watch).await, "change 2");
    assert_eq!(next(&mut r.watch).await, "resync 5 Compacted");
    tx2.send(change(6)).expect("open");
    assert_eq!(next(&mut r.watch).await, "change 6");
    assert_eq!(*r.released.lock().expect("count"), 1, "the old follower");
}

#[tokio::test(start_paused = true)]
async fn a_store_that_went_back_is_a_store_reset_and_a_stale_change_is_an_error() {
    let (tx1, f1) = follower();
    let (tx2, f2) = follower();
    let mut r = run::<false>(vec![Ok((3, true)), Ok((4, true))], vec![f1, f2], 8);
    assert_eq!(next(&mut r.watch).await, "resync 1 Initial");
    tx1.send(change(7)).expect("open");
    tx1.send(Err(Lost::Resync(ResyncReason::Reconnect)))
        .expect("open");
    assert_eq!(next(&mut r.watch).await, "change 7");
    assert_eq!(next(&mut r.watch).await, "resync 3 StoreReset");
    tx2.send(change(3)).expect("open");
    assert_eq!(next(&mut r.watch).await, "interrupted");
    assert_eq!(next(&mut r.watch).await, "resync 4 Reconnect");
}

#[tokio::test(start_paused = true)]
async fn a_failing_resync_backs_off_and_reports_each_failure() {
    let (tx1, f1) = follower();
    let (_tx2, f2) = follower();
    let down = || Err(StoreError::Unavailable("down".into()));
    let mut r = run::<false>(vec![down(), down(), down(), Ok((9, true))], vec![f1, f2], 8);
    assert_eq!(next(&mut r.watch).await, "resync 1 Initial");
    tx1.send(Err(Lost::Broken(StoreError::Unavailable("gone".into()))))
        .expect("open");
    // The break itself (a pause follows it), then three failed reads, then the resync.
    for _ in 0..4 {
        assert_eq!(next(&mut r.watch).await, "interrupted");
    }
    assert_eq!(next(&mut r.watch).await, "resync 9 Reconnect");
    let log = r.log.lock().expect("log").clone();
    let times: Vec<Instant> = log.iter().map(|(t, _)| *t).collect();
    let gaps: Vec<u128> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    // Paused time fires a timer on the millisecond after its deadline at the latest.
    let expected = [100, 200, 400];
    assert_eq!(gaps.len(), 3, "{log:?}");
    for (gap, want) in gaps.iter().zip(expected) {
        assert!(
            (want..=want + 2).contains(gap),
            "pauses {gaps:?}, want {expected:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_resuming_transport_reopens_from_the_next_revision_without_a_resync() {
    let (tx1, f1) = follower();
    let (tx2, f2) = follower();
    let (_tx3, f3) = follower();
    let mut r = run::<true>(vec![], vec![f1, f2, f3], 8);
    assert_eq!(next(&mut r.watch).await, "resync 1 Initial");
    tx1.send(change(2)).expect("open");
    tx1.send(Err(Lost::Broken(StoreError::Unavailable("gone".into()))))
        .expect("open");
    assert_eq!(next(&mut r.watch).await, "change 2");
    tx2.send(change(3)).expect("open");
    tx2.send(Err(Lost::Broken(StoreError::Timeout(ms(1)))))
        .expect("open");
    assert_eq!(next(&mut r.watch).await, "change 3");
    tokio::time::sleep(ms(500)).await;
    let log: Vec<String> = r
        .log
        .lock()
        .expect("log")
        .iter()
        .map(|(_, s)| s.clone())
        .collect();
    assert_eq!(log, ["resume 3", "resume 4"], "no resync, no snapshot");
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_resyncs_once_the_consumer_made_room() {
    let (tx1, f1) = follower();
    let (_tx2, f2) = follower();
    let mut r = run::<false>(vec![Ok((10, true))], vec![f1, f2], 2);
    for rev in 2..=5 {
        tx1.send(change(rev)).expect("open");
    }
    tokio::time::sleep(ms(10)).await;
    // The queue held the initial resync and r2; r3 found it full.
    assert_eq!(next(&mut r.watch).await, "resync 1 Initial");
    assert_eq!(next(&mut r.watch).await, "change 2");
    assert_eq!(next(&mut r.watch).await, "resync 10 Overflow");
}

#[tokio::test(start_paused = true)]
async fn a_requested_resync_comes_after_what_was_queued() {
    let (tx1, f1) = follower();
    let (_tx2, f2) = follower();
    let mut r = run::<false>(vec![Ok((6, true))], vec![f1, f2], 8);
    tx1.send(change(2)).expect("open");
    tokio::time::sleep(ms(10)).await;
    r.reg.request_resync();
    r.reg.request_resync();
    assert_eq!(next(&mut r.watch).await, "resync 1 Initial");
    assert_eq!(next(&mut r.watch).await, "change 2");
    assert_eq!(next(&mut r.watch).await, "resync 6 Requested");
    tokio::time::sleep(ms(100)).await;
    let snapshots = r.log.lock().expect("log").len();
    assert_eq!(snapshots, 1, "two requests, one resync");
}

#[tokio::test(start_paused = true)]
async fn a_close_ends_the_task_in_every_phase_and_releases_the_follower() {
    // Following.
    let (_tx, f) = follower();
    let r = run::<false>(vec![], vec![f], 8);
    tokio::time::sleep(ms(10)).await;
    r.reg.close();
    tokio::time::timeout(ms(100), r.task)
        .await
        .expect("ends")
        .expect("no panic");
    assert_eq!(*r.released.lock().expect("count"), 1);
    // Pausing after failed resyncs.
    let (tx, f) = follower();
    let down = Err(StoreError::Unavailable("down".into()));
    let r = run::<false>(vec![down], vec![f], 8);
    tx.send(Err(Lost::Resync(ResyncReason::Compacted)))
        .expect("open");
    tokio::time::sleep(ms(20)).await;
    r.reg.close();
    tokio::time::timeout(ms(100), r.task)
        .await
        .expect("ends")
        .expect("no panic");
    // Resyncing (the read never answers) and resuming (never opens).
    for resumes in [false, true] {
        let (tx, f) = follower();
        let r = if resumes {
            run::<true>(vec![], vec![f], 8)
        } else {
            run::<false>(vec![], vec![f], 8)
        };
        tx.send(Err(Lost::Broken(StoreError::Unavailable("gone".into()))))
            .expect("open");
        tokio::time::sleep(ms(3000)).await;
        r.reg.close();
        tokio::time::timeout(ms(100), r.task)
            .await
            .expect("ends")
            .expect("no panic");
    }
}

// --- Prefixes added to a live registration.

#[test]
fn added_prefixes_are_read_alone_then_followed_or_resynced() {
    let s = State::new(Phase::Following, Revision(4), true);
    let (_, s) = s.step(Input::Added);
    assert_eq!(s.action(), Action::Extend);
    let (_, kept) =
        State::new(Phase::Extending, Revision(4), true).step(Input::Extended { open: true });
    assert_eq!(
        kept.action(),
        Action::Follow,
        "none owed after all: the follower stays"
    );
    let (_, s) = s.step(Input::Extended { open: false });
    assert_eq!(s.action(), Action::Resume(Revision(5)));
    let (_, s) =
        State::new(Phase::Extending, Revision(4), false).step(Input::Extended { open: false });
    assert_eq!(s.action(), Action::Resync(ResyncReason::PrefixAdded));
    let (_, s) = State::new(Phase::Extending, Revision(4), true)
        .step(Input::Lost(ResyncReason::PrefixAdded));
    assert_eq!(s.action(), Action::Resync(ResyncReason::PrefixAdded));
    // Added while a resync is owed: the resync reads the whole set anyway.
    let (_, s) =
        State::new(Phase::Resyncing(ResyncReason::Overflow), Revision(4), true).step(Input::Added);
    assert_eq!(s.action(), Action::Resync(ResyncReason::Overflow));
}

fn logged(r: &Run) -> Vec<String> {
    r.log
        .lock()
        .expect("log")
        .iter()
        .map(|(_, w)| w.clone())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn an_added_prefix_is_read_at_the_last_revision_and_followed_from_the_next() {
    let (tx1, f1) = follower();
    let (tx2, f2) = follower();
    let mut r = run_with::<true>(Vec::new(), vec![f1, f2], 8, vec![Ok(true)]);
    assert_eq!(next(&mut r.watch).await, "resync 1 Initial");
    tx1.send(change(2)).expect("open");
    assert_eq!(next(&mut r.watch).await, "change 2");
    assert!(r.reg.add_prefix(crate::Prefix::new("b/").expect("valid")));
    // Sent by the old follower after the add: released unread (a request or an add
    // wins the biased select).
    tx1.send(change_of(3, "b/1")).ok();
    assert_eq!(next(&mut r.watch).await, "resync 2 PrefixAdded");
    tx2.send(change_of(3, "b/1")).expect("open");
    assert_eq!(next(&mut r.watch).await, "change 3");
    assert_eq!(logged(&r), ["rescope b/ k", "extend b/ at 2", "resume 3"]);
    assert_eq!(*r.released.lock().expect("count"), 1, "the old follower");
}

#[tokio::test(start_paused = true)]
async fn an_added_prefix_on_a_transport_that_cannot_read_it_alone_is_a_full_resync() {
    let (_tx1, f1) = follower();
    let (tx2, f2) = follower();
    let mut r = run_with::<false>(vec![Ok((7, true))], vec![f1, f2], 8, Vec::new());
    assert_eq!(next(&mut r.watch).await, "resync 1 Initial");
    r.reg.add_prefix(crate::Prefix::new("b/").expect("valid"));
    assert_eq!(next(&mut r.watch).await, "resync 7 PrefixAdded");
    tx2.send(change_of(8, "b/1")).expect("open");
    assert_eq!(next(&mut r.watch).await, "change 8");
    assert_eq!(logged(&r), ["rescope b/ k", "snapshot"]);
}

#[tokio::test(start_paused = true)]
async fn a_failed_or_impossible_read_of_added_prefixes_becomes_a_full_resync() {
    let (_tx1, f1) = follower();
    let (_tx2, f2) = follower();
    let (tx3, f3) = follower();
    let down = Err(StoreError::Unavailable("down".into()));
    let mut r = run_with::<true>(
        vec![Ok((5, true)), Ok((9, true))],
        vec![f1, f2, f3],
        8,
        vec![down, Ok(false)],
    );
    assert_eq!(next(&mut r.watch).await, "resync 1 Initial");
    r.reg.add_prefix(crate::Prefix::new("b/").expect("valid"));
    assert_eq!(next(&mut r.watch).await, "interrupted");
    assert_eq!(next(&mut r.watch).await, "resync 5 PrefixAdded");
    // Compacted (the transport cannot read at `last`): a full resync too.
    r.reg.add_prefix(crate::Prefix::new("c/").expect("valid"));
    assert_eq!(next(&mut r.watch).await, "resync 9 PrefixAdded");
    tx3.send(change_of(10, "c/1")).expect("open");
    assert_eq!(next(&mut r.watch).await, "change 10");
    assert_eq!(
        logged(&r),
        [
            "rescope b/ k",
            "extend b/ at 1",
            "snapshot",
            "rescope b/ c/ k",
            "extend c/ at 5",
            "snapshot"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_removed_prefix_stops_at_once_without_touching_the_transport() {
    let (tx1, f1) = follower();
    let mut r = run::<true>(Vec::new(), vec![f1], 8);
    assert_eq!(next(&mut r.watch).await, "resync 1 Initial");
    r.reg.add_prefix(crate::Prefix::new("b/").expect("valid"));
    assert!(
        r.reg
            .remove_prefix(&crate::Prefix::new("b/").expect("valid")),
        "owed, then not"
    );
    assert!(
        r.reg
            .remove_prefix(&crate::Prefix::new("k").expect("valid"))
    );
    tx1.send(change(2)).expect("open");
    tx1.send(change(3)).expect("open");
    let quiet = tokio::time::timeout(Duration::from_secs(5), r.watch.next()).await;
    assert!(quiet.is_err(), "nothing watched any more: {quiet:?}");
    assert_eq!(logged(&r), Vec::<String>::new());
    r.reg.close();
    r.task.await.expect("the driver ends");
}
