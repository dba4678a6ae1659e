//! Upstream → client: the server's replies, with each refusal sentinel's
//! error swapped for the proxy's own, results masked and limited, and what
//! the server answered reported to the client half.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use super::sentinel::{self, Pending, MAX_PENDING};
use super::watchdog::CancelInFlight;
use super::{recorded, write, End};
use crate::masking::plan;
use crate::observe::Metrics;
use crate::recording::Ack;
use crate::session::limits::{RowAction, RowLimiter, StatementClock};
use crate::session::mask::{BackMask, Disposition};
use crate::session::names::{RequestOutcome, ServerEvent};
use crate::session::outcome::Watcher;
use crate::upstream::{BackendKey, UpstreamTarget};
use crate::wire::codec::{self, TxStatus};
use crate::wire::conn::{FrameBuf, ReadError};
use crate::wire::PgError;

pub(super) struct Backend<'a> {
    pub(super) metrics: &'a Metrics,
    pub(super) nonce: &'a str,
    pub(super) refusals: mpsc::UnboundedReceiver<Pending>,
    pub(super) pending: VecDeque<Pending>,
    pub(super) status: TxStatus,
    pub(super) mask: Option<BackMask>,
    pub(super) limiter: Option<RowLimiter>,
    pub(super) clock: &'a StatementClock,
    pub(super) cancel: &'a Option<(Arc<UpstreamTarget>, BackendKey)>,
    pub(super) cancels: &'a Arc<CancelInFlight>,
    /// NoticeResponses from the client half (a statement waiting for approval).
    pub(super) notices: mpsc::UnboundedReceiver<BytesMut>,
    /// Records the outcome of approved statements.
    pub(super) watcher: Watcher<'a>,
    /// Durable result records to wait for before the client sees more.
    pub(super) acks: Vec<Ack>,
    pub(super) settings: crate::session::server_settings::ServerSettings,
    /// What the server answered to each request, for the client half's
    /// ledger of statement names.
    pub(super) outcomes: mpsc::UnboundedSender<ServerEvent>,
    pub(super) done: &'a super::Answered,
    /// The request being answered.
    pub(super) answered: RequestOutcome,
    /// Between CopyInResponse and the copy's end.
    pub(super) copy_in: bool,
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

/// Whether an ErrorResponse body is FATAL or PANIC: the server closes the
/// connection after it.
fn ends_session(body: &[u8]) -> bool {
    codec::notice_fields(body).is_ok_and(|fields| {
        fields
            .iter()
            .any(|(code, v)| matches!(code, b'S' | b'V') && matches!(v.as_str(), "FATAL" | "PANIC"))
    })
}

impl Backend<'_> {
    pub(super) async fn run<R, W>(mut self, r: &mut R, mut frames: FrameBuf, w: &mut W) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut out = BytesMut::new();
        // Whether the server said why it ends the session (its FATAL); a
        // server that restarted or crashed closes without one.
        let mut said_goodbye = false;
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
                said_goodbye |= frame.ty == b'E' && ends_session(&bytes[5..]);
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
                // Fixed order: no random number per poll, and the (rare)
                // notices are looked at only while the server is quiet. They
                // come from a statement waiting for approval, when nothing
                // of this session runs upstream.
                biased;
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
                Ok(false) if said_goodbye => return End::UpstreamClosed,
                // Else the client would see only a closed socket, which some
                // drivers report as nothing more than "connection closed".
                Ok(false) => {
                    return End::UpstreamFailed(
                        "the upstream server closed the connection unexpectedly (it restarted or crashed?); a transaction in progress was not committed".into(),
                    )
                }
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
                self.done.set(next);
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
            .find_map(|(_, m)| sentinel::seq(m, self.nonce))
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
