//! The gateway's HTTP endpoints: /metrics counts what happened without leaking what
//! was said; /healthz and /readyz answer.

use std::collections::BTreeMap;

use pgwarden_e2e::{psql_query, Gateway, GatewayBuilder, PgCluster, APP_PASSWORD};

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
