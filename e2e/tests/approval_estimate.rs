//! The reviewer's estimate in standalone requests (issue 17 item 6): a held
//! DELETE's request carries the planner's estimated rows and tables, for the
//! simple protocol and for the extended protocol with the values the client
//! bound; one that calls a user function carries `unknown` and why. Real
//! PostgreSQL, the real gateway, tokio-postgres, and `pgwarden approvals show`.
//!
//! Needs `cargo build -p pgwarden-sidecar --bins` first.

use std::time::Duration;

use pgwarden_e2e::approvals::request_id_in;
use pgwarden_e2e::{policy_with_rules, ApprovalsCli, Endpoint, Gateway, PgCluster};
use serde_json::{json, Value};
use tokio_postgres::types::ToSql;
use tokio_postgres::NoTls;

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, note text);
INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 1000) g;
ANALYZE items;
CREATE FUNCTION keep(int) RETURNS boolean IMMUTABLE LANGUAGE sql AS 'SELECT $1 % 2 = 0';
CREATE VIEW items_v AS SELECT * FROM items;
-- The same name in another schema, with few rows, first on the role's
-- default search_path: the gateway pins public for sessions and estimates.
CREATE SCHEMA other;
CREATE TABLE other.items (id int PRIMARY KEY, note text);
INSERT INTO other.items SELECT g, 'x' FROM generate_series(1, 10) g;
ANALYZE other.items;
ALTER ROLE app SET search_path = other, public;
";

/// Deletes wait (fail fast); `keep()` may be called, so a DELETE calling it
/// is held, not refused.
const SPEC: &str = "  defaultAction: Deny
  rules:
    - {name: deletes, action: RequireApproval, statements: [DELETE]}
    - {name: app, action: Allow, statements: [SELECT, DELETE, DDL], tables: [\"public.*\"]}
    - {name: keep, action: Allow, functions: [keep]}
  approval:
    wait: 0s
";

/// Runs `sql` (with `params`, extended protocol; without, simple) and
/// returns the request id the fail-fast refusal names.
fn refused_id(conninfo: &str, sql: &str, params: &[&(dyn ToSql + Sync)]) -> String {
    refused_id_after(conninfo, None, sql, params)
}

/// The same, in a session that first ran `before` (simple protocol).
fn refused_id_after(
    conninfo: &str,
    before: Option<&str>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let err = rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(conninfo, NoTls)
            .await
            .expect("connect through the gateway");
        tokio::spawn(conn);
        if let Some(before) = before {
            client
                .simple_query(before)
                .await
                .expect("the statement before");
        }
        let run = async {
            if params.is_empty() {
                client.simple_query(sql).await.map(drop)
            } else {
                client.execute(sql, params).await.map(drop)
            }
        };
        tokio::time::timeout(Duration::from_secs(15), run)
            .await
            .expect("no answer")
            .expect_err("a statement that needs approval ran")
    });
    let db = err.as_db_error().expect("an ErrorResponse");
    request_id_in(db.message()).unwrap_or_else(|| panic!("no request id in {db:?}"))
}

fn estimated_rows(request: &Value) -> u64 {
    request["estimate"]["rows"]
        .as_u64()
        .unwrap_or_else(|| panic!("no estimated rows: {request:#}"))
}

#[test]
fn held_deletes_carry_the_planners_estimate_or_why_not() {
    let pg = PgCluster::start();
    pg.admin_sql(SCHEMA);
    let gw = Gateway::builder(&pg)
        .policy_yaml(policy_with_rules(pg.port(), None, SPEC))
        .start();
    let cli = ApprovalsCli::new(gw.state_dir());

    // Simple protocol: 99 rows match; the statistics' estimate is close.
    // The role's default search_path puts other.items (10 rows) first: the
    // session and the estimate both resolve `items` in the pinned public.
    let id = refused_id(&gw.conninfo(), "DELETE FROM items WHERE id < 100", &[]);
    let r = cli.show(&id);
    let rows = estimated_rows(&r);
    assert!((50..=200).contains(&rows), "{r:#}");
    assert_eq!(r["estimate"]["tables"], json!(["public.items"]), "{r:#}");
    let text = cli.run(&["show", &id]);
    assert!(
        text.stdout
            .contains(&format!("estimate:    ~{rows} rows (public.items)")),
        "{text}"
    );

    // Extended protocol: planned with the bound value (a generic plan for
    // `id < $1` would guess a third of the table).
    let id = refused_id(
        &gw.conninfo(),
        "DELETE FROM items WHERE id < $1",
        &[&100i32],
    );
    let r = cli.show(&id);
    assert!((50..=200).contains(&estimated_rows(&r)), "{r:#}");
    let id = refused_id(
        &gw.conninfo(),
        "DELETE FROM items WHERE id > $1",
        &[&900i32],
    );
    assert!((50..=200).contains(&estimated_rows(&cli.show(&id))));

    // User code in the WHERE: never planned.
    let id = refused_id(&gw.conninfo(), "DELETE FROM items WHERE keep(id)", &[]);
    let r = cli.show(&id);
    assert!(r["estimate"]["rows"].is_null(), "{r:#}");
    assert!(
        r["estimate"]["unknown"]
            .as_str()
            .is_some_and(|w| w.contains("calls user code")),
        "{r:#}"
    );

    // A view: its definition is not the analysis's to see, and planning
    // through it could run user code in it. Not planned.
    let id = refused_id(&gw.conninfo(), "DELETE FROM items_v WHERE id < 100", &[]);
    let r = cli.show(&id);
    assert!(r["estimate"]["rows"].is_null(), "{r:#}");
    assert!(
        r["estimate"]["unknown"]
            .as_str()
            .is_some_and(|w| w.contains("public.items_v is not a plain table")),
        "{r:#}"
    );

    // After DDL in the same session (it could rename or shadow a table
    // inside its transaction), a fresh connection's plan could be of
    // another table: unknown, and why.
    let id = refused_id_after(
        &gw.conninfo(),
        Some("CREATE TABLE scratch (id int)"),
        // Not a text asked before: that request (and its estimate) would be
        // the one named.
        "DELETE FROM items WHERE id < 50",
        &[],
    );
    let r = cli.show(&id);
    assert!(r["estimate"]["rows"].is_null(), "{r:#}");
    assert!(
        r["estimate"]["unknown"]
            .as_str()
            .is_some_and(|w| w.contains("this session changed settings or objects")),
        "{r:#}"
    );

    // Nothing ran: planning is not executing.
    assert_eq!(pg.admin_sql("SELECT count(*) FROM items"), "1000");
    assert_eq!(pg.admin_sql("SELECT count(*) FROM other.items"), "10");
}
