//! The shipping loop, whatever the store: read the records past a cursor,
//! hand them to a [`Sink`] in batches, move the cursor only past what the
//! sink says it stored, back off (capped) while it fails, and drain the
//! backlog once it works again. Delivery is at least once; sinks are
//! idempotent, so a batch sent twice is stored once.

use std::fs;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::recording::record;
use crate::recording::spool;

/// One sealed line of the log with the fields a store indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedRecord {
    pub seq: u64,
    pub hash: String,
    pub session: String,
    pub at: String,
    pub kind: &'static str,
    /// The line exactly as logged (its seal covers these bytes).
    pub line: String,
}

/// What a sink stored: every record of the batch up to `through` (a seq).
/// Anything after it is sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub through: u64,
}

/// Somewhere records are kept outside the gateway.
///
/// Generic, not object-safe (`deliver` returns `impl Future`): each store
/// gets its own loop and cursor, so a loop only ever drives one concrete
/// sink; static dispatch needs no boxed futures or `async-trait`.
pub trait Sink: Send + 'static {
    type Error: std::fmt::Display + Send;

    /// The cursor file's name: one per store, so two stores each get the
    /// whole log.
    fn cursor_name(&self) -> String;

    /// Store `batch` (records of chain `chain`, in log order). Must be
    /// idempotent: records stored before are stored once.
    fn deliver(
        &mut self,
        chain: &str,
        batch: &[SealedRecord],
    ) -> impl Future<Output = Result<Stored, Self::Error>> + Send;
}

/// How the loop paces itself.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Records per delivery.
    pub batch: usize,
    /// Wait when the log has nothing new.
    pub idle: Duration,
    /// The first wait after a failure; it doubles up to `max_backoff`.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            batch: 500,
            idle: Duration::from_millis(500),
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// How far a loop got (read by the shipping metrics).
#[derive(Debug, Default)]
pub struct Progress {
    /// The last seq the store holds.
    pub shipped_seq: AtomicU64,
    /// When the oldest record the store does not hold yet was written (Unix
    /// seconds), or 0 when it holds everything the loop last saw.
    pub oldest_unshipped: AtomicI64,
}

impl Progress {
    /// Seconds since the oldest record not yet shipped was written, or 0.
    pub fn lag_seconds(&self, now: i64) -> i64 {
        match self.oldest_unshipped.load(Ordering::Relaxed) {
            0 => 0,
            at => now.saturating_sub(at).max(0),
        }
    }

    fn saw(&self, shipped: u64, batch: &[SealedRecord]) {
        self.shipped_seq.store(shipped, Ordering::Relaxed);
        // An unreadable time still counts as waiting (since the epoch would
        // be absurd): as written now.
        let oldest = batch.first().map(|r| {
            r.at.parse::<k8s_openapi::jiff::Timestamp>()
                .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now())
                .as_second()
                .max(1)
        });
        self.oldest_unshipped
            .store(oldest.unwrap_or(0), Ordering::Relaxed);
    }
}

/// Doubling waits, capped; back to the first after a success.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    first: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            next: first.min(max),
            first,
            max,
        }
    }

    /// The wait after one more failure.
    pub fn fail(&mut self) -> Duration {
        let wait = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        wait
    }

    pub fn reset(&mut self) {
        self.next = self.first.min(self.max);
    }
}

/// The last seq a store holds, in a file of the spool directory.
struct Cursor {
    dir: PathBuf,
    name: String,
}

impl Cursor {
    /// A missing or unreadable cursor starts from the beginning: records
    /// sent again are stored once.
    fn read(&self) -> u64 {
        fs::read_to_string(self.dir.join(&self.name))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn write(&self, seq: u64) -> std::io::Result<()> {
        let tmp = self.dir.join(format!(".{}.tmp", self.name));
        fs::write(&tmp, format!("{seq}\n"))?;
        fs::rename(&tmp, self.dir.join(&self.name))
    }
}

/// Up to `max` complete records after `after`, in order.
pub fn read_after(dir: &Path, after: u64, max: usize) -> std::io::Result<Vec<SealedRecord>> {
    let segs = spool::segments(dir)?;
    let first_seq = |p: &PathBuf| -> u64 {
        p.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("seg-")?.strip_suffix(".jsonl")?.parse().ok())
            .unwrap_or(0)
    };
    let mut out = Vec::new();
    for (i, path) in segs.iter().enumerate() {
        // Skip segments that end before the cursor.
        if segs
            .get(i + 1)
            .is_some_and(|next| first_seq(next) <= after + 1)
        {
            continue;
        }
        let mut reader = BufReader::new(fs::File::open(path)?);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            if reader.read_until(b'\n', &mut buf)? == 0 || !buf.ends_with(b"\n") {
                break;
            }
            // Not UTF-8 (an edited byte): lossy, so its seal fails below.
            let line = String::from_utf8_lossy(&buf[..buf.len() - 1]);
            let Ok((r, hash)) = record::open(&line) else {
                // Damaged: it cannot be shipped (no valid hash), and the
                // records after it (a new chain, if the gateway restarted it)
                // must still reach the store. `sessions verify` says where.
                continue;
            };
            if r.seq <= after {
                continue;
            }
            out.push(SealedRecord {
                seq: r.seq,
                hash,
                kind: r.event.kind(),
                session: r.session,
                at: r.at,
                line: line.into_owned(),
            });
            if out.len() >= max {
                return Ok(out);
            }
        }
    }
    Ok(out)
}

/// Resolves once `shutdown` says true or its sender is gone.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// Ship the log in `dir` (chain `chain`) to `sink` until `shutdown` ends.
pub async fn run<S: Sink>(
    dir: PathBuf,
    chain: String,
    mut sink: S,
    pace: Pace,
    mut shutdown: watch::Receiver<bool>,
    progress: Arc<Progress>,
) {
    let cursor = Cursor {
        dir: dir.clone(),
        name: sink.cursor_name(),
    };
    let mut after = cursor.read();
    let mut backoff = Backoff::new(pace.first_backoff, pace.max_backoff);
    loop {
        let d = dir.clone();
        let batch = tokio::task::spawn_blocking(move || read_after(&d, after, pace.batch.max(1)));
        let batch = tokio::select! {
            r = batch => r,
            () = stopped(&mut shutdown) => return,
        };
        let batch = match batch {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "recording store: reading the spool failed");
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        progress.saw(after, &batch);
        let wait = match batch.last() {
            None => pace.idle,
            Some(last) => {
                let last = last.seq;
                // Interrupting a delivery is harmless: the cursor has not
                // moved, and the next start sends the batch again.
                let outcome = tokio::select! {
                    r = sink.deliver(&chain, &batch) => r,
                    () = stopped(&mut shutdown) => return,
                };
                match outcome {
                    Ok(Stored { through }) if through > after => {
                        // A sink cannot have stored what it was not sent.
                        after = through.min(last);
                        if let Err(e) = cursor.write(after) {
                            tracing::warn!(error = %e, "recording store: cannot move the cursor (records will be sent again, harmlessly)");
                        }
                        backoff.reset();
                        continue;
                    }
                    Ok(_) => {
                        tracing::warn!(
                            records = batch.len(),
                            "recording store stored none of the batch; retrying"
                        );
                        backoff.fail()
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, records = batch.len(), "recording store: delivery failed; records stay in the spool");
                        backoff.fail()
                    }
                }
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stopped(&mut shutdown) => return,
        }
    }
}

#[cfg(test)]
mod tests;
