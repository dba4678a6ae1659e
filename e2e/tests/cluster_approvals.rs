//! Approvals in a cluster (issue 17): the real operator (config stream,
//! admission webhooks from the chart's configurations, approval
//! controller), the real sidecar (`pgwarden run --operator`), PostgreSQL, and
//! the real kubectl as `alice` (group dba-oncall), `bob` and admin on the
//! test API server.
//!
//! psql holds `ALTER TABLE …` (wait mode); the NOTICE names the kubectl patch;
//! bob, the agent's own service-account token and an edit of the statement
//! are refused; alice runs the NOTICE's command with a forged decidedBy,
//! which is overwritten; the statement runs on the same connection and the
//! request shows Executed with the tag; a second decision is refused; a
//! denial returns the reviewer's reason to the client; a request created by
//! a user is refused.
//!
//! Needs `cargo build -p pgwarden-sidecar -p pgwarden-operator` first.

use std::fs;
use std::process::Output;
use std::time::Duration;

use pgwarden_e2e::approval_cluster::{
    eventually, kubectl_ok as ok, shop_policy, start_operator, text, ApprovalCluster,
    ApprovalClusterSpec, NS, POD, REVIEWER_RBAC,
};
use pgwarden_e2e::process::LoggedProcess;
use pgwarden_e2e::psql_session::PsqlSession;
use pgwarden_e2e::{PgCluster, APP_DATABASE};
use pgwarden_testapi::TestApiServer;
use serde_json::{json, Value};

fn kubectl_as(api: &TestApiServer, user: &str, args: &[&str], stdin: Option<&str>) -> Output {
    api.kubectl_stdin(user, args, stdin)
}

fn refused(api: &TestApiServer, user: &str, args: &[&str], stdin: Option<&str>) -> String {
    let o = kubectl_as(api, user, args, stdin);
    assert!(
        !o.status.success(),
        "kubectl {args:?} as {user} was admitted:\n{}",
        text(&o)
    );
    text(&o)
}

/// The policy's `approval:` settings besides its approvers.
const WAIT: &str = "wait: 60s";
const FAIL_FAST: &str = "wait: 0s\n    expiresAfter: 6s";

fn policy(pg_port: u16, approval: &str) -> String {
    shop_policy(
        pg_port,
        &format!(
            "  rules:
    - {{name: app, action: Allow, statements: [SELECT], tables: [public.orders]}}
    - {{name: schema-changes, action: RequireApproval, statements: [DDL]}}
  approval:
    approvers: {{groups: [dba-oncall]}}
    {approval}
"
        ),
    )
}

fn cluster(pg: &PgCluster, approval: &str) -> ApprovalCluster {
    ApprovalCluster::start(&ApprovalClusterSpec {
        dir_prefix: "pgwarden-e2e-capr-",
        manifests: &[&policy(pg.port(), approval), REVIEWER_RBAC],
        ready_table: "orders",
    })
}

fn fixture(pg: &PgCluster) {
    pg.admin_sql(&format!(
        "\\c {APP_DATABASE}\nCREATE TABLE orders (id int PRIMARY KEY, total int NOT NULL);\n\
         INSERT INTO orders VALUES (1, 10);\n\
         ALTER TABLE orders OWNER TO {};",
        pgwarden_e2e::APP_USER
    ));
}

/// The request id and the command the NOTICE names.
fn from_notice(notice: &str) -> (String, String) {
    let id = notice
        .split("approval of request ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("request id in the NOTICE")
        .to_owned();
    let cmd = notice
        .split("A reviewer approves with: ")
        .nth(1)
        .expect("command in the NOTICE")
        .trim()
        .to_owned();
    (id, cmd)
}

fn patch(decision: Value) -> String {
    json!({"spec": {"decision": decision}}).to_string()
}

#[test]
fn reviewers_decide_held_statements_with_kubectl_patch() {
    let pg = PgCluster::start();
    fixture(&pg);
    let c = cluster(&pg, WAIT);

    // psql holds the DDL; the NOTICE names the exact kubectl patch.
    let mut psql = PsqlSession::start(c.sidecar_port, "ALTER TABLE orders ADD COLUMN note text");
    let notice = psql.wait_line("waiting up to", Duration::from_secs(20));
    let (id, cmd) = from_notice(&notice);
    assert_eq!(
        cmd,
        format!(
            r#"kubectl patch apr -n ci {id} --type merge -p '{{"spec":{{"decision":{{"action":"Approve","reason":"…"}}}}}}'"#
        ),
        "{notice}"
    );
    let r = c.apr(&id);
    assert_eq!(
        r["spec"]["statement"],
        "ALTER TABLE orders ADD COLUMN note text"
    );
    assert_eq!(r["spec"]["requester"]["pod"], "ci/agent-1");
    assert_eq!(r["spec"]["requester"]["serviceAccount"], "runner");
    assert_eq!(r["metadata"]["labels"]["pgwarden.io/policy"], "shop");
    assert_eq!(r["metadata"]["labels"]["pgwarden.io/pod"], POD);
    assert_eq!(r["status"]["phase"], "Pending");

    // bob is not an approver.
    let approve = patch(json!({"action": "Approve", "reason": "lgtm"}));
    let args = [
        "patch", "apr", "-n", NS, &id, "--type", "merge", "-p", &approve,
    ];
    let e = refused(&c.api, "bob", &args, None);
    assert!(e.contains("bob may not decide ApprovalRequest ci/"), "{e}");
    assert!(e.contains("group dba-oncall"), "{e}");
    // The agent's own service-account token: RBAC gives it nothing.
    let mut with_token = vec!["--token", c.runner_token.as_str()];
    with_token.extend_from_slice(&args);
    let e = refused(&c.api, "bob", &with_token, None);
    assert!(e.contains("forbidden"), "{e}");
    assert!(e.contains("system:serviceaccount:ci:runner"), "{e}");
    // What was requested cannot be edited, even with a decision.
    let edit = json!({"spec": {"statement": "DROP TABLE orders",
        "decision": {"action": "Approve"}}})
    .to_string();
    let e = refused(
        &c.api,
        "alice",
        &[
            "patch", "apr", "-n", NS, &id, "--type", "merge", "-p", &edit,
        ],
        None,
    );
    assert!(e.contains("statement"), "{e}");
    assert_eq!(c.apr(&id)["status"]["phase"], "Pending", "{}", c.logs());

    // alice approves with a forged decidedBy: stamped as alice.
    let forged = patch(json!({"action": "Approve", "reason": "reviewed", "decidedBy": "carol"}));
    ok(
        &c.api,
        "alice",
        &[
            "patch", "apr", "-n", NS, &id, "--type", "merge", "-p", &forged,
        ],
        None,
    );
    let (success, out, err) = psql.finish(Duration::from_secs(20));
    assert!(success, "psql failed:\n{out}\n{err}\n{}", c.logs());
    assert!(out.contains("ALTER TABLE"), "{out}");
    let r = eventually(Duration::from_secs(10), "Executed", || {
        let r = c.apr(&id);
        (r["status"]["result"] == "ALTER TABLE").then_some(r)
    });
    assert_eq!(r["status"]["phase"], "Executed");
    assert_eq!(r["spec"]["decision"]["decidedBy"], "alice");
    assert!(r["spec"]["decision"]["decidedAt"].is_string());
    let table = ok(&c.api, "alice", &["get", "apr", "-n", NS], None);
    let row = table
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_default();
    assert!(
        row.contains("Executed") && row.contains("alice") && row.contains("shop"),
        "{table}"
    );

    // Each phase change is an Event on the request. Events are posted in
    // the background, behind the writes that made them true: on a loaded CI
    // machine 10 s was once not enough for the last of them.
    let reasons = eventually(Duration::from_secs(30), "the request's Events", || {
        let list: Value = serde_json::from_str(&ok(
            &c.api,
            "admin",
            &["get", "events.events.k8s.io", "-n", NS, "-o", "json"],
            None,
        ))
        .ok()?;
        let reasons: Vec<String> = list["items"]
            .as_array()?
            .iter()
            .filter(|e| e["regarding"]["name"] == id.as_str())
            .filter_map(|e| e["reason"].as_str().map(str::to_owned))
            .collect();
        ["Requested", "Approved", "Executed"]
            .iter()
            .all(|r| reasons.iter().any(|x| x == r))
            .then_some(reasons)
    });
    assert!(!reasons.iter().any(|r| r == "Denied"), "{reasons:?}");

    // A second decision is refused.
    let deny = patch(json!({"action": "Deny", "reason": "changed my mind"}));
    let e = refused(
        &c.api,
        "alice",
        &[
            "patch", "apr", "-n", NS, &id, "--type", "merge", "-p", &deny,
        ],
        None,
    );
    assert!(
        e.contains("already decided") || e.contains("cannot be changed"),
        "{e}"
    );

    // A denial reaches the client with the reviewer's reason.
    let mut psql = PsqlSession::start(c.sidecar_port, "ALTER TABLE orders ADD COLUMN other int");
    let (id2, _) = from_notice(&psql.wait_line("waiting up to", Duration::from_secs(20)));
    assert_ne!(id2, id);
    let deny = patch(json!({"action": "Deny", "reason": "not during the freeze"}));
    ok(
        &c.api,
        "alice",
        &[
            "patch", "apr", "-n", NS, &id2, "--type", "merge", "-p", &deny,
        ],
        None,
    );
    let (success, _, err) = psql.finish(Duration::from_secs(20));
    assert!(!success);
    assert!(
        err.contains("denied by alice: not during the freeze"),
        "{err}\n{}",
        c.logs()
    );

    // A person cannot create a request (RBAC would allow alice; the webhook not).
    let mut made = r.clone();
    made["metadata"] = json!({"name": "forged", "namespace": NS});
    made["spec"].as_object_mut().unwrap().remove("decision");
    made.as_object_mut().unwrap().remove("status");
    let e = refused(
        &c.api,
        "alice",
        &["create", "-f", "-"],
        Some(&made.to_string()),
    );
    assert!(e.contains("alice may not create ApprovalRequests"), "{e}");
}

#[test]
fn fail_fast_approvals_run_once_on_retry_and_undecided_requests_expire() {
    let pg = PgCluster::start();
    fixture(&pg);
    let c = cluster(&pg, FAIL_FAST);
    let run = |sql: &str| PsqlSession::start(c.sidecar_port, sql).finish(Duration::from_secs(20));
    // A reviewer watching sees requests appear and change.
    let watch_log = c.dir.path().join("watch.log");
    let mut cmd = c.api.kubectl_command("alice");
    cmd.args(["get", "apr", "-n", NS, "-w"]);
    let watch = LoggedProcess::spawn(cmd, watch_log.clone());

    // Fail fast: refused at once, the request open, the hint names the patch.
    let (success, _, err) = run("ALTER TABLE orders ADD COLUMN fast int");
    assert!(!success);
    assert!(
        err.contains("is waiting for a reviewer; the statement did not run"),
        "{err}"
    );
    assert!(err.contains("kubectl patch apr -n ci "), "{err}");
    let id = err
        .split("request ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("request id")
        .to_owned();
    let approve = patch(json!({"action": "Approve", "reason": "ok"}));
    ok(
        &c.api,
        "alice",
        &[
            "patch", "apr", "-n", NS, &id, "--type", "merge", "-p", &approve,
        ],
        None,
    );
    // The same statement again runs, once.
    let (success, out, err) = run("ALTER TABLE orders ADD COLUMN fast int");
    assert!(success, "{out}\n{err}\n{}", c.logs());
    let r = eventually(Duration::from_secs(10), "Executed", || {
        let r = c.apr(&id);
        (r["status"]["result"] == "ALTER TABLE").then_some(r)
    });
    assert_eq!(r["status"]["phase"], "Executed");
    // A different statement is a new request (exact binding).
    let (success, _, err) = run("ALTER TABLE orders ADD COLUMN slow int");
    assert!(!success);
    assert!(!err.contains(&id), "{err}");
    let id2 = err
        .split("request ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("request id")
        .to_owned();

    // Nobody decides: the controller marks it Expired at expiresAt.
    let r = eventually(Duration::from_secs(15), "Expired", || {
        let r = c.apr(&id2);
        (r["status"]["phase"] == "Expired").then_some(r)
    });
    assert!(r["spec"]["decision"].is_null());
    let e = refused(
        &c.api,
        "alice",
        &[
            "patch", "apr", "-n", NS, &id2, "--type", "merge", "-p", &approve,
        ],
        None,
    );
    assert!(e.contains("expired at"), "{e}");
    let watched = eventually(Duration::from_secs(10), "the watch", || {
        let w = fs::read_to_string(&watch_log).ok()?;
        let rows: Vec<&str> = w.lines().filter(|l| l.starts_with(&id2)).collect();
        (rows.iter().any(|l| l.contains("Pending")) && rows.iter().any(|l| l.contains("Expired")))
            .then_some(w)
    });
    drop(watch);
    assert!(
        watched
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("Executed")),
        "{watched}"
    );
}

#[test]
fn a_statement_held_across_an_operator_restart_is_still_released() {
    let pg = PgCluster::start();
    fixture(&pg);
    let mut c = cluster(&pg, WAIT);
    let mut psql = PsqlSession::start(c.sidecar_port, "ALTER TABLE orders ADD COLUMN late text");
    let (id, _) = from_notice(&psql.wait_line("waiting up to", Duration::from_secs(20)));

    // A crash: nothing is handed over; the next operator starts from the API.
    c.operator.kill();
    c.operator = start_operator(&c.api, &c.operator_args);
    c.operator.wait_ready(Duration::from_secs(20));
    let approve = patch(json!({"action": "Approve", "reason": "after the restart"}));
    eventually(Duration::from_secs(20), "the webhooks back", || {
        let o = kubectl_as(
            &c.api,
            "alice",
            &[
                "patch", "apr", "-n", NS, &id, "--type", "merge", "-p", &approve,
            ],
            None,
        );
        o.status.success().then_some(())
    });
    // The sidecar reconnects; the decision made meanwhile reaches it.
    let (success, out, err) = psql.finish(Duration::from_secs(60));
    assert!(success, "{out}\n{err}\n{}", c.logs());
    assert!(out.contains("ALTER TABLE"), "{out}");
    let r = eventually(Duration::from_secs(10), "Executed", || {
        let r = c.apr(&id);
        (r["status"]["result"] == "ALTER TABLE").then_some(r)
    });
    assert_eq!(r["spec"]["decision"]["decidedBy"], "alice");
}
