//! The refusal sentinel: a bare identifier the server is certain to reject
//! with a syntax error that quotes it, standing in for a refused message so
//! the server's own error handling keeps replies in order.

use std::fmt::Write as _;

use crate::wire::PgError;

/// A refusal waiting for its sentinel's error to come back.
pub(super) struct Pending {
    pub seq: u64,
    pub error: PgError,
}

/// Unmatched refusals are those the server discarded after an earlier error
/// in the same batch; keep a bounded number.
pub(super) const MAX_PENDING: usize = 1024;

/// A bare identifier is never a valid statement, so the server always answers
/// it with a syntax error that quotes it. Kept under 63 bytes so it is not
/// truncated as an identifier.
pub(super) fn text(nonce: &str, seq: u64) -> String {
    let mut s = String::with_capacity(56);
    let _ = write!(s, "pgwarden_refused_{nonce}_{seq}");
    s
}

/// Find our sentinel's sequence number in a server error message.
pub(super) fn seq(message: &str, nonce: &str) -> Option<u64> {
    let marker = format!("pgwarden_refused_{nonce}_");
    let at = message.find(&marker)? + marker.len();
    let digits: String = message[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// The statement name a refused Execute's sentinel is parsed under: one of
/// the proxy's own, so no client statement is redefined by it.
pub(super) fn held_statement(nonce: &str) -> String {
    format!("pgwarden_held_{nonce}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_is_short_and_found_in_a_syntax_error() {
        let nonce = "0123456789abcdef";
        let s = text(nonce, u64::MAX);
        assert!(s.len() < 63, "{} bytes", s.len());
        let msg = format!("syntax error at or near \"{s}\"");
        assert_eq!(seq(&msg, nonce), Some(u64::MAX));
        assert_eq!(seq(&msg, "fedcba9876543210"), None);
        assert_eq!(
            seq("syntax error at or near \"pgwarden_refused_\"", nonce),
            None
        );
    }
}
