//! The spool: the log on local disk, under `<state-dir>/recordings/`.
//!
//! - `seg-<first seq>.jsonl`: segments of sealed records, one per line,
//!   appended only; a new segment starts past `SEGMENT_BYTES`;
//! - `head`: the last record known to be on disk (seq and hash), replaced
//!   atomically after an fsync, at most every `HEAD_EVERY`.
//!
//! One writer thread owns the files and the chain: sessions send events,
//! the writer numbers, seals and appends them. An event sent with an ack is
//! acknowledged only after the fsync that covers it (group commit: one fsync
//! per batch, whatever the number of sessions); the others reach the disk
//! within `SYNC_EVERY`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use tokio::sync::oneshot;

use super::record::{self, Event, Record, GENESIS};

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

/// Where sessions send their records. Cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    queue: Arc<Queue>,
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

/// The head file: (seq, hash), if there is one.
pub fn read_head(dir: &Path) -> Result<Option<(u64, String)>, SpoolError> {
    let path = dir.join("head");
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
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

struct Writer {
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
}

impl Recorder {
    /// Open the spool (creating it), recover the chain's end, start the
    /// writer thread.
    pub fn start(state_dir: &Path) -> Result<Recorder, SpoolError> {
        let dir = dir(state_dir);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir))?;
        super::ship::chain_id(&dir).map_err(io_err(&dir))?;
        let (seq, last_hash) = recover(&dir)?;
        let head = read_head(&dir)?;
        if let Some((hseq, _)) = &head {
            if *hseq > seq {
                return Err(SpoolError::Damaged(format!(
                    "the recording log in {} ends at record {seq} but its head says {hseq}: records were lost or removed. Run `pgwarden sessions verify`; to start a new log, move that directory aside",
                    dir.display()
                )));
            }
        }
        let (file, size) = open_segment(&dir, seq + 1, false)?;
        let mut w = Writer {
            dir,
            file: io::BufWriter::with_capacity(64 * 1024, file),
            size,
            seq,
            last_hash: last_hash.clone(),
            sessions: Default::default(),
            synced_seq: seq,
            synced_hash: last_hash,
            head_seq: head.map(|h| h.0).unwrap_or(0),
            last_sync: Instant::now(),
            last_head: Instant::now(),
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
        Ok(Recorder { queue })
    }

    /// Append an event. With `durable`, the receiver completes once the
    /// record is on disk (it errs if the writer failed: fail closed).
    pub fn record(
        &self,
        session: &str,
        event: Event,
        durable: bool,
    ) -> Option<oneshot::Receiver<()>> {
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

/// The last intact record's (seq, hash); a torn last line (a crash in the
/// middle of a write, never acknowledged) is cut off.
fn recover(dir: &Path) -> Result<(u64, String), SpoolError> {
    let segs = segments(dir).map_err(io_err(dir))?;
    for path in segs.iter().rev() {
        let f = File::open(path).map_err(io_err(path))?;
        let mut reader = BufReader::new(f);
        let mut last: Option<(u64, String)> = None;
        let mut good_len: u64 = 0;
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader.read_line(&mut line).map_err(io_err(path))?;
            if n == 0 {
                break;
            }
            if !line.ends_with('\n') {
                break; // torn
            }
            match record::open(line.trim_end_matches('\n')) {
                Ok((r, h)) => {
                    last = Some((r.seq, h));
                    good_len += n as u64;
                }
                Err(e) => {
                    return Err(SpoolError::Damaged(format!(
                        "{}: record after {} is damaged ({e}); run `pgwarden sessions verify`",
                        path.display(),
                        last.as_ref().map(|l| l.0).unwrap_or(0)
                    )))
                }
            }
        }
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
        if let Some(l) = last {
            return Ok(l);
        }
    }
    Ok((0, GENESIS.into()))
}

/// The segment to append to: the newest, unless it is full or `fresh`.
fn open_segment(dir: &Path, next_seq: u64, fresh: bool) -> Result<(File, u64), SpoolError> {
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
    Ok((f, size))
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
            let (f, size) = open_segment(&self.dir, self.seq + 1, true)
                .map_err(|e| io::Error::other(e.to_string()))?;
            self.file = io::BufWriter::with_capacity(64 * 1024, f);
            self.size = size;
        }
        let ends = matches!(event, Event::SessionEnd { .. });
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
