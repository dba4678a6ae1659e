//! Session recording end to end: pgwarden in front of a real PostgreSQL with
//! `recording:` in its policy, real clients (psql, tokio-postgres) doing what
//! agents do — reads of masked columns, refused statements, statements a human
//! approves, prepared statements with parameters — and then an auditor's view
//! of it: the spool under the state dir, `pgwarden sessions list|replay|verify`
//! run as a separate process, and an audit PostgreSQL the records are shipped
//! to. Tampering is done on copies of a real spool, exactly as an attacker
//! with file access would: edit a byte, drop or reorder lines, cut the end.

use std::fs;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use pgwarden_e2e::approvals::{files_containing, os_user, request_id_in};
use pgwarden_e2e::oidc::{OidcProvider, ACME, AUDIENCE};
use pgwarden_e2e::recording::{
    copy_dir, edit_segment, expect_result, file_name, recording_yaml, session_ids, sigkill,
    statement, statements_with_text, table_rows, AuditDb, SessionsCli, Spool,
};
use pgwarden_e2e::{
    policy_with_identity, policy_with_rules, run_psql, ApprovalsCli, Endpoint, Gateway,
    GatewayBuilder, PgCluster, APP_DATABASE, APP_PASSWORD, POLICY_NAME,
};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::runtime::Runtime;
use tokio_postgres::error::{DbError, SqlState};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// Raw card numbers in `customers` (masked to their last four digits).
const CARD: &str = "4111111111111111";
const OTHER_CARD: &str = "4929123456781234";
const MASKED_CARD: &str = "************1111";
const MASKED_OTHER_CARD: &str = "************1234";

/// Longest a statement that must not be held may take.
const PROMPT: Duration = Duration::from_secs(10);
/// Longest a record may take to reach the spool (non-durable: 200 ms) or a
/// session's end to be recorded.
const SPOOL_WAIT: Duration = Duration::from_secs(10);

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, note text);
INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 10) g;
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, card_number text NOT NULL);
INSERT INTO customers VALUES (1, 'Ann', '4929123456781234'), (2, 'Bob', '4111111111111111');
CREATE TABLE secrets (id int PRIMARY KEY, value text NOT NULL);
INSERT INTO secrets VALUES (1, 'TOP-SECRET-1');
CREATE TABLE t (i bigint NOT NULL);
";

/// Reads and writes on public tables are allowed (rule `app`) except the
/// `secrets` table (rule `no-secrets`); deletes need a reviewer (rule
/// `risky-deletes`, before `app`); card numbers are masked.
const RULES: &str = "  defaultAction: Deny
  rules:
    - {name: no-secrets, action: Deny, tables: [\"public.secrets\"]}
    - {name: risky-deletes, action: RequireApproval, statements: [DELETE]}
    - {name: app, action: Allow, statements: [SELECT, INSERT, UPDATE, DELETE], tables: [\"public.*\"]}
  masking:
    - {columns: [\"public.customers.card_number\"], strategy: Partial, keepLast: 4}
  approval:
    approvers: {users: [alice]}
    wait: 0s
    expiresAfter: 1h
";

// === setup ===

fn cluster() -> PgCluster {
    let pg = PgCluster::start();
    pg.admin_sql(SCHEMA);
    pg
}

/// The policy spec: [`RULES`] plus `recording` (see [`recording_yaml`]).
fn spec(recording: &str) -> String {
    // The CLI decides as the user running the tests: an approver.
    let rules = RULES.replace("[alice]", &format!("[alice, {}]", os_user()));
    format!("{rules}{recording}")
}

/// A gateway under [`RULES`] + `recording`, keeping its state in `state`
/// (owned by the test, so it outlives the gateway).
fn builder(pg: &PgCluster, recording: &str, state: &TempDir) -> GatewayBuilder {
    Gateway::builder(pg)
        .policy_yaml(policy_with_rules(pg.port(), None, &spec(recording)))
        .state_dir(state.path())
}

fn state_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("pgwarden-e2e-state-")
        .tempdir()
        .expect("state temp dir")
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A tokio-postgres session to `conninfo` (optionally with a password).
fn connect(rt: &Runtime, conninfo: &str, password: Option<&str>) -> Client {
    rt.block_on(async {
        let mut config = tokio_postgres::Config::from_str(conninfo).expect("conninfo");
        if let Some(p) = password {
            config.password(p);
        }
        let (client, connection) = tokio::time::timeout(PROMPT, config.connect(NoTls))
            .await
            .expect("connecting through the gateway timed out")
            .expect("connect through the gateway");
        tokio::spawn(connection);
        client
    })
}

/// Runs `query` (which must not be held) within [`PROMPT`].
fn prompt<T>(
    rt: &Runtime,
    what: &str,
    query: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, Box<DbError>> {
    let result = rt
        .block_on(async { tokio::time::timeout(PROMPT, query).await })
        .unwrap_or_else(|_| panic!("{what:?} got no answer within {PROMPT:?}"));
    result.map_err(|e| {
        e.as_db_error()
            .map(|e| Box::new(e.clone()))
            .unwrap_or_else(|| panic!("{what:?}: expected an ErrorResponse, got {e:?}"))
    })
}

fn simple(
    rt: &Runtime,
    client: &Client,
    sql: &str,
) -> Result<Vec<SimpleQueryMessage>, Box<DbError>> {
    prompt(rt, sql, client.simple_query(sql))
}

/// The values of a simple query's rows.
fn rows_of(messages: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// Runs `sql` (several statements) in one psql session through `gw`,
/// continuing past errors; returns (stdout, stderr). psql sends each
/// statement with its terminating `;`: that is the text recorded.
fn psql_session(gw: &Gateway, extra_env: &[(String, String)], sql: &str) -> (String, String) {
    let mut env = gw.env();
    env.extend_from_slice(extra_env);
    let out = run_psql(&env, &["-f", "-"], Some(sql));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "psql failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

/// The number of `sessionEnd` records.
fn ended(records: &[Value]) -> usize {
    records.iter().filter(|r| r["kind"] == "sessionEnd").count()
}

/// Waits until the spool holds `n` ended sessions.
fn wait_sessions_ended(spool: &Spool, n: usize) -> Vec<Value> {
    spool.wait_for(&format!("{n} ended session(s)"), SPOOL_WAIT, |r| {
        ended(r) >= n
    })
}

/// A line of `transcript` that starts with `-- ` and contains `needle`.
fn comment_line<'a>(transcript: &'a str, needle: &str) -> &'a str {
    transcript
        .lines()
        .find(|l| l.starts_with("-- ") && l.contains(needle))
        .unwrap_or_else(|| panic!("no `-- ...{needle}` line in the replay:\n{transcript}"))
}

fn assert_no_raw_cards(what: &str, text: &str) {
    for raw in [CARD, OTHER_CARD] {
        assert!(
            !text.contains(raw),
            "{what}: raw card {raw} leaked:\n{text}"
        );
    }
}

// === 1. list and replay ===

const ITEMS_SQL: &str = "SELECT id, note FROM items ORDER BY id LIMIT 3";
const CARDS_SQL: &str = "SELECT id, name, card_number FROM customers ORDER BY id";
const SECRETS_SQL: &str = "SELECT * FROM secrets";
const COUNT_SQL: &str = "SELECT count(*) FROM items";
const DELETE_SQL: &str = "DELETE FROM items WHERE id <= 3";

#[test]
fn sessions_are_listed_and_replayed_with_verdicts_masks_and_approvals() {
    let pg = cluster();
    let state = state_dir();
    let gw = builder(&pg, &recording_yaml(None, false, None), &state).start();
    let cli = SessionsCli::state_dir(state.path());
    let approvals = ApprovalsCli::new(state.path());
    let spool = Spool::new(state.path());

    // Session A, psql: allowed, masked, denied, allowed.
    let (out, err) = psql_session(
        &gw,
        &[],
        &format!("{ITEMS_SQL};\n{CARDS_SQL};\n{SECRETS_SQL};\n{COUNT_SQL};\n"),
    );
    assert!(out.contains(MASKED_CARD), "{out}");
    assert_no_raw_cards("psql output", &out);
    let denial = err
        .lines()
        .find_map(|l| l.find("ERROR:  pgwarden: ").map(|i| l[i..].to_string()))
        .unwrap_or_else(|| panic!("{SECRETS_SQL} was not refused:\n{out}\n{err}"));
    assert!(denial.contains("no-secrets"), "{denial}");
    wait_sessions_ended(&spool, 1);

    // Session B, tokio-postgres: a delete held for approval (fail fast),
    // approved with the CLI, retried; then a read.
    let rt = runtime();
    let client = connect(
        &rt,
        &format!("{} application_name=recording-e2e", gw.conninfo()),
        None,
    );
    let held = simple(&rt, &client, DELETE_SQL).expect_err("the delete ran without approval");
    assert_eq!(held.code(), &SqlState::INSUFFICIENT_PRIVILEGE, "{held:?}");
    let id = request_id_in(held.message())
        .unwrap_or_else(|| panic!("the refusal names no approval request: {held:?}"));
    approvals.approve(&id, "looks fine");
    let deleted = simple(&rt, &client, DELETE_SQL).expect("the approved retry failed");
    assert!(
        deleted
            .iter()
            .any(|m| matches!(m, SimpleQueryMessage::CommandComplete(3))),
        "DELETE did not delete 3 rows"
    );
    let count = simple(&rt, &client, COUNT_SQL).unwrap();
    assert_eq!(rows_of(&count), vec![vec![Some("7".to_string())]]);
    drop(client);
    wait_sessions_ended(&spool, 2);

    // list: both sessions, with who, where, how many and how many refused.
    let sessions = cli.list();
    assert_eq!(sessions.len(), 2, "{sessions:#?}");
    let a = sessions
        .iter()
        .find(|s| s["applicationName"] == "psql")
        .unwrap_or_else(|| panic!("no psql session: {sessions:#?}"))
        .clone();
    let b = sessions
        .iter()
        .find(|s| s["applicationName"] == "recording-e2e")
        .unwrap_or_else(|| panic!("no tokio-postgres session: {sessions:#?}"))
        .clone();
    for s in [&a, &b] {
        let id = s["id"].as_str().unwrap_or_default();
        assert!(
            id.len() == 16 && id.bytes().all(|c| c.is_ascii_hexdigit()),
            "session id {id:?}: {s}"
        );
        assert_eq!(s["subject"], "dev", "{s}");
        assert_eq!(s["database"], APP_DATABASE, "{s}");
        assert!(
            s["policy"]
                .as_str()
                .unwrap_or_default()
                .contains(POLICY_NAME),
            "{s}"
        );
        assert!(
            s["client"]
                .as_str()
                .unwrap_or_default()
                .starts_with("127.0.0.1"),
            "{s}"
        );
        assert!(s["started"].as_str().is_some_and(|t| !t.is_empty()), "{s}");
        assert!(s["ended"].as_str().is_some_and(|t| !t.is_empty()), "{s}");
    }
    assert_eq!(a["statements"], 4, "{a}");
    assert_eq!(a["denied"], 1, "{a}");
    assert_eq!(b["statements"], 3, "{b}");
    assert!(
        a["started"].as_str() <= b["started"].as_str(),
        "oldest first: {sessions:#?}"
    );

    // replay A: the statements as psql showed them, verdicts with rules,
    // the masked rows as a table, the refusal as the client saw it.
    let a_id = a["id"].as_str().unwrap();
    let replay = cli.replay(a_id);
    for sql in [ITEMS_SQL, CARDS_SQL, SECRETS_SQL, COUNT_SQL] {
        assert!(
            replay.contains(&format!("{APP_DATABASE}=> {sql}")),
            "{sql} missing:\n{replay}"
        );
    }
    comment_line(&replay, "#1 [allow, rule app]");
    comment_line(&replay, "#2 [allow, rule app]");
    comment_line(&replay, "#3 [deny, rule no-secrets]");
    comment_line(&replay, "#4 [allow, rule app]");
    assert!(
        replay.lines().any(|l| l == denial),
        "the refusal {denial:?} is not in the replay:\n{replay}"
    );
    let cells = table_rows(&replay);
    for row in [
        vec!["id", "name", "card_number"],
        vec!["1", "Ann", MASKED_OTHER_CARD],
        vec!["2", "Bob", MASKED_CARD],
        vec!["1", "item 1"],
        vec!["3", "item 3"],
    ] {
        let row: Vec<String> = row.into_iter().map(String::from).collect();
        assert!(cells.contains(&row), "row {row:?} missing:\n{replay}");
    }
    // A one-column table has no ` | `: the count's own line.
    assert!(replay.lines().any(|l| l.trim() == "10"), "{replay}");
    assert!(!replay.contains("TOP-SECRET"), "{replay}");
    assert_no_raw_cards("replay", &replay);

    // replay B: held with the request, approved by whom, what it did.
    let b_id = b["id"].as_str().unwrap();
    let replay = cli.replay(b_id);
    assert!(
        replay.contains(&format!("{APP_DATABASE}=> {DELETE_SQL}")),
        "{replay}"
    );
    comment_line(
        &replay,
        &format!("#1 [held, rule risky-deletes, approval {id}]"),
    );
    let reason = held.message().trim_start_matches("pgwarden: ");
    assert!(
        replay.contains(&format!("ERROR:  pgwarden: {reason}")),
        "the held statement's refusal {reason:?} is not in the replay:\n{replay}"
    );
    let approver = os_user();
    comment_line(
        &replay,
        &format!("#2 [approved, rule risky-deletes, approval {id} approved by {approver}]"),
    );
    comment_line(&replay, "#2 DELETE 3");
    comment_line(&replay, "#3 [allow, rule app]");
    assert!(replay.lines().any(|l| l.trim() == "7"), "{replay}");

    // The same as records.
    let records = cli.replay_json(b_id);
    assert_eq!(
        records.first().map(|r| &r["kind"]),
        Some(&json!("sessionStart"))
    );
    assert_eq!(
        records.last().map(|r| &r["kind"]),
        Some(&json!("sessionEnd"))
    );
    let statements: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "statement")
        .collect();
    assert_eq!(statements.len(), 3, "{records:#?}");
    assert_eq!(statements[0]["verdict"], "held", "{}", statements[0]);
    assert_eq!(statements[0]["approval"], id.as_str(), "{}", statements[0]);
    assert_eq!(statements[0]["rule"], "risky-deletes", "{}", statements[0]);
    assert!(
        statements[0]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{}",
        statements[0]
    );
    assert_eq!(statements[1]["verdict"], "approved", "{}", statements[1]);
    assert_eq!(statements[1]["approval"], id.as_str(), "{}", statements[1]);
    assert_eq!(
        statements[1]["approvedBy"],
        approver.as_str(),
        "{}",
        statements[1]
    );
    assert_eq!(expect_result(&records, statements[1])["tag"], "DELETE 3");
    assert!(
        records.iter().all(|r| r["session"] == b_id),
        "replay -o json mixed sessions: {records:#?}"
    );

    // An unknown session is an error; the log is intact.
    let unknown = cli.run(&["replay", "0123456789abcdef"]);
    assert_eq!(unknown.code(), Some(1), "{unknown}");
    assert_eq!(cli.assert_intact().1, 2);
    gw.assert_running();

    // The rows a statement affected are its rows, as psql would say.
    let delete = expect_result(&records, statements[1]);
    assert_eq!(delete["rows"], 3, "DELETE 3 recorded as: {delete}");
}

// === 2. extended protocol ===

#[test]
fn extended_protocol_records_text_and_parameters_masked_where_sensitive() {
    let pg = cluster();
    let state = state_dir();
    let gw = builder(&pg, &recording_yaml(None, false, None), &state).start();
    let spool = Spool::new(state.path());
    let rt = runtime();
    let client = connect(&rt, &gw.conninfo(), None);

    const BY_ID: &str = "SELECT id, note FROM items WHERE id = $1";
    const NOTE: &str = "SELECT note FROM items WHERE id = $1";
    const INSERT: &str = "INSERT INTO items (id, note) VALUES ($1, $2)";
    const CARD_BY_NAME: &str = "SELECT id, card_number FROM customers WHERE name = $1";
    const ID_BY_CARD: &str = "SELECT id FROM customers WHERE card_number = $1";

    let rows = prompt(&rt, BY_ID, client.query(BY_ID, &[&2i32])).unwrap();
    assert_eq!(rows.len(), 1);
    // A prepared statement reused with other parameters.
    let note = prompt(&rt, NOTE, client.prepare(NOTE)).unwrap();
    for id in [3i32, 4] {
        let row = prompt(&rt, NOTE, client.query_one(&note, &[&id])).unwrap();
        assert_eq!(row.get::<_, String>(0), format!("item {id}"));
    }
    let n = prompt(
        &rt,
        INSERT,
        client.execute(INSERT, &[&42i32, &None::<&str>]),
    )
    .unwrap();
    assert_eq!(n, 1);
    // Statements touching the masked column: their parameters are masked,
    // whether or not the value looks sensitive.
    let row = prompt(&rt, CARD_BY_NAME, client.query_one(CARD_BY_NAME, &[&"Bob"])).unwrap();
    assert_eq!(row.get::<_, String>(1), MASKED_CARD);
    let row = prompt(&rt, ID_BY_CARD, client.query_one(ID_BY_CARD, &[&CARD])).unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
    drop(client);

    let records = wait_sessions_ended(&spool, 1);
    let by_id = statement(&records, BY_ID);
    assert_eq!(by_id["verdict"], "allow", "{by_id}");
    assert_eq!(by_id["rule"], "app", "{by_id}");
    let by_id_result = expect_result(&records, by_id);
    assert_eq!(by_id_result["rows"], 1, "{by_id_result}");
    assert_eq!(by_id_result["sample"][0][1], "item 2", "{by_id_result}");

    // One record per execution of the prepared statement.
    let notes = statements_with_text(&records, NOTE);
    assert_eq!(notes.len(), 2, "{notes:#?}");
    assert_ne!(notes[0]["n"], notes[1]["n"], "{notes:#?}");
    assert_eq!(
        expect_result(&records, notes[1])["sample"],
        json!([["item 4"]])
    );
    let insert = statement(&records, INSERT);
    assert_eq!(expect_result(&records, insert)["tag"], "INSERT 0 1");

    // Parameters of statements on the masked table are masked, whatever
    // they look like; their results are masked as the client got them.
    let by_name = statement(&records, CARD_BY_NAME);
    assert_eq!(by_name["parameters"], json!(["****"]), "{by_name}");
    let by_name_result = expect_result(&records, by_name);
    assert_eq!(
        by_name_result["sample"][0][1], MASKED_CARD,
        "{by_name_result}"
    );
    let by_card = statement(&records, ID_BY_CARD);
    assert_eq!(by_card["parameters"], json!(["****"]), "{by_card}");
    let by_card_result = expect_result(&records, by_card);
    assert_eq!(by_card_result["rows"], 1, "{by_card_result}");
    assert!(
        files_containing(state.path(), CARD).is_empty(),
        "the bound card number reached the state dir"
    );

    let session = by_id["session"].as_str().unwrap();
    let replay = SessionsCli::state_dir(state.path()).replay(session);
    assert!(
        replay.contains(&format!("{APP_DATABASE}=> {BY_ID}")),
        "{replay}"
    );
    assert!(replay.contains("$1=****"), "{replay}");
    assert_no_raw_cards("replay", &replay);

    // Parameters and values as a reader would write them, although
    // tokio-postgres binds parameters and asks for results in binary (the
    // parameter types come from the server's ParameterDescription, not from
    // Parse; the columns from the RowDescription answering Describe).
    let params: Vec<&Value> = [by_id, notes[0], notes[1], insert]
        .iter()
        .map(|r| &r["parameters"])
        .collect();
    assert_eq!(
        params,
        [
            &json!(["2"]),
            &json!(["3"]),
            &json!(["4"]),
            &json!(["42", null])
        ],
        "parameters recorded as: {params:?}"
    );
    assert!(replay.contains("$1=2"), "{replay}");
    assert!(replay.contains("$1=42 $2=NULL"), "{replay}");
    let samples: Vec<&Value> = [by_id_result, by_name_result, by_card_result]
        .iter()
        .map(|r| &r["sample"])
        .collect();
    assert_eq!(
        samples,
        [
            &json!([["2", "item 2"]]),
            &json!([["2", MASKED_CARD]]),
            &json!([["2"]])
        ],
        "result rows recorded as: {samples:?}"
    );
    assert_eq!(
        by_id_result["columns"],
        json!(["id", "note"]),
        "{by_id_result}"
    );
}

// === 3. verify ===

/// A spool of three finished sessions (two statements each), written by a
/// gateway that has since shut down cleanly (so its head is current).
fn three_session_spool() -> (TempDir, Vec<String>) {
    let pg = cluster();
    let state = state_dir();
    let gw = builder(&pg, &recording_yaml(None, false, None), &state).start();
    let spool = Spool::new(state.path());
    for k in 1..=3 {
        psql_session(
            &gw,
            &[],
            &format!("SELECT {k} AS probe;\nSELECT id, note FROM items WHERE id = {k};\n"),
        );
        wait_sessions_ended(&spool, k);
    }
    let status = gw.shutdown();
    assert!(status.success(), "pgwarden did not exit cleanly: {status}");
    let ids = session_ids(&spool.records());
    assert_eq!(ids.len(), 3, "{ids:?}");
    (state, ids)
}

/// A copy of the state dir `original`, tampered with by `tamper`; returns the
/// BROKEN line `sessions verify` prints for it.
fn tampered(original: &TempDir, tamper: impl FnOnce(&Spool)) -> String {
    let copy = state_dir();
    copy_dir(original.path(), copy.path());
    let spool = Spool::new(copy.path());
    tamper(&spool);
    SessionsCli::state_dir(copy.path()).assert_broken()
}

/// `broken` names `place` (`seg-N.jsonl:LINE`, or just the file) and says
/// `what` broke.
fn assert_names(broken: &str, place: &str, what: &str) {
    // `seg-...jsonl:1:` must not pass for line 16.
    assert!(
        broken.contains(&format!("{place}:")),
        "verify should name {place}: {broken}"
    );
    assert!(
        broken.contains(what),
        "verify should say {what:?}: {broken}"
    );
}

#[test]
fn verify_catches_edits_deletions_truncation_and_reordering() {
    let (state, ids) = three_session_spool();
    let spool = Spool::new(state.path());
    let lines = spool.lines();
    assert!(
        lines.iter().all(|l| l.complete),
        "a torn line after a clean stop"
    );
    let segment = lines[0].file.clone();
    assert!(
        lines.iter().all(|l| l.file == segment),
        "expected one segment for a small log"
    );
    let records = spool.records();
    let head = spool.head().expect("no head after a clean shutdown");
    assert_eq!(
        head["seq"],
        records.last().unwrap()["seq"],
        "head not current"
    );
    assert_eq!(
        head["hash"],
        records.last().unwrap()["hash"],
        "head not current"
    );

    // Intact: every record and every session is counted.
    let (n, sessions) = SessionsCli::state_dir(state.path()).assert_intact();
    assert_eq!(n as usize, lines.len());
    assert_eq!(sessions, 3);

    let index_of = |pred: &dyn Fn(&Value) -> bool| {
        records
            .iter()
            .position(pred)
            .expect("a record the test relies on")
    };
    let probe2 = index_of(&|r| r["kind"] == "statement" && r["text"] == "SELECT 2 AS probe;");
    let probe2_result = index_of(&|r| {
        r["kind"] == "result" && r["session"] == records[probe2]["session"] && r["n"] == 1
    });
    let second: Vec<usize> = (0..records.len())
        .filter(|&i| records[i]["session"] == ids[1].as_str())
        .collect();
    assert!(
        second.windows(2).all(|w| w[1] == w[0] + 1),
        "sessions overlapped: {records:#?}"
    );

    // An edited byte: "SELECT 2" becomes "SELECT 3" in one record.
    let broken = tampered(&state, |s| {
        edit_segment(&segment_in(s, &segment), |l| {
            assert!(l[probe2].contains("SELECT 2 AS probe"));
            l[probe2] = l[probe2].replacen("SELECT 2 AS probe", "SELECT 3 AS probe", 1);
        })
    });
    assert_names(&broken, &lines[probe2].place(), "edited");

    // A deleted record (a result in the middle).
    let broken = tampered(&state, |s| {
        edit_segment(&segment_in(s, &segment), |l| {
            l.remove(probe2_result);
        })
    });
    assert_names(&broken, &lines[probe2_result].place(), "chain broken");

    // A deleted session (all records of the second of three).
    let broken = tampered(&state, |s| {
        edit_segment(&segment_in(s, &segment), |l| {
            let mut i = 0;
            l.retain(|_| {
                i += 1;
                !second.contains(&(i - 1))
            });
        })
    });
    assert_names(&broken, &lines[second[0]].place(), "chain broken");

    // A truncated file: the last two records cut off (the head catches it).
    let broken = tampered(&state, |s| {
        edit_segment(&segment_in(s, &segment), |l| {
            l.truncate(l.len() - 2);
        })
    });
    assert_names(&broken, &file_name(&segment), "truncated");

    // Two records swapped.
    let broken = tampered(&state, |s| {
        edit_segment(&segment_in(s, &segment), |l| l.swap(probe2, probe2 + 1))
    });
    assert_names(&broken, &lines[probe2].place(), "chain broken");

    // The head rewritten to vouch for another last record.
    let broken = tampered(&state, |s| {
        let mut hash = head["hash"].as_str().unwrap().to_string();
        let last = hash.pop().unwrap();
        hash.push(if last == '0' { '1' } else { '0' });
        fs::write(
            s.dir().join("head"),
            format!("{}\n", json!({"seq": head["seq"], "hash": hash})),
        )
        .unwrap();
    });
    assert_names(&broken, &file_name(&segment), "head");

    // None of this touched the original.
    SessionsCli::state_dir(state.path()).assert_intact();
}

/// The segment named like `original` in `spool` (a copy).
fn segment_in(spool: &Spool, original: &std::path::Path) -> std::path::PathBuf {
    spool.dir().join(file_name(original))
}

// === 4. durable ===

#[test]
fn durable_records_survive_sigkill_for_every_acknowledged_statement() {
    const CLIENTS: u64 = 4;
    const ACKED_BEFORE_KILL: usize = 200;
    let pg = cluster();
    let state = state_dir();
    let gw_builder = builder(&pg, &recording_yaml(None, true, None), &state);
    let gw = gw_builder.clone().start();
    let conninfo = gw.conninfo();
    let rt = runtime();

    // Clients insert as fast as they can; each counts what completed. All
    // log in first: a login can take longer than 200 inserts of the others.
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| connect(&rt, &conninfo, None))
        .collect();
    let tasks: Vec<_> = clients
        .into_iter()
        .zip(0..CLIENTS)
        .map(|(client, c)| {
            let acked = acked.clone();
            rt.spawn(async move {
                let mut i = 0u64;
                loop {
                    let sql = format!("INSERT INTO t VALUES ({})", c * 1_000_000 + i);
                    match client.simple_query(&sql).await {
                        Ok(_) => acked.lock().unwrap().push(sql),
                        Err(e) => return (i, e.to_string()),
                    }
                    i += 1;
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < ACKED_BEFORE_KILL {
        assert!(
            Instant::now() < deadline,
            "only {} statements completed in 60 s",
            acked.lock().unwrap().len()
        );
        thread::sleep(Duration::from_millis(5));
    }
    // Mid-traffic: every client has a statement in flight or about to be.
    sigkill(gw.pid());
    for task in tasks {
        let (sent, error) = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(20), task).await })
            .expect("a client did not notice the gateway die within 20 s")
            .expect("client task panicked");
        assert!(
            sent > 0,
            "a client completed nothing before the kill: {error}"
        );
    }
    drop(gw);
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= ACKED_BEFORE_KILL);

    // Every statement a client saw complete has its statement and its
    // result on disk (complete lines only: a torn tail was never acked).
    let spool = Spool::new(state.path());
    let records = spool.records();
    let mut missing = Vec::new();
    for sql in &acked {
        match statements_with_text(&records, sql).as_slice() {
            [stmt] => match pgwarden_e2e::recording::result_of(&records, stmt) {
                Some(result) => assert_eq!(result["tag"], "INSERT 0 1", "{result}"),
                None => missing.push(format!("result of {sql}")),
            },
            [] => missing.push(sql.clone()),
            more => panic!("{sql} recorded {} times: {more:#?}", more.len()),
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged statements lack records after SIGKILL: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );
    // Nothing ran upstream before its statement record was on disk.
    let upstream = pg.admin_sql("SELECT i FROM t ORDER BY i");
    for i in upstream.lines() {
        let sql = format!("INSERT INTO t VALUES ({i})");
        assert!(
            !statements_with_text(&records, &sql).is_empty(),
            "{sql} reached the database without a record"
        );
    }

    // A crash mid-write leaves a torn last line: simulate one on top of
    // whatever the kill left, and restart on the same state dir.
    let last_segment = spool.segments().pop().expect("a segment");
    let mut torn = fs::OpenOptions::new()
        .append(true)
        .open(&last_segment)
        .unwrap();
    std::io::Write::write_all(&mut torn, b"{\"seq\":999999,\"at\":\"2026-").unwrap();
    drop(torn);
    let gw = gw_builder.start();
    psql_session(&gw, &[], "SELECT 1 AS after_restart;\n");
    wait_sessions_ended(&spool, 1);
    let status = gw.shutdown();
    assert!(status.success(), "pgwarden did not exit cleanly: {status}");

    let lines = spool.lines();
    assert!(
        lines.iter().all(|l| l.complete),
        "the torn line is still there"
    );
    let (n, _) = SessionsCli::state_dir(state.path()).assert_intact();
    assert_eq!(n as usize, lines.len());
    let records = spool.records();
    statement(&records, "SELECT 1 AS after_restart;");
    for sql in &acked {
        assert_eq!(
            statements_with_text(&records, sql).len(),
            1,
            "{sql} lost at restart"
        );
    }
}

// === 5. the audit store ===

#[test]
fn records_reach_the_audit_database_exactly_once_across_its_outage() {
    let mut audit = AuditDb::start();
    let pg = cluster();
    let state = state_dir();
    let gw = builder(&pg, &recording_yaml(None, false, Some("audit-dsn")), &state)
        .extra_file("audit-secret.yaml", audit.secret_yaml("audit-dsn"))
        .start();
    let spool = Spool::new(state.path());

    psql_session(
        &gw,
        &[],
        "SELECT 1 AS before_outage;\nSELECT count(*) FROM items;\n",
    );
    let local = wait_sessions_ended(&spool, 1);
    let rows = audit.wait_for(
        "the first session's records",
        Duration::from_secs(30),
        |rows| rows.len() >= local.len(),
    );
    assert_eq!(rows.len(), local.len(), "{rows:#?}");

    // Outage: statements still succeed, promptly; the spool keeps them.
    audit.stop();
    let started = Instant::now();
    psql_session(
        &gw,
        &[],
        "SELECT 2 AS during_outage;\nINSERT INTO items VALUES (100, 'during');\nSELECT count(*) FROM items;\n",
    );
    assert!(
        started.elapsed() < PROMPT,
        "statements waited for the audit database: {:?}",
        started.elapsed()
    );
    assert_eq!(
        pg.admin_sql("SELECT note FROM items WHERE id = 100"),
        "during"
    );
    wait_sessions_ended(&spool, 2);
    // Let the shipper run into the outage (it retries on its own schedule).
    thread::sleep(Duration::from_millis(1500));
    audit.start_again();

    psql_session(&gw, &[], "SELECT 3 AS after_outage;\n");
    let local = wait_sessions_ended(&spool, 3);
    let rows = audit.wait_for("every spooled record", Duration::from_secs(60), |rows| {
        rows.len() >= local.len()
    });
    // Give a duplicate a chance to show up, then compare exactly.
    thread::sleep(Duration::from_millis(500));
    let rows = {
        let again = audit.rows();
        assert_eq!(again.len(), rows.len(), "rows kept arriving");
        again
    };
    assert_eq!(
        rows.len(),
        local.len(),
        "audit rows (seqs {:?}) vs spooled records",
        rows.iter().map(|r| r.seq).collect::<Vec<_>>()
    );
    let chains: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.chain.as_str()).collect();
    assert_eq!(chains.len(), 1, "one gateway, one chain: {chains:?}");
    let lines = spool.lines();
    for (row, (record, line)) in rows.iter().zip(local.iter().zip(&lines)) {
        assert_eq!(
            Some(row.seq),
            record["seq"].as_u64(),
            "seqs differ or repeat"
        );
        assert_eq!(
            row.hash,
            record["hash"].as_str().unwrap(),
            "seq {}",
            row.seq
        );
        assert_eq!(
            row.session,
            record["session"].as_str().unwrap(),
            "seq {}",
            row.seq
        );
        assert_eq!(
            row.kind,
            record["kind"].as_str().unwrap(),
            "seq {}",
            row.seq
        );
        assert_eq!(
            row.line, line.text,
            "seq {}: the stored line differs",
            row.seq
        );
    }

    // The auditor reads, lists, replays and verifies from the table alone.
    let store = SessionsCli::store_dsn(&audit.auditor_dsn());
    let (n, sessions) = store.assert_intact();
    assert_eq!((n as usize, sessions), (local.len(), 3));
    let listed = store.list();
    let local_list = SessionsCli::state_dir(state.path()).list();
    assert_eq!(listed, local_list, "the store lists other sessions");
    let during = statement(&local, "SELECT 2 AS during_outage;")["session"]
        .as_str()
        .unwrap()
        .to_string();
    let replay = store.replay(&during);
    assert!(
        replay.contains(&format!(
            "{APP_DATABASE}=> INSERT INTO items VALUES (100, 'during')"
        )),
        "{replay}"
    );
    assert_eq!(replay, SessionsCli::state_dir(state.path()).replay(&during));

    // The writer's credential stays out of the state dir and the log.
    let writer_password = pgwarden_e2e::recording::WRITER.1;
    assert!(files_containing(state.path(), writer_password).is_empty());
    assert!(!gw.logs().contains(writer_password), "{}", gw.logs());

    // A record deleted from the table (by someone with more than INSERT)
    // is noticed there too.
    drop(gw);
    let middle = local.len() / 2;
    audit.sql(&format!(
        "DELETE FROM {} WHERE seq = {}",
        pgwarden_e2e::recording::AUDIT_TABLE,
        middle
    ));
    let broken = store.assert_broken();
    assert!(broken.contains("chain broken"), "{broken}");
}

// === 6. nothing sensitive ===

#[test]
fn no_raw_value_token_or_password_reaches_the_state_dir() {
    let provider = OidcProvider::start(300);
    let pg = cluster();
    let state = state_dir();
    let identity = format!(
        "oidc: {{issuer: \"{}\", audiences: [\"{AUDIENCE}\"], subjects: [\"ci-*\"], \
         claims: {{repository_owner: acme}}}}",
        provider.issuer()
    );
    let gw = Gateway::builder(&pg)
        .policy_yaml(policy_with_identity(
            pg.port(),
            None,
            &identity,
            &spec(&recording_yaml(None, false, None)),
        ))
        .state_dir(state.path())
        .start();
    let token = provider.token(ACME, AUDIENCE);
    let spool = Spool::new(state.path());
    // A card number typed into the statement itself.
    const BY_LITERAL: &str = "SELECT name FROM customers WHERE card_number = '4111111111111111'";

    // psql with the token as its password, reading masked values.
    let (out, _) = psql_session(
        &gw,
        &[("PGPASSWORD".to_string(), token.clone())],
        &format!(
            "{CARDS_SQL};\nSELECT card_number, upper(card_number) FROM customers;\n{BY_LITERAL};\n"
        ),
    );
    assert!(out.contains(MASKED_CARD), "{out}");
    assert_no_raw_cards("psql output", &out);
    // tokio-postgres, binding a card number to the masked column.
    let rt = runtime();
    let client = connect(&rt, &gw.conninfo(), Some(&token));
    let sql = "SELECT name, card_number FROM customers WHERE card_number = $1";
    let row = prompt(&rt, sql, client.query_one(sql, &[&CARD])).unwrap();
    assert_eq!(row.get::<_, String>(1), MASKED_CARD);
    drop(client);
    let records = wait_sessions_ended(&spool, 2);
    let logs = gw.logs();
    let status = gw.shutdown();
    assert!(status.success(), "pgwarden did not exit cleanly: {status}");

    // The recording holds the session, as masked as the client saw it.
    let sessions = SessionsCli::state_dir(state.path()).list();
    assert_eq!(sessions.len(), 2, "{sessions:#?}");
    assert!(
        sessions.iter().all(|s| s["subject"] == "ci-acme"),
        "{sessions:#?}"
    );
    let all = spool
        .lines()
        .iter()
        .map(|l| l.text.clone())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(all.contains(MASKED_CARD), "{all}");
    assert_eq!(statement(&records, sql)["parameters"], json!(["****"]));
    let typed = BY_LITERAL.trim_end_matches("4111111111111111'");
    assert!(
        records.iter().any(|r| r["kind"] == "statement"
            && r["text"].as_str().is_some_and(|t| t.starts_with(typed))),
        "the statement with a typed card number was not recorded: {records:#?}"
    );

    // ... and nothing raw, anywhere under the state dir, nor in the log.
    let signature = token.rsplit('.').next().unwrap_or_default();
    assert!(signature.len() >= 16, "an odd token: {token}");
    for needle in [CARD, OTHER_CARD, APP_PASSWORD, token.as_str(), signature] {
        let found = files_containing(state.path(), needle);
        assert!(
            found.is_empty(),
            "{needle:?} found under the state dir in {found:?}"
        );
    }
    for needle in [CARD, OTHER_CARD, APP_PASSWORD, signature] {
        assert!(
            !logs.contains(needle),
            "{needle:?} in the gateway log:\n{logs}"
        );
    }
}

// === 7. truncation with a marker ===

#[test]
fn long_texts_and_results_are_cut_with_a_marker() {
    let pg = cluster();
    let state = state_dir();
    let gw = builder(&pg, &recording_yaml(Some(5), false, None), &state).start();
    let spool = Spool::new(state.path());
    let rt = runtime();
    let client = connect(&rt, &gw.conninfo(), None);

    let long = format!("SELECT length('{}') AS n", "ab".repeat(40_000));
    let answer = simple(&rt, &client, &long).expect("the long statement failed");
    assert_eq!(rows_of(&answer), vec![vec![Some("80000".to_string())]]);
    let twenty = "SELECT g FROM generate_series(1, 20) g";
    let answer = simple(&rt, &client, twenty).unwrap();
    assert_eq!(rows_of(&answer).len(), 20);
    let wide = "SELECT repeat('y', 5000) AS wide";
    let answer = simple(&rt, &client, wide).unwrap();
    assert_eq!(rows_of(&answer)[0][0].as_deref().map(str::len), Some(5000));
    drop(client);

    let records = wait_sessions_ended(&spool, 1);
    let statements: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "statement")
        .collect();
    assert_eq!(statements.len(), 3, "{statements:#?}");

    // The text: its first 64 KiB, then how long it really was.
    let text = statements[0]["text"].as_str().unwrap();
    let marker = format!("…[truncated: {} bytes]", long.len());
    assert!(
        text.ends_with(&marker),
        "no marker {marker:?} at the end of the recorded text"
    );
    let kept = &text[..text.len() - marker.len()];
    assert_eq!(
        kept.len(),
        64 * 1024,
        "kept {} bytes of the text",
        kept.len()
    );
    assert!(long.starts_with(kept));
    assert_eq!(
        expect_result(&records, statements[0])["sample"],
        json!([["80000"]])
    );

    // 20 rows with resultRows 5: five kept, and it says so.
    assert_eq!(statements[1]["text"], twenty);
    let result = expect_result(&records, statements[1]);
    assert_eq!(result["rows"], 20, "{result}");
    assert_eq!(result["sampleCut"], true, "{result}");
    assert_eq!(
        result["sample"],
        json!([["1"], ["2"], ["3"], ["4"], ["5"]]),
        "{result}"
    );
    assert_eq!(result["tag"], "SELECT 20", "{result}");

    // A value too wide to keep whole is cut with a marker too.
    let result = expect_result(&records, statements[2]);
    let value = result["sample"][0][0].as_str().unwrap_or_default();
    assert!(
        value.starts_with("yyyy") && value.ends_with("…[truncated: 5000 bytes]"),
        "{value}"
    );
    assert!(value.len() < 5000, "the wide value was kept whole");

    let session = statements[0]["session"].as_str().unwrap();
    let replay = SessionsCli::state_dir(state.path()).replay(session);
    assert!(replay.contains("(20 rows"), "{replay}");
    assert!(replay.contains(&marker), "the replay hides the cut");
}
