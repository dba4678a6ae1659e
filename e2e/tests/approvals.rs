//! Approvals end to end: statements a `RequireApproval` rule catches are held
//! (or refused at once with `wait: 0s`) until a human decides with the real
//! `pgwarden approvals` CLI against the gateway's state dir. Each test owns a
//! PostgreSQL cluster and a gateway, drives them with tokio-postgres or psql,
//! and checks the outcome where a user would: the client's answer, the rows in
//! the database (read directly, bypassing the gateway) and `approvals list`.

use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use jiff::Timestamp;
use pgwarden_e2e::approvals::{
    files_containing, files_under, is_request_id, os_user, request_id_in,
};
use pgwarden_e2e::{
    policy_with_rules, psql_query, run_psql, ApprovalsCli, Endpoint, Gateway, GatewayBuilder,
    PgCluster, APP_DATABASE, POLICY_NAME,
};
use serde_json::{json, Value};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::error::{DbError, SqlState};
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, NoTls, SimpleQueryMessage};

/// Longest a statement may take when it must not be held: well under every
/// `wait` a hold would last, well over a loaded CI machine's hiccups.
const PROMPT: Duration = Duration::from_secs(10);
/// Longest a held statement may take to end once it has been decided.
const AFTER_DECISION: Duration = Duration::from_secs(20);

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, note text);
INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 10) g;
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, card_number text NOT NULL);
INSERT INTO customers VALUES
  (1, 'Ann', '4929123456781234'), (2, 'Bob', '4111111111111111'), (3, 'Cy', '5500000000000004');
CREATE TABLE orders (id int PRIMARY KEY, customer_id int NOT NULL REFERENCES customers, note text);
INSERT INTO orders VALUES (10, 1, 'first order');
";

/// Deletes and DDL need a reviewer; reads and inserts on public tables do not.
const RULES: &str = "  defaultAction: Deny
  rules:
    - {name: risky-deletes, action: RequireApproval, statements: [DELETE, DDL]}
    - {name: app, action: Allow, statements: [SELECT, INSERT, UPDATE, DELETE, DDL], tables: [\"public.*\"]}
";

const DELETE_FIRST_THREE: &str = "DELETE FROM items WHERE id <= 3";

// === setup ===

struct Setup {
    rt: Runtime,
    gw: Gateway,
    cli: ApprovalsCli,
    pg: PgCluster,
}

fn cluster() -> PgCluster {
    let pg = PgCluster::start();
    pg.admin_sql(SCHEMA);
    pg
}

/// A gateway config with [`RULES`], `extra` (more `spec` fields, two-space
/// indent) and `approval: {wait, expiresAfter}`.
fn builder(pg: &PgCluster, wait: &str, expires_after: &str, extra: &str) -> GatewayBuilder {
    let spec = format!(
        "{RULES}{extra}  approval:\n    approvers: {{users: [alice, {me}]}}\n    \
         wait: {wait}\n    expiresAfter: {expires_after}\n",
        // The CLI decides as the user running the tests.
        me = os_user()
    );
    Gateway::builder(pg).policy_yaml(policy_with_rules(pg.port(), None, &spec))
}

fn setup(wait: &str, expires_after: &str) -> Setup {
    setup_with(wait, expires_after, "")
}

fn setup_with(wait: &str, expires_after: &str, extra: &str) -> Setup {
    let pg = cluster();
    let gw = builder(&pg, wait, expires_after, extra).start();
    let cli = ApprovalsCli::new(gw.state_dir());
    Setup {
        rt: runtime(),
        gw,
        cli,
        pg,
    }
}

/// Two workers: a held statement's task runs while the test thread runs the CLI.
fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

impl Setup {
    fn connect(&self) -> (Client, mpsc::UnboundedReceiver<DbError>) {
        self.rt.block_on(connect(&self.gw))
    }

    /// `sql` through `client` (simple protocol), where it must not be held.
    fn simple(&self, client: &Client, sql: &str) -> Result<Vec<SimpleQueryMessage>, Box<DbError>> {
        prompt(&self.rt, sql, client.simple_query(sql))
    }

    /// `sql` with `params` through `client` (extended protocol), where it must not be held.
    fn execute(
        &self,
        client: &Client,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Box<DbError>> {
        prompt(&self.rt, sql, client.execute(sql, params))
    }

    /// Runs `sql` (simple protocol) and expects the fail-fast refusal; returns
    /// the request id it names.
    fn refused_id(&self, client: &Client, sql: &str) -> String {
        let err = self
            .simple(client, sql)
            .expect_err("a statement that needs approval ran");
        approval_refusal_id(&err, &self.cli)
    }

    fn items(&self) -> String {
        items(&self.pg)
    }
}

/// A tokio-postgres session through the gateway; its NoticeResponses arrive on
/// the receiver.
async fn connect(gw: &Gateway) -> (Client, mpsc::UnboundedReceiver<DbError>) {
    let (client, mut connection) =
        tokio::time::timeout(PROMPT, tokio_postgres::connect(&gw.conninfo(), NoTls))
            .await
            .expect("connecting through the gateway timed out")
            .expect("connect through the gateway");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notice(notice)) => {
                    let _ = tx.send(notice);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    (client, rx)
}

fn prompt<T>(
    rt: &Runtime,
    sql: &str,
    query: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, Box<DbError>> {
    let result = rt
        .block_on(async { tokio::time::timeout(PROMPT, query).await })
        .unwrap_or_else(|_| panic!("{sql:?} got no answer within {PROMPT:?}"));
    result.map_err(|e| owned_db_error(&e))
}

/// The server's (or the gateway's) ErrorResponse in `err`, boxed (it is large).
fn owned_db_error(err: &tokio_postgres::Error) -> Box<DbError> {
    err.as_db_error()
        .map(|e| Box::new(e.clone()))
        .unwrap_or_else(|| panic!("expected an ErrorResponse, got {err:?}"))
}

/// A statement running in a task (so the test can decide while it is held),
/// handing back its client with the result.
type Held<T> = JoinHandle<(Client, Result<T, tokio_postgres::Error>)>;

fn hold_simple(rt: &Runtime, client: Client, sql: &str) -> Held<Vec<SimpleQueryMessage>> {
    let sql = sql.to_string();
    rt.spawn(async move {
        let result = client.simple_query(&sql).await;
        (client, result)
    })
}

/// Waits (at most `within`) for a held statement to end.
fn finish<T>(rt: &Runtime, held: Held<T>, within: Duration) -> (Client, Result<T, Box<DbError>>) {
    let (client, result) = rt
        .block_on(async { tokio::time::timeout(within, held).await })
        .unwrap_or_else(|_| panic!("the held statement had not ended {within:?} later"))
        .expect("the held statement's task panicked");
    (client, result.map_err(|e| owned_db_error(&e)))
}

/// Rows affected, from a simple query's CommandComplete.
fn command_rows(messages: &[SimpleQueryMessage]) -> u64 {
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .expect("no CommandComplete")
}

/// The first column of the first row of a simple query's result.
fn first_value(messages: &[SimpleQueryMessage]) -> String {
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row.get(0).unwrap_or("NULL").to_string()),
            _ => None,
        })
        .expect("no row")
}

/// The ids left in `items`, read directly from the cluster.
fn items(pg: &PgCluster) -> String {
    pg.admin_sql("SELECT string_agg(id::text, ',' ORDER BY id) FROM items")
}

const ALL_ITEMS: &str = "1,2,3,4,5,6,7,8,9,10";

/// Asserts `err` is the fail-fast refusal (42501, names the request and
/// "approval", hint with the approve command) and returns the request id.
fn approval_refusal_id(err: &DbError, cli: &ApprovalsCli) -> String {
    assert_eq!(err.code(), &SqlState::INSUFFICIENT_PRIVILEGE, "{err:?}");
    assert!(err.message().contains("approval"), "{err:?}");
    let id = request_id_in(err.message())
        .unwrap_or_else(|| panic!("the refusal names no request id: {err:?}"));
    let hint = err.hint().unwrap_or_default();
    assert!(
        hint.contains(&cli.approve_command(&id)),
        "the hint does not say how to approve ({:?}): {err:?}",
        cli.approve_command(&id)
    );
    id
}

/// Asserts `err` is a denial (42501 with "denied"), carrying `reason` if given.
fn assert_denied(err: &DbError, reason: Option<&str>) {
    assert_eq!(err.code(), &SqlState::INSUFFICIENT_PRIVILEGE, "{err:?}");
    assert!(err.message().contains("denied"), "{err:?}");
    if let Some(reason) = reason {
        assert!(
            err.message().contains(reason),
            "the reviewer's reason {reason:?} is missing: {err:?}"
        );
    }
}

fn id_of(request: &Value) -> String {
    request["id"]
        .as_str()
        .unwrap_or_else(|| panic!("request without an id: {request}"))
        .to_string()
}

fn timestamp(request: &Value, field: &str) -> Timestamp {
    let text = request[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string: {request}"));
    text.parse()
        .unwrap_or_else(|e| panic!("{field} {text:?} is not RFC 3339: {e}"))
}

fn seconds_between(from: Timestamp, to: Timestamp) -> f64 {
    to.duration_since(from).as_secs_f64()
}

/// Asserts the request's decision: action, reason, and that the CLI stamped
/// the OS user and a time.
fn assert_decision(request: &Value, action: &str, reason: &str) {
    let decision = &request["decision"];
    assert_eq!(decision["action"], action, "{request}");
    assert_eq!(decision["reason"], reason, "{request}");
    assert_eq!(decision["decidedBy"], os_user().as_str(), "{request}");
    let decided = timestamp(decision, "decidedAt");
    let created = timestamp(request, "createdAt");
    assert!(
        seconds_between(created, decided) > -1.0,
        "decided before it was created: {request}"
    );
}

// === wait mode ===

#[test]
fn wait_then_approve_runs_the_statement_on_the_held_connection() {
    let s = setup("30s", "1h");
    let (client, mut notices) = s.connect();
    let held = hold_simple(&s.rt, client, DELETE_FIRST_THREE);
    let request = s.cli.wait_for_pending(DELETE_FIRST_THREE, &[]);
    let id = id_of(&request);

    // What the reviewer is shown.
    assert!(is_request_id(&id), "{request}");
    assert_eq!(request["policy"], POLICY_NAME, "{request}");
    assert_eq!(request["database"], APP_DATABASE, "{request}");
    assert_eq!(request["requester"]["subject"], "dev", "{request}");
    assert_eq!(request["statement"], DELETE_FIRST_THREE, "{request}");
    assert_eq!(request["parameters"], json!([]), "{request}");
    assert!(
        request["fingerprint"]
            .as_str()
            .is_some_and(|f| f.starts_with("sha256:") || f.starts_with("hmac-sha256:")),
        "{request}"
    );
    assert!(
        request["reason"]
            .as_str()
            .is_some_and(|r| r.contains("risky-deletes")),
        "the reason names the rule: {request}"
    );
    assert!(request["decision"].is_null(), "{request}");
    assert!(request["result"].is_null(), "{request}");
    let created = timestamp(&request, "createdAt");
    let expires = timestamp(&request, "expiresAt");
    assert!(
        seconds_between(created, Timestamp::now()).abs() < 60.0,
        "createdAt is not now: {request}"
    );
    let lifetime = seconds_between(created, expires);
    assert!(
        (3595.0..=3605.0).contains(&lifetime),
        "expiresAfter: 1h, but the request lives {lifetime}s: {request}"
    );
    // Stored as the full resource, one file per request.
    let file = s
        .cli
        .state_dir()
        .join("approvals")
        .join(format!("{id}.json"));
    let stored: Value = serde_json::from_str(
        &std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display())),
    )
    .unwrap_or_else(|e| panic!("{} is not JSON: {e}", file.display()));
    assert_eq!(stored["kind"], "ApprovalRequest", "{stored}");
    assert_eq!(stored["metadata"]["name"], id.as_str(), "{stored}");
    assert_eq!(stored["spec"]["statement"], DELETE_FIRST_THREE, "{stored}");

    // Held, not run: the client has no answer yet, only the notice, and the
    // rows are all there.
    let notice =
        s.rt.block_on(async { tokio::time::timeout(PROMPT, notices.recv()).await })
            .expect("no NoticeResponse while the statement is held")
            .expect("the connection closed");
    for part in [id.as_str(), "risky-deletes", &s.cli.approve_command(&id)] {
        assert!(
            notice.message().contains(part),
            "the notice lacks {part:?}: {notice:?}"
        );
    }
    assert!(!held.is_finished(), "the statement was not held");
    assert_eq!(s.items(), ALL_ITEMS);

    s.cli.approve(&id, "three test rows, fine");
    let (client, result) = finish(&s.rt, held, AFTER_DECISION);
    let messages = result.expect("the approved DELETE failed");
    assert_eq!(command_rows(&messages), 3);
    assert_eq!(s.items(), "4,5,6,7,8,9,10");
    let done = s.cli.wait_for_outcome(&id);
    assert_eq!(done["phase"], "Executed", "{done}");
    assert_eq!(done["result"], "DELETE 3", "{done}");
    assert_decision(&done, "Approve", "three test rows, fine");

    // The session goes on.
    let count = s.simple(&client, "SELECT count(*) FROM items").unwrap();
    assert_eq!(first_value(&count), "7");

    // The approval was single-use: the same statement waits for a new one.
    let held = hold_simple(&s.rt, client, DELETE_FIRST_THREE);
    let again = s.cli.wait_for_pending(DELETE_FIRST_THREE, &[&id]);
    let again_id = id_of(&again);
    assert_ne!(again_id, id);
    assert_eq!(
        again["fingerprint"], request["fingerprint"],
        "same statement, parameters and subject"
    );
    s.cli.deny(&again_id, "once is enough");
    let (_client, result) = finish(&s.rt, held, AFTER_DECISION);
    assert_denied(
        &result.expect_err("a denied statement ran"),
        Some("once is enough"),
    );
    let all = s.cli.list();
    let phases: Vec<(String, Value)> = all.iter().map(|r| (id_of(r), r["phase"].clone())).collect();
    assert_eq!(
        phases,
        vec![(id, json!("Executed")), (again_id, json!("Denied"))],
        "newest last"
    );
}

#[test]
fn deny_refuses_with_the_reason_and_the_session_goes_on() {
    let s = setup("30s", "1h");
    let (client, _notices) = s.connect();
    let sql = "DELETE FROM items WHERE id > $1";
    let held = s.rt.spawn(async move {
        let result = client.execute(sql, &[&8i32]).await;
        (client, result)
    });
    // Extended protocol: held at Execute, with the bind parameters known.
    let request = s.cli.wait_for_pending(sql, &[]);
    let id = id_of(&request);

    s.cli.deny(&id, "not during the release freeze");
    let (client, result) = finish(&s.rt, held, AFTER_DECISION);
    let err = result.expect_err("a denied statement ran");
    assert_denied(&err, Some("not during the release freeze"));
    assert_eq!(s.items(), ALL_ITEMS);
    let denied = s.cli.show(&id);
    assert_eq!(denied["phase"], "Denied", "{denied}");
    assert!(denied["result"].is_null(), "{denied}");
    assert_decision(&denied, "Deny", "not during the release freeze");

    // The session goes on.
    let n: i64 =
        s.rt.block_on(client.query_one("SELECT count(*) FROM items", &[]))
            .expect("the session is unusable after a denial")
            .get(0);
    assert_eq!(n, 10);

    // A retry is refused at once with the denial, and asks nobody again.
    let err = s
        .execute(&client, sql, &[&8i32])
        .expect_err("a denied statement ran on retry");
    assert_denied(&err, None);
    assert_eq!(
        s.cli.list().len(),
        1,
        "a retry of a denied statement made a new request"
    );
    assert_eq!(s.items(), ALL_ITEMS);
    assert_eq!(request["parameters"], json!(["8"]), "{request}");
}

#[test]
fn psql_shows_the_waiting_notice_and_gets_its_result() {
    let s = setup("30s", "1h");
    const SQL: &str = "DELETE FROM items WHERE id <= 4";
    let env = s.gw.env();
    let psql = thread::spawn(move || run_psql(&env, &["-v", "ON_ERROR_STOP=1", "-c", SQL], None));
    let id = id_of(&s.cli.wait_for_pending(SQL, &[]));
    assert!(!psql.is_finished(), "psql was not held");
    s.cli.approve(&id, "ok");
    let out = psql.join().expect("psql thread");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "psql failed: {}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("DELETE 4"),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    for part in [
        "NOTICE:",
        id.as_str(),
        "risky-deletes",
        &s.cli.approve_command(&id),
    ] {
        assert!(
            stderr.contains(part),
            "psql did not show {part:?}:\n{stderr}"
        );
    }
    assert_eq!(s.items(), "5,6,7,8,9,10");
}

#[test]
fn results_are_recorded_executed_with_the_tag_or_failed_with_the_error() {
    let s = setup("30s", "1h");
    let (client, _notices) = s.connect();

    const DDL: &str = "ALTER TABLE items ADD COLUMN reviewed boolean";
    let held = hold_simple(&s.rt, client, DDL);
    let id = id_of(&s.cli.wait_for_pending(DDL, &[]));
    s.cli.approve(&id, "schema change reviewed");
    let (client, result) = finish(&s.rt, held, AFTER_DECISION);
    result.expect("the approved ALTER TABLE failed");
    let done = s.cli.wait_for_outcome(&id);
    assert_eq!(done["phase"], "Executed", "{done}");
    assert_eq!(done["result"], "ALTER TABLE", "{done}");
    assert_eq!(
        s.pg.admin_sql(
            "SELECT count(*) FROM information_schema.columns \
             WHERE table_name = 'items' AND column_name = 'reviewed'"
        ),
        "1"
    );

    // Approved, but the server refuses it: Failed, with the server's error,
    // which the client gets unchanged.
    const FK: &str = "DELETE FROM customers WHERE id = 1";
    let held = hold_simple(&s.rt, client, FK);
    let id = id_of(&s.cli.wait_for_pending(FK, &[]));
    s.cli.approve(&id, "go ahead");
    let (client, result) = finish(&s.rt, held, AFTER_DECISION);
    let err = result.expect_err("deleting a referenced customer succeeded");
    assert_eq!(err.code(), &SqlState::FOREIGN_KEY_VIOLATION, "{err:?}");
    let failed = s.cli.wait_for_outcome(&id);
    assert_eq!(failed["phase"], "Failed", "{failed}");
    assert!(
        failed["result"]
            .as_str()
            .is_some_and(|r| r.contains("violates foreign key constraint")),
        "the server's error is the result: {failed}"
    );
    assert_eq!(s.pg.admin_sql("SELECT count(*) FROM customers"), "3");
    let one = s
        .simple(&client, "SELECT 1")
        .expect("session unusable after a failed release");
    assert_eq!(first_value(&one), "1");
}

#[test]
fn no_decision_within_wait_is_an_error_and_the_request_stays_decidable() {
    let s = setup("2s", "1h");
    let (client, _notices) = s.connect();
    let started = Instant::now();
    let err =
        s.rt.block_on(async {
            tokio::time::timeout(AFTER_DECISION, client.simple_query(DELETE_FIRST_THREE)).await
        })
        .expect("still held long after wait: 2s")
        .expect_err("an undecided statement ran");
    let waited = started.elapsed();
    let err = owned_db_error(&err);
    assert_eq!(err.code(), &SqlState::INSUFFICIENT_PRIVILEGE, "{err:?}");
    assert!(err.message().contains("not decided within"), "{err:?}");
    assert!(
        waited >= Duration::from_millis(1900),
        "gave up after {waited:?}, before wait: 2s"
    );
    assert_eq!(s.items(), ALL_ITEMS);
    let requests = s.cli.list();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0]["phase"], "Pending", "{requests:?}");
    let id = id_of(&requests[0]);

    // Approved later, a retry of the same statement runs at once.
    s.cli.approve(&id, "sorry for the delay");
    let started = Instant::now();
    let messages = s
        .simple(&client, DELETE_FIRST_THREE)
        .expect("the approved retry failed");
    assert_eq!(command_rows(&messages), 3);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "an approved retry was held again ({:?})",
        started.elapsed()
    );
    assert_eq!(s.items(), "4,5,6,7,8,9,10");
    let done = s.cli.wait_for_outcome(&id);
    assert_eq!(done["phase"], "Executed", "{done}");
    assert_eq!(done["result"], "DELETE 3", "{done}");
    assert_eq!(s.cli.list().len(), 1);
}

#[test]
fn cancel_ends_the_wait_and_the_session_goes_on() {
    let s = setup("30s", "1h");
    let (client, _notices) = s.connect();
    let token = client.cancel_token();
    let held = hold_simple(&s.rt, client, DELETE_FIRST_THREE);
    s.cli.wait_for_pending(DELETE_FIRST_THREE, &[]);
    s.rt.block_on(token.cancel_query(NoTls))
        .expect("sending the CancelRequest");
    let (client, result) = finish(&s.rt, held, Duration::from_secs(10));
    let err = result.expect_err("a cancelled held statement ran");
    assert_eq!(err.code(), &SqlState::QUERY_CANCELED, "{err:?}");
    assert_eq!(s.items(), ALL_ITEMS);
    let count = s
        .simple(&client, "SELECT count(*) FROM items")
        .expect("session unusable after a cancelled wait");
    assert_eq!(first_value(&count), "10");
}

#[test]
fn psql_ctrl_c_ends_the_wait() {
    let s = setup("30s", "1h");
    let mut cmd = pgwarden_e2e::libpq_command("psql", &s.gw.env());
    cmd.args(["-X", "-v", "VERBOSITY=verbose", "-c", DELETE_FIRST_THREE])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn psql");
    let pid = child.id().to_string();
    let psql = thread::spawn(move || child.wait_with_output().expect("wait for psql"));
    s.cli.wait_for_pending(DELETE_FIRST_THREE, &[]);
    assert!(!psql.is_finished(), "psql was not held");
    // What Ctrl-C does: SIGINT makes psql send a CancelRequest. (psql -c then
    // exits, as it does for a cancelled statement on PostgreSQL itself; that
    // the session survives is shown with tokio-postgres above.)
    let sent = Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -INT {pid} failed");
    let ended = pgwarden_e2e::wait_until(Duration::from_secs(10), || psql.is_finished());
    if !ended {
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
        panic!("psql was still waiting 10 s after Ctrl-C");
    }
    let out = psql.join().expect("psql thread");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("57014"),
        "not cancelled:\n{stdout}\n{stderr}"
    );
    assert_eq!(s.items(), ALL_ITEMS);
}

#[test]
fn other_connections_are_unaffected_while_one_waits() {
    let s = setup("30s", "1h");
    let (waiting, _notices) = s.connect();
    let held_a = hold_simple(&s.rt, waiting, DELETE_FIRST_THREE);
    let id_a = id_of(&s.cli.wait_for_pending(DELETE_FIRST_THREE, &[]));

    // New sessions log in and work at full speed.
    let (other, _other_notices) = s.connect();
    let count = s.simple(&other, "SELECT count(*) FROM items").unwrap();
    assert_eq!(first_value(&count), "10");
    assert_eq!(
        s.execute(
            &other,
            "INSERT INTO items VALUES ($1, $2)",
            &[&11i32, &"new"]
        )
        .unwrap(),
        1
    );
    assert_eq!(psql_query(&s.gw, "SELECT max(id) FROM items"), "11");

    // A second hold on another connection is decided on its own.
    const ONE: &str = "DELETE FROM items WHERE id = 11";
    let (third, _third_notices) = s.connect();
    let held_c = hold_simple(&s.rt, third, ONE);
    let id_c = id_of(&s.cli.wait_for_pending(ONE, &[]));
    assert_ne!(id_c, id_a);
    s.cli.deny(&id_c, "keep the new one");
    let (_third, result) = finish(&s.rt, held_c, AFTER_DECISION);
    assert_denied(
        &result.expect_err("denied, yet ran"),
        Some("keep the new one"),
    );
    assert!(
        !held_a.is_finished(),
        "deciding one request ended another's wait"
    );

    s.cli.approve(&id_a, "fine");
    let (_waiting, result) = finish(&s.rt, held_a, AFTER_DECISION);
    assert_eq!(command_rows(&result.expect("approved, yet failed")), 3);
    assert_eq!(s.items(), "4,5,6,7,8,9,10,11");
}

#[test]
fn a_hold_inside_a_transaction_runs_in_that_transaction() {
    let s = setup("30s", "1h");
    let (client, _notices) = s.connect();
    s.rt.block_on(
        client.batch_execute("BEGIN; INSERT INTO items VALUES (100, 'in the transaction')"),
    )
    .expect("BEGIN + INSERT");
    let held = hold_simple(&s.rt, client, DELETE_FIRST_THREE);
    let id = id_of(&s.cli.wait_for_pending(DELETE_FIRST_THREE, &[]));
    // The transaction stays open upstream while the statement waits.
    assert_eq!(
        s.pg.admin_sql(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE usename = 'app' AND state = 'idle in transaction'"
        ),
        "1"
    );
    assert_eq!(s.items(), ALL_ITEMS);
    s.cli.approve(&id, "inside the transaction");
    let (client, result) = finish(&s.rt, held, AFTER_DECISION);
    assert_eq!(command_rows(&result.expect("approved, yet failed")), 3);
    // It ran in the transaction: it sees the insert, and rolling back undoes it.
    let count = s.simple(&client, "SELECT count(*) FROM items").unwrap();
    assert_eq!(first_value(&count), "8");
    s.simple(&client, "ROLLBACK").unwrap();
    assert_eq!(s.items(), ALL_ITEMS);
}

// === fail fast ===

#[test]
fn fail_fast_then_retry_executes_once_and_only_once() {
    let s = setup("0s", "1h");
    let (client, _notices) = s.connect();
    // Refused at once (within PROMPT), naming the request and the approve command.
    let id = s.refused_id(&client, DELETE_FIRST_THREE);
    let requests = s.cli.list();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0]["id"], id.as_str());
    assert_eq!(requests[0]["phase"], "Pending");
    assert_eq!(requests[0]["statement"], DELETE_FIRST_THREE);

    // Retrying before a decision reuses the pending request.
    assert_eq!(s.refused_id(&client, DELETE_FIRST_THREE), id);
    assert_eq!(s.cli.list().len(), 1, "a retry made a duplicate request");
    assert_eq!(s.items(), ALL_ITEMS);

    s.cli.approve(&id, "go");
    assert_eq!(s.cli.show(&id)["phase"], "Approved");
    let messages = s
        .simple(&client, DELETE_FIRST_THREE)
        .expect("the approved retry failed");
    assert_eq!(command_rows(&messages), 3);
    assert_eq!(s.items(), "4,5,6,7,8,9,10");

    // The approval is spent at once: with the rows back, the same statement
    // (sent right away, before anyone looked at the record) is refused again
    // under a new request and deletes nothing.
    s.pg.admin_sql("INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 3) g");
    let second = s.refused_id(&client, DELETE_FIRST_THREE);
    assert_ne!(second, id);
    assert_eq!(s.items(), ALL_ITEMS);
    let done = s.cli.wait_for_outcome(&id);
    assert_eq!(done["phase"], "Executed", "{done}");
    assert_eq!(done["result"], "DELETE 3", "{done}");
    let requests = s.cli.list();
    let ids: Vec<String> = requests.iter().map(id_of).collect();
    assert_eq!(ids, vec![id, second], "newest last: {requests:?}");
    assert_eq!(requests[1]["phase"], "Pending", "{requests:?}");
}

#[test]
fn an_approval_releases_only_that_statement_with_those_parameters() {
    let s = setup("0s", "1h");
    let (client, _notices) = s.connect();
    let by_id = "DELETE FROM items WHERE id = $1";
    let refused = |sql: &str, params: &[&(dyn ToSql + Sync)]| {
        let err = s
            .execute(&client, sql, params)
            .expect_err("a statement that needs approval ran");
        approval_refusal_id(&err, &s.cli)
    };

    let id_2 = refused(by_id, &[&2i32]);
    assert_eq!(s.cli.show(&id_2)["statement"], by_id);
    s.cli.approve(&id_2, "row 2 only");

    // Other parameters: a request of their own.
    let id_3 = refused(by_id, &[&3i32]);
    assert_ne!(id_3, id_2);
    // Another text with the same effect: a request of its own.
    let literal = "DELETE FROM items WHERE id = 2";
    let id_literal = s.refused_id(&client, literal);
    assert!(
        id_literal != id_2 && id_literal != id_3,
        "{id_literal} reused"
    );
    assert_eq!(s.cli.show(&id_literal)["statement"], literal);
    assert_eq!(s.items(), ALL_ITEMS);
    assert_eq!(
        s.cli.show(&id_2)["phase"],
        "Approved",
        "the approval was spent on another statement"
    );

    // The approved statement with its parameters runs, once.
    assert_eq!(
        s.execute(&client, by_id, &[&2i32])
            .expect("approved, yet refused"),
        1
    );
    assert_eq!(s.items(), "1,3,4,5,6,7,8,9,10");
    let again = refused(by_id, &[&2i32]);
    assert!(
        ![&id_2, &id_3, &id_literal].contains(&&again),
        "{again} reused"
    );
    let done = s.cli.wait_for_outcome(&id_2);
    assert_eq!(done["phase"], "Executed", "{done}");
    assert_eq!(done["result"], "DELETE 1", "{done}");
    assert_eq!(s.cli.list().len(), 4);

    // What the reviewer is shown: the bind parameters as text, although
    // tokio-postgres sends them in binary.
    for (id, text) in [(&id_2, "2"), (&id_3, "3"), (&again, "2")] {
        let request = s.cli.show(id);
        assert_eq!(request["parameters"], json!([text]), "{request}");
    }
    assert_eq!(s.cli.show(&id_literal)["parameters"], json!([]));
}

#[test]
fn an_expired_request_cannot_be_approved() {
    let s = setup("0s", "2s");
    let (client, _notices) = s.connect();
    let id = s.refused_id(&client, DELETE_FIRST_THREE);
    let request = s.cli.show(&id);
    assert_eq!(request["phase"], "Pending", "{request}");
    let expires = timestamp(&request, "expiresAt");
    let lifetime = seconds_between(timestamp(&request, "createdAt"), expires);
    assert!(
        (1.0..=3.5).contains(&lifetime),
        "expiresAfter: 2s, but the request lives {lifetime}s: {request}"
    );

    // Expiry is a wall-clock deadline: nothing to poll until it has passed.
    let left = Duration::try_from(expires.duration_since(Timestamp::now())).unwrap_or_default();
    assert!(left <= Duration::from_secs(3), "{request}");
    thread::sleep(left + Duration::from_millis(1100));

    let out = s.cli.try_approve(&id, Some("too late"));
    assert_eq!(out.code(), Some(1), "approving an expired request: {out}");
    assert!(
        out.stderr.to_lowercase().contains("expired"),
        "the refusal does not say why: {out}"
    );
    let expired = s.cli.show(&id);
    assert_eq!(expired["phase"], "Expired", "{expired}");
    assert!(expired["decision"].is_null(), "{expired}");
    let out = s.cli.try_deny(&id, Some("too late"));
    assert_eq!(out.code(), Some(1), "denying an expired request: {out}");

    // Nothing ran; a retry asks anew.
    assert_eq!(s.items(), ALL_ITEMS);
    let retry = s.refused_id(&client, DELETE_FIRST_THREE);
    assert_ne!(retry, id, "a retry was tied to the expired request");
    assert_eq!(s.items(), ALL_ITEMS);
}

#[test]
fn pending_requests_and_decisions_survive_a_gateway_restart() {
    let pg = cluster();
    let state = tempfile::Builder::new()
        .prefix("pgwarden-e2e-approvals-")
        .tempdir()
        .expect("state dir");
    let builder = builder(&pg, "0s", "1h", "").state_dir(state.path());
    let cli = ApprovalsCli::new(state.path());
    let rt = runtime();
    const FIRST_TWO: &str = "DELETE FROM items WHERE id <= 2";
    const LAST_TWO: &str = "DELETE FROM items WHERE id >= 9";

    let gw = builder.clone().start();
    let s1 = Setup {
        rt,
        gw,
        cli: cli.clone(),
        pg,
    };
    let (client, _notices) = s1.connect();
    let pending = s1.refused_id(&client, FIRST_TWO);
    let denied = s1.refused_id(&client, LAST_TWO);
    cli.deny(&denied, "keep the tail");
    drop(client);
    let Setup { rt, gw, pg, .. } = s1;
    gw.shutdown();

    let s = Setup {
        rt,
        gw: builder.start(),
        cli,
        pg,
    };
    let requests = s.cli.list();
    assert_eq!(requests.len(), 2, "{requests:?}");
    let before = s.cli.show(&pending);
    assert_eq!(before["phase"], "Pending", "{before}");
    assert_eq!(before["statement"], FIRST_TWO, "{before}");
    let kept = s.cli.show(&denied);
    assert_eq!(kept["phase"], "Denied", "{kept}");
    assert_decision(&kept, "Deny", "keep the tail");

    // Decided after the restart, released by the new gateway, once.
    s.cli.approve(&pending, "after the restart");
    let (client, _notices) = s.connect();
    let messages = s.simple(&client, FIRST_TWO).expect("approved, yet refused");
    assert_eq!(command_rows(&messages), 2);
    assert_eq!(s.items(), "3,4,5,6,7,8,9,10");
    let next = s.refused_id(&client, FIRST_TWO);
    assert_ne!(next, pending);
    assert_eq!(s.items(), "3,4,5,6,7,8,9,10");
    assert_eq!(s.cli.wait_for_outcome(&pending)["phase"], "Executed");

    // The denial made before the restart still holds, without a new request.
    let err = s
        .simple(&client, LAST_TWO)
        .expect_err("a denied statement ran after a restart");
    assert_denied(&err, None);
    assert_eq!(s.cli.list().len(), 3);
    assert_eq!(s.items(), "3,4,5,6,7,8,9,10");
}

#[test]
fn the_cli_refuses_unknown_ids_and_second_decisions() {
    let s = setup("0s", "1h");
    let unknown = format!("{POLICY_NAME}-000000");
    for out in [
        s.cli.try_approve(&unknown, None),
        s.cli.try_deny(&unknown, Some("x")),
    ] {
        assert_eq!(out.code(), Some(1), "deciding an unknown id: {out}");
        assert!(out.stderr.contains(&unknown), "{out}");
    }
    assert_ne!(s.cli.run(&["show", &unknown]).code(), Some(0));
    assert!(s.cli.list().is_empty());

    let (client, _notices) = s.connect();
    let id = s.refused_id(&client, DELETE_FIRST_THREE);
    let text = s.cli.run(&["show", &id]);
    assert_eq!(text.code(), Some(0), "{text}");
    for part in [id.as_str(), DELETE_FIRST_THREE, "Pending"] {
        assert!(
            text.stdout.contains(part),
            "show (text) lacks {part:?}: {text}"
        );
    }

    s.cli.approve(&id, "first decision");
    for out in [
        s.cli.try_approve(&id, Some("second")),
        s.cli.try_deny(&id, Some("changed my mind")),
    ] {
        assert_eq!(out.code(), Some(1), "a second decision: {out}");
        assert!(!out.stderr.trim().is_empty(), "{out}");
    }
    let request = s.cli.show(&id);
    assert_eq!(request["phase"], "Approved", "{request}");
    assert_decision(&request, "Approve", "first decision");
}

// === sensitive parameters ===

#[test]
fn sensitive_parameters_never_reach_the_state_dir() {
    const CARD: &str = "4111111111111111";
    const OTHER_CARD: &str = "5500000000000004";
    const EMAIL: &str = "ann.secret@example.com";
    const SSN: &str = "078-05-1120";
    let s = setup_with(
        "0s",
        "1h",
        "  masking:\n    - {columns: [\"public.customers.card_number\"], strategy: Partial, keepLast: 4}\n",
    );
    let (client, _notices) = s.connect();
    let refused = |sql: &str, value: &str| {
        let err = s
            .execute(&client, sql, &[&value])
            .expect_err("a statement that needs approval ran");
        approval_refusal_id(&err, &s.cli)
    };

    // A parameter compared with a masked column is stored masked...
    let by_card = "DELETE FROM customers WHERE card_number = $1";
    let id = refused(by_card, CARD);
    let request = s.cli.show(&id);
    assert_eq!(request["statement"], by_card, "{request}");
    assert_eq!(request["parameters"], json!(["****"]), "{request}");
    s.cli.approve(&id, "Bob asked to be forgotten");
    // ...yet the approval still releases only that value.
    let other = refused(by_card, OTHER_CARD);
    assert_ne!(other, id, "masking the parameter merged two requests");
    assert_eq!(s.cli.show(&other)["parameters"], json!(["****"]));
    assert_eq!(
        s.execute(&client, by_card, &[&CARD])
            .expect("approved, yet refused"),
        1
    );
    assert_eq!(
        s.pg.admin_sql("SELECT string_agg(name, ',' ORDER BY id) FROM customers"),
        "Ann,Cy"
    );
    assert_eq!(s.cli.wait_for_outcome(&id)["phase"], "Executed");

    // Values that look sensitive are masked whatever the column; others are kept.
    let by_note = "DELETE FROM items WHERE note = $1";
    for value in [EMAIL, SSN] {
        let id = refused(by_note, value);
        assert_eq!(
            s.cli.show(&id)["parameters"],
            json!(["****"]),
            "{value:?} stored"
        );
    }
    let plain = refused(by_note, "item 5");
    assert_eq!(s.cli.show(&plain)["parameters"], json!(["item 5"]));

    // Nothing a reviewer or an attacker with the state dir can read holds a raw value.
    let state = s.cli.state_dir();
    let files = files_under(state);
    assert!(
        files.len() >= 5,
        "expected a file per request under {}: {files:?}",
        state.display()
    );
    let listing = s.cli.run(&["list", "-o", "json"]).stdout;
    let shown = s.cli.run(&["show", &id]).stdout;
    let logs = s.gw.logs();
    let hex = |v: &str| v.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let encoded: Vec<String> = [CARD, OTHER_CARD, EMAIL, SSN]
        .iter()
        .flat_map(|v| [hex(v), hex(v).to_uppercase()])
        .collect();
    let raw = [CARD, &CARD[..12], OTHER_CARD, EMAIL, SSN];
    for needle in raw
        .iter()
        .copied()
        .chain(encoded.iter().map(String::as_str))
    {
        let leaked = files_containing(state, needle);
        assert!(leaked.is_empty(), "{needle:?} was written to {leaked:?}");
        assert!(!listing.contains(needle), "approvals list shows {needle:?}");
        assert!(!shown.contains(needle), "approvals show prints {needle:?}");
        assert!(!logs.contains(needle), "the gateway logged {needle:?}");
    }
}
