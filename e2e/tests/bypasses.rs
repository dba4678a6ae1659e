//! Regression tests for ten ways around pgwarden's policy, masking, approvals and
//! resource limits. Each test first runs the attack straight against PostgreSQL (a
//! trust-auth cluster, as the superuser `app`) and observes the harm — a file read, rows
//! deleted, a raw card number, a setting changed — so the test itself is proven right;
//! then it runs the same messages through `pgwarden run` and asserts the contract.
//! Gateway-side mismatches are collected and reported together, so one run shows
//! every form that still gets through.
//!
//! The hand-written frontend is [`pgwarden_e2e::wire`]: these attacks need exact
//! control of the extended protocol (portals without Execute, pipelines whose middle
//! message the server skips, binary results) and of the startup packet.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use pgwarden_e2e::approvals::request_id_in;
use pgwarden_e2e::wire::{
    bind, bind_params, concat, describe, errors, execute, parameter_status, parse, query,
    query_bytes, rows, sqlstates, sync, tags, Message, Wire,
};
use pgwarden_e2e::{
    libpq_command, policy_with_rules, run_command, run_psql, ApprovalsCli, Endpoint, Gateway,
    PgCluster, UpstreamAuth,
};

// === shared setup ===

/// Tables most tests use. `canary` exists so a smuggled `DROP TABLE canary` shows.
const FIXTURE: &str = r#"
CREATE TABLE orders (id int PRIMARY KEY, customer_id int NOT NULL, total numeric(10,2) NOT NULL, status text NOT NULL DEFAULT 'new');
INSERT INTO orders SELECT g, 1 + g % 3, g * 10, 'new' FROM generate_series(1, 10) g;
CREATE TABLE secrets (id int PRIMARY KEY, value text NOT NULL);
INSERT INTO secrets SELECT g, 'TOP-SECRET-7f3a-' || g FROM generate_series(1, 5) g;
CREATE TABLE canary (id int);
"#;

/// A trust-auth cluster (the hand-written client logs in without a password, directly
/// and through the gateway) holding `fixture`.
fn cluster(fixture: &str) -> PgCluster {
    let pg = PgCluster::builder().auth(UpstreamAuth::Trust).start();
    pg.admin_sql(fixture);
    pg
}

/// A gateway in front of `pg` with `decision` (the `defaultAction:` / `rules:` /
/// `masking:` / `approval:` lines of `spec`, two-space indent).
fn gateway(pg: &PgCluster, decision: &str) -> Gateway {
    // The CLI decides as the user running the tests: an approver.
    let me = pgwarden_e2e::approvals::os_user();
    let decision = decision.replace("[alice]", &format!("[alice, {me}]"));
    Gateway::builder(pg)
        .policy_yaml(policy_with_rules(pg.port(), None, &decision))
        .start()
}

/// e2e/corpus/policy.yaml (default deny, built-in deny list) pointed at `port`.
fn corpus_policy_for(port: u16) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/policy.yaml");
    let text = fs::read_to_string(&path).expect("read corpus policy");
    let from = "    port: 5432\n";
    assert_eq!(text.matches(from).count(), 1, "{from:?} in policy.yaml");
    text.replacen(from, &format!("    port: {port}\n"), 1)
}

/// DELETE on orders waits for a reviewer; fail fast (`wait: 0s`).
const APPROVAL_RULES: &str = "  defaultAction: Deny
  rules:
    - {name: order-deletes, action: RequireApproval, statements: [DELETE], tables: [\"public.orders\"]}
    - {name: app, action: Allow, statements: [SELECT, INSERT, UPDATE, DELETE], tables: [\"public.*\"]}
  approval:
    approvers: {users: [alice]}
    wait: 0s
";

fn orders_count(pg: &PgCluster) -> String {
    pg.admin_sql("SELECT count(*) FROM orders")
}

fn canary_exists(pg: &PgCluster) -> bool {
    pg.admin_sql("SELECT to_regclass('public.canary') IS NOT NULL") == "t"
}

// === checking outcomes ===

/// Gateway-side mismatches, reported together at the end of a test.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, what: &str, problem: impl Into<String>) {
        self.0.push(format!("{what}: {}", problem.into()));
    }

    /// Unless `msgs` hold exactly one ERROR 42501 from pgwarden whose message contains
    /// `needle` (case-insensitive), records why.
    fn refused(&mut self, what: &str, msgs: &[Message], needle: &str) {
        if let Some(p) = refusal_problem(msgs, needle) {
            self.add(what, p);
        }
    }

    /// Unless the session answers `SELECT 1`, records it.
    fn alive(&mut self, what: &str, w: &mut Wire) {
        if w.try_send(&query("SELECT 1")).is_err() {
            self.add(what, "the session is gone (write failed)");
            return;
        }
        let (msgs, closed) = w.until_ready_or_closed();
        if closed || rows(&msgs) != ["1"] {
            self.add(
                what,
                format!(
                    "the session did not answer SELECT 1 afterwards: {}",
                    short(&describe(&msgs))
                ),
            );
        }
    }

    fn check(&mut self, what: &str, ok: bool, problem: impl FnOnce() -> String) {
        if !ok {
            self.add(what, problem());
        }
    }

    fn assert_none(self, finding: &str) {
        assert!(
            self.0.is_empty(),
            "{finding}: {} problem(s) through the gateway:\n  - {}",
            self.0.len(),
            self.0.join("\n  - ")
        );
    }
}

/// Why `msgs` are not exactly one pgwarden refusal (ERROR 42501) naming `needle`.
fn refusal_problem(msgs: &[Message], needle: &str) -> Option<String> {
    let errs = errors(msgs);
    let ok = match errs.as_slice() {
        [e] => {
            let message = e.get(&'M').cloned().unwrap_or_default();
            e.get(&'S').map(String::as_str) == Some("ERROR")
                && e.get(&'C').map(String::as_str) == Some("42501")
                && message.starts_with("pgwarden: ")
                && message.to_lowercase().contains(&needle.to_lowercase())
        }
        _ => false,
    };
    (!ok).then(|| {
        format!(
            "expected one ERROR 42501 from pgwarden naming {needle:?}, got: {}",
            short(&describe(msgs))
        )
    })
}

fn short(text: &str) -> String {
    const MAX: usize = 600;
    if text.len() <= MAX {
        return text.to_string();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &text[..end], text.len())
}

/// Every byte the server sent, lossily as text (to grep for leaked values).
fn text_of(msgs: &[Message]) -> String {
    msgs.iter()
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Rows and SQLSTATEs: what a client learns from one statement.
fn outcome(msgs: &[Message]) -> String {
    format!("rows {:?} errors {:?}", rows(msgs), sqlstates(msgs))
}

fn simple(w: &mut Wire, sql: &str) -> Vec<Message> {
    w.roundtrip(&query(sql), 1)
}

// =====================================================================================
// 1. Attribute notation calls functions
// =====================================================================================

/// Marker in the victim session's last query, visible to pg_stat_get_activity.
const VICTIM_MARKER: &str = "victim-marker-5b1e";

/// One-argument calls in attribute notation, each with what its direct run returns.
const ATTRIBUTE_LEAKS: &[(&str, &str, &str)] = &[
    (
        "SELECT ('/etc/passwd'::text).pg_read_file",
        "pg_read_file",
        "root:x:0:",
    ),
    (
        "SELECT ('SELECT to_tsvector(''simple'', value) FROM secrets'::text).ts_stat",
        "ts_stat",
        "top-secret",
    ),
    (
        "SELECT (NULL::int).pg_stat_get_activity",
        "pg_stat_get_activity",
        VICTIM_MARKER,
    ),
    // A column of a subquery, then attribute notation on it.
    (
        "SELECT (t.p).pg_read_file FROM (SELECT '/etc/passwd'::text AS p) t",
        "pg_read_file",
        "root:x:0:",
    ),
    // The alias of a scalar function in FROM is a value of that scalar type, so
    // `p.pg_read_file` is pg_read_file(p).
    (
        "SELECT p.pg_read_file FROM unnest(ARRAY['/etc/passwd']) AS p",
        "pg_read_file",
        "root:x:0:",
    ),
    (
        "SELECT (ARRAY['/etc/passwd'])[1].PG_READ_BINARY_FILE",
        "pg_read_binary_file",
        // bytea in hex: "root:x:0:"
        "726f6f743a783a303a",
    ),
];

/// Finding 1. PostgreSQL reads `(x).f`, `alias.f` and `(t.col).f` as `f(x)` when `f` is
/// a function of one argument (docs 8.16.5 "Field Selection" / 38.5.2, ParseFuncOrColumn
/// with is_column): a function call that the parse tree shows as a field or column
/// reference. Default arguments fill in (`(pid).pg_terminate_backend` works) and so
/// does a `$1` parameter. Under the default-deny corpus policy every denied function
/// must stay denied in these forms, naming the function.
///
/// Forms that do NOT work on PostgreSQL 15 (so not tested): `t.p.pg_read_file` (three
/// names are schema.table.column: 42P01), and `query_to_xml`/`table_to_xml`-style
/// functions (no one-argument variant exists: 42809).
#[test]
fn attribute_notation_calls_denied_functions() {
    let pg = cluster(FIXTURE);
    let lo_count = || pg.admin_sql("SELECT count(*) FROM pg_largeobject_metadata");
    let mut victim = Wire::login(pg.port(), "victim");
    assert_eq!(
        victim.ok(&format!("SELECT '{VICTIM_MARKER}'")),
        [VICTIM_MARKER]
    );
    let victim_pid = victim.ok("SELECT pg_backend_pid()")[0].clone();
    // Make the marker the victim's last query again.
    victim.ok(&format!("SELECT '{VICTIM_MARKER}'"));

    // (a) Directly: every form runs the function.
    let mut d = Wire::login(pg.port(), "direct attribute notation");
    for (sql, _, harm) in ATTRIBUTE_LEAKS {
        let msgs = simple(&mut d, sql);
        assert!(
            text_of(&msgs).to_lowercase().contains(harm),
            "directly, {sql} should return {harm:?}: {}",
            short(&describe(&msgs))
        );
    }
    let before = lo_count();
    d.ok("SELECT ('/etc/passwd'::text).lo_import");
    assert_ne!(
        lo_count(),
        before,
        "directly, lo_import creates a large object"
    );
    let msgs = d.roundtrip(
        &concat(&[
            parse("", "SELECT ($1::text).pg_read_file"),
            bind_params("", "", &[Some("/etc/passwd")], 0),
            execute(""),
            sync(),
        ]),
        1,
    );
    assert!(
        text_of(&msgs).contains("root:x:0:"),
        "directly, a parameter in attribute notation: {}",
        short(&describe(&msgs))
    );
    // pg_terminate_backend(pid, timeout DEFAULT 0) in attribute notation kills the
    // other session.
    let mut doomed = Wire::login(pg.port(), "doomed");
    let doomed_pid = doomed.ok("SELECT pg_backend_pid()")[0].clone();
    assert_eq!(
        d.ok(&format!("SELECT ({doomed_pid}).pg_terminate_backend")),
        ["t"]
    );
    doomed.try_send(&query("SELECT 1")).ok();
    let (msgs, closed) = doomed.until_ready_or_closed();
    assert!(
        closed && rows(&msgs).is_empty(),
        "directly, the other session is terminated: {}",
        describe(&msgs)
    );

    // (b) Through the gateway.
    let gw = Gateway::builder(&pg)
        .policy_yaml(corpus_policy_for(pg.port()))
        .start();
    let mut p = Problems::default();
    let mut w = Wire::login(gw.port(), "attribute notation through pgwarden");
    for (sql, function, harm) in ATTRIBUTE_LEAKS {
        let msgs = simple(&mut w, sql);
        p.check(sql, !text_of(&msgs).to_lowercase().contains(harm), || {
            format!("LEAKED {harm:?}")
        });
        p.refused(sql, &msgs, function);
        p.alive(sql, &mut w);
    }

    let sql = "SELECT ('/etc/passwd'::text).lo_import";
    let before = lo_count();
    let msgs = simple(&mut w, sql);
    p.check(sql, lo_count() == before, || {
        "a large object was created".into()
    });
    p.refused(sql, &msgs, "lo_import");
    p.alive(sql, &mut w);

    let what = "Parse SELECT ($1::text).pg_read_file, Bind '/etc/passwd'";
    let msgs = w.roundtrip(
        &concat(&[
            parse("", "SELECT ($1::text).pg_read_file"),
            bind_params("", "", &[Some("/etc/passwd")], 0),
            execute(""),
            sync(),
        ]),
        1,
    );
    p.check(what, !text_of(&msgs).contains("root:x:0:"), || {
        "LEAKED /etc/passwd".into()
    });
    p.refused(what, &msgs, "pg_read_file");
    p.alive(what, &mut w);

    let sql = format!("SELECT ({victim_pid}).pg_terminate_backend");
    let msgs = simple(&mut w, &sql);
    p.refused(&sql, &msgs, "pg_terminate_backend");
    p.alive(&sql, &mut w);
    p.alive(&format!("{sql}: the victim session"), &mut victim);

    gw.assert_running();
    p.assert_none("finding 1 (attribute notation)");
}

// =====================================================================================
// 2. Settings changed behind the gateway
// =====================================================================================

/// Read by pgwarden with standard_conforming_strings on: one string literal
/// (`x\';DROP TABLE canary;--`). Read by a server with it off: `\'` is a quote, the
/// literal ends after `x'`, and `DROP TABLE canary` runs.
const SCS_DESYNC: &str = "SELECT 'x\\'';DROP TABLE canary;--'";

/// Valid UTF-8 (`ā` is C4 81) that pgwarden reads as one E'' literal. Read as SJIS,
/// C4 is a half-width katakana and 81 5C a double-byte character that swallows the
/// backslash, so `'` ends the literal and `DROP TABLE canary` runs.
const SJIS_DESYNC: &[u8] = b"SELECT E'\xc4\x81\\';DROP TABLE canary;--'";

/// Read by pgwarden with standard_conforming_strings on: a SELECT of one literal. Read
/// with it off: a literal `x'`, then `pg_read_file('/etc/passwd')`. One statement, so
/// it also works in a Parse message.
const SCS_DESYNC_ONE_STATEMENT: &str = "SELECT 'x\\'', pg_read_file('/etc/passwd') --'";

/// A mid-session change by `flip()` (finding 2): `first` is written, then, after its
/// answer, `then` (if any); `answers` ReadyForQuery messages are expected in all.
struct FlipSequence {
    what: &'static str,
    first: Vec<u8>,
    then: Option<Vec<u8>>,
    answers: usize,
}

fn flip_sequences() -> Vec<FlipSequence> {
    vec![
        FlipSequence {
            what: "SELECT flip(), then the desync",
            first: query("SELECT flip()"),
            then: Some(query(SCS_DESYNC)),
            answers: 2,
        },
        FlipSequence {
            what: "SELECT flip() with the desync pipelined behind it",
            first: concat(&[query("SELECT flip()"), query(SCS_DESYNC)]),
            then: None,
            answers: 2,
        },
        FlipSequence {
            what: "one extended pipeline: flip(), then a one-statement desync",
            first: concat(&[
                parse("", "SELECT flip()"),
                bind("", ""),
                execute(""),
                parse("", SCS_DESYNC_ONE_STATEMENT),
                bind("", ""),
                execute(""),
                sync(),
            ]),
            then: None,
            answers: 1,
        },
    ]
}

/// Finding 2. Settings that change how the server reads SQL text
/// (standard_conforming_strings, client_encoding) can be changed without a SET through
/// the gateway: per database or role (`ALTER DATABASE/ROLE ... SET`, applied at the
/// next login) or by a function body (`set_config(..., false)` inside an allowed user
/// function). Then pgwarden and the server read the same bytes differently, and a
/// statement pgwarden judged as one harmless literal drops a table. PostgreSQL reports
/// both settings with ParameterStatus (GUC_REPORT), so the gateway can see them change.
/// Contract: sessions through the gateway keep `standard_conforming_strings = on` and
/// `client_encoding = UTF8`, or are refused with a FATAL naming the setting; a change
/// reported mid-session ends the session with such a FATAL before anything else runs;
/// inside one request (where the server reports the change only at its end) a later
/// text that the change could make the server read differently is refused instead.
#[test]
fn server_settings_changed_behind_the_gateway() {
    let pg = cluster(&format!(
        "{FIXTURE}\nCREATE FUNCTION flip() RETURNS void LANGUAGE sql AS \
         $$ SELECT set_config('standard_conforming_strings', 'off', false) $$;"
    ));
    let restore_canary = || {
        if !canary_exists(&pg) {
            pg.admin_sql("CREATE TABLE canary (id int)");
        }
    };
    let scopes = ["ALTER DATABASE shop", "ALTER ROLE app"];

    // (a) Directly.
    for scope in scopes {
        pg.admin_sql(&format!("{scope} SET standard_conforming_strings = off"));
        let mut d = Wire::login(pg.port(), "direct, standard_conforming_strings off");
        assert_eq!(d.ok("SHOW standard_conforming_strings"), ["off"], "{scope}");
        simple(&mut d, SCS_DESYNC);
        assert!(
            !canary_exists(&pg),
            "{scope}: directly, the desync drops canary"
        );
        restore_canary();
        pg.admin_sql(&format!("{scope} RESET standard_conforming_strings"));

        pg.admin_sql(&format!("{scope} SET client_encoding = 'SJIS'"));
        let (mut d, msgs, _) = Wire::try_login(pg.port(), "direct, SJIS", &[]);
        assert_eq!(
            parameter_status(&msgs, "client_encoding").as_deref(),
            Some("SJIS"),
            "{scope}"
        );
        d.roundtrip(&query_bytes(SJIS_DESYNC), 1);
        assert!(
            !canary_exists(&pg),
            "{scope}: directly, the SJIS desync drops canary"
        );
        restore_canary();
        pg.admin_sql(&format!("{scope} RESET client_encoding"));
    }
    for seq in flip_sequences() {
        let what = seq.what;
        let mut d = Wire::login(pg.port(), what);
        d.send(&seq.first);
        let mut seen = d.until_ready();
        assert_eq!(
            parameter_status(&seen, "standard_conforming_strings").as_deref(),
            Some("off"),
            "directly, {what}: the server reports the change: {}",
            describe(&seen)
        );
        if let Some(then) = &seq.then {
            d.send(then);
        }
        for _ in 1..seq.answers {
            seen.extend(d.until_ready());
        }
        assert!(
            !canary_exists(&pg) || text_of(&seen).contains("root:x:0:"),
            "directly, {what}: the desync drops canary or reads /etc/passwd: {}",
            short(&describe(&seen))
        );
        restore_canary();
    }

    // (b) Through the gateway.
    let gw = gateway(
        &pg,
        "  defaultAction: Deny
  rules:
    - {name: flip, action: Allow, functions: [\"flip\"]}
    - {name: app, action: Allow, statements: [SELECT, INSERT, UPDATE, DELETE], tables: [\"public.*\"]}
",
    );
    let mut p = Problems::default();
    for scope in scopes {
        for (setting, value, safe, desync) in [
            (
                "standard_conforming_strings",
                "off",
                "on",
                SCS_DESYNC.as_bytes(),
            ),
            ("client_encoding", "'SJIS'", "UTF8", SJIS_DESYNC),
        ] {
            let what = format!("{scope} SET {setting} = {value}");
            pg.admin_sql(&what);
            let (mut w, msgs, closed) = Wire::try_login(gw.port(), &what, &[]);
            let fatal = errors(&msgs)
                .into_iter()
                .find(|e| e.get(&'S').map(String::as_str) == Some("FATAL"));
            match fatal {
                Some(e) => p.check(
                    &what,
                    e.get(&'M').is_some_and(|m| m.contains(setting)),
                    || format!("the FATAL does not name {setting}: {e:?}"),
                ),
                None if closed => p.add(
                    &what,
                    format!("login closed without a FATAL: {}", describe(&msgs)),
                ),
                None => {
                    let reported = parameter_status(&msgs, setting);
                    p.check(&what, reported.as_deref() == Some(safe), || {
                        format!("the session starts with {setting} = {reported:?}")
                    });
                    let shown = simple(&mut w, &format!("SHOW {setting}"));
                    p.check(&what, rows(&shown) == [safe], || {
                        format!("SHOW {setting}: {}", describe(&shown))
                    });
                    let msgs = w.roundtrip(&query_bytes(desync), 1);
                    p.check(&what, canary_exists(&pg), || {
                        format!(
                            "THE DESYNC DROPPED canary through the gateway: {}",
                            describe(&msgs)
                        )
                    });
                    p.alive(&what, &mut w);
                }
            }
            restore_canary();
            pg.admin_sql(&format!("{scope} RESET {setting}"));
        }
    }

    // (c) Mid-session: flip() alone, then the desync; the desync pipelined right behind
    // it; and in one extended-protocol pipeline.
    for seq in flip_sequences() {
        let what = seq.what;
        let mut w = Wire::login(gw.port(), what);
        w.set_read_timeout(Duration::from_secs(10));
        w.send(&seq.first);
        let (mut seen, mut closed) = w.until_ready_or_closed();
        if let (false, Some(then)) = (closed, &seq.then) {
            let _ = w.try_send(then);
        }
        for _ in 1..seq.answers {
            if closed {
                break;
            }
            let (msgs, c) = w.until_ready_or_closed();
            seen.extend(msgs);
            closed = c;
        }
        if !closed {
            // The FATAL may follow the last answer.
            w.set_read_timeout(Duration::from_secs(2));
            loop {
                match w.try_read() {
                    Ok(Some(m)) => seen.push(m),
                    Ok(None) => {
                        closed = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        let fatal = errors(&seen).into_iter().find(|e| {
            e.get(&'S').map(String::as_str) == Some("FATAL")
                && e.get(&'M')
                    .is_some_and(|m| m.contains("standard_conforming_strings"))
        });
        if fatal.is_some() {
            p.check(what, closed, || "the session was not ended".into());
        } else {
            // The other safe outcome: the desync was refused before it ran,
            // and the refusal's error rolled the change back (set_config in a
            // failed transaction), so the session may go on: its server
            // still reads backslashes as the gateway does.
            let refused = errors(&seen)
                .iter()
                .any(|e| e.get(&'C').map(String::as_str) == Some("42501"));
            p.check(what, refused && !closed, || {
                format!(
                    "neither a FATAL naming standard_conforming_strings nor a refusal of the desync: {}",
                    short(&describe(&seen))
                )
            });
            if refused && !closed {
                let shown = text_of(&simple(&mut w, "SHOW standard_conforming_strings"));
                p.check(what, shown.contains("on") && !shown.contains("off"), || {
                    format!("the session goes on with standard_conforming_strings: {shown}")
                });
            }
        }
        p.check(what, canary_exists(&pg), || {
            format!("THE DESYNC DROPPED canary: {}", short(&describe(&seen)))
        });
        p.check(what, !text_of(&seen).contains("root:x:0:"), || {
            format!("THE DESYNC READ /etc/passwd: {}", short(&describe(&seen)))
        });
        restore_canary();
    }

    gw.assert_running();
    p.assert_none("finding 2 (settings changed behind the gateway)");
}

// =====================================================================================
// 3. Whole rows of a masked table through attribute notation
// =====================================================================================

const CARD: &str = "4929123456781234";
const EMAIL: &str = "ann.secret@example.com";
const SSN: &str = "078-05-1120";

const MASKED_FIXTURE: &str = "
CREATE TABLE customers (id int PRIMARY KEY, name text, card_number text, email text, ssn text);
INSERT INTO customers VALUES (1, 'Ann', '4929123456781234', 'ann.secret@example.com', '078-05-1120');
CREATE VIEW customers_view AS SELECT * FROM customers;
";

const MASKING_RULES: &str = "  defaultAction: Deny
  rules:
    - {name: read-customers, action: Allow, statements: [SELECT], tables: [\"public.customers\", \"public.customers_view\"]}
  masking:
    - {columns: [\"public.customers.card_number\"], strategy: Partial, keepLast: 4}
    - {columns: [\"public.customers.email\"], strategy: Email}
    - {columns: [\"public.customers.ssn\"], strategy: Redact}
";

/// Whole-row functions in attribute notation: `c.f` is `f(c)` for a row `c`.
const WHOLE_ROW_ATTRIBUTES: &[&str] = &[
    "SELECT c.row_to_json FROM customers c",
    "SELECT customers.to_jsonb FROM customers",
    "SELECT c.record_out FROM customers c",
    "SELECT c.to_json FROM customers_view c",
    "SELECT public.customers.row_to_json FROM customers",
    "SELECT shop.public.customers.to_json FROM customers",
    "SELECT c.row_to_json->>'card_number', c.to_jsonb->>'email' FROM customers c",
    "SELECT c.quote_literal FROM customers c",
    "SELECT c.concat FROM customers c",
    "SELECT c.json_agg FROM customers c",
    "SELECT c.record_send FROM customers c",
];

/// The raw values, and their hex (bytea output, binary record_send).
fn raw_values() -> Vec<String> {
    let mut v: Vec<String> = [CARD, EMAIL, SSN, "ann.secret"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for s in [CARD, EMAIL, SSN] {
        v.push(s.bytes().map(|b| format!("{b:02x}")).collect());
    }
    v
}

fn raw_value_in(text: &str) -> Option<String> {
    let lower = text.to_lowercase();
    raw_values()
        .into_iter()
        .find(|r| lower.contains(r.as_str()))
}

/// Finding 3. `c.row_to_json` is `row_to_json(c)` (attribute notation, as in the first
/// finding) and so are `t.to_jsonb`, `c.record_out`, `schema.table.f`, even aggregates
/// (`c.json_agg`) and variadic "any" functions (`c.concat`): a whole row of a masked
/// table, computed into one value, that the statement shows only as a column
/// reference. Masking must see the whole-row use: every such value is masked (or the
/// statement refused with 42501) — never the raw card number, email or SSN, in text or
/// binary results.
#[test]
fn whole_row_of_masked_table_through_attribute_notation() {
    let pg = cluster(MASKED_FIXTURE);

    // (a) Directly: every form returns the raw values.
    let mut d = Wire::login(pg.port(), "direct whole rows");
    for sql in WHOLE_ROW_ATTRIBUTES {
        let msgs = simple(&mut d, sql);
        assert!(
            raw_value_in(&text_of(&msgs)).is_some(),
            "directly, {sql} returns raw values: {}",
            short(&describe(&msgs))
        );
    }

    // (b) Through the gateway, text results.
    let gw = gateway(&pg, MASKING_RULES);
    let mut p = Problems::default();
    let mut w = Wire::login(gw.port(), "whole rows through pgwarden");
    for sql in WHOLE_ROW_ATTRIBUTES {
        let msgs = simple(&mut w, sql);
        check_masked_or_refused(&mut p, sql, &msgs);
        p.alive(sql, &mut w);
    }
    // Binary results (protocol level): jsonb keeps its version byte, then text.
    for sql in [
        "SELECT c.to_jsonb FROM customers c",
        "SELECT c.row_to_json FROM customers c",
        "SELECT c.record_send FROM customers c",
    ] {
        let what = format!("{sql} (binary results)");
        let msgs = w.roundtrip(
            &concat(&[
                parse("", sql),
                bind_params("", "", &[], 1),
                execute(""),
                sync(),
            ]),
            1,
        );
        check_masked_or_refused(&mut p, &what, &msgs);
        p.alive(&what, &mut w);
    }
    // And a real driver asking for binary results (psycopg 3).
    let psycopg = psycopg_binary(
        &gw,
        &[
            "SELECT c.to_jsonb FROM customers c",
            "SELECT c.row_to_json FROM customers c",
        ],
    );
    if let Some(raw) = raw_value_in(&psycopg) {
        p.add(
            "psycopg binary",
            format!("RAW VALUE {raw:?} came back:\n{psycopg}"),
        );
    }
    for line in psycopg.lines().filter(|l| l.starts_with("ERR ")) {
        p.check("psycopg binary", line.starts_with("ERR 42501 "), || {
            format!("an error other than 42501: {line}")
        });
    }
    p.check("psycopg binary", raw_value_in(&gw.logs()).is_none(), || {
        "the gateway log holds a raw value".into()
    });

    gw.assert_running();
    p.assert_none("finding 3 (whole rows of a masked table)");
}

fn check_masked_or_refused(p: &mut Problems, what: &str, msgs: &[Message]) {
    if let Some(raw) = raw_value_in(&text_of(msgs)) {
        p.add(
            what,
            format!("RAW VALUE {raw:?} came back: {}", short(&describe(msgs))),
        );
    }
    if !errors(msgs).is_empty() {
        if let Some(problem) = refusal_problem(msgs, "") {
            p.add(what, problem);
        }
    }
}

fn python() -> String {
    std::env::var("PGWARDEN_E2E_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs each statement with a psycopg 3 binary cursor through `gw`; one line per
/// statement: `OK <rows>` or `ERR <sqlstate> <message>`.
fn psycopg_binary(gw: &Gateway, statements: &[&str]) -> String {
    const SCRIPT: &str = r#"
import sys, psycopg
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    for sql in sys.argv[2:]:
        try:
            cur = conn.cursor(binary=True)
            cur.execute(sql)
            print("OK", repr(cur.fetchall()))
        except psycopg.Error as e:
            print("ERR", e.sqlstate, str(e).replace("\n", " "))
"#;
    let mut cmd = libpq_command(&python(), &gw.env());
    cmd.arg("-c")
        .arg(SCRIPT)
        .arg(gw.conninfo())
        .args(statements);
    let out = run_command(&mut cmd, None, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "psycopg script failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

// =====================================================================================
// 4. A held statement run through SQL FETCH/MOVE on its protocol portal
// =====================================================================================

/// BEGIN, then Parse + Bind of `DELETE FROM orders RETURNING id` into portal p1
/// (statement `stmt`), Sync without Execute.
fn bind_delete_portal(w: &mut Wire, stmt: &str) -> Vec<Message> {
    w.ok("BEGIN");
    w.roundtrip(
        &concat(&[
            parse(stmt, "DELETE FROM orders RETURNING id"),
            bind("p1", stmt),
            sync(),
        ]),
        1,
    )
}

/// Finding 4. A portal created by Bind lives until the end of the transaction, and SQL
/// `FETCH`/`MOVE` can run any portal of the session, including protocol-level ones
/// (PerformPortalFetch fills a RETURNING portal's store by running the statement). A
/// DELETE that needs approval is only held at Execute, so Parse + Bind + Sync and then
/// `FETCH ALL FROM p1` (or `MOVE ALL IN p1`) deletes every row without a reviewer.
/// Contract: FETCH/MOVE of such a portal is refused (42501) and nothing is deleted.
#[test]
fn sql_fetch_and_move_run_a_held_portal() {
    let pg = cluster(FIXTURE);
    let refill = || {
        pg.admin_sql(
            "INSERT INTO orders SELECT g, 1 + g % 3, g * 10, 'new' FROM generate_series(1, 10) g \
             ON CONFLICT DO NOTHING",
        )
    };
    let runs = [
        ("d", "FETCH ALL FROM p1"),
        ("", "MOVE ALL IN p1"),
        ("", "FETCH FORWARD 1 FROM p1"),
    ];

    // (a) Directly: FETCH/MOVE run the DELETE; COMMIT makes it stick.
    for (stmt, fetch) in runs {
        let mut d = Wire::login(pg.port(), "direct portal");
        let msgs = bind_delete_portal(&mut d, stmt);
        assert_eq!(describe(&msgs), "1 2 Z(T)", "directly, {fetch}");
        let msgs = simple(&mut d, fetch);
        assert!(
            errors(&msgs).is_empty(),
            "directly {fetch}: {}",
            describe(&msgs)
        );
        d.ok("COMMIT");
        assert_eq!(
            orders_count(&pg),
            "0",
            "directly, {fetch} deleted every row"
        );
        refill();
    }

    // (b) Through the gateway.
    let gw = gateway(&pg, APPROVAL_RULES);
    let mut p = Problems::default();
    for (stmt, fetch) in runs {
        let what = format!("Parse {stmt:?} + Bind p1 + Sync, then {fetch}");
        let mut w = Wire::login(gw.port(), &what);
        let prepared = bind_delete_portal(&mut w, stmt);
        let msgs = simple(&mut w, fetch);
        p.check(&what, rows(&msgs).is_empty(), || {
            format!("the DELETE's rows came back: {}", short(&describe(&msgs)))
        });
        if errors(&prepared).is_empty() {
            p.refused(&what, &msgs, "");
        } else {
            // Refusing at Parse/Bind is fine too; then FETCH finds no portal.
            p.check(&what, !errors(&msgs).is_empty(), || {
                format!("{fetch} succeeded: {}", describe(&msgs))
            });
        }
        simple(&mut w, "COMMIT");
        p.check(&what, orders_count(&pg) == "10", || {
            format!("ROWS DELETED: {} left", orders_count(&pg))
        });
        p.alive(&what, &mut w);
        refill();
    }

    gw.assert_running();
    p.assert_none("finding 4 (FETCH/MOVE of a held portal)");
}

// =====================================================================================
// 5. A failed PREPARE/Parse must not make a name runnable
// =====================================================================================

/// How a harmless (re)definition of a name that holds a held DELETE fails, and how
/// the name is then run.
struct FailedPrepare {
    what: &'static str,
    /// Statement name the DELETE is Parsed under first.
    name: &'static str,
    /// Messages that try (and fail) to define `name` as something harmless.
    failing: fn() -> Vec<Vec<u8>>,
    /// SQLSTATE the failing step gets from the server (directly).
    failing_code: &'static str,
    /// Messages that run `name`.
    run: fn() -> Vec<u8>,
}

fn execute_p() -> Vec<u8> {
    query("EXECUTE p")
}

fn bind_execute(name: &str) -> Vec<u8> {
    concat(&[bind("", name), execute(""), sync()])
}

const FAILED_PREPARES: &[FailedPrepare] = &[
    FailedPrepare {
        what: "PREPARE p AS SELECT 1 while p exists (42P05)",
        name: "p",
        failing: || vec![query("PREPARE p AS SELECT 1")],
        failing_code: "42P05",
        run: execute_p,
    },
    FailedPrepare {
        what: "PREPARE p inside an aborted transaction (25P02), ROLLBACK",
        name: "p",
        failing: || {
            vec![
                query("BEGIN; SELECT 1/0;"),
                query("PREPARE p AS SELECT 1"),
                query("ROLLBACK"),
            ]
        },
        failing_code: "22012",
        run: execute_p,
    },
    FailedPrepare {
        what: "SELECT 1/0; PREPARE p AS SELECT 1 (one query string)",
        name: "p",
        failing: || vec![query("SELECT 1/0; PREPARE p AS SELECT 1")],
        failing_code: "22012",
        run: execute_p,
    },
    FailedPrepare {
        what: "pipeline [Parse x = missing table, Parse p = SELECT 1] (p skipped)",
        name: "p",
        failing: || {
            vec![concat(&[
                parse("x", "SELECT * FROM no_such_table"),
                parse("p", "SELECT 1"),
                sync(),
            ])]
        },
        failing_code: "42P01",
        run: || bind_execute("p"),
    },
    FailedPrepare {
        what: "pipeline [Parse x = garbage, Parse p = SELECT 1] (p skipped)",
        name: "p",
        failing: || {
            vec![concat(&[
                parse("x", "SELEC 1"),
                parse("p", "SELECT 1"),
                sync(),
            ])]
        },
        failing_code: "42601",
        run: || bind_execute("p"),
    },
    FailedPrepare {
        what: "unnamed: pipeline [Parse x = garbage, Parse \"\" = SELECT 1]",
        name: "",
        failing: || {
            vec![concat(&[
                parse("x", "SELEC 1"),
                parse("", "SELECT 1"),
                sync(),
            ])]
        },
        failing_code: "42601",
        run: || bind_execute(""),
    },
    FailedPrepare {
        what: "unnamed: pipeline [Parse x = missing table, Parse \"\" = SELECT 1]",
        name: "",
        failing: || {
            vec![concat(&[
                parse("x", "SELECT * FROM no_such_table"),
                parse("", "SELECT 1"),
                sync(),
            ])]
        },
        failing_code: "42P01",
        run: || bind_execute(""),
    },
];

/// Parse `name` = `DELETE FROM orders` (needs approval: pgwarden holds it at Execute),
/// then the failing steps; returns the replies to the steps.
fn define_then_fail(w: &mut Wire, case: &FailedPrepare) -> (Vec<Message>, Vec<Message>) {
    let parsed = w.roundtrip(
        &concat(&[parse(case.name, "DELETE FROM orders"), sync()]),
        1,
    );
    let mut failed = Vec::new();
    for step in (case.failing)() {
        failed.extend(w.roundtrip(&step, 1));
    }
    (parsed, failed)
}

/// Finding 5. PostgreSQL does not (re)define a prepared statement when PREPARE or Parse
/// fails: a duplicate name (42P05), an aborted transaction (25P02), an earlier error in
/// the same query string, or an earlier error in the same pipeline (the server skips to
/// Sync, so a later Parse never happens). The name keeps its old statement — here a
/// DELETE that needs approval. A gateway that records "p is SELECT 1" when it forwards
/// the PREPARE/Parse, rather than when the server confirms it, then lets `EXECUTE p` /
/// Bind+Execute run the DELETE without a reviewer. The unnamed statement is the same:
/// it survives Sync and is only replaced by a Parse that succeeds.
/// Contract: the server's own error reaches the client, and running the name afterwards
/// is refused (42501: held with `wait: 0s`), deleting nothing.
#[test]
fn failed_prepare_does_not_make_a_name_runnable() {
    let pg = cluster(FIXTURE);
    let refill = || {
        pg.admin_sql(
            "INSERT INTO orders SELECT g, 1 + g % 3, g * 10, 'new' FROM generate_series(1, 10) g \
             ON CONFLICT DO NOTHING",
        )
    };

    // (a) Directly: the name still holds the DELETE, and running it deletes.
    for case in FAILED_PREPARES {
        let mut d = Wire::login(pg.port(), case.what);
        let (parsed, failed) = define_then_fail(&mut d, case);
        assert_eq!(describe(&parsed), "1 Z(I)", "directly, {}", case.what);
        assert_eq!(
            sqlstates(&failed).first().map(String::as_str),
            Some(case.failing_code),
            "directly, {}: {}",
            case.what,
            describe(&failed)
        );
        let msgs = d.roundtrip(&(case.run)(), 1);
        assert_eq!(
            tags(&msgs),
            ["DELETE 10"],
            "directly, {}: {}",
            case.what,
            describe(&msgs)
        );
        refill();
    }

    // (b) Through the gateway.
    let gw = gateway(&pg, APPROVAL_RULES);
    let mut p = Problems::default();
    for case in FAILED_PREPARES {
        let mut w = Wire::login(gw.port(), case.what);
        let (parsed, failed) = define_then_fail(&mut w, case);
        p.check(case.what, errors(&parsed).is_empty(), || {
            format!("Parse of the DELETE was refused: {}", describe(&parsed))
        });
        if case.failing_code == "42P05" {
            // The server's own error reaches the client.
            p.check(
                case.what,
                sqlstates(&failed).first().map(String::as_str) == Some("42P05"),
                || format!("expected the server's 42P05: {}", describe(&failed)),
            );
        }
        let msgs = w.roundtrip(&(case.run)(), 1);
        p.check(case.what, orders_count(&pg) == "10", || {
            format!("ROWS DELETED: {}", describe(&msgs))
        });
        p.refused(case.what, &msgs, "");
        p.alive(case.what, &mut w);
        refill();
    }

    gw.assert_running();
    p.assert_none("finding 5 (failed PREPARE/Parse)");
}

// =====================================================================================
// 6. One statement must not eat gigabytes
// =====================================================================================

/// `SELECT 1,1,...` of about `bytes` bytes.
fn wide_select(bytes: usize) -> String {
    let mut sql = String::from("SELECT 1");
    while sql.len() < bytes {
        sql.push_str(",1");
    }
    sql
}

const PEAK_RSS_LIMIT_KIB: u64 = 150 * 1024;
/// How long a refusal of a huge statement may take.
const QUICK: Duration = Duration::from_secs(5);

/// Finding 6. pgwarden parses every statement into a tree before judging it; a
/// statement of a megabyte of `1,1,1,...` is cheap for PostgreSQL (it refuses more than
/// 1664 target entries at once, 54011) but builds a huge parse tree in the gateway:
/// memory for gigabytes and seconds of CPU on a runtime other sessions share. Contract:
/// such a statement is refused quickly with ERROR 54000 whose message says it is too
/// large/complex to analyse and names the limit (a number), the gateway's peak RSS stays
/// under 150 MiB, other sessions keep answering within 1 s meanwhile, and a large but
/// sane statement (1000 rows of VALUES, ~60 KB) is still allowed.
#[test]
fn huge_statement_is_refused_cheaply() {
    let pg = cluster(FIXTURE);
    let sizes = [600 * 1024, 1200 * 1024];

    // (a) Directly: PostgreSQL answers at once.
    let mut d = Wire::login(pg.port(), "direct huge statement");
    for size in sizes {
        let started = Instant::now();
        let msgs = d.roundtrip(&query(&wide_select(size)), 1);
        assert_eq!(sqlstates(&msgs), ["54011"], "directly: {}", describe(&msgs));
        assert!(
            started.elapsed() < QUICK,
            "directly, {size} bytes took {:?}",
            started.elapsed()
        );
    }

    // (b) Through the gateway (default policy: INSERT on public.* allowed).
    let gw = Gateway::start(&pg);
    let mut p = Problems::default();
    let stop = Arc::new(AtomicBool::new(false));
    let probe = {
        let stop = Arc::clone(&stop);
        let mut w = Wire::login(gw.port(), "probe session");
        w.set_read_timeout(Duration::from_secs(60));
        thread::spawn(move || {
            let mut slowest = Duration::ZERO;
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                w.send(&query("SELECT 1"));
                let (msgs, closed) = w.until_ready_or_closed();
                assert!(
                    !closed && rows(&msgs) == ["1"],
                    "probe: {}",
                    describe(&msgs)
                );
                slowest = slowest.max(started.elapsed());
                n += 1;
                thread::sleep(Duration::from_millis(20));
            }
            (n, slowest)
        })
    };
    let mut w = Wire::login(gw.port(), "huge statement through pgwarden");
    w.set_read_timeout(Duration::from_secs(120));
    for size in sizes {
        let what = format!("SELECT 1,1,... of {} KiB", size / 1024);
        let started = Instant::now();
        let msgs = w.roundtrip(&query(&wide_select(size)), 1);
        let took = started.elapsed();
        eprintln!("{what}: {took:?}: {}", short(&describe(&msgs)));
        let errs = errors(&msgs);
        let ok = match errs.as_slice() {
            [e] => {
                let m = e.get(&'M').cloned().unwrap_or_default().to_lowercase();
                e.get(&'C').map(String::as_str) == Some("54000")
                    && (m.contains("too large") || m.contains("too complex"))
                    && m.chars().any(|c| c.is_ascii_digit())
            }
            _ => false,
        };
        p.check(&what, ok, || {
            format!(
                "expected ERROR 54000 (too large/complex to analyse, naming the limit), got: {}",
                short(&describe(&msgs))
            )
        });
        p.check(&what, took < QUICK, || format!("the answer took {took:?}"));
        p.alive(&what, &mut w);
    }
    stop.store(true, Ordering::SeqCst);
    match probe.join() {
        Ok((n, slowest)) => {
            eprintln!("probe session: {n} round trips, slowest {slowest:?}");
            p.check("other session", slowest < Duration::from_secs(1), || {
            format!("a SELECT 1 took {slowest:?} while the big statements were handled ({n} round trips)")
        })
        }
        Err(_) => p.add(
            "other session",
            "the probe session failed (see its panic above)",
        ),
    }
    let peak = gw.peak_rss_kib();
    eprintln!("gateway peak RSS: {} MiB", peak / 1024);
    p.check("peak RSS", peak < PEAK_RSS_LIMIT_KIB, || {
        format!(
            "the gateway's peak RSS is {} MiB (limit {} MiB)",
            peak / 1024,
            PEAK_RSS_LIMIT_KIB / 1024
        )
    });

    // A large but sane statement still works.
    let values: Vec<String> = (1001..=2000)
        .map(|i| {
            format!(
                "({i}, {}, {i}.50, 'bulk insert, row {i} of the sanity check')",
                i % 7
            )
        })
        .collect();
    let insert = format!(
        "INSERT INTO orders (id, customer_id, total, status) VALUES {}",
        values.join(", ")
    );
    assert!(insert.len() > 55_000, "{}", insert.len());
    let msgs = w.roundtrip(&query(&insert), 1);
    p.check(
        "INSERT of 1000 rows",
        tags(&msgs) == ["INSERT 0 1000"],
        || format!("{} bytes: {}", insert.len(), short(&describe(&msgs))),
    );

    gw.assert_running();
    p.assert_none("finding 6 (huge statements)");
}

// =====================================================================================
// 7. inPredicates: Deny, every predicate form
// =====================================================================================

/// Ann's card starts 4929, Bob's 5500, Cy's 4111: card order is ids 3, 1, 2.
const PREDICATE_FIXTURE: &str = "
CREATE TABLE customers (id int PRIMARY KEY, name text, card_number text);
INSERT INTO customers VALUES (1, 'Ann', '4929123456781234'), (2, 'Bob', '5500000000000004'),
                             (3, 'Cy', '4111111111111111');
";

/// Statements that test `{p}` against card numbers; run with a prefix that matches
/// (4929) and one that does not (6011), the results differ.
const PREFIX_ORACLES: &[&str] = &[
    "SELECT s.id FROM (SELECT id, card_number AS x FROM customers) s WHERE x LIKE '{p}%'",
    "SELECT c.id FROM customers c CROSS JOIN LATERAL (SELECT c.card_number AS x) l WHERE l.x LIKE '{p}%'",
    "WITH s AS (SELECT id, card_number AS x FROM customers) SELECT id FROM s WHERE x LIKE '{p}%'",
    "SELECT a.id FROM (SELECT id, card_number AS x FROM customers) a JOIN (SELECT '{p}' AS pre) b ON a.x LIKE b.pre || '%'",
    "SELECT CASE WHEN card_number LIKE '{p}%' THEN 1/(id-id) ELSE 1 END FROM customers",
    "SELECT id FROM customers LIMIT CASE WHEN (SELECT card_number FROM customers WHERE id=1) LIKE '{p}%' THEN 1 ELSE 0 END",
    "SELECT id FROM customers c WHERE c::text LIKE '%{p}%'",
    "SELECT id FROM customers c WHERE c.row_to_json->>'card_number' LIKE '{p}%'",
];

/// Statements whose row order is the card numbers' order (ids 3, 1, 2).
const ORDER_ORACLES: &[&str] = &[
    "SELECT id, card_number AS x FROM customers ORDER BY x",
    "SELECT id, card_number FROM customers ORDER BY 2",
    "SELECT id FROM (SELECT id, card_number AS x FROM customers) s ORDER BY x",
    "SELECT id, row_number() OVER (ORDER BY x) FROM (SELECT id, card_number AS x FROM customers) s ORDER BY 2",
];

/// Finding 7. `inPredicates: Deny` refuses statements that use a masked column in WHERE,
/// JOIN, ORDER BY, ... — but a predicate can reach the column under another name (a
/// subquery/CTE/LATERAL alias, an output-column alias or position in ORDER BY, a whole
/// row cast to text or turned into JSON) or outside a predicate clause (a CASE in the
/// select list whose error is the answer, a LIMIT computed from it). Each form tells a
/// card prefix (or the card order) apart while the card column itself comes back
/// masked. Contract: all refused with 42501, the message mentioning inPredicates.
#[test]
fn in_predicates_deny_covers_every_predicate_form() {
    let pg = cluster(PREDICATE_FIXTURE);

    // (a) Directly: each form distinguishes a matching prefix from one that does not
    // match, or returns ids in card order.
    let mut d = Wire::login(pg.port(), "direct predicate oracles");
    for template in PREFIX_ORACLES {
        let hit = outcome(&simple(&mut d, &template.replace("{p}", "4929")));
        let miss = outcome(&simple(&mut d, &template.replace("{p}", "6011")));
        assert_ne!(hit, miss, "directly, {template} tells prefixes apart");
    }
    for sql in ORDER_ORACLES {
        assert_eq!(d.ok(sql), ["3", "1", "2"], "directly, {sql} sorts by card");
    }

    // (b) Through the gateway.
    let gw = gateway(
        &pg,
        "  defaultAction: Deny
  rules:
    - {name: read-customers, action: Allow, statements: [SELECT], tables: [\"public.customers\"]}
  masking:
    - {columns: [\"public.customers.card_number\"], strategy: Partial, keepLast: 4, inPredicates: Deny}
",
    );
    let mut p = Problems::default();
    let mut w = Wire::login(gw.port(), "predicate oracles through pgwarden");
    // The plain form is refused today; the control for the message.
    let msgs = simple(
        &mut w,
        "SELECT id FROM customers WHERE card_number LIKE '4929%'",
    );
    assert!(
        refusal_problem(&msgs, "inPredicates").is_none(),
        "the plain predicate: {}",
        describe(&msgs)
    );
    let statements = PREFIX_ORACLES
        .iter()
        .map(|t| t.replace("{p}", "4929"))
        .chain(ORDER_ORACLES.iter().map(|s| s.to_string()));
    for sql in statements {
        let msgs = simple(&mut w, &sql);
        p.refused(&sql, &msgs, "inPredicates");
        p.check(&sql, !text_of(&msgs).contains(CARD), || {
            "RAW CARD came back".into()
        });
        // A refusal, not a status: the answer must be the same for every prefix.
        p.alive(&sql, &mut w);
    }

    gw.assert_running();
    p.assert_none("finding 7 (inPredicates: Deny)");
}

// =====================================================================================
// 8. One approval, one execution
// =====================================================================================

/// Finding 8. `PREPARE d AS DELETE ...` is judged by its body, so it is the PREPARE
/// that needs approval; once approved and run, `d` is a prepared statement of the
/// session, and PostgreSQL runs `EXECUTE d` any number of times (a prepared statement
/// is reusable by definition). One approval must release one execution: the first
/// `EXECUTE d` runs (DELETE 1), a second one is refused (42501, naming approval), even
/// after the row is back.
#[test]
fn one_approval_releases_one_execution() {
    let pg = cluster(FIXTURE);
    let put_back = "INSERT INTO orders VALUES (1, 2, 10, 'new')";

    // (a) Directly: EXECUTE d deletes every time the row is there.
    let mut d = Wire::login(pg.port(), "direct PREPARE d");
    d.ok("PREPARE d AS DELETE FROM orders WHERE id = 1");
    for round in 0..3 {
        let msgs = simple(&mut d, "EXECUTE d");
        assert_eq!(tags(&msgs), ["DELETE 1"], "directly, round {round}");
        d.ok(put_back);
    }

    // (b) Through the gateway.
    let gw = gateway(&pg, APPROVAL_RULES);
    let cli = ApprovalsCli::new(gw.state_dir());
    let mut p = Problems::default();
    let mut w = Wire::login(gw.port(), "PREPARE d through pgwarden");
    let prepare = "PREPARE d AS DELETE FROM orders WHERE id = 1";
    let msgs = simple(&mut w, prepare);
    let held = refusal_problem(&msgs, "approval");
    assert!(held.is_none(), "the PREPARE is held (fail fast): {held:?}");
    let err = errors(&msgs).remove(0);
    let id = request_id_in(&format!(
        "{} {}",
        err.get(&'M').cloned().unwrap_or_default(),
        err.get(&'H').cloned().unwrap_or_default()
    ))
    .unwrap_or_else(|| panic!("no request id in {err:?}"));
    cli.approve(&id, "finding 8");
    let msgs = simple(&mut w, prepare);
    assert_eq!(tags(&msgs), ["PREPARE"], "released: {}", describe(&msgs));

    let msgs = simple(&mut w, "EXECUTE d");
    p.check("first EXECUTE d", tags(&msgs) == ["DELETE 1"], || {
        format!("expected DELETE 1: {}", describe(&msgs))
    });
    w.ok(put_back);
    let msgs = simple(&mut w, "EXECUTE d");
    p.refused("second EXECUTE d", &msgs, "approval");
    p.check(
        "second EXECUTE d",
        pg.admin_sql("SELECT count(*) FROM orders WHERE id = 1") == "1",
        || "THE ROW WAS DELETED AGAIN".into(),
    );
    p.alive("second EXECUTE d", &mut w);

    gw.assert_running();
    p.assert_none("finding 8 (one approval, one execution)");
}

// =====================================================================================
// 9. Startup timeout and per-source cap
// =====================================================================================

/// Waits for the other side to close `w` (EOF, reset, or ErrorResponse then close);
/// returns how long from `since`, or `None` if it is still open after `limit`.
fn closed_within(w: &mut Wire, since: Instant, limit: Duration) -> Option<Duration> {
    loop {
        let left = limit.saturating_sub(since.elapsed());
        if left.is_zero() {
            return None;
        }
        w.set_read_timeout(left);
        match w.try_read() {
            Ok(None) => return Some(since.elapsed()),
            Ok(Some((b'E', _))) => return Some(since.elapsed()),
            Ok(Some(_)) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None
            }
            Err(_) => return Some(since.elapsed()),
        }
    }
}

/// The first half of a startup packet.
fn half_startup() -> Vec<u8> {
    let full = pgwarden_e2e::wire::startup_packet(&[]);
    full[..full.len() / 2].to_vec()
}

fn start_with_flags(pg: &PgCluster, flags: &[&str]) -> Gateway {
    let mut b = Gateway::builder(pg);
    for flag in flags {
        b = b.arg(*flag);
    }
    match b.try_start() {
        Ok(gw) => gw,
        Err(exit) => {
            panic!("pgwarden run {flags:?} did not start (flag not supported yet?): {exit}")
        }
    }
}

/// Finding 9, the timeout. A client that connects and sends nothing (or half a startup
/// packet) holds one of `--max-connections` slots for as long as it likes: a handful of
/// silent sockets lock every real client out. PostgreSQL closes such connections after
/// `authentication_timeout` (checked directly with 2 s). Contract: with
/// `--startup-timeout-seconds 2 --max-connections 5`, five silent connections and one
/// with half a startup packet are all closed within about 4 s, after which psql
/// connects and works.
#[test]
fn silent_connections_are_closed_after_the_startup_timeout() {
    let limit = Duration::from_secs(5);
    // (a) Directly: PostgreSQL's authentication_timeout.
    let pg = PgCluster::builder()
        .auth(UpstreamAuth::Trust)
        .setting("authentication_timeout", "2")
        .start();
    let opened = Instant::now();
    let mut silent: Vec<Wire> = (0..2).map(|_| Wire::connect(pg.port(), "silent")).collect();
    let mut half = Wire::connect(pg.port(), "half startup");
    half.send(&half_startup());
    silent.push(half);
    for w in &mut silent {
        assert!(
            closed_within(w, opened, limit).is_some(),
            "directly, PostgreSQL closes a silent connection after authentication_timeout"
        );
    }

    // (b) Through the gateway.
    let gw = start_with_flags(
        &pg,
        &["--startup-timeout-seconds", "2", "--max-connections", "5"],
    );
    let mut p = Problems::default();
    let opened = Instant::now();
    let mut half = Wire::connect(gw.port(), "half startup");
    half.send(&half_startup());
    let mut conns = vec![half];
    conns.extend((0..5).map(|_| Wire::connect(gw.port(), "silent")));
    for (i, w) in conns.iter_mut().enumerate() {
        let what = if i == 0 {
            "half a startup packet".to_string()
        } else {
            format!("silent connection {i}")
        };
        match closed_within(w, opened, limit) {
            Some(t) => p.check(&what, t <= Duration::from_millis(4500), || {
                format!("closed only after {t:?}")
            }),
            None => p.add(&what, format!("still open after {limit:?}")),
        }
    }
    let out = run_psql(
        &gw.env(),
        &["-A", "-t", "-c", "SELECT 'psql-after-timeouts'"],
        None,
    );
    p.check(
        "psql afterwards",
        String::from_utf8_lossy(&out.stdout).contains("psql-after-timeouts"),
        || format!("psql failed: {}", String::from_utf8_lossy(&out.stderr)),
    );

    gw.assert_running();
    p.assert_none("finding 9 (startup timeout)");
}

/// Finding 9, the per-source cap. Even with a startup timeout, one address can open
/// connections faster than they time out. Contract: with
/// `--max-unauthenticated-per-source 3`, while three silent connections from 127.0.0.1
/// are open a fourth from the same address is closed at once (EOF or an ErrorResponse
/// within 1 s), and a session that already authenticated keeps working.
#[test]
fn unauthenticated_connections_are_capped_per_source() {
    let pg = cluster(FIXTURE);
    let gw = start_with_flags(
        &pg,
        &[
            "--startup-timeout-seconds",
            "30",
            "--max-unauthenticated-per-source",
            "3",
        ],
    );
    let mut p = Problems::default();
    let mut session = Wire::login(gw.port(), "authenticated session");
    let mut silent: Vec<Wire> = (0..3).map(|_| Wire::connect(gw.port(), "silent")).collect();
    // Let the gateway register the three.
    thread::sleep(Duration::from_millis(200));
    let opened = Instant::now();
    let mut fourth = Wire::connect(gw.port(), "fourth");
    p.check(
        "fourth unauthenticated connection",
        closed_within(&mut fourth, opened, Duration::from_secs(1)).is_some(),
        || "still open after 1 s".into(),
    );
    for (i, w) in silent.iter_mut().enumerate() {
        w.set_read_timeout(Duration::from_millis(50));
        p.check(
            &format!("silent connection {i}"),
            w.try_read().is_err(),
            || "closed although within the cap".into(),
        );
    }
    p.alive("authenticated session", &mut session);

    gw.assert_running();
    p.assert_none("finding 9 (per-source cap)");
}

// =====================================================================================
// 10. Sequence writes
// =====================================================================================

const SEQUENCE_WRITES: &[&str] = &[
    "SELECT setval('order_seq', 100)",
    "SELECT nextval('order_seq')",
    "SELECT ('order_seq'::regclass).nextval",
    "SELECT nextval('public.order_seq'::regclass)",
    "SELECT nextval('\"order_seq\"')",
    "SELECT setval('ORDER_SEQ', 500, false)",
];

const ORDERS_ONLY: &str = "  defaultAction: Deny
  rules:
    - {name: orders, action: Allow, statements: [SELECT, INSERT, UPDATE, DELETE], tables: [\"public.orders\"]}
";

/// Finding 10. `nextval`/`setval` write a sequence (not transactional: a ROLLBACK does
/// not undo them), but the sequence is named in a string literal or regclass value, not
/// as a table, so a policy that allows writes only on `orders` lets any client advance or
/// reset any sequence (`setval` back to 1 makes the next INSERTs collide with existing
/// keys). Contract: under a policy allowing only orders, each write is refused (42501)
/// naming public.order_seq; with a rule allowing UPDATE on public.order_seq they run.
#[test]
fn sequence_writes_need_a_rule() {
    let pg = cluster(&format!("{FIXTURE}\nCREATE SEQUENCE order_seq;"));
    let state = || pg.admin_sql("SELECT last_value || '/' || is_called FROM order_seq");
    let reset = || pg.admin_sql("SELECT setval('order_seq', 1, false)");

    // (a) Directly: every form changes the sequence.
    let mut d = Wire::login(pg.port(), "direct sequence writes");
    for sql in SEQUENCE_WRITES {
        reset();
        let before = state();
        d.ok(sql);
        assert_ne!(state(), before, "directly, {sql} writes the sequence");
    }

    // (b) Through the gateway: refused under the orders-only policy...
    let mut p = Problems::default();
    {
        let gw = gateway(&pg, ORDERS_ONLY);
        let mut w = Wire::login(gw.port(), "sequence writes through pgwarden");
        for sql in SEQUENCE_WRITES {
            reset();
            let before = state();
            let msgs = simple(&mut w, sql);
            p.check(sql, state() == before, || {
                format!("THE SEQUENCE CHANGED: {} -> {}", before, state())
            });
            p.refused(sql, &msgs, "public.order_seq");
            p.alive(sql, &mut w);
        }
        gw.assert_running();
    }
    // ... and allowed with a rule for the sequence.
    let gw = gateway(
        &pg,
        &format!(
            "{ORDERS_ONLY}    - {{name: seq, action: Allow, statements: [UPDATE], tables: [\"public.order_seq\"]}}\n"
        ),
    );
    let mut w = Wire::login(gw.port(), "sequence writes allowed");
    for sql in SEQUENCE_WRITES {
        reset();
        let before = state();
        let msgs = simple(&mut w, sql);
        let what = format!("{sql} (with rule seq)");
        p.check(&what, errors(&msgs).is_empty(), || {
            format!("refused although allowed: {}", describe(&msgs))
        });
        p.check(&what, state() != before, || {
            "the sequence did not change".into()
        });
    }

    gw.assert_running();
    p.assert_none("finding 10 (sequence writes)");
}
