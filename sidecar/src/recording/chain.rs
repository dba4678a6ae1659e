//! Verifying the log, sans-IO: lines in (in log order), the first broken
//! link out. What each check catches:
//! - a line whose own hash does not match: an edited byte;
//! - `seq` not one more than the line before, or `prev` not that line's
//!   hash: a deleted, inserted or reordered record (a whole session deleted
//!   is such a gap in the chain over sessions);
//! - `sessionPrev` not the hash of the session's previous record: a record
//!   moved between sessions, or a session's records replaced;
//! - the log ending before the head (the last record the writer vouched for,
//!   kept in a separate file): records cut off the end, or a torn last line.
//!
//! A log can hold several chains: a gateway that finds the log broken when it
//! starts keeps the old chain as it is and begins a new one with a
//! `logRestart` record. [`LogVerifier`] reports every chain: the old one as
//! broken (where the check finds the break, or the restart record's own
//! account of it), each new one checked on its own.

use std::collections::HashMap;

use super::record::{self, Event, Record, GENESIS};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    #[error("record edited: {0}")]
    Edited(String),
    #[error("chain broken: expected record {expected_seq} after {after}, found record {found_seq} (records deleted, inserted or reordered)")]
    Gap {
        expected_seq: u64,
        found_seq: u64,
        after: String,
    },
    #[error("chain broken: record {seq} does not follow the record before it (prev hash differs)")]
    Prev { seq: u64 },
    #[error("session chain broken: record {seq} does not follow the previous record of session {session}")]
    SessionPrev { seq: u64, session: String },
    #[error("truncated: the log ends at record {last} but the head says {head}")]
    Truncated { last: u64, head: u64 },
    #[error("truncated: the last line is incomplete")]
    TornLine,
    #[error(
        "the head names record {seq} with another hash than the log has (head or log rewritten)"
    )]
    HeadMismatch { seq: u64 },
    #[error("the gateway found the log broken when it started ({at}: {reason}) and began a new chain with record {seq}")]
    Restarted {
        at: String,
        reason: String,
        seq: u64,
    },
}

/// What an intact log holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub records: u64,
    pub sessions: u64,
    pub last_seq: u64,
    pub last_hash: String,
}

#[derive(Debug)]
pub struct Verifier {
    summary: Summary,
    /// Hash of each session's latest record.
    sessions: HashMap<String, String>,
    /// The last record the writer vouched for: (seq, hash).
    head: Option<(u64, String)>,
}

impl Verifier {
    pub fn new(head: Option<(u64, String)>) -> Self {
        Verifier {
            summary: Summary {
                last_hash: GENESIS.into(),
                ..Summary::default()
            },
            sessions: HashMap::new(),
            head,
        }
    }

    /// One complete line (without its newline).
    pub fn feed(&mut self, line: &str) -> Result<Record, Broken> {
        let (r, hash) = record::open(line).map_err(|e| Broken::Edited(e.to_string()))?;
        let expected = self.summary.last_seq + 1;
        if r.seq != expected {
            return Err(Broken::Gap {
                expected_seq: expected,
                found_seq: r.seq,
                after: if self.summary.last_seq == 0 {
                    "the start of the log".into()
                } else {
                    format!("record {}", self.summary.last_seq)
                },
            });
        }
        if r.prev != self.summary.last_hash {
            return Err(Broken::Prev { seq: r.seq });
        }
        let session_ok = match (&r.event, self.sessions.get(&r.session)) {
            (Event::SessionStart { .. }, None) => r.session_prev.is_empty(),
            (Event::SessionStart { .. }, Some(_)) => false,
            (_, Some(last)) => &r.session_prev == last,
            (_, None) => false,
        };
        if !session_ok {
            return Err(Broken::SessionPrev {
                seq: r.seq,
                session: r.session.clone(),
            });
        }
        if self
            .head
            .as_ref()
            .is_some_and(|(seq, h)| *seq == r.seq && *h != hash)
        {
            return Err(Broken::HeadMismatch { seq: r.seq });
        }
        if matches!(r.event, Event::SessionStart { .. }) {
            self.summary.sessions += 1;
        }
        self.sessions.insert(r.session.clone(), hash.clone());
        self.summary.records += 1;
        self.summary.last_seq = r.seq;
        self.summary.last_hash = hash;
        Ok(r)
    }

    /// Start the chain at a `logRestart` record (seq `seq`, hash `hash`).
    fn begin_at(&mut self, seq: u64, hash: String) -> Result<(), Broken> {
        if self
            .head
            .as_ref()
            .is_some_and(|(hseq, h)| *hseq == seq && *h != hash)
        {
            return Err(Broken::HeadMismatch { seq });
        }
        self.summary.records = 1;
        self.summary.last_seq = seq;
        self.summary.last_hash = hash;
        Ok(())
    }

    /// After the last line: the log must reach the head.
    pub fn finish(self) -> Result<Summary, Broken> {
        if let Some((seq, _)) = &self.head {
            if self.summary.last_seq < *seq {
                return Err(Broken::Truncated {
                    last: self.summary.last_seq,
                    head: *seq,
                });
            }
        }
        Ok(self.summary)
    }
}

/// One chain of a log and what verifying it found; `P` says where a line
/// is (a file and line, a position in a store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport<P> {
    /// Where its first line is (`None`: a log without lines).
    pub from: Option<P>,
    /// Intact, or the first broken link and where it is.
    pub outcome: Result<Summary, (P, Broken)>,
}

/// Verify a whole log, chain by chain: lines in, one [`ChainReport`] per
/// chain out. After the first broken link of a chain its remaining lines
/// are skipped up to the next `logRestart` record, which starts a new chain.
#[derive(Debug)]
pub struct LogVerifier<P> {
    head: Option<(u64, String)>,
    chain: Verifier,
    from: Option<P>,
    broken: Option<(P, Broken)>,
    done: Vec<ChainReport<P>>,
}

/// A sealed `logRestart` record that starts a chain: (seq, hash, where the
/// old chain broke, why).
fn restart(line: &str) -> Option<(u64, String, String, String)> {
    let (r, hash) = record::open(line).ok()?;
    match r.event {
        Event::LogRestart { broken_at, reason } if r.prev == GENESIS => {
            Some((r.seq, hash, broken_at, reason))
        }
        _ => None,
    }
}

impl<P: Clone> LogVerifier<P> {
    pub fn new(head: Option<(u64, String)>) -> Self {
        LogVerifier {
            chain: Verifier::new(head.clone()),
            head,
            from: None,
            broken: None,
            done: Vec::new(),
        }
    }

    /// One complete line (without its newline) at `place`.
    pub fn feed(&mut self, place: P, line: &str) {
        if let Some((seq, hash, at, reason)) = restart(line) {
            // The chain before ends here, broken: where the check found it,
            // else as the restart record says (a cut-off tail, say, which
            // only the head that was replaced since could show).
            let outcome = match self.broken.take() {
                Some(b) => Err(b),
                None => Err((place.clone(), Broken::Restarted { at, reason, seq })),
            };
            self.done.push(ChainReport {
                from: self.from.take(),
                outcome,
            });
            self.chain = Verifier::new(self.head.clone());
            self.from = Some(place.clone());
            if let Err(b) = self.chain.begin_at(seq, hash) {
                self.broken = Some((place, b));
            }
            return;
        }
        if self.broken.is_some() {
            return;
        }
        if self.from.is_none() {
            self.from = Some(place.clone());
        }
        if let Err(b) = self.chain.feed(line) {
            self.broken = Some((place, b));
        }
    }

    /// A last line without its newline at `place`.
    pub fn torn(&mut self, place: P) {
        if self.from.is_none() {
            self.from = Some(place.clone());
        }
        if self.broken.is_none() {
            self.broken = Some((place, Broken::TornLine));
        }
    }

    /// After the last line; `end` is blamed for what is missing at the end.
    pub fn finish(mut self, end: P) -> Vec<ChainReport<P>> {
        let outcome = match self.broken {
            Some(b) => Err(b),
            None => self.chain.finish().map_err(|b| (end, b)),
        };
        self.done.push(ChainReport {
            from: self.from,
            outcome,
        });
        self.done
    }
}

/// Verify one session on its own (from any store): its records in order.
pub fn verify_session(lines: &[&str]) -> Result<Vec<Record>, (usize, Broken)> {
    let mut out = Vec::with_capacity(lines.len());
    let mut last: Option<String> = None;
    for (i, line) in lines.iter().enumerate() {
        let (r, hash) = record::open(line).map_err(|e| (i, Broken::Edited(e.to_string())))?;
        let ok = match (&last, &r.event) {
            (None, Event::SessionStart { .. }) => r.session_prev.is_empty(),
            (Some(prev), _) => &r.session_prev == prev,
            (None, _) => false,
        };
        if !ok {
            return Err((
                i,
                Broken::SessionPrev {
                    seq: r.seq,
                    session: r.session.clone(),
                },
            ));
        }
        last = Some(hash);
        out.push(r);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
