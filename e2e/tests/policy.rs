//! Statement policy through the gateway: refused statements get ERROR 42501 naming
//! the rule, never reach the server (the cluster logs every statement it receives),
//! and the session goes on.

use std::process::Output;

use pgwarden_e2e::{policy_with_rules, psql_query, run_psql, Endpoint, Gateway, PgCluster};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

/// A cluster with tables `orders` and `customers` that logs every statement role
/// `app` (the gateway's upstream login) sends, and nothing the test's admin sends.
fn cluster() -> PgCluster {
    let pg = PgCluster::start();
    pg.admin_sql(
        "CREATE TABLE orders (id int PRIMARY KEY, qty int);\n\
         CREATE TABLE customers (id int PRIMARY KEY, email text);\n\
         INSERT INTO customers VALUES (1, 'ann@example.com');\n\
         ALTER ROLE app SET log_statement = 'all';",
    );
    pg
}

/// The default policy with `default_action` and the given `rules:` items.
fn gateway(pg: &PgCluster, default_action: &str, rules: &[&str]) -> Gateway {
    let mut decision = format!("  defaultAction: {default_action}\n");
    if !rules.is_empty() {
        decision.push_str("  rules:\n");
        for rule in rules {
            decision.push_str(&format!("    - {rule}\n"));
        }
    }
    Gateway::builder(pg)
        .policy_yaml(policy_with_rules(pg.port(), None, &decision))
        .start()
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `sql` as one Query message and expects a refusal; returns psql's stderr
/// (verbose: it carries the SQLSTATE).
fn refused(gw: &Gateway, sql: &str) -> String {
    let out = run_psql(
        &gw.env(),
        &[
            "-v",
            "VERBOSITY=verbose",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ],
        None,
    );
    let err = stderr_of(&out);
    assert!(
        !out.status.success(),
        "{sql:?} was allowed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(err.contains("ERROR:  42501: pgwarden: "), "{sql:?}: {err}");
    assert!(!err.contains("FATAL"), "{sql:?}: {err}");
    err
}

/// The statement text never reached the server.
fn assert_not_at_server(pg: &PgCluster, needle: &str) {
    let log = pg.log();
    assert!(
        !log.contains(needle),
        "the server received a refused statement ({needle:?}):\n{log}"
    );
}

#[test]
fn deny_rule_refuses_ddl_and_the_session_goes_on() {
    let pg = cluster();
    let gw = gateway(
        &pg,
        "Allow",
        &["{name: no-ddl, action: Deny, statements: [DDL]}"],
    );

    let script = "\
INSERT INTO orders VALUES (1, 1);
CREATE TABLE evil_table (x int);
SELECT count(*) FROM orders;
";
    let out = run_psql(
        &gw.env(),
        &["-A", "-t", "-v", "VERBOSITY=verbose", "-f", "-"],
        Some(script),
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "INSERT 0 1\n1\n");
    let err = stderr_of(&out);
    assert!(
        err.contains("<stdin>:2: ERROR:  42501: pgwarden: denied by rule \"no-ddl\": DDL"),
        "{err}"
    );

    // A multi-statement Query with one refused statement runs none of it.
    let err = refused(&gw, "INSERT INTO orders VALUES (2, 2); DROP TABLE orders");
    assert!(err.contains("denied by rule \"no-ddl\""), "{err}");

    assert_eq!(
        pg.admin_sql("SELECT (SELECT count(*) FROM orders), to_regclass('evil_table') IS NULL"),
        "1|t"
    );
    assert!(
        pg.log()
            .contains("statement: INSERT INTO orders VALUES (1, 1);"),
        "statement logging for app is off:\n{}",
        pg.log()
    );
    assert_not_at_server(&pg, "evil_table");
    assert_not_at_server(&pg, "DROP TABLE orders");
    assert_not_at_server(&pg, "VALUES (2, 2)");
    gw.assert_running();
}

#[test]
fn default_deny_with_a_table_allow_list() {
    let pg = cluster();
    let gw = gateway(
        &pg,
        "Deny",
        &["{name: app-data, action: Allow, statements: [SELECT, INSERT, UPDATE], tables: [\"public.orders\"]}"],
    );
    assert_eq!(
        psql_query(&gw, "INSERT INTO orders VALUES (1, 5) RETURNING qty"),
        "5"
    );
    assert_eq!(
        psql_query(
            &gw,
            "UPDATE orders SET qty = qty + 1 WHERE id = 1 RETURNING qty"
        ),
        "6"
    );
    // Table-less statements and transaction control are always allowed.
    assert_eq!(
        psql_query(&gw, "BEGIN; SELECT 1 + 1; SELECT id FROM orders; COMMIT"),
        "2\n1"
    );

    let err = refused(&gw, "SELECT email FROM customers");
    assert!(
        err.contains("pgwarden: denied by default action: SELECT on public.customers"),
        "{err}"
    );
    let err = refused(&gw, "DELETE FROM orders WHERE id = 1");
    assert!(err.contains("DELETE on public.orders"), "{err}");
    // A read of an allowed table joined to a forbidden one is refused whole.
    let err = refused(
        &gw,
        "SELECT o.id FROM orders o JOIN customers c ON c.id = o.id",
    );
    assert!(err.contains("public.customers"), "{err}");
    // Hidden in a subquery or CTE, still found.
    refused(
        &gw,
        "WITH x AS (SELECT email FROM customers) SELECT count(*) FROM x",
    );
    assert_not_at_server(&pg, "ann@example.com");
    assert_not_at_server(&pg, "FROM customers");

    // psql's \d reads the harmless catalogs and works.
    let out = run_psql(&gw.env(), &["-c", "\\d orders"], None);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Table \"public.orders\""), "{text}");
    assert!(text.contains("qty"), "{text}");
    assert_eq!(pg.admin_sql("SELECT id, qty FROM orders"), "1|6");
    gw.assert_running();
}

#[test]
fn builtin_denials_hold_even_with_allow_everything() {
    let pg = cluster();
    let gw = gateway(
        &pg,
        "Allow",
        &[
            "{name: all-functions, action: Allow, functions: [\"*\"]}",
            "{name: all-statements, action: Allow, statements: [SELECT, INSERT, UPDATE, DELETE, COPY_TO, COPY_FROM, SESSION, DDL, CODE, PRIVILEGE]}",
        ],
    );
    for sql in [
        "SELECT pg_read_file('/etc/passwd')",
        "WITH x AS (SELECT pg_read_file('/etc/hostname') AS f) SELECT length(f) FROM x",
        "SELECT rolpassword FROM pg_authid",
        "SELECT query FROM pg_stat_activity",
        "SET search_path = evil, public",
        "SELECT set_config('search_path', 'evil', false)",
        "SET ROLE postgres",
        "SET SESSION AUTHORIZATION postgres",
        "ALTER SYSTEM SET work_mem = '1GB'",
        "COPY orders TO PROGRAM 'cat > /tmp/pgwarden-e2e-exfil'",
        "COPY orders FROM '/etc/passwd'",
        "SET client_encoding = 'SJIS'",
    ] {
        let err = refused(&gw, sql);
        assert!(
            err.contains("pgwarden: denied by built-in rule"),
            "{sql:?}: {err}"
        );
    }
    assert_not_at_server(&pg, "pg_read_file");
    assert_not_at_server(&pg, "pg_authid");
    assert_not_at_server(&pg, "PROGRAM");
    assert_not_at_server(&pg, "ALTER SYSTEM");
    assert!(!std::path::Path::new("/tmp/pgwarden-e2e-exfil").exists());
    // Harmless settings and catalog reads are fine.
    assert_eq!(
        psql_query(&gw, "SET application_name = 'e2e'; SHOW application_name"),
        "e2e"
    );
    assert_eq!(
        psql_query(
            &gw,
            "SELECT count(*) > 0 FROM pg_class WHERE relname = 'orders'"
        ),
        "t"
    );
    gw.assert_running();
}

#[test]
fn require_approval_does_not_run_the_statement_before_a_decision() {
    let pg = cluster();
    // Fail fast (wait: 0s): the hold itself is tested in approvals.rs.
    let decision = "  defaultAction: Allow\n  rules:\n    - {name: schema-changes, action: RequireApproval, statements: [DDL]}\n  approval: {wait: 0s}\n";
    let gw = Gateway::builder(&pg)
        .policy_yaml(policy_with_rules(pg.port(), None, decision))
        .start();
    let err = refused(&gw, "ALTER TABLE orders ADD COLUMN note text");
    assert!(
        err.contains("approval required by rule \"schema-changes\"")
            && err.contains("waiting for a reviewer"),
        "{err}"
    );
    assert_not_at_server(&pg, "ADD COLUMN note");
    assert_eq!(psql_query(&gw, "SELECT count(*) FROM orders"), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_refusals_keep_the_session_in_sync() {
    let pg = cluster();
    let gw = gateway(
        &pg,
        "Allow",
        &["{name: no-ddl, action: Deny, statements: [DDL]}"],
    );
    let (client, connection) = tokio_postgres::connect(&gw.conninfo(), NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);

    // Refused at Parse.
    let err = client
        .prepare("CREATE TABLE evil_prepared (x int)")
        .await
        .unwrap_err();
    let db = err.as_db_error().expect("a server-style error");
    assert_eq!(db.code(), &SqlState::INSUFFICIENT_PRIVILEGE);
    assert!(db.message().contains("denied by rule \"no-ddl\""), "{db:?}");

    // Pipelined: allowed, refused, allowed, all in flight at once.
    let (a, b, c) = tokio::join!(
        client.query_one("SELECT $1::int4 + 1", &[&1i32]),
        client.execute("CREATE TABLE evil_pipelined (x int)", &[]),
        client.query_one("SELECT $1::text || '!'", &[&"after"]),
    );
    assert_eq!(a.unwrap().get::<_, i32>(0), 2);
    let err = b.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{err:?}"
    );
    assert_eq!(c.unwrap().get::<_, String>(0), "after!");

    // An allowed prepared statement keeps working after the refusals.
    let stmt = client
        .prepare("INSERT INTO orders VALUES ($1, $2)")
        .await
        .unwrap();
    for i in 0..10i32 {
        client.execute(&stmt, &[&i, &(i * 10)]).await.unwrap();
    }
    let n: i64 = client
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 10);
    tokio::task::block_in_place(|| {
        assert_eq!(
            pg.admin_sql("SELECT to_regclass('evil_prepared') IS NULL AND to_regclass('evil_pipelined') IS NULL"),
            "t"
        );
        assert_not_at_server(&pg, "evil_prepared");
        assert_not_at_server(&pg, "evil_pipelined");
    });
    gw.assert_running();
}

/// Refusals are logged (rule, object, SQLSTATE) but never with the statement's
/// values: not from a policy refusal, not from a parser message quoting them.
#[test]
fn refusals_are_logged_without_values() {
    let pg = cluster();
    let gw = gateway(&pg, "Deny", &[]);
    let canary = "CANARY-4929-1234-5678";
    for sql in [
        format!("SELECT * FROM customers WHERE email = '{canary}'"),
        format!("SELECT 1 '{canary}' FROM"),
    ] {
        let out = run_psql(&gw.env(), &["-c", &sql], None);
        assert!(!out.status.success(), "{sql} was allowed");
    }
    let logs = gw.logs();
    assert!(logs.contains("statement refused"), "{logs}");
    assert!(logs.contains("SELECT on public.customers"), "{logs}");
    assert!(logs.contains("statement cannot be parsed"), "{logs}");
    assert!(!logs.contains(canary), "a value reached the log:\n{logs}");
}
