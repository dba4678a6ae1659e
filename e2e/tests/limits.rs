//! `limits` through the gateway: a result longer than maxRows ends in an ERROR
//! (never a short result presented as complete) and the session goes on;
//! statementTimeout is the server's statement_timeout and cannot be changed.

use pgwarden_e2e::{policy_with_rules, psql_query, run_psql, Endpoint, Gateway, PgCluster};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

fn gateway(pg: &PgCluster, limits: &str) -> Gateway {
    let decision = format!(
        "  defaultAction: Deny\n  rules:\n    \
         - {{name: app, action: Allow, statements: [SELECT, COPY_TO], tables: [\"public.*\"]}}\n  \
         limits: {limits}\n"
    );
    Gateway::builder(pg)
        .policy_yaml(policy_with_rules(pg.port(), None, &decision))
        .start()
}

fn cluster() -> PgCluster {
    let pg = PgCluster::start();
    pg.admin_sql(
        "CREATE TABLE items AS SELECT g AS id FROM generate_series(1, 500) g;\n\
         GRANT ALL ON items TO app;",
    );
    pg
}

#[test]
fn simple_query_over_max_rows_is_an_error_and_the_session_goes_on() {
    let pg = cluster();
    let gw = gateway(&pg, "{maxRows: 100}");
    // Within the limit: the whole result.
    assert_eq!(
        psql_query(
            &gw,
            "SELECT count(*) FROM (SELECT * FROM items LIMIT 100) s"
        ),
        "100"
    );
    assert_eq!(
        psql_query(&gw, "SELECT id FROM items WHERE id <= 100")
            .lines()
            .count(),
        100
    );
    // Over it: an ERROR, then the same session answers the next statement.
    let out = run_psql(
        &gw.env(),
        &[
            "-A",
            "-t",
            "-v",
            "VERBOSITY=verbose",
            "-c",
            "SELECT id FROM items",
            "-c",
            "SELECT 'still here'",
        ],
        None,
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(stderr.contains("54000"), "{stderr}");
    assert!(stderr.contains("limits.maxRows"), "{stderr}");
    assert!(stderr.contains("not complete"), "{stderr}");
    // psql prints no rows of a failed result, and the next query works.
    assert_eq!(stdout.trim(), "still here", "stdout: {stdout}");
}

#[test]
fn extended_protocol_and_copy_are_limited_too() {
    let pg = cluster();
    let gw = gateway(&pg, "{maxRows: 100}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&gw.conninfo(), NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let rows = client
            .query("SELECT id FROM items WHERE id <= $1", &[&100i32])
            .await
            .unwrap();
        assert_eq!(rows.len(), 100);
        let err = client
            .query("SELECT id FROM items WHERE id <= $1", &[&101i32])
            .await
            .expect_err("101 rows must not pass a limit of 100");
        assert_eq!(err.code(), Some(&SqlState::PROGRAM_LIMIT_EXCEEDED), "{err}");
        // A prepared statement re-executed without a new Describe: still limited.
        let stmt = client
            .prepare("SELECT id FROM items WHERE id <= $1")
            .await
            .unwrap();
        assert_eq!(client.query(&stmt, &[&50i32]).await.unwrap().len(), 50);
        assert!(client.query(&stmt, &[&500i32]).await.is_err());
        let n: i64 = client
            .query_one("SELECT count(*) FROM items", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 500, "the session is usable after the cut-off");
    });
    // COPY TO STDOUT counts its rows too.
    let out = run_psql(&gw.env(), &["-c", "COPY items TO STDOUT"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "COPY of 500 rows passed a limit of 100"
    );
    assert!(stderr.contains("limits.maxRows"), "{stderr}");
    let copied = String::from_utf8_lossy(&out.stdout).lines().count();
    assert!(copied <= 100, "{copied} rows leaked past the limit");
}

#[test]
fn statement_timeout_is_enforced_and_pinned() {
    let pg = cluster();
    let gw = gateway(&pg, "{statementTimeout: 1s}");
    assert_eq!(psql_query(&gw, "SHOW statement_timeout"), "1s");
    let started = std::time::Instant::now();
    let out = run_psql(
        &gw.env(),
        &[
            "-v",
            "VERBOSITY=verbose",
            "-c",
            "SELECT pg_sleep(10)",
            "-c",
            "SELECT 'after'",
        ],
        None,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("57014"), "{stderr}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(8),
        "the timeout did not fire"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("after"));
    // The pinned setting cannot be lifted, by SET or set_config.
    for sql in [
        "SET statement_timeout = 0",
        "SELECT set_config('statement_timeout', '0', false)",
    ] {
        let out = run_psql(&gw.env(), &["-v", "VERBOSITY=verbose", "-c", sql], None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("42501") && stderr.contains("statement_timeout"),
            "{sql}: {stderr}"
        );
    }
}
