//! `limits` from the policy, as sans-IO state machines the relay consults.
//!
//! maxRows: rows of one result are counted as they stream. Past the limit the
//! proxy stops forwarding rows, cancels the statement upstream, and ends the
//! result with an ERROR saying the limit was hit — a cut-off result is never
//! presented as complete. After that ERROR it drops what the server still
//! sends for that request (as a server skips to Sync after an error) until
//! ReadyForQuery.
//!
//! statementTimeout: the server's own statement_timeout is pinned at login;
//! `StatementClock` is the proxy-side guard that cancels a request the server
//! has not finished well after the timeout.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::wire::PgError;

/// What to do with one backend message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowAction {
    Forward,
    Drop,
    /// Drop it, and cancel the running statement upstream.
    DropAndCancel,
    /// Send the limit error instead of it.
    ReplaceWithError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowState {
    Counting,
    /// Over the limit: rows are dropped until the result ends.
    Cut,
    /// The error was sent: drop the rest of the request until ReadyForQuery.
    Skipping,
}

#[derive(Debug)]
pub struct RowLimiter {
    max: u64,
    rows: u64,
    state: RowState,
}

impl RowLimiter {
    pub fn new(max: u64) -> Self {
        RowLimiter {
            max,
            rows: 0,
            state: RowState::Counting,
        }
    }

    pub fn error(&self) -> PgError {
        PgError::limit_exceeded(format!(
            "the result has more than {} rows (limits.maxRows); it was cut off and is not complete",
            self.max
        ))
        .with_hint("narrow the query (WHERE, LIMIT) or page through it")
    }

    pub fn on_message(&mut self, ty: u8) -> RowAction {
        use RowAction::*;
        // Asynchronous messages are never part of a result.
        if matches!(ty, b'N' | b'A' | b'S') {
            return Forward;
        }
        if ty == b'Z' {
            self.rows = 0;
            self.state = RowState::Counting;
            return Forward;
        }
        match self.state {
            RowState::Counting => match ty {
                // DataRow, or a row of COPY TO STDOUT.
                b'D' | b'd' => {
                    self.rows += 1;
                    if self.rows > self.max {
                        self.state = RowState::Cut;
                        DropAndCancel
                    } else {
                        Forward
                    }
                }
                // A result ended; PortalSuspended keeps counting the portal.
                b'C' | b'I' | b'E' => {
                    self.rows = 0;
                    Forward
                }
                _ => Forward,
            },
            RowState::Cut => match ty {
                // The end of the cut result, whatever form it takes (our
                // cancel's 57014 error, CommandComplete if the statement won
                // the race, CopyDone, PortalSuspended).
                b'C' | b'E' | b's' | b'I' | b'c' => {
                    self.state = RowState::Skipping;
                    ReplaceWithError
                }
                _ => Drop,
            },
            RowState::Skipping => Drop,
        }
    }
}

/// How long a request may run past the server's own statement_timeout
/// before the proxy cancels it.
pub const GUARD_GRACE: Duration = Duration::from_secs(2);

/// When the request the server is working on started, shared by the relay's
/// two halves (atomics: the halves may run on different threads).
pub struct StatementClock {
    epoch: Instant,
    /// Requests sent that have not had their ReadyForQuery yet.
    outstanding: AtomicU32,
    /// Start of the current request, ms since `epoch`.
    since_ms: AtomicU64,
    /// The start time a cancel was already sent for.
    cancelled_ms: AtomicU64,
}

impl Default for StatementClock {
    fn default() -> Self {
        StatementClock {
            epoch: Instant::now(),
            outstanding: AtomicU32::new(0),
            since_ms: AtomicU64::new(0),
            cancelled_ms: AtomicU64::new(u64::MAX),
        }
    }
}

impl StatementClock {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A request that ends in ReadyForQuery went upstream (Query, Sync, FunctionCall).
    pub fn request_sent(&self) {
        if self.outstanding.fetch_add(1, Ordering::AcqRel) == 0 {
            self.since_ms.store(self.now_ms(), Ordering::Release);
        }
    }

    /// Syncs the server ignored (inside COPY FROM STDIN) were counted as
    /// requests: take them back.
    pub fn requests_ignored(&self, n: u32) {
        let _ = self
            .outstanding
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| {
                Some(o.saturating_sub(n))
            });
    }

    /// ReadyForQuery came back.
    pub fn request_done(&self) {
        let before = self
            .outstanding
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(1))
            })
            .unwrap_or(0);
        if before > 1 {
            // The next pipelined request starts now.
            self.since_ms.store(self.now_ms(), Ordering::Release);
        }
    }

    /// No request is waiting for its ReadyForQuery.
    pub fn idle(&self) -> bool {
        self.outstanding.load(Ordering::Acquire) == 0
    }

    /// True once per overdue request: the caller should cancel it.
    pub fn overdue(&self, timeout: Duration) -> bool {
        if self.outstanding.load(Ordering::Acquire) == 0 {
            return false;
        }
        let since = self.since_ms.load(Ordering::Acquire);
        let limit = u64::try_from((timeout + GUARD_GRACE).as_millis()).unwrap_or(u64::MAX);
        if self.now_ms().saturating_sub(since) < limit {
            return false;
        }
        self.cancelled_ms.swap(since, Ordering::AcqRel) != since
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RowAction::*;

    fn run(limiter: &mut RowLimiter, msgs: &[u8]) -> Vec<RowAction> {
        msgs.iter().map(|&t| limiter.on_message(t)).collect()
    }

    #[test]
    fn results_within_the_limit_pass_untouched() {
        let mut l = RowLimiter::new(2);
        // Two results of two rows each in one simple query.
        assert_eq!(run(&mut l, b"TDDCTDDCZ"), vec![Forward; 9]);
    }

    #[test]
    fn a_result_over_the_limit_ends_in_an_error_not_a_short_success() {
        let mut l = RowLimiter::new(2);
        let got = run(&mut l, b"TDDDDNCZ");
        assert_eq!(
            got,
            vec![
                Forward,
                Forward,
                Forward,
                DropAndCancel,
                Drop,
                Forward,
                ReplaceWithError,
                Forward
            ]
        );
        // The cancel's error (instead of CommandComplete) ends it the same way,
        // and what follows in the same request is dropped.
        let mut l = RowLimiter::new(1);
        assert_eq!(
            run(&mut l, b"TDDETDCZ"),
            vec![
                Forward,
                Forward,
                DropAndCancel,
                ReplaceWithError,
                Drop,
                Drop,
                Drop,
                Forward
            ]
        );
        // The next request is counted afresh.
        assert_eq!(run(&mut l, b"TDCZ"), vec![Forward; 4]);
        assert_eq!(l.error().code.code(), "54000");
    }

    #[test]
    fn copy_out_rows_count_and_portals_keep_counting_across_suspension() {
        let mut l = RowLimiter::new(2);
        assert_eq!(
            run(&mut l, b"HdddcCZ")[3..5],
            [DropAndCancel, ReplaceWithError]
        );
        let mut l = RowLimiter::new(3);
        // Execute with a row limit: D D s (suspended), then D D: 4 rows.
        assert_eq!(run(&mut l, b"DDsDD")[4], DropAndCancel);
    }

    #[test]
    fn the_clock_flags_an_overdue_request_once() {
        let c = StatementClock::default();
        assert!(!c.overdue(Duration::ZERO));
        c.request_sent();
        assert!(!c.overdue(Duration::from_secs(60)));
        // With no time allowed at all (beyond the grace), it is overdue once
        // the grace passes; simulate by a zero-grace check via a past start.
        c.since_ms.store(0, Ordering::Release);
        std::thread::sleep(GUARD_GRACE + Duration::from_millis(20));
        assert!(c.overdue(Duration::ZERO));
        assert!(!c.overdue(Duration::ZERO), "one cancel per request");
        c.request_done();
        assert!(!c.overdue(Duration::ZERO));
    }
}
