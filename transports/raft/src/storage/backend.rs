//! redb's file ([`Backend`]).
//!
//! Every change redb makes to its file goes through [`super::crash`], as the log's do:
//! the crash-point tests stop the process at each one, and the simulated disk
//! ([`super::disk`]) keeps what was written since the last sync apart, so that a
//! simulated crash can lose it, keep it, or keep part of it (a torn write), as power
//! loss does. redb's own `FileBackend` does the I/O and the locking (a second process
//! opening the store gets redb's "already open" error, as before).

use std::fs::File;
use std::io;
use std::ops::Bound;
use std::path::{Path, PathBuf};

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

use super::crash;

/// redb's storage: its `FileBackend`, with every write, resize and sync a crash point.
#[derive(Debug)]
pub(crate) struct Backend {
    inner: FileBackend,
    /// The same file, for the writes (so the crash layer can see and tear them).
    file: File,
    path: PathBuf,
}

impl Backend {
    /// Opens (or creates) `path`.
    pub(crate) fn open(path: &Path) -> io::Result<Backend> {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let inner = FileBackend::new(file.try_clone()?).map_err(io::Error::other)?;
        Ok(Backend {
            inner,
            file,
            path: path.to_owned(),
        })
    }
}

impl StorageBackend for Backend {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        crash::set_len(&self.file, &self.path, len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        crash::sync_data(&self.file, &self.path)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        crash::write_unsynced(&self.file, &self.path, data, offset)
    }

    fn close(&self) -> Result<(), io::Error> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}
