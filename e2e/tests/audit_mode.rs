//! Audit-only rollout (`spec.enforcement: Audit`) end to end: pgwarden in
//! front of a real PostgreSQL, real clients (psql, tokio-postgres). What the
//! policy's rules would deny or hold runs — its rows really change, nothing
//! waits for a reviewer — and is recorded as `would_deny` / `would_hold` with
//! the rule, counted in /metrics and shown by `sessions replay` and
//! `pgwarden check`; masking, and the built-in denials that close
//! walk-arounds (SET ROLE, COPY ... PROGRAM), still apply.

use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant};

use pgwarden_e2e::approvals::os_user;
use pgwarden_e2e::recording::{recording_yaml, session_ids, statement, SessionsCli, Spool};
use pgwarden_e2e::{
    pgwarden_bin, policy_with_rules, psql_query, run_psql, Endpoint, Gateway, PgCluster,
    POLICY_NAME,
};
use serde_json::Value;
use tokio_postgres::NoTls;

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, note text);
INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 10) g;
CREATE TABLE customers (id int PRIMARY KEY, card_number text NOT NULL);
INSERT INTO customers VALUES (1, '4111111111111111');
";

/// Deletes are denied and DDL needs a reviewer (who would wait ten
/// minutes) — but the policy only audits.
fn rules() -> String {
    format!(
        "  defaultAction: Deny
  enforcement: Audit
  rules:
    - {{name: no-deletes, action: Deny, statements: [DELETE]}}
    - {{name: ddl-review, action: RequireApproval, statements: [DDL]}}
    - {{name: app, action: Allow, statements: [SELECT, INSERT, UPDATE], tables: [\"public.*\"]}}
  masking:
    - {{columns: [\"public.customers.card_number\"], strategy: Partial, keepLast: 4}}
  approval:
    approvers: {{users: [alice, {}]}}
    wait: 10m
    expiresAfter: 1h
{}",
        os_user(),
        recording_yaml(None, false, None)
    )
}

const RAW_CARD: &str = "4111111111111111";

/// Longest a statement that must not wait for a reviewer may take.
const PROMPT: Duration = Duration::from_secs(10);

fn metric_line(gw: &Gateway, rule: &str, verdict: &str) -> Option<String> {
    let (status, text) = gw.http_get("/metrics");
    assert_eq!(status, 200);
    text.lines()
        .find(|l| {
            l.starts_with("pgwarden_statements_audited_total{")
                && l.contains(&format!("rule=\"{rule}\""))
                && l.contains(&format!("verdict=\"{verdict}\""))
        })
        .map(str::to_owned)
}

#[test]
fn audit_mode_forwards_and_records_what_the_rules_would_refuse() {
    let pg = PgCluster::start();
    pg.admin_sql(SCHEMA);
    let state = tempfile::tempdir().expect("state dir");
    let policy = policy_with_rules(pg.port(), None, &rules());
    let gw = Gateway::builder(&pg)
        .policy_yaml(policy.clone())
        .state_dir(state.path())
        .start();

    // A would-deny DELETE runs: its rows are gone.
    psql_query(&gw, "DELETE FROM items WHERE id <= 3");
    assert_eq!(pg.admin_sql("SELECT count(*) FROM items"), "7");

    // A would-hold statement runs at once, without a reviewer.
    let started = Instant::now();
    psql_query(&gw, "CREATE TABLE audited_new (i int)");
    assert!(started.elapsed() < PROMPT, "the DDL waited for a reviewer");
    assert_eq!(
        pg.admin_sql("SELECT count(*) FROM pg_tables WHERE tablename = 'audited_new'"),
        "1"
    );

    // Masking stays on.
    assert_eq!(
        psql_query(&gw, "SELECT card_number FROM customers"),
        "************1111"
    );

    // Code pgwarden cannot see into runs in audit mode (the rules would
    // deny it), but what it returns or raises is still masked.
    psql_query(
        &gw,
        "CREATE FUNCTION leak() RETURNS text LANGUAGE sql AS $$SELECT card_number FROM customers LIMIT 1$$",
    );
    let leaked = run_psql(&gw.env(), &["-A", "-t", "-c", "SELECT leak()"], None);
    let leaked_out = String::from_utf8_lossy(&leaked.stdout).into_owned()
        + &String::from_utf8_lossy(&leaked.stderr);
    assert!(
        !leaked_out.contains(RAW_CARD),
        "a user function leaked: {leaked_out}"
    );
    let raised = run_psql(
        &gw.env(),
        &[
            "-c",
            "DO $$BEGIN RAISE NOTICE 'card %', (SELECT card_number FROM customers LIMIT 1); END$$",
        ],
        None,
    );
    let raised_out = String::from_utf8_lossy(&raised.stdout).into_owned()
        + &String::from_utf8_lossy(&raised.stderr);
    assert!(
        !raised_out.contains(RAW_CARD),
        "a DO block leaked: {raised_out}"
    );

    // Built-in denials still deny: no walk-around opens in audit mode.
    for sql in ["SET ROLE postgres", "COPY items TO PROGRAM 'true'"] {
        let out = run_psql(&gw.env(), &["-v", "ON_ERROR_STOP=1", "-c", sql], None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{sql} ran in audit mode");
        assert!(err.contains("built-in rule"), "{sql}: {err}");
    }
    assert_eq!(psql_query(&gw, "SELECT current_user"), "app");

    // The extended protocol: a would-deny DELETE with a parameter runs.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let deleted = rt.block_on(async {
        let config = tokio_postgres::Config::from_str(&gw.conninfo()).unwrap();
        let (client, conn) = config.connect(NoTls).await.expect("connect");
        tokio::spawn(conn);
        client
            .execute("DELETE FROM items WHERE id = $1", &[&9i32])
            .await
            .expect("a would-deny DELETE runs in audit mode")
    });
    assert_eq!(deleted, 1);
    assert_eq!(pg.admin_sql("SELECT count(*) FROM items"), "6");

    // Recorded as would-be verdicts with their rules; the built-in denial
    // as a denial.
    let spool = Spool::new(state.path());
    let records = spool.wait_for("the extended DELETE", PROMPT, |r| {
        r.iter()
            .any(|v| v["text"].as_str() == Some("DELETE FROM items WHERE id = $1"))
    });
    let del = statement(&records, "DELETE FROM items WHERE id <= 3");
    assert_eq!(del["verdict"], "would_deny", "{del}");
    assert_eq!(del["rule"], "no-deletes", "{del}");
    assert!(
        del["reason"]
            .as_str()
            .is_some_and(|r| r.contains("rule \"no-deletes\"")),
        "{del}"
    );
    let ddl = statement(&records, "CREATE TABLE audited_new (i int)");
    assert_eq!(ddl["verdict"], "would_hold", "{ddl}");
    assert_eq!(ddl["rule"], "ddl-review", "{ddl}");
    let ext = statement(&records, "DELETE FROM items WHERE id = $1");
    assert_eq!(ext["verdict"], "would_deny", "{ext}");
    assert_eq!(ext["rule"], "no-deletes", "{ext}");
    assert_eq!(statement(&records, "SET ROLE postgres")["verdict"], "deny");
    assert_eq!(
        statement(&records, "SELECT card_number FROM customers")["verdict"],
        "allow"
    );
    // No approval request was opened for the would-hold statement.
    assert!(
        !records.iter().any(|v| v["verdict"] == "held"),
        "a statement was held in audit mode"
    );

    // Counted by rule, without SQL in the labels.
    let line = metric_line(&gw, "no-deletes", "would_deny").expect("would_deny counted");
    assert!(line.ends_with(" 2"), "{line}");
    // CREATE TABLE and CREATE FUNCTION.
    let line = metric_line(&gw, "ddl-review", "would_hold").expect("would_hold counted");
    assert!(line.ends_with(" 2"), "{line}");
    assert!(
        line.contains(&format!("policy=\"default/{POLICY_NAME}\"")),
        "{line}"
    );

    // `sessions replay` shows the would-be verdicts.
    let del_session = del["session"].as_str().unwrap().to_owned();
    assert!(session_ids(&records).contains(&del_session));
    let replay = SessionsCli::state_dir(state.path()).replay(&del_session);
    assert!(
        replay.contains("[would_deny, rule no-deletes]"),
        "replay:\n{replay}"
    );
    assert!(
        replay.contains("-- audit mode, forwarded:"),
        "replay:\n{replay}"
    );

    // `pgwarden check` says what the rules would do.
    let file = state.path().join("audit-policy.yaml");
    std::fs::write(&file, &policy).unwrap();
    let check = |sql: &str| {
        let out = Command::new(pgwarden_bin())
            .args(["check", "-f"])
            .arg(&file)
            .args(["--sql", sql])
            .output()
            .expect("run pgwarden check");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, text) = check("DELETE FROM items");
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("verdict: would deny (audit mode)"), "{text}");
    assert!(text.contains("rule: no-deletes"), "{text}");
    let (code, text) = check("SET ROLE postgres");
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("verdict: deny\n"), "{text}");
    let out = Command::new(pgwarden_bin())
        .args(["check", "-o", "json", "-f"])
        .arg(&file)
        .args(["--sql", "ALTER TABLE items ADD COLUMN n int"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).expect("check -o json");
    assert_eq!(v["verdict"], "allow", "{v}");
    assert_eq!(v["wouldBe"], "require-approval", "{v}");
    assert_eq!(v["rule"], "ddl-review", "{v}");
}
