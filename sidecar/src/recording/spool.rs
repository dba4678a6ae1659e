//! The spool: the log on local disk, under `<state-dir>/recordings/`.
//!
//! - `seg-<first seq>.jsonl`: segments of sealed records, one per line,
//!   appended only; a new segment starts past `SEGMENT_BYTES`;
//! - `head`: the last record known to be on disk (seq and hash), replaced
//!   atomically after an fsync, at most every `HEAD_EVERY`.
//!
//! - `writer.lock`: held (flock) by the one writer for its life, naming its
//!   pid and start time: a second gateway on the same state directory would
//!   interleave its records with the first's and break the chain, so it is
//!   refused at start with the holder's name.
//!
//! A log found broken at start (a damaged record or a broken link in the
//! newest segment, a head past the log's end or naming another hash) is
//! kept as it is, as evidence, and recording goes on in a new chain: a new
//! segment whose first record (`logRestart`) names the break. A broken log
//! never keeps the gateway from serving.
//!
//! One writer thread owns the files and the chain: sessions send events,
//! the writer numbers, seals and appends them. An event sent with an ack is
//! acknowledged only after the fsync that covers it (group commit: one fsync
//! per batch, whatever the number of sessions); the others reach the disk
//! within `SYNC_EVERY`.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use tokio::sync::oneshot;

use super::chain::Broken;
use super::record::{self, Event, Record, GENESIS, NO_SESSION};

pub const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// Records not asked to be durable reach the disk within this.
pub const SYNC_EVERY: Duration = Duration::from_millis(200);
/// ... and the log file (the OS) within this: the writer is not woken per
/// record, which would cost a thread switch per statement.
pub const WRITE_EVERY: Duration = Duration::from_millis(20);
/// The head is rewritten at most this often.
pub const HEAD_EVERY: Duration = Duration::from_secs(1);

enum Msg {
    // Boxed: events are large, flushes tiny.
    Event(Box<Pending>),
    /// Sync everything and write the head; then ack.
    Flush(oneshot::Sender<()>),
}

struct Pending {
    session: String,
    event: Event,
    at: Timestamp,
    ack: Option<oneshot::Sender<()>>,
}

/// The writer's lock file, in the recording directory.
pub const LOCK_FILE: &str = "writer.lock";

/// Where sessions send their records. Cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    queue: Arc<Queue>,
    log_break: Option<Arc<LogBreak>>,
    progress: Arc<Progress>,
}

/// How far the writer got (read by the recording backlog metric).
#[derive(Debug, Default)]
pub struct Progress {
    /// Records handed to the recorder.
    pub accepted: AtomicU64,
    /// Of those, records on disk (fsynced), or lost to a write error: the
    /// rest are still on their way.
    pub settled: AtomicU64,
    /// The last seq on disk.
    pub durable_seq: AtomicU64,
}

impl Progress {
    /// Records accepted and not yet on disk.
    pub fn backlog(&self) -> u64 {
        // `settled` first: a record is accepted before it settles, so a
        // record accepted and settled in between only adds to `accepted`.
        let settled = self.settled.load(Ordering::Relaxed);
        self.accepted
            .load(Ordering::Relaxed)
            .saturating_sub(settled)
    }
}

/// A break found in the log at start; recording went on in a new chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogBreak {
    /// `file:line` of the broken record, or the head file.
    pub at: String,
    pub reason: String,
    /// The segment the new chain starts in.
    pub new_segment: PathBuf,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Recorder")
    }
}

/// Messages for the writer. Only durable records and flushes wake it; the
/// rest wait for its next round (`WRITE_EVERY`).
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    wake: Condvar,
}

#[derive(Default)]
struct QueueState {
    msgs: Vec<Msg>,
    urgent: bool,
}

/// Past this many queued records the writer is woken anyway.
const WAKE_AT: usize = 1024;

impl Queue {
    fn push(&self, msg: Msg, urgent: bool) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.msgs.push(msg);
        if urgent || st.msgs.len() == WAKE_AT {
            st.urgent = true;
            drop(st);
            self.wake.notify_one();
        }
    }

    /// Wait until something urgent comes or `timeout` passes; take all.
    fn take(&self, timeout: Duration) -> Vec<Msg> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !st.urgent {
            st = self
                .wake
                .wait_timeout_while(st, timeout, |s| !s.urgent)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        st.urgent = false;
        std::mem::take(&mut st.msgs)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Damaged(String),
    #[error("the recording log in {} is in use by another gateway ({holder}): two writers would interleave their records and break its chain. Stop that gateway, or give this one another --state-dir", dir.display())]
    Locked { dir: PathBuf, holder: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("recordings")
}

/// Segment files in log order.
pub fn segments(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seg-") && n.ends_with(".jsonl"))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The log's chain id, created with the log: it names the log in an
/// audit store that several gateways share.
pub fn chain_id(dir: &Path) -> std::io::Result<String> {
    let path = dir.join("chain");
    match fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
        _ => {
            let id = format!("{:016x}", rand::random::<u64>());
            fs::write(&path, format!("{id}\n"))?;
            Ok(id)
        }
    }
}

/// The head file: (seq, hash), if there is one.
pub fn read_head(dir: &Path) -> Result<Option<(u64, String)>, SpoolError> {
    let path = dir.join("head");
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            return Err(SpoolError::Damaged(format!(
                "{}: not a head record (not UTF-8)",
                path.display()
            )))
        }
        Err(e) => return Err(io_err(&path)(e)),
    };
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| SpoolError::Damaged(format!("{}: {e}", path.display())))?;
    match (v["seq"].as_u64(), v["hash"].as_str()) {
        (Some(seq), Some(hash)) => Ok(Some((seq, hash.to_owned()))),
        _ => Err(SpoolError::Damaged(format!(
            "{}: not a head record",
            path.display()
        ))),
    }
}

fn write_head(dir: &Path, seq: u64, hash: &str) -> io::Result<()> {
    let tmp = dir.join(".head.tmp");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    writeln!(f, "{}", serde_json::json!({"seq": seq, "hash": hash}))?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join("head"))?;
    File::open(dir)?.sync_all()
}

/// Take the writer's lock and write this process's pid and start time into
/// it, or say who holds it.
fn lock(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join(LOCK_FILE);
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err(&path))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Err(SpoolError::Locked {
                dir: dir.to_owned(),
                holder: holder(&path),
            })
        }
        Err(TryLockError::Error(e)) => return Err(io_err(&path)(e)),
    }
    let me = serde_json::json!({
        "pid": std::process::id(),
        "started": Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
    });
    f.set_len(0)
        .and_then(|()| f.seek(SeekFrom::Start(0)))
        .and_then(|_| writeln!(f, "{me}"))
        .and_then(|()| f.sync_data())
        .map_err(io_err(&path))?;
    Ok(f)
}

/// Who the lock file says holds it.
fn holder(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v) if v["pid"].is_u64() => format!(
            "pid {}, started {}",
            v["pid"],
            v["started"].as_str().unwrap_or("at an unknown time")
        ),
        _ => format!("{} names no holder yet", path.display()),
    }
}

/// Who holds the writer's lock of the log under `state_dir`, if someone
/// does (`pgwarden run` names them when it cannot start). Creates nothing.
pub fn held_by(state_dir: &Path) -> Option<String> {
    let path = dir(state_dir).join(LOCK_FILE);
    let f = File::open(&path).ok()?;
    match f.try_lock() {
        Err(TryLockError::WouldBlock) => Some(holder(&path)),
        // Free (released again when `f` closes), or not lockable here.
        _ => None,
    }
}

struct Writer {
    /// Held for the writer's life (the thread never ends before the process).
    _lock: File,
    dir: PathBuf,
    file: io::BufWriter<File>,
    size: u64,
    seq: u64,
    last_hash: String,
    sessions: std::collections::HashMap<String, String>,
    synced_seq: u64,
    synced_hash: String,
    head_seq: u64,
    last_sync: Instant,
    last_head: Instant,
    progress: Arc<Progress>,
    /// Records appended since the last fsync.
    unsynced: u64,
}

impl Recorder {
    /// Open the spool (creating it) under its lock, recover the chain's
    /// end (or start a new chain after a break), start the writer thread.
    pub fn start(state_dir: &Path) -> Result<Recorder, SpoolError> {
        let dir = dir(state_dir);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir))?;
        // Before anything reads or repairs the log: nobody else writes it.
        let lock = lock(&dir)?;
        chain_id(&dir).map_err(io_err(&dir))?;
        let recovered = recover(&dir)?;
        let (seq, last_hash, broken) = match recovered.state {
            Chain::Intact { seq, hash } => (seq, hash, None),
            Chain::Broken {
                next_seq,
                at,
                reason,
            } => (next_seq - 1, GENESIS.to_owned(), Some((at, reason))),
        };
        let (file, size, path) = open_segment(&dir, seq + 1, broken.is_some())?;
        let progress = Arc::new(Progress::default());
        progress.durable_seq.store(seq, Ordering::Relaxed);
        let mut w = Writer {
            progress: progress.clone(),
            unsynced: 0,
            _lock: lock,
            dir: dir.clone(),
            file: io::BufWriter::with_capacity(64 * 1024, file),
            size,
            seq,
            last_hash: last_hash.clone(),
            sessions: Default::default(),
            synced_seq: seq,
            synced_hash: last_hash,
            head_seq: recovered.head_seq,
            last_sync: Instant::now(),
            last_head: Instant::now(),
        };
        let log_break = match broken {
            None => None,
            Some((at, reason)) => {
                let event = Event::LogRestart {
                    broken_at: at.clone(),
                    reason: reason.clone(),
                };
                progress.accepted.fetch_add(1, Ordering::Relaxed);
                let written = w
                    .append(NO_SESSION.to_owned(), event, Timestamp::now())
                    .and_then(|()| w.sync(true));
                written.map_err(io_err(&path))?;
                tracing::warn!(
                    broken_at = %at,
                    reason = %reason,
                    new_chain = %path.display(),
                    "the recording log is broken: recording goes on in a new chain whose first record names the break; `pgwarden sessions verify --state-dir {}` reports it. To start a fresh log instead, stop pgwarden and move {} aside (e.g. mv {} {}.broken)",
                    state_dir.display(),
                    dir.display(),
                    dir.display(),
                    dir.display(),
                );
                Some(Arc::new(LogBreak {
                    at,
                    reason,
                    new_segment: path,
                }))
            }
        };
        let queue = Arc::new(Queue::default());
        let q = queue.clone();
        std::thread::Builder::new()
            .name("pgwarden-recorder".into())
            .spawn(move || w.run(&q))
            .map_err(|e| SpoolError::Io {
                path: PathBuf::from("(recorder thread)"),
                source: e,
            })?;
        Ok(Recorder {
            queue,
            log_break,
            progress,
        })
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// The break found in the log at start, if any.
    pub fn log_break(&self) -> Option<&LogBreak> {
        self.log_break.as_deref()
    }

    /// Append an event. With `durable`, the receiver completes once the
    /// record is on disk (it errs if the writer failed: fail closed).
    pub fn record(
        &self,
        session: &str,
        event: Event,
        durable: bool,
    ) -> Option<oneshot::Receiver<()>> {
        self.progress.accepted.fetch_add(1, Ordering::Relaxed);
        let (ack, rx) = if durable {
            let (t, r) = oneshot::channel();
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        self.queue.push(
            Msg::Event(Box::new(Pending {
                session: session.to_owned(),
                event,
                at: Timestamp::now(),
                ack,
            })),
            durable,
        );
        rx
    }

    /// Everything sent so far is on disk and under the head.
    pub async fn flush(&self) {
        let (t, r) = oneshot::channel();
        self.queue.push(Msg::Flush(t), true);
        let _ = r.await;
    }
}

/// Where the chain goes on from.
#[derive(Debug, PartialEq, Eq)]
enum Chain {
    /// After its last record.
    Intact { seq: u64, hash: String },
    /// The log is broken: a new chain starts at `next_seq` (past every seq
    /// the log and its head hold, so segment names keep their order).
    Broken {
        next_seq: u64,
        at: String,
        reason: String,
    },
}

#[derive(Debug)]
struct Recovered {
    state: Chain,
    /// The seq the head names (0 without one).
    head_seq: u64,
}

/// Check the end of the log: every line of the newest segment opens and
/// follows the one before it, and the log reaches its head. A torn last
/// line (a crash in the middle of a write, never acknowledged) is cut off.
fn recover(dir: &Path) -> Result<Recovered, SpoolError> {
    let head_path = dir.join("head");
    let (head, head_broken) = match read_head(dir) {
        Ok(h) => (h, None),
        Err(SpoolError::Damaged(why)) => (None, Some(why)),
        Err(e) => return Err(e),
    };
    let head_seq = head.as_ref().map(|h| h.0).unwrap_or(0);
    let broken = |next_seq: u64, at: String, reason: String| Recovered {
        state: Chain::Broken {
            next_seq,
            at,
            reason,
        },
        head_seq,
    };
    let segs = segments(dir).map_err(io_err(dir))?;
    let mut max_seq = head_seq;
    for path in segs.iter().rev() {
        let f = File::open(path).map_err(io_err(path))?;
        let mut reader = BufReader::new(f);
        let mut last: Option<(u64, String)> = None;
        let mut found: Option<(String, String)> = None;
        let mut good_len: u64 = 0;
        let mut n: u64 = 0;
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let read = reader.read_until(b'\n', &mut buf).map_err(io_err(path))?;
            if read == 0 || !buf.ends_with(b"\n") {
                break; // the end, or torn
            }
            n += 1;
            good_len += read as u64;
            let line = String::from_utf8_lossy(&buf[..buf.len() - 1]);
            let place = format!("{}:{n}", path.display());
            let (r, hash) = match record::open(&line) {
                Ok(ok) => ok,
                Err(e) => {
                    max_seq = max_seq.max(record::claimed(&line).1.unwrap_or(0));
                    if found.is_none() {
                        found = Some((place, Broken::Edited(e.to_string()).to_string()));
                    }
                    continue;
                }
            };
            max_seq = max_seq.max(r.seq);
            if found.is_none() {
                let link = match &last {
                    Some((seq, _)) if r.seq != seq + 1 => Some(Broken::Gap {
                        expected_seq: seq + 1,
                        found_seq: r.seq,
                        after: format!("record {seq}"),
                    }),
                    Some((_, h)) if r.prev != *h => Some(Broken::Prev { seq: r.seq }),
                    _ => None,
                };
                let link = link.or_else(|| {
                    head.as_ref()
                        .filter(|(s, h)| *s == r.seq && *h != hash)
                        .map(|_| Broken::HeadMismatch { seq: r.seq })
                });
                if let Some(b) = link {
                    found = Some((place, b.to_string()));
                }
            }
            last = Some((r.seq, hash));
        }
        // Segment names carry their first seq: a log too damaged to read
        // still says how far it went.
        let first = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| {
                n.strip_prefix("seg-")?
                    .strip_suffix(".jsonl")?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0);
        max_seq = max_seq.max((first + n).saturating_sub(1));
        let len = fs::metadata(path).map_err(io_err(path))?.len();
        if len > good_len {
            tracing::warn!(file = %path.display(), bytes = len - good_len, "cutting off a torn last record (written when the gateway stopped, never acknowledged)");
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io_err(path))?;
            f.set_len(good_len).map_err(io_err(path))?;
            f.sync_all().map_err(io_err(path))?;
        }
        if let Some((at, reason)) = found {
            return Ok(broken(max_seq + 1, at, reason));
        }
        if let Some(why) = head_broken {
            return Ok(broken(max_seq + 1, head_path.display().to_string(), why));
        }
        if let Some((seq, hash)) = last {
            if head_seq > seq {
                let why = Broken::Truncated {
                    last: seq,
                    head: head_seq,
                };
                return Ok(broken(
                    max_seq + 1,
                    head_path.display().to_string(),
                    why.to_string(),
                ));
            }
            return Ok(Recovered {
                state: Chain::Intact { seq, hash },
                head_seq,
            });
        }
        // An empty segment: the chain ends in the one before.
    }
    if let Some(why) = head_broken {
        return Ok(broken(max_seq + 1, head_path.display().to_string(), why));
    }
    if head_seq > 0 {
        let why = Broken::Truncated {
            last: 0,
            head: head_seq,
        };
        return Ok(broken(
            max_seq + 1,
            head_path.display().to_string(),
            why.to_string(),
        ));
    }
    Ok(Recovered {
        state: Chain::Intact {
            seq: 0,
            hash: GENESIS.into(),
        },
        head_seq,
    })
}

/// The segment to append to: the newest, unless it is full or `fresh`.
fn open_segment(
    dir: &Path,
    next_seq: u64,
    fresh: bool,
) -> Result<(File, u64, PathBuf), SpoolError> {
    let segs = segments(dir).map_err(io_err(dir))?;
    let path = match segs.last() {
        Some(p)
            if !fresh
                && fs::metadata(p)
                    .map(|m| m.len() < SEGMENT_BYTES)
                    .unwrap_or(false) =>
        {
            p.clone()
        }
        _ => dir.join(format!("seg-{next_seq:012}.jsonl")),
    };
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err(&path))?;
    let size = f.seek(SeekFrom::End(0)).map_err(io_err(&path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok((f, size, path))
}

impl Writer {
    fn run(&mut self, queue: &Queue) {
        loop {
            let msgs = queue.take(WRITE_EVERY);
            let mut acks = Vec::new();
            let mut force_head = false;
            for msg in msgs {
                match msg {
                    Msg::Event(p) => {
                        let Pending {
                            session,
                            event,
                            at,
                            ack,
                        } = *p;
                        if let Err(e) = self.append(session, event, at) {
                            // Fail closed: durable writers get no ack and
                            // their sessions end; later events keep trying.
                            tracing::error!(error = %e, "writing a session record failed");
                            // Lost, so no longer on its way (the backlog
                            // metric must not grow for ever).
                            self.progress.settled.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        acks.extend(ack);
                    }
                    Msg::Flush(t) => {
                        force_head = true;
                        acks.push(t);
                    }
                }
            }
            if let Err(e) = self.file.flush() {
                tracing::error!(error = %e, "writing the recording log failed");
            }
            let due = self.last_sync.elapsed() >= SYNC_EVERY;
            if !acks.is_empty() || due || force_head {
                match self.sync(force_head) {
                    Ok(()) => {
                        for a in acks {
                            let _ = a.send(());
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "syncing the recording log failed"),
                }
            }
        }
    }

    fn append(&mut self, session: String, event: Event, at: Timestamp) -> io::Result<()> {
        if self.size >= SEGMENT_BYTES {
            self.sync(false)?;
            let (f, size, _) = open_segment(&self.dir, self.seq + 1, true)
                .map_err(|e| io::Error::other(e.to_string()))?;
            self.file = io::BufWriter::with_capacity(64 * 1024, f);
            self.size = size;
        }
        // A session's last record, or one of no session.
        let ends = matches!(event, Event::SessionEnd { .. } | Event::LogRestart { .. });
        let r = Record {
            seq: self.seq + 1,
            at: at.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
            session_prev: self.sessions.get(&session).cloned().unwrap_or_default(),
            session,
            event,
            prev: self.last_hash.clone(),
        };
        let (line, hash) = record::seal(&r);
        self.file.write_all(line.as_bytes())?;
        self.file.write_all(b"\n")?;
        self.size += line.len() as u64 + 1;
        self.seq = r.seq;
        self.unsynced += 1;
        self.last_hash = hash.clone();
        if ends {
            self.sessions.remove(&r.session);
        } else {
            self.sessions.insert(r.session, hash);
        }
        Ok(())
    }

    /// Write out, fsync, and move the head when due (or `force`).
    fn sync(&mut self, force_head: bool) -> io::Result<()> {
        self.file.flush()?;
        if self.synced_seq != self.seq {
            self.file.get_ref().sync_data()?;
            self.synced_seq = self.seq;
            self.synced_hash = self.last_hash.clone();
            self.progress
                .settled
                .fetch_add(std::mem::take(&mut self.unsynced), Ordering::Relaxed);
            self.progress
                .durable_seq
                .store(self.synced_seq, Ordering::Relaxed);
        }
        self.last_sync = Instant::now();
        if self.head_seq != self.synced_seq
            && (force_head || self.last_head.elapsed() >= HEAD_EVERY)
        {
            write_head(&self.dir, self.synced_seq, &self.synced_hash)?;
            self.head_seq = self.synced_seq;
            self.last_head = Instant::now();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
