use super::*;
use crate::recording::chain::Broken;
use crate::recording::log;

/// A previous gateway's log under `state`: sessions "a" (start, statement,
/// end) and "b" (start): (lines, hashes). The head names the last record.
fn old_log(state: &Path) -> (Vec<String>, Vec<String>) {
    let dir = dir(state);
    fs::create_dir_all(&dir).unwrap();
    let events = [
        ("a", start()),
        (
            "a",
            Event::Statement {
                n: 1,
                text: "SELECT 1".into(),
                parameters: vec![],
                verdict: crate::recording::record::RecordedVerdict::Allow,
                rule: None,
                reason: None,
                approval: None,
                approved_by: None,
            },
        ),
        (
            "a",
            Event::SessionEnd {
                reason: "client terminated".into(),
                statements: 1,
            },
        ),
        ("b", start()),
    ];
    let (mut lines, mut hashes) = (Vec::new(), Vec::new());
    let mut prev = GENESIS.to_owned();
    let mut per: std::collections::HashMap<&str, String> = Default::default();
    for (i, (session, event)) in events.into_iter().enumerate() {
        let (line, hash) = record::seal(&Record {
            seq: i as u64 + 1,
            at: "2026-12-01T10:00:00.000000Z".into(),
            session: session.into(),
            event,
            prev: prev.clone(),
            session_prev: per.get(session).cloned().unwrap_or_default(),
        });
        per.insert(session, hash.clone());
        prev = hash.clone();
        lines.push(line);
        hashes.push(hash);
    }
    write_segment(state, &lines);
    write_head(&dir, 4, &hashes[3]).unwrap();
    (lines, hashes)
}

fn start() -> Event {
    Event::SessionStart {
        subject: "dev".into(),
        method: "localTrust".into(),
        claims: vec![],
        client: "127.0.0.1:1".into(),
        application_name: "psql".into(),
        policy: "default/p".into(),
        policy_version: "v".into(),
        database: "shop".into(),
    }
}

fn segment(state: &Path) -> PathBuf {
    dir(state).join("seg-000000000001.jsonl")
}

fn write_segment(state: &Path, lines: &[String]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    fs::write(segment(state), text).unwrap();
}

fn flush(r: &Recorder) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(r.flush());
}

/// A session "c" recorded by `r` (start and end), flushed.
fn record_a_session(r: &Recorder) {
    r.record("c", start(), false);
    r.record(
        "c",
        Event::SessionEnd {
            reason: "client terminated".into(),
            statements: 0,
        },
        false,
    );
    flush(r);
}

#[test]
fn a_second_writer_is_refused_and_told_who_holds_the_log() {
    let state = tempfile::tempdir().unwrap();
    let first = Recorder::start(state.path()).unwrap();
    let lock = fs::read_to_string(dir(state.path()).join(LOCK_FILE)).unwrap();
    assert!(
        lock.contains(&format!("\"pid\":{}", std::process::id())) && lock.contains("started"),
        "{lock}"
    );
    let e = Recorder::start(state.path()).unwrap_err();
    let me = format!("pid {}, started 20", std::process::id());
    match &e {
        SpoolError::Locked { holder, .. } => assert!(holder.contains(&me), "{holder}"),
        other => panic!("expected Locked, got {other}"),
    }
    assert!(e.to_string().contains("another gateway"), "{e}");
    assert!(held_by(state.path()).is_some_and(|h| h.contains(&me)));
    // The refused writer wrote nothing: the first one's log is intact.
    record_a_session(&first);
    let reports = log::verify(state.path()).unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].outcome.as_ref().unwrap().records, 2);
    // Nobody holds a log that was never opened.
    let other = tempfile::tempdir().unwrap();
    assert_eq!(held_by(other.path()), None);
}

#[test]
fn an_intact_log_goes_on_in_its_chain() {
    let state = tempfile::tempdir().unwrap();
    old_log(state.path());
    let r = Recorder::start(state.path()).unwrap();
    assert!(r.log_break().is_none());
    record_a_session(&r);
    let reports = log::verify(state.path()).unwrap();
    assert_eq!(reports.len(), 1, "{reports:?}");
    let s = reports[0].outcome.as_ref().unwrap();
    assert_eq!((s.records, s.last_seq), (6, 6));
}

#[test]
fn an_edited_record_starts_a_new_chain_that_names_the_break() {
    let state = tempfile::tempdir().unwrap();
    let (mut lines, _) = old_log(state.path());
    lines[1] = lines[1].replace("SELECT 1", "SELECT 2");
    write_segment(state.path(), &lines);

    let r = Recorder::start(state.path()).expect("a broken log must not stop the gateway");
    let b = r.log_break().expect("the break is reported").clone();
    assert!(b.at.ends_with("seg-000000000001.jsonl:2"), "{b:?}");
    assert!(b.reason.contains("edited"), "{b:?}");
    assert_eq!(file_name(&b.new_segment), "seg-000000000005.jsonl");
    record_a_session(&r);

    // The new segment begins with the restart record, sealed, on a new chain.
    let text = fs::read_to_string(&b.new_segment).unwrap();
    let first = text.lines().next().unwrap();
    let (rec, _) = record::open(first).unwrap();
    assert_eq!((rec.seq, rec.prev.as_str()), (5, GENESIS));
    assert!(
        matches!(&rec.event, Event::LogRestart { broken_at, reason }
            if broken_at == &b.at && reason.contains("edited")),
        "{rec:?}"
    );
    // The old chain stays as it was: the edit is still there, as evidence.
    assert!(fs::read_to_string(segment(state.path()))
        .unwrap()
        .contains("SELECT 2"));
    // verify: the old chain broken where it was edited, the new one intact.
    let reports = log::verify(state.path()).unwrap();
    assert_eq!(reports.len(), 2, "{reports:?}");
    let (place, broken) = reports[0].outcome.clone().unwrap_err();
    assert_eq!(
        (place.line, file_name(&place.file)),
        (2, "seg-000000000001.jsonl".into())
    );
    assert!(matches!(broken, Broken::Edited(_)));
    let s = reports[1].outcome.as_ref().unwrap();
    assert_eq!((s.records, s.sessions, s.last_seq), (3, 1, 7));
    // The head follows the new chain.
    assert_eq!(read_head(&dir(state.path())).unwrap().unwrap().0, 7);
}

#[test]
fn a_log_cut_before_its_head_or_not_utf8_starts_a_new_chain() {
    // Records cut off the end: only the head knew.
    let state = tempfile::tempdir().unwrap();
    let (lines, _) = old_log(state.path());
    write_segment(state.path(), &lines[..2]);
    let r = Recorder::start(state.path()).unwrap();
    let b = r.log_break().unwrap();
    assert!(b.at.ends_with("head"), "{b:?}");
    assert!(b.reason.contains("truncated"), "{b:?}");
    // Past the head's seq: segment names keep their order.
    assert_eq!(file_name(&b.new_segment), "seg-000000000005.jsonl");
    let reports = log::verify(state.path()).unwrap();
    assert!(
        matches!(&reports[0].outcome, Err((_, Broken::Restarted { .. }))),
        "{reports:?}"
    );
    assert!(reports[1].outcome.is_ok(), "{reports:?}");

    // A byte that is not UTF-8.
    let state = tempfile::tempdir().unwrap();
    old_log(state.path());
    let mut bytes = fs::read(segment(state.path())).unwrap();
    let at = bytes.iter().position(|&b| b == b'S').unwrap();
    bytes[at] = 0xff;
    fs::write(segment(state.path()), bytes).unwrap();
    let r = Recorder::start(state.path()).unwrap();
    assert!(r.log_break().unwrap().reason.contains("edited"));
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}
