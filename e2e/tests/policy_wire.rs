//! Statement policy on the wire: what the corpus (policy_corpus.rs) cannot say with one
//! Query string. A hand-written frontend speaks the extended protocol, pipelines,
//! transactions and the FunctionCall message to `pgwarden run` in front of a superuser
//! connection, under the corpus policy (e2e/corpus/policy.yaml, default deny); psql's
//! `\dt` and `\d` must keep working under it.
//!
//! `wire_client_control_direct` runs the same message sequences against PostgreSQL
//! itself and shows that they do execute the refused statements there: the encoding is
//! right, and only the proxy stands between them and the data.

use std::fs;
use std::path::Path;

use pgwarden_e2e::wire::{
    assert_refused, bind, bind_int, close_statement, concat, describe, describe_portal, errors,
    execute, function_call, kinds, parse, query, rows, status, sync, Message, Wire,
};
use pgwarden_e2e::{run_psql, Endpoint, Gateway, PgCluster, UpstreamAuth};

/// pg_backend_pid() (a harmless function: the FunctionCall message itself is refused).
const PG_BACKEND_PID_OID: i32 = 2026;

const FIXTURE: &str = r#"
CREATE TABLE orders (id int PRIMARY KEY, customer_id int NOT NULL, total numeric(10,2) NOT NULL, status text NOT NULL DEFAULT 'new');
CREATE TABLE order_items (id int PRIMARY KEY, order_id int NOT NULL, sku text NOT NULL, qty int NOT NULL);
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text NOT NULL, card_number text NOT NULL);
CREATE TABLE secrets (id int PRIMARY KEY, value text NOT NULL);
INSERT INTO orders SELECT g, 1 + g % 3, g * 10, 'new' FROM generate_series(1, 10) g;
INSERT INTO customers VALUES (1, 'Ann', 'ann@example.com', '4929123456781234');
INSERT INTO secrets SELECT g, 'TOP-SECRET-7f3a-' || g FROM generate_series(1, 5) g;
"#;

fn assert_no_protected(what: &str, msgs: &[Message]) {
    for (_, body) in msgs {
        let text = String::from_utf8_lossy(body).to_lowercase();
        assert!(
            !text.contains("top-secret"),
            "{what}: protected data came back: {}",
            describe(msgs)
        );
    }
}

// === setup ===

fn corpus_policy_for(port: u16) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/policy.yaml");
    let text = fs::read_to_string(&path).expect("read corpus policy");
    let from = "    port: 5432\n";
    assert_eq!(text.matches(from).count(), 1, "{from:?} in policy.yaml");
    text.replacen(from, &format!("    port: {port}\n"), 1)
}

fn secrets_count(pg: &PgCluster) -> String {
    pg.admin_sql("SELECT count(*) FROM secrets")
}

// === the scenarios (each gets a fresh session) ===

/// A refused Parse gets ERROR 42501 before anything else; the server then skips to
/// Sync (the Bind/Describe/Execute behind it produce nothing) and ReadyForQuery comes;
/// the session runs an allowed statement next.
fn extended_refused_parse_skips_to_sync(port: u16, pg: &PgCluster) {
    let what = "refused Parse";
    let mut w = Wire::login(port, what);
    let msgs = w.roundtrip(
        &concat(&[
            parse("", "DELETE FROM secrets WHERE id = 1"),
            bind("", ""),
            describe_portal(""),
            execute(""),
            sync(),
        ]),
        1,
    );
    assert_eq!(kinds(&msgs), "EZ", "{what}: {}", describe(&msgs));
    assert_refused(what, &msgs);
    assert_eq!(status(&msgs), 'I', "{what}: {}", describe(&msgs));
    assert_eq!(secrets_count(pg), "5", "{what}: the DELETE ran");

    let msgs = w.roundtrip(
        &concat(&[
            parse("", "SELECT count(*) FROM orders WHERE id <= $1::int + 2"),
            bind_int("", "", 1),
            describe_portal(""),
            execute(""),
            sync(),
        ]),
        1,
    );
    assert_eq!(kinds(&msgs), "12TDCZ", "{what}, next: {}", describe(&msgs));
    assert_eq!(rows(&msgs), ["3"]);
}

/// The pipelined sequence: an allowed s1 runs, s1 is closed and re-Parsed as a refused
/// statement, bound and executed, all in one write.
fn pipelined_reparse_sequence() -> Vec<u8> {
    concat(&[
        parse("s1", "SELECT id FROM orders WHERE id = 1"),
        bind("", "s1"),
        execute(""),
        close_statement("s1"),
        parse("s1", "DELETE FROM secrets WHERE id = 2"),
        bind("", "s1"),
        execute(""),
        sync(),
    ])
}

/// Re-Parse of a closed statement name with a refused statement, pipelined: the first
/// result arrives, the re-Parse is refused, the refused statement never runs and never
/// exists (a later Bind to s1 fails), ReadyForQuery arrives, the session goes on.
fn pipelined_reparse_of_closed_name(port: u16, pg: &PgCluster) {
    let what = "pipelined re-Parse";
    let mut w = Wire::login(port, what);
    let msgs = w.roundtrip(&pipelined_reparse_sequence(), 1);
    assert_eq!(kinds(&msgs), "12DC3EZ", "{what}: {}", describe(&msgs));
    assert_eq!(rows(&msgs), ["1"], "{what}: {}", describe(&msgs));
    assert_refused(what, &msgs);
    assert_eq!(secrets_count(pg), "5", "{what}: the re-Parsed DELETE ran");

    // s1 must not exist now: binding it is an error, not a DELETE.
    let msgs = w.roundtrip(&concat(&[bind("", "s1"), execute(""), sync()]), 1);
    assert!(
        kinds(&msgs).starts_with('E') && kinds(&msgs).ends_with('Z'),
        "{what}, Bind s1 afterwards: {}",
        describe(&msgs)
    );
    assert_eq!(secrets_count(pg), "5", "{what}: Bind of s1 ran the DELETE");

    // And the same name can be prepared again with an allowed statement.
    let msgs = w.roundtrip(
        &concat(&[
            parse("s1", "SELECT status FROM orders WHERE id = 2"),
            bind("", "s1"),
            execute(""),
            sync(),
        ]),
        1,
    );
    assert_eq!(
        kinds(&msgs),
        "12DCZ",
        "{what}, s1 again: {}",
        describe(&msgs)
    );
    assert_eq!(w.ok("SELECT 'after'"), ["after"]);
}

/// Two statements in one Parse: PostgreSQL refuses that itself (42601); with a refused
/// second statement the proxy may refuse first. Either way nothing runs.
fn multi_statement_parse(port: u16, pg: &PgCluster) {
    let what = "two statements in one Parse";
    let mut w = Wire::login(port, what);
    let msgs = w.roundtrip(
        &concat(&[
            parse("", "SELECT 1; DELETE FROM secrets WHERE id = 4"),
            bind("", ""),
            execute(""),
            sync(),
        ]),
        1,
    );
    assert_eq!(kinds(&msgs), "EZ", "{what}: {}", describe(&msgs));
    assert_eq!(secrets_count(pg), "5", "{what}: the DELETE ran");
    assert_eq!(w.ok("SELECT 'after'"), ["after"]);
}

/// A refusal inside a transaction block leaves the transaction failed, as a server error
/// would: the next statement gets 25P02, ROLLBACK recovers. Same for a refused Parse.
fn refusal_fails_the_transaction(port: u16, pg: &PgCluster) {
    let what = "refusal in a transaction";
    let mut w = Wire::login(port, what);
    w.ok("BEGIN");
    w.ok("UPDATE orders SET status = 'in-tx' WHERE id = 3");
    let msgs = w.roundtrip(&query("DELETE FROM secrets WHERE id = 3"), 1);
    assert_refused(what, &msgs);
    assert_eq!(status(&msgs), 'E', "{what}: {}", describe(&msgs));
    let msgs = w.roundtrip(&query("SELECT 1"), 1);
    let errs = errors(&msgs);
    assert_eq!(
        errs.first().and_then(|e| e.get(&'C')).map(String::as_str),
        Some("25P02"),
        "{what}: next statement: {}",
        describe(&msgs)
    );
    let msgs = w.roundtrip(&query("ROLLBACK"), 1);
    assert_eq!(status(&msgs), 'I', "{what}: ROLLBACK: {}", describe(&msgs));
    assert_eq!(w.ok("SELECT status FROM orders WHERE id = 3"), ["new"]);
    assert_eq!(secrets_count(pg), "5");

    // Extended protocol: a refused Parse inside BEGIN.
    w.ok("BEGIN");
    let msgs = w.roundtrip(
        &concat(&[
            parse("", "TRUNCATE secrets"),
            bind("", ""),
            execute(""),
            sync(),
        ]),
        1,
    );
    assert_refused(what, &msgs);
    assert_eq!(status(&msgs), 'E', "{what}, extended: {}", describe(&msgs));
    let msgs = w.roundtrip(&query("ROLLBACK"), 1);
    assert_eq!(status(&msgs), 'I', "{what}: ROLLBACK: {}", describe(&msgs));
    assert_eq!(secrets_count(pg), "5");
    assert_eq!(w.ok("SELECT 'recovered'"), ["recovered"]);
}

/// SQL-level EXECUTE: a name never prepared through pgwarden is refused (42501, not the
/// server's 26000); names prepared through pgwarden work, whether prepared with SQL
/// PREPARE or with a protocol-level Parse (they share one namespace in PostgreSQL).
fn sql_execute_resolution(port: u16, _pg: &PgCluster) {
    let what = "SQL EXECUTE";
    let mut w = Wire::login(port, what);
    let msgs = w.roundtrip(&query("EXECUTE ghost"), 1);
    assert_refused(what, &msgs);
    let msgs = w.roundtrip(&query("EXECUTE ghost(1, 2)"), 1);
    assert_refused(what, &msgs);

    w.ok("PREPARE by_sql (int) AS SELECT status FROM orders WHERE id = $1");
    assert_eq!(w.ok("EXECUTE by_sql(4)"), ["new"]);

    let msgs = w.roundtrip(
        &concat(&[parse("by_protocol", "SELECT count(*) FROM orders"), sync()]),
        1,
    );
    assert_eq!(kinds(&msgs), "1Z", "{what}: {}", describe(&msgs));
    assert_eq!(w.ok("EXECUTE by_protocol"), ["10"]);

    // And the other way round: bind a statement prepared with SQL PREPARE.
    let msgs = w.roundtrip(
        &concat(&[bind_int("", "by_sql", 5), execute(""), sync()]),
        1,
    );
    assert_eq!(kinds(&msgs), "2DCZ", "{what}: {}", describe(&msgs));

    // A refused PREPARE leaves the name unknown.
    let msgs = w.roundtrip(&query("PREPARE bad AS SELECT * FROM secrets"), 1);
    assert_refused(what, &msgs);
    let msgs = w.roundtrip(&query("EXECUTE bad"), 1);
    assert_refused(what, &msgs);
    assert_no_protected(what, &msgs);
}

/// The FunctionCall message calls a function by OID with no SQL to judge: ERROR 42501,
/// session usable; inside a transaction block it fails the transaction.
fn function_call_refused(port: u16, _pg: &PgCluster) {
    let what = "FunctionCall";
    let mut w = Wire::login(port, what);
    let msgs = w.roundtrip(&function_call(PG_BACKEND_PID_OID), 1);
    assert_eq!(kinds(&msgs), "EZ", "{what}: {}", describe(&msgs));
    assert_refused(what, &msgs);
    assert_eq!(status(&msgs), 'I');
    assert_eq!(w.ok("SELECT 'still here'"), ["still here"]);

    w.ok("BEGIN");
    let msgs = w.roundtrip(&function_call(PG_BACKEND_PID_OID), 1);
    assert_refused(what, &msgs);
    assert_eq!(
        status(&msgs),
        'E',
        "{what} in a transaction: {}",
        describe(&msgs)
    );
    let msgs = w.roundtrip(&query("ROLLBACK"), 1);
    assert_eq!(status(&msgs), 'I');
    assert_eq!(w.ok("SELECT 'recovered'"), ["recovered"]);
}

/// RESET search_path, RESET ALL and DISCARD ALL are allowed because pgwarden pins
/// search_path as a startup parameter, which makes `public` the session default they
/// return to. Check that invariant (the corpus relies on it).
fn resets_keep_pinned_search_path(port: u16, _pg: &PgCluster) {
    let what = "RESET and the pinned search_path";
    let mut w = Wire::login(port, what);
    assert_eq!(w.ok("SHOW search_path"), ["public"]);
    for reset in ["RESET search_path", "RESET ALL", "DISCARD ALL"] {
        w.ok(reset);
        assert_eq!(
            w.ok("SHOW search_path"),
            ["public"],
            "{what}: after {reset}"
        );
        assert_eq!(w.ok("SHOW standard_conforming_strings"), ["on"], "{reset}");
        assert_eq!(w.ok("SHOW client_encoding"), ["UTF8"], "{reset}");
    }
    w.ok("RESET ROLE");
    w.ok("RESET SESSION AUTHORIZATION");
    assert_eq!(w.ok("SELECT current_user = session_user"), ["t"]);
}

/// psql's \dt and \d work under the default-deny policy (they read harmless catalogs),
/// and show no protected data.
fn psql_describe_commands(gw: &Gateway) {
    let env = gw.env();
    let run = |args: &[&str]| {
        let out = run_psql(&env, args, None);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success() && !stderr.contains("ERROR"),
            "psql {args:?} failed ({}):\n{stdout}\n{stderr}",
            out.status
        );
        assert!(!stdout.to_lowercase().contains("top-secret"), "{stdout}");
        stdout
    };
    let dt = run(&["-c", r"\dt"]);
    for table in ["orders", "order_items", "customers", "secrets"] {
        assert!(
            dt.lines()
                .any(|l| l.split('|').nth(1).map(str::trim) == Some(table)),
            "\\dt does not list {table}:\n{dt}"
        );
    }
    let d = run(&["-c", r"\d orders"]);
    for needle in [
        "Table \"public.orders\"",
        "customer_id",
        "numeric(10,2)",
        "orders_pkey",
    ] {
        assert!(d.contains(needle), "\\d orders lacks {needle:?}:\n{d}");
    }
    let d = run(&["-c", r"\d secrets"]);
    assert!(d.contains("value"), "\\d secrets:\n{d}");
    let d = run(&["-c", r"\d+ customers"]);
    assert!(d.contains("card_number"), "\\d+ customers:\n{d}");
    let dn = run(&["-c", r"\dn"]);
    assert!(dn.contains("public"), "\\dn:\n{dn}");
}

#[test]
fn policy_on_the_wire() {
    let pg = PgCluster::start();
    pg.admin_sql(FIXTURE);
    let gw = Gateway::builder(&pg)
        .policy_yaml(corpus_policy_for(pg.port()))
        .start();
    let port = gw.port();
    extended_refused_parse_skips_to_sync(port, &pg);
    pipelined_reparse_of_closed_name(port, &pg);
    multi_statement_parse(port, &pg);
    refusal_fails_the_transaction(port, &pg);
    sql_execute_resolution(port, &pg);
    function_call_refused(port, &pg);
    resets_keep_pinned_search_path(port, &pg);
    psql_describe_commands(&gw);
    assert!(
        !gw.logs().to_lowercase().contains("top-secret"),
        "the gateway log holds a protected value"
    );
    gw.assert_running();
}

/// The same sequences straight to PostgreSQL (trust auth, so the hand-written client
/// logs in without a password): they run the statements pgwarden refuses. Proves the
/// messages are encoded right and the scenarios are real attacks.
#[test]
fn wire_client_control_direct() {
    let pg = PgCluster::builder().auth(UpstreamAuth::Trust).start();
    pg.admin_sql(FIXTURE);

    let mut w = Wire::login(pg.port(), "direct pipelined re-Parse");
    let msgs = w.roundtrip(&pipelined_reparse_sequence(), 1);
    assert_eq!(kinds(&msgs), "12DC312CZ", "{}", describe(&msgs));
    assert_eq!(
        pg.admin_sql("SELECT count(*) FROM secrets WHERE id = 2"),
        "0",
        "directly, the re-Parsed DELETE runs"
    );

    let mut w = Wire::login(pg.port(), "direct refused-elsewhere Parse");
    let msgs = w.roundtrip(
        &concat(&[
            parse("", "DELETE FROM secrets WHERE id = 1"),
            bind("", ""),
            describe_portal(""),
            execute(""),
            sync(),
        ]),
        1,
    );
    assert_eq!(kinds(&msgs), "12nCZ", "{}", describe(&msgs));
    assert_eq!(secrets_count(&pg), "3");

    // Server errors leave the transaction failed (25P02 next) and skip to Sync.
    let mut w = Wire::login(pg.port(), "direct error in a transaction");
    w.ok("BEGIN");
    let msgs = w.roundtrip(&query("SELECT * FROM no_such_table"), 1);
    assert_eq!(status(&msgs), 'E');
    let msgs = w.roundtrip(&query("SELECT 1"), 1);
    assert_eq!(
        errors(&msgs)[0].get(&'C').map(String::as_str),
        Some("25P02")
    );
    w.ok("ROLLBACK");
    let msgs = w.roundtrip(
        &concat(&[parse("", "SELEC 1"), bind("", ""), execute(""), sync()]),
        1,
    );
    assert_eq!(kinds(&msgs), "EZ", "{}", describe(&msgs));

    // Two statements in one Parse: PostgreSQL refuses (42601).
    let msgs = w.roundtrip(&concat(&[parse("", "SELECT 1; SELECT 2"), sync()]), 1);
    assert_eq!(
        errors(&msgs)[0].get(&'C').map(String::as_str),
        Some("42601")
    );

    // Protocol-level and SQL-level prepared statements share one namespace.
    let msgs = w.roundtrip(
        &concat(&[parse("by_protocol", "SELECT count(*) FROM orders"), sync()]),
        1,
    );
    assert_eq!(kinds(&msgs), "1Z");
    assert_eq!(w.ok("EXECUTE by_protocol"), ["10"]);
    w.ok("PREPARE by_sql (int) AS SELECT status FROM orders WHERE id = $1");
    let msgs = w.roundtrip(
        &concat(&[bind_int("", "by_sql", 5), execute(""), sync()]),
        1,
    );
    assert_eq!(kinds(&msgs), "2DCZ", "{}", describe(&msgs));
    // EXECUTE of an unknown name is PostgreSQL's 26000 directly.
    let msgs = w.roundtrip(&query("EXECUTE ghost"), 1);
    assert_eq!(
        errors(&msgs)[0].get(&'C').map(String::as_str),
        Some("26000")
    );

    // PostgreSQL runs the FunctionCall.
    let msgs = w.roundtrip(&function_call(PG_BACKEND_PID_OID), 1);
    assert_eq!(kinds(&msgs), "VZ", "{}", describe(&msgs));
}
