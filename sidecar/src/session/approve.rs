//! Approvals in a live session: what the client half holds, and how the
//! server half learns what a released statement did.
//!
//! Attribution needs no per-message bookkeeping. Every Query, Sync and
//! FunctionCall gets exactly one ReadyForQuery, so the client half numbers
//! its requests and the server half counts ReadyForQuery: a released
//! statement's answer lies in the "window" before ReadyForQuery number N.
//! Inside a window, the k-th Execute since Sync ends with the k-th
//! completion (CommandComplete, EmptyQueryResponse, PortalSuspended); an
//! error before it means it never ran, as the server skips to Sync.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::approval::request::{Outcome, Param};
use crate::approval::Approvals;
use crate::masking::plan::MaskCtx;
use crate::wire::codec;

/// While a statement is held the client may go on sending; past this much
/// buffered input the proxy stops reading until the hold ends.
pub const MAX_BUFFERED_WHILE_HELD: usize = 1024 * 1024;

/// A statement text that needs approval, as judged.
#[derive(Debug)]
pub struct Need {
    pub sql: String,
    /// `approval required by rule "x": DDL on public.t`.
    pub reason: String,
    /// It touches masked columns: its parameters are never shown.
    pub sensitive: bool,
    /// Parameter types the client declared in Parse.
    pub param_types: Vec<u32>,
}

/// A portal bound to a statement that needs approval.
#[derive(Debug)]
pub struct HeldPortal {
    pub need: Arc<Need>,
    pub params: Vec<(i16, Option<Vec<u8>>)>,
}

impl HeldPortal {
    pub fn new(need: Arc<Need>, params: &[codec::BindParam<'_>]) -> Self {
        HeldPortal {
            need,
            params: params
                .iter()
                .map(|(f, v)| (*f, v.map(<[u8]>::to_vec)))
                .collect(),
        }
    }
}

pub enum HoldKind {
    Query { ctx: MaskCtx },
    Execute { portal: String },
}

/// One held client message.
pub struct Hold {
    pub kind: HoldKind,
    /// The message exactly as the client sent it: released unchanged.
    pub bytes: Vec<u8>,
    pub need: Arc<Need>,
    pub params: Vec<(i16, Option<Vec<u8>>)>,
}

impl Hold {
    pub fn param_refs(&self) -> Vec<Param<'_>> {
        self.params
            .iter()
            .enumerate()
            .map(|(i, (format, value))| Param {
                format: *format,
                type_oid: self.need.param_types.get(i).copied().unwrap_or(0),
                value: value.as_deref(),
            })
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchKind {
    /// A simple Query: the whole window is its answer.
    Query,
    /// The k-th Execute since Sync (0-based).
    Execute(u32),
}

/// A released statement whose outcome is to be recorded.
#[derive(Debug)]
pub struct Watch {
    /// ReadyForQuery messages before its answer.
    pub window: u64,
    pub kind: WatchKind,
    pub id: String,
}

/// Sans-IO: backend messages in, (request id, outcome) out.
#[derive(Debug, Default)]
pub struct Tracker {
    windows_done: u64,
    completions: u32,
    last_tag: Option<String>,
    watches: VecDeque<Watch>,
}

impl Tracker {
    pub fn watch(&mut self, w: Watch) {
        self.watches.push_back(w);
    }

    /// Feed one of C, I, s, E, Z. `scrub`: the message belongs to a statement
    /// that touches masked columns, so an error's text is not kept.
    pub fn on_message(&mut self, ty: u8, body: &[u8], scrub: bool) -> Option<(String, Outcome)> {
        let mut done = None;
        // A watch for a window already past was never answered.
        while self
            .watches
            .front()
            .is_some_and(|w| w.window < self.windows_done)
        {
            let w = self.watches.pop_front()?;
            done = Some((w.id, Outcome::Failed("no answer from the server".into())));
        }
        if let Some(w) = self
            .watches
            .front()
            .filter(|w| w.window == self.windows_done)
        {
            let resolved = match (ty, w.kind) {
                (b'C', WatchKind::Query) => {
                    self.last_tag = codec::command_tag(body).ok().map(str::to_owned);
                    None
                }
                (b'C' | b'I' | b's', WatchKind::Execute(k)) if k == self.completions => {
                    Some(Outcome::Done(match ty {
                        b'C' => codec::command_tag(body).unwrap_or("").to_owned(),
                        b'I' => "EMPTY QUERY".to_owned(),
                        _ => "SUSPENDED (row limit reached)".to_owned(),
                    }))
                }
                (b'E', WatchKind::Execute(k)) if k > self.completions => Some(Outcome::Failed(
                    "did not run: an earlier message of its pipeline failed".into(),
                )),
                (b'E', _) => Some(Outcome::Failed(error_text(body, scrub))),
                (b'Z', WatchKind::Query) => Some(Outcome::Done(
                    self.last_tag.take().unwrap_or_else(|| "EMPTY QUERY".into()),
                )),
                (b'Z', WatchKind::Execute(_)) => Some(Outcome::Failed(
                    "did not run: the server did not execute it".into(),
                )),
                _ => None,
            };
            if let Some(outcome) = resolved {
                let w = self.watches.pop_front()?;
                self.last_tag = None;
                done = Some((w.id, outcome));
            }
        }
        match ty {
            b'C' | b'I' | b's' => self.completions += 1,
            b'Z' => {
                self.windows_done += 1;
                self.completions = 0;
            }
            _ => {}
        }
        done
    }
}

/// `ERROR 23505: duplicate key value ...`; without the message for
/// statements on masked data (it can quote a value).
fn error_text(body: &[u8], scrub: bool) -> String {
    let Ok(fields) = codec::notice_fields(body) else {
        return "ERROR".into();
    };
    let get = |c: u8| {
        fields
            .iter()
            .find(|(k, _)| *k == c)
            .map(|(_, v)| v.as_str())
    };
    let code = get(b'C').unwrap_or("");
    match get(b'M') {
        Some(m) if !scrub => format!("ERROR {code}: {m}"),
        _ => format!("ERROR {code}"),
    }
}

/// The server half's side: watches arrive over a channel, outcomes are
/// written to the store in the background.
pub struct Watcher {
    rx: mpsc::UnboundedReceiver<Watch>,
    tracker: Tracker,
    approvals: Option<Arc<Approvals>>,
}

impl Watcher {
    pub fn new(rx: mpsc::UnboundedReceiver<Watch>, approvals: Option<Arc<Approvals>>) -> Self {
        Watcher {
            rx,
            tracker: Tracker::default(),
            approvals,
        }
    }

    pub fn on_message(&mut self, ty: u8, body: &[u8], scrub: bool) {
        if self.approvals.is_none() {
            return;
        }
        while let Ok(w) = self.rx.try_recv() {
            self.tracker.watch(w);
        }
        if let Some((id, outcome)) = self.tracker.on_message(ty, body, scrub) {
            if let Some(a) = &self.approvals {
                tracing::info!(request = %id, outcome = ?outcome, "approved statement finished");
                let a = a.clone();
                tokio::spawn(async move { a.finish(id, outcome).await });
            }
        }
    }
}

/// Sleeps until the instant, or forever without one.
pub async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
