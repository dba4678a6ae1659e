//! The session after login: client → upstream and upstream → client, both
//! directions concurrently (a pipelining client and a big result must never
//! wait on each other), each batching its writes per read.
//!
//! Refusals use the upstream's own error machinery rather than a reply
//! synthesised out of band: a refused message is replaced by a statement the
//! server is certain to reject with a syntax error (a "sentinel" naming a
//! per-session nonce and a sequence number). The server then does exactly what
//! it does for any error — skips to Sync in the extended protocol, fails an
//! open transaction block, sends ReadyForQuery in order — and the upstream half
//! swaps that error for the proxy's own. Replies therefore keep their order
//! however deeply the client pipelines.
//!
//! - `frontend`: client → upstream, one handler per message family; judging
//!   (`frontend/judge.rs`) and approval holds (`frontend/hold.rs`);
//! - `backend`: upstream → client (refusal swap, masking, limits, outcomes);
//! - `sentinel`: the refusal sentinel's text and how its error is matched;
//! - `watchdog`: timers beside both halves (statement timeout, shutdown
//!   drain, credential expiry) and the one cancel in flight;
//! - this module: wiring both halves, and how the session's `End` reaches
//!   the client.

mod backend;
mod frontend;
mod sentinel;
mod watchdog;

#[cfg(test)]
mod harness;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::future::Either::{Left, Right};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Notify};

use super::limits::{RowLimiter, StatementClock};
use super::mask;
use super::names::{NameLedger, NameMap, RequestOutcome};
use super::outcome::{Described, Watcher};
use crate::approval::Approvals;
use crate::config::{LiveConfig, PolicyConfig};
use crate::masking::Masking;
use crate::observe::Metrics;
use crate::policy::SessionState;
use crate::recording::{Ack, SessionLog};
use crate::transport::Duplex;
use crate::upstream::{BackendKey, UpstreamTarget};
use crate::wire::codec::{self, TxStatus};
use crate::wire::conn::{FrameBuf, ReadError};
use crate::wire::{Limits, PgError};
use backend::Backend;
use frontend::Frontend;
use watchdog::CancelInFlight;

/// How a session ended.
#[derive(Debug)]
pub enum End {
    /// The client sent Terminate.
    ClientTerminated,
    /// The client closed its socket.
    ClientClosed,
    /// The upstream closed (its FATAL, if any, was passed on).
    UpstreamClosed,
    /// The client broke the protocol: it gets this FATAL.
    ClientViolation(PgError),
    /// The upstream broke the protocol or failed.
    UpstreamFailed(String),
    /// The client's socket failed.
    ClientIo(std::io::Error),
    /// The gateway is shutting down and the session had nothing in flight.
    Shutdown,
    /// The client's token expired; no new statement may run on it.
    CredentialExpired,
    /// A durable record could not be written: the session stops rather than
    /// run or answer unrecorded.
    RecordingFailed,
    /// The server changed a setting the gateway relies on: the client gets
    /// this FATAL.
    ServerSettingChanged(PgError),
    /// A new configuration no longer admits the session, or changed what it
    /// cannot switch to: the client gets this FATAL.
    Reconfigured(PgError),
}

// === impl End ===

impl End {
    /// The one place an end becomes what the client reads last. Every error
    /// here is FATAL: the connection closes right after it. None: the client
    /// left, or the server's own FATAL was already passed on.
    pub fn client_error(&self) -> Option<PgError> {
        match self {
            End::ClientViolation(err) | End::ServerSettingChanged(err) | End::Reconfigured(err) => {
                Some(err.clone())
            }
            End::UpstreamFailed(why) => Some(PgError::upstream_failed(why.clone())),
            End::Shutdown => Some(PgError::shutting_down()),
            End::CredentialExpired => Some(PgError::credential_expired()),
            End::RecordingFailed => Some(PgError::recording_failed()),
            End::ClientTerminated | End::ClientClosed | End::UpstreamClosed | End::ClientIo(_) => {
                None
            }
        }
    }

    /// Whether the server is still there to be told goodbye.
    fn upstream_open(&self) -> bool {
        !matches!(self, End::UpstreamClosed | End::UpstreamFailed(_))
    }

    /// Reading the client failed: its socket, or a malformed frame.
    fn client_read(e: ReadError, metrics: &Metrics) -> End {
        match e {
            ReadError::Io(e) => End::ClientIo(e),
            e => {
                metrics.protocol_errors_client.inc();
                End::ClientViolation(PgError::protocol_violation(e.to_string()))
            }
        }
    }

    fn upstream_write(e: std::io::Error) -> End {
        End::UpstreamFailed(format!("writing to the upstream server failed: {e}"))
    }
}

/// Output buffers above this size are released after being written.
const SHRINK_ABOVE: usize = 1024 * 1024;

pub struct Relay<'a> {
    /// The policy the session runs under; replaced when a new configuration
    /// (hot reload, a new snapshot) still admits the session.
    pub policy: Arc<PolicyConfig>,
    pub live: &'a LiveConfig,
    /// The configuration generation `policy` comes from.
    pub generation: u64,
    /// Who logged in and how, to ask a new configuration again.
    pub login: super::Login,
    pub metrics: &'a Metrics,
    pub nonce: String,
    pub status: TxStatus,
    pub max_rows: Option<u64>,
    pub statement_timeout: Option<Duration>,
    /// Where to send a cancel for this session's running statement.
    pub cancel: Option<(Arc<UpstreamTarget>, BackendKey)>,
    /// Becomes true when the gateway shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// When the client's credential (token) stops being valid.
    pub expires: Option<Instant>,
    /// The policy's masking, when it masks columns.
    pub masking: Option<Arc<Masking>>,
    /// Where statements that need approval wait; None refuses them.
    pub approvals: Option<Arc<Approvals>>,
    /// The authenticated subject (approvals are bound to it).
    pub subject: String,
    /// Woken by a CancelRequest for this session (ends a wait for approval).
    pub interrupt: Arc<Notify>,
    /// The session's recording, when the policy records.
    pub log: Option<&'a SessionLog>,
    pub limits: Limits,
    /// The login values of the settings the gateway relies on.
    pub server_settings: super::server_settings::ServerSettings,
    /// The session's span. The relay is polled outside it (entering it on
    /// every poll cost more than the rest of a Sync); what it logs enters it.
    pub span: tracing::Span,
}

// === impl Relay ===

impl Relay<'_> {
    pub async fn run<C, U>(
        self,
        mut client: C,
        client_frames: FrameBuf,
        mut upstream: U,
        upstream_frames: FrameBuf,
    ) -> End
    where
        C: Duplex,
        U: Duplex,
    {
        let (mut cr, mut cw) = client.halves();
        let (mut ur, mut uw) = upstream.halves();
        let (tx, rx) = mpsc::unbounded_channel();
        let (notice_tx, notice_rx) = mpsc::unbounded_channel();
        let (watch_tx, watch_rx) = mpsc::unbounded_channel();
        let (describe_tx, describe_rx) = mpsc::unbounded_channel();
        let (outcome_tx, outcome_rx) = mpsc::unbounded_channel();
        let answered = Answered::default();
        let described = Arc::new(Described::default());
        let clock = StatementClock::default();
        let cancels = Arc::new(CancelInFlight::in_span(self.span.clone()));
        let (front_mask, back_mask) = match &self.masking {
            Some(m) => {
                let (f, b) = mask::session_pair(m, self.limits);
                (Some(f), Some(b))
            }
            None => (None, None),
        };
        let end = {
            let front = Frontend {
                policy: self.policy.clone(),
                live: self.live,
                span: &self.span,
                generation: self.generation,
                login: &self.login,
                metrics: self.metrics,
                nonce: &self.nonce,
                next_seq: 0,
                refusals: tx,
                session: SessionState::default(),
                clock: &clock,
                cancels: &cancels,
                expires: self.expires,
                mask: front_mask,
                approvals: self.approvals.clone(),
                subject: &self.subject,
                interrupt: &self.interrupt,
                shutdown: self.shutdown.clone(),
                notices: notice_tx,
                watches: watch_tx,
                requests_sent: 0,
                executes_since_sync: 0,
                statements: NameMap::default(),
                portals: NameMap::default(),
                log: self.log,
                acks: Vec::new(),
                describes: describe_tx,
                described: described.clone(),
                preanalyzed: None,
                last_judged: Default::default(),
                ledger: NameLedger::default(),
                outcomes: outcome_rx,
                done: &answered,
                unsettled_until: None,
                copy_in: false,
                names_may_differ: false,
            }
            .run(&mut cr, client_frames, &mut uw);
            let back = Backend {
                metrics: self.metrics,
                nonce: &self.nonce,
                refusals: rx,
                pending: VecDeque::new(),
                status: self.status,
                mask: back_mask,
                limiter: self.max_rows.map(RowLimiter::new),
                clock: &clock,
                cancel: &self.cancel,
                cancels: &cancels,
                notices: notice_rx,
                watcher: Watcher::new(
                    watch_rx,
                    describe_rx,
                    described.clone(),
                    self.approvals.clone(),
                    self.log,
                    &self.span,
                ),
                acks: Vec::new(),
                settings: self.server_settings,
                outcomes: outcome_tx,
                done: &answered,
                answered: RequestOutcome::default(),
                copy_in: false,
            }
            .run(&mut ur, upstream_frames, &mut cw);
            let guard = watchdog::guard_timeout(
                &clock,
                self.statement_timeout,
                &self.cancel,
                &cancels,
                &self.span,
            );
            let drain = watchdog::drain_on_shutdown(&clock, self.shutdown);
            let expiry = watchdog::end_at_expiry(&clock, self.expires);
            // Not `select!`, which polls every branch whenever any of them
            // is woken: here a reply from the server polls only the upstream
            // half, a client message only the client half (issue #21: the
            // spurious polls were a tenth of the per-statement CPU).
            // Each part is stored at the size of the largest: the two big
            // halves are boxed, or every idle session would hold five
            // copies of the largest state machine.
            let mut parts = FuturesUnordered::new();
            parts.push(Left(Box::pin(front)));
            parts.push(Right(Left(Box::pin(back))));
            parts.push(Right(Right(Left(drain))));
            parts.push(Right(Right(Right(Left(expiry)))));
            parts.push(Right(Right(Right(Right(
                async move { match guard.await {} },
            )))));
            match parts.next().await {
                Some(end) => end,
                // Unreachable: five futures were pushed.
                None => End::UpstreamClosed,
            }
        };
        // Both halves are dropped; tell each side what it needs to know.
        if let Some(err) = end.client_error() {
            let mut out = BytesMut::new();
            codec::put_error(&err, &mut out);
            let _ = write(&mut cw, &mut out).await;
        }
        if end.upstream_open() {
            // A clean goodbye so the server does not log an unexpected EOF.
            let mut out = BytesMut::new();
            codec::put_terminate(&mut out);
            let _ = write(&mut uw, &mut out).await;
        }
        let _ = cw.shutdown().await;
        end
    }
}

/// How many requests the server has answered completely (its
/// ReadyForQuery count): the upstream half bumps it once per request, the
/// client half reads it and sometimes waits for it. A counter and a wakeup
/// only when someone waits: a watch channel cost a lock and a notify per
/// statement.
#[derive(Default)]
pub(super) struct Answered {
    count: AtomicU64,
    waiting: AtomicBool,
    notify: Notify,
}

impl Answered {
    pub(super) fn get(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    fn set(&self, n: u64) {
        self.count.store(n, Ordering::SeqCst);
        // SeqCst on both sides: either the waiter sees the new count, or
        // this sees the waiter's flag.
        if self.waiting.load(Ordering::SeqCst) {
            self.notify.notify_waiters();
        }
    }

    /// Until more than `request` requests are answered. (If the upstream
    /// half ends first, the relay ends with it and this is dropped.)
    async fn wait_past(&self, request: u64) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.waiting.store(true, Ordering::SeqCst);
            if self.get() > request {
                self.waiting.store(false, Ordering::SeqCst);
                return;
            }
            notified.await;
        }
    }
}

/// Wait for durable records; false if the recorder failed (the session then
/// ends rather than go on unrecorded).
async fn recorded(acks: &mut Vec<Ack>) -> bool {
    for ack in acks.drain(..) {
        if ack.await.is_err() {
            return false;
        }
    }
    true
}

async fn write<W: AsyncWrite + Unpin>(w: &mut W, out: &mut BytesMut) -> std::io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    w.write_all(out).await?;
    // A no-op on TCP; pushes buffered records out on TLS.
    w.flush().await?;
    out.clear();
    // Give back the memory of an unusually large batch (a huge row) rather
    // than keep it for the rest of the session.
    if out.capacity() > SHRINK_ABOVE {
        *out = BytesMut::new();
    }
    Ok(())
}
