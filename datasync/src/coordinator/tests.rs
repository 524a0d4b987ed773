use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use super::*;
use crate::local::Local;
use crate::{Done, DoneError, Event, Key, Prefix, PutOptions, ResyncReason, WatchOptions, Writer};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Behaviour {
    Ok,
    Fail,
    Drop,
    /// Keep the `Done` and never answer.
    Hold,
    /// Answer once the gate lets it through.
    Gate,
    /// Fail, then behave as `Ok` from the next event on.
    FailOnce,
    /// Work inside `handle` for 3 s, log "finished", then answer ok.
    Slow,
}

struct Rec {
    name: &'static str,
    log: Arc<Mutex<Vec<String>>>,
    behaviour: Arc<Mutex<Behaviour>>,
    held: Mutex<Vec<Done>>,
    gate: Arc<Semaphore>,
}

#[async_trait::async_trait]
impl Plugin for Rec {
    async fn handle(&self, event: Event) {
        let line = match &event {
            Event::Resync(r) => format!(
                "{}:resync@{}:{:?}:{}",
                self.name,
                r.revision.0,
                r.reason,
                r.values()
                    .map(|kv| kv.key.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            Event::Change(c) => format!(
                "{}:change@{}:{}",
                self.name,
                c.revision.0,
                c.changes
                    .iter()
                    .map(|kc| kc.key.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        };
        self.log.lock().unwrap().push(line);
        let behaviour = *self.behaviour.lock().unwrap();
        let done = event.into_done();
        match behaviour {
            Behaviour::Ok => done.ok(),
            Behaviour::Fail => done.fail("plugin refused"),
            Behaviour::Drop => drop(done),
            Behaviour::Hold => self.held.lock().unwrap().push(done),
            Behaviour::Gate => {
                let _permit = self.gate.acquire().await.unwrap();
                done.ok();
            }
            Behaviour::FailOnce => {
                *self.behaviour.lock().unwrap() = Behaviour::Ok;
                done.fail("plugin refused once");
            }
            Behaviour::Slow => {
                tokio::time::sleep(Duration::from_secs(3)).await;
                self.log
                    .lock()
                    .unwrap()
                    .push(format!("{}:finished", self.name));
                done.ok();
            }
        }
    }
}

struct Fixture {
    store: Local,
    log: Arc<Mutex<Vec<String>>>,
    registry: Registry,
    behaviours: Vec<(&'static str, Arc<Mutex<Behaviour>>)>,
    handlers: Vec<Arc<Rec>>,
    gate: Arc<Semaphore>,
}

impl Fixture {
    fn new() -> Self {
        Fixture {
            store: Local::new(),
            log: Default::default(),
            registry: Registry::new(),
            behaviours: vec![],
            handlers: vec![],
            gate: Arc::new(Semaphore::new(0)),
        }
    }

    fn plugin(self, name: &'static str, prefixes: &[&str], deps: &[&str], b: Behaviour) -> Self {
        self.plugin_with(name, prefixes, deps, b, OnChangeFailure::default())
    }

    fn plugin_with(
        mut self,
        name: &'static str,
        prefixes: &[&str],
        deps: &[&str],
        b: Behaviour,
        policy: OnChangeFailure,
    ) -> Self {
        let behaviour = Arc::new(Mutex::new(b));
        let rec = Arc::new(Rec {
            name,
            log: self.log.clone(),
            behaviour: behaviour.clone(),
            held: Mutex::new(vec![]),
            gate: self.gate.clone(),
        });
        let mut spec = PluginSpec::new(
            name,
            prefixes.iter().map(|p| Prefix::new(p).unwrap()).collect(),
            rec.clone(),
        );
        for d in deps {
            spec = spec.after(d);
        }
        spec = spec.on_change_failure(policy);
        self.registry.add(spec);
        self.behaviours.push((name, behaviour));
        self.handlers.push(rec);
        self
    }

    fn set(&self, name: &str, b: Behaviour) {
        let (_, slot) = self.behaviours.iter().find(|(n, _)| *n == name).unwrap();
        *slot.lock().unwrap() = b;
    }

    async fn put(&self, key: &str) -> u64 {
        let k = Key::new(key).unwrap();
        self.store
            .put(&k, "v".into(), PutOptions::new())
            .await
            .unwrap()
            .0
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    async fn start(&mut self, config: CoordinatorConfig) -> CoordinatorHandle {
        let registry = std::mem::take(&mut self.registry);
        Coordinator::start(&self.store, registry, config)
            .await
            .unwrap()
    }
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[tokio::test(start_paused = true)]
async fn startup_resyncs_in_dependency_order_then_changes_flow() {
    let mut f = Fixture::new()
        .plugin("routes", &["rt/"], &["ifaces"], Behaviour::Ok)
        .plugin("ifaces", &["if/"], &[], Behaviour::Ok);
    f.put("if/a").await;
    f.put("rt/x").await;
    f.put("other/z").await;
    let c = f.start(CoordinatorConfig::default()).await;
    c.ready().await;
    assert_eq!(
        f.log(),
        [
            "ifaces:resync@3:Initial:if/a",
            "routes:resync@3:Initial:rt/x"
        ]
    );
    f.put("if/b").await;
    f.put("rt/y").await;
    f.put("other/q").await;
    settle().await;
    assert_eq!(
        f.log()[2..],
        ["ifaces:change@4:if/b", "routes:change@5:rt/y"]
    );
    let status = c.status();
    assert!(status.plugins.iter().all(|p| p.state == PluginState::Ready));
    assert_eq!(status.plugin("routes").unwrap().revision.0, 5);
    assert_eq!(status.plugins[0].name, "ifaces");
    c.shutdown().await;
    assert_eq!(f.store.active_watches(), 0, "shutdown releases the watch");
}

/// Started resuming after R (its plugins hold the state at R, say kept across a
/// restart), the coordinator hands them the changes after R and no resync: they are
/// ready, and the coordinator follows, with no pass.
#[tokio::test(start_paused = true)]
async fn a_resumed_coordinator_hands_only_the_changes_after_its_revision() {
    let mut f = Fixture::new()
        .plugin("routes", &["rt/"], &["ifaces"], Behaviour::Ok)
        .plugin("ifaces", &["if/"], &[], Behaviour::Ok);
    f.put("if/a").await;
    let held = f.put("rt/x").await;
    f.put("if/b").await;
    f.put("other/z").await;
    f.put("rt/y").await;
    let config = CoordinatorConfig::default()
        .watch(crate::WatchOptions::default().resume(crate::Revision(held)));
    let c = f.start(config).await;
    c.ready().await;
    settle().await;
    assert_eq!(f.log(), ["ifaces:change@3:if/b", "routes:change@5:rt/y"]);
    let st = c.status();
    assert_eq!(st.passes, 0);
    assert!(st.following());
    assert_eq!(st.sources[0].resumed, Some(crate::Revision(held)));
    assert!(st.plugins.iter().all(|p| p.state == PluginState::Ready));
    assert_eq!(st.plugin("routes").unwrap().revision.0, 5);
    c.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn next_plugin_waits_for_the_previous_answer() {
    let mut f = Fixture::new()
        .plugin("a", &["a/"], &[], Behaviour::Gate)
        .plugin("b", &["b/"], &[], Behaviour::Ok);
    let c = f.start(CoordinatorConfig::default()).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(f.log(), ["a:resync@0:Initial:"]);
    assert_eq!(c.status().plugins[0].state, PluginState::Resyncing);
    f.gate.add_permits(1);
    c.ready().await;
    assert_eq!(f.log(), ["a:resync@0:Initial:", "b:resync@0:Initial:"]);
}

#[tokio::test(start_paused = true)]
async fn timeout_is_a_failure_and_others_go_on() {
    let mut f = Fixture::new()
        .plugin("slow", &["s/"], &[], Behaviour::Hold)
        .plugin("fine", &["f/"], &[], Behaviour::Ok);
    let cfg = CoordinatorConfig::default()
        .timeouts(Duration::from_secs(1), Duration::from_secs(1))
        .retries(1, Duration::ZERO)
        .retry_failed_after(None);
    let c = f.start(cfg).await;
    c.ready().await;
    let st = c.status();
    assert_eq!(st.plugin("slow").unwrap().state, PluginState::TimedOut);
    assert!(matches!(
        st.plugin("slow").unwrap().last_error,
        Some((_, DoneError::TimedOut(_)))
    ));
    assert_eq!(st.plugin("fine").unwrap().state, PluginState::Ready);
    // A late answer is harmless.
    for d in f.handlers[0].held.lock().unwrap().drain(..) {
        d.ok();
    }
    f.put("s/1").await;
    f.put("f/1").await;
    settle().await;
    assert_eq!(
        f.log()[2..],
        ["fine:change@2:f/1"],
        "no changes to a timed-out plugin"
    );
    assert_eq!(
        c.status().plugin("slow").unwrap().state,
        PluginState::TimedOut
    );
}

#[tokio::test(start_paused = true)]
async fn failures_and_drops_are_reported_with_retries() {
    let mut f = Fixture::new()
        .plugin("failing", &["x/"], &[], Behaviour::Fail)
        .plugin("dropping", &["y/"], &[], Behaviour::Drop)
        .plugin("fine", &["z/"], &[], Behaviour::Ok);
    let cfg = CoordinatorConfig::default()
        .retries(3, Duration::from_millis(10))
        .retry_failed_after(None);
    let c = f.start(cfg).await;
    c.ready().await;
    let st = c.status();
    let failing = st.plugin("failing").unwrap();
    assert_eq!(failing.state, PluginState::Failed);
    assert!(
        matches!(&failing.last_error, Some((_, DoneError::Failed(e))) if e.to_string() == "plugin refused")
    );
    let dropping = st.plugin("dropping").unwrap();
    assert!(matches!(dropping.last_error, Some((_, DoneError::Dropped))));
    assert_eq!(st.plugin("fine").unwrap().state, PluginState::Ready);
    let attempts = f
        .log()
        .iter()
        .filter(|l| l.starts_with("failing:resync"))
        .count();
    assert_eq!(attempts, 3);
}

#[tokio::test(start_paused = true)]
async fn failed_plugin_is_retried_by_a_later_pass() {
    let mut f = Fixture::new().plugin("p", &["p/"], &[], Behaviour::Fail);
    let cfg = CoordinatorConfig::default()
        .retries(1, Duration::ZERO)
        .retry_failed_after(Some(Duration::from_secs(2)));
    let c = f.start(cfg).await;
    c.ready().await;
    assert_eq!(c.status().plugins[0].state, PluginState::Failed);
    f.set("p", Behaviour::Ok);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let st = c.status();
    assert_eq!(st.plugins[0].state, PluginState::Ready);
    assert_eq!(st.passes, 2);
    assert_eq!(f.log()[1], "p:resync@0:Retry:");
}

#[tokio::test(start_paused = true)]
async fn same_revision_goes_to_plugins_in_order() {
    let mut f = Fixture::new()
        .plugin("b", &["k/"], &[], Behaviour::Ok)
        .plugin("a", &["k/"], &["b"], Behaviour::Ok)
        .plugin("c", &["k/"], &[], Behaviour::Ok);
    let c = f.start(CoordinatorConfig::default()).await;
    c.ready().await;
    f.put("k/1").await;
    settle().await;
    assert_eq!(
        f.log()[3..],
        ["b:change@1:k/1", "a:change@1:k/1", "c:change@1:k/1"]
    );
}

#[tokio::test(start_paused = true)]
async fn concurrent_requests_coalesce_into_one_follow_up() {
    let mut f = Fixture::new().plugin("p", &["p/"], &[], Behaviour::Gate);
    let c = f.start(CoordinatorConfig::default()).await;
    settle().await;
    for _ in 0..10 {
        c.request_resync();
        c.trigger().request_resync();
    }
    f.gate.add_permits(100);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(c.status().passes, 2, "{:?}", f.log());
    assert_eq!(f.log(), ["p:resync@0:Initial:", "p:resync@0:Requested:"]);
}

#[tokio::test(start_paused = true)]
async fn overflow_becomes_a_new_pass() {
    let mut f = Fixture::new().plugin("p", &["p/"], &[], Behaviour::Ok);
    let cfg = CoordinatorConfig::default().watch(WatchOptions::default().queue_capacity(2));
    let c = f.start(cfg).await;
    c.ready().await;
    f.set("p", Behaviour::Gate);
    f.put("p/0").await;
    settle().await;
    for i in 1..10 {
        f.put(&format!("p/{i}")).await;
    }
    f.set("p", Behaviour::Ok);
    f.gate.add_permits(1);
    settle().await;
    let log = f.log();
    assert_eq!(log[1], "p:change@1:p/0");
    let last = log.last().unwrap();
    assert!(last.starts_with("p:resync@10:Overflow:"), "{log:?}");
    assert_eq!(last.split(':').nth(3).unwrap().split(',').count(), 10);
    assert_eq!(c.status().passes, 2);
}

struct FromInventory;
#[async_trait::async_trait]
impl Plugin for FromInventory {
    async fn handle(&self, event: Event) {
        event.into_done().ok();
    }
}

crate::register_plugin! {
    name: "inventory-test",
    deps: [],
    prefixes: ["inv/"],
    factory: |_ctx: &PluginContext| Arc::new(FromInventory),
}

crate::register_plugin! {
    name: "inventory-report",
    deps: [],
    prefixes: ["inv-report/"],
    factory: |_ctx: &PluginContext| Arc::new(FromInventory),
    on_change_failure: OnChangeFailure::Retry { attempts: 2 },
}

#[tokio::test(start_paused = true)]
async fn link_time_registration_is_found() {
    let store = Local::new();
    let ctx = PluginContext::new(Arc::new(store.clone()));
    let registry = Registry::from_inventory(&ctx).unwrap();
    assert!(registry.names().contains(&"inventory-test"));
    let policies: Vec<_> = registry
        .specs()
        .filter(|s| s.name.starts_with("inventory-"))
        .map(|s| (s.name.clone(), s.on_change_failure))
        .collect();
    assert_eq!(
        policies,
        [
            (
                "inventory-report".to_owned(),
                OnChangeFailure::Retry { attempts: 2 }
            ),
            ("inventory-test".to_owned(), OnChangeFailure::Resync),
        ]
    );
    let c = Coordinator::start(&store, registry, CoordinatorConfig::default())
        .await
        .unwrap();
    c.ready().await;
    assert_eq!(
        c.status().plugin("inventory-test").unwrap().state,
        PluginState::Ready
    );
}

#[test]
fn invalid_config_is_rejected() {
    let cfg = CoordinatorConfig::default().retries(0, Duration::ZERO);
    assert!(matches!(cfg.validate(), Err(CoordinatorError::Config(_))));
}

// Compile-time checks: public futures and streams can move across threads.
#[allow(dead_code)]
fn public_futures_and_streams_are_send(store: &Local) {
    fn send<T: Send>(_: T) {}
    fn send_sync<T: Send + Sync>() {}
    send(Coordinator::start(
        store,
        Registry::new(),
        CoordinatorConfig::default(),
    ));
    send(crate::Watcher::watch(
        store,
        "x",
        &[],
        WatchOptions::default(),
    ));
    send(store.put(&Key::new("k").unwrap(), "v".into(), PutOptions::new()));
    send_sync::<CoordinatorHandle>();
    send_sync::<Local>();
    send_sync::<crate::Registration>();
    fn send_only<T: Send>() {}
    send_only::<crate::Watch>();
    send_only::<crate::Event>();
    let _ = ResyncReason::Initial;
}

/// A [`Plugin`] that refuses values equal to "bad" and logs its close.
struct Strict {
    name: &'static str,
    log: Arc<Mutex<Vec<String>>>,
}

#[async_trait::async_trait]
impl Plugin for Strict {
    async fn handle(&self, event: Event) {
        match event {
            Event::Resync(r) => r.done.ok(),
            Event::Change(c) => {
                let refused = c.changes.iter().find(|kc| kc.value == Some("bad".into()));
                c.done.answer(match refused {
                    Some(kc) => Err(format!("{} refuses {}", self.name, kc.key)),
                    None => Ok(()),
                })
            }
        }
    }

    async fn close(&self) {
        self.log
            .lock()
            .unwrap()
            .push(format!("{}:close", self.name));
    }
}

#[tokio::test]
async fn plugin_results_answer_done_and_shutdown_closes_dependents_first() {
    let store = Local::new();
    let log = Arc::new(Mutex::new(Vec::new()));
    let strict = |name| {
        Arc::new(Strict {
            name,
            log: log.clone(),
        }) as Arc<dyn Plugin>
    };
    let mut registry = Registry::new();
    registry.add(PluginSpec::new(
        "base",
        vec![Prefix::new("a/").unwrap()],
        strict("base"),
    ));
    registry
        .add(PluginSpec::new("top", vec![Prefix::new("b/").unwrap()], strict("top")).after("base"));
    let c = Coordinator::start(&store, registry, CoordinatorConfig::default())
        .await
        .unwrap();
    c.ready().await;
    store
        .put(&Key::new("a/x").unwrap(), "bad".into(), PutOptions::new())
        .await
        .unwrap();
    let r = store
        .put(&Key::new("b/x").unwrap(), "fine".into(), PutOptions::new())
        .await
        .unwrap();
    let mut rx = c.subscribe();
    tokio::time::timeout(
        Duration::from_secs(5),
        rx.wait_for(|s| s.plugin("top").is_some_and(|p| p.revision == r)),
    )
    .await
    .expect("deadlock")
    .unwrap();
    let st = c.status();
    let base = st.plugin("base").unwrap();
    assert_eq!(base.failures, 1);
    assert!(
        matches!(&base.last_error, Some((_, DoneError::Failed(e))) if e.to_string() == "base refuses a/x")
    );
    assert_eq!(st.plugin("top").unwrap().failures, 0);
    c.shutdown().await;
    assert_eq!(*log.lock().unwrap(), ["top:close", "base:close"]);
}

#[tokio::test(start_paused = true)]
async fn a_failed_change_resyncs_the_plugin_by_default() {
    let mut f = Fixture::new()
        .plugin("p", &["p/"], &[], Behaviour::Ok)
        .plugin("q", &["q/"], &[], Behaviour::Ok);
    let c = f.start(CoordinatorConfig::default()).await;
    c.ready().await;
    f.set("p", Behaviour::Fail);
    let r1 = f.put("p/1").await;
    settle().await;
    let st = c.status();
    let p = st.plugin("p").unwrap();
    assert_eq!(p.state, PluginState::OutOfSync);
    assert_eq!(
        p.unapplied,
        Some((crate::Revision(r1), vec![Key::new("p/1").unwrap()]))
    );
    // Out of sync, it gets no changes (they would build on what it refused)...
    f.set("p", Behaviour::Ok);
    f.put("p/2").await;
    f.put("q/1").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        f.log()[2..],
        ["p:change@1:p/1", "q:change@3:q/1"],
        "no change for a plugin out of sync"
    );
    // ...until a pass, after the retry backoff, resyncs it with the store's state.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let st = c.status();
    assert_eq!(st.passes, 2);
    let p = st.plugin("p").unwrap();
    assert_eq!(p.state, PluginState::Ready);
    assert_eq!(p.unapplied, None);
    assert!(
        f.log().contains(&"p:resync@3:Retry:p/1,p/2".to_owned()),
        "{:?}",
        f.log()
    );
}

#[tokio::test(start_paused = true)]
async fn the_retry_policy_hands_the_same_change_again() {
    let mut f = Fixture::new().plugin_with(
        "p",
        &["p/"],
        &[],
        Behaviour::Ok,
        OnChangeFailure::Retry { attempts: 3 },
    );
    let c = f.start(CoordinatorConfig::default()).await;
    c.ready().await;
    f.set("p", Behaviour::FailOnce);
    f.put("p/1").await;
    settle().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(f.log()[1..], ["p:change@1:p/1", "p:change@1:p/1"]);
    let st = c.status();
    assert_eq!(st.plugins[0].state, PluginState::Ready);
    assert_eq!(st.plugins[0].failures, 0, "the retry succeeded");
    assert_eq!(st.passes, 1, "no resync needed");
}

#[tokio::test(start_paused = true)]
async fn the_report_policy_keeps_the_plugin_ready() {
    let mut f =
        Fixture::new().plugin_with("p", &["p/"], &[], Behaviour::Fail, OnChangeFailure::Report);
    let c = f
        .start(CoordinatorConfig::default().retry_failed_after(None))
        .await;
    c.ready().await;
    // Its resync failed: a later pass makes it ready.
    f.set("p", Behaviour::Ok);
    c.request_resync();
    settle().await;
    f.set("p", Behaviour::Fail);
    f.put("p/1").await;
    settle().await;
    f.set("p", Behaviour::Ok);
    f.put("p/2").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let st = c.status();
    assert_eq!(st.plugins[0].state, PluginState::Ready);
    assert_eq!(st.plugins[0].unapplied, None);
    assert!(matches!(
        st.plugins[0].last_error,
        Some((crate::Revision(1), DoneError::Failed(_)))
    ));
    assert_eq!(st.passes, 2, "no resync for a reported failure");
    let changes: Vec<_> = f
        .log()
        .into_iter()
        .filter(|l| !l.contains(":resync@"))
        .collect();
    assert_eq!(changes, ["p:change@1:p/1", "p:change@2:p/2"]);
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_handler_is_not_cancelled_and_gets_nothing_until_it_returns() {
    let mut f = Fixture::new().plugin("p", &["p/"], &[], Behaviour::Ok);
    let cfg = CoordinatorConfig::default()
        .timeouts(Duration::from_secs(1), Duration::from_secs(1))
        .retries(1, Duration::from_millis(100))
        .retry_failed_after(Some(Duration::from_secs(5)));
    let c = f.start(cfg).await;
    c.ready().await;
    f.set("p", Behaviour::Slow);
    f.put("p/1").await;
    tokio::time::sleep(Duration::from_millis(1050)).await;
    assert_eq!(c.status().plugins[0].state, PluginState::OutOfSync);
    // The pass that follows finds the handler still busy: the resync fails at once,
    // and is not handed to it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let st = c.status();
    assert_eq!(st.plugins[0].state, PluginState::TimedOut, "{st:?}");
    assert_eq!(f.log()[1..], ["p:change@1:p/1"]);
    // The handler was not cancelled: it finishes its work, and then asks for the
    // pass that resyncs its plugin (long before the 5 s retry pause).
    f.set("p", Behaviour::Ok);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        f.log()[1..],
        ["p:change@1:p/1", "p:finished", "p:resync@1:Retry:p/1"]
    );
    let st = c.status();
    assert_eq!(st.plugins[0].state, PluginState::Ready, "{st:?}");
}

#[tokio::test(start_paused = true)]
async fn a_change_skipped_for_a_busy_handler_puts_even_a_report_plugin_out_of_sync() {
    let mut f =
        Fixture::new().plugin_with("p", &["p/"], &[], Behaviour::Ok, OnChangeFailure::Report);
    let cfg = CoordinatorConfig::default()
        .timeouts(Duration::from_secs(1), Duration::from_secs(1))
        .retry_failed_after(None);
    let c = f.start(cfg).await;
    c.ready().await;
    f.set("p", Behaviour::Slow);
    f.put("p/1").await;
    tokio::time::sleep(Duration::from_millis(1050)).await;
    // Timed out, reported only: still ready.
    assert_eq!(c.status().plugins[0].state, PluginState::Ready);
    f.set("p", Behaviour::Ok);
    let r2 = f.put("p/2").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    // It never saw p/2: out of sync, whatever its policy.
    let st = c.status();
    assert_eq!(st.plugins[0].state, PluginState::OutOfSync, "{st:?}");
    assert_eq!(
        st.plugins[0].unapplied,
        Some((crate::Revision(r2), vec![Key::new("p/2").unwrap()]))
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let st = c.status();
    assert_eq!(st.plugins[0].state, PluginState::Ready, "{st:?}");
    assert!(
        f.log().contains(&"p:resync@2:Retry:p/1,p/2".to_owned()),
        "{:?}",
        f.log()
    );
}

#[tokio::test(start_paused = true)]
async fn a_plugin_failing_every_pass_backs_off_while_the_others_go_on() {
    let mut f = Fixture::new()
        .plugin("p", &["p/"], &[], Behaviour::Fail)
        .plugin("q", &["q/"], &[], Behaviour::Ok);
    let cfg = CoordinatorConfig::default()
        .retries(1, Duration::ZERO)
        .retry_failed_after(Some(Duration::from_secs(1)));
    let c = f.start(cfg).await;
    c.ready().await;
    for i in 0..60 {
        f.put(&format!("q/{i}")).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let st = c.status();
    // Passes at 0, 1, 3, 7, 15, 31 and 63 s: doubling pauses, not one a second.
    assert!((5..=7).contains(&st.passes), "{} passes in 60 s", st.passes);
    assert_eq!(st.plugin("p").unwrap().state, PluginState::Failed);
    assert_eq!(st.plugin("q").unwrap().state, PluginState::Ready);
    let q_changes = f.log().iter().filter(|l| l.starts_with("q:change")).count();
    let q_resyncs = f.log().iter().filter(|l| l.starts_with("q:resync")).count();
    assert_eq!(q_resyncs as u64, st.passes);
    assert!(
        q_changes + q_resyncs >= 55,
        "q kept getting the store's writes: {q_changes} changes"
    );
}

/// A store whose watch can be made to stop for good (what a closed or failed store
/// does).
#[derive(Debug, Clone)]
struct Stoppable {
    inner: Local,
    stop: Arc<tokio::sync::Notify>,
    /// Each permit: one `Interrupted` item, then a resync (as a transport recovers).
    interrupt: Arc<tokio::sync::Notify>,
}

impl Stoppable {
    fn new() -> Self {
        Stoppable {
            inner: Local::new(),
            stop: Arc::default(),
            interrupt: Arc::default(),
        }
    }
}

#[async_trait::async_trait]
impl crate::Watcher for Stoppable {
    async fn watch(
        &self,
        name: &str,
        prefixes: &[Prefix],
        opts: WatchOptions,
    ) -> Result<crate::Watch, crate::StoreError> {
        use futures_util::StreamExt;
        let w = self.inner.watch(name, prefixes, opts).await?;
        let reg = w.registration().clone();
        let stop = self.stop.clone();
        let interrupt = self.interrupt.clone();
        let recover = reg.clone();
        let interruptions = futures_util::stream::unfold((), move |()| {
            let (interrupt, recover) = (interrupt.clone(), recover.clone());
            async move {
                interrupt.notified().await;
                recover.request_resync();
                let e = crate::StoreError::Unavailable("down".into());
                Some((Err(crate::WatchError::Interrupted(e)), ()))
            }
        });
        let stream = futures_util::stream::select(w, interruptions)
            .take_until(async move { stop.notified().await })
            .chain(futures_util::stream::once(async {
                Err(crate::WatchError::Stopped(crate::StoreError::Stopped))
            }));
        Ok(crate::Watch::new(reg, stream))
    }
}

#[tokio::test(start_paused = true)]
async fn a_composite_is_ready_after_every_source_and_outlives_a_stopped_part() {
    let (one, two) = (Local::new(), Stoppable::new());
    let composite = crate::CompositeWatcher::new()
        .with("one", Arc::new(one.clone()))
        .with("two", Arc::new(two.clone()));
    let mut f = Fixture::new().plugin("p", &["k/"], &[], Behaviour::Ok);
    let registry = std::mem::take(&mut f.registry);
    let c = Coordinator::start(&composite, registry, CoordinatorConfig::default())
        .await
        .unwrap();
    c.ready().await;
    let s = c.status();
    let names: Vec<_> = s
        .sources
        .iter()
        .map(|s| (s.name.to_string(), s.passes))
        .collect();
    assert_eq!(names, [("one".to_owned(), 1), ("two".to_owned(), 1)]);
    assert!(s.following());
    assert_eq!(s.passes, 2);

    two.stop.notify_one();
    settle().await;
    let s = c.status();
    assert!(s.stopped.is_none(), "{:?}", s.stopped);
    assert!(s.sources[1].stopped.is_some());
    assert!(!s.following());
    // The other part still streams.
    one.put(&Key::new("k/1").unwrap(), "v".into(), PutOptions::new())
        .await
        .unwrap();
    settle().await;
    assert!(
        f.log().last().unwrap().starts_with("p:change@1:k/1"),
        "{:?}",
        f.log()
    );
    c.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_stopped_watch_stops_the_coordinator_and_says_why() {
    let store = Stoppable::new();
    let mut f = Fixture::new().plugin("p", &["k/"], &[], Behaviour::Ok);
    let registry = std::mem::take(&mut f.registry);
    let c = Coordinator::start(&store, registry, CoordinatorConfig::default())
        .await
        .unwrap();
    c.ready().await;
    assert!(c.status().following());
    // Interrupted: not following until the resync of the recovery has been taken
    // (held at the gate, so the state in between can be seen).
    f.set("p", Behaviour::Gate);
    let mut rx = c.subscribe();
    store.interrupt.notify_one();
    rx.wait_for(|s| s.sources[0].interrupted.is_some())
        .await
        .unwrap();
    assert!(!c.status().following());
    f.gate.add_permits(1);
    rx.wait_for(|s| s.following()).await.unwrap();
    assert_eq!(c.status().sources[0].passes, 2);
    store.stop.notify_one();
    let why = tokio::time::timeout(Duration::from_secs(5), c.stopped())
        .await
        .expect("the coordinator stops");
    assert!(why.contains("store stopped"), "{why}");
    assert!(!c.status().following());
    c.shutdown().await;
}

/// Fails every resync of source "one" while `fail` is set; answers all else.
struct FailsOne {
    fail: Arc<std::sync::atomic::AtomicBool>,
    changes: Arc<Mutex<Vec<String>>>,
}

#[async_trait::async_trait]
impl Plugin for FailsOne {
    async fn handle(&self, event: Event) {
        match event {
            Event::Resync(r)
                if &*r.source == "one" && self.fail.load(std::sync::atomic::Ordering::SeqCst) =>
            {
                r.done.fail("cannot take one's state")
            }
            Event::Change(c) => {
                self.changes
                    .lock()
                    .unwrap()
                    .push(format!("{}:{}", c.source, c.changes[0].key));
                c.done.ok()
            }
            Event::Resync(r) => {
                let keys: Vec<_> = r.values().map(|kv| kv.key.as_str().to_owned()).collect();
                self.changes.lock().unwrap().push(format!(
                    "{}:resync:{}",
                    r.source,
                    keys.join(",")
                ));
                r.done.ok()
            }
        }
    }
}

/// Plugin "p" on `k/` with a [`FailsOne`] handler over a composite of `one` and `two`,
/// started and past its first pass (in which it failed one's resync).
async fn fails_one_over(
    one: Arc<dyn crate::Watcher>,
    two: Arc<dyn crate::Watcher>,
    config: CoordinatorConfig,
) -> (
    CoordinatorHandle,
    Arc<std::sync::atomic::AtomicBool>,
    Arc<Mutex<Vec<String>>>,
) {
    let composite = crate::CompositeWatcher::new()
        .with("one", one)
        .with("two", two);
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut registry = Registry::new();
    registry.add(PluginSpec::new(
        "p",
        vec![Prefix::new("k/").unwrap()],
        Arc::new(FailsOne {
            fail: fail.clone(),
            changes: log.clone(),
        }),
    ));
    let c = Coordinator::start(&composite, registry, config)
        .await
        .unwrap();
    c.ready().await;
    assert_eq!(c.status().plugin("p").unwrap().state, PluginState::Failed);
    (c, fail, log)
}

/// One source's successful pass does not hide another's failed one: the plugin stays
/// failed (no changes from either source) until the failed source is resynced.
#[tokio::test(start_paused = true)]
async fn a_failed_source_stays_failed_through_another_sources_pass() {
    let (one, two) = (Local::new(), Local::new());
    let config = CoordinatorConfig::default()
        .retries(1, Duration::from_millis(10))
        .retry_failed_after(Some(Duration::from_secs(10)));
    let (c, fail, changes) =
        fails_one_over(Arc::new(one.clone()), Arc::new(two.clone()), config).await;
    // A pass of every source, with one still failing: two's success does not make
    // the plugin ready.
    let mut rx = c.subscribe();
    let passes = c.status().passes;
    c.request_resync();
    rx.wait_for(|s| s.passes >= passes + 2).await.unwrap();
    assert_eq!(c.status().plugin("p").unwrap().state, PluginState::Failed);
    let failed_before = c.acks().failed;
    two.put(&Key::new("k/2").unwrap(), "v".into(), PutOptions::new())
        .await
        .unwrap();
    settle().await;
    assert!(
        !changes
            .lock()
            .unwrap()
            .iter()
            .any(|l| !l.contains(":resync:")),
        "no change reaches a failed plugin: {:?}",
        changes.lock().unwrap()
    );
    // The store hears that the change was not applied.
    assert_eq!(c.acks().failed, failed_before + 1, "{:?}", c.acks());
    // One can be taken again: the retry resyncs it, and changes flow.
    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    rx.wait_for(|s| s.plugin("p").unwrap().state == PluginState::Ready)
        .await
        .unwrap();
    changes.lock().unwrap().clear();
    one.put(&Key::new("k/1").unwrap(), "v".into(), PutOptions::new())
        .await
        .unwrap();
    settle().await;
    assert_eq!(*changes.lock().unwrap(), ["one:k/1"]);
    c.shutdown().await;
}

/// A change the plugin missed while not ready (from source two) keeps it from being
/// ready when only source one resyncs (here through an overflow of one's queue); the
/// retry resyncs two as well, and the plugin gets the missed key there.
#[tokio::test(start_paused = true)]
async fn a_change_missed_while_not_ready_needs_its_sources_resync() {
    let (one, two) = (Local::new(), Local::new());
    let config = CoordinatorConfig::default()
        .retries(1, Duration::from_millis(10))
        .retry_failed_after(Some(Duration::from_secs(10)))
        .watch(WatchOptions::default().queue_capacity(1));
    let (c, fail, log) = fails_one_over(Arc::new(one.clone()), Arc::new(two.clone()), config).await;
    two.put(&Key::new("k/2").unwrap(), "v".into(), PutOptions::new())
        .await
        .unwrap();
    settle().await;
    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    log.lock().unwrap().clear();
    // One alone overflows and resyncs.
    let one_passes = c.status().sources[0].passes;
    for i in 0..20 {
        one.put(
            &Key::new(format!("k/one{i}")).unwrap(),
            "v".into(),
            PutOptions::new(),
        )
        .await
        .unwrap();
    }
    let mut rx = c.subscribe();
    rx.wait_for(|s| s.sources[0].passes > one_passes)
        .await
        .unwrap();
    let s = c.status();
    assert_eq!(s.sources[1].passes, 1, "two did not resync");
    assert_ne!(
        s.plugin("p").unwrap().state,
        PluginState::Ready,
        "ready without two's k/2: {:?}",
        log.lock().unwrap()
    );
    rx.wait_for(|s| s.plugin("p").unwrap().state == PluginState::Ready)
        .await
        .unwrap();
    assert!(
        log.lock().unwrap().iter().any(|l| l == "two:resync:k/2"),
        "{:?}",
        log.lock().unwrap()
    );
    c.shutdown().await;
}

/// A source that stopped for good is waited for no more: the plugin that failed its
/// resync is ready again after the other source's next pass.
#[tokio::test(start_paused = true)]
async fn a_stopped_source_is_not_waited_for() {
    let (one, two) = (Stoppable::new(), Local::new());
    let config = CoordinatorConfig::default()
        .retries(1, Duration::from_millis(10))
        .retry_failed_after(Some(Duration::from_secs(1)));
    let (c, _fail, _log) = fails_one_over(Arc::new(one.clone()), Arc::new(two), config).await;
    one.stop.notify_one();
    let mut rx = c.subscribe();
    rx.wait_for(|s| s.sources[0].stopped.is_some())
        .await
        .unwrap();
    c.request_resync();
    tokio::time::timeout(
        Duration::from_secs(60),
        rx.wait_for(|s| s.plugin("p").unwrap().state == PluginState::Ready),
    )
    .await
    .expect("ready after two's pass")
    .unwrap();
    c.shutdown().await;
}
