//! psql through the gateway: what an interactive user or a shell script sees.
//!
//! Every check runs twice: through a gateway and directly against the cluster (the
//! control that proves the expectation holds for PostgreSQL itself).

use std::fmt::Write as _;
use std::fs;
use std::thread;
use std::time::Duration;

use pgwarden_e2e::{gateway_and_direct, psql_query, run_psql, wait_until, Endpoint, PgCluster};

gateway_and_direct!(
    simple_query_results,
    multi_statement_transaction,
    error_then_same_session_still_works,
    copy_in_and_out_via_psql,
    notice_reaches_psql,
    listen_notify_between_two_sessions,
);

fn stdout_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a psql script from stdin (`-f -`) with the given extra flags.
fn psql_script(ep: &dyn Endpoint, flags: &[&str], script: &str) -> std::process::Output {
    let mut args = flags.to_vec();
    args.extend(["-f", "-"]);
    run_psql(&ep.env(), &args, Some(script))
}

fn simple_query_results(ep: &dyn Endpoint, _pg: &PgCluster) {
    let env = ep.env();
    let sql = "SELECT 1 AS a, 'hello'::text AS b, NULL::int AS c, 'héllo ✓'::text AS d";
    let out = run_psql(&env, &["-A", "-t", "-c", sql], None);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(stdout_of(&out), "1|hello||héllo ✓\n");

    // Aligned output with headers and the row count footer, as a user sees it.
    let out = run_psql(
        &env,
        &[
            "-c",
            "SELECT g AS n, g * g AS square FROM generate_series(1, 3) g",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        stdout_of(&out),
        " n | square \n---+--------\n 1 |      1\n 2 |      4\n 3 |      9\n(3 rows)\n\n"
    );

    // Two statements in one Query message: psql 15 shows both results.
    assert_eq!(
        psql_query(ep, "SELECT 'first'; SELECT 'second'"),
        "first\nsecond"
    );

    // An empty result and a command tag.
    let out = run_psql(
        &env,
        &[
            "-c",
            "SELECT relname FROM pg_class WHERE relname = 'no such thing'",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(stdout_of(&out).contains("(0 rows)"), "{}", stdout_of(&out));
    let out = run_psql(
        &env,
        &["-c", "CREATE TABLE IF NOT EXISTS t_empty (x int)"],
        None,
    );
    assert_eq!(stdout_of(&out), "CREATE TABLE\n", "{}", stderr_of(&out));
}

fn multi_statement_transaction(ep: &dyn Endpoint, pg: &PgCluster) {
    let script = "\
CREATE TABLE orders (id int PRIMARY KEY, qty int NOT NULL);
BEGIN;
INSERT INTO orders VALUES (1, 5), (2, 7);
UPDATE orders SET qty = qty + 1 WHERE id = 2;
COMMIT;
BEGIN;
INSERT INTO orders VALUES (3, 1);
ROLLBACK;
BEGIN;
INSERT INTO orders VALUES (4, 1);
INSERT INTO orders VALUES (1, 0);
INSERT INTO orders VALUES (5, 1);
COMMIT;
";
    let out = psql_script(ep, &["-v", "ON_ERROR_STOP=0"], script);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        stdout_of(&out),
        "CREATE TABLE\nBEGIN\nINSERT 0 2\nUPDATE 1\nCOMMIT\nBEGIN\nINSERT 0 1\nROLLBACK\n\
         BEGIN\nINSERT 0 1\nROLLBACK\n",
        "stderr: {}",
        stderr_of(&out)
    );
    let err = stderr_of(&out);
    assert!(
        err.contains(
            "<stdin>:11: ERROR:  duplicate key value violates unique constraint \"orders_pkey\""
        ),
        "{err}"
    );
    assert!(
        err.contains(
            "<stdin>:12: ERROR:  current transaction is aborted, commands ignored until end of transaction block"
        ),
        "{err}"
    );
    // Only the committed transaction left data behind.
    assert_eq!(
        pg.admin_sql("SELECT id, qty FROM orders ORDER BY id"),
        "1|5\n2|8"
    );
}

fn error_then_same_session_still_works(ep: &dyn Endpoint, _pg: &PgCluster) {
    let script = "\
SELECT pg_backend_pid() AS pid \\gset
SELECT 'before';
SELECT 1/0;
SELECT * FROM no_such_table;
SELEC 'syntax';
SELECT 'after';
SELECT pg_backend_pid() = :pid AS same_session;
";
    let out = psql_script(ep, &["-A", "-t", "-v", "ON_ERROR_STOP=0"], script);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        stdout_of(&out),
        "before\nafter\nt\n",
        "stderr: {}",
        stderr_of(&out)
    );
    let err = stderr_of(&out);
    // PostgreSQL says `ERROR:  syntax error at or near "SELEC"`; the gateway refuses
    // what it cannot parse before it reaches the server and says
    // `ERROR:  pgwarden: denied: cannot parse statement: ... syntax error at or near "SELEC"`.
    let expected = [
        ("<stdin>:3: ERROR:  ", "division by zero"),
        (
            "<stdin>:4: ERROR:  ",
            "relation \"no_such_table\" does not exist",
        ),
        ("<stdin>:5: ERROR:  ", "syntax error at or near \"SELEC\""),
    ];
    let mut last = 0;
    for (prefix, message) in expected {
        let at = err
            .lines()
            .position(|l| l.contains(prefix) && l.contains(message))
            .unwrap_or_else(|| panic!("{prefix}...{message} missing from stderr:\n{err}"));
        assert!(at >= last, "errors out of order:\n{err}");
        last = at;
    }
    assert!(!err.contains("FATAL"), "{err}");
}

/// Canonical PostgreSQL CSV for row `i`: id, name, price (numeric(10,2)), note
/// (NULL every 11th row, a field needing quotes every 7th).
fn csv_row(i: u32, out: &mut String) {
    let note = if i.is_multiple_of(11) {
        String::new()
    } else if i.is_multiple_of(7) {
        format!("\"comma, and \"\"quote\"\" {i}\"")
    } else {
        format!("ünïcode-{i}")
    };
    writeln!(out, "{i},item-{i},{}.{:02},{note}", i / 100, i % 100).unwrap();
}

fn copy_in_and_out_via_psql(ep: &dyn Endpoint, pg: &PgCluster) {
    const ROWS: u32 = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("items.csv");
    let output = dir.path().join("items-out.csv");
    let bad = dir.path().join("bad.csv");
    let mut csv = String::new();
    for i in 1..=ROWS {
        csv_row(i, &mut csv);
    }
    fs::write(&input, &csv).unwrap();
    // Same shape, but row 5000 has a non-integer id: the whole COPY must fail.
    let mut bad_csv = String::new();
    for i in ROWS + 1..=ROWS + 9_999 {
        if i == ROWS + 5_000 {
            bad_csv.push_str("not-a-number,x,1.00,\n");
        } else {
            csv_row(i, &mut bad_csv);
        }
    }
    fs::write(&bad, &bad_csv).unwrap();

    let script = format!(
        "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2), note text);\n\
         \\copy items FROM '{input}' WITH (FORMAT csv)\n\
         \\copy items FROM '{bad}' WITH (FORMAT csv)\n\
         SELECT count(*) FROM items;\n\
         \\copy (SELECT * FROM items ORDER BY id) TO '{output}' WITH (FORMAT csv)\n",
        input = input.display(),
        bad = bad.display(),
        output = output.display(),
    );
    let out = psql_script(ep, &["-A", "-t", "-v", "ON_ERROR_STOP=0"], &script);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        stdout_of(&out),
        "CREATE TABLE\nCOPY 10000\n10000\nCOPY 10000\n",
        "stderr: {}",
        stderr_of(&out)
    );
    let err = stderr_of(&out);
    assert!(
        err.contains("ERROR:  invalid input syntax for type integer: \"not-a-number\""),
        "{err}"
    );
    assert!(err.contains("COPY items, line 5000"), "{err}");

    assert_eq!(
        pg.admin_sql(
            "SELECT count(*), sum(id), count(note), sum(price), \
             count(*) FILTER (WHERE note LIKE 'comma, and \"quote\"%') FROM items"
        ),
        "10000|50005000|9091|500050.00|1299"
    );
    let copied = fs::read_to_string(&output).unwrap();
    assert_eq!(copied.len(), csv.len());
    assert!(
        copied == csv,
        "COPY TO output differs from what COPY FROM loaded"
    );
}

fn notice_reaches_psql(ep: &dyn Endpoint, _pg: &PgCluster) {
    let out = run_psql(
        &ep.env(),
        &[
            "-c",
            // Statements a default-deny policy allows that make the server
            // talk back: a NOTICE from DDL, a WARNING from transaction control.
            "DROP TABLE IF EXISTS no_such_table_for_notice",
            "-c",
            "ROLLBACK",
            "-c",
            "SELECT 'after notices'",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        stderr_of(&out),
        "NOTICE:  table \"no_such_table_for_notice\" does not exist, skipping\nWARNING:  there is no transaction in progress\n",
        "stdout: {}",
        stdout_of(&out)
    );
    assert!(
        stdout_of(&out).starts_with("DROP TABLE\nROLLBACK\n"),
        "{}",
        stdout_of(&out)
    );
    assert!(
        stdout_of(&out).contains("after notices"),
        "{}",
        stdout_of(&out)
    );
}

fn listen_notify_between_two_sessions(ep: &dyn Endpoint, pg: &PgCluster) {
    let env = ep.env();
    // The listener sleeps after LISTEN; psql prints notifications after each command.
    let listener = thread::spawn(move || {
        run_psql(
            &env,
            &["-A", "-t", "-f", "-"],
            Some("LISTEN orders_changed;\nSELECT pg_sleep(4);\nSELECT 'listener done';\n"),
        )
    });
    let listening = wait_until(Duration::from_secs(20), || {
        pg.admin_sql(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE query = 'SELECT pg_sleep(4);' AND state = 'active'",
        ) == "1"
    });
    assert!(listening, "listener never reached pg_sleep");
    assert_eq!(
        psql_query(ep, "NOTIFY orders_changed, 'order 42'; SELECT 'sent'"),
        "sent"
    );
    let out = listener.join().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let text = stdout_of(&out);
    assert!(
        text.contains(
            "Asynchronous notification \"orders_changed\" with payload \"order 42\" received from server process with PID"
        ),
        "{text}"
    );
    assert!(text.ends_with("listener done\n"), "{text}");
}
