//! A damaged data file stops the node at open with an error naming the file; it never
//! serves wrong data.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use datasync::{Key, PutOptions, Writer};
use datasync_raft::{OpenError, RaftConfig, RaftStore};

async fn populated() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let s = RaftStore::open(RaftConfig::new(dir.path())).await.unwrap();
    for i in 0..300 {
        let v = format!("value-{i}-{}", "x".repeat(200));
        s.put(
            &Key::new(format!("k/{i:04}")).unwrap(),
            v.into(),
            PutOptions::new(),
        )
        .await
        .unwrap();
    }
    s.snapshot().await.unwrap();
    s.shutdown().await;
    drop(s);
    let file = dir.path().join("datasync.redb");
    assert!(file.metadata().unwrap().len() > 64 * 1024);
    (dir, file)
}

async fn assert_refused(dir: &Path, file: &Path, what: &str) {
    match RaftStore::open(RaftConfig::new(dir)).await {
        Err(e @ OpenError::Corrupted { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&file.display().to_string()),
                "{what}: error must name the file: {msg}"
            );
        }
        Err(other) => panic!("{what}: want Corrupted, got {other:?}"),
        Ok(_) => panic!("{what}: a damaged file was opened"),
    }
}

/// Every place `needle` occurs in `file`.
fn find_all(file: &Path, needle: &[u8]) -> Vec<u64> {
    let bytes = std::fs::read(file).unwrap();
    bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i as u64)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_in_live_data_are_refused() {
    let (dir, file) = populated().await;
    // A value the store holds: damage every copy of it in the database (state machine
    // pages, the snapshot), so no intact copy could mask the damage.
    let places = find_all(&file, b"value-150-xxxx");
    assert!(!places.is_empty(), "the value is not in the file");
    let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    for at in places {
        f.seek(SeekFrom::Start(at + 6)).unwrap();
        f.write_all(b"666").unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    assert_refused(dir.path(), &file, "flipped bytes in a value").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_file_is_refused() {
    let (dir, file) = populated().await;
    let len = file.metadata().unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert_refused(dir.path(), &file, "truncated to half").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_or_missing_file_is_refused() {
    let (dir, file) = populated().await;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(0)
        .unwrap();
    assert_refused(dir.path(), &file, "emptied").await;
    std::fs::remove_file(&file).unwrap();
    assert_refused(dir.path(), &file, "deleted").await;
}

/// The log segment holding the entries (the store's first, index 0).
fn segment(dir: &Path) -> PathBuf {
    dir.join("log").join(format!("{:020}.wal", 0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_in_the_log_are_refused() {
    let (dir, _) = populated().await;
    let seg = segment(dir.path());
    let places = find_all(&seg, b"value-150-xxxx");
    assert_eq!(places.len(), 1, "the entry is once in the log");
    let mut f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.seek(SeekFrom::Start(places[0] + 6)).unwrap();
    f.write_all(b"666").unwrap();
    drop(f);
    assert_refused(dir.path(), &seg, "flipped bytes in a log entry").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_log_is_refused() {
    let (dir, _) = populated().await;
    let log = dir.path().join("log");
    std::fs::remove_file(segment(dir.path())).unwrap();
    assert_refused(dir.path(), &log, "log segment deleted").await;
}
