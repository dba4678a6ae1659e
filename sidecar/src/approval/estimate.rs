//! What a reviewer needs to decide on a held DML statement: the planner's
//! estimate of the rows it writes and the tables it touches.
//!
//! The gateway runs a plain `EXPLAIN (VERBOSE, FORMAT JSON)` of the held
//! statement on a connection of its own, under the policy's credential, in a
//! READ ONLY transaction with a short `statement_timeout` that it rolls back.
//! Never `EXPLAIN ANALYZE`: nothing is executed. Planning can still evaluate
//! functions (constant folding, custom plans), so a statement the analysis
//! finds calling user code is not explained at all, and neither is one whose
//! bound parameters have a type that is not built in (its input function
//! would run). Whatever happens, the result is an `Estimate` — `unknown` with
//! why — never an error for the held statement.
//!
//! `plannable` and `parse_explain` are sans-IO; `explain` does the I/O.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pgwarden_api::{Estimate, StatementClass};
use pgwire::messages::extendedquery::{Bind, Execute, Parse, Sync as SyncMessage};
use pgwire::messages::Message;
use serde_json::Value;

use super::request::Param;
use crate::policy::analyze::{QualifiedName, PINNED_SCHEMA};
use crate::upstream::{self, UpstreamError, UpstreamTarget};
use crate::wire::Limits;

/// The estimate never holds back the client's hold notice longer than this
/// (connecting, logging in and planning together).
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// The server gives up planning after this (a plan that takes longer is not
/// worth waiting for).
const STATEMENT_TIMEOUT_MS: u32 = 1000;
/// OIDs below this are the system catalogs' own (`FirstNormalObjectId`):
/// their types' input functions are built in.
const FIRST_NORMAL_OID: u32 = 16384;
/// Why a held statement is not estimated after the session changed
/// search_path, created objects or ran user code: the gateway's own
/// connection would resolve its names on a fresh session's terms.
pub const NAMES_MAY_DIFFER: &str = "this session changed settings or objects that decide what the statement's names refer to; a fresh connection's plan could be of other tables";
/// Tables listed at most (a plan over a thousand partitions is summarised).
const MAX_TABLES: usize = 50;

/// Whether a held statement gets an estimate: `None` when it is not DML
/// (nothing to estimate), `Some(Err(why))` when it cannot be planned
/// safely, `Some(Ok(()))` when `explain` may run it.
pub fn plannable(
    classes: &[StatementClass],
    calls_user_code: bool,
    params: &[Param<'_>],
) -> Option<Result<(), String>> {
    let dml = |c: &StatementClass| {
        matches!(
            c,
            StatementClass::Insert
                | StatementClass::Update
                | StatementClass::Delete
                | StatementClass::Merge
        )
    };
    if !classes.iter().any(dml) {
        return None;
    }
    if classes.len() != 1 {
        return Some(Err(
            "several statements in one query (EXPLAIN takes one)".into()
        ));
    }
    if calls_user_code {
        return Some(Err(
            "the statement calls user code, which planning could run".into(),
        ));
    }
    if let Some(i) = params
        .iter()
        .position(|p| p.type_oid == 0 || p.type_oid >= FIRST_NORMAL_OID)
    {
        return Some(Err(format!(
            "parameter ${} has no built-in type, so planning with its value could run user code",
            i + 1
        )));
    }
    Some(Ok(()))
}

/// Run the plain EXPLAIN under `TIMEOUT`, once every relation the statement
/// names (`relations`, as the analysis resolved them) is a plain or
/// partitioned table: planning through a view could run the user code in
/// its definition, which the analysis never saw. Errors become `unknown`,
/// by kind only: the server's message may quote the statement's values.
pub async fn explain(
    target: &UpstreamTarget,
    sql: &str,
    params: &[Param<'_>],
    relations: &[QualifiedName],
) -> Estimate {
    match tokio::time::timeout(TIMEOUT, explain_rows(target, sql, params, relations)).await {
        Err(_) => Estimate::unknown(format!("planning took longer than {} s", TIMEOUT.as_secs())),
        Ok(Err(Unplanned::NotATable(name))) => Estimate::unknown(format!(
            "{name} is not a plain table (a view's definition could run user code when planned)"
        )),
        Ok(Err(Unplanned::Upstream(e))) => {
            tracing::info!(error.kind = e.kind(), code = %query_code(&e), "EXPLAIN for the reviewer failed");
            Estimate::unknown(match &e {
                UpstreamError::Query { code, .. } if code == "57014" => {
                    format!("planning took longer than {STATEMENT_TIMEOUT_MS} ms")
                }
                UpstreamError::Query { code, .. } => {
                    format!("EXPLAIN failed (SQLSTATE {code})")
                }
                other => format!("EXPLAIN could not run ({} error)", other.kind()),
            })
        }
        Ok(Ok(json)) => parse_explain(&json)
            .unwrap_or_else(|why| Estimate::unknown(format!("the plan could not be read: {why}"))),
    }
}

fn query_code(e: &UpstreamError) -> &str {
    match e {
        UpstreamError::Query { code, .. } => code,
        _ => "",
    }
}

/// Why no plan came back.
enum Unplanned {
    NotATable(String),
    Upstream(UpstreamError),
}

impl From<UpstreamError> for Unplanned {
    fn from(e: UpstreamError) -> Self {
        Unplanned::Upstream(e)
    }
}

async fn explain_rows(
    target: &UpstreamTarget,
    sql: &str,
    params: &[Param<'_>],
    relations: &[QualifiedName],
) -> Result<String, Unplanned> {
    let limits = Limits::default();
    // As a client session's (session/startup.rs): names resolve against the
    // same pinned schema, and text reads the same, whatever the role's or
    // database's defaults say.
    let startup = [
        (
            "application_name".to_owned(),
            "pgwarden estimate".to_owned(),
        ),
        ("client_encoding".to_owned(), "UTF8".to_owned()),
        ("standard_conforming_strings".to_owned(), "on".to_owned()),
        ("search_path".to_owned(), PINNED_SCHEMA.to_owned()),
    ];
    let mut up = upstream::connect(target, &startup, limits).await?;
    // READ ONLY: should planning reach code that writes, it cannot.
    let begun = upstream::query_rows(
        &mut up,
        limits,
        &format!("BEGIN READ ONLY; SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"),
    )
    .await;
    let result = match begun {
        Ok(_) => plan(&mut up, limits, sql, params, relations).await,
        Err(e) => Err(e.into()),
    };
    let _ = upstream::query_rows(&mut up, limits, "ROLLBACK").await;
    upstream::terminate(&mut up).await;
    result
}

async fn plan(
    up: &mut upstream::Upstream,
    limits: Limits,
    sql: &str,
    params: &[Param<'_>],
    relations: &[QualifiedName],
) -> Result<String, Unplanned> {
    if !relations.is_empty() {
        let rows = upstream::request_rows(up, limits, &relkind_request(relations)).await?;
        if let Some(name) = rows.into_iter().next().and_then(|r| r.into_iter().next()) {
            return Err(Unplanned::NotATable(name.unwrap_or_default()));
        }
    }
    // Extended protocol: one statement only (Parse refuses several), and the
    // client's values bound as the client bound them.
    let rows = upstream::request_rows(up, limits, &explain_request(sql, params)).await?;
    match rows.into_iter().next().and_then(|r| r.into_iter().next()) {
        Some(Some(json)) => Ok(json),
        _ => Err(UpstreamError::Protocol("EXPLAIN returned no plan".into()).into()),
    }
}

/// The first of `relations` that is not a plain or partitioned table (or
/// does not exist), named as the analysis named it; no row if all are.
const RELKIND_CHECK: &str = "SELECT n.s || '.' || n.t \
    FROM ROWS FROM (pg_catalog.unnest($1::text[]), pg_catalog.unnest($2::text[])) AS n(s, t) \
    LEFT JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass(pg_catalog.format('%I.%I', n.s, n.t)) \
    WHERE c.relkind IS NULL OR c.relkind NOT IN ('r', 'p') LIMIT 1";

fn relkind_request(relations: &[QualifiedName]) -> BytesMut {
    /// `text[]`
    const TEXT_ARRAY: u32 = 1009;
    let schemas = array_literal(relations.iter().map(|r| r.schema.as_str()));
    let names = array_literal(relations.iter().map(|r| r.name.as_str()));
    let parse = Parse::new(None, RELKIND_CHECK.to_owned(), vec![TEXT_ARRAY; 2]);
    let bind = Bind::new(
        None,
        None,
        Vec::new(),
        vec![Some(Bytes::from(schemas)), Some(Bytes::from(names))],
        Vec::new(),
    );
    unnamed_request(parse, bind)
}

/// A text-array literal: every element double-quoted, `"` and `\` escaped.
fn array_literal<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let quoted: Vec<String> = items
        .map(|s| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("{{{}}}", quoted.join(","))
}

/// Parse, Bind, Execute and Sync of the EXPLAIN, unnamed.
fn explain_request(sql: &str, params: &[Param<'_>]) -> BytesMut {
    let parse = Parse::new(
        None,
        format!("EXPLAIN (VERBOSE, FORMAT JSON) {sql}"),
        params.iter().map(|p| p.type_oid).collect(),
    );
    let bind = Bind::new(
        None,
        None,
        params.iter().map(|p| p.format).collect(),
        params
            .iter()
            .map(|p| p.value.map(Bytes::copy_from_slice))
            .collect(),
        Vec::new(),
    );
    unnamed_request(parse, bind)
}

/// Parse, Bind, Execute (all rows) and Sync, unnamed statement and portal.
fn unnamed_request(parse: Parse, bind: Bind) -> BytesMut {
    let mut out = BytesMut::new();
    for r in [
        parse.encode(&mut out),
        bind.encode(&mut out),
        Execute::new(None, 0).encode(&mut out),
        SyncMessage::new().encode(&mut out),
    ] {
        if let Err(e) = r {
            tracing::error!(error = %e, "encoding a request for the estimate failed");
        }
    }
    out
}

/// The estimate in `EXPLAIN (FORMAT JSON)` output: the rows under every
/// ModifyTable (its outer plan is what it writes; writable CTEs add up),
/// and every relation named in the plan, the written ones first.
pub fn parse_explain(json: &str) -> Result<Estimate, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("not JSON ({e})"))?;
    let plan = v
        .as_array()
        .and_then(|a| a.first())
        .and_then(|o| o.get("Plan"))
        .ok_or("no \"Plan\" in the output")?;
    let mut walk = Walk::default();
    walk.node(plan);
    if !walk.writes {
        return Err("the plan writes nothing".into());
    }
    let mut tables = walk.written;
    for t in walk.read {
        if !tables.contains(&t) {
            tables.push(t);
        }
    }
    tables.truncate(MAX_TABLES);
    Ok(Estimate {
        // The API server's integers are int64.
        rows: Some(walk.rows.min(i64::MAX as u64)),
        tables,
        unknown: None,
    })
}

#[derive(Default)]
struct Walk {
    writes: bool,
    rows: u64,
    written: Vec<String>,
    read: Vec<String>,
}

impl Walk {
    fn node(&mut self, n: &Value) {
        let children = n.get("Plans").and_then(Value::as_array);
        if n.get("Node Type").and_then(Value::as_str) == Some("ModifyTable") {
            self.writes = true;
            let outer = children
                .into_iter()
                .flatten()
                .filter(|c| c.get("Parent Relationship").and_then(Value::as_str) == Some("Outer"));
            for c in outer {
                let rows = c.get("Plan Rows").and_then(Value::as_f64).unwrap_or(0.0);
                // `as` saturates: a negative or absurd number cannot wrap.
                self.rows = self.rows.saturating_add(rows.round() as u64);
            }
            // Inheritance and partitions: one ModifyTable, several targets.
            match n.get("Target Tables").and_then(Value::as_array) {
                Some(targets) => {
                    for t in targets {
                        push(&mut self.written, t);
                    }
                }
                None => push(&mut self.written, n),
            }
        } else {
            push(&mut self.read, n);
        }
        for c in children.into_iter().flatten() {
            self.node(c);
        }
    }
}

/// `schema.name` of a node or target naming a relation.
fn push(list: &mut Vec<String>, n: &Value) {
    let Some(name) = n.get("Relation Name").and_then(Value::as_str) else {
        return;
    };
    let name = match n.get("Schema").and_then(Value::as_str) {
        Some(schema) => format!("{schema}.{name}"),
        None => name.to_owned(),
    };
    if !list.contains(&name) && list.len() < MAX_TABLES {
        list.push(name);
    }
}

/// One line for a reviewer: `~99 rows (public.t)` or `unknown: why`.
pub fn describe(e: &Estimate) -> String {
    match (e.rows, &e.unknown) {
        (Some(rows), _) if e.tables.is_empty() => format!("~{rows} rows"),
        (Some(rows), _) => format!("~{rows} rows ({})", e.tables.join(", ")),
        (None, Some(why)) => format!("unknown: {why}"),
        (None, None) => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_literals_quote_every_element() {
        let names = ["plain", "with \"quote\"", "back\\slash", "a,b{c}"];
        assert_eq!(
            array_literal(names.into_iter()),
            r#"{"plain","with \"quote\"","back\\slash","a,b{c}"}"#
        );
    }

    // PostgreSQL 15's EXPLAIN (VERBOSE, FORMAT JSON) of
    // DELETE FROM t WHERE id < 100, trimmed of the fields not read.
    const DELETE: &str = r#"[
      {
        "Plan": {
          "Node Type": "ModifyTable", "Operation": "Delete", "Parallel Aware": false,
          "Relation Name": "t", "Schema": "public", "Alias": "t",
          "Startup Cost": 0.00, "Total Cost": 4.26, "Plan Rows": 0, "Plan Width": 0,
          "Plans": [
            {
              "Node Type": "Index Scan", "Parent Relationship": "Outer",
              "Scan Direction": "Forward", "Index Name": "t_pkey",
              "Relation Name": "t", "Schema": "public", "Alias": "t",
              "Plan Rows": 99, "Plan Width": 6, "Output": ["ctid"],
              "Index Cond": "(t.id < 100)"
            }
          ]
        }
      }
    ]"#;

    #[test]
    fn a_delete_estimates_the_rows_its_scan_finds() {
        let e = parse_explain(DELETE).unwrap();
        assert_eq!(e.rows, Some(99));
        assert_eq!(e.tables, ["public.t"]);
        assert_eq!(e.unknown, None);
        assert_eq!(describe(&e), "~99 rows (public.t)");
    }

    #[test]
    fn tables_read_follow_the_written_one_and_init_plans_add_no_rows() {
        // UPDATE orders SET ... FROM customers WHERE ... AND x = (SELECT ...)
        let json = r#"[{"Plan": {
            "Node Type": "ModifyTable", "Operation": "Update",
            "Relation Name": "orders", "Schema": "shop", "Plan Rows": 0,
            "Plans": [
              {"Node Type": "Result", "Parent Relationship": "InitPlan",
               "Plan Rows": 1},
              {"Node Type": "Hash Join", "Parent Relationship": "Outer", "Plan Rows": 1234.4,
               "Plans": [
                 {"Node Type": "Seq Scan", "Parent Relationship": "Outer",
                  "Relation Name": "orders", "Schema": "shop", "Plan Rows": 5000},
                 {"Node Type": "Hash", "Parent Relationship": "Inner", "Plan Rows": 10,
                  "Plans": [{"Node Type": "Seq Scan", "Parent Relationship": "Outer",
                    "Relation Name": "customers", "Schema": "shop", "Plan Rows": 10}]}
               ]}
            ]}}]"#;
        let e = parse_explain(json).unwrap();
        assert_eq!(e.rows, Some(1234));
        assert_eq!(e.tables, ["shop.orders", "shop.customers"]);
    }

    #[test]
    fn writable_ctes_add_up_and_partitions_are_listed_as_targets() {
        let json = r#"[{"Plan": {
            "Node Type": "ModifyTable", "Operation": "Insert",
            "Relation Name": "archive", "Schema": "public",
            "Plans": [
              {"Node Type": "ModifyTable", "Parent Relationship": "InitPlan",
               "Subplan Name": "CTE d", "Operation": "Delete",
               "Target Tables": [
                 {"Relation Name": "ev_2025", "Schema": "public"},
                 {"Relation Name": "ev_2026", "Schema": "public"}],
               "Plans": [{"Node Type": "Append", "Parent Relationship": "Outer",
                          "Plan Rows": 40}]},
              {"Node Type": "CTE Scan", "Parent Relationship": "Outer", "Plan Rows": 40}
            ]}}]"#;
        let e = parse_explain(json).unwrap();
        assert_eq!(e.rows, Some(80));
        assert_eq!(
            e.tables,
            ["public.archive", "public.ev_2025", "public.ev_2026"]
        );
    }

    #[test]
    fn output_that_is_not_a_write_plan_is_an_error_not_a_guess() {
        for bad in [
            "",
            "not json",
            "{}",
            "[]",
            r#"[{"Plan": {"Node Type": "Seq Scan", "Relation Name": "t", "Plan Rows": 5}}]"#,
            r#"[{"Plan": 7}]"#,
        ] {
            assert!(parse_explain(bad).is_err(), "{bad:?}");
        }
        // Odd numbers never wrap or panic.
        let e = parse_explain(
            r#"[{"Plan": {"Node Type": "ModifyTable", "Plans": [
                {"Parent Relationship": "Outer", "Plan Rows": -5},
                {"Parent Relationship": "Outer", "Plan Rows": 1e300},
                {"Parent Relationship": "Outer", "Plan Rows": "many"}]}}]"#,
        )
        .unwrap();
        assert_eq!(e.rows, Some(i64::MAX as u64));
    }

    #[test]
    fn only_dml_without_user_code_or_unknown_parameter_types_is_planned() {
        use StatementClass as C;
        let p = |t: u32| Param {
            format: 0,
            type_oid: t,
            value: Some(b"1"),
        };
        assert_eq!(plannable(&[C::Ddl], false, &[]), None);
        assert_eq!(plannable(&[C::Select], true, &[]), None);
        assert_eq!(plannable(&[C::Delete], false, &[]), Some(Ok(())));
        assert_eq!(plannable(&[C::Merge], false, &[p(23), p(25)]), Some(Ok(())));
        let why = |r: Option<Result<(), String>>| r.unwrap().unwrap_err();
        assert!(why(plannable(&[C::Update], true, &[])).contains("user code"));
        assert!(why(plannable(&[C::Delete, C::Delete], false, &[])).contains("several"));
        assert!(why(plannable(&[C::Insert], false, &[p(23), p(0)])).contains("$2"));
        assert!(why(plannable(&[C::Insert], false, &[p(16385)])).contains("$1"));
    }

    #[test]
    fn an_unknown_estimate_says_why() {
        assert_eq!(
            describe(&Estimate::unknown("the statement calls user code")),
            "unknown: the statement calls user code"
        );
    }
}
