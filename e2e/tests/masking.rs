//! Masking end to end: a real PostgreSQL holding card numbers, emails, SSNs
//! and a secret in a jsonb column; pgwarden in front with masking rules;
//! real clients (psql, psycopg 3 text and binary with prepared statements
//! reused, asyncpg's binary protocol, tokio-postgres) trying every path to
//! the raw values. None may appear — in results, errors, notices, COPY data
//! or the gateway's log — while unmasked columns and the allowed parts of
//! masked ones still come through.

use std::time::Duration;

use pgwarden_e2e::{policy_with_rules, run_command, run_psql, Endpoint, Gateway, PgCluster};

const CARD: &str = "4929123456781234";
const EMAIL: &str = "ann.secret@example.com";
const SSN: &str = "078-05-1120";
const PIN: &str = "secret-pin-9911";

/// Strings that must never leave the proxy: the raw values and pieces of
/// them longer than what the masks allow.
const LEAKS: &[&str] = &[
    CARD,
    EMAIL,
    "49291234",
    "4929 1234",
    "ann.secret",
    "ANN.SECRET",
    SSN,
    "078051120",
    PIN,
    "secret-pin",
];

const RULES: &str = "  defaultAction: Allow
  masking:
    - {columns: [\"public.customers.card_number\"], strategy: Partial, keepLast: 4}
    - {columns: [\"public.customers.email\"], strategy: Email}
    - {columns: [\"*.*.ssn\"], strategy: Hash}
    - {columns: [\"public.customers.profile\"], strategy: Redact}
    - {columns: [\"public.payments.card_number\"], strategy: Partial, keepLast: 4}
";

const SCHEMA: &str = "
CREATE TABLE customers (id int PRIMARY KEY, name text, card_number text UNIQUE,
                        email varchar(100), ssn text, profile jsonb, notes text);
INSERT INTO customers VALUES
  (1, 'Ann', '4929123456781234', 'ann.secret@example.com', '078-05-1120',
   '{\"pin\": \"secret-pin-9911\", \"tier\": \"gold\"}', 'hello');
CREATE VIEW customer_cards AS
  SELECT id, card_number AS digits, upper(email) AS loud FROM customers;
CREATE TABLE payments (id int, card_number text) PARTITION BY RANGE (id);
CREATE TABLE payments_2024 PARTITION OF payments FOR VALUES FROM (0) TO (1000);
INSERT INTO payments VALUES (1, '4929123456781234');
CREATE TABLE orders (id int, customer_id int, note text);
INSERT INTO orders VALUES (10, 1, 'first order');
";

struct Setup {
    pg: PgCluster,
    gw: Gateway,
    _key: tempfile::NamedTempFile,
}

/// A cluster holding the SCHEMA tables and rows.
fn cluster_with_schema() -> PgCluster {
    let pg = PgCluster::start();
    let out = run_psql(
        &pg.direct_env(),
        &["-v", "ON_ERROR_STOP=1", "-q", "-c", SCHEMA],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    pg
}

fn setup() -> Setup {
    let pg = cluster_with_schema();
    let key = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key.path(), [42u8; 32]).unwrap();
    let gw = Gateway::builder(&pg)
        .policy_yaml(policy_with_rules(pg.port(), None, RULES))
        .arg("--masking-key-file")
        .arg(key.path().as_os_str())
        .start();
    Setup { pg, gw, _key: key }
}

fn assert_no_leak(what: &str, text: &str) {
    for leak in LEAKS {
        assert!(!text.contains(leak), "{what}: {leak:?} leaked:\n{text}");
    }
}

/// Run `sql` (one statement or several, `;`-separated) in one psql session
/// through the gateway, errors included; returns stdout + stderr.
fn psql(gw: &Gateway, sql: &str) -> String {
    let out = run_psql(
        &gw.env(),
        &["-A", "-t", "-v", "VERBOSITY=verbose", "-f", "-"],
        Some(&format!("\\set VERBOSITY verbose\n{sql}\n")),
    );
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn psql_sees_masked_values_by_every_path() {
    let s = setup();
    // The allowed parts come through exactly.
    let direct = psql(
        &s.gw,
        "SELECT id, name, card_number, email, notes FROM customers;",
    );
    assert!(
        direct.contains("1|Ann|************1234|****@example.com|hello"),
        "{direct}"
    );
    // A partition holds its parent's rows: it is masked like the parent.
    let part = psql(
        &s.gw,
        "SELECT card_number FROM payments_2024; SELECT card_number FROM payments;",
    );
    assert_eq!(part.matches("************1234").count(), 2, "{part}");
    let attempts = [
        "SELECT upper(card_number) FROM payments_2024",
        "SELECT card_number AS c FROM customers",
        "SELECT name AS card_number, card_number AS name FROM customers",
        "SELECT upper(card_number), card_number || '' , substr(card_number, 1, 8) FROM customers",
        "SELECT card_number::bigint, length(card_number) FROM customers",
        "SELECT customers FROM customers",
        "SELECT c FROM customers c",
        "SELECT to_jsonb(c), row_to_json(c) FROM customers c",
        "SELECT json_agg(c.*) FROM customers c",
        "SELECT string_agg(card_number, ','), array_agg(email) FROM customers",
        "SELECT xmlelement(name x, card_number) FROM customers",
        "SELECT card_number FROM customers UNION SELECT 'x'",
        "SELECT * FROM (SELECT card_number FROM customers) s",
        "SELECT upper(x) FROM (SELECT * FROM customers) s(a, b, x)",
        "SELECT x FROM customers AS c(a, b, x)",
        "WITH t AS (SELECT * FROM customers) SELECT * FROM t",
        "WITH t AS (SELECT email FROM customers) SELECT lower(email) FROM t",
        "SELECT (SELECT max(card_number) FROM customers)",
        "SELECT * FROM customer_cards",
        "SELECT upper(digits), lower(loud) FROM customer_cards",
        "SELECT profile, profile->>'pin', profile::text FROM customers",
        "SELECT ssn, md5(ssn) FROM customers",
        "SELECT jsonb_path_query(to_jsonb(c), '$.card_number') FROM customers c",
        "SELECT * FROM customers",
        "TABLE customers",
        "PREPARE p AS SELECT upper(card_number), card_number FROM customers; EXECUTE p",
        "BEGIN; DECLARE cur CURSOR FOR SELECT upper(card_number), email FROM customers; FETCH ALL FROM cur; COMMIT",
        // Errors that would quote the value.
        "SELECT card_number::int FROM customers",
        "SELECT email::int FROM customers",
        "SELECT profile->>'pin' || 1/0 FROM customers",
        "INSERT INTO customers (id, name, card_number) VALUES (2, 'Bob', '4929123456781234')",
        "UPDATE customers SET notes = notes WHERE id = 1 RETURNING *",
        // Paths masking cannot make safe are refused.
        "COPY customers TO STDOUT",
        "COPY customers TO STDOUT (FORMAT csv)",
        "COPY customers TO STDOUT (FORMAT binary)",
        "COPY (SELECT card_number FROM customers) TO STDOUT",
        "CREATE TABLE leak AS SELECT * FROM customers",
        "INSERT INTO orders (note) SELECT card_number FROM customers",
        "UPDATE orders SET note = (SELECT email FROM customers LIMIT 1)",
        "CREATE VIEW v AS SELECT card_number FROM customers",
        "SELECT pg_notify('c', card_number) FROM customers",
        "DO $$ BEGIN RAISE NOTICE '%', (SELECT card_number FROM customers LIMIT 1); END $$",
        "ALTER TABLE customers RENAME COLUMN card_number TO cc",
    ];
    let mut all = String::new();
    for sql in attempts {
        let out = psql(&s.gw, &format!("{sql};"));
        assert_no_leak(sql, &out);
        all.push_str(&out);
    }
    // Refusals say why; errors keep their SQLSTATE.
    assert!(
        all.contains("masking: COPY ... TO would send masked columns"),
        "{all}"
    );
    assert!(
        all.contains("22P02"),
        "invalid_text_representation kept:\n{all}"
    );
    assert!(all.contains("23505"), "unique_violation kept:\n{all}");
    // Safe variants still work.
    let ok = psql(
        &s.gw,
        "COPY customers (id, name, notes) TO STDOUT; SELECT count(*) FROM customers; \
         SELECT o.note, c.name FROM orders o JOIN customers c ON c.id = o.customer_id;",
    );
    assert!(ok.contains("1\tAnn\thello"), "{ok}");
    assert!(ok.contains("first order|Ann"), "{ok}");
    // The whole session log is clean too.
    assert_no_leak("gateway log", &s.gw.logs());
    s.gw.assert_running();
    drop(s.pg);
}

#[test]
fn hash_is_stable_and_joinable() {
    let s = setup();
    let a = psql(&s.gw, "SELECT ssn FROM customers;");
    let b = psql(&s.gw, "SELECT ssn FROM customers WHERE id = 1;");
    let hash = a.lines().next().unwrap_or_default().trim().to_string();
    assert_eq!(hash.len(), 64, "{a}");
    assert!(b.contains(&hash), "same input, same pseudonym:\n{a}\n{b}");
    assert_no_leak("hash", &a);
}

#[test]
fn detectors_and_predicate_denial() {
    let pg = cluster_with_schema();
    let out = run_psql(
        &pg.direct_env(),
        &["-q", "-c", "INSERT INTO orders VALUES (11, 1, 'paid with 4929 1234 5678 1236, receipt to ann.secret@example.com, ssn 078-05-1120')"],
        None,
    );
    assert!(out.status.success());
    let rules = "  defaultAction: Allow
  masking:
    - {columns: [\"public.customers.card_number\"], strategy: Partial, keepLast: 4, inPredicates: Deny}
    - {detect: [CreditCard, Email, USSSN], strategy: Redact}
";
    let gw = Gateway::builder(&pg)
        .policy_yaml(policy_with_rules(pg.port(), None, rules))
        .start();
    let notes = psql(&gw, "SELECT note FROM orders WHERE id = 11;");
    assert!(
        notes.contains("paid with ****, receipt to ****, ssn ****"),
        "{notes}"
    );
    assert!(!notes.contains("4929 1234 5678 1236"), "{notes}");
    let out = psql(
        &gw,
        "SELECT id FROM customers WHERE card_number LIKE '4929%';",
    );
    assert!(out.contains("inPredicates: Deny"), "{out}");
    let out = psql(&gw, "COPY orders TO STDOUT;");
    assert!(out.contains("content detectors"), "{out}");
    assert!(!out.contains("4929 1234 5678 1236"), "{out}");
    // Unmasked data and masked columns in the select list still work.
    let ok = psql(&gw, "SELECT id, card_number FROM customers WHERE id = 1;");
    assert!(ok.contains("1|************1234"), "{ok}");
    assert_no_leak("detector gateway log", &gw.logs());
}

#[test]
fn schema_changes_through_pgwarden_refresh_the_map() {
    let s = setup();
    // A new table with a column the `*.*.ssn` entry matches, created and
    // filled through the gateway.
    let out = psql(
        &s.gw,
        "CREATE TABLE staff (id int, ssn text); INSERT INTO staff VALUES (1, '078-05-1120');",
    );
    assert!(!out.contains("ERROR"), "{out}");
    // Until the map knows the table its columns are withheld whole; then
    // the entry's own strategy (Hash) applies. Never the raw value.
    let mut hashed = false;
    for _ in 0..50 {
        let out = psql(&s.gw, "SELECT ssn FROM staff;");
        assert_no_leak("new table", &out);
        let v = out.lines().next().unwrap_or_default().trim().to_string();
        if v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) {
            hashed = true;
            break;
        }
        assert_eq!(v, "****", "{out}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        hashed,
        "the column map was not refreshed after CREATE TABLE"
    );
}

fn python() -> String {
    std::env::var("PGWARDEN_E2E_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn run_driver(gw: &Gateway, driver: &str) -> String {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/masking_extract.py");
    let mut cmd = pgwarden_e2e::libpq_command(&python(), &gw.env());
    cmd.arg(script).arg(driver);
    let out = run_command(&mut cmd, None, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{driver} failed:\n{stdout}\n{stderr}");
    assert_no_leak(driver, &stdout);
    assert_no_leak(driver, &stderr);
    stdout
}

fn lines_of(out: &str, attempt: &str) -> Vec<serde_json::Value> {
    out.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["attempt"] == attempt)
        .collect()
}

#[test]
fn psycopg_text_binary_and_reused_prepared_statements() {
    let s = setup();
    let out = run_driver(&s.gw, "psycopg");
    let direct = lines_of(&out, "direct");
    assert_eq!(direct.len(), 6, "3 runs x text and binary:\n{out}");
    for d in &direct {
        let row = &d["rows"][0];
        assert_eq!(row[1], "Ann", "{d}");
        assert_eq!(row[2], "************1234", "{d}");
        assert_eq!(row[3], "****@example.com", "{d}");
        assert_eq!(row[5], "hello", "{d}");
    }
    for fmt in ["text", "csv", "binary"] {
        let copy = lines_of(&out, &format!("copy {fmt}"));
        assert!(copy[0]["sqlstate"] == "42501", "{copy:?}");
    }
    let pipeline = lines_of(&out, "pipeline");
    assert!(
        pipeline.iter().any(|l| l["sqlstate"] == "22003"),
        "the failing statement in the pipeline reports its SQLSTATE: {pipeline:?}"
    );
    let after = lines_of(&out, "after pipeline");
    assert_eq!(after[0]["rows"][0][0], "************1234", "{after:?}");
    assert_eq!(after[0]["rows"][0][1], "****@example.com", "{after:?}");
    let err = lines_of(&out, "error echo");
    assert!(
        err.iter().all(|e| e["sqlstate"] == "22003"),
        "numeric_value_out_of_range kept: {err:?}"
    );
}

#[test]
fn asyncpg_binary_protocol() {
    let s = setup();
    let out = run_driver(&s.gw, "asyncpg");
    let direct = lines_of(&out, "direct");
    assert_eq!(direct.len(), 3, "{out}");
    for d in &direct {
        let row = &d["rows"][0];
        assert_eq!(row[2], "************1234", "{d}");
        assert_eq!(row[3], "****@example.com", "{d}");
    }
    let jsonb = lines_of(&out, "jsonb column");
    // Redact keeps jsonb valid: a JSON string.
    assert!(
        jsonb.iter().all(|j| j["rows"][0][0] == "\"****\""),
        "{jsonb:?}"
    );
    let copy = lines_of(&out, "copy_from_query");
    assert_eq!(copy[0]["sqlstate"], "42501", "{copy:?}");
}

#[tokio::test]
async fn tokio_postgres_binary_results() {
    let s = setup();
    let (client, conn) = tokio_postgres::connect(&s.gw.conninfo(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let stmt = client
        .prepare("SELECT card_number, email, notes, upper(card_number) FROM customers")
        .await
        .unwrap();
    for _ in 0..3 {
        let row = client.query_one(&stmt, &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "************1234");
        assert_eq!(row.get::<_, String>(1), "****@example.com");
        assert_eq!(row.get::<_, String>(2), "hello");
        assert_eq!(row.get::<_, String>(3), "****");
    }
    // A table created outside pgwarden after it started: masked from the
    // first query (unknown relations are withheld until the map is re-read).
    let out = run_psql(
        &s.pg.direct_env(),
        &[
            "-q",
            "-c",
            "CREATE TABLE hr (id int, ssn text); INSERT INTO hr VALUES (1, '078-05-1120')",
        ],
        None,
    );
    assert!(out.status.success());
    for _ in 0..3 {
        let rows = client.simple_query("SELECT ssn FROM hr").await.unwrap();
        let text = format!("{rows:?}");
        assert!(!text.contains(SSN), "{text}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// tokio-postgres sends Bind, Execute and Sync before its COPY data; the
/// server ignores that Sync. Masking attributes replies to requests, so it
/// must not count it: the masked reads after the copy stay masked.
#[tokio::test]
async fn masked_reads_after_a_copy_in_stay_masked() {
    use futures_util::SinkExt;
    let s = setup();
    let (client, conn) = tokio_postgres::connect(&s.gw.conninfo(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let sink = client
        .copy_in("COPY orders (id, customer_id, note) FROM STDIN (FORMAT csv)")
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"11,1,copied\n12,1,copied\n"))
        .await
        .unwrap();
    assert_eq!(sink.finish().await.unwrap(), 2);
    let card = client
        .prepare("SELECT card_number, email FROM customers WHERE id = 1")
        .await
        .unwrap();
    for _ in 0..3 {
        let row = client.query_one(&card, &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "************1234");
        assert_eq!(row.get::<_, String>(1), "****@example.com");
        let rows = client
            .simple_query("SELECT card_number, upper(email) FROM customers")
            .await
            .unwrap();
        assert_no_leak("simple query after copy", &format!("{rows:?}"));
        let n: i64 = client
            .query_one("SELECT count(*) FROM orders", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 3);
    }
}
