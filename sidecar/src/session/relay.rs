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

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Notify};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::approve::{self, Hold, HoldKind, Need};
use super::limits::{RowAction, RowLimiter, StatementClock};
use super::mask::{self, BackMask, Disposition, FrontMask};
use super::names::{Failed, NameLedger, RequestOutcome, ServerEvent};
use super::outcome::{Described, Watch, WatchKind, Watcher};
use crate::approval::{messages, Approvals};
use crate::config::{LiveConfig, PolicyConfig};
use crate::masking::{plan, Masking};
use crate::observe::Metrics;
use crate::policy::analyze::Effect;
use crate::policy::{Gate, Judgement, SessionState, Verdict};
use crate::recording::{Ack, RecordedVerdict, SessionLog, StatementFacts};
use crate::upstream::{self, BackendKey, UpstreamTarget};
use crate::wire::codec::{self, TxStatus};
use crate::wire::conn::{FrameBuf, ReadError};
use crate::wire::{Limits, PgError, SqlState};

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

/// A refusal waiting for its sentinel's error to come back.
struct Pending {
    seq: u64,
    error: PgError,
}

/// Unmatched refusals are those the server discarded after an earlier error
/// in the same batch; keep a bounded number.
const MAX_PENDING: usize = 1024;

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
}

/// A cancel the proxy sent and the server may not have acted on yet.
///
/// PostgreSQL cancels whatever its backend is running when the signal lands,
/// and ignores it while the backend waits for a command. So while a cancel is
/// in flight nothing more is sent upstream: the cancel can then only hit the
/// statement it was meant for (or nothing), never the next one.
#[derive(Default)]
struct CancelInFlight {
    active: AtomicBool,
    done: Notify,
}

impl CancelInFlight {
    /// Cancel the session's running statement, in the background.
    fn start(self: &Arc<Self>, cancel: &Option<(Arc<UpstreamTarget>, BackendKey)>) {
        let Some((target, key)) = cancel.clone() else {
            return;
        };
        if self.active.swap(true, Ordering::AcqRel) {
            return; // one at a time is enough
        }
        let this = self.clone();
        tokio::spawn(async move {
            // Returns once the postmaster has signalled the backend and closed
            // the cancel connection.
            if let Err(e) = upstream::cancel(&target, &key).await {
                tracing::warn!(error = %e, "cancelling a statement upstream failed");
            }
            this.active.store(false, Ordering::Release);
            this.done.notify_waiters();
        });
    }

    /// Wait until no cancel is in flight.
    async fn settled(&self) {
        loop {
            let notified = self.done.notified();
            if !self.active.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

impl Relay<'_> {
    pub async fn run<C, U>(
        self,
        client: C,
        client_frames: FrameBuf,
        upstream: U,
        upstream_frames: FrameBuf,
    ) -> End
    where
        C: AsyncRead + AsyncWrite + Unpin,
        U: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut cr, mut cw) = tokio::io::split(client);
        let (mut ur, mut uw) = tokio::io::split(upstream);
        let (tx, rx) = mpsc::unbounded_channel();
        let (notice_tx, notice_rx) = mpsc::unbounded_channel();
        let (watch_tx, watch_rx) = mpsc::unbounded_channel();
        let (describe_tx, describe_rx) = mpsc::unbounded_channel();
        let (outcome_tx, outcome_rx) = mpsc::unbounded_channel();
        let (done_tx, done_rx) = watch::channel(0u64);
        let described = Arc::new(Described::default());
        let clock = StatementClock::default();
        let cancels = Arc::new(CancelInFlight::default());
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
                statements: HashMap::new(),
                portals: HashMap::new(),
                log: self.log,
                acks: Vec::new(),
                describes: describe_tx,
                described: described.clone(),
                preanalyzed: None,
                ledger: NameLedger::default(),
                outcomes: outcome_rx,
                done: done_rx,
                unsettled_until: None,
                copy_in: false,
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
                ),
                acks: Vec::new(),
                settings: self.server_settings,
                outcomes: outcome_tx,
                done: done_tx,
                answered: RequestOutcome::default(),
                copy_in: false,
            }
            .run(&mut ur, upstream_frames, &mut cw);
            let guard = guard_timeout(&clock, self.statement_timeout, &self.cancel, &cancels);
            let drain = drain_on_shutdown(&clock, self.shutdown);
            let expiry = end_at_expiry(&clock, self.expires);
            tokio::select! {
                end = front => end,
                end = back => end,
                end = drain => end,
                end = expiry => end,
                never = guard => match never {},
            }
        };
        // Both halves are dropped; tell each side what it needs to know.
        let mut out = BytesMut::new();
        match &end {
            End::ClientViolation(err) | End::ServerSettingChanged(err) | End::Reconfigured(err) => {
                codec::put_error(err, &mut out);
                let _ = cw.write_all(&out).await;
                let _ = cw.flush().await;
            }
            End::UpstreamFailed(why) => {
                codec::put_error(&PgError::upstream_failed(why.clone()), &mut out);
                let _ = cw.write_all(&out).await;
                let _ = cw.flush().await;
            }
            End::Shutdown => {
                codec::put_error(&PgError::shutting_down(), &mut out);
                let _ = cw.write_all(&out).await;
                let _ = cw.flush().await;
            }
            End::CredentialExpired => {
                codec::put_error(&PgError::credential_expired(), &mut out);
                let _ = cw.write_all(&out).await;
                let _ = cw.flush().await;
            }
            End::RecordingFailed => {
                codec::put_error(&PgError::recording_failed(), &mut out);
                let _ = cw.write_all(&out).await;
                let _ = cw.flush().await;
            }
            _ => {}
        }
        if !matches!(end, End::UpstreamClosed | End::UpstreamFailed(_)) {
            // A clean goodbye so the server does not log an unexpected EOF.
            let _ = uw.write_all(&[b'X', 0, 0, 0, 4]).await;
            let _ = uw.flush().await;
        }
        let _ = cw.shutdown().await;
        end
    }
}

/// The proxy-side statement timeout: cancel a request the server has not
/// finished well after its own statement_timeout should have fired.
async fn guard_timeout(
    clock: &StatementClock,
    timeout: Option<Duration>,
    cancel: &Option<(Arc<UpstreamTarget>, BackendKey)>,
    cancels: &Arc<CancelInFlight>,
) -> std::convert::Infallible {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        if clock.overdue(timeout) {
            tracing::info!("statement exceeded limits.statementTimeout; cancelling it upstream");
            cancels.start(cancel);
        }
    }
}

/// On gateway shutdown, end the session as soon as no request is in flight:
/// a statement that is running finishes (within the grace period) and its
/// result reaches the client first.
async fn drain_on_shutdown(clock: &StatementClock, mut shutdown: watch::Receiver<bool>) -> End {
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
async fn end_at_expiry(clock: &StatementClock, expires: Option<Instant>) -> End {
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

// === client → upstream ===

struct Frontend<'a> {
    policy: Arc<PolicyConfig>,
    live: &'a LiveConfig,
    generation: u64,
    login: &'a super::Login,
    metrics: &'a Metrics,
    nonce: &'a str,
    next_seq: u64,
    refusals: mpsc::UnboundedSender<Pending>,
    session: SessionState,
    clock: &'a StatementClock,
    cancels: &'a Arc<CancelInFlight>,
    expires: Option<Instant>,
    mask: Option<FrontMask>,
    approvals: Option<Arc<Approvals>>,
    subject: &'a str,
    interrupt: &'a Notify,
    shutdown: watch::Receiver<bool>,
    /// NoticeResponses for the client, written by the upstream half.
    notices: mpsc::UnboundedSender<BytesMut>,
    /// Released statements whose outcome the upstream half records.
    watches: mpsc::UnboundedSender<Watch>,
    /// Requests that end in ReadyForQuery (Query, Sync, FunctionCall) sent
    /// so far: the upstream half counts ReadyForQuery the same way.
    requests_sent: u64,
    /// Executes since the last Sync: which completion is whose.
    executes_since_sync: u32,
    /// Prepared statements by name: those that need approval (held at
    /// Execute), and all of them when the session is recorded.
    statements: HashMap<String, Arc<Need>>,
    /// Portals bound to such statements, with their parameters.
    portals: HashMap<String, approve::HeldPortal>,
    log: Option<&'a SessionLog>,
    /// Durable statement records to wait for before sending upstream.
    acks: Vec<Ack>,
    /// Describes of tracked statements, for the server half to attribute
    /// their ParameterDescription; and what it learnt.
    describes: mpsc::UnboundedSender<(u64, String)>,
    described: Arc<Described>,
    /// A large text analysed off the event loop, for the message after it.
    preanalyzed: Option<(String, Arc<Judgement>)>,
    /// Statement-name changes the server has not confirmed yet.
    ledger: NameLedger,
    /// What the server answered to each request, from the upstream half.
    outcomes: mpsc::UnboundedReceiver<ServerEvent>,
    /// Requests the server has answered completely.
    done: watch::Receiver<u64>,
    /// User code ran in this request (or an earlier one not yet answered):
    /// until its ReadyForQuery, the server may have changed a setting it
    /// only reports then (standard_conforming_strings, client_encoding).
    unsettled_until: Option<u64>,
    /// The server is in copy-in mode: it ignores Sync, so the proxy drops
    /// the client's until CopyDone or CopyFail.
    copy_in: bool,
}

/// Texts above this size are analysed on a blocking thread.
const OFFLOAD_ABOVE: usize = 16 * 1024;

/// Analyses of large texts at once, gateway-wide: each may take tens of MiB
/// at the budget's cap, so memory stays bounded however many clients send
/// them.
static LARGE_ANALYSES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

async fn analyze_off_loop(gate: &Gate, text: &str) -> Arc<crate::policy::Judgement> {
    let settings = gate.settings();
    let owned = text.to_owned();
    let analysis = match LARGE_ANALYSES.acquire().await {
        Ok(_permit) => {
            tokio::task::spawn_blocking(move || crate::policy::analyze::analyze(&owned, settings))
                .await
                .unwrap_or_else(|e| {
                    Err(crate::policy::analyze::AnalyzeError::NotUnderstood(
                        format!("the statement (its analysis failed: {e})"),
                    ))
                })
        }
        // Never closed; judged on the spot if it were.
        Err(_) => crate::policy::analyze::analyze(text, settings),
    };
    gate.judgement_from(analysis)
}

impl Frontend<'_> {
    async fn run<R, W>(mut self, r: &mut R, mut frames: FrameBuf, w: &mut W) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut out = BytesMut::new();
        loop {
            // What the server has answered since (a cheap empty check when
            // nothing is outstanding).
            if let Err(end) = self.poll_outcomes() {
                return end;
            }
            // Handle every whole message buffered, then write once.
            loop {
                let frame = match frames.cut() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        self.metrics.protocol_errors_client.inc();
                        return End::ClientViolation(PgError::protocol_violation(e.to_string()));
                    }
                };
                if matches!(frame.ty, b'Q' | b'P' | b'B' | b'F')
                    && self.live.generation() != self.generation
                {
                    // A new configuration: this statement is judged by it, and
                    // a Bind of a prepared statement still meets revocation
                    // (its verdict was given at Parse).
                    if let Err(err) = self.reconfigure().await {
                        let _ = write(w, &mut out).await;
                        return End::Reconfigured(err);
                    }
                }
                if matches!(frame.ty, b'Q' | b'P') && frame.wire_len > OFFLOAD_ABOVE {
                    // A large text is parsed on a blocking thread: one heavy
                    // statement must not stall every other session.
                    let body = &frames.buffered()[5..frame.wire_len];
                    let text = match frame.ty {
                        b'Q' => codec::query_text(body).ok(),
                        _ => codec::parse(body).ok().map(|p| p.query),
                    };
                    if let Some(text) = text.map(str::to_owned) {
                        let j = analyze_off_loop(&self.policy.gate, &text).await;
                        self.preanalyzed = Some((text, j));
                    }
                }
                if self.copy_in {
                    match frame.ty {
                        // Ignored by the server in copy-in mode: dropped here,
                        // so every Sync sent gets its ReadyForQuery.
                        b'S' => {
                            frames.consume(frame.wire_len);
                            continue;
                        }
                        b'd' | b'H' => {}
                        b'c' | b'f' => self.copy_in = false,
                        _ => {
                            return End::ClientViolation(PgError::protocol_violation(
                                "only CopyData, CopyDone, CopyFail, Flush and Sync may follow COPY FROM STDIN",
                            ))
                        }
                    }
                }
                let bytes = &frames.buffered()[..frame.wire_len];
                if matches!(frame.ty, b'Q' | b'P' | b'B' | b'E' | b'F')
                    && self.expires.is_some_and(|d| Instant::now() >= d)
                {
                    return End::CredentialExpired;
                }
                match self.on_message(frame.ty, bytes, &mut out) {
                    Ok(Flow::Wait(request)) => {
                        // Send what is buffered (it may hold that request's
                        // Sync), then wait for the server's answer to it and
                        // handle this message again.
                        if let Err(e) = write(w, &mut out).await {
                            return End::UpstreamFailed(format!(
                                "writing to the upstream server failed: {e}"
                            ));
                        }
                        if self.done.wait_for(|d| *d > request).await.is_err() {
                            return End::UpstreamClosed;
                        }
                        if let Err(end) = self.poll_outcomes() {
                            return end;
                        }
                        continue;
                    }
                    Ok(Flow::Continue) => {
                        // A refused FunctionCall goes upstream as a Query.
                        self.ledger
                            .sent(if frame.ty == b'F' { b'Q' } else { frame.ty });
                        if matches!(frame.ty, b'Q' | b'S' | b'F') {
                            self.request_sent();
                        }
                        if frame.ty == b'S' {
                            self.executes_since_sync = 0;
                        }
                    }
                    Ok(Flow::Hold(hold)) => {
                        frames.consume(frame.wire_len);
                        if let Err(end) = self.hold(hold, r, &mut frames, w, &mut out).await {
                            return end;
                        }
                        continue;
                    }
                    Ok(Flow::Terminate) => {
                        // Forwarded by `run`'s epilogue after what is buffered.
                        let _ = write(w, &mut out).await;
                        return End::ClientTerminated;
                    }
                    Err(err) => {
                        self.metrics.protocol_errors_client.inc();
                        return End::ClientViolation(err);
                    }
                }
                frames.consume(frame.wire_len);
            }
            let n = out.len();
            if !out.is_empty() {
                self.cancels.settled().await;
            }
            // Durable recording: nothing runs before its record is on disk.
            if !recorded(&mut self.acks).await {
                return End::RecordingFailed;
            }
            if let Err(e) = write(w, &mut out).await {
                return End::UpstreamFailed(format!("writing to the upstream server failed: {e}"));
            }
            self.metrics.bytes_to_upstream.inc_by(n as u64);
            match frames.fill(r).await {
                Ok(true) => {}
                Ok(false) => return End::ClientClosed,
                Err(ReadError::Io(e)) => return End::ClientIo(e),
                Err(e) => {
                    self.metrics.protocol_errors_client.inc();
                    return End::ClientViolation(PgError::protocol_violation(e.to_string()));
                }
            }
        }
    }

    fn on_message(&mut self, ty: u8, bytes: &[u8], out: &mut BytesMut) -> Result<Flow, PgError> {
        let body = &bytes[5..];
        let violation = |what: &str, e: codec::DecodeError| {
            PgError::protocol_violation(format!("invalid {what} message: {e}"))
        };
        match ty {
            b'Q' => {
                let sql = codec::query_text(body).map_err(|e| violation("Query", e))?;
                self.metrics.statements_simple.inc();
                let (judged, rule, j) = match self.judge(sql) {
                    Judging::Done(judged, rule, j) => (judged, rule, j),
                    Judging::Wait(request) => return Ok(Flow::Wait(request)),
                };
                match judged {
                    Judged::Allow(ctx) => {
                        if let Some(m) = &mut self.mask {
                            m.query(ctx);
                        }
                        self.forwarded(&j, false);
                        self.record_allowed(sql, Vec::new(), rule, WatchKind::Query, None);
                        out.extend_from_slice(bytes)
                    }
                    Judged::Hold(reason, ctx) => {
                        let sensitive = ctx.is_some();
                        return Ok(Flow::Hold(Hold {
                            kind: HoldKind::Query { ctx, judgement: j },
                            bytes: bytes.to_vec(),
                            need: Arc::new(Need {
                                sql: sql.to_owned(),
                                reason: Some(reason),
                                sensitive,
                                param_types: Vec::new(),
                                rule: rule.clone(),
                            }),
                            params: Vec::new(),
                            types: Vec::new(),
                            rule,
                            columns: None,
                        }));
                    }
                    Judged::Refuse(err) => {
                        if let Some(m) = &mut self.mask {
                            m.query(None);
                        }
                        self.record_refused(sql, Vec::new(), rule, &err, None);
                        self.refuse_query(err, out)
                    }
                }
            }
            b'P' => {
                let parse = codec::parse(body).map_err(|e| violation("Parse", e))?;
                let (judged, rule) = match self.judge(parse.query) {
                    Judging::Done(judged, rule, j) => (protocol_text(judged, &j), rule),
                    Judging::Wait(request) => return Ok(Flow::Wait(request)),
                };
                // Whatever the verdict, the server is asked to (re)define
                // the name: the answer says whether it did.
                self.ledger.parse_sent(parse.statement);
                match judged {
                    Judged::Allow(ctx) => {
                        // Named statements share PREPARE's namespace: a later
                        // SQL `EXECUTE name` runs this judged text.
                        self.session.prepared(parse.statement);
                        if self.log.is_some() {
                            self.statements.insert(
                                parse.statement.to_owned(),
                                Arc::new(Need {
                                    sql: parse.query.to_owned(),
                                    reason: None,
                                    sensitive: ctx.is_some(),
                                    param_types: parse.param_types.clone(),
                                    rule,
                                }),
                            );
                        } else {
                            self.statements.remove(parse.statement);
                        }
                        if let Some(m) = &mut self.mask {
                            m.parsed(parse.statement, ctx);
                        }
                        out.extend_from_slice(bytes);
                    }
                    Judged::Hold(reason, ctx) => {
                        // Preparing runs nothing: the hold comes at Execute,
                        // when the parameters are known. Not added to the
                        // session's prepared names, so SQL `EXECUTE name`
                        // cannot run it around the approval.
                        self.statements.insert(
                            parse.statement.to_owned(),
                            Arc::new(Need {
                                sql: parse.query.to_owned(),
                                reason: Some(reason),
                                sensitive: ctx.is_some(),
                                param_types: parse.param_types.clone(),
                                rule,
                            }),
                        );
                        if let Some(m) = &mut self.mask {
                            m.parsed(parse.statement, ctx);
                        }
                        out.extend_from_slice(bytes);
                    }
                    Judged::Refuse(err) => {
                        self.statements.remove(parse.statement);
                        if let Some(m) = &mut self.mask {
                            m.refused_parse(parse.statement);
                        }
                        self.record_refused(parse.query, Vec::new(), rule, &err, None);
                        self.refuse_parse(parse.statement, err, out)
                    }
                }
            }
            b'B' if self.mask.is_some()
                || self.log.is_some()
                || !self.statements.is_empty()
                || !self.portals.is_empty()
                || !self.ledger.is_quiet() =>
            {
                let (portal, statement) =
                    codec::bind_names(body).map_err(|e| violation("Bind", e))?;
                if let Some(request) = self.ledger.wait_for(statement) {
                    return Ok(Flow::Wait(request));
                }
                if self.ledger.is_unknown(statement) {
                    self.portals.remove(portal);
                    let err = PgError::denied(format!(
                        "prepared statement \"{statement}\" is in an unknown state: the server refused its last Parse or Close; Close it and Parse it again"
                    ));
                    let name = format!("pgwarden_held_{}", self.nonce);
                    self.refuse_parse(&name, err, out);
                    return Ok(Flow::Continue);
                }
                let need = match self.statements.get(statement) {
                    Some(need) => Some(need.clone()),
                    // Prepared by SQL PREPARE: its text was recorded then.
                    None if self.log.is_some() => Some(Arc::new(Need {
                        sql: format!(
                            "-- execute statement \"{statement}\" (prepared with SQL PREPARE)"
                        ),
                        reason: None,
                        sensitive: true,
                        param_types: Vec::new(),
                        rule: None,
                    })),
                    None => None,
                };
                match need {
                    Some(need) => {
                        let bind = codec::bind_params(body).map_err(|e| violation("Bind", e))?;
                        let types =
                            self.described
                                .fill(statement, &need.param_types, bind.params.len());
                        let held = approve::HeldPortal::new(need, &bind, types);
                        self.portals.insert(portal.to_owned(), held);
                    }
                    None => {
                        self.portals.remove(portal);
                    }
                }
                out.extend_from_slice(bytes);
                if self
                    .mask
                    .as_mut()
                    .is_some_and(|m| m.bind(portal, statement))
                {
                    codec::put_describe_portal(portal, out);
                }
            }
            b'D' => {
                if self.mask.is_some() || !self.statements.is_empty() {
                    let (kind, name) =
                        codec::describe(body).map_err(|e| violation("Describe", e))?;
                    if kind == b'S' && self.statements.contains_key(name) {
                        let _ = self.describes.send((self.requests_sent, name.to_owned()));
                    }
                    if let Some(m) = &mut self.mask {
                        m.describe();
                    }
                }
                out.extend_from_slice(bytes);
            }
            b'E' => {
                self.metrics.statements_extended.inc();
                if self.mask.is_some() || !self.portals.is_empty() {
                    let portal =
                        codec::execute_portal(body).map_err(|e| violation("Execute", e))?;
                    let needs_approval = self
                        .portals
                        .get(portal)
                        .is_some_and(|p| p.need.reason.is_some());
                    if needs_approval {
                        if let Some(held) = self.portals.remove(portal) {
                            let columns = self
                                .described
                                .columns(&held.statement, &held.result_formats);
                            return Ok(Flow::Hold(Hold {
                                columns,
                                kind: HoldKind::Execute {
                                    portal: portal.to_owned(),
                                },
                                bytes: bytes.to_vec(),
                                rule: held.need.rule.clone(),
                                need: held.need,
                                params: held.params,
                                types: held.types,
                            }));
                        }
                    }
                    if let Some(m) = &mut self.mask {
                        m.execute(portal);
                    }
                    if self.log.is_some() {
                        // Recorded at each Execute (a portal run again to
                        // fetch more rows is recorded again).
                        let facts = self.portals.get(portal).map(|p| {
                            let params = p.rendered_params();
                            let columns = self.described.columns(&p.statement, &p.result_formats);
                            (p.need.sql.clone(), params, p.need.rule.clone(), columns)
                        });
                        let (sql, params, rule, columns) = facts.unwrap_or_else(|| {
                            (
                                format!("-- execute portal \"{portal}\""),
                                Vec::new(),
                                None,
                                None,
                            )
                        });
                        let k = self.executes_since_sync;
                        self.record_allowed(&sql, params, rule, WatchKind::Execute(k), columns);
                    }
                }
                self.executes_since_sync += 1;
                out.extend_from_slice(bytes);
            }
            b'S' => {
                if let Some(m) = &mut self.mask {
                    m.sync();
                }
                out.extend_from_slice(bytes);
            }
            // Built-in deny: FunctionCall calls a function by OID with no SQL
            // text for the policy to inspect.
            b'F' => {
                let err = PgError::denied(
                    "the FunctionCall protocol message is not allowed (built-in rule)",
                );
                if let Some(m) = &mut self.mask {
                    m.query(None);
                }
                self.refuse_query(err, out);
            }
            b'C' => {
                let (kind, name) = codec::close(body).map_err(|e| violation("Close", e))?;
                if kind == b'P' {
                    self.portals.remove(name);
                    self.ledger.close_portal_sent();
                }
                if kind == b'S' {
                    self.ledger.close_sent(name);
                    self.session.closed(name);
                    self.statements.remove(name);
                    self.described.forget(name);
                    if let Some(m) = &mut self.mask {
                        m.closed_statement(name);
                    }
                }
                out.extend_from_slice(bytes);
            }
            b'X' => return Ok(Flow::Terminate),
            b'p' => {
                return Err(PgError::protocol_violation(
                    "unexpected password message after authentication",
                ))
            }
            // Bind, Flush, CopyData/Done/Fail: the statement they refer to
            // was judged at Parse or Query.
            _ => out.extend_from_slice(bytes),
        }
        Ok(Flow::Continue)
    }

    /// Judge a query text and, under a masking policy, decide how its
    /// results are masked (or refuse what masking cannot make safe). Waits
    /// first when it executes a name whose last change is not yet confirmed.
    fn judge(&mut self, sql: &str) -> Judging {
        let j = match self.preanalyzed.take() {
            Some((text, j)) if text == sql => j,
            _ => self.policy.gate.evaluate(sql),
        };
        if matches!(
            j.outcome,
            Err(crate::policy::analyze::AnalyzeError::TooLarge(_))
        ) {
            self.metrics.statements_too_large.inc();
        }
        if self.unsettled() && reads_differently_under_other_settings(sql) {
            let err = PgError::denied(
                "denied: this text contains a backslash or a non-ASCII character, which the server could read differently if user code run earlier in this pipeline changed standard_conforming_strings or client_encoding; send it after that request's result",
            );
            return Judging::Done(Judged::Refuse(err), None, j);
        }
        let calls_code = self.policy.gate.calls_user_code(&j)
            || j.statements
                .iter()
                .any(|s| s.class == pgwarden_api::StatementClass::Code);
        for s in &j.statements {
            match &s.effect {
                Some(Effect::Execute(n)) => {
                    if let Some(request) = self.ledger.wait_for(n) {
                        // Judged again after the wait: keep a large text's analysis.
                        self.preanalyzed = Some((sql.to_owned(), j.clone()));
                        return Judging::Wait(request);
                    }
                }
                // Protocol portals and SQL cursors share one namespace: a
                // FETCH of a portal bound to a held statement would run it
                // around the hold.
                Some(Effect::Fetch(n))
                    if self.portals.get(n).is_some_and(|p| p.need.reason.is_some()) =>
                {
                    let err = PgError::denied(format!(
                        "denied: FETCH or MOVE on portal \"{n}\" would run a statement that needs approval; Execute the portal to ask for it"
                    ));
                    return Judging::Done(Judged::Refuse(err), None, j);
                }
                _ => {}
            }
        }
        // The deciding rule is for the recording only; it comes from the
        // same decision in this session (user code, EXECUTE) as the verdict.
        let (verdict, rule) =
            self.policy
                .gate
                .judge_judged_with_rule(&j, &self.session, self.log.is_some());
        let hold = match verdict {
            Verdict::Refuse(err) => return Judging::Done(Judged::Refuse(err), rule, j),
            Verdict::Allow => None,
            Verdict::RequireApproval(reason) => Some(reason),
        };
        let ctx = match &self.mask {
            None => None,
            Some(m) => match m.context(&self.policy.gate, &j) {
                Ok(ctx) => ctx,
                // Refused outright: never put in front of a reviewer.
                Err(r) => {
                    let err = PgError::denied(format!("masking: {}", r.0));
                    return Judging::Done(Judged::Refuse(err), rule, j);
                }
            },
        };
        let judged = match hold {
            None => Judged::Allow(ctx),
            Some(reason) if self.approvals.is_none() => Judged::Refuse(messages::no_store(&reason)),
            Some(reason) => Judged::Hold(reason, ctx),
        };
        if calls_code && !matches!(judged, Judged::Refuse(_)) {
            // Settled by this request's ReadyForQuery (and the
            // ParameterStatus messages the server sends before it).
            self.unsettled_until = Some(self.requests_sent);
        }
        Judging::Done(judged, rule, j)
    }

    /// Whether user code forwarded earlier may still be changing settings.
    fn unsettled(&mut self) -> bool {
        match self.unsettled_until {
            Some(request) if *self.done.borrow() > request => {
                self.unsettled_until = None;
                false
            }
            Some(_) => true,
            None => false,
        }
    }

    /// Move to the configuration now in force, before the next statement:
    /// the same database's policy, if it still admits this login. Rules,
    /// approvals and user-code knowledge carry over; a changed upstream or
    /// masking cannot be switched under an open connection.
    async fn reconfigure(&mut self) -> Result<(), PgError> {
        let generation = self.live.generation();
        let Some(config) = self.live.current() else {
            return Err(PgError::access_revoked("the gateway has no configuration"));
        };
        let database = self.policy.upstream.database.clone();
        let Some(next) = config.for_database(&database).cloned() else {
            return Err(PgError::access_revoked(format!(
                "no policy serves database \"{database}\" any more"
            )));
        };
        if !Arc::ptr_eq(&next, &self.policy) {
            if let Err(why) = self.login.admitted_by(&next).await {
                return Err(PgError::access_revoked(format!(
                    "policy {} no longer admits {}: {why}",
                    next.id, self.login.identity.subject
                )));
            }
            if next.session_terms != self.policy.session_terms {
                return Err(PgError::reconnect(format!(
                    "policy {} changed its database connection or masking",
                    next.id
                )));
            }
            // What this session's database taught the old policy about user
            // code holds for the new one.
            let (functions, operators) = self.policy.gate.user_code_names();
            next.gate.learn_user_code(functions, operators);
            tracing::info!(policy.name = %next.id, "session moved to the new configuration");
            self.approvals = next.approvals.clone();
            self.policy = next;
        }
        self.generation = generation;
        Ok(())
    }

    /// A judged simple Query goes upstream: its effects on the session's
    /// names apply now, each to be confirmed by the server.
    fn forwarded(&mut self, j: &Judgement, approved: bool) {
        self.policy.gate.apply(j, &mut self.session, approved);
        for (i, s) in j.statements.iter().enumerate() {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            match &s.effect {
                Some(Effect::Prepare(n)) | Some(Effect::Deallocate(Some(n))) => {
                    self.ledger.command_sent(index, Some(n))
                }
                Some(Effect::Deallocate(None)) => self.ledger.command_sent(index, None),
                _ => {}
            }
        }
    }

    /// Take in what the server answered: names whose change it refused are
    /// forgotten (and refused until prepared or closed again); a COPY FROM
    /// STDIN renumbers the requests the server saw. Err: the session ends.
    fn poll_outcomes(&mut self) -> Result<(), End> {
        while let Ok(event) = self.outcomes.try_recv() {
            let o = match event {
                ServerEvent::Answered(o) => o,
                ServerEvent::CopyIn { request, executes } => {
                    match self.ledger.copy_started(request, executes) {
                        Ok(c) => {
                            if let Some(m) = &mut self.mask {
                                m.ignored_syncs(c.ignored);
                            }
                            self.requests_sent -= c.ignored;
                            self.clock
                                .requests_ignored(u32::try_from(c.ignored).unwrap_or(u32::MAX));
                            self.copy_in = c.in_copy;
                        }
                        Err(why) => {
                            return Err(End::ClientViolation(PgError::protocol_violation(why)))
                        }
                    }
                    continue;
                }
                ServerEvent::CopyAborted => {
                    self.copy_in = false;
                    continue;
                }
            };
            self.ledger.answered_before(o.request + 1);
            for failed in self.ledger.resolve(o) {
                match failed {
                    Failed::Name(n) => {
                        tracing::debug!(statement = %n, "the server refused a change to a statement name");
                        self.session.closed(&n);
                        self.statements.remove(&n);
                        self.described.forget(&n);
                        if let Some(m) = &mut self.mask {
                            m.closed_statement(&n);
                        }
                    }
                    Failed::All => {
                        self.session.closed_all();
                        self.statements.clear();
                        if let Some(m) = &mut self.mask {
                            m.closed_all();
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Record a statement that goes upstream, and watch for its answer.
    fn record_allowed(
        &mut self,
        sql: &str,
        parameters: Vec<Option<String>>,
        rule: Option<String>,
        kind: WatchKind,
        columns: Option<Arc<Vec<codec::Column>>>,
    ) {
        let Some(log) = self.log else { return };
        let (n, ack) = log.statement(StatementFacts {
            text: sql,
            parameters,
            verdict: RecordedVerdict::Allow,
            rule,
            reason: None,
            approval: None,
            approved_by: None,
        });
        self.acks.extend(ack);
        let _ = self.watches.send(Watch {
            window: self.requests_sent,
            kind,
            approval: None,
            record: Some(n),
            started: Instant::now(),
            columns,
        });
    }

    /// Record a statement that does not run (its error is the reason).
    fn record_refused(
        &mut self,
        sql: &str,
        parameters: Vec<Option<String>>,
        rule: Option<String>,
        err: &PgError,
        approval: Option<String>,
    ) {
        let Some(log) = self.log else { return };
        // As in the log line: a parser message can quote the statement.
        let reason = if err.code == SqlState::SyntaxError {
            "statement cannot be parsed".to_owned()
        } else {
            err.message
                .strip_prefix("pgwarden: ")
                .unwrap_or(&err.message)
                .to_owned()
        };
        let (_, ack) = log.statement(StatementFacts {
            text: sql,
            parameters,
            verdict: if approval.is_some() {
                RecordedVerdict::Held
            } else {
                RecordedVerdict::Deny
            },
            rule,
            reason: Some(reason),
            approval,
            approved_by: None,
        });
        self.acks.extend(ack);
    }

    fn request_sent(&mut self) {
        self.ledger.request_sent();
        self.requests_sent += 1;
        self.clock.request_sent();
    }

    /// Hold a statement that needs approval: open (or find) its request,
    /// wait for a decision when the policy says so, then release it upstream
    /// or refuse it. Messages the client pipelined after it stay buffered.
    async fn hold<R, W>(
        &mut self,
        hold: Hold,
        r: &mut R,
        frames: &mut FrameBuf,
        w: &mut W,
        out: &mut BytesMut,
    ) -> Result<(), End>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let Some(approvals_arc) = self.approvals.clone() else {
            // judge() holds only with an approval store.
            let reason = hold.need.reason.clone().unwrap_or_default();
            self.refuse_held(hold, messages::no_store(&reason), None, out);
            return Ok(());
        };
        let approvals = &*approvals_arc;
        // What came before the held message goes upstream now.
        self.cancels.settled().await;
        if !recorded(&mut self.acks).await {
            return Err(End::RecordingFailed);
        }
        if let Err(e) = write(w, out).await {
            return Err(End::UpstreamFailed(format!(
                "writing to the upstream server failed: {e}"
            )));
        }
        let params = hold.param_refs();
        let opened = approvals
            .open(crate::approval::Ask {
                subject: self.subject,
                statement: &hold.need.sql,
                params: &params,
                sensitive: hold.need.sensitive,
                reason: hold.need.reason.as_deref().unwrap_or_default(),
            })
            .await;
        use crate::approval::Opened;
        let decided = match opened {
            Err(e) => {
                tracing::warn!(error = %e, "approval store failed; statement refused");
                Err((messages::store_failed(&e), None))
            }
            Ok(Opened::Released(req)) => Ok(req),
            Ok(Opened::Denied(req)) => Err((messages::denied(&req), Some(req))),
            Ok(Opened::Pending(req)) if approvals.wait.is_zero() => {
                tracing::info!(request = %crate::approval::request::id(&req), "statement needs approval (fail fast)");
                Err((messages::pending(approvals, &req), Some(req)))
            }
            Ok(Opened::Pending(req)) => self.wait_for(approvals, req, r, frames).await?,
        };
        let decided = decided.map_err(|(err, req)| {
            (
                err,
                req.map(|r| crate::approval::request::id(&r).to_owned()),
            )
        });
        match decided {
            Ok(req) => self.release(hold, &req, out),
            Err((err, id)) => self.refuse_held(hold, err, id, out),
        }
        Ok(())
    }

    /// Wait for a reviewer: poll the request, and meanwhile watch for the
    /// client cancelling or leaving, the token expiring, and shutdown.
    async fn wait_for<R: AsyncRead + Unpin>(
        &mut self,
        approvals: &Approvals,
        req: pgwarden_api::ApprovalRequest,
        r: &mut R,
        frames: &mut FrameBuf,
    ) -> Result<
        Result<pgwarden_api::ApprovalRequest, (PgError, Option<pgwarden_api::ApprovalRequest>)>,
        End,
    > {
        use crate::approval::{request, Waited};
        let id = request::id(&req).to_owned();
        tracing::info!(request = %id, "statement held for approval");
        let mut notice = BytesMut::new();
        codec::put_notice(&messages::waiting(approvals, &req), &mut notice);
        let _ = self.notices.send(notice);
        let deadline = tokio::time::Instant::now() + approvals.wait;
        let expires = self.expires;
        loop {
            // The client may pipeline more; keep reading (bounded) so that a
            // client that goes away is noticed.
            let may_read = frames.buffered().len() < approve::MAX_BUFFERED_WHILE_HELD;
            tokio::select! {
                // Only looks: the claim is made below, outside the select.
                _ = approvals.decided(&id) => {}
                _ = tokio::time::sleep_until(deadline) => {}
                _ = self.interrupt.notified() => {
                    tracing::info!(request = %id, "wait for approval cancelled by the client");
                    return Ok(Err((messages::cancelled(&req), Some(req))));
                }
                _ = self.shutdown.wait_for(|down| *down) => return Err(End::Shutdown),
                _ = approve::sleep_until(expires) => return Err(End::CredentialExpired),
                read = frames.fill(r), if may_read => match read {
                    Ok(true) => {}
                    Ok(false) => return Err(End::ClientClosed),
                    Err(ReadError::Io(e)) => return Err(End::ClientIo(e)),
                    Err(e) => return Err(End::ClientViolation(PgError::protocol_violation(e.to_string()))),
                },
            }
            // Never inside the select: a check may claim the approval, and a
            // claimed approval must not be dropped half-way.
            match approvals.check(&id).await {
                Ok(Waited::Released(req)) => return Ok(Ok(req)),
                Ok(Waited::Denied(req)) => return Ok(Err((messages::denied(&req), Some(req)))),
                Ok(Waited::Expired(req)) => return Ok(Err((messages::expired(&req), Some(req)))),
                Ok(Waited::UsedElsewhere(req)) => {
                    return Ok(Err((messages::used_elsewhere(&req), Some(req))))
                }
                Ok(Waited::Pending) if tokio::time::Instant::now() >= deadline => {
                    return Ok(Err((messages::timed_out(approvals, &req), Some(req))))
                }
                Ok(Waited::Pending) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "approval store failed while waiting");
                    return Ok(Err((messages::store_failed(&e), Some(req))));
                }
            }
        }
    }

    /// Send an approved statement upstream; its outcome is recorded on the
    /// request (and in the session's recording) once the server answers.
    fn release(&mut self, hold: Hold, req: &pgwarden_api::ApprovalRequest, out: &mut BytesMut) {
        let id = crate::approval::request::id(req).to_owned();
        tracing::info!(request = %id, "approved statement released");
        let kind = match &hold.kind {
            HoldKind::Query { ctx, judgement } => {
                if let Some(m) = &mut self.mask {
                    m.query(ctx.clone());
                }
                self.forwarded(judgement, true);
                WatchKind::Query
            }
            HoldKind::Execute { portal } => {
                if let Some(m) = &mut self.mask {
                    m.execute(portal);
                }
                WatchKind::Execute(self.executes_since_sync)
            }
        };
        let record = self.log.map(|log| {
            let (n, ack) = log.statement(StatementFacts {
                text: &hold.need.sql,
                parameters: hold.rendered_params(),
                verdict: RecordedVerdict::Approved,
                rule: hold.rule.clone(),
                reason: hold.need.reason.clone(),
                approval: Some(id.clone()),
                approved_by: req
                    .spec
                    .decision
                    .as_ref()
                    .and_then(|d| d.decided_by.clone()),
            });
            self.acks.extend(ack);
            n
        });
        // Sent before the bytes go upstream, so the upstream half has it
        // when the answer comes.
        let _ = self.watches.send(Watch {
            window: self.requests_sent,
            kind,
            approval: Some(id),
            record,
            started: Instant::now(),
            columns: hold.columns.clone(),
        });
        out.extend_from_slice(&hold.bytes);
        self.ledger
            .sent(hold.bytes.first().copied().unwrap_or(b'Q'));
        self.after_held(kind);
    }

    fn refuse_held(&mut self, hold: Hold, err: PgError, id: Option<String>, out: &mut BytesMut) {
        let params = hold.rendered_params();
        self.record_refused(&hold.need.sql, params, hold.rule.clone(), &err, id);
        let kind = match hold.kind {
            HoldKind::Query { .. } => {
                if let Some(m) = &mut self.mask {
                    m.query(None);
                }
                self.refuse_query(err, out);
                WatchKind::Query
            }
            HoldKind::Execute { portal } => {
                if let Some(m) = &mut self.mask {
                    m.execute(&portal);
                }
                // A Parse of the sentinel under a name of our own: its error
                // takes the Execute's place and skips the rest to Sync, as a
                // failed Execute would.
                let name = format!("pgwarden_held_{}", self.nonce);
                self.refuse_parse(&name, err, out);
                WatchKind::Execute(0)
            }
        };
        self.ledger.sent(match kind {
            WatchKind::Query => b'Q',
            WatchKind::Execute(_) => b'P',
        });
        self.after_held(kind);
    }

    fn after_held(&mut self, kind: WatchKind) {
        match kind {
            WatchKind::Query => self.request_sent(),
            WatchKind::Execute(_) => self.executes_since_sync += 1,
        }
    }

    fn sentinel(&mut self, err: PgError) -> String {
        self.metrics.statements_refused.inc();
        // The reason names rules, classes and objects, never values; a parser
        // message can quote the statement, so parse failures are not echoed.
        let reason = if err.code == SqlState::SyntaxError {
            "statement cannot be parsed"
        } else {
            err.message.as_str()
        };
        tracing::info!(sqlstate = err.code.code(), reason, "statement refused");
        let seq = self.next_seq;
        self.next_seq += 1;
        // Sent before the sentinel's bytes go out, so the upstream half always
        // finds it. A closed channel means that half is gone; nothing to do.
        let _ = self.refusals.send(Pending { seq, error: err });
        sentinel_text(self.nonce, seq)
    }

    fn refuse_query(&mut self, err: PgError, out: &mut BytesMut) {
        let text = self.sentinel(err);
        codec::put_query(&text, out);
    }

    fn refuse_parse(&mut self, statement: &str, err: PgError, out: &mut BytesMut) {
        let text = self.sentinel(err);
        // Same statement name, so a later Bind to it fails as it should.
        let len = 4 + statement.len() + 1 + text.len() + 1 + 2;
        out.put_u8(b'P');
        out.put_i32(len as i32);
        out.put_slice(statement.as_bytes());
        out.put_u8(0);
        out.put_slice(text.as_bytes());
        out.put_u8(0);
        out.put_i16(0);
    }
}

enum Flow {
    Continue,
    /// The message uses a name changed by this earlier request: wait for
    /// the server's answer to it, then handle the message again.
    Wait(u64),
    Terminate,
    /// The statement needs approval: `Frontend::hold` takes it from here.
    Hold(Hold),
}

/// Texts PostgreSQL could lex differently with standard_conforming_strings
/// off (a backslash in '...') or another client_encoding (bytes beyond
/// ASCII): the only texts a setting changed by user code can change.
fn reads_differently_under_other_settings(sql: &str) -> bool {
    sql.bytes().any(|b| b == b'\\' || b >= 0x80)
}

/// The outcome of judging a text, or the request to wait for first.
enum Judging {
    Done(Judged, Option<String>, Arc<Judgement>),
    Wait(u64),
}

/// Text sent with the protocol's Parse must not itself prepare or execute
/// SQL-level prepared statements: their effect would come at Execute, where
/// the proxy could not tie the server's answer to it.
fn protocol_text(judged: Judged, j: &Judgement) -> Judged {
    let nested = j
        .statements
        .iter()
        .any(|s| matches!(s.effect, Some(Effect::Prepare(_) | Effect::Execute(_))));
    if nested && !matches!(judged, Judged::Refuse(_)) {
        return Judged::Refuse(PgError::denied(
            "denied: PREPARE and EXECUTE must be sent as a simple Query through pgwarden (use the protocol's own Parse and Bind instead)",
        ));
    }
    judged
}

/// A judged statement text.
enum Judged {
    Allow(plan::MaskCtx),
    /// Needs approval (the reason), with its masking context.
    Hold(String, plan::MaskCtx),
    Refuse(PgError),
}

/// A bare identifier is never a valid statement, so the server always answers
/// it with a syntax error that quotes it. Kept under 63 bytes so it is not
/// truncated as an identifier.
fn sentinel_text(nonce: &str, seq: u64) -> String {
    let mut s = String::with_capacity(56);
    let _ = write!(s, "pgwarden_refused_{nonce}_{seq}");
    s
}

/// Find our sentinel's sequence number in a server error message.
fn sentinel_seq(message: &str, nonce: &str) -> Option<u64> {
    let marker = format!("pgwarden_refused_{nonce}_");
    let at = message.find(&marker)? + marker.len();
    let digits: String = message[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
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

// === upstream → client ===

struct Backend<'a> {
    metrics: &'a Metrics,
    nonce: &'a str,
    refusals: mpsc::UnboundedReceiver<Pending>,
    pending: VecDeque<Pending>,
    status: TxStatus,
    mask: Option<BackMask>,
    limiter: Option<RowLimiter>,
    clock: &'a StatementClock,
    cancel: &'a Option<(Arc<UpstreamTarget>, BackendKey)>,
    cancels: &'a Arc<CancelInFlight>,
    /// NoticeResponses from the client half (a statement waiting for approval).
    notices: mpsc::UnboundedReceiver<BytesMut>,
    /// Records the outcome of approved statements.
    watcher: Watcher<'a>,
    /// Durable result records to wait for before the client sees more.
    acks: Vec<Ack>,
    settings: super::server_settings::ServerSettings,
    /// What the server answered to each request, for the client half's
    /// ledger of statement names.
    outcomes: mpsc::UnboundedSender<ServerEvent>,
    done: watch::Sender<u64>,
    /// The request being answered.
    answered: RequestOutcome,
    /// Between CopyInResponse and the copy's end.
    copy_in: bool,
}

/// Why the server half stops.
enum BackendStop {
    Failed(String),
    Setting(PgError),
}

impl From<String> for BackendStop {
    fn from(why: String) -> Self {
        BackendStop::Failed(why)
    }
}

impl Backend<'_> {
    async fn run<R, W>(mut self, r: &mut R, mut frames: FrameBuf, w: &mut W) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut out = BytesMut::new();
        loop {
            loop {
                let frame = match frames.cut() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        self.metrics.protocol_errors_upstream.inc();
                        return End::UpstreamFailed(format!(
                            "invalid message from the upstream server: {e}"
                        ));
                    }
                };
                let bytes = &frames.buffered()[..frame.wire_len];
                match self.on_message(frame.ty, bytes, &mut out) {
                    Ok(()) => {}
                    Err(BackendStop::Failed(why)) => {
                        self.metrics.protocol_errors_upstream.inc();
                        return End::UpstreamFailed(why);
                    }
                    Err(BackendStop::Setting(err)) => {
                        // What came before the change still reaches the client.
                        let _ = write(w, &mut out).await;
                        return End::ServerSettingChanged(err);
                    }
                }
                frames.consume(frame.wire_len);
            }
            let n = out.len();
            // Durable recording: a result completes only once its record is
            // on disk.
            if !recorded(&mut self.acks).await {
                return End::RecordingFailed;
            }
            if let Err(e) = write(w, &mut out).await {
                return End::ClientIo(e);
            }
            self.metrics.bytes_to_client.inc_by(n as u64);
            let filled = tokio::select! {
                filled = frames.fill(r) => filled,
                Some(mut notice) = self.notices.recv() => {
                    // Between whole messages: a notice may come at any time.
                    if let Err(e) = write(w, &mut notice).await {
                        return End::ClientIo(e);
                    }
                    continue;
                }
            };
            match filled {
                Ok(true) => {}
                Ok(false) => return End::UpstreamClosed,
                Err(ReadError::Io(e)) => {
                    return End::UpstreamFailed(format!("upstream connection failed: {e}"))
                }
                Err(e) => {
                    self.metrics.protocol_errors_upstream.inc();
                    return End::UpstreamFailed(format!(
                        "invalid message from the upstream server: {e}"
                    ));
                }
            }
        }
    }

    fn on_message(&mut self, ty: u8, bytes: &[u8], out: &mut BytesMut) -> Result<(), BackendStop> {
        let body = &bytes[5..];
        match ty {
            b'1' => self.answered.parses += 1,
            b'3' => self.answered.closes += 1,
            b'C' => {
                self.answered.commands += 1;
                self.answered.executes += 1;
                self.copy_in = false;
            }
            b's' | b'I' => self.answered.executes += 1,
            b'G' => {
                self.copy_in = true;
                let _ = self.outcomes.send(ServerEvent::CopyIn {
                    request: self.answered.request,
                    executes: self.answered.executes,
                });
            }
            b'E' if self.copy_in => {
                self.copy_in = false;
                let _ = self.outcomes.send(ServerEvent::CopyAborted);
            }
            b'Z' => {
                self.copy_in = false;
                let next = self.answered.request + 1;
                let o = std::mem::replace(
                    &mut self.answered,
                    RequestOutcome {
                        request: next,
                        ..RequestOutcome::default()
                    },
                );
                // The client half may be gone; nothing to tell then.
                let _ = self.outcomes.send(ServerEvent::Answered(o));
                self.done.send_replace(next);
            }
            _ => {}
        }
        if ty == b'S' {
            let (name, value) = codec::parameter_status(body).map_err(|e| e.to_string())?;
            self.settings
                .on_change(name, value)
                .map_err(BackendStop::Setting)?;
        }
        // Masking bookkeeping sees every message, before a limit may drop one.
        let disposition = match &mut self.mask {
            Some(m) => m.on_message(ty, body)?,
            None => Disposition::Pass,
        };
        if matches!(ty, b'C' | b'I' | b's' | b'E' | b'Z') {
            self.watcher
                .on_message(ty, body, disposition == Disposition::Scrub, &mut self.acks);
        }
        if disposition == Disposition::Swallow {
            return Ok(());
        }
        if let Some(limiter) = &mut self.limiter {
            match limiter.on_message(ty) {
                RowAction::Forward => {}
                RowAction::Drop => return Ok(()),
                RowAction::DropAndCancel => {
                    self.cancels.start(self.cancel);
                    return Ok(());
                }
                RowAction::ReplaceWithError => {
                    codec::put_error(&limiter.error(), out);
                    return Ok(());
                }
            }
        }
        match ty {
            b'E' => {
                while let Ok(p) = self.refusals.try_recv() {
                    self.pending.push_back(p);
                    if self.pending.len() > MAX_PENDING {
                        self.pending.pop_front();
                    }
                }
                if !self.pending.is_empty() {
                    if let Some(err) = self.match_refusal(body)? {
                        codec::put_error(&err, out);
                        return Ok(());
                    }
                }
                if disposition == Disposition::Scrub {
                    plan::scrub(false, body, out)?;
                } else {
                    out.extend_from_slice(bytes);
                }
            }
            b'N' if disposition == Disposition::Scrub => plan::scrub(true, body, out)?,
            b'Z' => {
                self.clock.request_done();
                self.status = codec::ready_for_query(body).map_err(|e| e.to_string())?;
                out.extend_from_slice(bytes);
            }
            // Results: the masking stage decides what leaves the proxy.
            b'D' => {
                let at = out.len();
                match (&self.mask, &disposition) {
                    (Some(m), Disposition::QueryRow | Disposition::PortalRow(_)) => {
                        m.mask_row(&disposition, bytes, out)?
                    }
                    _ => out.extend_from_slice(bytes),
                }
                if self.watcher.records_results() && out.len() >= at + 5 {
                    // The row as the client gets it: after masking.
                    self.watcher.on_result(b'D', &out[at + 5..]);
                }
            }
            b'T' | b'n' => {
                self.watcher.on_row_description(ty, body);
                out.extend_from_slice(bytes);
            }
            b't' => {
                self.watcher.on_parameter_description(body);
                out.extend_from_slice(bytes);
            }
            _ => out.extend_from_slice(bytes),
        }
        Ok(())
    }

    /// If this error answers one of our sentinels, the refusal to send instead.
    fn match_refusal(&mut self, body: &[u8]) -> Result<Option<PgError>, String> {
        let fields = codec::notice_fields(body).map_err(|e| e.to_string())?;
        let Some(seq) = fields
            .iter()
            .filter(|(code, _)| *code == b'M')
            .find_map(|(_, m)| sentinel_seq(m, self.nonce))
        else {
            return Ok(None);
        };
        // Earlier sentinels were discarded by the server (it was skipping to
        // Sync after an earlier error); their clients already got that error.
        while let Some(p) = self.pending.pop_front() {
            if p.seq == seq {
                return Ok(Some(p.error));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_is_short_and_found_in_a_syntax_error() {
        let nonce = "0123456789abcdef";
        let s = sentinel_text(nonce, u64::MAX);
        assert!(s.len() < 63, "{} bytes", s.len());
        let msg = format!("syntax error at or near \"{s}\"");
        assert_eq!(sentinel_seq(&msg, nonce), Some(u64::MAX));
        assert_eq!(sentinel_seq(&msg, "fedcba9876543210"), None);
        assert_eq!(
            sentinel_seq("syntax error at or near \"pgwarden_refused_\"", nonce),
            None
        );
    }
}
