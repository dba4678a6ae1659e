//! Session recordings seen from the outside, as an auditor would: the spool
//! under `<state-dir>/recordings/` (`seg-<first seq>.jsonl`, one sealed JSON
//! record per line, and `head`), `pgwarden sessions list|replay|verify` run as
//! a separate process against a state dir or an audit database, tampering
//! with a copy of a spool, and an audit PostgreSQL holding the records table
//! behind an INSERT-only role.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::approvals::CliOutput;
use crate::client::{run_command, run_psql};
use crate::gateway::pgwarden_bin;
use crate::pg::PgCluster;

/// How long one CLI invocation may take before the test fails.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the pollers look again.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

// === the recording part of a policy ===

/// `spec.recording` as YAML lines (two-space indent, to append to a policy's
/// `spec`): `resultRows` and `durable` when given, and the audit store when
/// `dsn_secret` names a Secret.
pub fn recording_yaml(result_rows: Option<u32>, durable: bool, dsn_secret: Option<&str>) -> String {
    let mut yaml = String::from("  recording:\n");
    if let Some(rows) = result_rows {
        yaml.push_str(&format!("    resultRows: {rows}\n"));
    }
    if durable {
        yaml.push_str("    durable: true\n");
    }
    if let Some(secret) = dsn_secret {
        yaml.push_str(&format!(
            "    store:\n      postgres: {{dsnSecret: {secret}}}\n"
        ));
    }
    if yaml == "  recording:\n" {
        yaml = "  recording: {}\n".to_string();
    }
    yaml
}

// === pgwarden sessions ===

/// `pgwarden sessions ...` against one state dir or one audit database.
#[derive(Debug, Clone)]
pub struct SessionsCli {
    /// `--state-dir DIR` or `--store-dsn DSN`.
    target: Vec<OsString>,
}

impl SessionsCli {
    /// Reads the spool under `state_dir`.
    pub fn state_dir(state_dir: impl AsRef<Path>) -> Self {
        SessionsCli {
            target: vec!["--state-dir".into(), state_dir.as_ref().into()],
        }
    }

    /// Reads the audit table through `dsn` (a role that can SELECT it).
    pub fn store_dsn(dsn: &str) -> Self {
        SessionsCli {
            target: vec!["--store-dsn".into(), dsn.into()],
        }
    }

    /// `pgwarden sessions <args> <target>`, whatever its outcome.
    pub fn run(&self, args: &[&str]) -> CliOutput {
        let mut cmd = Command::new(pgwarden_bin());
        cmd.arg("sessions").args(args).args(&self.target);
        run_command(&mut cmd, None, CLI_TIMEOUT).into()
    }

    /// `sessions list -o json`: every session, oldest first. Panics unless the
    /// CLI succeeds with a JSON array.
    pub fn list(&self) -> Vec<Value> {
        let out = self.run(&["list", "-o", "json"]);
        assert_eq!(out.code(), Some(0), "sessions list -o json failed: {out}");
        match serde_json::from_str(&out.stdout) {
            Ok(Value::Array(sessions)) => sessions,
            _ => panic!("sessions list -o json did not print a JSON array: {out}"),
        }
    }

    /// The `list` entry of session `id`; panics if it is not listed.
    pub fn session(&self, id: &str) -> Value {
        let all = self.list();
        all.iter()
            .find(|s| s["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("session {id} is not listed: {all:#?}"))
    }

    /// Polls `list` until session `id` is listed as ended (its end record is
    /// written a moment after the client leaves); returns its entry.
    pub fn wait_ended(&self, id: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let all = self.list();
            if let Some(s) = all.iter().find(|s| s["id"] == id && !s["ended"].is_null()) {
                return s.clone();
            }
            if Instant::now() >= deadline {
                panic!("session {id} not listed as ended within {timeout:?}: {all:#?}");
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// `sessions replay ID`: the transcript. Panics unless it exits 0.
    pub fn replay(&self, id: &str) -> String {
        let out = self.run(&["replay", id]);
        assert_eq!(out.code(), Some(0), "sessions replay {id} failed: {out}");
        out.stdout
    }

    /// `sessions replay ID -o json`: the session's records. Panics unless
    /// the CLI succeeds with a JSON array.
    pub fn replay_json(&self, id: &str) -> Vec<Value> {
        let out = self.run(&["replay", id, "-o", "json"]);
        assert_eq!(
            out.code(),
            Some(0),
            "sessions replay {id} -o json failed: {out}"
        );
        match serde_json::from_str(&out.stdout) {
            Ok(Value::Array(records)) => records,
            _ => panic!("sessions replay {id} -o json did not print a JSON array: {out}"),
        }
    }

    /// `sessions verify`, whatever its outcome.
    pub fn verify(&self) -> CliOutput {
        self.run(&["verify"])
    }

    /// `sessions verify` (text and `-o json`) says intact, exit 0; returns
    /// (records, sessions) from the JSON answer, checked against the text.
    pub fn assert_intact(&self) -> (u64, u64) {
        let text = self.verify();
        assert_eq!(text.code(), Some(0), "sessions verify: {text}");
        let json = self.run(&["verify", "-o", "json"]);
        assert_eq!(json.code(), Some(0), "sessions verify -o json: {json}");
        let v: Value = serde_json::from_str(&json.stdout)
            .unwrap_or_else(|e| panic!("sessions verify -o json is not JSON ({e}): {json}"));
        assert_eq!(v["intact"], true, "{json}");
        let records = v["records"]
            .as_u64()
            .unwrap_or_else(|| panic!("no record count: {json}"));
        let sessions = v["sessions"]
            .as_u64()
            .unwrap_or_else(|| panic!("no session count: {json}"));
        let summary = format!("{records} records, {sessions} sessions");
        assert!(
            text.stdout.trim_start().starts_with("intact:") && text.stdout.contains(&summary),
            "sessions verify should say intact: ... {summary:?}: {text}"
        );
        (records, sessions)
    }

    /// `sessions verify` fails (exit 1) with a line starting `BROKEN:`;
    /// returns that line.
    pub fn assert_broken(&self) -> String {
        let out = self.verify();
        assert_eq!(out.code(), Some(1), "sessions verify should fail: {out}");
        out.stdout
            .lines()
            .chain(out.stderr.lines())
            .find(|l| l.starts_with("BROKEN:"))
            .unwrap_or_else(|| panic!("no line starting BROKEN: {out}"))
            .to_string()
    }
}

// === the spool ===

/// One line of a segment file.
#[derive(Debug, Clone)]
pub struct SpoolLine {
    pub file: PathBuf,
    /// 1-based.
    pub number: usize,
    /// Without its newline.
    pub text: String,
    /// It ended with a newline (a torn last line does not).
    pub complete: bool,
}

impl SpoolLine {
    /// `seg-....jsonl:N`, as `verify` names a place.
    pub fn place(&self) -> String {
        format!("{}:{}", file_name(&self.file), self.number)
    }

    /// The record, parsed; panics on a line that is not JSON.
    pub fn record(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("{}: not a JSON record ({e}): {}", self.place(), self.text))
    }
}

/// The base name of `path`, as text.
pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `<state-dir>/recordings`.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    pub fn new(state_dir: impl AsRef<Path>) -> Self {
        Spool {
            dir: state_dir.as_ref().join("recordings"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `seg-*.jsonl` files in log order (their names sort by first seq).
    pub fn segments(&self) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut segs: Vec<PathBuf> = entries
            .map(|e| e.expect("dir entry").path())
            .filter(|p| {
                let name = file_name(p);
                name.starts_with("seg-") && name.ends_with(".jsonl")
            })
            .collect();
        segs.sort();
        segs
    }

    /// Every line of every segment, in log order.
    pub fn lines(&self) -> Vec<SpoolLine> {
        let mut out = Vec::new();
        for file in self.segments() {
            let bytes = fs::read(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
            let text = String::from_utf8_lossy(&bytes);
            let mut rest: &str = &text;
            let mut number = 0;
            while !rest.is_empty() {
                number += 1;
                let (line, complete, next) = match rest.find('\n') {
                    Some(i) => (&rest[..i], true, &rest[i + 1..]),
                    None => (rest, false, ""),
                };
                out.push(SpoolLine {
                    file: file.clone(),
                    number,
                    text: line.to_string(),
                    complete,
                });
                rest = next;
            }
        }
        out
    }

    /// Every complete line's record, in log order (a torn last line, which
    /// was never acknowledged, is left out).
    pub fn records(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .filter(|l| l.complete)
            .map(SpoolLine::record)
            .collect()
    }

    /// The `head` file: `{"seq": N, "hash": "..."}`, if there is one.
    pub fn head(&self) -> Option<Value> {
        let text = fs::read_to_string(self.dir.join("head")).ok()?;
        Some(
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("head is not JSON ({e}): {text:?}")),
        )
    }

    /// Polls the spool (records not asked to be durable reach the disk within
    /// 200 ms) until `ready` holds for its records; returns them. Panics after
    /// `timeout` with what `what` awaited and the records seen.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let records = self.records();
            if ready(&records) {
                return records;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the spool in {} did not get {what} within {timeout:?}; it holds:\n{}",
                    self.dir.display(),
                    records
                        .iter()
                        .map(Value::to_string)
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    }
}

// === reading records ===

/// The session ids in `records`, in order of their `sessionStart`.
pub fn session_ids(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .filter(|r| r["kind"] == "sessionStart")
        .filter_map(|r| r["session"].as_str().map(str::to_string))
        .collect()
}

/// The records of session `id`, in order.
pub fn of_session<'a>(records: &'a [Value], id: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["session"] == id).collect()
}

/// The statement records whose text is exactly `text`.
pub fn statements_with_text<'a>(records: &'a [Value], text: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| r["kind"] == "statement" && r["text"] == text)
        .collect()
}

/// The one statement record whose text is exactly `text`; panics otherwise.
pub fn statement<'a>(records: &'a [Value], text: &str) -> &'a Value {
    let found = statements_with_text(records, text);
    assert_eq!(
        found.len(),
        1,
        "expected exactly one statement record {text:?}, found {found:#?}"
    );
    found[0]
}

/// The result record of statement record `stmt` (same session, same `n`).
pub fn result_of<'a>(records: &'a [Value], stmt: &Value) -> Option<&'a Value> {
    records
        .iter()
        .find(|r| r["kind"] == "result" && r["session"] == stmt["session"] && r["n"] == stmt["n"])
}

/// Like [`result_of`], panicking with the statement when there is none.
pub fn expect_result<'a>(records: &'a [Value], stmt: &Value) -> &'a Value {
    result_of(records, stmt).unwrap_or_else(|| panic!("no result record for {stmt}"))
}

/// The rows of every aligned table in a transcript: lines with ` | `
/// separators (the header included), split and trimmed.
pub fn table_rows(transcript: &str) -> Vec<Vec<String>> {
    transcript
        .lines()
        .filter(|l| l.contains(" | "))
        .map(|l| l.split('|').map(|c| c.trim().to_string()).collect())
        .collect()
}

// === tampering with a copy ===

/// Copies directory `from` to `to` (created), recursively.
pub fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap_or_else(|e| panic!("mkdir {}: {e}", to.display()));
    let entries = fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display()));
    for entry in entries {
        let entry = entry.expect("dir entry");
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let meta = fs::symlink_metadata(&src).expect("stat");
        if meta.is_dir() {
            copy_dir(&src, &dst);
        } else if meta.is_file() {
            fs::copy(&src, &dst)
                .unwrap_or_else(|e| panic!("copy {} to {}: {e}", src.display(), dst.display()));
        }
    }
}

/// Rewrites segment `file` through `edit`, which gets its lines (without
/// newlines); every line is written back newline-terminated.
pub fn edit_segment(file: &Path, edit: impl FnOnce(&mut Vec<String>)) {
    let text = fs::read_to_string(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    edit(&mut lines);
    let mut out = String::new();
    for l in &lines {
        out.push_str(l);
        out.push('\n');
    }
    fs::write(file, out).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
}

// === the audit database ===

/// The audit table, as an admin creates it (pgwarden only INSERTs).
pub const AUDIT_TABLE: &str = "pgwarden_records";
/// The database the audit cluster keeps records in.
pub const AUDIT_DATABASE: &str = "audit";
/// The role pgwarden writes with: INSERT on the table, nothing else.
pub const WRITER: (&str, &str) = ("writer", "writer-pw-5e1d");
/// A role that can only read the table (for `sessions ... --store-dsn`).
pub const AUDITOR: (&str, &str) = ("auditor", "auditor-pw-77c2");

/// A second PostgreSQL cluster as the audit store.
pub struct AuditDb {
    pg: PgCluster,
}

impl AuditDb {
    /// A cluster with database `audit`, the records table, an INSERT-only
    /// writer and a SELECT-only auditor. Commits are synchronous, so a
    /// record whose INSERT committed survives an immediate stop.
    pub fn start() -> AuditDb {
        let pg = PgCluster::builder()
            .setting("synchronous_commit", "on")
            .start();
        pg.admin_sql(&format!("CREATE DATABASE {AUDIT_DATABASE}"));
        let db = AuditDb { pg };
        db.sql(&format!(
            "CREATE TABLE {AUDIT_TABLE} (chain text NOT NULL, seq bigint NOT NULL, \
               hash text PRIMARY KEY, session text NOT NULL, at timestamptz NOT NULL, \
               kind text NOT NULL, line text NOT NULL);
             CREATE ROLE {w} LOGIN PASSWORD '{wp}';
             GRANT INSERT ON {AUDIT_TABLE} TO {w};
             CREATE ROLE {a} LOGIN PASSWORD '{ap}';
             GRANT SELECT ON {AUDIT_TABLE} TO {a};",
            w = WRITER.0,
            wp = WRITER.1,
            a = AUDITOR.0,
            ap = AUDITOR.1,
        ));
        db
    }

    pub fn cluster(&self) -> &PgCluster {
        &self.pg
    }

    fn dsn(&self, (user, password): (&str, &str)) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/{AUDIT_DATABASE}?sslmode=disable",
            self.pg.port()
        )
    }

    /// What the gateway's Secret holds: the INSERT-only writer.
    pub fn writer_dsn(&self) -> String {
        self.dsn(WRITER)
    }

    /// The SELECT-only auditor, for `sessions ... --store-dsn`.
    pub fn auditor_dsn(&self) -> String {
        self.dsn(AUDITOR)
    }

    /// A v1 Secret `name` (namespace default) whose key `dsn` is the writer's.
    pub fn secret_yaml(&self, name: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: default\n\
             type: Opaque\nstringData:\n  dsn: \"{}\"\n",
            self.writer_dsn()
        )
    }

    /// Runs `sql` in the audit database as the cluster's superuser-ish `app`
    /// (psql -A -t, `|`-separated); returns the trimmed stdout.
    pub fn sql(&self, sql: &str) -> String {
        let env: Vec<(String, String)> = self
            .pg
            .direct_env()
            .into_iter()
            .map(|(k, v)| {
                if k == "PGDATABASE" {
                    (k, AUDIT_DATABASE.to_string())
                } else {
                    (k, v)
                }
            })
            .collect();
        let out = run_psql(
            &env,
            &["-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"],
            Some(sql),
        );
        assert!(
            out.status.success(),
            "audit sql failed ({}):\n{sql}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// (chain, seq, hash, session, kind, line) of every row, by chain and seq.
    pub fn rows(&self) -> Vec<AuditRow> {
        let json = self.sql(&format!(
            "SELECT coalesce(json_agg(json_build_array(chain, seq, hash, session, kind, line) \
               ORDER BY chain, seq), '[]') FROM {AUDIT_TABLE}"
        ));
        let v: Value = serde_json::from_str(&json)
            .unwrap_or_else(|e| panic!("audit rows are not JSON ({e}): {json}"));
        v.as_array()
            .expect("an array")
            .iter()
            .map(|r| AuditRow {
                chain: r[0].as_str().unwrap_or_default().to_string(),
                seq: r[1].as_u64().expect("seq"),
                hash: r[2].as_str().unwrap_or_default().to_string(),
                session: r[3].as_str().unwrap_or_default().to_string(),
                kind: r[4].as_str().unwrap_or_default().to_string(),
                line: r[5].as_str().unwrap_or_default().to_string(),
            })
            .collect()
    }

    /// Rows in the table.
    pub fn count(&self) -> u64 {
        let n = self.sql(&format!("SELECT count(*) FROM {AUDIT_TABLE}"));
        n.parse()
            .unwrap_or_else(|_| panic!("count(*) answered {n:?}"))
    }

    /// Polls (every 100 ms) until `ready` holds for the rows; returns them.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut(&[AuditRow]) -> bool,
    ) -> Vec<AuditRow> {
        let deadline = Instant::now() + timeout;
        loop {
            let rows = self.rows();
            if ready(&rows) {
                return rows;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the audit table did not get {what} within {timeout:?}; it holds {} rows (seqs {:?})",
                    rows.len(),
                    rows.iter().map(|r| r.seq).collect::<Vec<_>>()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// An outage: `pg_ctl stop -m immediate`.
    pub fn stop(&mut self) {
        self.pg.stop();
    }

    /// The end of the outage: the same cluster on the same port.
    pub fn start_again(&mut self) {
        self.pg.start_again();
    }
}

/// One row of the audit table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub chain: String,
    pub seq: u64,
    pub hash: String,
    pub session: String,
    pub kind: String,
    pub line: String,
}

/// SIGKILL the process `pid` (no chance to flush anything).
pub fn sigkill(pid: u32) {
    let status = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("run kill -KILL");
    assert!(status.success(), "kill -KILL {pid} failed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_yaml_has_what_is_asked() {
        assert_eq!(recording_yaml(None, false, None), "  recording: {}\n");
        assert_eq!(
            recording_yaml(Some(5), true, Some("audit-dsn")),
            "  recording:\n    resultRows: 5\n    durable: true\n    store:\n      postgres: {dsnSecret: audit-dsn}\n"
        );
    }

    #[test]
    fn spool_lines_know_their_place_and_torn_tails() {
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("recordings");
        fs::create_dir(&rec).unwrap();
        fs::write(
            rec.join("seg-000000000003.jsonl"),
            "{\"seq\":3}\n{\"seq\":4",
        )
        .unwrap();
        fs::write(
            rec.join("seg-000000000001.jsonl"),
            "{\"seq\":1}\n{\"seq\":2}\n",
        )
        .unwrap();
        fs::write(rec.join("head"), "{\"seq\":3,\"hash\":\"x\"}\n").unwrap();
        let spool = Spool::new(dir.path());
        let lines = spool.lines();
        let places: Vec<String> = lines.iter().map(SpoolLine::place).collect();
        assert_eq!(
            places,
            [
                "seg-000000000001.jsonl:1",
                "seg-000000000001.jsonl:2",
                "seg-000000000003.jsonl:1",
                "seg-000000000003.jsonl:2"
            ]
        );
        assert!(!lines[3].complete);
        let seqs: Vec<u64> = spool
            .records()
            .iter()
            .map(|r| r["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(spool.head().unwrap()["seq"], 3);

        edit_segment(&rec.join("seg-000000000001.jsonl"), |l| l.swap(0, 1));
        assert_eq!(
            fs::read_to_string(rec.join("seg-000000000001.jsonl")).unwrap(),
            "{\"seq\":2}\n{\"seq\":1}\n"
        );
        let copy = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), copy.path());
        assert_eq!(Spool::new(copy.path()).lines().len(), 4);
    }

    #[test]
    fn transcript_tables_split_into_cells() {
        let t = "shop=> SELECT 1\n id | card \n----+------\n 2  | ***1 \n(1 row)\n";
        assert_eq!(
            table_rows(t),
            vec![vec!["id", "card"], vec!["2", "***1"]]
                .into_iter()
                .map(|r| r.into_iter().map(String::from).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        );
    }
}
