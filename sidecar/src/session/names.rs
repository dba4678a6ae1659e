//! Prepared-statement names the server has not confirmed yet, sans-IO.
//!
//! pgwarden decides what a statement name means when the client creates it
//! (Parse, SQL PREPARE) or drops it (Close, DEALLOCATE) — but the server may
//! refuse the change: the name exists already (42P05), the transaction is
//! aborted, or an earlier message of the same pipeline failed and the server
//! skipped the rest to Sync. The name then keeps its *old* meaning on the
//! server, which may be a statement held for approval. So every change is
//! remembered with its place in the server's answers, and the server half
//! reports, per request (Query or Sync), how many Parse, Close and statement
//! completions came back. A change that did not complete is *failed*: the
//! session forgets the name (SQL EXECUTE refused, masking assumes the worst)
//! and refuses to bind it until the client prepares or closes it again.
//!
//! Inside one request a failed change needs no report: the server skips
//! everything after an error until the request ends, so a later use in the
//! same request is skipped too. A use in a *later* request of a name whose
//! change is not yet resolved waits for the server's answer to that request.

use std::collections::{HashMap, HashSet, VecDeque};

/// A map keyed by a client-chosen statement or portal name. aHash, keyed
/// per map at random, resists collision flooding like std's SipHash at a
/// fraction of its cost: several lookups happen per statement (issue #21).
pub type NameMap<V> = HashMap<String, V, ahash::RandomState>;
type NameSet = HashSet<String, ahash::RandomState>;

/// Which reply confirms a change: the n-th of its kind in its request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Parse(u32),
    Close(u32),
    /// The n-th statement of a simple Query (its CommandComplete).
    Command(u32),
}

#[derive(Debug)]
struct Change {
    request: u64,
    step: Step,
    /// None: every name (DEALLOCATE ALL, DISCARD ALL).
    name: Option<String>,
}

/// What the server answered to one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestOutcome {
    pub request: u64,
    pub parses: u32,
    pub closes: u32,
    pub commands: u32,
    /// Executes completed (CommandComplete, PortalSuspended, EmptyQueryResponse).
    pub executes: u32,
}

/// What the server half tells the client half, in the server's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerEvent {
    /// A ReadyForQuery: the request's counts.
    Answered(RequestOutcome),
    /// CopyInResponse in `request`, after `executes` completed Executes.
    CopyIn { request: u64, executes: u32 },
    /// The server left copy-in mode with an error.
    CopyAborted,
}

/// Names whose change failed on the server.
#[derive(Debug, PartialEq, Eq)]
pub enum Failed {
    Name(String),
    All,
}

#[derive(Debug, Default)]
pub struct NameLedger {
    /// Requests sent so far: the current request's number.
    request: u64,
    parses: u32,
    closes: u32,
    pending: VecDeque<Change>,
    /// Names in an unknown state: refused until prepared or closed again.
    unknown: NameSet,
    /// The type of every message sent in requests not yet answered, with its
    /// request: how a COPY FROM STDIN is placed (below).
    sent: VecDeque<(u64, u8)>,
    /// `sent` overflowed: a copy cannot be placed.
    sent_overflowed: bool,
}

/// Messages remembered in flight; a deeper pipeline that also starts a COPY
/// FROM STDIN ends the session rather than guess.
const MAX_SENT: usize = 16 * 1024;

/// How a COPY FROM STDIN the server started fits the requests sent.
#[derive(Debug, PartialEq, Eq)]
pub struct CopyStart {
    /// Syncs the server ignored (it ignores Sync in copy-in mode): they end
    /// no request, so later requests are renumbered.
    pub ignored: u64,
    /// No CopyDone or CopyFail has been sent yet: until one is, the client's
    /// Syncs are ignored too.
    pub in_copy: bool,
}

impl NameLedger {
    pub fn parse_sent(&mut self, name: &str) {
        self.record(Step::Parse(self.parses), Some(name));
        self.parses += 1;
    }

    pub fn close_sent(&mut self, name: &str) {
        self.record(Step::Close(self.closes), Some(name));
        self.closes += 1;
    }

    /// A Close of a portal: counted (its reply is a CloseComplete too).
    pub fn close_portal_sent(&mut self) {
        self.closes += 1;
    }

    /// Statement `index` of the Query being sent prepares or drops `name`.
    pub fn command_sent(&mut self, index: u32, name: Option<&str>) {
        self.record(Step::Command(index), name);
    }

    /// A message went upstream (before `request_sent` for the one that ends
    /// a request).
    pub fn sent(&mut self, ty: u8) {
        if self.sent.len() >= MAX_SENT {
            self.sent.pop_front();
            self.sent_overflowed = true;
        }
        self.sent.push_back((self.request, ty));
    }

    /// Requests before `done` are answered: forget their messages.
    pub fn answered_before(&mut self, done: u64) {
        while self.sent.front().is_some_and(|(r, _)| *r < done) {
            self.sent.pop_front();
        }
        if self.sent.is_empty() {
            self.sent_overflowed = false;
        }
    }

    /// The server started a COPY FROM STDIN in `request` after `executes`
    /// completed Executes of it (for a simple Query, the Query itself). It
    /// ignores every Sync until the copy ends with the client's CopyDone or
    /// CopyFail; anything else the client pipelined behind the copy would
    /// end it with an error at a place the proxy cannot know: Err.
    pub fn copy_started(&mut self, request: u64, executes: u32) -> Result<CopyStart, String> {
        let behind = "messages were pipelined behind COPY FROM STDIN";
        if self.sent_overflowed {
            return Err(format!("{behind}, deeper than pgwarden follows"));
        }
        let in_request = |(r, _): &&(u64, u8)| *r == request;
        let start = match self
            .sent
            .iter()
            .filter(in_request)
            .position(|(_, t)| *t == b'Q')
        {
            Some(_) => self
                .sent
                .iter()
                .position(|&(r, t)| r == request && t == b'Q'),
            None => self
                .sent
                .iter()
                .enumerate()
                .filter(|(_, &(r, t))| r == request && t == b'E')
                .nth(executes as usize)
                .map(|(i, _)| i),
        }
        .ok_or_else(|| "the server started a COPY the proxy did not send".to_owned())?;
        let mut ignored: Vec<u64> = Vec::new();
        let mut in_copy = true;
        for &(r, t) in self.sent.iter().skip(start + 1) {
            match t {
                b'S' if in_copy => ignored.push(r),
                b'c' | b'f' => in_copy = false,
                b'd' | b'H' | b'S' => {}
                _ if in_copy => return Err(behind.to_owned()),
                _ => {}
            }
        }
        // Each ignored Sync ended a request only in the proxy's count.
        let shift = |r: u64| r - ignored.iter().filter(|&&j| j < r).count() as u64;
        let mut i = 0;
        let mut kept = VecDeque::with_capacity(self.sent.len());
        for (r, t) in self.sent.drain(..) {
            if i > start && t == b'S' && ignored.contains(&r) {
                i += 1;
                continue;
            }
            kept.push_back((shift(r), t));
            i += 1;
        }
        self.sent = kept;
        for c in &mut self.pending {
            c.request = shift(c.request);
        }
        let n = ignored.len() as u64;
        self.request -= n;
        Ok(CopyStart {
            ignored: n,
            in_copy,
        })
    }

    /// A Query or Sync went upstream: the next message starts a request.
    pub fn request_sent(&mut self) {
        self.request += 1;
        self.parses = 0;
        self.closes = 0;
    }

    fn record(&mut self, step: Step, name: Option<&str>) {
        if let Some(n) = name {
            self.unknown.remove(n);
        } else {
            self.unknown.clear();
        }
        self.pending.push_back(Change {
            request: self.request,
            step,
            name: name.map(str::to_owned),
        });
    }

    /// Whether anything awaits the server's word (the server half reports
    /// outcomes only then).
    pub fn is_quiet(&self) -> bool {
        self.pending.is_empty() && self.unknown.is_empty()
    }

    /// The request whose outcome must be known before `name` can be used
    /// now: one before the current request that changed it.
    pub fn wait_for(&self, name: &str) -> Option<u64> {
        self.pending
            .iter()
            .filter(|c| c.request < self.request)
            .filter(|c| c.name.as_deref().is_none_or(|n| n == name))
            .map(|c| c.request)
            .max()
    }

    pub fn is_unknown(&self, name: &str) -> bool {
        self.unknown.contains(name)
    }

    /// Settle the changes of one request; returns those that failed.
    pub fn resolve(&mut self, o: RequestOutcome) -> Vec<Failed> {
        let mut failed = Vec::new();
        while let Some(c) = self.pending.front() {
            if c.request > o.request {
                break;
            }
            let Some(c) = self.pending.pop_front() else {
                break;
            };
            let done = c.request == o.request
                && match c.step {
                    Step::Parse(k) => k < o.parses,
                    Step::Close(k) => k < o.closes,
                    Step::Command(k) => k < o.commands,
                };
            if done {
                continue;
            }
            match c.name {
                Some(n) => {
                    self.unknown.insert(n.clone());
                    failed.push(Failed::Name(n));
                }
                None => failed.push(Failed::All),
            }
        }
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(l: &mut NameLedger, types: &[u8]) {
        for &t in types {
            l.sent(t);
            if matches!(t, b'S' | b'Q') {
                l.request_sent();
            }
        }
    }

    /// tokio-postgres sends Bind, Execute, Sync before the copy data: the
    /// server ignores that Sync, and the one after CopyDone ends the request.
    #[test]
    fn a_sync_inside_copy_in_ends_no_request() {
        let mut l = NameLedger::default();
        send(&mut l, b"BES");
        assert_eq!(l.request, 1);
        assert_eq!(
            l.copy_started(0, 0),
            Ok(CopyStart {
                ignored: 1,
                in_copy: true
            })
        );
        assert_eq!(l.request, 0);
        send(&mut l, b"dcS");
        l.parse_sent("p");
        assert_eq!(l.request, 1);
        send(&mut l, b"S");
        // The server answers request 0 (the copy), then 1 (the Parse).
        assert!(l.resolve(outcome(0, 0, 0, 1)).is_empty());
        assert!(l.resolve(outcome(1, 1, 0, 0)).is_empty());
        assert!(l.is_quiet());
    }

    #[test]
    fn copies_place_themselves_by_execute_and_query() {
        // A Query that copies, with bare Syncs pipelined behind it: only
        // the Query ends a request.
        let mut l = NameLedger::default();
        send(&mut l, b"QSS");
        let c = l.copy_started(0, 0).unwrap();
        assert_eq!(
            c,
            CopyStart {
                ignored: 2,
                in_copy: true
            }
        );
        assert_eq!(l.request, 1);
        // The second Execute of a request starts the copy.
        let mut l = NameLedger::default();
        send(&mut l, b"BEBES");
        let c = l.copy_started(0, 1).unwrap();
        assert_eq!(c.ignored, 1);
        // Data and CopyDone already sent: the copy is over for the client.
        let mut l = NameLedger::default();
        send(&mut l, b"BEdcS");
        assert_eq!(
            l.copy_started(0, 0),
            Ok(CopyStart {
                ignored: 0,
                in_copy: false
            })
        );
    }

    #[test]
    fn anything_else_behind_a_copy_ends_the_session() {
        for behind in [&b"BESBES"[..], b"BESQ", b"BEPS"] {
            let mut l = NameLedger::default();
            send(&mut l, behind);
            assert!(
                l.copy_started(0, 0).is_err(),
                "{:?}",
                String::from_utf8_lossy(behind)
            );
        }
        let mut l = NameLedger::default();
        send(&mut l, b"BS");
        assert!(l.copy_started(0, 0).is_err(), "no Execute to start a copy");
    }

    fn outcome(request: u64, parses: u32, closes: u32, commands: u32) -> RequestOutcome {
        RequestOutcome {
            request,
            parses,
            closes,
            commands,
            executes: commands,
        }
    }

    #[test]
    fn a_change_the_server_completed_is_settled() {
        let mut l = NameLedger::default();
        l.parse_sent("s1");
        l.request_sent();
        assert_eq!(l.wait_for("s1"), Some(0));
        assert_eq!(l.wait_for("other"), None);
        assert!(l.resolve(outcome(0, 1, 0, 0)).is_empty());
        assert_eq!(l.wait_for("s1"), None);
        assert!(l.is_quiet());
    }

    #[test]
    fn changes_after_an_error_in_their_request_fail() {
        let mut l = NameLedger::default();
        // Parse "bad" fails, so Parse "p" (the second) is skipped.
        l.parse_sent("bad");
        l.parse_sent("p");
        l.close_sent("q");
        l.request_sent();
        let failed = l.resolve(outcome(0, 0, 0, 0));
        assert_eq!(
            failed,
            vec![
                Failed::Name("bad".into()),
                Failed::Name("p".into()),
                Failed::Name("q".into())
            ]
        );
        assert!(l.is_unknown("p"));
        // Preparing it again clears the doubt (and is itself pending).
        l.parse_sent("p");
        assert!(!l.is_unknown("p"));
        // Same request: used optimistically.
        assert_eq!(l.wait_for("p"), None);
    }

    #[test]
    fn sql_statements_count_by_position() {
        let mut l = NameLedger::default();
        // `SELECT 1/0; PREPARE p AS SELECT 1`: the PREPARE is statement 1.
        l.command_sent(1, Some("p"));
        l.request_sent();
        assert_eq!(
            l.resolve(outcome(0, 0, 0, 0)),
            vec![Failed::Name("p".into())]
        );
        l.command_sent(0, None);
        l.request_sent();
        assert!(l.resolve(outcome(1, 0, 0, 1)).is_empty());
        // A failed DEALLOCATE ALL leaves every name in doubt.
        l.command_sent(0, None);
        l.request_sent();
        assert_eq!(l.resolve(outcome(2, 0, 0, 0)), vec![Failed::All]);
    }

    #[test]
    fn outcomes_of_requests_without_changes_are_harmless() {
        let mut l = NameLedger::default();
        l.request_sent();
        l.parse_sent("s");
        l.request_sent();
        assert!(l.resolve(outcome(0, 0, 0, 0)).is_empty());
        assert_eq!(l.wait_for("s"), Some(1));
        assert!(l.resolve(outcome(1, 1, 0, 0)).is_empty());
        assert!(l.is_quiet());
    }
}
