//! The config stream between the operator and its sidecars (DESIGN §4): a
//! watch-style HTTPS stream. `GET /v1/config` with the sidecar's projected
//! token as bearer answers one JSON event per line (NDJSON): a snapshot
//! whenever the pod's configuration changes, a heartbeat in between so both
//! ends notice a dead peer. `POST /v1/ack` answers a snapshot (ACK or NACK).
//!
//! Both ends share these types and the line framing, so what the operator
//! writes is what the sidecar reads.

pub mod approvals;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ConfigSnapshot;

/// The stream: GET, bearer token, `200` with a chunked NDJSON body.
pub const CONFIG_PATH: &str = "/v1/config";
/// ACK/NACK of a snapshot: POST, bearer token, an [`Ack`] body.
pub const ACK_PATH: &str = "/v1/ack";
pub const CONTENT_TYPE: &str = "application/x-ndjson";
/// Longest event line either end accepts. A snapshot with a few dozen
/// policies and their CAs is well under 1 MiB; a longer line is a broken or
/// hostile peer, refused before it is buffered whole.
pub const MAX_LINE_BYTES: usize = 8 * 1024 * 1024;
/// Largest ACK body the operator reads (a version and one error message).
pub const MAX_ACK_BYTES: usize = 64 * 1024;

/// The pod annotation holding the last configuration its sidecar ACKed
/// ([`AppliedAnnotation`] as JSON).
pub const CONFIG_APPLIED_ANNOTATION: &str = "pgwarden.io/config-applied";
/// The pod annotation holding the last snapshot its sidecar refused
/// ([`ErrorAnnotation`] as JSON).
pub const CONFIG_ERROR_ANNOTATION: &str = "pgwarden.io/config-error";

/// One line of the stream. Tagged by `type`; a sidecar ignores types it does
/// not know (approvals will ride the same stream), so an older sidecar keeps
/// working against a newer operator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum StreamEvent {
    /// The pod's whole configuration; replaces the previous one.
    Snapshot { snapshot: ConfigSnapshot },
    /// Nothing changed; the operator is alive.
    Heartbeat,
    /// A request this pod opened was decided (or expired): the holding
    /// session claims it now (`approvals::CLAIM_PATH`).
    ApprovalDecided {
        request: Box<crate::ApprovalRequest>,
    },
    /// A type this build does not know (never sent by it).
    #[serde(other)]
    Unknown,
}

/// The sidecar's answer to a snapshot: applied (`error` absent) or refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `pgwarden.io/config-applied`: the ACKed version and the generation of each
/// policy it held, by name (the policy controller counts `appliedSidecars`
/// from it, whichever replica the sidecar is connected to).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedAnnotation {
    pub version: u64,
    pub policies: BTreeMap<String, i64>,
}

/// `pgwarden.io/config-error`: the refused version and the sidecar's error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorAnnotation {
    pub version: u64,
    pub error: String,
}

/// A stream line that cannot be taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LineError {
    #[error("a config stream line exceeds {max} bytes")]
    TooLong { max: usize },
    // serde_json's message only: it names a position and a type, never the
    // content (the line may hold a credential).
    #[error("a config stream line is not a valid event: {0}")]
    Invalid(String),
}

/// One event as a line (JSON and `\n`).
pub fn encode_event(event: &StreamEvent) -> Vec<u8> {
    // Serializing these types cannot fail: string keys, no non-finite floats.
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Parse one line (without its `\n`).
pub fn decode_event(line: &[u8]) -> Result<StreamEvent, LineError> {
    serde_json::from_slice(line).map_err(|e| LineError::Invalid(describe(&e)))
}

fn describe(e: &serde_json::Error) -> String {
    // Data errors quote the offending value (`invalid type: string "…"`),
    // which could be a password: keep only the category and position.
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Io => "read error",
        Category::Syntax => "malformed JSON",
        Category::Data => "unexpected field or value",
        Category::Eof => "truncated JSON",
    };
    format!("{what} at line {} column {}", e.line(), e.column())
}

/// Cuts a byte stream into lines without ever buffering more than `max`
/// bytes of an unfinished one (sans-IO: feed it what the socket gave).
#[derive(Debug)]
pub struct LineDecoder {
    buf: Vec<u8>,
    /// How far `buf` is known to hold no `\n` (no rescans of a long line).
    scanned: usize,
    max: usize,
}

impl LineDecoder {
    pub fn new(max: usize) -> Self {
        LineDecoder {
            buf: Vec::new(),
            scanned: 0,
            max,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole line (without `\n`; blank lines are skipped), `None`
    /// until one is complete, or an error once an unfinished line passed the
    /// bound (the decoder is then of no further use: drop the connection).
    pub fn next_line(&mut self) -> Result<Option<Vec<u8>>, LineError> {
        loop {
            let Some(i) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') else {
                self.scanned = self.buf.len();
                if self.buf.len() > self.max {
                    return Err(LineError::TooLong { max: self.max });
                }
                return Ok(None);
            };
            let end = self.scanned + i;
            if end > self.max {
                return Err(LineError::TooLong { max: self.max });
            }
            let mut line: Vec<u8> = self.buf.drain(..=end).collect();
            line.pop();
            self.scanned = 0;
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if !line.iter().all(u8::is_ascii_whitespace) {
                return Ok(Some(line));
            }
        }
    }

    /// Bytes held of an unfinished line.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SecretString, SnapshotCredential, SnapshotPolicy};

    fn snapshot() -> ConfigSnapshot {
        let spec = serde_yaml_ng::from_str(
            "identity: {localTrust: {subject: dev}}\n\
             database: {host: db, name: shop, credentialsSecret: s}\n\
             defaultAction: Deny\n",
        )
        .unwrap();
        ConfigSnapshot {
            version: 1_700_000_000_123,
            policies: vec![SnapshotPolicy {
                namespace: "ci".into(),
                name: "p".into(),
                spec,
                credential: SnapshotCredential {
                    username: "app".into(),
                    password: SecretString("s3cret-pw".into()),
                },
                ca_pem: None,
                recording_dsn: None,
                fingerprint_key: None,
                source: None,
            }],
            masking_key: None,
            pod: None,
        }
    }

    #[test]
    fn events_round_trip_as_one_line_each() {
        let events = [
            StreamEvent::Snapshot {
                snapshot: snapshot(),
            },
            StreamEvent::Heartbeat,
        ];
        let mut d = LineDecoder::new(MAX_LINE_BYTES);
        for e in &events {
            let line = encode_event(e);
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            // Fed in small pieces, as a socket may deliver it.
            for chunk in line.chunks(7) {
                d.push(chunk);
            }
        }
        let mut got = Vec::new();
        while let Some(line) = d.next_line().unwrap() {
            got.push(decode_event(&line).unwrap());
        }
        assert_eq!(got, events);
        assert_eq!(
            String::from_utf8(encode_event(&StreamEvent::Heartbeat)).unwrap(),
            "{\"type\":\"Heartbeat\"}\n"
        );
    }

    #[test]
    fn an_unknown_event_type_is_not_an_error() {
        let e = decode_event(br#"{"type":"SomethingNewer","id":"x"}"#).unwrap();
        assert_eq!(e, StreamEvent::Unknown);
    }

    #[test]
    fn garbage_is_an_error_that_never_quotes_the_line() {
        for bad in [
            &b"not json"[..],
            br#"{"type":"Snapshot"}"#,
            br#"{"type":"Snapshot","snapshot":{"version":"hunter2","policies":[]}}"#,
            br#"{"type":"Snapshot","snapshot":{"version":1,"policies":[{"name":"hunter2"}"#,
            br#"{"snapshot":{}}"#,
            b"\xff\xfe",
        ] {
            let err = decode_event(bad).unwrap_err();
            assert!(matches!(err, LineError::Invalid(_)), "{err:?}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn an_unfinished_line_over_the_bound_is_refused_before_it_is_whole() {
        let mut d = LineDecoder::new(16);
        d.push(b"{\"type\":");
        assert_eq!(d.next_line(), Ok(None));
        d.push(b"\"Heartbeat\"}and-more-without-an-end");
        assert_eq!(d.next_line(), Err(LineError::TooLong { max: 16 }));
        // A complete line over the bound too.
        let mut d = LineDecoder::new(16);
        d.push(b"{\"type\":\"Heartbeat\",\"x\":1}\n");
        assert_eq!(d.next_line(), Err(LineError::TooLong { max: 16 }));
        // At the bound: taken.
        let mut d = LineDecoder::new(20);
        d.push(b"{\"type\":\"Heartbeat\"}\n\r\n");
        assert_eq!(d.next_line().unwrap().unwrap().len(), 20);
        assert_eq!(d.next_line(), Ok(None));
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn annotations_have_the_documented_shape() {
        let a = AppliedAnnotation {
            version: 5,
            policies: [("p".to_string(), 3)].into(),
        };
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            r#"{"version":5,"policies":{"p":3}}"#
        );
        let nack: Ack = serde_json::from_str(r#"{"version":5,"error":"bad"}"#).unwrap();
        assert_eq!(nack.error.as_deref(), Some("bad"));
        assert_eq!(
            serde_json::to_string(&Ack {
                version: 5,
                error: None
            })
            .unwrap(),
            r#"{"version":5}"#
        );
    }
}
