//! The reviewer's side of approvals in standalone mode: `pgwarden approvals
//! list|show|approve|deny ... --state-dir DIR`, run as a separate process exactly
//! as a human would, plus what the tests need to read its answers.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::client::run_command;
use crate::gateway::{pgwarden_bin, POLICY_NAME};

/// How long one CLI invocation may take before the test fails.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// How often [`ApprovalsCli::wait_for`] asks `approvals list` again.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// `pgwarden approvals ...` against one state dir.
#[derive(Debug, Clone)]
pub struct ApprovalsCli {
    state_dir: PathBuf,
}

/// What one CLI invocation did.
#[derive(Debug, Clone)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

// === impl CliOutput ===

impl CliOutput {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl From<std::process::Output> for CliOutput {
    fn from(out: std::process::Output) -> Self {
        CliOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl fmt::Display for CliOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

// === impl ApprovalsCli ===

impl ApprovalsCli {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        ApprovalsCli {
            state_dir: state_dir.into(),
        }
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// `pgwarden approvals <args> --state-dir DIR`, whatever its outcome.
    pub fn run(&self, args: &[&str]) -> CliOutput {
        let mut cmd = Command::new(pgwarden_bin());
        cmd.arg("approvals")
            .args(args)
            .arg("--state-dir")
            .arg(&self.state_dir);
        run_command(&mut cmd, None, CLI_TIMEOUT).into()
    }

    /// `approvals list -o json`: every request, newest last. Panics unless the CLI
    /// succeeds with a JSON array.
    pub fn list(&self) -> Vec<Value> {
        let out = self.run(&["list", "-o", "json"]);
        assert!(out.status.success(), "approvals list -o json failed: {out}");
        match serde_json::from_str(&out.stdout) {
            Ok(Value::Array(requests)) => requests,
            _ => panic!("approvals list -o json did not print a JSON array: {out}"),
        }
    }

    /// `approvals show ID -o json`. Panics unless the CLI succeeds with an object.
    pub fn show(&self, id: &str) -> Value {
        let out = self.run(&["show", id, "-o", "json"]);
        assert!(out.status.success(), "approvals show {id} failed: {out}");
        match serde_json::from_str(&out.stdout) {
            Ok(request @ Value::Object(_)) => request,
            _ => panic!("approvals show {id} -o json did not print a JSON object: {out}"),
        }
    }

    /// `approvals approve ID [--reason R]`, whatever its outcome.
    pub fn try_approve(&self, id: &str, reason: Option<&str>) -> CliOutput {
        self.decide("approve", id, reason)
    }

    /// `approvals deny ID [--reason R]`, whatever its outcome.
    pub fn try_deny(&self, id: &str, reason: Option<&str>) -> CliOutput {
        self.decide("deny", id, reason)
    }

    /// `approvals approve ID --reason R`; panics unless it exits 0.
    pub fn approve(&self, id: &str, reason: &str) {
        let out = self.try_approve(id, Some(reason));
        assert_eq!(out.code(), Some(0), "approvals approve {id}: {out}");
    }

    /// `approvals deny ID --reason R`; panics unless it exits 0.
    pub fn deny(&self, id: &str, reason: &str) {
        let out = self.try_deny(id, Some(reason));
        assert_eq!(out.code(), Some(0), "approvals deny {id}: {out}");
    }

    fn decide(&self, verb: &str, id: &str, reason: Option<&str>) -> CliOutput {
        match reason {
            Some(reason) => self.run(&[verb, id, "--reason", reason]),
            None => self.run(&[verb, id]),
        }
    }

    /// Polls `approvals list -o json` every 100 ms until a request satisfies
    /// `matches` and returns the newest such; panics after `timeout` with the last
    /// list and what was awaited.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut matches: impl FnMut(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let requests = self.list();
            if let Some(found) = requests.iter().rev().find(|r| matches(r)) {
                return found.clone();
            }
            if Instant::now() >= deadline {
                panic!(
                    "no approval request {what} within {timeout:?}; approvals list -o json:\n{}",
                    serde_json::to_string_pretty(&requests).unwrap_or_default()
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Polls `approvals show ID -o json` every 100 ms until the released
    /// statement's outcome is recorded (`result` is set) and returns the
    /// request; panics after 10 s with the last answer. The gateway may record
    /// the outcome a moment after the client has it.
    pub fn wait_for_outcome(&self, id: &str) -> Value {
        let timeout = Duration::from_secs(10);
        let deadline = Instant::now() + timeout;
        loop {
            let request = self.show(id);
            if request["result"].is_string() {
                return request;
            }
            if Instant::now() >= deadline {
                panic!("request {id} recorded no result within {timeout:?}: {request}");
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits for a Pending request for exactly `statement` whose id is not in
    /// `except` (ids of earlier requests for the same text).
    pub fn wait_for_pending(&self, statement: &str, except: &[&str]) -> Value {
        self.wait_for(
            &format!("Pending for {statement:?}"),
            Duration::from_secs(20),
            |r| {
                r["statement"] == statement
                    && r["phase"] == "Pending"
                    && !except.iter().any(|id| r["id"] == *id)
            },
        )
    }

    /// The exact command a reviewer is told to run.
    pub fn approve_command(&self, id: &str) -> String {
        format!(
            "pgwarden approvals approve {id} --state-dir {}",
            self.state_dir.display()
        )
    }
}

/// The first approval request id (`<policy>-<6 lowercase hex>`, policy
/// [`POLICY_NAME`]) in `text`.
pub fn request_id_in(text: &str) -> Option<String> {
    let prefix = format!("{POLICY_NAME}-");
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(at) = text[from..].find(&prefix).map(|i| i + from) {
        from = at + prefix.len();
        let starts_word = at == 0 || !is_id_char(bytes[at - 1]);
        let hex = &bytes[from..];
        let six_hex = hex.len() >= 6
            && hex[..6]
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
        let ends_word = hex.get(6).is_none_or(|&b| !is_id_char(b));
        if starts_word && six_hex && ends_word {
            return Some(text[from - prefix.len()..from + 6].to_string());
        }
    }
    None
}

fn is_id_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Whether `id` has the form of a request id of policy [`POLICY_NAME`].
pub fn is_request_id(id: &str) -> bool {
    request_id_in(id).as_deref() == Some(id)
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("dir entry").path();
            let meta = fs::symlink_metadata(&path)
                .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
            if meta.is_dir() {
                todo.push(path);
            } else if meta.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Every regular file under `dir` (recursively) whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    assert!(!needle.is_empty(), "files_containing needs a needle");
    files_under(dir)
        .into_iter()
        .filter(|path| {
            let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
        })
        .collect()
}

/// The OS user running this test (`id -un`): what a decision's `decidedBy` names
/// when the CLI decides.
pub fn os_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("run id -un");
    assert!(out.status.success(), "id -un failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_request_ids() {
        assert_eq!(
            request_id_in("held as e2e-0a1b2c; run pgwarden approvals approve e2e-0a1b2c")
                .as_deref(),
            Some("e2e-0a1b2c")
        );
        assert_eq!(
            request_id_in("/tmp/pgwarden-e2e-gw-abc/state e2e-ffffff.").as_deref(),
            Some("e2e-ffffff")
        );
        assert_eq!(
            request_id_in("e2e-0A1B2C e2e-12345 e2e-1234567 xe2e-123456"),
            None
        );
        assert!(is_request_id("e2e-abcdef"));
        assert!(!is_request_id("e2e-abcdef "));
    }

    #[test]
    fn finds_needles_in_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("a.json"), "{\"p\": \"****\"}").unwrap();
        fs::write(dir.path().join("sub/b.log"), "x 4111111111111111 y").unwrap();
        assert_eq!(
            files_containing(dir.path(), "4111111111111111"),
            vec![dir.path().join("sub/b.log")]
        );
        assert!(files_containing(dir.path(), "5500").is_empty());
        assert_eq!(files_under(dir.path()).len(), 2);
    }
}
