//! The recording chain verifier on arbitrary files: `pgwarden sessions
//! verify` / `list` / `replay` over a state directory whose log and head an
//! attacker may have written. Never a panic. And from the other side: a log
//! pgwarden sealed (of records built from the input) verifies intact, and
//! any one byte changed in it is found.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pgwarden_sidecar::recording::chain::verify_session;
use pgwarden_sidecar::recording::log::{self, verify_lines};
use pgwarden_sidecar::recording::record::{seal, Event, Record, RecordedVerdict, GENESIS};
use pgwarden_sidecar::recording::{replay, spool};

/// One state directory per fuzzing process, rewritten per input.
fn state_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // scripts/fuzz points TMPDIR at a directory it removes afterwards.
        let dir =
            std::env::temp_dir().join(format!("pgwarden-fuzz-recording-{}", std::process::id()));
        std::fs::create_dir_all(spool::dir(&dir)).expect("a scratch state directory");
        dir
    })
}

fn write_log(head: Option<&[u8]>, log: &[u8]) {
    let rec = spool::dir(state_dir());
    std::fs::write(rec.join("seg-0000000001.jsonl"), log).expect("log written");
    let head_path = rec.join("head");
    match head {
        Some(h) => std::fs::write(head_path, h).expect("head written"),
        None => {
            let _ = std::fs::remove_file(head_path);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        arbitrary_files(mode & 2 != 0, rest);
    } else {
        sealed(rest);
    }
});

/// What the CLI does with a state directory: verify, list, pick and
/// replay each session.
fn arbitrary_files(with_head: bool, data: &[u8]) {
    let (head, log) = match with_head {
        true => match data.iter().position(|&b| b == b'\n') {
            Some(i) => (Some(&data[..i]), &data[i + 1..]),
            None => (Some(data), &data[..0]),
        },
        false => (None, data),
    };
    write_log(head, log);
    let dir = state_dir();
    let _ = log::verify(dir);
    let Ok(listing) = log::sessions(dir) else {
        return;
    };
    for s in listing.sessions.iter().take(4) {
        let Ok(lines) = log::session_lines(dir, &s.id) else {
            continue;
        };
        let texts: Vec<&str> = lines.lines.iter().map(|(_, l)| l.as_str()).collect();
        if let Ok(records) = verify_session(&texts) {
            let _ = replay::transcript(&records);
        }
    }
}

/// A log sealed as the gateway seals it, from records the input describes.
fn sealed(data: &[u8]) {
    let mut lines: Vec<String> = Vec::new();
    let mut prev = GENESIS.to_string();
    // Per session slot: (id, hash of its last record), None before start.
    let mut sessions: [Option<(String, String)>; 4] = Default::default();
    let mut generation = 0u32;
    let mut chunks = data.split(|&b| b == 0xff);
    let flip = chunks.next().unwrap_or_default();
    for chunk in chunks.take(64) {
        let Some((&op, text)) = chunk.split_first() else {
            continue;
        };
        let text = String::from_utf8_lossy(text).into_owned();
        let slot = usize::from(op & 3);
        let (session, session_prev, event) = match &sessions[slot] {
            None => {
                generation += 1;
                let id = format!("s{slot}-{generation}");
                let start = Event::SessionStart {
                    subject: text.clone(),
                    method: "localTrust".into(),
                    claims: vec![("k".into(), text.clone())],
                    client: "127.0.0.1:1".into(),
                    application_name: text,
                    policy: "ns/p".into(),
                    policy_version: "0123456789abcdef".into(),
                    database: "db".into(),
                };
                (id, String::new(), start)
            }
            Some((id, last)) => {
                let n = u64::from(op >> 4);
                let event = match (op >> 2) & 3 {
                    0 => Event::Statement {
                        n,
                        text: text.clone(),
                        parameters: vec![Some(text), None],
                        verdict: RecordedVerdict::Allow,
                        rule: Some("r".into()),
                        reason: None,
                        approval: None,
                        approved_by: None,
                    },
                    1 => Event::Statement {
                        n,
                        text: text.clone(),
                        parameters: vec![],
                        verdict: RecordedVerdict::Deny,
                        rule: None,
                        reason: Some(text),
                        approval: None,
                        approved_by: None,
                    },
                    2 => Event::Result {
                        n,
                        duration_us: 5,
                        rows: 1,
                        tag: Some("SELECT 1".into()),
                        error: None,
                        columns: vec![text.clone()],
                        sample: vec![vec![Some(text), None]],
                        sample_cut: false,
                    },
                    _ => Event::SessionEnd {
                        reason: text,
                        statements: n,
                    },
                };
                (id.clone(), last.clone(), event)
            }
        };
        let end = matches!(event, Event::SessionEnd { .. });
        let r = Record {
            seq: lines.len() as u64 + 1,
            at: "2026-01-01T00:00:00.000000Z".into(),
            session: session.clone(),
            event,
            prev: prev.clone(),
            session_prev,
        };
        let (line, hash) = seal(&r);
        assert!(!line.contains('\n'), "a sealed record is one line");
        sessions[slot] = (!end).then(|| (session, hash.clone()));
        prev = hash;
        lines.push(line);
    }
    if lines.is_empty() {
        return;
    }
    let mut file = lines.join("\n");
    file.push('\n');
    let head = format!("{{\"seq\":{},\"hash\":\"{prev}\"}}\n", lines.len());
    write_log(Some(head.as_bytes()), file.as_bytes());
    let reports = log::verify(state_dir()).expect("the log reads");
    assert_eq!(reports.len(), 1, "one chain");
    let summary = reports[0]
        .outcome
        .as_ref()
        .unwrap_or_else(|(place, b)| panic!("a sealed log is broken at {place}: {b}"));
    assert_eq!(summary.records, lines.len() as u64);

    // One byte changed (not a line break, so the lines stay the lines).
    let [a, b, c, ..] = *flip else {
        return;
    };
    let mut bytes = file.into_bytes();
    let at = usize::from(u16::from_le_bytes([a, b])) % bytes.len();
    let new = if c == bytes[at] { c.wrapping_add(1) } else { c };
    if bytes[at] == b'\n' || new == b'\n' {
        return;
    }
    bytes[at] = new;
    let edited: Vec<String> = bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    let reports = verify_lines(&edited);
    assert!(
        reports.iter().any(|r| r.outcome.is_err()),
        "an edited byte at {at} went unnoticed"
    );
}
