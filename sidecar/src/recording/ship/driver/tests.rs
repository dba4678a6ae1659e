use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::*;
use crate::recording::record::{seal, Event, Record, GENESIS};

/// Append records `from..=to` (sealed, chained) to the spool in `dir`.
fn append(dir: &Path, from: u64, to: u64) {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("seg-000000000001.jsonl"))
        .unwrap();
    for seq in from..=to {
        let (line, _) = seal(&Record {
            seq,
            at: "2026-12-01T10:00:00.000000Z".into(),
            session: "s".into(),
            event: Event::SessionEnd {
                reason: format!("record {seq}"),
                statements: 0,
            },
            prev: GENESIS.into(),
            session_prev: String::new(),
        });
        writeln!(f, "{line}").unwrap();
    }
}

/// One call to the sink: when, what it got, the cursor file at that time.
#[derive(Debug, Clone)]
struct Call {
    at: Instant,
    seqs: Vec<u64>,
    cursor: u64,
}

#[derive(Default)]
struct Seen {
    calls: Vec<Call>,
    stored: Vec<u64>,
}

/// Fails its first `failures` deliveries, then stores everything (or only
/// the first `keep` records of each batch).
struct MemorySink {
    dir: PathBuf,
    failures: usize,
    keep: Option<usize>,
    hang: bool,
    seen: Arc<Mutex<Seen>>,
}

impl MemorySink {
    fn new(dir: &Path, failures: usize) -> (Self, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let sink = MemorySink {
            dir: dir.to_owned(),
            failures,
            keep: None,
            hang: false,
            seen: seen.clone(),
        };
        (sink, seen)
    }
}

impl Sink for MemorySink {
    type Error = String;

    fn cursor_name(&self) -> String {
        "shipped-memory".into()
    }

    async fn deliver(&mut self, chain: &str, batch: &[SealedRecord]) -> Result<Stored, String> {
        assert_eq!(chain, "c0ffee");
        let cursor = Cursor {
            dir: self.dir.clone(),
            name: self.cursor_name(),
        }
        .read();
        let seqs: Vec<u64> = batch.iter().map(|r| r.seq).collect();
        {
            let mut seen = self.seen.lock().unwrap();
            seen.calls.push(Call {
                at: Instant::now(),
                seqs: seqs.clone(),
                cursor,
            });
        }
        if self.hang {
            std::future::pending::<()>().await;
        }
        if self.failures > 0 {
            self.failures -= 1;
            return Err("store down".into());
        }
        let kept = &seqs[..self.keep.unwrap_or(seqs.len()).min(seqs.len())];
        self.seen.lock().unwrap().stored.extend_from_slice(kept);
        Ok(Stored {
            through: kept.last().copied().unwrap_or(0),
        })
    }
}

fn pace() -> Pace {
    Pace {
        batch: 3,
        idle: Duration::from_millis(10),
        first_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(50),
    }
}

/// Run the loop until `done` holds (or 5 s pass), then stop it.
async fn ship_until(
    dir: &Path,
    sink: MemorySink,
    pace: Pace,
    seen: &Arc<Mutex<Seen>>,
    done: impl Fn(&Seen) -> bool,
) {
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(run(
        dir.to_owned(),
        "c0ffee".into(),
        sink,
        pace,
        stopped,
        Default::default(),
    ));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done(&seen.lock().unwrap()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("the loop stops when told")
        .unwrap();
}

#[tokio::test]
async fn after_an_outage_every_record_arrives_once_in_order_and_the_cursor_follows_success() {
    let tmp = tempfile::tempdir().unwrap();
    append(tmp.path(), 1, 7);
    let (sink, seen) = MemorySink::new(tmp.path(), 4);
    ship_until(tmp.path(), sink, pace(), &seen, |s| s.stored.len() >= 7).await;

    let seen = seen.lock().unwrap();
    assert_eq!(seen.stored, (1..=7).collect::<Vec<_>>());
    let calls = &seen.calls;
    assert_eq!(calls.len(), 4 + 3, "{calls:?}");
    // While the store is down the same first batch is offered, the cursor
    // unmoved; then the backlog drains batch by batch.
    for c in &calls[..5] {
        assert_eq!((c.seqs.as_slice(), c.cursor), (&[1, 2, 3][..], 0));
    }
    assert_eq!(
        (calls[5].seqs.as_slice(), calls[5].cursor),
        (&[4, 5, 6][..], 3)
    );
    assert_eq!((calls[6].seqs.as_slice(), calls[6].cursor), (&[7][..], 6));
    assert_eq!(
        fs::read_to_string(tmp.path().join("shipped-memory")).unwrap(),
        "7\n"
    );
    // Waits between failures grow (20, 40 ms) up to the cap (50, 50 ms,
    // not 80 and 160).
    let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1].at - w[0].at).collect();
    for (gap, at_least) in gaps.iter().zip([20, 40, 50, 50]) {
        assert!(*gap >= Duration::from_millis(at_least), "{gaps:?}");
    }
    assert!(gaps[3] < Duration::from_millis(150), "capped: {gaps:?}");
}

#[tokio::test]
async fn records_written_later_are_shipped_from_the_cursor() {
    let tmp = tempfile::tempdir().unwrap();
    append(tmp.path(), 1, 2);
    // A previous run stored the first record.
    fs::write(tmp.path().join("shipped-memory"), "1\n").unwrap();
    let (sink, seen) = MemorySink::new(tmp.path(), 0);
    let dir = tmp.path().to_owned();
    let seen2 = seen.clone();
    let writer = tokio::spawn(async move {
        while seen2.lock().unwrap().stored.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        append(&dir, 3, 4);
    });
    ship_until(tmp.path(), sink, pace(), &seen, |s| s.stored.len() >= 3).await;
    writer.await.unwrap();
    assert_eq!(seen.lock().unwrap().stored, [2, 3, 4]);
}

#[tokio::test]
async fn what_a_sink_did_not_store_is_sent_again() {
    let tmp = tempfile::tempdir().unwrap();
    append(tmp.path(), 1, 5);
    let (mut sink, seen) = MemorySink::new(tmp.path(), 0);
    sink.keep = Some(2);
    ship_until(tmp.path(), sink, pace(), &seen, |s| s.stored.len() >= 5).await;
    let seen = seen.lock().unwrap();
    assert_eq!(seen.stored, [1, 2, 3, 4, 5]);
    let batches: Vec<_> = seen.calls.iter().map(|c| c.seqs.clone()).collect();
    assert_eq!(batches, [vec![1, 2, 3], vec![3, 4, 5], vec![5]]);
}

#[tokio::test]
async fn shutdown_interrupts_a_hung_delivery_and_an_idle_wait() {
    let tmp = tempfile::tempdir().unwrap();
    append(tmp.path(), 1, 1);
    let (mut sink, seen) = MemorySink::new(tmp.path(), 0);
    sink.hang = true;
    // ship_until asserts the loop ends within 1 s of being told.
    ship_until(tmp.path(), sink, pace(), &seen, |s| !s.calls.is_empty()).await;
    assert_eq!(seen.lock().unwrap().calls.len(), 1);
    assert!(!tmp.path().join("shipped-memory").exists());

    // Idle (nothing to ship, a long idle wait): the sender dropped ends it.
    let empty = tempfile::tempdir().unwrap();
    let (sink, _) = MemorySink::new(empty.path(), 0);
    let slow = Pace {
        idle: Duration::from_secs(3600),
        ..pace()
    };
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(run(
        empty.path().to_owned(),
        "c0ffee".into(),
        sink,
        slow,
        stopped,
        Default::default(),
    ));
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(stop);
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("the loop stops when its sender is gone")
        .unwrap();
}

#[test]
fn backoff_doubles_up_to_its_cap_and_starts_over_after_a_success() {
    let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let waits: Vec<u64> = (0..7).map(|_| b.fail().as_secs()).collect();
    assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
    b.reset();
    assert_eq!(b.fail(), Duration::from_secs(1));
}

#[test]
fn damaged_lines_are_skipped_and_batches_are_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    append(tmp.path(), 1, 4);
    let seg = tmp.path().join("seg-000000000001.jsonl");
    let text = fs::read_to_string(&seg).unwrap();
    fs::write(&seg, text.replacen("record 2", "record X", 1)).unwrap();
    let got: Vec<u64> = read_after(tmp.path(), 0, 10)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(got, [1, 3, 4]);
    let got = read_after(tmp.path(), 1, 1).unwrap();
    assert_eq!((got.len(), got[0].seq, got[0].kind), (1, 3, "sessionEnd"));
}
