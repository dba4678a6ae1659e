//! What a statement did, as the server half sees it: for a released
//! approval (its request's result) and for a recorded session (duration,
//! rows, tag or error, columns and the first rows as the client got them).
//!
//! Attribution needs no per-message bookkeeping. Every Query, Sync and
//! FunctionCall gets exactly one ReadyForQuery, so the client half numbers
//! its requests and the server half counts ReadyForQuery: a statement's
//! answer lies in the "window" before ReadyForQuery number N. Inside a
//! window, the k-th Execute since Sync ends with the k-th completion
//! (CommandComplete, EmptyQueryResponse, PortalSuspended); an error before
//! it means it never ran, as the server skips to Sync.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::Instrument;

use crate::approval::request::Outcome;
use crate::approval::Approvals;
use crate::recording::{record, Ack, ResultFacts, SessionLog};
use crate::wire::{codec, values};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchKind {
    /// A simple Query: the whole window is its answer.
    Query,
    /// The k-th Execute since Sync (0-based).
    Execute(u32),
}

/// A statement sent upstream whose outcome someone wants.
#[derive(Debug)]
pub struct Watch {
    /// ReadyForQuery messages before its answer.
    pub window: u64,
    pub kind: WatchKind,
    /// The approval request it released.
    pub approval: Option<String>,
    /// Its statement number in the session's recording.
    pub record: Option<u64>,
    pub started: Instant,
    /// Its result columns when known in advance (a portal of a statement
    /// described earlier: Execute brings no RowDescription).
    pub columns: Option<Arc<Vec<codec::Column>>>,
}

/// A watched statement's answer.
#[derive(Debug, PartialEq)]
pub struct Finished {
    pub approval: Option<String>,
    pub record: Option<u64>,
    pub outcome: Outcome,
    pub started: Instant,
    pub rows: u64,
    pub columns: Vec<String>,
    pub sample: Vec<Vec<Option<String>>>,
    pub sample_cut: bool,
}

/// Sans-IO: backend messages in, finished statements out.
#[derive(Debug, Default)]
pub struct Tracker {
    windows_done: u64,
    completions: u32,
    last_tag: Option<String>,
    watches: VecDeque<Watch>,
    /// Describes of statements whose parameter types are wanted:
    /// (window, statement name), answered by ParameterDescription in order.
    describes: VecDeque<(u64, String)>,
    /// Rows sampled per statement.
    sample_rows: usize,
    rows: u64,
    columns: Option<Arc<Vec<codec::Column>>>,
    sample: Vec<Vec<Option<String>>>,
    /// A ParameterDescription was matched to this statement: the
    /// RowDescription (or NoData) that follows is the statement's, not a
    /// result.
    describing: Option<(u64, String)>,
}

impl Tracker {
    pub fn new(sample_rows: usize) -> Self {
        Tracker {
            sample_rows,
            ..Tracker::default()
        }
    }

    pub fn watch(&mut self, w: Watch) {
        self.watches.push_back(w);
    }

    pub fn describe(&mut self, window: u64, statement: String) {
        self.describes.push_back((window, statement));
    }

    /// A ParameterDescription: the statement it describes and its types.
    /// Describes of windows already closed were skipped by an error.
    pub fn on_parameter_description(&mut self, body: &[u8]) -> Option<(String, Vec<u32>)> {
        while self
            .describes
            .front()
            .is_some_and(|(w, _)| *w < self.windows_done)
        {
            self.describes.pop_front();
        }
        let (window, _) = self.describes.front()?;
        if *window != self.windows_done {
            return None;
        }
        let (window, name) = self.describes.pop_front()?;
        self.describing = Some((window, name.clone()));
        Some((name, codec::parameter_description(body).ok()?))
    }

    /// The watch the current message belongs to, if any.
    fn current(&self) -> Option<&Watch> {
        self.watches.front().filter(|w| {
            w.window == self.windows_done
                && match w.kind {
                    WatchKind::Query => true,
                    WatchKind::Execute(k) => k == self.completions,
                }
        })
    }

    /// A RowDescription or NoData that answers a Describe of a statement
    /// (after its ParameterDescription): (statement, columns).
    pub fn on_statement_description(
        &mut self,
        ty: u8,
        body: &[u8],
    ) -> Option<(String, Option<Vec<codec::Column>>)> {
        let (window, _) = self.describing.as_ref()?;
        if *window != self.windows_done {
            self.describing = None;
            return None;
        }
        let (_, name) = self.describing.take()?;
        Some((
            name,
            match ty {
                b'T' => codec::row_columns(body).ok(),
                _ => None,
            },
        ))
    }

    /// A RowDescription or DataRow (as sent to the client, after masking).
    pub fn on_result(&mut self, ty: u8, body: &[u8]) {
        let Some(w) = self.current() else { return };
        match ty {
            b'T' => {
                if let Ok(cols) = codec::row_columns(body) {
                    self.columns = Some(Arc::new(cols));
                }
            }
            b'D' => {
                if self.columns.is_none() {
                    self.columns = w.columns.clone();
                }
                self.rows += 1;
                if self.sample.len() < self.sample_rows {
                    let cols = self.columns.as_deref().map(Vec::as_slice).unwrap_or(&[]);
                    self.sample.push(row_values(body, cols));
                }
            }
            _ => {}
        }
    }

    /// Feed one of C, I, s, E, Z. `scrub`: the message belongs to a statement
    /// that touches masked columns, so an error's text is not kept.
    pub fn on_message(&mut self, ty: u8, body: &[u8], scrub: bool) -> Vec<Finished> {
        let mut done = Vec::new();
        // A watch for a window already past was never answered.
        while self
            .watches
            .front()
            .is_some_and(|w| w.window < self.windows_done)
        {
            if let Some(w) = self.watches.pop_front() {
                done.push(self.finish(w, Outcome::Failed("no answer from the server".into())));
            }
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
                if let Some(w) = self.watches.pop_front() {
                    done.push(self.finish(w, outcome));
                }
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

    fn finish(&mut self, w: Watch, outcome: Outcome) -> Finished {
        self.last_tag = None;
        let sample = std::mem::take(&mut self.sample);
        let rows = std::mem::take(&mut self.rows);
        Finished {
            approval: w.approval,
            record: w.record,
            outcome,
            started: w.started,
            sample_cut: rows > sample.len() as u64,
            rows,
            columns: self
                .columns
                .take()
                .or(w.columns)
                .map(|c| c.iter().map(|c| c.name.clone()).collect())
                .unwrap_or_default(),
            sample,
        }
    }
}

/// A DataRow's values as text: text-format values as they are, binary ones
/// decoded by their column's type where known, else hex; each cut to
/// `record::MAX_VALUE`.
fn row_values(body: &[u8], cols: &[codec::Column]) -> Vec<Option<String>> {
    let Ok(values) = codec::data_row(body) else {
        return vec![Some("(unreadable row)".into())];
    };
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let v = v?;
            let text = match cols.get(i) {
                Some(c) if c.binary => values::scalar_text(c.type_oid, v),
                _ => std::str::from_utf8(v)
                    .ok()
                    .filter(|s| !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t'))
                    .map(str::to_owned),
            };
            Some(match text {
                Some(t) => record::truncate(&t, record::MAX_VALUE),
                None => values::hex(v, record::MAX_VALUE / 2),
            })
        })
        .collect()
}

/// The row count at the end of a command tag (`INSERT 0 5`, `DELETE 3`).
fn tag_rows(tag: &str) -> Option<u64> {
    let (verb, n) = tag.rsplit_once(' ')?;
    let counts = [
        "SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "COPY", "FETCH", "MOVE",
    ];
    counts
        .iter()
        .any(|v| verb == *v || verb.starts_with(&format!("{v} ")))
        .then(|| n.parse().ok())
        .flatten()
}

/// `ERROR 23505: duplicate key value ...`; without the message for
/// statements on masked data (it can quote a value).
pub fn error_text(body: &[u8], scrub: bool) -> String {
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

/// The server half's side: watches arrive over a channel; approval
/// outcomes are written to the store in the background, results to the
/// session's recording (durable ones hand back an ack to wait for).
pub struct Watcher<'a> {
    rx: mpsc::UnboundedReceiver<Watch>,
    describes: mpsc::UnboundedReceiver<(u64, String)>,
    /// Parameter types the server reported, by statement name.
    described: Arc<Described>,
    tracker: Tracker,
    approvals: Option<Arc<Approvals>>,
    log: Option<&'a SessionLog>,
    /// The session's, for what this logs.
    span: &'a tracing::Span,
}

impl<'a> Watcher<'a> {
    pub fn new(
        rx: mpsc::UnboundedReceiver<Watch>,
        describes: mpsc::UnboundedReceiver<(u64, String)>,
        described: Arc<Described>,
        approvals: Option<Arc<Approvals>>,
        log: Option<&'a SessionLog>,
        span: &'a tracing::Span,
    ) -> Self {
        let rows = log.map(|l| l.settings().result_rows).unwrap_or(0);
        Watcher {
            rx,
            describes,
            described,
            tracker: Tracker::new(rows),
            approvals,
            log,
            span,
        }
    }

    /// Whether results need to be looked at row by row.
    pub fn records_results(&self) -> bool {
        self.log.is_some()
    }

    pub fn on_result(&mut self, ty: u8, body: &[u8]) {
        if self.tracker.watches.is_empty() {
            // The watch for these rows may still be in the channel.
            while let Ok(w) = self.rx.try_recv() {
                self.tracker.watch(w);
            }
        }
        self.tracker.on_result(ty, body);
    }

    /// A ParameterDescription from the server.
    pub fn on_parameter_description(&mut self, body: &[u8]) {
        while let Ok((w, name)) = self.describes.try_recv() {
            self.tracker.describe(w, name);
        }
        if let Some((name, types)) = self.tracker.on_parameter_description(body) {
            self.described.set_params(name, types);
        }
    }

    /// A RowDescription or NoData: a described statement's columns, or a
    /// result's.
    pub fn on_row_description(&mut self, ty: u8, body: &[u8]) {
        if let Some((name, cols)) = self.tracker.on_statement_description(ty, body) {
            self.described.set_columns(name, cols);
            return;
        }
        if ty == b'T' && self.records_results() {
            self.on_result(ty, body);
        }
    }

    /// Acks of durable records to wait for before the client sees this.
    pub fn on_message(&mut self, ty: u8, body: &[u8], scrub: bool, acks: &mut Vec<Ack>) {
        if self.approvals.is_none() && self.log.is_none() {
            return;
        }
        while let Ok(w) = self.rx.try_recv() {
            self.tracker.watch(w);
        }
        for f in self.tracker.on_message(ty, body, scrub) {
            if let (Some(id), Some(a)) = (&f.approval, &self.approvals) {
                let _in = self.span.enter();
                tracing::info!(request = %id, outcome = ?f.outcome, "approved statement finished");
                let (a, id, outcome) = (a.clone(), id.clone(), f.outcome.clone());
                tokio::spawn(
                    async move { a.finish(id, outcome).await }.instrument(self.span.clone()),
                );
            }
            if let (Some(n), Some(log)) = (f.record, self.log) {
                let (tag, error) = match f.outcome {
                    Outcome::Done(t) => (Some(t), None),
                    Outcome::Failed(e) => (None, Some(e)),
                };
                acks.extend(log.result(ResultFacts {
                    n,
                    duration_us: u64::try_from(f.started.elapsed().as_micros()).unwrap_or(u64::MAX),
                    // Rows processed, as the tag says (DELETE 3), else the
                    // rows the client received.
                    rows: tag.as_deref().and_then(tag_rows).unwrap_or(f.rows),
                    tag,
                    error,
                    columns: f.columns,
                    sample: f.sample,
                    sample_cut: f.sample_cut,
                }));
            }
        }
    }
}

/// Parameter types learnt from the server's ParameterDescription, for
/// statements whose client declared none in Parse (drivers that let the
/// server infer them, then bind binary values): a reviewer and a recording
/// then read `2`, not `\x00000002`.
#[derive(Debug, Default)]
pub struct Described(std::sync::Mutex<super::names::NameMap<Description>>);

#[derive(Debug, Default)]
struct Description {
    params: Vec<u32>,
    columns: Option<Arc<Vec<codec::Column>>>,
}

impl Described {
    fn lock(&self) -> std::sync::MutexGuard<'_, super::names::NameMap<Description>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_params(&self, statement: String, types: Vec<u32>) {
        self.lock().entry(statement).or_default().params = types;
    }

    fn set_columns(&self, statement: String, cols: Option<Vec<codec::Column>>) {
        self.lock().entry(statement).or_default().columns = cols.map(Arc::new);
    }

    /// A described statement's result columns, with the result formats of
    /// the Bind (none: all text; one: for all; else one per column).
    pub fn columns(&self, statement: &str, formats: &[i16]) -> Option<Arc<Vec<codec::Column>>> {
        let cols = self.lock().get(statement)?.columns.clone()?;
        if formats.is_empty() {
            return Some(cols);
        }
        Some(Arc::new(
            cols.iter()
                .enumerate()
                .map(|(i, c)| codec::Column {
                    binary: formats.get(i).or(formats.first()).copied() == Some(1)
                        && (formats.len() == 1 || i < formats.len()),
                    ..c.clone()
                })
                .collect(),
        ))
    }

    /// The types for a statement's parameters: declared ones win, learnt
    /// ones fill the gaps.
    pub fn fill(&self, statement: &str, declared: &[u32], n: usize) -> Vec<u32> {
        let map = self.lock();
        let learnt = map.get(statement).map(|d| &d.params);
        (0..n)
            .map(|i| match declared.get(i) {
                Some(&t) if t != 0 => t,
                _ => learnt.and_then(|l| l.get(i).copied()).unwrap_or(0),
            })
            .collect()
    }

    pub fn forget(&self, statement: &str) {
        self.lock().remove(statement);
    }
}

#[cfg(test)]
mod tests;
