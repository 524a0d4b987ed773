//! Runnable datasync scenarios; see `src/bin/`.
