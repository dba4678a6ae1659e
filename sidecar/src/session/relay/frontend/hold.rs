//! A statement that needs approval: its request is opened (or found), a
//! reviewer is waited for when the policy says so, and the statement is then
//! released upstream unchanged or refused in its place.

use std::time::Instant;

use bytes::BytesMut;
use pgwarden_api::{ApprovalRequest, Estimate};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Facts, Frontend};
use crate::approval::request::Param;
use crate::approval::{estimate, messages, request, Approvals, Ask, Opened, Waited};
use crate::policy::analyze::Target;
use crate::recording::{RecordedVerdict, StatementFacts};
use crate::session::approve::{self, Hold, HoldKind};
use crate::session::outcome::{Watch, WatchKind};
use crate::session::relay::{recorded, sentinel, write, End};
use crate::wire::conn::FrameBuf;
use crate::wire::{codec, PgError};

/// How a held statement's request came out.
enum Decided {
    Released(ApprovalRequest),
    /// Not run: the client gets `error`; `request` names the approval
    /// request, when there is one, for the recording.
    Refused {
        error: PgError,
        request: Option<ApprovalRequest>,
    },
}

impl Decided {
    fn refused(error: PgError, request: ApprovalRequest) -> Self {
        Decided::Refused {
            error,
            request: Some(request),
        }
    }
}

impl Frontend<'_> {
    /// Hold a statement that needs approval: open (or find) its request,
    /// wait for a decision when the policy says so, then release it upstream
    /// or refuse it. Messages the client pipelined after it stay buffered.
    pub(super) async fn hold<R, W>(
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
            return Err(End::upstream_write(e));
        }
        let params = hold.param_refs();
        let estimate = self.estimate(&hold, &params).await;
        // Listening for the client's CancelRequest from before the request
        // can be seen: `notify_waiters` wakes only who already listens, and
        // a client (or a test) may cancel as soon as the request shows.
        let interrupt = self.interrupt;
        let interrupted = interrupt.notified();
        tokio::pin!(interrupted);
        interrupted.as_mut().enable();
        let opened = approvals
            .open(Ask {
                subject: self.subject,
                statement: &hold.need.sql,
                params: &params,
                sensitive: hold.need.sensitive,
                reason: hold.need.reason.as_deref().unwrap_or_default(),
                os_user: self.login.os_user.as_deref(),
                estimate,
            })
            .await;
        let decided = match opened {
            Err(e) => {
                tracing::warn!(error = %e, "approval store failed; statement refused");
                Decided::Refused {
                    error: messages::store_failed(&e),
                    request: None,
                }
            }
            Ok(Opened::Released(req)) => Decided::Released(req),
            Ok(Opened::Denied(req)) => Decided::refused(messages::denied(&req), req),
            Ok(Opened::Pending(req)) if approvals.wait.is_zero() => {
                tracing::info!(request = %request::id(&req), "statement needs approval (fail fast)");
                Decided::refused(messages::pending(approvals, &req), req)
            }
            Ok(Opened::Pending(req)) => {
                self.wait_for(approvals, req, r, frames, interrupted.as_mut())
                    .await?
            }
        };
        match decided {
            Decided::Released(req) => self.release(hold, &req, out),
            Decided::Refused { error, request } => {
                let id = request.map(|r| request::id(&r).to_owned());
                self.refuse_held(hold, error, id, out)
            }
        }
        Ok(())
    }

    /// What the reviewer is shown of a held DML statement: the planner's
    /// estimate, from the gateway's own connection (bounded by
    /// `estimate::TIMEOUT`; it never fails the statement).
    async fn estimate(&self, hold: &Hold, params: &[Param<'_>]) -> Option<Estimate> {
        let gate = &self.policy.gate;
        let judgement = match &hold.kind {
            HoldKind::Query { judgement, .. } => judgement.clone(),
            // Cached since the Parse was judged.
            HoldKind::Execute { .. } => gate.evaluate(&hold.need.sql),
        };
        let classes: Vec<_> = judgement.statements.iter().map(|s| s.class).collect();
        match estimate::plannable(&classes, gate.calls_user_code(&judgement), params)? {
            Ok(()) if self.names_may_differ => Some(Estimate::unknown(estimate::NAMES_MAY_DIFFER)),
            Ok(()) => {
                let relations: Vec<_> = judgement
                    .statements
                    .iter()
                    .flat_map(|s| &s.accesses)
                    .filter_map(|a| match &a.target {
                        Target::Relation(q) => Some(q.clone()),
                        _ => None,
                    })
                    .collect();
                let upstream = &self.policy.upstream;
                Some(estimate::explain(upstream, &hold.need.sql, params, &relations).await)
            }
            Err(why) => Some(Estimate::unknown(why)),
        }
    }

    /// Wait for a reviewer: poll the request, and meanwhile watch for the
    /// client cancelling or leaving, the token expiring, and shutdown.
    async fn wait_for<R: AsyncRead + Unpin>(
        &mut self,
        approvals: &Approvals,
        req: ApprovalRequest,
        r: &mut R,
        frames: &mut FrameBuf,
        mut interrupted: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
    ) -> Result<Decided, End> {
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
                // Registered since before the request was opened, and
                // through every check below: no cancel falls in between.
                _ = interrupted.as_mut() => {
                    tracing::info!(request = %id, "wait for approval cancelled by the client");
                    return Ok(Decided::refused(messages::cancelled(&req), req));
                }
                _ = self.shutdown.wait_for(|down| *down) => return Err(End::Shutdown),
                _ = approve::sleep_until(expires) => return Err(End::CredentialExpired),
                read = frames.fill(r), if may_read => match read {
                    Ok(true) => {}
                    Ok(false) => return Err(End::ClientClosed),
                    Err(e) => return Err(End::client_read(e, self.metrics)),
                },
            }
            // Never inside the select: a check may claim the approval, and a
            // claimed approval must not be dropped half-way.
            match approvals.check(&id).await {
                Ok(Waited::Released(req)) => return Ok(Decided::Released(req)),
                Ok(Waited::Denied(req)) => {
                    return Ok(Decided::refused(messages::denied(&req), req))
                }
                Ok(Waited::Expired(req)) => {
                    return Ok(Decided::refused(messages::expired(&req), req))
                }
                Ok(Waited::UsedElsewhere(req)) => {
                    return Ok(Decided::refused(messages::used_elsewhere(&req), req))
                }
                Ok(Waited::Pending) if tokio::time::Instant::now() >= deadline => {
                    return Ok(Decided::refused(messages::timed_out(approvals, &req), req))
                }
                Ok(Waited::Pending) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "approval store failed while waiting");
                    return Ok(Decided::refused(messages::store_failed(&e), req));
                }
            }
        }
    }

    /// Send an approved statement upstream; its outcome is recorded on the
    /// request (and in the session's recording) once the server answers.
    fn release(&mut self, hold: Hold, req: &ApprovalRequest, out: &mut BytesMut) {
        let id = request::id(req).to_owned();
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
        let facts = Facts {
            sql: &hold.need.sql,
            parameters: hold.rendered_params(),
            rule: hold.rule.clone(),
            columns: None,
            would: None,
        };
        self.record_refused(facts, &err, id);
        let rule = hold.rule.clone();
        let kind = match hold.kind {
            HoldKind::Query { .. } => {
                if let Some(m) = &mut self.mask {
                    m.query(None);
                }
                self.refuse_query(err, rule.as_deref(), out);
                WatchKind::Query
            }
            HoldKind::Execute { portal } => {
                if let Some(m) = &mut self.mask {
                    m.execute(&portal);
                }
                // A Parse of the sentinel under a name of our own: its error
                // takes the Execute's place and skips the rest to Sync, as a
                // failed Execute would.
                let name = sentinel::held_statement(self.nonce);
                self.refuse_parse(&name, err, rule.as_deref(), out);
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
}
