//! `pgwarden run --log-format json` (issue 20): every line the gateway
//! writes in a short life — start, a session with an allowed and a refused
//! statement, shutdown — is one JSON object with timestamp, level, target and
//! message, the event's fields beside them. Real PostgreSQL, the real binary.

use std::time::Duration;

use pgwarden_e2e::{policy_with_rules, run_psql, wait_until, Endpoint, Gateway, PgCluster};
use serde_json::Value;

const RULES: &str = "  defaultAction: Deny
  rules:
    - {name: reads, action: Allow, statements: [SELECT], tables: [\"public.*\"]}
";

/// Runs a short session through a gateway started with `args`, stops it
/// with SIGTERM and returns everything it wrote.
fn short_run(args: &[&str]) -> String {
    let pg = PgCluster::start();
    pg.admin_sql("CREATE TABLE items (id int PRIMARY KEY); INSERT INTO items VALUES (1);");
    let mut builder = Gateway::builder(&pg).policy_yaml(policy_with_rules(pg.port(), None, RULES));
    for a in args {
        builder = builder.arg(*a);
    }
    let gw = builder.start();
    let out = run_psql(&gw.env(), &["-c", "SELECT id FROM items"], None);
    assert!(out.status.success());
    let out = run_psql(
        &gw.env(),
        &["-c", "DELETE FROM items WHERE id = 424242"],
        None,
    );
    assert!(!out.status.success(), "the DELETE was not refused");
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &gw.pid().to_string()])
        .status();
    assert!(
        wait_until(Duration::from_secs(20), || !gw.is_running()),
        "the gateway did not stop"
    );
    gw.logs()
}

#[test]
fn json_logs_are_one_object_a_line() {
    let logs = short_run(&["--log-format", "json"]);
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "too few log lines:\n{logs}");
    let mut objects = Vec::new();
    for line in &lines {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}\n--- all ---\n{logs}"));
        for key in ["timestamp", "level", "target", "message"] {
            assert!(v[key].is_string(), "no {key} in {line}");
        }
        objects.push(v);
    }
    // The refusal: its fields beside the message, never the SQL text.
    let refused = objects
        .iter()
        .find(|v| v["message"] == "statement refused")
        .unwrap_or_else(|| panic!("no refusal logged:\n{logs}"));
    assert_eq!(refused["sqlstate"], "42501", "{refused}");
    // Logged as its session's (the relay enters the span only to log): the
    // same session id as a session's start.
    let id = &refused["span"]["session.id"];
    assert!(id.is_string(), "no session id on the refusal: {refused}");
    assert!(
        objects
            .iter()
            .any(|v| v["message"] == "session started" && &v["span"]["session.id"] == id),
        "no session start with the refusal's session id:\n{logs}"
    );
    assert!(refused["span"]["subject"].is_string(), "{refused}");
    assert!(!logs.contains("424242"), "the SQL reached the log:\n{logs}");
    assert!(
        objects.iter().any(|v| v["level"] == "INFO"),
        "no INFO line:\n{logs}"
    );
}

#[test]
fn text_logs_stay_the_default() {
    let logs = short_run(&[]);
    let first = logs.lines().next().expect("a log line");
    assert!(
        serde_json::from_str::<Value>(first).is_err(),
        "text is the default: {first}"
    );
    assert!(logs.contains("statement refused"), "{logs}");
}
