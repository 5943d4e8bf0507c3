//! Waiting for the signal that stops a daemon: SIGTERM (systemd, `kill`) or SIGINT
//! (Ctrl-C in a terminal).
//!
//! The two daemons had copies that differed when the handlers cannot be installed: the
//! relay fell back to `tokio::signal::ctrl_c()`, which installs the same kind of handler,
//! fails the same way and then returned at once, so the relay would have shut down right
//! after starting. Here the failure is logged and the wait never ends: the daemon keeps
//! running and can still be stopped with SIGKILL.

/// Returns when SIGTERM or SIGINT arrives, logging which one.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!(
            "cannot install signal handlers; stop the daemon with SIGKILL only if you must"
        );
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn returns_on_sigterm_to_this_process() {
        // Installs tokio's handler before anything raises SIGTERM, so the signal can never
        // take its default action (ending the test process).
        let _guard =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        let waiter = tokio::spawn(wait_for_signal());
        // The handler is installed when the task first runs; keep sending until it is seen.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !waiter.is_finished() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "SIGTERM not noticed in 10 s"
            );
            // SAFETY: raises a signal in this process, whose handler `_guard` installed.
            unsafe { libc::raise(libc::SIGTERM) };
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        waiter.await.unwrap();
    }
}
