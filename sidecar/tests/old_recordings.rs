//! A recording log written before verdicts became an enum
//! (`fixtures/recording-before-verdict-enum`, made by the gateway's own
//! recorder with every verdict it wrote: allow, deny, held, approved) must
//! still verify, list and replay: the line format is the audit evidence.

use std::path::{Path, PathBuf};
use std::process::Command;

use pgwarden_sidecar::recording::record::{self, Event, RecordedVerdict};
use pgwarden_sidecar::recording::{log, replay};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/recording-before-verdict-enum")
}

fn lines() -> Vec<String> {
    let seg = fixture().join("recordings/seg-000000000001.jsonl");
    std::fs::read_to_string(seg)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn old_lines_open_and_seal_back_to_the_same_bytes() {
    let mut verdicts = Vec::new();
    for line in lines() {
        let (r, _) = record::open(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if let Event::Statement { verdict, .. } = &r.event {
            verdicts.push(*verdict);
        }
        // Written again by today's code, a record is the same line.
        assert_eq!(record::seal(&r).0, line);
    }
    assert_eq!(
        verdicts,
        [
            RecordedVerdict::Allow,
            RecordedVerdict::Deny,
            RecordedVerdict::Held,
            RecordedVerdict::Approved
        ]
    );
}

#[test]
fn an_old_log_verifies_lists_and_replays() {
    let reports = log::verify(&fixture()).unwrap();
    assert_eq!(reports.len(), 1);
    let summary = reports[0].outcome.as_ref().expect("the old log is intact");
    assert_eq!((summary.records, summary.sessions), (8, 1));

    let listing = log::sessions(&fixture()).unwrap();
    assert_eq!(listing.sessions.len(), 1);
    assert_eq!(
        (listing.sessions[0].statements, listing.sessions[0].denied),
        (4, 1)
    );

    let records: Vec<_> = lines().iter().map(|l| record::open(l).unwrap().0).collect();
    let t = replay::transcript(&records);
    for want in [
        "#2 [deny, rule default]",
        "#3 [held, rule bulk-deletes, approval req-7f3a]",
        "#4 [approved, rule bulk-deletes, approval req-7f3a approved by alice]",
        "ERROR:  pgwarden: denied by rule default: DROP on customers",
    ] {
        assert!(t.contains(want), "{want:?} not in\n{t}");
    }
}

#[test]
fn pgwarden_sessions_verify_passes_on_an_old_log() {
    let out = Command::new(env!("CARGO_BIN_EXE_pgwarden"))
        .args(["sessions", "verify", "--state-dir"])
        .arg(fixture())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("intact: "),
        "{out:?}"
    );
}
