use super::*;

/// Each access as one readable line; fixed decisions are marked. Operators
/// are everywhere (`=`), so they have their own test.
fn summary(sql: &str) -> Vec<String> {
    let stmts = analyze(sql, Settings::default()).unwrap_or_else(|e| panic!("{sql}: {e}"));
    let mut out: Vec<String> = stmts
        .iter()
        .flat_map(|s| s.accesses.iter())
        .filter(|a| !matches!(a.target, Target::Operator { .. }))
        .map(|a| {
            let mark = match &a.fixed {
                Some(Fixed::Deny(w)) => format!(" [deny: {w}]"),
                Some(Fixed::Allow) => " [always]".into(),
                None => String::new(),
            };
            format!("{a}{mark}")
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

fn check(cases: &[(&str, &[&str])]) {
    let mut failures = Vec::new();
    for (sql, want) in cases {
        let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        want.sort();
        let got = summary(sql);
        if got != want {
            failures.push(format!("{sql}\n   want {want:?}\n    got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn reads_at_any_depth() {
    check(&[
        ("SELECT 1", &[]),
        ("SELECT * FROM orders", &["SELECT on public.orders"]),
        ("SELECT * FROM sales.orders o", &["SELECT on sales.orders"]),
        ("TABLE secrets", &["SELECT on public.secrets"]),
        (
            "SELECT (SELECT max(x) FROM secrets) FROM orders",
            &[
                "SELECT on public.orders",
                "SELECT on public.secrets",
                "function max",
            ],
        ),
        (
            "SELECT * FROM orders WHERE id IN (SELECT id FROM secrets)",
            &["SELECT on public.orders", "SELECT on public.secrets"],
        ),
        (
            "SELECT 1 UNION SELECT secret FROM secrets",
            &["SELECT on public.secrets"],
        ),
        (
            "SELECT * FROM orders o, LATERAL (SELECT * FROM secrets s WHERE s.id = o.id) x",
            &["SELECT on public.orders", "SELECT on public.secrets"],
        ),
        (
            "SELECT * FROM orders JOIN secrets USING (id)",
            &["SELECT on public.orders", "SELECT on public.secrets"],
        ),
        (
            "VALUES (1), ((SELECT 1 FROM secrets))",
            &["SELECT on public.secrets"],
        ),
        (
            "SELECT EXISTS (SELECT 1 FROM secrets)",
            &["SELECT on public.secrets"],
        ),
    ]);
}

#[test]
fn names_fold_as_postgres_does() {
    check(&[
        ("SELECT * FROM Orders", &["SELECT on public.orders"]),
        ("SELECT * FROM \"Orders\"", &["SELECT on public.Orders"]),
        (
            "SELECT * FROM PUBLIC.SECRETS",
            &["SELECT on public.secrets"],
        ),
        // U&"\0073ecrets" is "secrets".
        (
            "SELECT * FROM U&\"\\0073ecrets\"",
            &["SELECT on public.secrets"],
        ),
        // Unqualified catalog names resolve to pg_catalog first.
        ("SELECT * FROM pg_class", &["SELECT on pg_catalog.pg_class"]),
        (
            "SELECT * FROM PG_AUTHID",
            &["SELECT on pg_catalog.pg_authid"],
        ),
        // Quoted upper case is a different (non-catalog) name.
        (
            "SELECT * FROM \"PG_AUTHID\"",
            &["SELECT on public.PG_AUTHID"],
        ),
        (
            "SELECT * FROM pg_catalog.pg_authid",
            &["SELECT on pg_catalog.pg_authid"],
        ),
        (
            "SELECT * FROM information_schema.tables",
            &["SELECT on information_schema.tables"],
        ),
    ]);
}

#[test]
fn ctes_are_scoped_names_not_tables() {
    check(&[
        ("WITH x AS (SELECT * FROM orders) SELECT * FROM x", &["SELECT on public.orders"]),
        // A non-recursive CTE body does not see its own name: that is the table.
        ("WITH secrets AS (SELECT * FROM secrets) SELECT * FROM secrets", &["SELECT on public.secrets"]),
        // Later CTEs see earlier ones.
        ("WITH a AS (SELECT 1), b AS (SELECT * FROM a) SELECT * FROM b", &[]),
        // ... but not later ones (this `b` is a table).
        ("WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a", &["SELECT on public.b"]),
        ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r", &[]),
        // The CTE name does not leak out of its statement.
        ("SELECT * FROM (WITH orders AS (SELECT 1) SELECT * FROM orders) s, orders", &["SELECT on public.orders"]),
        // Data-modifying CTEs.
        ("WITH d AS (DELETE FROM secrets RETURNING *) SELECT * FROM d", &["DELETE on public.secrets without WHERE", "SELECT on public.secrets"]),
        ("WITH u AS (UPDATE orders SET n = 1 WHERE id = 1 RETURNING id) SELECT 1", &["SELECT on public.orders", "UPDATE on public.orders"]),
    ]);
}

#[test]
fn writes_name_their_target_class() {
    check(&[
        (
            "INSERT INTO orders VALUES (1)",
            &["INSERT on public.orders"],
        ),
        (
            "INSERT INTO orders SELECT * FROM secrets",
            &["INSERT on public.orders", "SELECT on public.secrets"],
        ),
        (
            "INSERT INTO orders VALUES (1) ON CONFLICT (id) DO UPDATE SET n = 2",
            &["INSERT on public.orders", "UPDATE on public.orders"],
        ),
        (
            "UPDATE orders SET n = 1",
            &["UPDATE on public.orders without WHERE"],
        ),
        (
            "UPDATE orders SET n = 1 WHERE id = 2",
            &["UPDATE on public.orders"],
        ),
        (
            "UPDATE orders SET n = s.n FROM secrets s WHERE s.id = orders.id",
            &["SELECT on public.secrets", "UPDATE on public.orders"],
        ),
        (
            "DELETE FROM orders",
            &["DELETE on public.orders without WHERE"],
        ),
        (
            "DELETE FROM orders USING secrets WHERE secrets.id = orders.id",
            &["DELETE on public.orders", "SELECT on public.secrets"],
        ),
        // RETURNING reads the target.
        (
            "UPDATE customers SET n = n WHERE id = 1 RETURNING card_number",
            &["SELECT on public.customers", "UPDATE on public.customers"],
        ),
        (
            "MERGE INTO orders o USING secrets s ON o.id = s.id WHEN MATCHED THEN DELETE",
            &["MERGE on public.orders", "SELECT on public.secrets"],
        ),
        (
            "TRUNCATE orders, secrets",
            &["TRUNCATE on public.orders", "TRUNCATE on public.secrets"],
        ),
    ]);
}

#[test]
fn ddl_and_what_it_reads() {
    check(&[
        ("CREATE TABLE t (id int)", &["DDL on public.t"]),
        ("DROP TABLE orders", &["DDL on public.orders"]),
        ("DROP TABLE IF EXISTS s.a, b CASCADE", &["DDL on public.b", "DDL on s.a"]),
        ("ALTER TABLE orders ADD COLUMN note text", &["DDL on public.orders"]),
        ("CREATE TABLE t AS SELECT * FROM secrets", &["DDL on public.t", "SELECT on public.secrets"]),
        ("SELECT * INTO t FROM secrets", &["DDL on public.t", "SELECT on public.secrets"]),
        ("CREATE VIEW v AS SELECT * FROM pg_authid", &["DDL on public.v", "SELECT on pg_catalog.pg_authid"]),
        ("CREATE MATERIALIZED VIEW mv AS SELECT * FROM secrets", &["DDL on public.mv", "SELECT on public.secrets"]),
        ("CREATE SCHEMA s", &["DDL"]),
        ("COMMENT ON TABLE orders IS 'x'", &["DDL on public.orders"]),
        ("COMMENT ON COLUMN s.orders.note IS 'x'", &["DDL on s.orders"]),
        ("COMMENT ON SCHEMA s IS 'x'", &["DDL"]),
        ("GRANT SELECT ON secrets TO public", &["PRIVILEGE on public.secrets"]),
        ("CREATE ROLE r SUPERUSER", &["PRIVILEGE"]),
        ("VACUUM orders", &["MAINTENANCE on public.orders"]),
        ("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE", &["MAINTENANCE on public.orders"]),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'", &["DDL"]),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE c AS 'lib', 'sym'", &["DDL", "DDL [deny: functions in language c (untrusted code runs inside the server)]"]),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT count(*) FROM secrets; END", &["DDL", "SELECT on public.secrets", "function count"]),
    ]);
}

#[test]
fn copy_explain_prepare_cursor() {
    check(&[
        ("COPY orders FROM STDIN", &["COPY_FROM on public.orders"]),
        ("COPY orders TO STDOUT", &["COPY_TO on public.orders"]),
        (
            "COPY (SELECT * FROM secrets) TO STDOUT",
            &["COPY_TO on public.secrets", "SELECT on public.secrets"],
        ),
        (
            "COPY orders TO '/tmp/x'",
            &[
                "COPY_TO [deny: COPY to or from a program or server file]",
                "COPY_TO on public.orders",
            ],
        ),
        (
            "COPY orders FROM PROGRAM 'id'",
            &[
                "COPY_FROM [deny: COPY to or from a program or server file]",
                "COPY_FROM on public.orders",
            ],
        ),
        (
            "EXPLAIN SELECT * FROM secrets",
            &["EXPLAIN on public.secrets"],
        ),
        (
            "EXPLAIN ANALYZE DELETE FROM orders",
            &[
                "DELETE on public.orders without WHERE",
                "EXPLAIN on public.orders",
            ],
        ),
        (
            "EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM secrets",
            &["EXPLAIN on public.secrets", "SELECT on public.secrets"],
        ),
        (
            "EXPLAIN (ANALYZE false) SELECT * FROM secrets",
            &["EXPLAIN on public.secrets"],
        ),
        (
            "PREPARE p AS DELETE FROM secrets WHERE id = $1",
            &["DELETE on public.secrets"],
        ),
        (
            "DECLARE c CURSOR FOR SELECT * FROM secrets",
            &["SELECT on public.secrets"],
        ),
        ("FETCH 10 FROM c", &["SELECT [always]"]),
        ("EXECUTE p(1)", &[]),
    ]);
}

#[test]
fn session_settings_and_code() {
    check(&[
        ("BEGIN", &["TRANSACTION [always]"]),
        ("SAVEPOINT s", &["TRANSACTION [always]"]),
        ("SHOW server_version", &["SESSION [always]"]),
        ("SET application_name = 'x'", &["SESSION [always]"]),
        ("SET LOCAL statement_timeout = '5s'", &["SESSION [always]"]),
        (
            "SET search_path = evil, public",
            &["SESSION [deny: changing search_path]"],
        ),
        (
            "SET SCHEMA 'evil'",
            &["SESSION [deny: changing search_path]"],
        ),
        (
            "SET NAMES 'SJIS'",
            &["SESSION [deny: changing client_encoding]"],
        ),
        ("SET ROLE postgres", &["SESSION [deny: SET ROLE]"]),
        (
            "SET SESSION AUTHORIZATION postgres",
            &["SESSION [deny: SET SESSION AUTHORIZATION]"],
        ),
        (
            "SET standard_conforming_strings = off",
            &["SESSION [deny: changing standard_conforming_strings]"],
        ),
        ("RESET ALL", &["SESSION [always]"]),
        ("SET work_mem = '64MB'", &["SESSION [always]"]),
        ("SET log_statement = 'none'", &["SESSION"]),
        (
            "ALTER SYSTEM SET log_statement = 'none'",
            &["SESSION [deny: ALTER SYSTEM]"],
        ),
        ("LOAD 'auto_explain'", &["CODE [deny: LOAD]"]),
        ("DO $$ BEGIN PERFORM 1; END $$", &["CODE"]),
        ("CALL p(1)", &["CODE", "function p"]),
        ("LISTEN ch", &["SESSION"]),
        ("DISCARD ALL", &["SESSION [always]"]),
    ]);
}

#[test]
fn functions_at_any_depth() {
    check(&[
        (
            "SELECT pg_read_file('/etc/passwd')",
            &["function pg_read_file"],
        ),
        (
            "SELECT pg_catalog.pg_read_file('/etc/passwd')",
            &["function pg_catalog.pg_read_file"],
        ),
        (
            "SELECT * FROM orders WHERE id = (SELECT length(pg_read_file('x')))",
            &[
                "SELECT on public.orders",
                "function length",
                "function pg_read_file",
            ],
        ),
        (
            "SELECT * FROM query_to_xml('select * from secrets', true, true, '')",
            &["function query_to_xml"],
        ),
        // A constant setting name makes set_config a SET (asyncpg sets jit).
        (
            "SELECT set_config('search_path', 'evil', false)",
            &["SESSION [deny: changing search_path]"],
        ),
        (
            "SELECT set_config('SEARCH_PATH', 'evil', false)",
            &["SESSION [deny: changing search_path]"],
        ),
        (
            "SELECT current_setting('jit'), set_config('jit', 'off', false)",
            &["SESSION [always]", "function current_setting"],
        ),
        (
            "SELECT set_config('log_statement', 'none', false)",
            &["SESSION"],
        ),
        // A computed name cannot be judged: the call stays (built-in denied).
        (
            "SELECT set_config(name, 'x', false) FROM settings_to_try",
            &["SELECT on public.settings_to_try", "function set_config"],
        ),
        (
            "SELECT pg_catalog.set_config('role', 'postgres', false)",
            &["SESSION [deny: SET ROLE]"],
        ),
        (
            "SELECT * FROM generate_series(1, 3)",
            &["function generate_series"],
        ),
        (
            "SELECT lower(name) FROM customers ORDER BY upper(name)",
            &[
                "SELECT on public.customers",
                "function lower",
                "function upper",
            ],
        ),
    ]);
}

#[test]
fn lexical_tricks_are_the_parser_s_problem() {
    check(&[
        // Strings and comments hold no statements.
        ("SELECT 'x; DELETE FROM orders'", &[]),
        ("SELECT E'\\'; DELETE FROM orders; --'", &[]),
        ("SELECT $$; DELETE FROM orders; $$", &[]),
        ("SELECT $tag$ $$ DELETE FROM orders $$ $tag$", &[]),
        // PostgreSQL nests block comments: the DELETE is inside the comment.
        ("SELECT 1 /* outer /* inner */ DELETE FROM orders; */", &[]),
        // ... and here it is not.
        (
            "SELECT 1 /* a */; DELETE FROM orders WHERE id = 1",
            &["DELETE on public.orders"],
        ),
        ("SELECT 1; DROP TABLE orders", &["DDL on public.orders"]),
        ("SELECT 1 -- ; DELETE FROM orders", &[]),
    ]);
}

#[test]
fn unparseable_and_unknown_are_errors() {
    assert!(matches!(
        analyze("SELEC 1", Settings::default()),
        Err(AnalyzeError::Parse(_))
    ));
    assert!(matches!(
        analyze("SELECT 'unterminated", Settings::default()),
        Err(AnalyzeError::Parse(_))
    ));
    assert!(matches!(
        analyze("SELECT /* unterminated", Settings::default()),
        Err(AnalyzeError::Parse(_))
    ));
    // Deep nesting never overflows: either the innermost table is found or
    // the statement is refused.
    for depth in [10, 100, 1000] {
        let deep = format!(
            "{}SELECT * FROM secrets{}",
            "SELECT * FROM (".repeat(depth),
            ") s".repeat(depth)
        );
        match analyze(&deep, Settings::default()) {
            Ok(s) => assert!(
                s[0].accesses
                    .iter()
                    .any(|a| a.to_string() == "SELECT on public.secrets"),
                "depth {depth}"
            ),
            Err(_) => assert!(depth > 10, "depth {depth} should analyse"),
        }
    }
    assert_eq!(analyze("", Settings::default()).unwrap(), vec![]);
    assert_eq!(analyze(";;", Settings::default()).unwrap(), vec![]);
}

#[test]
fn pinned_statement_timeout_cannot_be_changed() {
    let s = analyze(
        "SET statement_timeout = 0",
        Settings {
            pin_statement_timeout: true,
        },
    )
    .unwrap();
    assert!(matches!(s[0].accesses[0].fixed, Some(Fixed::Deny(_))));
}

#[test]
fn effects_on_prepared_statements() {
    let s = analyze(
        "PREPARE p AS SELECT 1; EXECUTE p; DEALLOCATE p; DEALLOCATE ALL",
        Settings::default(),
    )
    .unwrap();
    let effects: Vec<_> = s.iter().map(|s| s.effect.clone()).collect();
    assert_eq!(
        effects,
        vec![
            Some(Effect::Prepare("p".into())),
            Some(Effect::Execute("p".into())),
            Some(Effect::Deallocate(Some("p".into()))),
            Some(Effect::Deallocate(None)),
        ]
    );
}

#[test]
fn operators_and_attribute_notation_are_recorded() {
    let s = &analyze(
        "SELECT o.total, (o).audit, s.t.c FROM orders o WHERE a === b AND x = ANY (SELECT 1) ORDER BY y USING <",
        Settings::default(),
    )
    .unwrap()[0];
    let ops: Vec<String> = s
        .accesses
        .iter()
        .filter(|a| matches!(a.target, Target::Operator { .. }))
        .map(|a| a.to_string())
        .collect();
    for op in ["operator ===", "operator =", "operator <"] {
        assert!(ops.contains(&op.to_string()), "{op} missing from {ops:?}");
    }
    assert_eq!(s.attribute_refs, vec!["audit", "c", "t", "total"]);
    let q = &analyze("SELECT 1 OPERATOR(public.===) 1", Settings::default()).unwrap()[0];
    assert!(q
        .accesses
        .iter()
        .any(|a| a.to_string() == "operator public.==="));
}
