use super::*;
use crate::recording::chain::verify_session;
use crate::recording::record::{seal, RecordedVerdict, GENESIS};

fn start(who: &str) -> Event {
    Event::SessionStart {
        subject: who.into(),
        method: "localTrust".into(),
        claims: vec![],
        client: "127.0.0.1:1".into(),
        application_name: "psql".into(),
        policy: "default/p".into(),
        policy_version: "v".into(),
        database: "shop".into(),
    }
}

fn stmt(n: u64, text: &str, verdict: RecordedVerdict) -> Event {
    Event::Statement {
        n,
        text: text.into(),
        parameters: vec![],
        verdict,
        rule: None,
        reason: None,
        approval: None,
        approved_by: None,
    }
}

fn end(statements: u64) -> Event {
    Event::SessionEnd {
        reason: "client terminated".into(),
        statements,
    }
}

/// Three sessions, "b" interleaved with "a", written as one segment.
fn log(state: &Path) -> Vec<String> {
    let plan = [
        ("a", start("alice")),
        ("b", start("bob")),
        ("a", stmt(1, "SELECT 1", RecordedVerdict::Allow)),
        ("b", stmt(1, "DELETE FROM t", RecordedVerdict::Deny)),
        ("a", end(1)),
        ("b", end(1)),
        ("c", start("carol")),
        ("c", stmt(1, "SELECT 3", RecordedVerdict::Allow)),
        ("c", end(1)),
    ];
    let mut prev = GENESIS.to_owned();
    let mut per: std::collections::HashMap<&str, String> = Default::default();
    let mut lines = Vec::new();
    for (i, (session, event)) in plan.into_iter().enumerate() {
        let (line, hash) = seal(&Record {
            seq: i as u64 + 1,
            at: format!("2026-12-01T10:00:0{i}.000000Z"),
            session: session.into(),
            event,
            prev: prev.clone(),
            session_prev: per.get(session).cloned().unwrap_or_default(),
        });
        per.insert(session, hash.clone());
        prev = hash;
        lines.push(line);
    }
    write(state, &lines);
    lines
}

fn write(state: &Path, lines: &[String]) {
    let dir = spool::dir(state);
    std::fs::create_dir_all(&dir).unwrap();
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.join("seg-000000000001.jsonl"), text).unwrap();
}

fn replay(state: &Path, id: &str) -> Result<Vec<Record>, (String, Broken)> {
    let picked = session_lines(state, id).unwrap();
    let refs: Vec<&str> = picked.lines.iter().map(|(_, l)| l.as_str()).collect();
    verify_session(&refs).map_err(|(i, b)| (picked.lines[i].0.clone(), b))
}

#[test]
fn one_edited_byte_leaves_every_other_session_readable() {
    let state = tempfile::tempdir().unwrap();
    let mut lines = log(state.path());
    lines[3] = lines[3].replace("DELETE FROM t", "DELETE FROM u");
    write(state.path(), &lines);

    // list: every session, the damaged line named with the session it claims.
    let listing = sessions(state.path()).unwrap();
    let ids: Vec<&str> = listing.sessions.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    let b = &listing.sessions[1];
    assert_eq!(b.damaged.len(), 1);
    assert!(b.damaged[0].ends_with("seg-000000000001.jsonl:4"), "{b:?}");
    assert!(listing.sessions[0].damaged.is_empty() && listing.sessions[2].damaged.is_empty());
    assert_eq!(listing.damaged.len(), 1);
    assert!(listing.damaged[0].1.contains("edited"));
    assert_eq!(listing.damaged[0].2.as_deref(), Some("b"));

    // replay: the untouched sessions, whole; the damaged one fails there.
    assert_eq!(replay(state.path(), "a").unwrap().len(), 3);
    assert_eq!(replay(state.path(), "c").unwrap().len(), 3);
    let (place, broken) = replay(state.path(), "b").unwrap_err();
    assert!(place.ends_with("seg-000000000001.jsonl:4"), "{place}");
    assert!(matches!(broken, Broken::Edited(_)), "{broken}");

    // verify still reports the break, where it is.
    let reports = verify(state.path()).unwrap();
    let (place, _) = reports[0].outcome.clone().unwrap_err();
    assert_eq!(place.line, 4);
}

#[test]
fn a_line_beyond_repair_is_listed_and_flagged_where_it_may_belong() {
    let state = tempfile::tempdir().unwrap();
    let mut lines = log(state.path());
    // c's end record no longer parses at all (it claims no session), and
    // a's start is damaged but still says whose it is.
    lines[8] = "{\"seq\":9,\"garbage".into();
    lines[0] = lines[0].replace("alice", "mallory");
    let mut bytes: Vec<u8> = lines
        .iter()
        .flat_map(|l| format!("{l}\n").into_bytes())
        .collect();
    // And a byte that is not UTF-8 in b's statement.
    let at = bytes.windows(6).position(|w| w == b"DELETE").unwrap();
    bytes[at] = 0xff;
    std::fs::write(
        spool::dir(state.path()).join("seg-000000000001.jsonl"),
        bytes,
    )
    .unwrap();

    let listing = sessions(state.path()).unwrap();
    let ids: Vec<&str> = listing.sessions.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"], "{listing:?}");
    // a's start is unreadable, so what it said is unknown — but a is listed.
    assert_eq!(listing.sessions[0].subject, "?");
    assert_eq!(listing.sessions[0].statements, 1);
    assert_eq!(listing.damaged.len(), 3);
    assert_eq!(listing.damaged[2].2, None);

    // c's chain is intact up to its lost end: it replays, with a warning.
    let picked = session_lines(state.path(), "c").unwrap();
    assert_eq!(picked.lines.len(), 2);
    assert_eq!(picked.maybe_lost.len(), 1);
    assert!(
        picked.maybe_lost[0].contains(":9: "),
        "{:?}",
        picked.maybe_lost
    );
    // An ended session is not suspected of it.
    assert!(session_lines(state.path(), "b")
        .unwrap()
        .maybe_lost
        .is_empty());
    assert!(replay(state.path(), "b").is_err());
}

#[test]
fn no_recordings_is_an_error_not_an_empty_list() {
    let state = tempfile::tempdir().unwrap();
    assert!(matches!(sessions(state.path()), Err(LogError::Empty(_))));
    assert!(matches!(verify(state.path()), Err(LogError::Empty(_))));
    assert!(!spool::dir(state.path()).exists());
}
