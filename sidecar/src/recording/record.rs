//! The record format, sans-IO: what one line of the spool holds, how it is
//! sealed into the hash chain, and how a line is checked.
//!
//! One record per line (JSON). A line is the record's JSON with its own hash
//! appended as the last field: `{"seq":7,...,"sessionPrev":"…","hash":"…"}`.
//! The hash is SHA-256 over the exact bytes of the line without that field
//! (`{"seq":7,...,"sessionPrev":"…"}`), so any byte edited anywhere in a line
//! breaks it. Each record carries the hash of the record before it in the
//! whole log (`prev`: the chain over sessions, so deleting a whole session
//! breaks it) and of the record before it in its own session (`sessionPrev`:
//! a session verifies on its own, wherever its records are stored).

use serde::{Deserialize, Serialize};

/// `prev` of the very first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Texts longer than this are cut, with a marker saying how long they were.
pub const MAX_TEXT: usize = 64 * 1024;
/// Values (parameters, result fields) longer than this are cut likewise.
pub const MAX_VALUE: usize = 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub seq: u64,
    /// RFC 3339, microseconds.
    pub at: String,
    pub session: String,
    #[serde(flatten)]
    pub event: Event,
    pub prev: String,
    /// Empty on a session's first record.
    pub session_prev: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Event {
    #[serde(rename_all = "camelCase")]
    SessionStart {
        subject: String,
        method: String,
        /// Identity claims worth keeping (repository, workflow, pod, ...).
        claims: Vec<(String, String)>,
        client: String,
        application_name: String,
        policy: String,
        /// First 16 hex of SHA-256 over the policy spec as loaded.
        policy_version: String,
        database: String,
    },
    #[serde(rename_all = "camelCase")]
    Statement {
        /// 1, 2, ... within the session.
        n: u64,
        text: String,
        parameters: Vec<Option<String>>,
        verdict: RecordedVerdict,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rule: Option<String>,
        /// Why it was refused or needed approval (never a value).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        approval: Option<String>,
        /// Who approved it, for a released statement.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        approved_by: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    Result {
        n: u64,
        /// Microseconds from sending it upstream to its completion.
        duration_us: u64,
        rows: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tag: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// Result column names.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        columns: Vec<String>,
        /// The first rows as the client received them (masked), as text.
        sample: Vec<Vec<Option<String>>>,
        /// More rows came than were kept.
        #[serde(default)]
        sample_cut: bool,
    },
    #[serde(rename_all = "camelCase")]
    SessionEnd { reason: String, statements: u64 },
    /// The first record of a new chain, written by a gateway that found the
    /// log broken when it opened it (its `prev` is [`GENESIS`], its session
    /// empty): where the old chain broke and why. The old chain stays as it
    /// is, as evidence; `pgwarden sessions verify` reports its break and
    /// checks the new chain on its own.
    #[serde(rename_all = "camelCase")]
    LogRestart { broken_at: String, reason: String },
}

/// What became of a statement, as the log spells it. The spellings are the
/// format (old logs must still open): never rename one, only add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordedVerdict {
    /// Forwarded to the server.
    Allow,
    /// Refused; the statement did not run.
    Deny,
    /// Refused for now: it waits for a decision on its approval request.
    Held,
    /// Forwarded after a reviewer approved it (a new record, same text).
    Approved,
    /// Forwarded under an audit-mode policy whose rules would have denied it.
    #[serde(rename = "would_deny")]
    WouldDeny,
    /// Forwarded under an audit-mode policy whose rules would have held it
    /// for approval.
    #[serde(rename = "would_hold")]
    WouldHold,
}

impl RecordedVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordedVerdict::Allow => "allow",
            RecordedVerdict::Deny => "deny",
            RecordedVerdict::Held => "held",
            RecordedVerdict::Approved => "approved",
            RecordedVerdict::WouldDeny => "would_deny",
            RecordedVerdict::WouldHold => "would_hold",
        }
    }

    /// The statement did not run (the record's reason says why).
    pub fn refused(self) -> bool {
        matches!(self, RecordedVerdict::Deny | RecordedVerdict::Held)
    }

    /// It ran only because its policy is in audit mode (the record's reason
    /// says what the rules would have done).
    pub fn audited(self) -> bool {
        matches!(
            self,
            RecordedVerdict::WouldDeny | RecordedVerdict::WouldHold
        )
    }
}

impl std::fmt::Display for RecordedVerdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Event {
    /// The record's `kind`, as the line spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::SessionStart { .. } => "sessionStart",
            Event::Statement { .. } => "statement",
            Event::Result { .. } => "result",
            Event::SessionEnd { .. } => "sessionEnd",
            Event::LogRestart { .. } => "logRestart",
        }
    }
}

/// The session of a [`Event::LogRestart`] record: it belongs to none.
pub const NO_SESSION: &str = "";

/// Cut `s` to `max` bytes (on a char boundary) with a visible marker.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[truncated: {} bytes]", &s[..end], s.len())
}

fn sha256_hex(bytes: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut out = String::with_capacity(64);
    for b in d.as_ref() {
        use std::fmt::Write;
        let _ = write!(out, "{b:02x}");
    }
    out
}

const HASH_FIELD: &str = ",\"hash\":\"";

/// The line for a record (no newline) and its hash.
pub fn seal(r: &Record) -> (String, String) {
    let body = serde_json::to_string(r).expect("a Record always serializes");
    let hash = sha256_hex(body.as_bytes());
    let mut line = String::with_capacity(body.len() + 80);
    line.push_str(&body[..body.len() - 1]);
    line.push_str(HASH_FIELD);
    line.push_str(&hash);
    line.push_str("\"}");
    (line, hash)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("not a sealed record (no hash field)")]
    Unsealed,
    #[error("the hash does not match the content (edited)")]
    HashMismatch,
    #[error("not a valid record: {0}")]
    Invalid(String),
}

/// Check one line's own hash and parse it: (record, its hash).
pub fn open(line: &str) -> Result<(Record, String), LineError> {
    let at = line.rfind(HASH_FIELD).ok_or(LineError::Unsealed)?;
    let hash = line[at + HASH_FIELD.len()..]
        .strip_suffix("\"}")
        .ok_or(LineError::Unsealed)?;
    let mut body = String::with_capacity(at + 1);
    body.push_str(&line[..at]);
    body.push('}');
    if sha256_hex(body.as_bytes()) != hash {
        return Err(LineError::HashMismatch);
    }
    let r: Record = serde_json::from_str(&body).map_err(|e| LineError::Invalid(e.to_string()))?;
    Ok((r, hash.to_owned()))
}

/// What a line that does not open claims to be: its session and seq, when
/// its JSON still parses. Never trusted — only used to say which session a
/// damaged line seems to belong to.
pub fn claimed(line: &str) -> (Option<String>, Option<u64>) {
    let body = match line.rfind(HASH_FIELD) {
        Some(at) => format!("{}}}", &line[..at]),
        None => line.to_owned(),
    };
    match serde_json::from_str::<serde_json::Value>(&body) {
        Ok(v) => (
            v.get("session")
                .and_then(|s| s.as_str())
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
            v.get("seq").and_then(|s| s.as_u64()),
        ),
        Err(_) => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_line_still_says_which_session_it_claims() {
        let (line, _) = seal(&sample());
        let edited = line.replacen("SELECT", "SELECt", 1);
        assert!(open(&edited).is_err());
        assert_eq!(claimed(&edited), (Some("00000000000000ab".into()), Some(1)));
        assert_eq!(claimed("{\"seq\":3,\"sess"), (None, None));
    }

    fn sample() -> Record {
        Record {
            seq: 1,
            at: "2026-12-01T10:00:00.000001Z".into(),
            session: "00000000000000ab".into(),
            event: Event::Statement {
                n: 1,
                text: "SELECT \"x\" FROM t".into(),
                parameters: vec![Some("1".into()), None],
                verdict: RecordedVerdict::Allow,
                rule: Some("app".into()),
                reason: None,
                approval: None,
                approved_by: None,
            },
            prev: GENESIS.into(),
            session_prev: String::new(),
        }
    }

    #[test]
    fn verdicts_and_kinds_are_spelled_as_the_log_always_spelled_them() {
        for (v, s) in [
            (RecordedVerdict::Allow, "allow"),
            (RecordedVerdict::Deny, "deny"),
            (RecordedVerdict::Held, "held"),
            (RecordedVerdict::Approved, "approved"),
            (RecordedVerdict::WouldDeny, "would_deny"),
            (RecordedVerdict::WouldHold, "would_hold"),
        ] {
            assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{s}\""));
            assert_eq!(v.to_string(), s);
        }
        // An unknown verdict is not a record this version understands.
        assert!(serde_json::from_str::<RecordedVerdict>("\"maybe\"").is_err());
        let (line, _) = seal(&sample());
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["kind"], sample().event.kind());
    }

    #[test]
    fn a_sealed_line_opens_to_the_same_record() {
        let (line, hash) = seal(&sample());
        assert!(!line.contains('\n'));
        let (back, h) = open(&line).unwrap();
        assert_eq!(back, sample());
        assert_eq!(h, hash);
    }

    #[test]
    fn any_edited_byte_is_detected() {
        let (line, _) = seal(&sample());
        let bytes = line.as_bytes();
        for i in 0..bytes.len() {
            let mut b = bytes.to_vec();
            b[i] ^= 0x01;
            let Ok(edited) = String::from_utf8(b) else {
                continue;
            };
            assert!(open(&edited).is_err(), "flipping byte {i} went unnoticed");
        }
    }

    #[test]
    fn long_texts_are_cut_with_a_marker_on_a_char_boundary() {
        let s = "é".repeat(10);
        let t = truncate(&s, 5);
        assert!(
            t.starts_with("éé") && t.ends_with("…[truncated: 20 bytes]"),
            "{t}"
        );
        assert_eq!(truncate("short", 10), "short");
    }
}
