//! What runs beside both halves of a session: the proxy-side statement
//! timeout, the drain on gateway shutdown, the end at credential expiry, and
//! the one cancel the proxy may have in flight.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tracing::{Instrument, Span};

use super::End;
use crate::session::limits::StatementClock;
use crate::upstream::{self, BackendKey, UpstreamTarget};

/// A cancel the proxy sent and the server may not have acted on yet.
///
/// PostgreSQL cancels whatever its backend is running when the signal lands,
/// and ignores it while the backend waits for a command. So while a cancel is
/// in flight nothing more is sent upstream: the cancel can then only hit the
/// statement it was meant for (or nothing), never the next one.
pub(super) struct CancelInFlight {
    active: AtomicBool,
    done: Notify,
    /// The session's: a failed cancel is logged as that session's.
    span: Span,
}

impl CancelInFlight {
    pub(super) fn in_span(span: Span) -> Self {
        CancelInFlight {
            active: AtomicBool::new(false),
            done: Notify::new(),
            span,
        }
    }

    /// Cancel the session's running statement, in the background.
    pub(super) fn start(self: &Arc<Self>, cancel: &Option<(Arc<UpstreamTarget>, BackendKey)>) {
        let Some((target, key)) = cancel.clone() else {
            return;
        };
        if self.active.swap(true, Ordering::AcqRel) {
            return; // one at a time is enough
        }
        let this = self.clone();
        tokio::spawn(
            async move {
                // Returns once the postmaster has signalled the backend and closed
                // the cancel connection.
                if let Err(e) = upstream::cancel(&target, &key).await {
                    tracing::warn!(error = %e, "cancelling a statement upstream failed");
                }
                this.active.store(false, Ordering::Release);
                this.done.notify_waiters();
            }
            .instrument(self.span.clone()),
        );
    }

    /// Wait until no cancel is in flight.
    pub(super) async fn settled(&self) {
        loop {
            let notified = self.done.notified();
            if !self.active.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

/// The proxy-side statement timeout: cancel a request the server has not
/// finished well after its own statement_timeout should have fired.
pub(super) async fn guard_timeout(
    clock: &StatementClock,
    timeout: Option<Duration>,
    cancel: &Option<(Arc<UpstreamTarget>, BackendKey)>,
    cancels: &Arc<CancelInFlight>,
    span: &Span,
) -> std::convert::Infallible {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        if clock.overdue(timeout) {
            span.in_scope(|| {
                tracing::info!("statement exceeded limits.statementTimeout; cancelling it upstream")
            });
            cancels.start(cancel);
        }
    }
}

/// On gateway shutdown, end the session as soon as no request is in flight:
/// a statement that is running finishes (within the grace period) and its
/// result reaches the client first.
pub(super) async fn drain_on_shutdown(
    clock: &StatementClock,
    mut shutdown: watch::Receiver<bool>,
) -> End {
    if shutdown.wait_for(|down| *down).await.is_err() {
        // The gateway dropped the sender without shutting down: never fires.
        return std::future::pending().await;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        if clock.idle() {
            return End::Shutdown;
        }
    }
}

/// When the client's token expires, end the session at its next idle
/// moment (a statement already running finishes and its result is
/// delivered); `Frontend` refuses to start anything new after the deadline.
pub(super) async fn end_at_expiry(clock: &StatementClock, expires: Option<Instant>) -> End {
    let Some(deadline) = expires else {
        return std::future::pending().await;
    };
    tokio::time::sleep_until(deadline.into()).await;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        if clock.idle() {
            return End::CredentialExpired;
        }
    }
}
