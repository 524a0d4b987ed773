//! datasync-file-mirror: a plugin that keeps a directory in sync with the key prefix
//! `files/`: key `files/etc/motd` is the file `<dir>/etc/motd`, its value the content.
//!
//! What it touches, and what it never does:
//! - It only ever replaces or removes files **it wrote**. It records them, with the
//!   source each came from, in `<dir>/.datasync-file-mirror` (JSON), and records a file
//!   there before it creates it, so a crash never leaves a file of its own unrecorded.
//!   A file it did not write that stands where a key's file goes is left alone and the
//!   key is reported ("a file the mirror did not write is in the way"); so pointing
//!   `dir` at a directory with other files in it loses none of them.
//! - It never follows a symbolic link: a link where a directory of a key's path should
//!   be is reported, a link where the file goes is replaced (the link, never its
//!   target), and every access goes through a handle on the directory that refuses
//!   paths leading outside it (`cap-std`), so a link planted inside cannot make it
//!   write or delete elsewhere.
//! - Writes are atomic: an exclusively created temp file with a random name next to
//!   the target (`*.datasync-tmp`), flushed, then renamed over it. Leftovers of a crash
//!   are removed at the next resync.
//! - Directories are made as keys need them, and removed once the last file under them
//!   is; an empty directory where a key's file goes is removed, so `files/a/b` can be
//!   deleted and `files/a` written. A change that fails before its files are written
//!   takes back the directories it made (left there, they could stand where a later
//!   key's file goes).
//! - Per source: a resync replaces only the files of its source (a
//!   [`datasync::CompositeWatcher`] part), so one store's resync never removes
//!   another's files. A file that two sources both hold is the last writer's.
//!
//! Errors are reported through `Done`, never swallowed: a key that would leave the
//! directory (`..`, an empty segment), a path in the way, a failed write. A change is
//! checked whole before any of it is written. In a resync, a key that cannot be
//! mirrored is skipped and logged instead, so that one bad key cannot keep the mirror
//! from every later change (the coordinator resyncs a plugin that failed a change, and
//! the same key comes back there).
//!
//! Settings (`[plugins.file-mirror]` in the agent's config): `dir`, the directory
//! (default `./mirror`). Link it into an agent binary with `use datasync_file_mirror as _;`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cap_std::ambient_authority;
use cap_std::fs::{Dir, OpenOptions};
use datasync::coordinator::{Plugin, PluginContext};
use datasync::{BoxError, Change, Event, Key, Op, Resync, Source, Value};

/// The plugin's name.
pub const NAME: &str = "file-mirror";
/// The watched prefix.
pub const PREFIX: &str = "files/";
/// The record of the files the plugin wrote, at the top of its directory.
pub const MANIFEST: &str = ".datasync-file-mirror";
const TEMP_SUFFIX: &str = ".datasync-tmp";
/// The longest file name most file systems take.
const MAX_NAME: usize = 255;
const MANIFEST_FORMAT: u32 = 1;

datasync::register_plugin! {
    name: NAME,
    deps: [],
    prefixes: [PREFIX],
    factory: |ctx: &PluginContext| Arc::new(FileMirror::from_settings(ctx.settings_for(NAME))),
}

/// Why an event could not be mirrored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MirrorError {
    /// The plugin's settings are invalid.
    #[error("file-mirror settings: {0}")]
    Settings(String),
    /// The key cannot be a file under the directory.
    #[error("key {key:?} cannot be mirrored: {reason}")]
    BadKey {
        /// The key.
        key: String,
        /// Why.
        reason: &'static str,
    },
    /// Something the mirror did not make, or must not follow, stands on the key's path.
    #[error("key {key:?} cannot be mirrored: {reason}")]
    InTheWay {
        /// The key.
        key: String,
        /// What is in the way.
        reason: &'static str,
    },
    /// The record of the mirror's files cannot be read: the mirror cannot know which
    /// files are its own, and touches none.
    #[error("{path}: {reason} (move it away to start the mirror afresh)")]
    Manifest {
        /// The manifest's path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The file system refused.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The plugin: mirrors `files/…` into a directory.
#[derive(Debug, Clone)]
pub struct FileMirror {
    dir: Result<PathBuf, String>,
    /// Opened at the first event (the directory may not exist before).
    tree: Arc<Mutex<Option<Tree>>>,
}

impl FileMirror {
    /// Mirrors into `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileMirror {
            dir: Ok(dir.into()),
            tree: Arc::default(),
        }
    }

    /// From the plugin's settings (`{"dir": "…"}`; `null` for the default `./mirror`).
    pub fn from_settings(settings: &serde_json::Value) -> Self {
        let dir = match settings {
            serde_json::Value::Null => Ok(PathBuf::from("./mirror")),
            serde_json::Value::Object(m) => match m.get("dir") {
                None => Ok(PathBuf::from("./mirror")),
                Some(serde_json::Value::String(d)) => Ok(PathBuf::from(d)),
                Some(other) => Err(format!("`dir` must be a string, got {other}")),
            },
            other => Err(format!("expected a table with `dir`, got {other}")),
        };
        FileMirror {
            dir,
            tree: Arc::default(),
        }
    }

    fn dir(&self) -> Result<&Path, MirrorError> {
        self.dir
            .as_deref()
            .map_err(|e| MirrorError::Settings(e.clone()))
    }

    /// The path of `key` under the directory, as segments, checked to stay inside it.
    fn path_of(key: &Key) -> Result<Vec<String>, MirrorError> {
        let bad = |reason| MirrorError::BadKey {
            key: key.as_str().to_owned(),
            reason,
        };
        let rel = key
            .as_str()
            .strip_prefix(PREFIX)
            .ok_or(bad("outside files/"))?;
        let segs: Vec<String> = rel.split('/').map(str::to_owned).collect();
        for seg in &segs {
            match seg.as_str() {
                "" => return Err(bad("an empty path segment")),
                "." | ".." => return Err(bad("a `.` or `..` segment")),
                s if s.ends_with(TEMP_SUFFIX) => return Err(bad("the mirror's temp-file suffix")),
                s if s.contains('\\') => return Err(bad("a backslash")),
                s if s.len() > MAX_NAME => return Err(bad("a path segment over 255 bytes")),
                _ => {}
            }
        }
        if segs[0] == MANIFEST {
            return Err(bad("the name of the mirror's record of its files"));
        }
        Ok(segs)
    }

    /// Runs `f` on the opened tree, in a blocking task.
    async fn with_tree<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Tree) -> Result<T, MirrorError> + Send + 'static,
    ) -> Result<T, MirrorError> {
        let dir = self.dir()?.to_owned();
        let tree = self.tree.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = tree.lock().unwrap_or_else(|e| e.into_inner());
            if guard.is_none() {
                *guard = Some(Tree::open(&dir)?);
            }
            f(guard.as_mut().expect("just opened"))
        })
        .await
        .unwrap_or_else(|e| {
            Err(MirrorError::Io {
                op: "run",
                path: PathBuf::new(),
                source: std::io::Error::other(e),
            })
        })
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Manifest {
    format: u32,
    /// Relative path → the source it came from.
    files: BTreeMap<String, String>,
}

/// The opened directory and the record of the files the mirror wrote.
#[derive(Debug)]
struct Tree {
    path: PathBuf,
    root: Dir,
    owned: BTreeMap<String, Source>,
    /// `owned` differs from the manifest on disk.
    dirty: bool,
}

/// A file about to be written: its directory, its name, its relative path.
struct Slot {
    parent: Dir,
    name: String,
    rel: String,
    /// The directories this slot's preparation made: `segs[made..]` of the parent path.
    made: Option<usize>,
}

fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> MirrorError {
    let path = path.into();
    move |source| MirrorError::Io { op, path, source }
}

/// A temp file's name: short whatever the target's (so a long name still fits), and
/// of a form no key's file takes (keys ending in the suffix are refused).
fn temp_name() -> String {
    format!(".{:016x}{TEMP_SUFFIX}", fastrand::u64(..))
}

/// Whether `name` is one [`temp_name`] makes.
fn is_temp(name: &str) -> bool {
    name.len() == 1 + 16 + TEMP_SUFFIX.len()
        && name.starts_with('.')
        && name.ends_with(TEMP_SUFFIX)
        && name[1..17].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether a proper ancestor of `rel` is in `paths`: both cannot be files.
fn under_another(rel: &str, paths: &BTreeSet<String>) -> bool {
    rel.match_indices('/')
        .any(|(i, _)| paths.contains(&rel[..i]))
}

impl Tree {
    fn open(path: &Path) -> Result<Tree, MirrorError> {
        Dir::create_ambient_dir_all(path, ambient_authority())
            .map_err(io("create directory", path))?;
        let root = Dir::open_ambient_dir(path, ambient_authority()).map_err(io("open", path))?;
        let manifest_path = path.join(MANIFEST);
        let bad = |reason: String| MirrorError::Manifest {
            path: manifest_path.clone(),
            reason,
        };
        let owned = match root.symlink_metadata(MANIFEST) {
            Err(e) if e.kind() == ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io("read", &manifest_path)(e)),
            Ok(m) if !m.is_file() => return Err(bad("not a regular file".into())),
            Ok(_) => {
                let text = root
                    .read_to_string(MANIFEST)
                    .map_err(io("read", &manifest_path))?;
                let m: Manifest = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
                if m.format != MANIFEST_FORMAT {
                    return Err(bad(format!("unknown format {}", m.format)));
                }
                if let Some(p) = m.files.keys().find(|p| !valid_rel(p)) {
                    return Err(bad(format!("invalid path {p:?}")));
                }
                m.files
                    .into_iter()
                    .map(|(p, s)| (p, Source::from(s)))
                    .collect()
            }
        };
        Ok(Tree {
            path: path.to_owned(),
            root,
            owned,
            dirty: false,
        })
    }

    /// Writes the manifest if it changed (temp file, flush, rename).
    fn flush(&mut self) -> Result<(), MirrorError> {
        if !self.dirty {
            return Ok(());
        }
        let m = Manifest {
            format: MANIFEST_FORMAT,
            files: self
                .owned
                .iter()
                .map(|(p, s)| (p.clone(), s.to_string()))
                .collect(),
        };
        let text = serde_json::to_vec(&m).expect("a map of strings serializes");
        write_file(&self.root, MANIFEST, &text, &self.path.join(MANIFEST))?;
        self.dirty = false;
        Ok(())
    }

    fn claim(&mut self, rel: &str, source: &Source) {
        if self.owned.get(rel) != Some(source) {
            self.owned.insert(rel.to_owned(), source.clone());
            self.dirty = true;
        }
    }

    /// The directories along `segs` (the root first, then each parent), made where
    /// missing if `create` (see [`Self::prepare`]); `None` if one is missing. Refuses
    /// links and files where a directory goes.
    fn dirs(
        &self,
        key: &str,
        segs: &[String],
        create: bool,
    ) -> Result<Option<Vec<Dir>>, MirrorError> {
        self.dirs_making(key, segs, create, &mut None)
    }

    /// [`Self::dirs`], saying in `made` from which depth on it made the directories.
    fn dirs_making(
        &self,
        key: &str,
        segs: &[String],
        create: bool,
        made: &mut Option<usize>,
    ) -> Result<Option<Vec<Dir>>, MirrorError> {
        let in_the_way = |reason| MirrorError::InTheWay {
            key: key.to_owned(),
            reason,
        };
        let mut chain = vec![self.root.try_clone().map_err(io("open", &self.path))?];
        let mut path = self.path.clone();
        for seg in &segs[..segs.len() - 1] {
            path.push(seg);
            let d = chain.last().expect("the root at least");
            match d.symlink_metadata(seg) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(in_the_way("a symbolic link stands where a directory goes"));
                }
                Ok(_) => return Err(in_the_way("a file stands where a directory goes")),
                Err(e) if e.kind() == ErrorKind::NotFound && create => {
                    d.create_dir(seg).map_err(io("create directory", &path))?;
                    made.get_or_insert(chain.len() - 1);
                }
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io("inspect", &path)(e)),
            }
            let next = d.open_dir(seg).map_err(io("open", &path))?;
            chain.push(next);
        }
        Ok(Some(chain))
    }

    /// Makes way for the file of `key`: its directories, and no directory or foreign
    /// file where it goes (an empty directory is removed).
    fn prepare(&self, key: &str, segs: &[String]) -> Result<Slot, MirrorError> {
        let mut made = None;
        let chain = self.dirs_making(key, segs, true, &mut made);
        let slot = chain.and_then(|c| self.slot(key, segs, c.expect("created"), made));
        if slot.is_err() {
            self.unmake(segs, made);
        }
        slot
    }

    /// Removes the directories along `segs` that a preparation made (`segs[made..]`
    /// of the parent path), deepest first, while they are empty: a change that fails
    /// leaves no directory that could later stand where a file goes.
    fn unmake(&self, segs: &[String], made: Option<usize>) {
        let Some(from) = made else { return };
        for depth in (from..segs.len() - 1).rev() {
            match self.root.remove_dir(segs[..=depth].join("/")) {
                // Never made (the making failed before it): go on up.
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(_) => return,
                Ok(()) => {}
            }
        }
    }

    /// The slot for the file at `segs` in `chain`'s last directory.
    fn slot(
        &self,
        key: &str,
        segs: &[String],
        mut chain: Vec<Dir>,
        made: Option<usize>,
    ) -> Result<Slot, MirrorError> {
        let in_the_way = |reason| MirrorError::InTheWay {
            key: key.to_owned(),
            reason,
        };
        let parent = chain.pop().expect("the root at least");
        let name = segs[segs.len() - 1].clone();
        let rel = segs.join("/");
        match parent.symlink_metadata(&name) {
            // An empty directory goes (what a deleted `files/a/b` leaves of `a/`).
            Ok(m) if m.is_dir() && parent.remove_dir(&name).is_err() => {
                return Err(in_the_way(
                    "a directory that is not empty stands where the file goes",
                ));
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) if !self.owned.contains_key(&rel) => {
                return Err(in_the_way("a file the mirror did not write is in the way"));
            }
            Err(e) if e.kind() != ErrorKind::NotFound => {
                return Err(io("inspect", self.path.join(&rel))(e));
            }
            _ => {}
        }
        Ok(Slot {
            parent,
            name,
            rel,
            made,
        })
    }

    /// Removes the file at `rel` if the mirror wrote it for `source` (another source
    /// that wrote it last keeps it), and the directories it leaves empty.
    fn remove(&mut self, rel: &str, source: &Source) -> Result<(), MirrorError> {
        if self.owned.get(rel) != Some(source) {
            return Ok(());
        }
        let segs: Vec<String> = rel.split('/').map(str::to_owned).collect();
        // Something in the way of the path means the file is not there any more.
        if let Ok(Some(chain)) = self.dirs(rel, &segs, false) {
            let parent = chain.last().expect("the root at least");
            let name = &segs[segs.len() - 1];
            match parent.symlink_metadata(name) {
                Ok(m) if !m.is_dir() => parent
                    .remove_file(name)
                    .or_else(|e| {
                        if e.kind() == ErrorKind::NotFound {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                    .map_err(io("remove", self.path.join(rel)))?,
                _ => {}
            }
            // Prune: stops at the first directory that is not empty (or not ours to
            // remove).
            for depth in (1..chain.len()).rev() {
                if chain[depth - 1].remove_dir(&segs[depth - 1]).is_err() {
                    break;
                }
            }
        }
        self.owned.remove(rel);
        self.dirty = true;
        Ok(())
    }

    /// Removes temp files a crash left. They can only be where the mirror's own files
    /// go (a file is recorded before its temp file is made): the top directory and
    /// the directories of recorded files, never any other, never through a link.
    fn sweep(&self) {
        let mut parents: BTreeSet<Vec<String>> = BTreeSet::new();
        parents.insert(vec!["x".to_owned()]);
        for rel in self.owned.keys() {
            parents.insert(rel.split('/').map(str::to_owned).collect());
        }
        let mut seen = BTreeSet::new();
        for segs in parents {
            let dir_rel = segs[..segs.len() - 1].join("/");
            if !seen.insert(dir_rel.clone()) {
                continue;
            }
            let path = self.path.join(&dir_rel);
            let Ok(Some(chain)) = self.dirs(&dir_rel, &segs, false) else {
                continue;
            };
            let d = chain.last().expect("the root at least");
            let entries = match d.entries() {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(dir = ?path, error = %e, "cannot list for leftover temp files");
                    continue;
                }
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let is_file = entry.file_type().is_ok_and(|t| t.is_file());
                if is_file && name.to_str().is_some_and(is_temp) {
                    match d.remove_file(&name) {
                        Err(e) if e.kind() != ErrorKind::NotFound => {
                            tracing::warn!(file = ?path.join(&name), error = %e, "cannot remove a leftover temp file");
                        }
                        _ => {
                            tracing::debug!(file = ?path.join(&name), "removed a leftover temp file")
                        }
                    }
                }
            }
        }
    }

    /// A resync of `source`: its files written, its files that are gone removed, other
    /// sources' and foreign files untouched. Keys in the way are skipped and logged.
    fn resync(
        &mut self,
        source: &Source,
        files: Vec<(Key, Vec<String>, Value)>,
    ) -> Result<(), MirrorError> {
        // `files/a` and `files/a/b` both: the file `a` is kept, and `a/b` is no key
        // of this source's any more (an `a/b` mirrored before goes, so `a` can come).
        let all: BTreeSet<String> = files.iter().map(|(_, s, _)| s.join("/")).collect();
        let (files, shadowed): (Vec<_>, Vec<_>) = files
            .into_iter()
            .partition(|(_, segs, _)| !under_another(&segs.join("/"), &all));
        for (key, _, _) in &shadowed {
            tracing::warn!(%key, "not mirroring a key: another key's file stands where a directory goes");
        }
        let keep: BTreeSet<String> = files.iter().map(|(_, s, _)| s.join("/")).collect();
        // Leftovers first: one in a directory would keep it from being pruned.
        self.sweep();
        let stale: Vec<String> = self
            .owned
            .iter()
            .filter(|(rel, s)| *s == source && !keep.contains(*rel))
            .map(|(rel, _)| rel.clone())
            .collect();
        for rel in stale {
            self.remove(&rel, source)?;
        }
        let mut slots = Vec::with_capacity(files.len());
        for (key, segs, value) in files {
            match self.prepare(key.as_str(), &segs) {
                Ok(slot) => {
                    self.claim(&slot.rel, source);
                    slots.push((slot, value));
                }
                Err(e @ MirrorError::InTheWay { .. }) => {
                    tracing::warn!(%key, error = %e, "not mirroring a key");
                }
                Err(e) => return Err(e),
            }
        }
        self.flush()?;
        self.write_all(slots)
    }

    /// Writes prepared files (already recorded and flushed).
    fn write_all(&self, slots: Vec<(Slot, Value)>) -> Result<(), MirrorError> {
        for (slot, value) in slots {
            let path = self.path.join(&slot.rel);
            write_file(&slot.parent, &slot.name, value.as_bytes(), &path)?;
        }
        Ok(())
    }

    /// One change: checked whole (paths in the way fail it before anything is
    /// written), then applied.
    fn change(
        &mut self,
        source: &Source,
        ops: Vec<(Key, Vec<String>, Option<Value>)>,
    ) -> Result<(), MirrorError> {
        let mut writes = Vec::new();
        let mut removals = Vec::new();
        // The last op on a path wins (a transaction may touch a key once only, but be
        // safe).
        let written: BTreeSet<String> = ops
            .iter()
            .filter(|(_, _, v)| v.is_some())
            .map(|(_, segs, _)| segs.join("/"))
            .collect();
        for (key, segs, value) in ops {
            let step = match value {
                Some(_) if under_another(&segs.join("/"), &written) => Err(MirrorError::InTheWay {
                    key: key.as_str().to_owned(),
                    reason: "another key's file stands where a directory goes",
                }),
                Some(v) => self
                    .prepare(key.as_str(), &segs)
                    .map(|slot| writes.push((slot, v))),
                None => {
                    removals.push(segs.join("/"));
                    Ok(())
                }
            };
            if let Err(e) = step {
                // Nothing is written yet: take back the directories made for it.
                for (slot, _) in writes.iter().rev() {
                    let segs: Vec<String> = slot.rel.split('/').map(str::to_owned).collect();
                    self.unmake(&segs, slot.made);
                }
                return Err(e);
            }
        }
        for (slot, _) in &writes {
            let rel = slot.rel.clone();
            self.claim(&rel, source);
        }
        self.flush()?;
        self.write_all(writes)?;
        for rel in removals {
            self.remove(&rel, source)?;
        }
        self.flush()
    }
}

/// A relative path the manifest may hold: what [`FileMirror::path_of`] makes.
fn valid_rel(rel: &str) -> bool {
    rel.split('/').all(|s| {
        !s.is_empty() && s != "." && s != ".." && !s.contains('\\') && !s.ends_with(TEMP_SUFFIX)
    }) && rel.split('/').next() != Some(MANIFEST)
}

/// Writes `name` in `dir` atomically: a new temp file (exclusive, random name), flushed,
/// renamed over it. `path` is for errors.
fn write_file(dir: &Dir, name: &str, content: &[u8], path: &Path) -> Result<(), MirrorError> {
    let temp = temp_name();
    let mut f = dir
        .open_with(&temp, OpenOptions::new().write(true).create_new(true))
        .map_err(io("create", path.with_file_name(&temp)))?;
    let written = f
        .write_all(content)
        .and_then(|()| f.sync_data())
        .map_err(io("write", path.with_file_name(&temp)))
        .and_then(|()| {
            drop(f);
            dir.rename(&temp, dir, name)
                .map_err(io("rename into", path))
        });
    if written.is_err() {
        let _ = dir.remove_file(&temp);
    }
    written
}

#[async_trait::async_trait]
impl Plugin for FileMirror {
    async fn handle(&self, event: Event) {
        let result = match &event {
            Event::Resync(r) => self.resync(r).await,
            Event::Change(c) => self.change(c).await,
            _ => Ok(()),
        };
        event.into_done().answer(result);
    }
}

impl FileMirror {
    /// A key that maps to no file is skipped and logged, and does not hold up the
    /// others: failing the resync on it would keep the mirror from every later change
    /// until that one key is fixed.
    async fn resync(&self, r: &Resync) -> Result<(), BoxError> {
        let files: Vec<_> = r
            .values()
            .filter_map(|kv| match Self::path_of(&kv.key) {
                Ok(segs) => Some((kv.key.clone(), segs, kv.value.clone())),
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "not mirroring a key");
                    None
                }
            })
            .collect();
        let n = files.len();
        let source = r.source.clone();
        self.with_tree(move |t| t.resync(&source, files)).await?;
        tracing::debug!(files = n, revision = %r.revision, source = %r.source, "mirror resynced");
        Ok(())
    }

    async fn change(&self, c: &Change) -> Result<(), BoxError> {
        let ops = c
            .changes
            .iter()
            .map(|kc| {
                let value = match kc.op {
                    Op::Put => kc.value.clone(),
                    Op::Delete => None,
                };
                Ok((kc.key.clone(), Self::path_of(&kc.key)?, value))
            })
            .collect::<Result<Vec<_>, MirrorError>>()?;
        let source = c.source.clone();
        self.with_tree(move |t| t.change(&source, ops)).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stay_inside_the_directory() {
        let key = |k: &str| Key::new(k).expect("valid");
        assert_eq!(
            FileMirror::path_of(&key("files/etc/motd")).expect("fine"),
            vec!["etc".to_owned(), "motd".to_owned()]
        );
        for bad in [
            "files/../x",
            "files/a//b",
            "files/",
            "files/a/.",
            "other/x",
            "files/x.datasync-tmp",
            "files/.datasync-file-mirror",
        ] {
            assert!(FileMirror::path_of(&key(bad)).is_err(), "{bad}");
        }
        // The name is only reserved at the top.
        assert!(FileMirror::path_of(&key("files/a/.datasync-file-mirror")).is_ok());
    }

    #[test]
    fn manifest_paths_are_checked() {
        assert!(valid_rel("a/b"));
        for bad in [
            "",
            "a//b",
            "../x",
            "a/..",
            ".datasync-file-mirror",
            "x.datasync-tmp",
        ] {
            assert!(!valid_rel(bad), "{bad}");
        }
    }

    /// A change of several keys that fails on one of them (possible with etcd
    /// transactions) takes back the directories it made for the others: left there,
    /// `x/y/` would stand where a later `files/x` goes, and fail it forever.
    #[test]
    fn a_failed_change_leaves_no_directory_behind() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut tree = Tree::open(tmp.path()).expect("open");
        std::fs::write(tmp.path().join("w"), "foreign").expect("plant");
        let key = |k: &str| Key::new(k).expect("valid");
        let op = |k: &str| {
            let k = key(k);
            let segs = FileMirror::path_of(&k).expect("a path");
            (k, segs, Some(Value::from("v")))
        };
        let src = Source::from("");
        let failed = tree.change(&src, vec![op("files/x/y/z"), op("files/w")]);
        assert!(
            matches!(failed, Err(MirrorError::InTheWay { .. })),
            "{failed:?}"
        );
        assert!(
            !tmp.path().join("x").exists(),
            "x/ made for the failed change"
        );
        tree.change(&src, vec![op("files/x")])
            .expect("x becomes a file");
        assert!(tmp.path().join("x").is_file());
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("w")).expect("read"),
            "foreign"
        );
    }

    #[test]
    fn settings_are_checked() {
        assert!(
            FileMirror::from_settings(&serde_json::json!({"dir": 3}))
                .dir()
                .is_err()
        );
        assert_eq!(
            FileMirror::from_settings(&serde_json::json!({"dir": "/x"}))
                .dir()
                .expect("ok"),
            Path::new("/x")
        );
        assert_eq!(
            FileMirror::from_settings(&serde_json::Value::Null)
                .dir()
                .expect("ok"),
            Path::new("./mirror")
        );
    }
}
