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

use std::collections::{HashSet, VecDeque};

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
    unknown: HashSet<String>,
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

    fn outcome(request: u64, parses: u32, closes: u32, commands: u32) -> RequestOutcome {
        RequestOutcome {
            request,
            parses,
            closes,
            commands,
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
