//! What file-mirror touches in its directory, through the coordinator over real stores
//! and a real directory: planted links (out of the directory, to itself), foreign files,
//! directory ↔ file changes, crash leftovers, a damaged record, and two sources under a
//! composite.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use datasync::coordinator::{
    Coordinator, CoordinatorConfig, CoordinatorHandle, PluginSpec, PluginState, Registry,
};
use datasync::local::Local;
use datasync::{CompositeWatcher, DeleteOptions, Key, Prefix, PutOptions, Watcher, Writer};
use datasync_file_mirror::{FileMirror, MANIFEST, NAME, PREFIX};

fn key(k: &str) -> Key {
    Key::new(k).expect("valid key")
}

async fn put(store: &Local, k: &str, v: &str) {
    store
        .put(&key(k), v.to_owned().into(), PutOptions::new())
        .await
        .expect("put");
}

async fn delete(store: &Local, k: &str) {
    store
        .delete(&key(k), DeleteOptions::new())
        .await
        .expect("delete");
}

async fn start(watcher: &dyn Watcher, dir: &Path) -> CoordinatorHandle {
    let mut registry = Registry::new();
    registry.add(PluginSpec::new(
        NAME,
        vec![Prefix::new(PREFIX).expect("prefix")],
        Arc::new(FileMirror::new(dir)),
    ));
    let config = CoordinatorConfig::default()
        .retries(1, Duration::from_millis(10))
        .retry_failed_after(None);
    let c = Coordinator::start(watcher, registry, config)
        .await
        .expect("start");
    c.ready().await;
    c
}

/// Waits until `what` holds, for up to 10 s.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

/// Waits for the coordinator to have handed out `n` changes (answered).
async fn changes(c: &CoordinatorHandle, n: u64) {
    until(&format!("{n} changes"), || {
        c.status().plugin(NAME).expect("plugin").changes >= n
    })
    .await;
}

/// Asks for a pass and waits until every source has had one.
async fn pass(c: &CoordinatorHandle) {
    let before: Vec<u64> = c.status().sources.iter().map(|s| s.passes).collect();
    c.request_resync();
    until("a pass of every source", || {
        let now = c.status();
        now.sources.len() == before.len()
            && now.sources.iter().zip(&before).all(|(s, b)| s.passes > *b)
    })
    .await;
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn last_error(c: &CoordinatorHandle) -> String {
    c.status()
        .plugin(NAME)
        .and_then(|p| p.last_error.clone())
        .map(|(_, e)| format!("{e:#}"))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_out_of_the_directory_is_never_followed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (dir, outside) = (tmp.path().join("mirror"), tmp.path().join("outside"));
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::create_dir_all(outside.join("deep")).expect("mkdir");
    std::fs::write(outside.join("victim"), "precious").expect("write");
    std::fs::write(outside.join("deep/victim"), "precious").expect("write");
    symlink(&outside, dir.join("link")).expect("symlink");
    symlink(&dir, dir.join("self")).expect("symlink");
    // The fixed temp name the mirror once used, planted to truncate its target.
    symlink(outside.join("victim"), dir.join("a.datasync-tmp")).expect("symlink");

    let store = Local::new();
    put(&store, "files/a", "mine").await;
    let c = start(&store, &dir).await;
    assert_eq!(read(&dir.join("a")), "mine");
    // Writing through the link, and a key under it, are refused; nothing outside moves.
    put(&store, "files/link/x", "escape").await;
    changes(&c, 1).await;
    assert!(
        last_error(&c).contains("symbolic link"),
        "{}",
        last_error(&c)
    );
    put(&store, "files/self/x", "loop").await;
    pass(&c).await;
    pass(&c).await;
    delete(&store, "files/a").await;
    pass(&c).await;

    assert_eq!(read(&outside.join("victim")), "precious");
    assert_eq!(read(&outside.join("deep/victim")), "precious");
    assert!(!outside.join("x").exists());
    assert!(!dir.join("a").exists());
    assert!(dir.join("link").is_symlink() && dir.join("self").is_symlink());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_it_did_not_write_are_never_touched() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mirror");
    std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
    std::fs::write(dir.join("notes.txt"), "theirs").expect("write");
    std::fs::write(dir.join("sub/keep"), "theirs").expect("write");

    let store = Local::new();
    put(&store, "files/sub/mine", "1").await;
    let c = start(&store, &dir).await;
    assert_eq!(read(&dir.join("sub/mine")), "1");
    // A key whose file is a foreign one fails, and the file stays.
    put(&store, "files/notes.txt", "ours").await;
    changes(&c, 1).await;
    assert!(
        last_error(&c).contains("did not write"),
        "{}",
        last_error(&c)
    );
    pass(&c).await;
    // Skipped in the resync: the plugin is ready, the foreign file is as it was.
    assert_eq!(
        c.status().plugin(NAME).expect("plugin").state,
        PluginState::Ready
    );
    assert_eq!(read(&dir.join("notes.txt")), "theirs");
    delete(&store, "files/notes.txt").await;
    delete(&store, "files/sub/mine").await;
    pass(&c).await;
    assert_eq!(read(&dir.join("notes.txt")), "theirs");
    assert_eq!(read(&dir.join("sub/keep")), "theirs");
    assert!(!dir.join("sub/mine").exists());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_becomes_a_file_and_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mirror");
    let store = Local::new();
    let c = start(&store, &dir).await;
    put(&store, "files/a/b/c", "deep").await;
    delete(&store, "files/a/b/c").await;
    put(&store, "files/a", "file").await;
    changes(&c, 3).await;
    assert_eq!(last_error(&c), "");
    assert_eq!(read(&dir.join("a")), "file");
    delete(&store, "files/a").await;
    put(&store, "files/a/b", "dir again").await;
    changes(&c, 5).await;
    assert_eq!(last_error(&c), "");
    assert_eq!(read(&dir.join("a/b")), "dir again");
    // The same turn within a resync: the old file goes before the new one comes.
    c.shutdown().await;
    delete(&store, "files/a/b").await;
    put(&store, "files/a", "file once more").await;
    let c = start(&store, &dir).await;
    assert_eq!(last_error(&c), "");
    assert_eq!(read(&dir.join("a")), "file once more");
    // Both at once cannot be: the second is skipped, the plugin stays ready.
    put(&store, "files/a/x", "under a file").await;
    changes(&c, 1).await;
    assert!(
        last_error(&c).contains("a file stands"),
        "{}",
        last_error(&c)
    );
    // The failed change owes a pass of its own (the default policy), so a second
    // pass may still be running when ours ends: wait for the plugin to settle.
    pass(&c).await;
    until("the plugin is ready after the pass", || {
        c.status().plugin(NAME).expect("plugin").state == PluginState::Ready
    })
    .await;
    assert!(!dir.join("a/x").exists());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_leftovers_go_and_a_damaged_record_stops_the_mirror() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mirror");
    let store = Local::new();
    put(&store, "files/d/f", "whole").await;
    let c = start(&store, &dir).await;
    c.shutdown().await;
    // What a crash between recording a file and renaming its temp file leaves, and a
    // file of someone else's that merely looks like one.
    std::fs::write(dir.join("d/.0123456789abcdef.datasync-tmp"), "half").expect("write");
    std::fs::write(dir.join(".fedcba9876543210.datasync-tmp"), "half").expect("write");
    std::fs::write(dir.join("d/notes.datasync-tmp"), "theirs").expect("write");
    let c = start(&store, &dir).await;
    assert_eq!(read(&dir.join("d/f")), "whole");
    let mut left: Vec<_> = std::fs::read_dir(dir.join("d"))
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    left.sort();
    assert_eq!(left, ["f", "notes.datasync-tmp"]);
    assert!(!dir.join(".fedcba9876543210.datasync-tmp").exists());
    c.shutdown().await;

    // A record it cannot read: it touches nothing and says why.
    std::fs::write(dir.join(MANIFEST), "{not json").expect("write");
    delete(&store, "files/d/f").await;
    let c = start(&store, &dir).await;
    assert_eq!(
        c.status().plugin(NAME).expect("plugin").state,
        PluginState::Failed
    );
    assert!(last_error(&c).contains(MANIFEST), "{}", last_error(&c));
    assert_eq!(read(&dir.join("d/f")), "whole");
    c.shutdown().await;
}

/// The cn-infra bug composites exist to prevent, end to end: two stores under one
/// composite, the mirror over it; neither source's resync removes the other's files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sources_keep_their_files_through_passes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mirror");
    let (one, two) = (Local::new(), Local::new());
    put(&one, "files/one", "1").await;
    put(&one, "files/shared/a", "1a").await;
    put(&two, "files/two", "2").await;
    put(&two, "files/shared/b", "2b").await;
    let composite = CompositeWatcher::new()
        .with("one", Arc::new(one.clone()))
        .with("two", Arc::new(two.clone()));
    let c = start(&composite, &dir).await;
    until("both sources mirrored", || {
        dir.join("one").exists() && dir.join("two").exists()
    })
    .await;
    for _ in 0..2 {
        pass(&c).await;
        // Each source's pass runs alone; wait for both.
        pass(&c).await;
        for (f, v) in [
            ("one", "1"),
            ("two", "2"),
            ("shared/a", "1a"),
            ("shared/b", "2b"),
        ] {
            assert_eq!(read(&dir.join(f)), v, "{f}");
        }
    }
    // A source's deletion removes its file only.
    delete(&one, "files/shared/a").await;
    until("one's file removed", || !dir.join("shared/a").exists()).await;
    pass(&c).await;
    pass(&c).await;
    assert_eq!(read(&dir.join("shared/b")), "2b");
    assert_eq!(read(&dir.join("one")), "1");
    c.shutdown().await;

    // After a restart, from the record: still per source.
    delete(&two, "files/two").await;
    let c = start(&composite, &dir).await;
    until("two's file removed", || !dir.join("two").exists()).await;
    pass(&c).await;
    assert_eq!(read(&dir.join("one")), "1");
    assert_eq!(read(&dir.join("shared/b")), "2b");
    c.shutdown().await;
}

/// Keys that cannot all be files (`files/a` and `files/a/b`), and a name too long for
/// a file system, are skipped in a resync; the others are written and the plugin is
/// ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_cannot_all_be_files_are_skipped_not_fatal() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mirror");
    let store = Local::new();
    put(&store, "files/a", "file").await;
    put(&store, "files/a/b", "under a file").await;
    put(&store, &format!("files/{}", "n".repeat(300)), "long").await;
    put(&store, "files/z", "after them").await;
    let c = start(&store, &dir).await;
    assert_eq!(
        c.status().plugin(NAME).expect("plugin").state,
        PluginState::Ready,
        "{}",
        last_error(&c)
    );
    assert_eq!(read(&dir.join("a")), "file");
    assert_eq!(read(&dir.join("z")), "after them");
    // A name of 226 to 255 bytes fits with its temp file beside it.
    let long = "m".repeat(250);
    put(&store, &format!("files/{long}"), "fits").await;
    changes(&c, 1).await;
    assert_eq!(read(&dir.join(&long)), "fits", "{}", last_error(&c));
    c.shutdown().await;
}

/// A source's delete of a file another source wrote last leaves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_removes_only_its_own_sources_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mirror");
    let (one, two) = (Local::new(), Local::new());
    let composite = CompositeWatcher::new()
        .with("one", Arc::new(one.clone()))
        .with("two", Arc::new(two.clone()));
    let c = start(&composite, &dir).await;
    put(&one, "files/x", "one's").await;
    changes(&c, 1).await;
    put(&two, "files/x", "two's").await;
    changes(&c, 2).await;
    delete(&one, "files/x").await;
    changes(&c, 3).await;
    assert_eq!(read(&dir.join("x")), "two's");
    delete(&two, "files/x").await;
    until("two's delete removes it", || !dir.join("x").exists()).await;
    c.shutdown().await;
}

/// A key that turns a mirrored directory into a file in one resync (`files/a/b`
/// mirrored, then `files/a` as well): `a/b` goes and `a` is written. A crash leftover
/// beside a file deleted meanwhile does not keep its directory alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_turns_a_directory_into_a_file_past_leftovers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mirror");
    let store = Local::new();
    put(&store, "files/a/b", "under").await;
    put(&store, "files/d/x", "x").await;
    let c = start(&store, &dir).await;
    c.shutdown().await;
    std::fs::write(dir.join("d/.0123456789abcdef.datasync-tmp"), "half").expect("write");
    put(&store, "files/a", "file").await;
    delete(&store, "files/d/x").await;
    put(&store, "files/d", "now a file").await;
    let c = start(&store, &dir).await;
    assert_eq!(
        c.status().plugin(NAME).expect("plugin").state,
        PluginState::Ready,
        "{}",
        last_error(&c)
    );
    assert_eq!(read(&dir.join("a")), "file");
    assert_eq!(read(&dir.join("d")), "now a file");
    c.shutdown().await;
}
