//! The adversarial statement corpus (`e2e/corpus/statements.yaml`) against the corpus
//! policy (`e2e/corpus/policy.yaml`), three ways:
//!
//! - `check_verdicts`: `pgwarden check -f policy.yaml --sql SQL -o json` for every case:
//!   exit code, JSON `verdict` and the `reason` substring;
//! - `direct_control`: every case straight against PostgreSQL as the superuser `app`,
//!   asserting the outcome the corpus claims (`pg:`): the attacks are real (they leak or
//!   change something), the legitimate statements run, the syntax is what the comment
//!   says. When the gateway run fails, this run tells whether the corpus or the proxy
//!   is wrong;
//! - `through_gateway`: every case through `pgwarden run` in front of the same kind of
//!   superuser connection: allowed cases behave as directly, refused ones get ERROR
//!   42501 naming the reason, the database is exactly as before (tables, roles,
//!   functions, settings, large objects, files), nothing protected comes back, and the
//!   session answers the next statement.
//!
//! Every run reports all mismatching cases in one failure message.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use pgwarden_e2e::{libpq_command, pgwarden_bin, run_command, Endpoint, Gateway, PgCluster};

/// Per psql run; a case that takes longer is a hang.
const CASE_TIMEOUT: Duration = Duration::from_secs(60);
/// Per `pgwarden check` run.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);
/// Parallel `pgwarden check` processes.
const CHECK_WORKERS: usize = 4;
/// Printed by the statement run after every case in the same session.
const ALIVE: &str = "pgwarden-e2e-alive";
/// Values that must never reach a client through the gateway (compared lower-cased):
/// the fixture's protected rows, a SCRAM password hash from pg_authid/pg_shadow, and the
/// first line of /etc/passwd.
const PROTECTED: &[&str] = &["top-secret", "scram-sha-256$", "root:x:0:"];
/// `{{tmp}}` for `pgwarden check`, which never touches the file system.
const CHECK_TMP: &str = "/tmp/pgwarden-corpus";
/// `{{port}}` for `pgwarden check`.
const CHECK_PORT: u16 = 5432;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

fn policy_path() -> PathBuf {
    corpus_dir().join("policy.yaml")
}

// === the corpus file ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Allow,
    Deny,
    RequireApproval,
}

/// What the statement does when run directly as the superuser.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PgOutcome {
    /// Runs, changes nothing, returns nothing protected.
    Ok,
    /// Runs and changes the database (or creates a file).
    Change,
    /// Returns a protected value.
    Leak,
    /// PostgreSQL refuses it with this SQLSTATE.
    Error(String),
}

#[derive(Debug, Clone)]
struct Case {
    id: String,
    line: usize,
    expect: Verdict,
    reason: Option<String>,
    check: Option<Verdict>,
    pg: PgOutcome,
    setup: Vec<String>,
    sql: String,
}

// === impl Verdict ===

impl Verdict {
    fn parse(s: &str) -> Option<Verdict> {
        match s {
            "allow" => Some(Verdict::Allow),
            "deny" => Some(Verdict::Deny),
            "require-approval" => Some(Verdict::RequireApproval),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::RequireApproval => "require-approval",
        }
    }

    /// `pgwarden check` exit code (contract: 0 allow, 1 deny, 3 require-approval).
    fn exit_code(self) -> i32 {
        match self {
            Verdict::Allow => 0,
            Verdict::Deny => 1,
            Verdict::RequireApproval => 3,
        }
    }

    /// The start of the client-visible message for a refusal.
    fn message_prefix(self) -> &'static str {
        match self {
            Verdict::Allow => "",
            Verdict::Deny => "pgwarden: denied",
            Verdict::RequireApproval => "pgwarden: approval required",
        }
    }
}

// === impl PgOutcome ===

impl PgOutcome {
    fn parse(s: &str) -> Option<PgOutcome> {
        match s {
            "ok" => Some(PgOutcome::Ok),
            "change" => Some(PgOutcome::Change),
            "leak" => Some(PgOutcome::Leak),
            _ => {
                let code = s.strip_prefix("error ")?;
                (code.len() == 5 && code.chars().all(|c| c.is_ascii_alphanumeric()))
                    .then(|| PgOutcome::Error(code.to_string()))
            }
        }
    }

    fn sqlstate(&self) -> &str {
        match self {
            PgOutcome::Error(code) => code,
            _ => "00000",
        }
    }
}

// === impl Case ===

impl Case {
    fn check_expect(&self) -> Verdict {
        self.check.unwrap_or(self.expect)
    }

    fn name(&self) -> String {
        format!("{} (statements.yaml:{})", self.id, self.line)
    }
}

/// Reads the strict YAML subset statements.yaml is written in: a top-level list of
/// mappings whose values are plain words, single-quoted strings, or `|-` literal blocks
/// indented by four spaces; comment lines start with `#` (top level) or `  #`.
fn parse_corpus(text: &str) -> Result<Vec<Case>, String> {
    #[derive(Default)]
    struct Partial {
        line: usize,
        fields: Vec<(String, String)>,
    }

    fn finish(p: Partial) -> Result<Case, String> {
        let at = |msg: String| format!("statements.yaml:{}: {msg}", p.line);
        let mut id = None;
        let mut expect = None;
        let mut reason = None;
        let mut check = None;
        let mut pg = None;
        let mut setup = Vec::new();
        let mut sql = None;
        for (i, (key, value)) in p.fields.iter().enumerate() {
            let dup = p.fields[..i].iter().any(|(k, _)| k == key);
            if dup {
                return Err(at(format!("duplicate key {key}")));
            }
            match key.as_str() {
                "id" => id = Some(value.clone()),
                "expect" => {
                    expect = Some(
                        Verdict::parse(value).ok_or_else(|| at(format!("bad expect {value:?}")))?,
                    )
                }
                "check" => {
                    check = Some(
                        Verdict::parse(value).ok_or_else(|| at(format!("bad check {value:?}")))?,
                    )
                }
                "pg" => {
                    pg = Some(
                        PgOutcome::parse(value).ok_or_else(|| at(format!("bad pg {value:?}")))?,
                    )
                }
                "reason" => reason = Some(value.clone()),
                "setup" => {
                    setup = value
                        .lines()
                        .filter(|l| !l.trim().is_empty())
                        .map(str::to_string)
                        .collect()
                }
                "sql" => {
                    if i + 1 != p.fields.len() {
                        return Err(at("sql must be the last key of a case".into()));
                    }
                    sql = Some(value.clone())
                }
                other => return Err(at(format!("unknown key {other}"))),
            }
        }
        let case = Case {
            id: id.ok_or_else(|| at("no id".into()))?,
            line: p.line,
            expect: expect.ok_or_else(|| at("no expect".into()))?,
            reason,
            check,
            pg: pg.unwrap_or(PgOutcome::Ok),
            setup,
            sql: sql.ok_or_else(|| at("no sql".into()))?,
        };
        if case.sql.trim().is_empty() {
            return Err(at("empty sql".into()));
        }
        if case.expect == Verdict::Allow && case.pg == PgOutcome::Leak {
            return Err(at("an allowed case cannot leak".into()));
        }
        let lower = case.sql.to_lowercase();
        if let Some(marker) = PROTECTED.iter().find(|m| lower.contains(*m)) {
            return Err(at(format!(
                "the SQL itself contains the protected marker {marker:?}"
            )));
        }
        Ok(case)
    }

    fn scalar(raw: &str, line: usize) -> Result<String, String> {
        if let Some(rest) = raw.strip_prefix('\'') {
            let inner = rest.strip_suffix('\'').ok_or_else(|| {
                format!("statements.yaml:{line}: unterminated single-quoted value")
            })?;
            if inner.replace("''", "").contains('\'') {
                return Err(format!("statements.yaml:{line}: lone ' in a quoted value"));
            }
            return Ok(inner.replace("''", "'"));
        }
        let plain_ok = !raw.is_empty()
            && raw
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || " _.-".contains(c));
        if !plain_ok {
            return Err(format!(
                "statements.yaml:{line}: value {raw:?} must be single-quoted"
            ));
        }
        Ok(raw.to_string())
    }

    let mut cases: Vec<Case> = Vec::new();
    let mut current: Option<Partial> = None;
    // (key, lines) of the literal block being read.
    let mut block: Option<(String, Vec<String>)> = None;

    let close_block = |block: &mut Option<(String, Vec<String>)>, current: &mut Option<Partial>| {
        if let Some((key, mut lines)) = block.take() {
            while lines.last().is_some_and(|l| l.is_empty()) {
                lines.pop();
            }
            if let Some(p) = current.as_mut() {
                p.fields.push((key, lines.join("\n")));
            }
        }
    };

    for (idx, line) in text.lines().enumerate() {
        let n = idx + 1;
        if block.is_some() {
            if let Some(content) = line.strip_prefix("    ") {
                block.as_mut().unwrap().1.push(content.to_string());
                continue;
            }
            if line.trim().is_empty() {
                block.as_mut().unwrap().1.push(String::new());
                continue;
            }
            close_block(&mut block, &mut current);
        }
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        if line.contains('\t') {
            return Err(format!("statements.yaml:{n}: tab character"));
        }
        if let Some(id) = line.strip_prefix("- id: ") {
            if let Some(p) = current.take() {
                cases.push(finish(p)?);
            }
            current = Some(Partial {
                line: n,
                fields: vec![("id".into(), scalar(id.trim_end(), n)?)],
            });
            continue;
        }
        let Some(rest) = line.strip_prefix("  ") else {
            return Err(format!("statements.yaml:{n}: unexpected line {line:?}"));
        };
        if rest.starts_with('#') {
            continue;
        }
        let Some(p) = current.as_mut() else {
            return Err(format!("statements.yaml:{n}: key outside a case"));
        };
        let Some((key, value)) = rest.split_once(':') else {
            return Err(format!("statements.yaml:{n}: expected `key: value`"));
        };
        if !key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            return Err(format!("statements.yaml:{n}: bad key {key:?}"));
        }
        let value = value.trim();
        if value == "|-" {
            block = Some((key.to_string(), Vec::new()));
        } else {
            p.fields.push((key.to_string(), scalar(value, n)?));
        }
    }
    close_block(&mut block, &mut current);
    if let Some(p) = current.take() {
        cases.push(finish(p)?);
    }

    let mut ids = BTreeSet::new();
    for case in &cases {
        if !ids.insert(case.id.clone()) {
            return Err(format!("duplicate id {}", case.name()));
        }
    }
    Ok(cases)
}

fn load_corpus() -> Vec<Case> {
    let path = corpus_dir().join("statements.yaml");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    parse_corpus(&text).unwrap_or_else(|e| panic!("{e}"))
}

/// The case's SQL with `{{tmp}}` and `{{port}}` filled in.
fn render(sql: &str, tmp: &str, port: u16) -> String {
    sql.replace("{{tmp}}", tmp)
        .replace("{{port}}", &port.to_string())
}

fn protected_in(text: &str) -> Option<&'static str> {
    let lower = text.to_lowercase();
    PROTECTED.iter().copied().find(|m| lower.contains(m))
}

fn excerpt(text: &str, max: usize) -> String {
    let text = text.trim();
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// One failure message listing every mismatch.
fn report(what: &str, total: usize, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{what}: {} of {total} cases failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn corpus_file_is_well_formed() {
    let cases = load_corpus();
    assert!(cases.len() >= 120, "only {} cases", cases.len());
    for verdict in [Verdict::Allow, Verdict::Deny, Verdict::RequireApproval] {
        assert!(
            cases.iter().any(|c| c.expect == verdict),
            "no case expects {}",
            verdict.as_str()
        );
    }
    // The parser itself, on the forms the file uses.
    let sample = "# top comment\n\
                  - id: a-case\n  # comment\n  expect: require-approval\n  \
                  reason: 'rule \"x\": it''s'\n  pg: error 42P01\n  setup: |-\n    BEGIN\n\n    SELECT 1\n  \
                  sql: |-\n    SELECT '\\'\n      indented\n\n- id: b\n  expect: allow\n  sql: |-\n    SELECT 2\n";
    let parsed = parse_corpus(sample).expect("sample parses");
    assert_eq!(parsed.len(), 2);
    assert_eq!(parsed[0].reason.as_deref(), Some("rule \"x\": it's"));
    assert_eq!(parsed[0].pg, PgOutcome::Error("42P01".into()));
    assert_eq!(parsed[0].setup, ["BEGIN", "SELECT 1"]);
    assert_eq!(parsed[0].sql, "SELECT '\\'\n  indented");
    assert_eq!(parsed[1].pg, PgOutcome::Ok);
    assert!(parse_corpus("- id: x\n  sql: |-\n    SELECT 1\n  expect: allow\n").is_err());
    assert!(
        parse_corpus("- id: x\n  expect: allow\n  sql: |-\n    SELECT 'TOP-SECRET'\n").is_err()
    );
    assert!(parse_corpus("- id: x\n  expect: maybe\n  sql: |-\n    SELECT 1\n").is_err());
    assert_eq!(
        prepared_name("PREPARE Q (int) AS SELECT 1").as_deref(),
        Some("q")
    );
    assert_eq!(
        prepared_name("prepare \"Q\" AS SELECT 1").as_deref(),
        Some("Q")
    );
    assert_eq!(
        prepared_name("PREPARE TRANSACTION 'x'").as_deref(),
        Some("transaction")
    );
    assert_eq!(prepared_name("DEALLOCATE q"), None);
}

// === pgwarden check ===

/// Runs `pgwarden check` for one case; `Err` describes the mismatch.
fn check_case(bin: &Path, case: &Case) -> Result<(), String> {
    let sql = render(&case.sql, CHECK_TMP, CHECK_PORT);
    let out = run_check(bin, &policy_path(), case);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = case.check_expect();
    let code = out.status.code();
    let json: Result<serde_json::Value, _> = serde_json::from_str(stdout.trim());
    let got_verdict = json
        .as_ref()
        .ok()
        .and_then(|j| j.get("verdict"))
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let got_reason = json
        .as_ref()
        .ok()
        .and_then(|j| j.get("reason"))
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    let mut problems = Vec::new();
    if code != Some(expected.exit_code()) {
        problems.push(format!(
            "exit code {code:?}, expected {}",
            expected.exit_code()
        ));
    }
    if got_verdict.as_deref() != Some(expected.as_str()) {
        problems.push(format!("verdict {got_verdict:?}"));
    }
    if expected == case.expect && expected != Verdict::Allow {
        if let Some(reason) = &case.reason {
            if !got_reason.contains(reason.as_str()) {
                problems.push(format!("reason lacks {reason:?}"));
            }
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{}: expected {}{}, got: {}\n  sql: {}\n  reason: {got_reason:?}\n  stdout: {}\n  stderr: {}",
        case.name(),
        expected.as_str(),
        case.reason
            .as_ref()
            .filter(|_| expected == case.expect)
            .map(|r| format!(" ({r:?})"))
            .unwrap_or_default(),
        problems.join("; "),
        excerpt(&sql, 300),
        excerpt(&stdout, 600),
        excerpt(&stderr, 600),
    ))
}

/// `pgwarden check -f POLICY --sql SQL -o json` for one case, told what a live session
/// would know (the names its setup prepares, the fixture's user code).
fn run_check(bin: &Path, policy: &Path, case: &Case) -> Output {
    let sql = render(&case.sql, CHECK_TMP, CHECK_PORT);
    let mut cmd = Command::new(bin);
    cmd.arg("check")
        .arg("-f")
        .arg(policy)
        .arg("--sql")
        .arg(&sql)
        .arg("-o")
        .arg("json")
        .env("RUST_LOG", "warn");
    for name in case.setup.iter().filter_map(|s| prepared_name(s)) {
        cmd.arg("--prepared").arg(name);
    }
    // What a live gateway reads from the database at login: the fixture's
    // functions and operators outside pg_catalog.
    for name in FIXTURE_USER_FUNCTIONS {
        cmd.arg("--user-function").arg(name);
    }
    for name in FIXTURE_USER_OPERATORS {
        cmd.arg("--user-operator").arg(name);
    }
    run_command(&mut cmd, None, CHECK_TIMEOUT)
}

/// The statement name a `PREPARE name ...` line creates, folded as PostgreSQL folds
/// identifiers (quoted: exact; unquoted: lower case).
fn prepared_name(stmt: &str) -> Option<String> {
    let rest = stmt.trim_start();
    if !rest.get(..8)?.eq_ignore_ascii_case("PREPARE ") {
        return None;
    }
    let rest = rest[8..].trim_start();
    if let Some(quoted) = rest.strip_prefix('"') {
        return quoted.split_once('"').map(|(name, _)| name.to_string());
    }
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '(')
        .unwrap_or(rest.len());
    Some(rest[..end].to_lowercase())
}

/// The user code the live fixture (`FIXTURE_SQL`) creates; keep in sync.
const FIXTURE_USER_FUNCTIONS: &[&str] = &[
    "marker_fn",
    "marker_proc",
    "upper",
    "order_audit",
    "marker_op",
    // Extension dblink lives in public: its functions are user code to a live gateway.
    "dblink_connect",
    "dblink_exec",
];
const FIXTURE_USER_OPERATORS: &[&str] = &["==="];

#[test]
fn check_verdicts() {
    let bin = pgwarden_bin();
    let cases = load_corpus();
    let started = Instant::now();
    let mut failures: Vec<(usize, String)> = in_parallel(&cases, |case| check_case(&bin, case))
        .into_iter()
        .filter_map(|(i, r)| r.err().map(|e| (i, e)))
        .collect();
    failures.sort();
    eprintln!(
        "pgwarden check: {} cases in {:?}, {} mismatches",
        cases.len(),
        started.elapsed(),
        failures.len()
    );
    let failures: Vec<String> = failures.into_iter().map(|(_, e)| e).collect();
    report("pgwarden check", cases.len(), &failures);
}

// === audit mode ===

/// The corpus policy's own names for what decided an access: its rules and its
/// `defaultAction`. Audit mode relaxes exactly these; every other name `check` gives
/// (builtin, always, session) is a refusal the gateway makes whatever the rules say.
const AUTHORED: &[&str] = &[
    "no-file-access",
    "schema-changes",
    "bulk-writes",
    "app-data",
    "export-orders",
    "explain-app",
    "default",
];

/// The corpus policy switched to `spec.enforcement: Audit`.
fn audit_policy_text() -> String {
    let text = fs::read_to_string(policy_path()).expect("read corpus policy");
    let from = "  defaultAction: Deny\n";
    assert_eq!(text.matches(from).count(), 1, "{from:?} in policy.yaml");
    assert!(
        !text.contains("enforcement:"),
        "policy.yaml sets enforcement"
    );
    text.replacen(from, &format!("{from}  enforcement: Audit\n"), 1)
}

/// What decided a refused case, as the audit-mode `check` reports the rules' decision:
/// `None` when only the policy's rules or default refused it, else the gateway's own
/// refusal family (`parser`, or the name of a non-authored deciding access).
fn gateway_family(json: &serde_json::Value) -> Option<String> {
    let accesses = json["accesses"].as_array().cloned().unwrap_or_default();
    if accesses.is_empty() {
        // Nothing analysed: refused before any rule (unparseable text).
        return Some(json["rule"].as_str().unwrap_or("(none)").to_string());
    }
    accesses
        .iter()
        .filter(|a| a["action"].as_str() != Some("allow"))
        .filter_map(|a| a["rule"].as_str())
        .find(|r| !AUTHORED.contains(r))
        .map(|r| {
            let user = accesses.iter().any(|a| a["userCode"] == true);
            if user {
                format!("{r} (user code)")
            } else {
                r.to_string()
            }
        })
}

/// Every refused corpus case under an audit-mode copy of the policy: refusals that are
/// not the rules' (built-in deny list, session names such as EXECUTE of a name never
/// prepared, unparseable text, user code the rules cannot see into) still refuse, as
/// deny with no would-be verdict; a case only the rules or `defaultAction` refused is
/// forwarded with the rules' verdict as `wouldBe`.
#[test]
fn audit_mode_still_refuses_the_gateways_own_refusals() {
    let bin = pgwarden_bin();
    let text = fs::read_to_string(policy_path()).expect("read corpus policy");
    for name in AUTHORED.iter().filter(|n| **n != "default") {
        assert!(
            text.contains(&format!("name: {name}")),
            "policy.yaml has no rule {name}"
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let audit_policy = dir.path().join("policy-audit.yaml");
    fs::write(&audit_policy, audit_policy_text()).expect("write audit policy");
    let cases: Vec<Case> = load_corpus()
        .into_iter()
        .filter(|c| c.check_expect() != Verdict::Allow)
        .collect();
    let started = Instant::now();
    // (case index, (family or "rules: would <verdict>", failure))
    let results: Vec<(usize, (String, Option<String>))> = in_parallel(&cases, |case| {
        let out = run_check(&bin, &audit_policy, case);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let Ok(json) = serde_json::from_str::<serde_json::Value>(stdout.trim()) else {
            return (
                "(no json)".into(),
                Some(format!(
                    "{}: no JSON answer: {}",
                    case.name(),
                    excerpt(&String::from_utf8_lossy(&out.stderr), 400)
                )),
            );
        };
        let code = out.status.code();
        let verdict = json["verdict"].as_str().unwrap_or("");
        let reason = json["reason"].as_str().unwrap_or("");
        let mut problems = Vec::new();
        let family = match gateway_family(&json) {
            Some(family) => {
                if code != Some(Verdict::Deny.exit_code()) || verdict != "deny" {
                    problems.push(format!(
                        "a {family} refusal must still deny, got {verdict:?} (exit {code:?})"
                    ));
                }
                if json.get("wouldBe").is_some() {
                    problems.push("a refusal the gateway enforces has a wouldBe".into());
                }
                if reason.contains("by rule \"") || reason.contains("by default action") {
                    problems.push(format!("refused in the rules' name: {reason:?}"));
                }
                family
            }
            None => {
                let want = case.check_expect().as_str();
                if code != Some(0) || verdict != "allow" {
                    problems.push(format!(
                        "only the rules refused it: audit mode must forward it, got {verdict:?} (exit {code:?})"
                    ));
                }
                if json["wouldBe"].as_str() != Some(want) || json["enforcement"] != "Audit" {
                    problems.push(format!(
                        "wouldBe {:?} enforcement {:?}, expected {want:?} Audit",
                        json["wouldBe"], json["enforcement"]
                    ));
                }
                let rule = json["rule"].as_str().unwrap_or("");
                if !AUTHORED.contains(&rule) {
                    problems.push(format!("the would-be verdict names {rule:?}, not a rule"));
                }
                format!("rules: would {want}")
            }
        };
        let failure = (!problems.is_empty()).then(|| {
            format!(
                "{}: {}\n  sql: {}\n  reason: {reason:?}",
                case.name(),
                problems.join("; "),
                excerpt(&case.sql, 300)
            )
        });
        (family, failure)
    });
    let mut tally: std::collections::BTreeMap<&str, usize> = Default::default();
    for (_, (family, _)) in &results {
        *tally.entry(family.as_str()).or_default() += 1;
    }
    eprintln!(
        "audit mode: {} refused cases in {:?}: {tally:?}",
        cases.len(),
        started.elapsed()
    );
    // The corpus has every family the gateway refuses on its own, and cases only the
    // rules refused both ways; a corpus edit that lost one would make this test vacuous.
    for family in [
        "builtin",
        "session",
        "parser",
        "rules: would deny",
        "rules: would require-approval",
    ] {
        assert!(
            tally.keys().any(|k| k.starts_with(family)),
            "no refused case of family {family:?}: {tally:?}"
        );
    }
    let failures: Vec<String> = results.into_iter().filter_map(|(_, (_, f))| f).collect();
    report("audit mode", cases.len(), &failures);
}

/// `f` over every case on CHECK_WORKERS threads, with each case's index, in order.
fn in_parallel<T: Send>(cases: &[Case], f: impl Fn(&Case) -> T + Sync) -> Vec<(usize, T)> {
    let chunk = cases.len().div_ceil(CHECK_WORKERS).max(1);
    thread::scope(|s| {
        let workers: Vec<_> = cases
            .chunks(chunk)
            .enumerate()
            .map(|(n, part)| {
                let f = &f;
                s.spawn(move || {
                    part.iter()
                        .enumerate()
                        .map(|(i, case)| (n * chunk + i, f(case)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("check worker panicked"))
            .collect()
    })
}

// === running cases against a cluster ===

/// Fixture tables (database shop).
const FIXTURE_TABLES: &str = r#"
CREATE TABLE orders (id int PRIMARY KEY, customer_id int NOT NULL, total numeric(10,2) NOT NULL, status text NOT NULL DEFAULT 'new');
CREATE TABLE order_items (id int PRIMARY KEY, order_id int NOT NULL, sku text NOT NULL, qty int NOT NULL);
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text NOT NULL, card_number text NOT NULL);
CREATE TABLE secrets (id int PRIMARY KEY, value text NOT NULL);
CREATE TABLE "Orders" (id int PRIMARY KEY, value text NOT NULL);
CREATE SCHEMA archive;
CREATE TABLE archive.orders (id int PRIMARY KEY, customer_id int NOT NULL, total numeric(10,2) NOT NULL, status text NOT NULL);
CREATE TABLE audit_marker (id serial PRIMARY KEY, note text NOT NULL);
CREATE TABLE region1 (id int PRIMARY KEY, value text NOT NULL);
CREATE TABLE region2 (id int PRIMARY KEY, value text NOT NULL);
CREATE TABLE reg$1 (id int PRIMARY KEY, value text NOT NULL);
CREATE TABLE reg$2 (id int PRIMARY KEY, value text NOT NULL);
"#;

/// Fixture rows; the protected ones hold the TOP-SECRET marker.
const FIXTURE_DATA: &str = r#"
INSERT INTO orders SELECT g, 1 + g % 3, g * 10, 'new' FROM generate_series(1, 10) g;
INSERT INTO order_items SELECT g, 1 + g % 10, 'SKU-' || g, g FROM generate_series(1, 20) g;
INSERT INTO customers VALUES
  (1, 'Ann', 'ann@example.com', '4929123456781234'),
  (2, 'Bob', 'bob@example.com', '5500000000000004'),
  (3, 'Cy', 'cy@example.com', '340000000000009');
INSERT INTO secrets SELECT g, 'TOP-SECRET-7f3a-' || g FROM generate_series(1, 5) g;
INSERT INTO "Orders" VALUES (1, 'TOP-SECRET-quoted-Orders');
INSERT INTO archive.orders VALUES (1, 1, 1, 'TOP-SECRET-archived');
INSERT INTO region1 VALUES (1, 'north');
INSERT INTO region2 VALUES (1, 'TOP-SECRET-region2');
INSERT INTO reg$1 VALUES (1, 'south');
INSERT INTO reg$2 VALUES (1, 'TOP-SECRET-reg-dollar-2');
"#;

/// Fixture code: every function writes to audit_marker, so a change there proves that
/// user code ran. ANALYZE fills pg_statistic with sample values of secrets.value.
const FIXTURE_CODE: &str = r#"
CREATE FUNCTION marker_fn() RETURNS int LANGUAGE sql VOLATILE
  AS $$ INSERT INTO public.audit_marker(note) VALUES ('marker_fn') RETURNING id $$;
CREATE PROCEDURE marker_proc() LANGUAGE sql
  AS $$ INSERT INTO public.audit_marker(note) VALUES ('marker_proc') $$;
CREATE FUNCTION upper(integer) RETURNS text LANGUAGE sql VOLATILE
  AS $$ INSERT INTO public.audit_marker(note) VALUES ('upper(integer)') RETURNING note $$;
CREATE FUNCTION order_audit(o orders) RETURNS int LANGUAGE sql VOLATILE
  AS $$ INSERT INTO public.audit_marker(note) VALUES ('order_audit ' || o.id) RETURNING id $$;
CREATE FUNCTION marker_op(int, int) RETURNS boolean LANGUAGE sql VOLATILE
  AS $$ INSERT INTO public.audit_marker(note) VALUES ('marker_op') RETURNING true $$;
CREATE OPERATOR === (LEFTARG = int, RIGHTARG = int, FUNCTION = marker_op);
CREATE EXTENSION dblink;
ANALYZE;
"#;

/// Puts the database back into the fixture state: drops every non-system schema, role,
/// extension and large object, resets role and system settings, recreates the fixture.
/// One simple Query per element (ALTER SYSTEM may not share an implicit transaction).
fn reset_sql() -> Vec<String> {
    vec![
        format!(
            r#"
DROP EXTENSION IF EXISTS dblink CASCADE;
DROP EXTENSION IF EXISTS adminpack CASCADE;
DO $$DECLARE r record; BEGIN
  FOR r IN SELECT nspname FROM pg_namespace
           WHERE nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
             AND nspname !~ '^pg_(toast_)?temp_' LOOP
    EXECUTE format('DROP SCHEMA %I CASCADE', r.nspname);
  END LOOP;
  FOR r IN SELECT rolname FROM pg_roles WHERE rolname NOT IN ('postgres', 'app') AND rolname !~ '^pg_' LOOP
    EXECUTE format('DROP OWNED BY %I CASCADE', r.rolname);
    EXECUTE format('DROP ROLE %I', r.rolname);
  END LOOP;
  FOR r IN SELECT b.rolname AS granted FROM pg_auth_members m JOIN pg_roles b ON b.oid = m.roleid
           WHERE m.member = 'app'::regrole LOOP
    EXECUTE format('REVOKE %I FROM app', r.granted);
  END LOOP;
  PERFORM lo_unlink(oid) FROM pg_largeobject_metadata;
END$$;
ALTER ROLE app RESET ALL;
ALTER ROLE app SUPERUSER LOGIN PASSWORD '{password}';
ALTER ROLE postgres PASSWORD NULL;
"#,
            password = pgwarden_e2e::APP_PASSWORD,
        ),
        "ALTER SYSTEM RESET ALL".to_string(),
        format!(
            "SELECT pg_reload_conf();\n\
             CREATE SCHEMA public AUTHORIZATION pg_database_owner;\n\
             GRANT USAGE ON SCHEMA public TO PUBLIC;\n\
             {FIXTURE_TABLES}\n{FIXTURE_DATA}\n{FIXTURE_CODE}"
        ),
    ]
}

/// Restores the fixture rows only (when nothing but table contents changed).
fn data_reset_sql() -> String {
    format!(
        "TRUNCATE orders, order_items, customers, secrets, \"Orders\", archive.orders, audit_marker, region1, region2, reg$1, reg$2 RESTART IDENTITY;\n{FIXTURE_DATA}"
    )
}

/// Whether `before` and `after` differ only in the contents of existing relations
/// (the last field of their `rel` lines), so that restoring the rows is enough.
fn only_rows_changed(before: &str, after: &str) -> bool {
    let shape = |snap: &str| -> Vec<String> {
        snap.lines()
            .map(|l| match l.strip_prefix("rel ") {
                Some(rel) => rel.rsplit_once(' ').map_or(l, |(head, _)| head).to_string(),
                None => l.to_string(),
            })
            .collect()
    };
    shape(before) == shape(after)
}

/// Everything a refused statement must not change, as one text (run as a superuser).
const SNAPSHOT_SQL: &str = r#"
SELECT line FROM (
  SELECT format('rel %s.%s %s %s %s', n.nspname, c.relname, c.relkind, coalesce(c.relacl::text, '-'),
         CASE WHEN c.relkind IN ('r', 'p') OR (c.relkind = 'm' AND c.relispopulated)
              THEN md5(query_to_xml(format('SELECT t::text AS r FROM %I.%I t ORDER BY 1', n.nspname, c.relname),
                                    false, false, '')::text)
              WHEN c.relkind = 'v' THEN md5(pg_get_viewdef(c.oid))
              ELSE '-' END) AS line
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp)'
  UNION ALL
  SELECT format('col %s.%s %s', a.attrelid::regclass, a.attname, a.atttypid::regtype)
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE a.attnum > 0 AND NOT a.attisdropped
     AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp)'
  UNION ALL
  SELECT format('fn %s %s', p.oid::regprocedure, md5(coalesce(p.prosrc, '')))
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  UNION ALL
  SELECT format('op %s', o.oid::regoperator)
    FROM pg_operator o JOIN pg_namespace n ON n.oid = o.oprnamespace
   WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  UNION ALL
  SELECT format('schema %s %s', nspname, coalesce(nspacl::text, '-'))
    FROM pg_namespace WHERE nspname !~ '^pg_(toast_)?temp_'
  UNION ALL
  SELECT format('role %s %s %s %s', rolname, rolsuper, rolcanlogin, coalesce(md5(rolpassword), '-'))
    FROM pg_authid
  UNION ALL
  SELECT format('member %s %s', roleid::regrole, member::regrole) FROM pg_auth_members
  UNION ALL
  SELECT format('role-setting %s %s %s', setdatabase, setrole, array_to_string(setconfig, ','))
    FROM pg_db_role_setting
  UNION ALL
  SELECT format('extension %s', extname) FROM pg_extension
  UNION ALL
  SELECT format('large-object %s', oid) FROM pg_largeobject_metadata
  UNION ALL
  SELECT format('comment %s %s', objoid, md5(description)) FROM pg_description WHERE objoid >= 16384
  UNION ALL
  SELECT format('prepared-xact %s', gid) FROM pg_prepared_xacts
  UNION ALL
  SELECT format('auto.conf %s', md5(pg_read_file('postgresql.auto.conf')))
) s ORDER BY line;
"#;

/// A superuser connection straight to the cluster for snapshots and resets, kept open
/// for the whole run (a psql process per snapshot would double the run time).
struct Admin {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

// === impl Admin ===

impl Admin {
    fn connect(pg: &PgCluster) -> Admin {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let (client, connection) = rt
            .block_on(tokio_postgres::connect(
                &pg.conninfo(),
                tokio_postgres::NoTls,
            ))
            .expect("admin connection to the cluster");
        rt.spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("admin connection ended: {e}");
            }
        });
        Admin { rt, client }
    }

    /// Runs `sql` (one simple Query) and returns the first column of every row, one
    /// per line; panics on error.
    fn query(&self, sql: &str) -> String {
        let msgs = self
            .rt
            .block_on(self.client.simple_query(sql))
            .unwrap_or_else(|e| panic!("admin query failed: {e:?}\n{sql}"));
        msgs.iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => {
                    Some(row.get(0).unwrap_or("NULL").to_string())
                }
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A cluster with the fixture, a scratch dir the server may write to, and the libpq
/// environment of the connection under test (direct or through a gateway).
struct Bench {
    admin: Admin,
    env: Vec<(String, String)>,
    tmp: tempfile::TempDir,
}

/// What one case's psql session printed.
struct CaseRun {
    stdout: String,
    stderr: String,
    /// SQLSTATE of each setup statement.
    setup: Vec<String>,
    /// SQLSTATE of the case (psql's :SQLSTATE, or the first ERROR/FATAL line).
    sqlstate: String,
    /// The statement after the case answered in the same session.
    alive: bool,
}

// === impl Bench ===

impl Bench {
    fn new(pg: &PgCluster, env: Vec<(String, String)>) -> Bench {
        let tmp = tempfile::Builder::new()
            .prefix("pgwarden-corpus-")
            .tempdir()
            .expect("create scratch dir");
        // The server (as the postgres OS user) writes here when an attack succeeds.
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o777))
            .expect("chmod scratch dir");
        let bench = Bench {
            admin: Admin::connect(pg),
            env,
            tmp,
        };
        bench.reset();
        bench
    }

    fn tmp(&self) -> String {
        self.tmp.path().display().to_string()
    }

    /// Back to the fixture state after a case changed `before` into `after`.
    fn restore(&self, before: &str, after: &str) {
        if only_rows_changed(before, after) {
            self.admin.query(&data_reset_sql());
        } else {
            self.reset();
        }
    }

    fn reset(&self) {
        for chunk in reset_sql() {
            self.admin.query(&chunk);
        }
        for entry in fs::read_dir(self.tmp.path()).expect("read scratch dir") {
            let path = entry.expect("scratch dir entry").path();
            fs::remove_file(&path)
                .or_else(|_| fs::remove_dir_all(&path))
                .unwrap_or_else(|e| panic!("remove {}: {e}", path.display()));
        }
    }

    /// The database state plus the scratch dir listing.
    fn snapshot(&self) -> String {
        let mut snap = self.admin.query(SNAPSHOT_SQL);
        let mut files: Vec<String> = fs::read_dir(self.tmp.path())
            .expect("read scratch dir")
            .map(|e| {
                e.expect("scratch dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        files.sort();
        for f in files {
            let _ = write!(snap, "\nfile {f}");
        }
        snap
    }

    /// Runs the case's setup, the case and a liveness probe in one psql session.
    fn run(&self, case: &Case, port: u16) -> CaseRun {
        let sql = render(&case.sql, &self.tmp(), port);
        let mut args: Vec<String> = ["-X", "-v", "ON_ERROR_STOP=0", "-v", "VERBOSITY=verbose"]
            .map(String::from)
            .to_vec();
        for stmt in &case.setup {
            args.extend(["-c".into(), render(stmt, &self.tmp(), port)]);
            args.extend(["-c".into(), r"\echo @@setup :SQLSTATE".into()]);
        }
        args.extend(["-c".into(), sql]);
        args.extend(["-c".into(), r"\echo @@case :SQLSTATE".into()]);
        args.extend(["-c".into(), "ROLLBACK".into()]);
        args.extend(["-c".into(), format!("SELECT '{ALIVE}' AS probe")]);
        let mut cmd = libpq_command("psql", &self.env);
        cmd.args(&args);
        let out: Output = run_command(&mut cmd, None, CASE_TIMEOUT);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let setup = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("@@setup "))
            .map(|s| s.trim().to_string())
            .collect();
        let sqlstate = stdout
            .lines()
            .find_map(|l| l.strip_prefix("@@case "))
            .map(|s| s.trim().to_string())
            .or_else(|| first_error_sqlstate(&stderr))
            .unwrap_or_else(|| "(none)".into());
        let alive = stdout.lines().any(|l| l.trim() == ALIVE);
        CaseRun {
            stdout,
            stderr,
            setup,
            sqlstate,
            alive,
        }
    }
}

/// The SQLSTATE of the first `ERROR:  XXXXX: ...` / `FATAL:  XXXXX: ...` line psql
/// printed with VERBOSITY=verbose.
fn first_error_sqlstate(stderr: &str) -> Option<String> {
    stderr.lines().find_map(|l| {
        let rest = l
            .split_once("ERROR:  ")
            .or_else(|| l.split_once("FATAL:  "))?
            .1;
        let (code, _) = rest.split_once(": ")?;
        (code.len() == 5 && code.chars().all(|c| c.is_ascii_alphanumeric()))
            .then(|| code.to_string())
    })
}

/// Lines of `before` and `after` that differ, for failure messages.
fn diff(before: &str, after: &str) -> String {
    let b: BTreeSet<&str> = before.lines().collect();
    let a: BTreeSet<&str> = after.lines().collect();
    let mut out = String::new();
    for gone in b.difference(&a) {
        let _ = write!(out, "\n    - {}", excerpt(gone, 160));
    }
    for new in a.difference(&b) {
        let _ = write!(out, "\n    + {}", excerpt(new, 160));
    }
    out
}

fn describe_run(case: &Case, sql: &str, run: &CaseRun) -> String {
    format!(
        "\n  sql: {}\n  sqlstate: {}\n  stdout: {}\n  stderr: {}",
        excerpt(sql, 300),
        run.sqlstate,
        excerpt(&run.stdout, 500),
        excerpt(&run.stderr, 500)
    ) + &if case.setup.is_empty() {
        String::new()
    } else {
        format!("\n  setup sqlstates: {:?}", run.setup)
    }
}

// === direct control ===

#[test]
fn direct_control() {
    let pg = PgCluster::start();
    let bench = Bench::new(&pg, pg.direct_env());
    let cases = load_corpus();
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut before = bench.snapshot();
    for case in &cases {
        let sql = render(&case.sql, &bench.tmp(), pg.port());
        let run = bench.run(case, pg.port());
        let after = bench.snapshot();
        let changed = before != after;
        let leaked = protected_in(&run.stdout).or_else(|| protected_in(&run.stderr));
        let mut problems = Vec::new();
        if run.setup.len() != case.setup.len() || run.setup.iter().any(|s| s != "00000") {
            problems.push("setup did not succeed".to_string());
        }
        match &case.pg {
            PgOutcome::Ok => {
                if run.sqlstate != "00000" {
                    problems.push(format!("expected success, got SQLSTATE {}", run.sqlstate));
                }
                if changed {
                    problems.push(format!("expected no change, but:{}", diff(&before, &after)));
                }
                if let Some(m) = leaked {
                    problems.push(format!("expected no leak, output contains {m:?}"));
                }
            }
            PgOutcome::Change => {
                if run.sqlstate != "00000" {
                    problems.push(format!("expected success, got SQLSTATE {}", run.sqlstate));
                }
                if !changed {
                    problems.push("expected a change, the snapshot is identical".into());
                }
            }
            PgOutcome::Leak => {
                if leaked.is_none() {
                    problems.push("expected a protected value in the output, none".into());
                }
            }
            PgOutcome::Error(code) => {
                if &run.sqlstate != code {
                    problems.push(format!("expected SQLSTATE {code}, got {}", run.sqlstate));
                }
            }
        }
        // A FATAL ends the session; everything else must leave it usable.
        if !run.alive && !run.sqlstate.starts_with("57P0") {
            problems.push("the session did not answer the next statement".into());
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{}: pg: {:?}: {}{}",
                case.name(),
                case.pg,
                problems.join("; "),
                describe_run(case, &sql, &run)
            ));
        }
        if changed {
            bench.restore(&before, &after);
            before = bench.snapshot();
        } else {
            before = after;
        }
    }
    eprintln!(
        "direct control: {} cases in {:?}, {} mismatches",
        cases.len(),
        started.elapsed(),
        failures.len()
    );
    report("direct control run", cases.len(), &failures);
}

// === through the gateway ===

/// The corpus policy pointed at `port`.
fn corpus_policy_for(port: u16) -> String {
    let text = fs::read_to_string(policy_path()).expect("read corpus policy");
    let from = "    port: 5432\n";
    assert_eq!(text.matches(from).count(), 1, "{from:?} in policy.yaml");
    text.replacen(from, &format!("    port: {port}\n"), 1)
}

#[test]
fn through_gateway() {
    let pg = PgCluster::start();
    let gw = Gateway::builder(&pg)
        .policy_yaml(corpus_policy_for(pg.port()))
        .start();
    let bench = Bench::new(&pg, gw.env());
    let cases = load_corpus();
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut before = bench.snapshot();
    for case in &cases {
        let sql = render(&case.sql, &bench.tmp(), pg.port());
        let run = bench.run(case, pg.port());
        let after = bench.snapshot();
        let changed = before != after;
        let mut problems = Vec::new();
        if let Some(m) = protected_in(&run.stdout).or_else(|| protected_in(&run.stderr)) {
            problems.push(format!("PROTECTED DATA came back: output contains {m:?}"));
        }
        if run.setup.len() != case.setup.len() || run.setup.iter().any(|s| s != "00000") {
            problems.push("setup did not succeed".to_string());
        }
        if case.expect == Verdict::Allow {
            if run.stderr.contains("pgwarden:") {
                problems.push("refused by pgwarden".into());
            }
            if run.sqlstate != case.pg.sqlstate() {
                problems.push(format!(
                    "expected SQLSTATE {} (as directly), got {}",
                    case.pg.sqlstate(),
                    run.sqlstate
                ));
            }
            match case.pg {
                PgOutcome::Ok if changed => {
                    problems.push(format!("expected no change, but:{}", diff(&before, &after)))
                }
                PgOutcome::Change if !changed => {
                    problems.push("expected the statement to run and change the data".into())
                }
                _ => {}
            }
        } else {
            // Unparseable text is refused as a syntax error (42601, what the server
            // itself would say, so drivers recognise it); everything else is 42501.
            let parse_refusal = case
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("cannot parse"));
            let want = if parse_refusal { "42601" } else { "42501" };
            if run.sqlstate != want {
                problems.push(format!("expected SQLSTATE {want}, got {}", run.sqlstate));
            }
            let prefix = case.expect.message_prefix();
            if !run.stderr.contains(prefix) {
                problems.push(format!("no {prefix:?} message"));
            }
            if let Some(reason) = &case.reason {
                if !run.stderr.contains(reason.as_str()) {
                    problems.push(format!("message lacks {reason:?}"));
                }
            }
            if changed {
                problems.push(format!(
                    "DATABASE CHANGED although refused:{}",
                    diff(&before, &after)
                ));
            }
        }
        if !run.alive {
            problems.push("the session did not answer the next statement".into());
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{}: expected {}: {}{}",
                case.name(),
                case.expect.as_str(),
                problems.join("; "),
                describe_run(case, &sql, &run)
            ));
        }
        if changed {
            bench.restore(&before, &after);
            before = bench.snapshot();
        } else {
            before = after;
        }
        if !gw.is_running() {
            failures.push(format!("{}: the gateway is no longer running", case.name()));
            break;
        }
    }
    eprintln!(
        "through the gateway: {} cases in {:?}, {} mismatches",
        cases.len(),
        started.elapsed(),
        failures.len()
    );
    if let Some(m) = protected_in(&gw.logs()) {
        failures.push(format!(
            "the gateway log contains a protected value ({m:?})"
        ));
    }
    report("through the gateway", cases.len(), &failures);
    gw.assert_running();
}
