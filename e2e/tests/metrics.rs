//! The gateway's HTTP endpoints: /metrics counts what happened without leaking what
//! was said; /healthz and /readyz answer.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pgwarden_e2e::approvals::request_id_in;
use pgwarden_e2e::recording::{recording_yaml, AuditDb};
use pgwarden_e2e::{
    policy_with_rules, psql_query, run_psql, ApprovalsCli, Endpoint, Gateway, GatewayBuilder,
    PgCluster, APP_PASSWORD, POLICY_NAME,
};

/// A marker that appears only in the SQL text the client sends.
const CANARY: &str = "zebra-canary-7731";

/// Prometheus text format → sum of sample values per metric name (labels dropped).
fn samples(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let name = series.split('{').next().unwrap().to_string();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad sample value in {line:?}"));
        *out.entry(name).or_insert(0.0) += value;
    }
    out
}

fn positive_metric<'a>(samples: &'a BTreeMap<String, f64>, word: &str) -> Option<(&'a str, f64)> {
    samples
        .iter()
        .find(|(name, value)| name.starts_with("pgwarden_") && name.contains(word) && **value > 0.0)
        .map(|(name, value)| (name.as_str(), *value))
}

#[test]
fn metrics_count_traffic_without_leaking_sql_or_secrets() {
    let pg = PgCluster::start();
    let gw = Gateway::start(&pg);

    for i in 0..3 {
        assert_eq!(
            psql_query(&gw, &format!("SELECT '{CANARY}-{i}' AS marker")),
            format!("{CANARY}-{i}")
        );
    }
    // A failing statement: its text must not show up either.
    let out = pgwarden_e2e::run_psql(
        &pgwarden_e2e::Endpoint::env(&gw),
        &["-c", &format!("SELECT * FROM \"{CANARY}_missing\"")],
        None,
    );
    assert!(!out.status.success());

    let (status, text) = gw.http_get("/metrics");
    assert_eq!(status, 200, "{text}");
    let all = samples(&text);
    for word in ["connection", "statement", "bytes"] {
        let found = positive_metric(&all, word);
        assert!(
            found.is_some(),
            "no pgwarden_*{word}* metric with a value > 0:\n{text}"
        );
    }
    let (name, connections) = positive_metric(&all, "connections_total")
        .or_else(|| positive_metric(&all, "connection"))
        .unwrap();
    assert!(
        connections >= 4.0,
        "{name} = {connections} after 4 psql sessions:\n{text}"
    );
    let (name, statements) = positive_metric(&all, "statement").unwrap();
    assert!(
        statements >= 4.0,
        "{name} = {statements} after 4 statements:\n{text}"
    );

    assert!(!text.contains(CANARY), "metrics contain SQL text:\n{text}");
    assert!(!text.contains(APP_PASSWORD), "metrics contain the password");
    assert!(
        !text.contains("SELECT"),
        "metrics contain SQL text:\n{text}"
    );
    // Nor do the logs carry the statement text or the password.
    let logs = gw.logs();
    assert!(
        !logs.contains(CANARY),
        "gateway log contains SQL text:\n{logs}"
    );
    assert!(
        !logs.contains(APP_PASSWORD),
        "gateway log contains the password"
    );
    gw.assert_running();
}

#[test]
fn health_endpoints_answer() {
    let pg = PgCluster::start();
    let gw = Gateway::start(&pg);
    assert_eq!(gw.http_get("/healthz").0, 200);
    assert_eq!(gw.http_get("/readyz").0, 200);
    assert_eq!(gw.http_get("/no-such-endpoint").0, 404);
}

#[test]
fn listening_but_not_ready_when_upstream_is_down() {
    // An unreachable database does not keep the gateway from starting, but
    // it is not ready (/readyz names the policy and why: tests/readiness.rs),
    // and a client gets a FATAL instead of a hang.
    let gw = GatewayBuilder::unconnected().start();
    let (code, body) = gw.http_get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("unreachable"), "{body}");
    let out = pgwarden_e2e::run_psql(&pgwarden_e2e::Endpoint::env(&gw), &["-c", "SELECT 1"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("FATAL"), "{err}");
    let (_, text) = gw.http_get("/metrics");
    assert!(
        samples(&text)
            .iter()
            .any(|(name, v)| name.starts_with("pgwarden_")
                && name.contains("upstream")
                && *v > 0.0),
        "no upstream failure counted:\n{text}"
    );
    gw.assert_running();
}

// === the gauges and counters of issue 20: approvals, refusals, recording ===

/// The value of exactly one series (`name{labels}` as rendered), if present.
fn series(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Polls /metrics until `series` satisfies `ok`; panics with the text after
/// `within`.
fn wait_series(gw: &Gateway, name: &str, within: Duration, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + within;
    loop {
        let (_, text) = gw.http_get("/metrics");
        if let Some(v) = series(&text, name).filter(|v| ok(*v)) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not reach the expected value within {within:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn pending_approvals_and_refusals_per_rule_are_counted() {
    let pg = PgCluster::start();
    pg.admin_sql(
        "CREATE TABLE items (id int PRIMARY KEY);
         INSERT INTO items SELECT generate_series(1, 10);",
    );
    let rules = "  defaultAction: Deny
  rules:
    - {name: held-deletes, action: RequireApproval, statements: [DELETE]}
    - {name: no-truncate, action: Deny, statements: [TRUNCATE]}
    - {name: app, action: Allow, statements: [SELECT, DELETE, TRUNCATE], tables: [\"public.*\"]}
  approval: {wait: 0s}
";
    let gw = Gateway::builder(&pg)
        .policy_yaml(policy_with_rules(pg.port(), None, rules))
        .start();
    let pending = "pgwarden_approvals_pending";
    wait_series(&gw, pending, Duration::from_secs(5), |v| v == 0.0);

    // Held (fail fast): one request pending until a reviewer decides.
    let out = run_psql(
        &Endpoint::env(&gw),
        &["-c", &format!("DELETE FROM items WHERE id = 1 -- {CANARY}")],
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let id = request_id_in(&err).unwrap_or_else(|| panic!("no request id in: {err}"));
    wait_series(&gw, pending, Duration::from_secs(5), |v| v == 1.0);
    ApprovalsCli::new(gw.state_dir()).deny(&id, "not today");
    wait_series(&gw, pending, Duration::from_secs(5), |v| v == 0.0);

    // Refused by a named rule, and by the default action.
    for sql in [
        format!("TRUNCATE items -- {CANARY}"),
        format!("UPDATE items SET id = 0 -- {CANARY}"),
        format!("UPDATE items SET id = 0 WHERE id = 2 -- {CANARY}"),
    ] {
        let out = run_psql(&Endpoint::env(&gw), &["-c", &sql], None);
        assert!(!out.status.success(), "{sql} ran");
    }
    let (_, text) = gw.http_get("/metrics");
    let policy = format!("default/{POLICY_NAME}");
    let refused = |rule: &str| {
        series(
            &text,
            &format!("pgwarden_statements_refused_total{{policy=\"{policy}\",rule=\"{rule}\"}}"),
        )
    };
    assert_eq!(refused("no-truncate"), Some(1.0), "{text}");
    assert_eq!(refused("default"), Some(2.0), "{text}");
    assert!(!text.contains(CANARY), "metrics contain SQL text:\n{text}");
    gw.assert_running();
}

#[test]
fn recording_backlog_and_shipping_lag_grow_while_the_audit_store_is_down() {
    let mut audit = AuditDb::start();
    let pg = PgCluster::start();
    let spec = format!(
        "  defaultAction: Allow\n{}",
        recording_yaml(None, false, Some("audit-dsn"))
    );
    let gw = Gateway::builder(&pg)
        .policy_yaml(policy_with_rules(pg.port(), None, &spec))
        .extra_file("audit-secret.yaml", audit.secret_yaml("audit-dsn"))
        .start();
    let backlog = "pgwarden_recording_backlog_records{stage=\"store\"}";
    let lag = "pgwarden_recording_shipping_lag_seconds";
    assert_eq!(psql_query(&gw, "SELECT 'shipped' AS marker"), "shipped");
    audit.wait_for("the first session", Duration::from_secs(30), |rows| {
        !rows.is_empty()
    });
    wait_series(&gw, backlog, Duration::from_secs(10), |v| v == 0.0);
    wait_series(&gw, lag, Duration::from_secs(10), |v| v == 0.0);

    // Outage: records wait in the spool, and the oldest grows older.
    audit.stop();
    assert_eq!(psql_query(&gw, "SELECT 'spooled' AS marker"), "spooled");
    let waiting = wait_series(&gw, backlog, Duration::from_secs(10), |v| v > 0.0);
    assert!(waiting >= 3.0, "a session is at least 3 records: {waiting}");
    wait_series(&gw, lag, Duration::from_secs(15), |v| v >= 2.0);
    // Written to disk all the same.
    let (_, text) = gw.http_get("/metrics");
    assert_eq!(
        series(&text, "pgwarden_recording_backlog_records{stage=\"disk\"}"),
        Some(0.0),
        "{text}"
    );

    // The store is back: the spool drains (backoff is capped at 30 s).
    audit.start_again();
    wait_series(&gw, backlog, Duration::from_secs(60), |v| v == 0.0);
    wait_series(&gw, lag, Duration::from_secs(5), |v| v == 0.0);
    gw.assert_running();
}
