//! Stage 6: session recording. Every session's start and end, every
//! statement (text, masked parameters, verdict, rule, approval) and its
//! result (duration, rows, tag or error, the first rows as the client got
//! them — after masking) go into one hash-chained, append-only log.
//!
//! - `record`: the line format and its seal (sans-IO);
//! - `chain`: verification, the first broken link (sans-IO);
//! - `spool`: the log on disk, one writer thread, group-committed fsyncs;
//! - `replay`: a session as a psql-like transcript (sans-IO);
//! - `log`: reading the spool back (for `pgwarden sessions`).

pub mod chain;
pub mod log;
pub mod record;
pub mod replay;
pub mod ship;
pub mod spool;

use std::sync::Arc;

use pgwarden_api::{DatabaseAccessPolicySpec, RecordingSettings};
use tokio::sync::oneshot;

pub use record::RecordedVerdict;
use record::{Event, MAX_TEXT};
pub use spool::Recorder;

/// One policy's recording settings over the gateway's log.
#[derive(Debug)]
pub struct Recording {
    recorder: Recorder,
    /// Result rows kept per statement.
    pub result_rows: usize,
    /// A statement's records are on disk before its result completes.
    pub durable: bool,
    pub policy_version: String,
    /// The audit PostgreSQL records are shipped to, and its table.
    pub store: Option<(Arc<crate::upstream::UpstreamTarget>, String)>,
}

/// Result rows kept per statement when `resultRows` is not set.
pub const DEFAULT_RESULT_ROWS: u32 = 10;

impl Recording {
    pub fn new(
        recorder: Recorder,
        settings: &RecordingSettings,
        spec: &DatabaseAccessPolicySpec,
        store: Option<(Arc<crate::upstream::UpstreamTarget>, String)>,
    ) -> Self {
        Recording {
            recorder,
            result_rows: settings.result_rows.unwrap_or(DEFAULT_RESULT_ROWS) as usize,
            durable: settings.durable.unwrap_or(false),
            policy_version: policy_version(spec),
            store,
        }
    }
}

impl Recording {
    /// Everything recorded so far is on disk and under the head.
    pub async fn flush(&self) {
        self.recorder.flush().await
    }

    /// The break the gateway found in the log at start (recording went on
    /// in a new chain), if any.
    pub fn log_break(&self) -> Option<&spool::LogBreak> {
        self.recorder.log_break()
    }
}

/// First 16 hex of SHA-256 over the spec as loaded: which policy text was
/// in force, without a cluster's generation counter.
pub fn policy_version(spec: &DatabaseAccessPolicySpec) -> String {
    let json = serde_json::to_vec(spec).unwrap_or_default();
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &json);
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// One session's recorder.
#[derive(Debug)]
pub struct SessionLog {
    rec: Arc<Recording>,
    pub session: String,
    /// Shared by the session's two halves.
    statements: std::sync::atomic::AtomicU64,
}

/// A durable record's acknowledgement: resolved once it is on disk; an
/// error means the writer failed and the statement must not complete.
pub type Ack = oneshot::Receiver<()>;

/// The facts of a statement as judged.
pub struct StatementFacts<'a> {
    pub text: &'a str,
    pub parameters: Vec<Option<String>>,
    pub verdict: RecordedVerdict,
    pub rule: Option<String>,
    pub reason: Option<String>,
    pub approval: Option<String>,
    pub approved_by: Option<String>,
}

impl SessionLog {
    pub fn new(rec: Arc<Recording>, session: String) -> Self {
        SessionLog {
            rec,
            session,
            statements: Default::default(),
        }
    }

    pub fn settings(&self) -> &Recording {
        &self.rec
    }

    fn send(&self, event: Event) -> Option<Ack> {
        self.rec
            .recorder
            .record(&self.session, event, self.rec.durable)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn start(
        &self,
        subject: &str,
        method: &str,
        claims: &[(String, String)],
        client: &str,
        application_name: &str,
        policy: &str,
        database: &str,
    ) -> Option<Ack> {
        self.send(Event::SessionStart {
            subject: subject.to_owned(),
            method: method.to_owned(),
            claims: claims.to_vec(),
            client: client.to_owned(),
            application_name: record::truncate(application_name, 256),
            policy: policy.to_owned(),
            policy_version: self.rec.policy_version.clone(),
            database: database.to_owned(),
        })
    }

    /// Record a statement; returns its number (results refer to it).
    pub fn statement(&self, f: StatementFacts<'_>) -> (u64, Option<Ack>) {
        let n = self
            .statements
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let ack = self.send(Event::Statement {
            n,
            text: record::truncate(&scrub_literals(f.text), MAX_TEXT),
            parameters: f.parameters,
            verdict: f.verdict,
            rule: f.rule,
            reason: f.reason,
            approval: f.approval,
            approved_by: f.approved_by,
        });
        (n, ack)
    }

    pub fn result(&self, r: ResultFacts) -> Option<Ack> {
        self.send(Event::Result {
            n: r.n,
            duration_us: r.duration_us,
            rows: r.rows,
            tag: r.tag,
            error: r.error.map(|e| scrub_literals(&e)),
            columns: r.columns,
            sample: r.sample,
            sample_cut: r.sample_cut,
        })
    }

    pub fn end(&self, reason: &str) -> Option<Ack> {
        self.send(Event::SessionEnd {
            reason: reason.to_owned(),
            statements: self.statements.load(std::sync::atomic::Ordering::Relaxed),
        })
    }
}

/// Card numbers, US SSNs and email addresses typed into a statement (or
/// quoted back by an error) are masked in the record: a value a column
/// mask hides in results must not reach the log through the query text.
fn scrub_literals(text: &str) -> String {
    use crate::masking::{detect, strategy::Strategy};
    use pgwarden_api::Detector;
    let rules = [(
        vec![Detector::CreditCard, Detector::UsSsn, Detector::Email],
        Strategy::Redact,
    )];
    detect::scan(text, &rules, None).unwrap_or_else(|| text.to_owned())
}

/// What a statement's answer was.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResultFacts {
    pub n: u64,
    pub duration_us: u64,
    pub rows: u64,
    pub tag: Option<String>,
    pub error: Option<String>,
    pub columns: Vec<String>,
    pub sample: Vec<Vec<Option<String>>>,
    pub sample_cut: bool,
}
