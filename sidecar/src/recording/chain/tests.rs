use super::*;
use crate::recording::record::{seal, Event, Record};

/// A log of two sessions, interleaved: (lines, hashes).
fn log() -> (Vec<String>, Vec<String>) {
    let plan: &[(&str, Event)] = &[
        ("a", start("alice")),
        ("b", start("bob")),
        ("a", stmt(1, "SELECT 1")),
        ("b", stmt(1, "DELETE FROM t")),
        ("a", end(1)),
        ("b", end(1)),
        ("c", start("carol")),
        ("c", end(0)),
    ];
    let mut prev = GENESIS.to_owned();
    let mut per: HashMap<&str, String> = HashMap::new();
    let (mut lines, mut hashes) = (Vec::new(), Vec::new());
    for (i, (session, event)) in plan.iter().enumerate() {
        let r = Record {
            seq: i as u64 + 1,
            at: format!("2026-12-01T10:00:0{i}.000000Z"),
            session: (*session).into(),
            event: event.clone(),
            prev: prev.clone(),
            session_prev: per.get(session).cloned().unwrap_or_default(),
        };
        let (line, hash) = seal(&r);
        per.insert(session, hash.clone());
        prev = hash.clone();
        lines.push(line);
        hashes.push(hash);
    }
    (lines, hashes)
}

fn start(who: &str) -> Event {
    Event::SessionStart {
        subject: who.into(),
        method: "localTrust".into(),
        claims: vec![],
        client: "127.0.0.1:1".into(),
        application_name: "psql".into(),
        policy: "ci/p".into(),
        policy_version: "v".into(),
        database: "shop".into(),
    }
}

fn stmt(n: u64, text: &str) -> Event {
    Event::Statement {
        n,
        text: text.into(),
        parameters: vec![],
        verdict: crate::recording::record::RecordedVerdict::Allow,
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

fn verify(lines: &[String], head: Option<(u64, String)>) -> Result<Summary, Broken> {
    let mut v = Verifier::new(head);
    for l in lines {
        v.feed(l)?;
    }
    v.finish()
}

#[test]
fn an_intact_log_verifies() {
    let (lines, hashes) = log();
    let s = verify(&lines, Some((8, hashes[7].clone()))).unwrap();
    assert_eq!((s.records, s.sessions, s.last_seq), (8, 3, 8));
}

#[test]
fn an_edited_record_is_found() {
    let (mut lines, _) = log();
    lines[3] = lines[3].replace("DELETE FROM t", "SELECT 2 FROM t");
    assert!(matches!(verify(&lines, None), Err(Broken::Edited(_))));
}

#[test]
fn a_deleted_record_is_found_where_it_was() {
    let (mut lines, _) = log();
    lines.remove(2);
    assert_eq!(
        verify(&lines, None),
        Err(Broken::Gap {
            expected_seq: 3,
            found_seq: 4,
            after: "record 2".into()
        })
    );
}

#[test]
fn a_deleted_session_is_found() {
    let (lines, _) = log();
    // Every record of session "b" (records 2, 4, 6) removed.
    let without_b: Vec<String> = lines
        .iter()
        .enumerate()
        .filter(|(i, _)| ![1, 3, 5].contains(i))
        .map(|(_, l)| l.clone())
        .collect();
    assert!(matches!(verify(&without_b, None), Err(Broken::Gap { .. })));
}

#[test]
fn reordered_records_are_found() {
    let (mut lines, _) = log();
    lines.swap(2, 3);
    assert!(matches!(verify(&lines, None), Err(Broken::Gap { .. })));
}

#[test]
fn a_truncated_log_is_found_by_the_head() {
    let (lines, hashes) = log();
    let head = Some((8, hashes[7].clone()));
    assert_eq!(
        verify(&lines[..6], head.clone()),
        Err(Broken::Truncated { last: 6, head: 8 })
    );
    // Without a head, cutting the tail cannot be told from a log that ended
    // there: that is what the head (and anchoring it elsewhere) is for.
    assert!(verify(&lines[..6], None).is_ok());
}

#[test]
fn a_rewritten_tail_does_not_match_the_head() {
    let (lines, hashes) = log();
    let (other, _) = {
        // A forger rebuilds record 8 with other content and a valid seal.
        let (r, _) = record::open(&lines[7]).unwrap();
        let mut r = r;
        r.event = end(5);
        seal(&r)
    };
    let mut forged = lines.clone();
    forged[7] = other;
    assert_eq!(
        verify(&forged, Some((8, hashes[7].clone()))),
        Err(Broken::HeadMismatch { seq: 8 })
    );
}

#[test]
fn a_session_verifies_on_its_own_and_a_foreign_record_is_found() {
    let (lines, _) = log();
    let b: Vec<&str> = [1, 3, 5].iter().map(|&i| lines[i].as_str()).collect();
    assert_eq!(verify_session(&b).unwrap().len(), 3);
    let mixed: Vec<&str> = [1, 2, 5].iter().map(|&i| lines[i].as_str()).collect();
    assert!(matches!(
        verify_session(&mixed),
        Err((1, Broken::SessionPrev { .. }))
    ));
}

/// A `logRestart` record at `seq` (a new chain: prev is the genesis).
fn restart_line(seq: u64, at: &str) -> (String, String) {
    seal(&Record {
        seq,
        at: "2026-12-02T10:00:00.000000Z".into(),
        session: record::NO_SESSION.into(),
        event: Event::LogRestart {
            broken_at: at.into(),
            reason: "record edited".into(),
        },
        prev: GENESIS.into(),
        session_prev: String::new(),
    })
}

/// Records `first..` of one session "d" after `prev`.
fn chain_after(first: u64, prev: &str, n: usize) -> (Vec<String>, String) {
    let mut prev = prev.to_owned();
    let mut session_prev = String::new();
    let mut lines = Vec::new();
    for i in 0..n {
        let event = if i == 0 {
            start("dave")
        } else {
            stmt(i as u64, "SELECT 1")
        };
        let (line, hash) = seal(&Record {
            seq: first + i as u64,
            at: "2026-12-02T10:00:01.000000Z".into(),
            session: "d".into(),
            event,
            prev: prev.clone(),
            session_prev: session_prev.clone(),
        });
        prev = hash.clone();
        session_prev = hash;
        lines.push(line);
    }
    (lines, prev)
}

fn verify_log(lines: &[String], head: Option<(u64, String)>) -> Vec<ChainReport<usize>> {
    let mut v = LogVerifier::new(head);
    for (i, l) in lines.iter().enumerate() {
        v.feed(i + 1, l);
    }
    v.finish(lines.len())
}

#[test]
fn a_restarted_log_reports_the_old_break_and_checks_the_new_chain() {
    let (mut lines, _) = log();
    lines[3] = lines[3].replace("DELETE FROM t", "SELECT 2 FROM t");
    let (restart, rhash) = restart_line(9, "seg-000000000001.jsonl:4");
    let (tail, last) = chain_after(10, &rhash, 3);
    lines.push(restart);
    lines.extend(tail.iter().cloned());
    let reports = verify_log(&lines, Some((12, last.clone())));
    assert_eq!(reports.len(), 2, "{reports:#?}");
    assert_eq!(reports[0].from, Some(1));
    assert!(
        matches!(reports[0].outcome, Err((4, Broken::Edited(_)))),
        "{reports:#?}"
    );
    assert_eq!(reports[1].from, Some(9));
    let s = reports[1].outcome.clone().unwrap();
    assert_eq!((s.records, s.sessions, s.last_seq), (4, 1, 12));
    assert_eq!(s.last_hash, last);

    // The new chain is checked too: an edit there is found there.
    let mut edited = lines.clone();
    edited[10] = edited[10].replace("SELECT 1", "SELECT 9");
    let reports = verify_log(&edited, Some((12, last.clone())));
    assert!(
        matches!(reports[1].outcome, Err((11, Broken::Edited(_)))),
        "{reports:#?}"
    );
    // And its end is held against the head.
    let reports = verify_log(&lines[..10], Some((12, last)));
    assert!(
        matches!(
            reports[1].outcome,
            Err((10, Broken::Truncated { last: 10, head: 12 }))
        ),
        "{reports:#?}"
    );
}

#[test]
fn a_restart_after_an_intact_chain_still_reports_a_break() {
    // The old chain checks out (its cut-off tail was only visible against
    // the head the restart replaced): the restart record's account stands.
    let (mut lines, hashes) = log();
    lines.truncate(6);
    let (restart, rhash) = restart_line(9, "head");
    lines.push(restart);
    let reports = verify_log(&lines, Some((9, rhash)));
    assert!(
        matches!(
            &reports[0].outcome,
            Err((7, Broken::Restarted { seq: 9, at, .. })) if at == "head"
        ),
        "{reports:#?}"
    );
    assert!(reports[1].outcome.is_ok(), "{reports:#?}");
    // A plain intact log is one intact chain.
    let (lines, _) = log();
    let reports = verify_log(&lines, Some((8, hashes[7].clone())));
    assert_eq!(reports.len(), 1);
    assert!(reports[0].outcome.is_ok());
}
