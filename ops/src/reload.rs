//! Live reload of a credentials file: the CLI rewrites the file ([`crate::file`]), and the
//! running daemon notices within one polling period and swaps in the new contents.
//!
//! Both daemons poll the file's metadata ([`FileWatch`]) rather than use inotify (which
//! misses atomic replacements on some filesystems and needs no extra setup this way). A
//! file that fails to load is logged and ignored, so the previous set of credentials stays
//! in force: a bad edit never locks every device or gateway out.
//!
//! The copies this replaces differed in where the file was parsed (on a runtime worker in
//! the gateway, on the blocking pool in the relay) and in how the poll was timed. Kept: the
//! blocking pool (parsing a large file must not stall the runtime), and an interval that
//! does not bunch up missed ticks.

use std::fmt::Display;
use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::file::FileWatch;

/// Polls `seen`'s file every `every` until `cancel`. When it changed, loads it with `load`
/// on the blocking pool and hands the result to `apply`; an error is logged (naming the
/// config key `what`) and the previous contents stay. Make `seen` *before* the first load,
/// so that an edit landing in between is picked up.
pub async fn watch_file<T, E, L, A>(
    mut seen: FileWatch,
    load: L,
    what: &'static str,
    every: Duration,
    cancel: CancellationToken,
    mut apply: A,
) where
    T: Send + 'static,
    E: Display + Send + 'static,
    L: Fn(&Path) -> Result<T, E> + Clone + Send + 'static,
    A: FnMut(T),
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; the caller has just loaded the file.
    tick.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !seen.changed() {
            continue;
        }
        let path = seen.path().to_path_buf();
        let load = load.clone();
        match tokio::task::spawn_blocking(move || load(&path)).await {
            Ok(Ok(v)) => {
                tracing::info!(file = %seen.path().display(), key = what, "credentials reloaded");
                apply(v);
            }
            Ok(Err(e)) => tracing::error!(
                error = %e,
                file = %seen.path().display(),
                key = what,
                "credentials file is invalid; keeping the previous set (fix the file, or re-run the command that manages it)"
            ),
            Err(e) => tracing::error!(error = %e, key = what, "reloading credentials failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn load(p: &Path) -> Result<String, String> {
        let t = std::fs::read_to_string(p).map_err(|e| e.to_string())?;
        if t.starts_with("bad") {
            return Err("bad file".into());
        }
        Ok(t)
    }

    /// Waits (up to 10 s) until `seen` holds `want`.
    async fn until(seen: &Arc<Mutex<Vec<String>>>, want: &[&str]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if *seen.lock().unwrap() == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?}",
                seen.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn applies_changes_and_skips_bad_versions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("creds");
        crate::file::write_atomic(&p, b"one", 0o600).unwrap();
        let watch = FileWatch::new(&p);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let seen = seen.clone();
            let cancel = cancel.clone();
            async move {
                watch_file(
                    watch,
                    load,
                    "test.file",
                    Duration::from_millis(10),
                    cancel,
                    |v| {
                        // A version can be loaded twice when it lands between the check and
                        // the read; count each once.
                        let mut seen = seen.lock().unwrap();
                        if seen.last() != Some(&v) {
                            seen.push(v)
                        }
                    },
                )
                .await
            }
        });
        crate::file::write_atomic(&p, b"two", 0o600).unwrap();
        until(&seen, &["two"]).await;
        crate::file::write_atomic(&p, b"bad!", 0o600).unwrap();
        crate::file::write_atomic(&p, b"bad?", 0o600).unwrap();
        crate::file::write_atomic(&p, b"three", 0o600).unwrap();
        until(&seen, &["two", "three"]).await;
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the watcher stops when cancelled")
            .unwrap();
    }
}
