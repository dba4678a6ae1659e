//! `pgwarden check` as a policy author and a migration's reviewer use it
//! (issue 20, items 7 and 8): the policy lint without `--sql`, the warnings
//! beside a verdict, `--sql-file` and `--sql -` for a file of statements, and
//! one explanation per verdict that agrees with the access list. No database:
//! `check` never needs one.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use pgwarden_e2e::{pgwarden_bin, run_command};
use serde_json::Value;
use tempfile::TempDir;

const TIMEOUT: Duration = Duration::from_secs(60);

fn policy(rules: &str) -> String {
    format!(
        "apiVersion: pgwarden.io/v1alpha1
kind: DatabaseAccessPolicy
metadata: {{name: shop, namespace: default}}
spec:
  identity: {{localTrust: {{subject: dev}}}}
  database: {{host: 127.0.0.1, port: 5432, name: shop, credentialsSecret: shop-cred}}
  defaultAction: Deny
  rules:
{rules}"
    )
}

/// Reads of public, approval for DDL and unfiltered deletes, writes to orders.
const GOOD_RULES: &str = r#"    - {name: read, action: Allow, statements: [SELECT], tables: ["public.*"]}
    - {name: ddl, action: RequireApproval, statements: [DDL]}
    - {name: bulk-deletes, action: RequireApproval, statements: [DELETE], unfiltered: true}
    - {name: write-orders, action: Allow, statements: [INSERT, UPDATE, DELETE], tables: ["public.orders"]}
"#;

/// The mistakes the issue found, and a rule shadowed by an earlier one.
const MISTAKEN_RULES: &str = r#"    - {name: read, action: Allow, statements: [SELECT], tables: ["public.*"]}
    - {name: order-writes, action: Allow, statements: [INSERT, UPDATE], tables: ["orders"]}
    - {name: order-deletes, action: Allow, statements: [DELETE], tables: ["Orders"]}
    - {name: no-secrets, action: Deny, statements: [SELECT], tables: ["public.secrets"]}
"#;

struct Dir(TempDir);

impl Dir {
    fn new() -> Dir {
        Dir(tempfile::Builder::new()
            .prefix("pgwarden-e2e-check-")
            .tempdir()
            .expect("temp dir"))
    }

    fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.path().join(name);
        fs::write(&path, contents).expect("write");
        path
    }
}

fn check(policy: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(pgwarden_bin());
    cmd.arg("check").arg("-f").arg(policy).args(args);
    run_command(&mut cmd, stdin.map(str::as_bytes), TIMEOUT)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", stdout(out), stderr(out)))
}

// === item 7: the lint ===

#[test]
fn check_without_sql_lints_the_policy() {
    let dir = Dir::new();
    let mistaken = dir.file("mistaken.yaml", &policy(MISTAKEN_RULES));
    let out = check(&mistaken, &[], None);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "warnings exit 1:\n{text}");
    for line in [
        r#"default/shop: spec.rules[1].tables[0]: "orders" has no schema: it never matches; write "public.orders" or "*.orders""#,
        r#"default/shop: spec.rules[2].tables[0]: "Orders" has no schema: it never matches"#,
        r#"default/shop: spec.rules[2].tables[0]: "Orders" has upper-case letters"#,
        r#"default/shop: spec.rules[3]: never decides: spec.rules[0] ("read", Allow)"#,
        "default/shop: 4 warnings",
    ] {
        assert!(text.contains(line), "{line:?} missing:\n{text}");
    }
    // The same as JSON, one object per warning.
    let out = check(&mistaken, &["-o", "json"], None);
    assert_eq!(out.status.code(), Some(1));
    let warnings = json(&out)["warnings"].as_array().cloned().unwrap();
    assert_eq!(warnings.len(), 4, "{warnings:#?}");
    assert_eq!(warnings[0]["policy"], "default/shop");
    assert_eq!(warnings[0]["path"], "spec.rules[1].tables[0]");

    // A clean policy: exit 0 and says so.
    let good = dir.file("good.yaml", &policy(GOOD_RULES));
    let out = check(&good, &[], None);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert_eq!(stdout(&out), "default/shop: no warnings\n");
    // The shipped example too.
    let example =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples/standalone-policy.yaml");
    assert_eq!(check(&example, &[], None).status.code(), Some(0));
}

#[test]
fn a_verdict_comes_with_the_policys_warnings_on_stderr() {
    let dir = Dir::new();
    let mistaken = dir.file("mistaken.yaml", &policy(MISTAKEN_RULES));
    // The rule meant for orders never matches: the default action decides.
    let out = check(&mistaken, &["--sql", "INSERT INTO orders VALUES (1)"], None);
    assert_eq!(out.status.code(), Some(1), "deny exits 1");
    assert!(stdout(&out).starts_with("verdict: deny\nrule: default\n"));
    let err = stderr(&out);
    assert!(
        err.contains(
            r#"pgwarden: warning: default/shop: spec.rules[1].tables[0]: "orders" has no schema"#
        ),
        "{err}"
    );
}

// === --sql-file and --sql - ===

const MIGRATION: &str = "-- 0042: notes
BEGIN;
CREATE TABLE notes (id int, body text DEFAULT 'a;b');
INSERT INTO orders VALUES (1);
PREPARE recent AS SELECT * FROM orders WHERE id > $1;
EXECUTE recent(10);
DELETE FROM orders;
COMMIT;
";

#[test]
fn a_migration_file_is_judged_statement_by_statement() {
    let dir = Dir::new();
    let good = dir.file("good.yaml", &policy(GOOD_RULES));
    let migration = dir.file("0042.sql", MIGRATION);
    let path = migration.to_str().unwrap();

    let out = check(&good, &["--sql-file", path, "-o", "json"], None);
    // The most severe statement (approval for DDL and the bulk delete) decides.
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    let report = json(&out);
    assert_eq!(report["verdict"], "require-approval");
    let got: Vec<(i64, String, String)> = report["statements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["line"].as_i64().unwrap(),
                s["sql"].as_str().unwrap().to_owned(),
                s["verdict"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want = [
        (2, "BEGIN", "allow"),
        (
            3,
            "CREATE TABLE notes (id int, body text DEFAULT 'a;b')",
            "require-approval",
        ),
        (4, "INSERT INTO orders VALUES (1)", "allow"),
        (
            5,
            "PREPARE recent AS SELECT * FROM orders WHERE id > $1",
            "allow",
        ),
        // Prepared by the statement before, in the same session.
        (6, "EXECUTE recent(10)", "allow"),
        (7, "DELETE FROM orders", "require-approval"),
        (8, "COMMIT", "allow"),
    ];
    let want: Vec<_> = want
        .iter()
        .map(|(l, s, v)| (*l, s.to_string(), v.to_string()))
        .collect();
    assert_eq!(got, want);

    // The text form: one block per statement and a summary.
    let out = check(&good, &["--sql-file", path], None);
    let text = stdout(&out);
    assert!(
        text.contains("-- statement 6 (line 7): DELETE FROM orders\nverdict: require-approval\nrule: bulk-deletes\n"),
        "{text}"
    );
    assert!(
        text.ends_with(&format!(
            "{path}: 7 statement(s): 5 allow, 2 require-approval, 0 deny; verdict: require-approval\n"
        )),
        "{text}"
    );

    // Standard input is the same file.
    let out = check(&good, &["--sql", "-", "-o", "json"], Some(MIGRATION));
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(json(&out)["statements"], report["statements"]);
}

#[test]
fn a_statement_that_does_not_parse_is_refused_and_the_rest_still_judged() {
    let dir = Dir::new();
    let good = dir.file("good.yaml", &policy(GOOD_RULES));
    let sql = "SELECT * FROM orders;\nSELEC 1;\nSELECT * FROM customers;\n";
    let out = check(&good, &["--sql", "-", "-o", "json"], Some(sql));
    assert_eq!(out.status.code(), Some(1), "a deny exits 1");
    let report = json(&out);
    let verdicts: Vec<_> = report["statements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["line"].as_i64().unwrap(),
                s["verdict"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        verdicts,
        [(1, "allow".into()), (2, "deny".into()), (3, "allow".into())]
    );
    assert_eq!(report["statements"][1]["rule"], "parser");
    // A missing file is a usage error naming it.
    let out = check(&good, &["--sql-file", "/nonexistent/m.sql"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("/nonexistent/m.sql"),
        "{}",
        stderr(&out)
    );
}

// === item 8: one explanation per verdict ===

#[test]
fn the_verdict_the_reason_and_the_accesses_agree() {
    let dir = Dir::new();
    let good = dir.file("good.yaml", &policy(GOOD_RULES));
    // upper is user code in this database: the default action decides it.
    let args = [
        "--user-function",
        "upper",
        "--sql",
        "SELECT upper('x') FROM orders",
    ];
    let out = check(&good, &args, None);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(
        text,
        "verdict: deny
rule: default
reason: denied by default action: function upper (user code of that name exists in the database)
accesses:
  - function upper: deny (default, as user code)
  - SELECT on public.orders: allow (read)
"
    );
    let mut with_json = args.to_vec();
    with_json.extend(["-o", "json"]);
    let report = json(&check(&good, &with_json, None));
    assert_eq!(report["verdict"], "deny");
    assert_eq!(report["rule"], "default");
    let accesses = report["accesses"].as_array().unwrap();
    assert_eq!(accesses[0]["object"], "upper");
    assert_eq!(accesses[0]["action"], "deny");
    assert_eq!(accesses[0]["userCode"], true);

    // What only the session knows is listed too: EXECUTE of a name this
    // session never prepared.
    let out = check(&good, &["--sql", "EXECUTE p"], None);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stdout(&out),
        "verdict: deny
rule: session
reason: denied: EXECUTE \"p\": it was not prepared through pgwarden in this session
accesses:
  - EXECUTE \"p\": deny (session: it was not prepared through pgwarden in this session)
"
    );
    // A text that needs approval and EXECUTEs an unknown name is refused,
    // as on the wire (never put in front of a reviewer).
    let out = check(&good, &["--sql", "CREATE TABLE t (a int); EXECUTE p"], None);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("verdict: deny\nrule: session\n"));
    // With the name prepared it goes to a reviewer.
    let out = check(
        &good,
        &[
            "--prepared",
            "p",
            "--sql",
            "CREATE TABLE t (a int); EXECUTE p",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
}

/// `pgwarden run` loads a policy with the same mistakes (they are valid) and
/// logs each warning with its field path.
#[test]
fn run_warns_at_load_and_serves() {
    use pgwarden_e2e::{policy_with_rules, GatewayBuilder};
    let rules = format!("  defaultAction: Deny\n  rules:\n{MISTAKEN_RULES}");
    let gw = GatewayBuilder::unconnected()
        .policy_yaml(policy_with_rules(1, None, &rules))
        .start();
    let logs = gw.logs();
    for needle in [
        r#"policy warning: spec.rules[1].tables[0]: "orders" has no schema: it never matches; write "public.orders" or "*.orders""#,
        r#"policy warning: spec.rules[3]: never decides"#,
    ] {
        assert!(logs.contains(needle), "{needle:?} missing:\n{logs}");
    }
    gw.assert_running();
}
