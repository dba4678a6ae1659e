//! Approval notifications (issue 17 item 5): a policy's `approval.notify`
//! names a Secret holding a webhook URL; the real operator POSTs
//! Slack-compatible JSON there when a request opens and when it is decided.
//! Real operator, sidecar, PostgreSQL and kubectl on the test API server;
//! the receiver is a plain HTTP server on 127.0.0.1 in this test.
//!
//! The held statement is an extended-protocol UPDATE of a masked column
//! with a parameter: the messages carry the request's masked parameters,
//! never the value the client bound. Then the Secret points at a receiver
//! that accepts connections and never answers: the next held statement is
//! still released the moment it is approved.
//!
//! Needs `cargo build -p pgwarden-sidecar -p pgwarden-operator` first.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pgwarden_e2e::approval_cluster::{
    eventually, kubectl_ok as ok, shop_policy, ApprovalCluster, ApprovalClusterSpec, NS,
};
use pgwarden_e2e::wire::{bind_params, concat, error_fields, execute, parse, sync, tags, Wire};
use pgwarden_e2e::{PgCluster, APP_DATABASE};
use serde_json::{json, Value};

/// The webhook's token, in the URL's path as Slack's are.
const TOKEN: &str = "T0KEN-7f3a9c51";
/// What the agent binds for the masked column: must reach nobody.
const SECRET_VALUE: &str = "carol.private-7731@example.com";
const UPDATE: &str = "UPDATE customers SET email = $1 WHERE id = $2";

fn policy(pg_port: u16) -> String {
    shop_policy(
        pg_port,
        "  rules:
    - {name: app, action: Allow, statements: [SELECT], tables: [public.customers]}
    - {name: pii-writes, action: RequireApproval, statements: [UPDATE], tables: [public.customers]}
  masking:
    - {columns: [public.customers.email], strategy: Redact}
  approval:
    approvers: {groups: [dba-oncall]}
    wait: 60s
    notify: {urlSecretRef: {name: approval-hook, key: url}}
",
    )
}

const REVIEWER_RBAC: &str = "apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: reviewers, namespace: ci}
rules:
  - {apiGroups: [pgwarden.io], resources: [approvalrequests], verbs: [get, list, watch, patch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: reviewers, namespace: ci}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: reviewers}
subjects:
  - {apiGroup: rbac.authorization.k8s.io, kind: User, name: alice}
";

fn hook_secret(url: &str) -> String {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "approval-hook", "namespace": NS},
        "stringData": {"url": url},
    })
    .to_string()
}

/// One POST the receiver got: path and JSON body.
struct Posted {
    path: String,
    body: Value,
}

/// A webhook receiver: answers 200 to every request, one per connection.
fn receiver() -> (u16, mpsc::Receiver<Posted>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind receiver");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            if let Some(p) = read_post(conn) {
                let _ = tx.send(p);
            }
        }
    });
    (port, rx)
}

fn read_post(mut conn: TcpStream) -> Option<Posted> {
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut reader = BufReader::new(conn.try_clone().ok()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    let path = request_line.split_whitespace().nth(1)?.to_owned();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).ok()?;
    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
    Some(Posted {
        path,
        body: serde_json::from_slice(&body).ok()?,
    })
}

/// Accepts connections and never answers (a receiver that hangs).
fn silent_receiver() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            held.push(conn);
        }
    });
    port
}

/// alice and no bob: this test needs no second reviewer nor `create`.
fn cluster(pg: &PgCluster, hook_url: &str) -> ApprovalCluster {
    ApprovalCluster::start(&ApprovalClusterSpec {
        dir_prefix: "pgwarden-e2e-notify-",
        manifests: &[&hook_secret(hook_url), &policy(pg.port()), REVIEWER_RBAC],
        ready_table: "customers",
    })
}

/// Sends the parameterized UPDATE and reads until the NOTICE that it
/// is held; returns the connection and the request's name.
fn hold_update(c: &ApprovalCluster, email: &str) -> (Wire, String) {
    let mut w = Wire::login(c.sidecar_port, "agent");
    w.send(&concat(&[
        parse("", UPDATE),
        bind_params("", "", &[Some(email), Some("1")], 0),
        execute(""),
        sync(),
    ]));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "no NOTICE\n{}", c.logs());
        let (kind, body) = w
            .try_read()
            .expect("read")
            .unwrap_or_else(|| panic!("closed\n{}", c.logs()));
        assert_ne!(kind, b'E', "{:?}\n{}", error_fields(&body), c.logs());
        if kind != b'N' {
            continue;
        }
        let m = error_fields(&body).remove(&'M').unwrap_or_default();
        if let Some(rest) = m.split("approval of request ").nth(1) {
            let id = rest.split_whitespace().next().expect("id").to_owned();
            return (w, id);
        }
    }
}

fn approve(c: &ApprovalCluster, id: &str) {
    let p = json!({"spec": {"decision": {"action": "Approve", "reason": "reviewed"}}});
    ok(
        &c.api,
        "alice",
        &[
            "patch",
            "apr",
            "-n",
            NS,
            id,
            "--type",
            "merge",
            "-p",
            &p.to_string(),
        ],
        None,
    );
}

fn fixture(pg: &PgCluster) {
    pg.admin_sql(&format!(
        "\\c {APP_DATABASE}\nCREATE TABLE customers (id int PRIMARY KEY, email text);\n\
         INSERT INTO customers VALUES (1, 'a@example.com');\n\
         ALTER TABLE customers OWNER TO {};",
        pgwarden_e2e::APP_USER
    ));
}

/// The receiver's next message, which must be `event` for `request`.
fn next_for(
    rx: &mpsc::Receiver<Posted>,
    request: &str,
    event: &str,
    c: &ApprovalCluster,
) -> Posted {
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(p) if p.body["request"] == request && p.body["event"] == event => p,
        Ok(p) => panic!("expected {event} for {request}, got: {}", p.body),
        Err(_) => panic!("no {event} notification for {request}\n{}", c.logs()),
    }
}

#[test]
fn reviewers_hear_of_requests_and_decisions_and_a_dead_receiver_delays_nothing() {
    let pg = PgCluster::start();
    fixture(&pg);
    let (port, rx) = receiver();
    let c = cluster(&pg, &format!("http://127.0.0.1:{port}/hooks/{TOKEN}"));

    // Opened: who, what (masked parameters), why, and the approve command.
    let (mut w, id) = hold_update(&c, SECRET_VALUE);
    let opened = next_for(&rx, &id, "Requested", &c);
    assert_eq!(opened.path, format!("/hooks/{TOKEN}"));
    let b = &opened.body;
    assert_eq!(b["policy"], "shop");
    assert_eq!(b["requester"], "system:serviceaccount:ci:runner");
    assert_eq!(b["pod"], "ci/agent-1");
    assert_eq!(b["statement"], UPDATE);
    assert_eq!(b["parameters"], json!(["****", "****"]));
    assert_eq!(b["rule"], "pii-writes");
    assert_eq!(b["phase"], "Pending");
    let command = format!(
        r#"kubectl patch apr -n ci {id} --type merge -p '{{"spec":{{"decision":{{"action":"Approve","reason":"…"}}}}}}'"#
    );
    assert_eq!(b["approveCommand"], command.as_str());
    let text = b["text"].as_str().expect("Slack text");
    assert!(
        text.contains(UPDATE) && text.contains("pii-writes"),
        "{text}"
    );

    // Approved: the statement runs on the same connection; the decision is told.
    approve(&c, &id);
    let done = w.until_ready();
    assert_eq!(tags(&done), vec!["UPDATE 1".to_owned()], "{}", c.logs());
    let decided = next_for(&rx, &id, "Approved", &c);
    assert_eq!(decided.body["decidedBy"], "alice");
    assert_eq!(decided.body["phase"], "Approved");
    assert!(
        decided.body["text"]
            .as_str()
            .is_some_and(|t| t.contains("approved by alice: reviewed")),
        "{}",
        decided.body
    );
    // Once each.
    if let Ok(p) = rx.recv_timeout(Duration::from_secs(2)) {
        panic!("a third notification: {}", p.body);
    }
    for p in [&opened, &decided] {
        assert!(
            !p.body.to_string().contains(SECRET_VALUE),
            "the bound value leaked: {}",
            p.body
        );
    }
    let sent = eventually(Duration::from_secs(5), "the sent counter", || {
        c.operator
            .metric(r#"pgwarden_operator_approval_notifications_total{result="sent"}"#)
            .filter(|n| *n >= 2.0)
    });
    assert_eq!(sent, 2.0);

    // The receiver hangs: the next approval still releases at once.
    let silent = silent_receiver();
    ok(
        &c.api,
        "admin",
        &["apply", "-f", "-"],
        Some(&hook_secret(&format!(
            "http://127.0.0.1:{silent}/hooks/{TOKEN}"
        ))),
    );
    let (mut w, id2) = hold_update(&c, "dave.private-1234@example.com");
    // Let the "Requested" delivery start and hang on the silent receiver.
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    approve(&c, &id2);
    let done = w.until_ready();
    let took = started.elapsed();
    assert_eq!(tags(&done), vec!["UPDATE 1".to_owned()], "{}", c.logs());
    // One try alone waits 10s for an answer; the release must not.
    assert!(
        took < Duration::from_secs(5),
        "released {took:?} after the approval\n{}",
        c.logs()
    );
    assert!(rx.try_recv().is_err(), "the first receiver got more");

    // The URL (its token) is in no log line and no metric; the Secret is named.
    let log = c.operator.log();
    assert!(
        !log.contains(TOKEN),
        "the webhook token is in the log:\n{log}"
    );
    assert!(!c.operator.metrics().contains(TOKEN));
    assert!(
        log.contains("approval-hook"),
        "the log does not name the Secret:\n{log}"
    );
}
