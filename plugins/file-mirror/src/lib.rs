//! datasync-file-mirror: a plugin that keeps a directory in sync with the key prefix
//! `files/`: key `files/etc/motd` is the file `<dir>/etc/motd`, its value the content.
//!
//! - Writes are atomic: a temp file in the same directory, flushed, then renamed over
//!   the target, so a reader never sees half a file.
//! - A resync writes every file and removes the files whose keys are gone (files left
//!   by a crash mid-write included); a change writes or removes one file.
//! - Errors are reported through `Done`, never swallowed: a key that would leave the
//!   directory (`..`, an empty segment), a key that names a directory, a failed write.
//!   In a resync, a key that maps to no file is skipped and logged instead, so that one
//!   bad key cannot keep the mirror from every later change (the coordinator resyncs a
//!   plugin that failed a change, and the same key comes back there).
//! - Settings (`[plugins.file-mirror]` in the agent's config): `dir`, the directory
//!   (default `./mirror`).
//!
//! Link it into an agent binary with `use datasync_file_mirror as _;`.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use datasync::coordinator::{Plugin, PluginContext, PluginHandler};
use datasync::{BoxError, Change, Key, Op, Resync, Value};

/// The plugin's name.
pub const NAME: &str = "file-mirror";
/// The watched prefix.
pub const PREFIX: &str = "files/";
const TEMP_SUFFIX: &str = ".datasync-tmp";

datasync::register_plugin! {
    name: NAME,
    deps: [],
    prefixes: [PREFIX],
    factory: |ctx: &PluginContext| PluginHandler::shared(FileMirror::from_settings(ctx.settings_for(NAME))),
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
}

impl FileMirror {
    /// Mirrors into `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileMirror {
            dir: Ok(dir.into()),
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
        FileMirror { dir }
    }

    fn dir(&self) -> Result<&Path, MirrorError> {
        self.dir
            .as_deref()
            .map_err(|e| MirrorError::Settings(e.clone()))
    }

    /// The file of `key`, checked to stay inside the directory.
    fn path_of(dir: &Path, key: &Key) -> Result<PathBuf, MirrorError> {
        let bad = |reason| MirrorError::BadKey {
            key: key.as_str().to_owned(),
            reason,
        };
        let rel = key
            .as_str()
            .strip_prefix(PREFIX)
            .ok_or(bad("outside files/"))?;
        let mut path = dir.to_owned();
        for seg in rel.split('/') {
            match seg {
                "" => return Err(bad("an empty path segment")),
                "." | ".." => return Err(bad("a `.` or `..` segment")),
                s if s.ends_with(TEMP_SUFFIX) => return Err(bad("the mirror's temp-file suffix")),
                s if s.contains('\\') => return Err(bad("a backslash")),
                s => path.push(s),
            }
        }
        Ok(path)
    }

    /// Applies a resync: every file written, every other file removed.
    fn resync(dir: &Path, files: Vec<(PathBuf, Value)>) -> Result<(), MirrorError> {
        let keep: BTreeSet<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
        for (path, value) in &files {
            write_atomic(path, value.as_bytes())?;
        }
        remove_others(dir, &keep)
    }
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> MirrorError {
    let path = path.to_owned();
    move |source| MirrorError::Io { op, path, source }
}

fn write_atomic(path: &Path, content: &[u8]) -> Result<(), MirrorError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io("create directory", parent))?;
    let mut temp = path.as_os_str().to_owned();
    temp.push(TEMP_SUFFIX);
    let temp = PathBuf::from(temp);
    let mut f = std::fs::File::create(&temp).map_err(io("create", &temp))?;
    f.write_all(content).map_err(io("write", &temp))?;
    f.sync_data().map_err(io("sync", &temp))?;
    drop(f);
    std::fs::rename(&temp, path).map_err(io("rename into", path))
}

fn remove(path: &Path) -> Result<(), MirrorError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", path)(e)),
        _ => Ok(()),
    }
}

/// Removes every file under `dir` not in `keep`.
fn remove_others(dir: &Path, keep: &BTreeSet<PathBuf>) -> Result<(), MirrorError> {
    let entries = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        r => r.map_err(io("list", dir))?,
    };
    for entry in entries {
        let path = entry.map_err(io("list", dir))?.path();
        if path.is_dir() {
            remove_others(&path, keep)?;
        } else if !keep.contains(&path) {
            remove(&path)?;
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl Plugin for FileMirror {
    /// A key that maps to no file is skipped and logged, and does not hold up the
    /// others: failing the resync on it would keep the mirror from every later change
    /// until that one key is fixed.
    async fn resync(&self, r: &Resync) -> Result<(), BoxError> {
        let dir = self.dir()?.to_owned();
        let files: Vec<_> = r
            .values()
            .filter_map(|kv| match Self::path_of(&dir, &kv.key) {
                Ok(path) => Some((path, kv.value.clone())),
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "not mirroring a key");
                    None
                }
            })
            .collect();
        let n = files.len();
        blocking(move || Self::resync(&dir, files)).await?;
        tracing::debug!(files = n, revision = %r.revision, "mirror resynced");
        Ok(())
    }

    async fn change(&self, c: &Change) -> Result<(), BoxError> {
        let dir = self.dir()?.to_owned();
        let ops = c
            .changes
            .iter()
            .map(|kc| Ok((Self::path_of(&dir, &kc.key)?, kc.op, kc.value.clone())))
            .collect::<Result<Vec<_>, MirrorError>>()?;
        blocking(move || {
            for (path, op, value) in ops {
                match (op, value) {
                    (Op::Put, Some(v)) => write_atomic(&path, v.as_bytes())?,
                    _ => remove(&path)?,
                }
            }
            Ok(())
        })
        .await?;
        Ok(())
    }
}

async fn blocking(
    f: impl FnOnce() -> Result<(), MirrorError> + Send + 'static,
) -> Result<(), MirrorError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(MirrorError::Io {
            op: "run",
            path: PathBuf::new(),
            source: std::io::Error::other(e),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stay_inside_the_directory() {
        let dir = Path::new("/m");
        let key = |k: &str| Key::new(k).expect("valid");
        assert_eq!(
            FileMirror::path_of(dir, &key("files/etc/motd")).expect("fine"),
            PathBuf::from("/m/etc/motd")
        );
        for bad in [
            "files/../x",
            "files/a//b",
            "files/",
            "files/a/.",
            "other/x",
            "files/x.datasync-tmp",
        ] {
            assert!(FileMirror::path_of(dir, &key(bad)).is_err(), "{bad}");
        }
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
