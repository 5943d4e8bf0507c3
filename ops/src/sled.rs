//! Opening a sled database whose file lock may still be held for a moment.
//!
//! sled takes an exclusive lock on its directory. When this process has just dropped its
//! previous handle (a store reopened after an I/O error, a test that reopens), sled's
//! flusher thread lets go of the lock on its next tick, so the first attempt can fail with
//! "could not acquire lock". [`open_retrying`] retries that one error for a bounded time;
//! any other error, or the lock still held at the deadline (another process really owns
//! the database), is returned as it is, for the caller to word.
//!
//! sled 0.34 reports the lock conflict only as an `io::Error` of kind `Other` whose text
//! names it (`sled::Config::open`, "could not acquire lock on …"): no variant, no errno.
//! Matching that text in [`is_lock_error`] is the one place the substring is kept.

use std::time::{Duration, Instant};

/// How long to wait between attempts.
const RETRY_EVERY: Duration = Duration::from_millis(20);

/// Whether `e` is sled's "the file lock is held" error.
pub fn is_lock_error(e: &sled::Error) -> bool {
    match e {
        sled::Error::Io(io) => is_lock_error_io(io),
        _ => false,
    }
}

/// Whether the I/O error inside a [`sled::Error::Io`] is sled's lock error.
pub fn is_lock_error_io(io: &std::io::Error) -> bool {
    // sled offers nothing typed for this (module docs), so the text decides.
    io.to_string().contains("could not acquire lock")
}

/// Calls `open` until it returns something other than a lock error ([`is_lock_error`]),
/// or `wait` has passed; returns the last result. Blocks the thread between attempts: call
/// it from a blocking context (`spawn_blocking`, start-up, a CLI command).
pub fn open_retrying<T>(
    wait: Duration,
    mut open: impl FnMut() -> Result<T, sled::Error>,
) -> Result<T, sled::Error> {
    let deadline = Instant::now() + wait;
    loop {
        match open() {
            Err(e) if is_lock_error(&e) && Instant::now() < deadline => {
                std::thread::sleep(RETRY_EVERY)
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_held_by_a_live_handle_is_reported_after_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let held = sled::open(dir.path()).unwrap();
        let started = Instant::now();
        let e = open_retrying(Duration::from_millis(100), || sled::open(dir.path())).unwrap_err();
        assert!(is_lock_error(&e), "{e}");
        assert!(started.elapsed() >= Duration::from_millis(100));
        drop(held);
    }

    #[test]
    fn a_lock_let_go_during_the_wait_opens() {
        let dir = tempfile::tempdir().unwrap();
        let held = sled::open(dir.path()).unwrap();
        let mut attempts = 0;
        let mut held = Some(held);
        let db = open_retrying(Duration::from_secs(10), || {
            attempts += 1;
            if attempts == 3 {
                // Let go after two refused attempts; sled releases the lock when its last
                // handle (and its flusher) is gone.
                held.take();
            }
            sled::open(dir.path())
        })
        .unwrap();
        assert!(attempts >= 3, "{attempts}");
        drop(db);
    }

    #[test]
    fn other_errors_are_not_retried() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let mut attempts = 0;
        let e = open_retrying(Duration::from_secs(10), || {
            attempts += 1;
            sled::open(&file)
        })
        .unwrap_err();
        assert!(!is_lock_error(&e), "{e}");
        assert_eq!(attempts, 1);
    }
}
