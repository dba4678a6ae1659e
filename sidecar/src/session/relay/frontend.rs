//! Client → upstream: each whole message the client sent is handled by the
//! handler of its family, which forwards it, replaces it with a refusal
//! sentinel, asks the read loop to wait for the server first, or holds it
//! for approval. Writes are batched per read.
//!
//! - `judge`: a statement text's decision (policy, masking, approval) and
//!   moving to a new configuration;
//! - `hold`: a statement that waits for a reviewer, then is released or
//!   refused.

mod hold;
mod judge;

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch, Notify};
use tracing::Instrument;

use super::sentinel::{self, Pending};
use super::watchdog::CancelInFlight;
use super::{recorded, write, End};
use crate::approval::Approvals;
use crate::config::{LiveConfig, PolicyConfig};
use crate::observe::Metrics;
use crate::policy::analyze::Effect;
use crate::policy::{Judgement, SessionState};
use crate::recording::{Ack, RecordedVerdict, SessionLog, StatementFacts};
use crate::session::approve::{self, Hold, HoldKind, Need, Would};
use crate::session::limits::StatementClock;
use crate::session::mask::FrontMask;
use crate::session::names::{Failed, NameLedger, NameMap, ServerEvent};
use crate::session::outcome::{Described, Watch, WatchKind};
use crate::wire::codec::{self, Column};
use crate::wire::conn::FrameBuf;
use crate::wire::{PgError, SqlState};
use judge::{Decision, Judged, Judging, LastJudged, Preanalyzed};

pub(super) struct Frontend<'a> {
    pub(super) policy: Arc<PolicyConfig>,
    pub(super) live: &'a LiveConfig,
    /// The session's, entered only to log (see `Relay::span`).
    pub(super) span: &'a tracing::Span,
    pub(super) generation: u64,
    pub(super) login: &'a crate::session::Login,
    pub(super) metrics: &'a Metrics,
    pub(super) nonce: &'a str,
    pub(super) next_seq: u64,
    pub(super) refusals: mpsc::UnboundedSender<Pending>,
    pub(super) session: SessionState,
    pub(super) clock: &'a StatementClock,
    pub(super) cancels: &'a Arc<CancelInFlight>,
    pub(super) expires: Option<Instant>,
    pub(super) mask: Option<FrontMask>,
    pub(super) approvals: Option<Arc<Approvals>>,
    pub(super) subject: &'a str,
    pub(super) interrupt: &'a Notify,
    pub(super) shutdown: watch::Receiver<bool>,
    /// NoticeResponses for the client, written by the upstream half.
    pub(super) notices: mpsc::UnboundedSender<BytesMut>,
    /// Released statements whose outcome the upstream half records.
    pub(super) watches: mpsc::UnboundedSender<Watch>,
    /// Requests that end in ReadyForQuery (Query, Sync, FunctionCall) sent
    /// so far: the upstream half counts ReadyForQuery the same way.
    pub(super) requests_sent: u64,
    /// Executes since the last Sync: which completion is whose.
    pub(super) executes_since_sync: u32,
    /// Prepared statements by name: those that need approval (held at
    /// Execute), and all of them when the session is recorded.
    pub(super) statements: NameMap<Arc<Need>>,
    /// Portals bound to such statements, with their parameters.
    pub(super) portals: NameMap<approve::HeldPortal>,
    pub(super) log: Option<&'a SessionLog>,
    /// Durable statement records to wait for before sending upstream.
    pub(super) acks: Vec<Ack>,
    /// Describes of tracked statements, for the server half to attribute
    /// their ParameterDescription; and what it learnt.
    pub(super) describes: mpsc::UnboundedSender<(u64, String)>,
    pub(super) described: Arc<Described>,
    /// A large text analysed off the event loop, for the message after it.
    pub(super) preanalyzed: Option<Preanalyzed>,
    /// The last text judged, and how.
    pub(super) last_judged: LastJudged,
    /// Statement-name changes the server has not confirmed yet.
    pub(super) ledger: NameLedger,
    /// What the server answered to each request, from the upstream half.
    pub(super) outcomes: mpsc::UnboundedReceiver<ServerEvent>,
    /// Requests the server has answered completely.
    pub(super) done: &'a super::Answered,
    /// User code ran in this request (or an earlier one not yet answered):
    /// until its ReadyForQuery, the server may have changed a setting it
    /// only reports then (standard_conforming_strings, client_encoding).
    pub(super) unsettled_until: Option<u64>,
    /// The server is in copy-in mode: it ignores Sync, so the proxy drops
    /// the client's until CopyDone or CopyFail.
    pub(super) copy_in: bool,
    /// The session may have changed what a name resolves to (search_path, a
    /// temporary table, user code): a held statement is then not estimated
    /// on the gateway's own connection, which would plan something else.
    pub(super) names_may_differ: bool,
}

/// What a handler asks the read loop to do with its message.
enum Flow {
    /// Handled (forwarded, or replaced by a sentinel): on to the next.
    Continue,
    /// The message uses a name changed by this earlier request: wait for
    /// the server's answer to it, then handle the message again.
    Wait(u64),
    Terminate,
    /// The statement needs approval: `Frontend::hold` takes it from here.
    Hold(Hold),
}

/// What a statement that goes upstream is recorded as.
struct Facts<'s> {
    sql: &'s str,
    parameters: Vec<Option<String>>,
    rule: Option<String>,
    /// Its result columns when known in advance.
    columns: Option<Arc<Vec<Column>>>,
    /// Forwarded only because the policy is in audit mode.
    would: Option<Would>,
}

impl<'s> Facts<'s> {
    /// A statement whose text is all there is to record.
    fn text(sql: &'s str, rule: Option<String>) -> Self {
        Facts {
            sql,
            parameters: Vec::new(),
            rule,
            columns: None,
            would: None,
        }
    }
}

fn violation(what: &str, e: codec::DecodeError) -> PgError {
    PgError::protocol_violation(format!("invalid {what} message: {e}"))
}

// === impl Frontend: the read loop ===

impl Frontend<'_> {
    pub(super) async fn run<R, W>(mut self, r: &mut R, mut frames: FrameBuf, w: &mut W) -> End
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
                if matches!(frame.ty, b'Q' | b'P') && frame.wire_len > judge::OFFLOAD_ABOVE {
                    let body = &frames.buffered()[5..frame.wire_len];
                    self.preanalyze(frame.ty, body).await;
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
                            return End::upstream_write(e);
                        }
                        self.done.wait_past(request).await;
                        if let Err(end) = self.poll_outcomes() {
                            return end;
                        }
                        continue;
                    }
                    Ok(Flow::Continue) => self.passed_on(frame.ty),
                    Ok(Flow::Hold(hold)) => {
                        frames.consume(frame.wire_len);
                        // A rare path: its log lines and the estimate's
                        // run in the session's span.
                        let span = self.span.clone();
                        if let Err(end) = self
                            .hold(hold, r, &mut frames, w, &mut out)
                            .instrument(span)
                            .await
                        {
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
                return End::upstream_write(e);
            }
            self.metrics.bytes_to_upstream.inc_by(n as u64);
            match frames.fill(r).await {
                Ok(true) => {}
                Ok(false) => return End::ClientClosed,
                Err(e) => return End::client_read(e, self.metrics),
            }
        }
    }

    /// Bookkeeping once a message (or the sentinel in its place) is on its
    /// way upstream: the ledger and the request count follow what the server
    /// will see.
    fn passed_on(&mut self, ty: u8) {
        // A refused FunctionCall goes upstream as a Query.
        self.ledger.sent(if ty == b'F' { b'Q' } else { ty });
        if matches!(ty, b'Q' | b'S' | b'F') {
            self.request_sent();
        }
        if ty == b'S' {
            self.executes_since_sync = 0;
        }
    }

    fn request_sent(&mut self) {
        self.ledger.request_sent();
        self.requests_sent += 1;
        self.clock.request_sent();
    }
}

// === impl Frontend: one handler per message family ===

impl Frontend<'_> {
    fn on_message(&mut self, ty: u8, bytes: &[u8], out: &mut BytesMut) -> Result<Flow, PgError> {
        let body = &bytes[5..];
        match ty {
            b'Q' => self.on_query(body, bytes, out),
            b'P' => self.on_parse(body, bytes, out),
            b'B' if self.tracks_binds() => self.on_bind(body, bytes, out),
            b'D' => self.on_describe(body, bytes, out),
            b'E' => self.on_execute(body, bytes, out),
            b'S' => self.on_sync(bytes, out),
            b'F' => Ok(self.on_function_call(out)),
            b'C' => self.on_close(body, bytes, out),
            b'X' => Ok(Flow::Terminate),
            b'p' => Err(PgError::protocol_violation(
                "unexpected password message after authentication",
            )),
            // Bind, Flush, CopyData/Done/Fail: the statement they refer to
            // was judged at Parse or Query.
            _ => {
                out.extend_from_slice(bytes);
                Ok(Flow::Continue)
            }
        }
    }

    fn on_query(&mut self, body: &[u8], bytes: &[u8], out: &mut BytesMut) -> Result<Flow, PgError> {
        let sql = codec::query_text(body).map_err(|e| violation("Query", e))?;
        self.metrics.statements_simple.inc();
        let Decision {
            judged,
            rule,
            judgement,
            would,
        } = match self.judge(sql) {
            Judging::Done(d) => d,
            Judging::Wait(request) => return Ok(Flow::Wait(request)),
        };
        match judged {
            Judged::Allow(ctx) => {
                if let Some(m) = &mut self.mask {
                    m.query(ctx);
                }
                self.forwarded(&judgement, false);
                let facts = Facts {
                    would,
                    ..Facts::text(sql, rule)
                };
                self.record_allowed(facts, WatchKind::Query);
                out.extend_from_slice(bytes);
            }
            Judged::Hold(reason, ctx) => {
                let sensitive = ctx.is_some();
                return Ok(Flow::Hold(Hold {
                    kind: HoldKind::Query { ctx, judgement },
                    bytes: bytes.to_vec(),
                    need: Arc::new(Need {
                        sql: sql.to_owned(),
                        reason: Some(reason),
                        sensitive,
                        param_types: Vec::new(),
                        rule: rule.clone(),
                        would: None,
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
                self.record_refused(Facts::text(sql, rule.clone()), &err, None);
                self.refuse_query(err, rule.as_deref(), out);
            }
        }
        Ok(Flow::Continue)
    }

    fn on_parse(&mut self, body: &[u8], bytes: &[u8], out: &mut BytesMut) -> Result<Flow, PgError> {
        let parse = codec::parse(body).map_err(|e| violation("Parse", e))?;
        let (judged, rule, would) = match self.judge(parse.query) {
            Judging::Done(d) => (
                judge::protocol_text(d.judged, &d.judgement),
                d.rule,
                d.would,
            ),
            Judging::Wait(request) => return Ok(Flow::Wait(request)),
        };
        // Whatever the verdict, the server is asked to (re)define the name:
        // the answer says whether it did.
        self.ledger.parse_sent(parse.statement);
        let need = |reason: Option<String>, sensitive: bool, rule: Option<String>| {
            Arc::new(Need {
                sql: parse.query.to_owned(),
                reason,
                sensitive,
                param_types: parse.param_types.clone(),
                rule,
                would: would.clone(),
            })
        };
        match judged {
            Judged::Allow(ctx) => {
                // Named statements share PREPARE's namespace: a later SQL
                // `EXECUTE name` runs this judged text.
                self.session.prepared(parse.statement);
                if self.log.is_some() {
                    let need = need(None, ctx.is_some(), rule);
                    self.statements.insert(parse.statement.to_owned(), need);
                } else {
                    self.statements.remove(parse.statement);
                }
                if let Some(m) = &mut self.mask {
                    m.parsed(parse.statement, ctx);
                }
                out.extend_from_slice(bytes);
            }
            Judged::Hold(reason, ctx) => {
                // Preparing runs nothing: the hold comes at Execute, when the
                // parameters are known. Not added to the session's prepared
                // names, so SQL `EXECUTE name` cannot run it around the
                // approval.
                let need = need(Some(reason), ctx.is_some(), rule);
                self.statements.insert(parse.statement.to_owned(), need);
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
                self.record_refused(Facts::text(parse.query, rule.clone()), &err, None);
                self.refuse_parse(parse.statement, err, rule.as_deref(), out);
            }
        }
        Ok(Flow::Continue)
    }

    /// Whether a Bind needs a look (masking, recording, held statements,
    /// names in flux); otherwise it passes untouched.
    fn tracks_binds(&self) -> bool {
        self.mask.is_some()
            || self.log.is_some()
            || !self.statements.is_empty()
            || !self.portals.is_empty()
            || !self.ledger.is_quiet()
    }

    fn on_bind(&mut self, body: &[u8], bytes: &[u8], out: &mut BytesMut) -> Result<Flow, PgError> {
        let (portal, statement) = codec::bind_names(body).map_err(|e| violation("Bind", e))?;
        if let Some(request) = self.ledger.wait_for(statement) {
            return Ok(Flow::Wait(request));
        }
        if self.ledger.is_unknown(statement) {
            self.portals.remove(portal);
            let err = PgError::denied(format!(
                "prepared statement \"{statement}\" is in an unknown state: the server refused its last Parse or Close; Close it and Parse it again"
            ));
            let name = sentinel::held_statement(self.nonce);
            self.refuse_parse(&name, err, None, out);
            return Ok(Flow::Continue);
        }
        let need = match self.statements.get(statement) {
            Some(need) => Some(need.clone()),
            // Prepared by SQL PREPARE: its text was recorded then.
            None if self.log.is_some() => Some(Arc::new(Need {
                sql: format!("-- execute statement \"{statement}\" (prepared with SQL PREPARE)"),
                reason: None,
                sensitive: true,
                param_types: Vec::new(),
                rule: None,
                would: None,
            })),
            None => None,
        };
        match need {
            Some(need) => {
                let bind = codec::bind_params(body).map_err(|e| violation("Bind", e))?;
                let types = self
                    .described
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
        Ok(Flow::Continue)
    }

    fn on_describe(
        &mut self,
        body: &[u8],
        bytes: &[u8],
        out: &mut BytesMut,
    ) -> Result<Flow, PgError> {
        if self.mask.is_some() || !self.statements.is_empty() {
            let (kind, name) = codec::describe(body).map_err(|e| violation("Describe", e))?;
            if kind == b'S' && self.statements.contains_key(name) {
                let _ = self.describes.send((self.requests_sent, name.to_owned()));
            }
            if let Some(m) = &mut self.mask {
                m.describe();
            }
        }
        out.extend_from_slice(bytes);
        Ok(Flow::Continue)
    }

    fn on_execute(
        &mut self,
        body: &[u8],
        bytes: &[u8],
        out: &mut BytesMut,
    ) -> Result<Flow, PgError> {
        self.metrics.statements_extended.inc();
        if self.mask.is_some() || !self.portals.is_empty() {
            let portal = codec::execute_portal(body).map_err(|e| violation("Execute", e))?;
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
                // Recorded at each Execute (a portal run again to fetch more
                // rows is recorded again).
                let (need, parameters, columns) = match self.portals.get(portal) {
                    Some(p) => (
                        Some(p.need.clone()),
                        p.rendered_params(),
                        self.described.columns(&p.statement, &p.result_formats),
                    ),
                    None => (None, Vec::new(), None),
                };
                let unknown;
                let sql = match &need {
                    Some(n) => n.sql.as_str(),
                    None => {
                        unknown = format!("-- execute portal \"{portal}\"");
                        unknown.as_str()
                    }
                };
                let facts = Facts {
                    sql,
                    parameters,
                    rule: need.as_ref().and_then(|n| n.rule.clone()),
                    columns,
                    would: need.as_ref().and_then(|n| n.would.clone()),
                };
                let k = self.executes_since_sync;
                self.record_allowed(facts, WatchKind::Execute(k));
            }
        }
        self.executes_since_sync += 1;
        out.extend_from_slice(bytes);
        Ok(Flow::Continue)
    }

    fn on_sync(&mut self, bytes: &[u8], out: &mut BytesMut) -> Result<Flow, PgError> {
        if let Some(m) = &mut self.mask {
            m.sync();
        }
        out.extend_from_slice(bytes);
        Ok(Flow::Continue)
    }

    /// Built-in deny: FunctionCall calls a function by OID with no SQL text
    /// for the policy to inspect.
    fn on_function_call(&mut self, out: &mut BytesMut) -> Flow {
        let err =
            PgError::denied("the FunctionCall protocol message is not allowed (built-in rule)");
        if let Some(m) = &mut self.mask {
            m.query(None);
        }
        self.refuse_query(err, None, out);
        Flow::Continue
    }

    fn on_close(&mut self, body: &[u8], bytes: &[u8], out: &mut BytesMut) -> Result<Flow, PgError> {
        let (kind, name) = codec::close(body).map_err(|e| violation("Close", e))?;
        if kind == b'P' {
            self.portals.remove(name);
            self.ledger.close_portal_sent();
        }
        if kind == b'S' {
            self.ledger.close_sent(name);
            self.forget_statement(name);
        }
        out.extend_from_slice(bytes);
        Ok(Flow::Continue)
    }
}

// === impl Frontend: names and outcomes ===

impl Frontend<'_> {
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

    /// A statement name is gone (closed, or its change refused by the
    /// server): everything the session knew under it goes too.
    fn forget_statement(&mut self, name: &str) {
        self.session.closed(name);
        self.statements.remove(name);
        self.described.forget(name);
        if let Some(m) = &mut self.mask {
            m.closed_statement(name);
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
                        self.span.in_scope(|| tracing::debug!(statement = %n, "the server refused a change to a statement name"));
                        self.forget_statement(&n);
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
}

// === impl Frontend: recording and refusals ===

impl Frontend<'_> {
    /// Record a statement that goes upstream, and watch for its answer.
    fn record_allowed(&mut self, facts: Facts<'_>, kind: WatchKind) {
        let Some(log) = self.log else { return };
        let (n, ack) = log.statement(StatementFacts {
            text: facts.sql,
            parameters: facts.parameters,
            verdict: facts
                .would
                .as_ref()
                .map_or(RecordedVerdict::Allow, |w| w.verdict),
            rule: facts.rule,
            reason: facts.would.map(|w| w.reason),
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
            columns: facts.columns,
        });
    }

    /// Record a statement that does not run (its error is the reason).
    fn record_refused(&mut self, facts: Facts<'_>, err: &PgError, approval: Option<String>) {
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
            text: facts.sql,
            parameters: facts.parameters,
            verdict: if approval.is_some() {
                RecordedVerdict::Held
            } else {
                RecordedVerdict::Deny
            },
            rule: facts.rule,
            reason: Some(reason),
            approval,
            approved_by: None,
        });
        self.acks.extend(ack);
    }

    /// Queue a refusal for the upstream half and return the sentinel text
    /// whose syntax error it will replace.
    fn sentinel(&mut self, err: PgError, rule: Option<&str>) -> String {
        // The rule's name is the policy's, never the client's.
        self.metrics
            .statements_refused
            .with_label_values(&[self.policy.id.as_str(), rule.unwrap_or("default")])
            .inc();
        // The reason names rules, classes and objects, never values; a parser
        // message can quote the statement, so parse failures are not echoed.
        let reason = if err.code == SqlState::SyntaxError {
            "statement cannot be parsed"
        } else {
            err.message.as_str()
        };
        self.span
            .in_scope(|| tracing::info!(sqlstate = err.code.code(), reason, "statement refused"));
        let seq = self.next_seq;
        self.next_seq += 1;
        // Sent before the sentinel's bytes go out, so the upstream half always
        // finds it. A closed channel means that half is gone; nothing to do.
        let _ = self.refusals.send(Pending { seq, error: err });
        sentinel::text(self.nonce, seq)
    }

    fn refuse_query(&mut self, err: PgError, rule: Option<&str>, out: &mut BytesMut) {
        let text = self.sentinel(err, rule);
        codec::put_query(&text, out);
    }

    fn refuse_parse(
        &mut self,
        statement: &str,
        err: PgError,
        rule: Option<&str>,
        out: &mut BytesMut,
    ) {
        let text = self.sentinel(err, rule);
        // Same statement name, so a later Bind to it fails as it should.
        codec::put_parse(statement, &text, out);
    }
}
