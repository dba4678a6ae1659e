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
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pgwarden_e2e::Operator;
use pgwarden_e2e::{free_port, libpq_command, pgwarden_bin, PgCluster, TestCa, APP_DATABASE};
use pgwarden_testapi::TestApiServer;
use serde_json::{json, Value};

const NS: &str = "ci";
const OPERATOR_NS: &str = "pgwarden-system";
const SERVICE: &str = "pgwarden-operator";
const POD: &str = "agent-1";

fn text(o: &Output) -> String {
    pgwarden_testapi::output_text(o)
}

fn kubectl_as(api: &TestApiServer, user: &str, args: &[&str], stdin: Option<&str>) -> Output {
    api.kubectl_stdin(user, args, stdin)
}

fn ok(api: &TestApiServer, user: &str, args: &[&str], stdin: Option<&str>) -> String {
    let o = kubectl_as(api, user, args, stdin);
    assert!(
        o.status.success(),
        "kubectl {args:?} as {user}:\n{}",
        text(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
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

fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn webhook_configurations() -> String {
    let install = fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/install.yaml"),
    )
    .expect("manifests/install.yaml");
    install
        .split("\n---\n")
        .filter(|d| {
            d.contains("\nkind: MutatingWebhookConfiguration")
                || d.contains("\nkind: ValidatingWebhookConfiguration")
        })
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// The policy's `approval:` settings besides its approvers.
const WAIT: &str = "wait: 60s";
const FAIL_FAST: &str = "wait: 0s\n    expiresAfter: 6s";

fn policy(pg_port: u16, approval: &str) -> String {
    format!(
        "apiVersion: pgwarden.io/v1alpha1
kind: DatabaseAccessPolicy
metadata: {{name: shop, namespace: {NS}}}
spec:
  podSelector: {{matchLabels: {{app: agent}}}}
  identity: {{pod: {{}}}}
  database: {{host: 127.0.0.1, port: {pg_port}, name: {APP_DATABASE}, credentialsSecret: pg-cred}}
  defaultAction: Deny
  rules:
    - {{name: app, action: Allow, statements: [SELECT], tables: [public.orders]}}
    - {{name: schema-changes, action: RequireApproval, statements: [DDL]}}
  approval:
    approvers: {{groups: [dba-oncall]}}
    {approval}
"
    )
}

/// Reviewers: alice and bob may read and patch requests (RBAC); the
/// webhook decides who may decide. alice may also create (to show that the
/// webhook, not RBAC, refuses a request made by a person).
const REVIEWER_RBAC: &str = "apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: reviewers, namespace: ci}
rules:
  - {apiGroups: [pgwarden.io], resources: [approvalrequests], verbs: [get, list, watch, patch, create]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: reviewers, namespace: ci}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: reviewers}
subjects:
  - {apiGroup: rbac.authorization.k8s.io, kind: User, name: alice}
  - {apiGroup: rbac.authorization.k8s.io, kind: User, name: bob}
";

/// A child killed on drop, its output in a file.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let f = fs::File::create(&log).expect("log file");
        let f2 = f.try_clone().expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(f2))
            .stderr(Stdio::from(f))
            .env("RUST_LOG", "info")
            .env_remove("KUBECONFIG");
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Proc { child, log }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// psql running one statement through the sidecar; its stderr lines as
/// they come (psql prints a NOTICE the moment it arrives).
struct Psql {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Psql {
    fn start(port: u16, sql: &str) -> Psql {
        let mut child = libpq_command("psql", &[])
            .args(["-X", "-v", "ON_ERROR_STOP=1"])
            .arg(format!(
                "host=127.0.0.1 port={port} user=agent dbname={APP_DATABASE}"
            ))
            .args(["-c", sql])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("psql");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Psql {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first stderr line containing `words`.
    fn wait_line(&mut self, words: &str, timeout: Duration) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.contains(words)) {
            return l.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(words) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "psql never said {words:?}; it said:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Exit status and stdout once it ends (within `timeout`).
    fn finish(mut self, timeout: Duration) -> (bool, String, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("psql wait") {
                break s;
            }
            assert!(Instant::now() < deadline, "psql did not finish");
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut out = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = std::io::Read::read_to_string(&mut o, &mut out);
        }
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(500)) {
            self.seen.push(l);
        }
        (status.success(), out, self.seen.join("\n"))
    }
}

fn start_operator(api: &TestApiServer, args: &[String]) -> Operator {
    let mut b = Operator::builder(api.kubeconfig())
        .namespace(OPERATOR_NS)
        .leader_election(false)
        .watch_namespaces(&[NS]);
    for a in args {
        b = b.arg(a.clone());
    }
    b.start()
}

struct Cluster {
    api: TestApiServer,
    operator: Operator,
    operator_args: Vec<String>,
    sidecar: Proc,
    sidecar_port: u16,
    runner_token: String,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start(pg: &PgCluster, approval: &str) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("pgwarden-e2e-capr-")
            .tempdir()
            .expect("temp dir");
        let api = TestApiServer::start().expect("test API server");
        let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
        for f in ["databaseaccesspolicies.yaml", "approvalrequests.yaml"] {
            ok(
                &api,
                "admin",
                &["apply", "-f", crds.join(f).to_str().unwrap()],
                None,
            );
        }
        for ns in [NS, OPERATOR_NS] {
            ok(&api, "admin", &["create", "namespace", ns], None);
        }
        ok(
            &api,
            "admin",
            &["-n", NS, "create", "serviceaccount", "runner"],
            None,
        );
        ok(
            &api,
            "admin",
            &[
                "-n",
                NS,
                "create",
                "secret",
                "generic",
                "pg-cred",
                &format!("--from-literal=username={}", pgwarden_e2e::APP_USER),
                &format!("--from-literal=password={}", pgwarden_e2e::APP_PASSWORD),
            ],
            None,
        );
        ok(
            &api,
            "admin",
            &["apply", "-f", "-"],
            Some(&policy(pg.port(), approval)),
        );
        ok(&api, "admin", &["apply", "-f", "-"], Some(REVIEWER_RBAC));

        // The webhooks as the chart installs them, served by the operator.
        let admission: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        api.set_service_endpoint(&format!("{SERVICE}.{OPERATOR_NS}.svc"), admission);
        ok(
            &api,
            "admin",
            &["apply", "-f", "-"],
            Some(&webhook_configurations()),
        );

        let ca = TestCa::generate(dir.path(), "operator");
        let cert = ca.issue_server_cert(dir.path(), "stream");
        let stream_port = free_port();
        let operator_args = vec![
            format!("--admission-addr={admission}"),
            format!("--webhook-config-name={SERVICE}"),
            "--sidecar-image=pgwarden:e2e".to_owned(),
            format!("--stream-addr=127.0.0.1:{stream_port}"),
            format!("--stream-cert={}", cert.cert.display()),
            format!("--stream-key={}", cert.key.display()),
            // The operator runs as admin here; in a cluster, its service account.
            "--approval-creator=admin".to_owned(),
        ];
        let operator = start_operator(&api, &operator_args);
        operator.wait_ready(Duration::from_secs(20));
        eventually(Duration::from_secs(20), "caBundle patched", || {
            let c: Value = serde_json::from_str(&ok(
                &api,
                "admin",
                &[
                    "get",
                    "validatingwebhookconfiguration",
                    SERVICE,
                    "-o",
                    "json",
                ],
                None,
            ))
            .ok()?;
            c["webhooks"]
                .as_array()?
                .iter()
                .all(|w| {
                    w["clientConfig"]["caBundle"]
                        .as_str()
                        .is_some_and(|b| !b.is_empty())
                })
                .then_some(())
        });

        let pod = pgwarden_e2e::injected_pod(NS, POD, json!({"app": "agent"}), "runner");
        ok(&api, "admin", &["apply", "-f", "-"], Some(&pod.to_string()));
        let token = api
            .token_request(NS, "runner", &["pgwarden.io/sidecar"], Some(POD), None)
            .expect("TokenRequest");
        let token_file = dir.path().join("token");
        fs::write(&token_file, token).expect("write token");
        // The agent's own token, for the API server's audience.
        let runner_token = api
            .token_request(NS, "runner", &[], Some(POD), None)
            .expect("TokenRequest");

        let sidecar_port = free_port();
        let mut cmd = Command::new(pgwarden_bin());
        cmd.args(["run", "--listen", &format!("127.0.0.1:{sidecar_port}")])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--operator", &format!("https://127.0.0.1:{stream_port}")])
            .arg("--operator-ca")
            .arg(ca.cert_path())
            .arg("--operator-token-file")
            .arg(&token_file);
        let sidecar = Proc::spawn(cmd, dir.path().join("pgwarden.log"));
        let c = Cluster {
            api,
            operator,
            operator_args,
            sidecar,
            sidecar_port,
            runner_token,
            _dir: dir,
        };
        eventually(Duration::from_secs(20), "the sidecar serving", || {
            let o = libpq_command("psql", &[])
                .args(["-X", "-A", "-t", "-c", "SELECT count(*) FROM orders"])
                .arg(format!(
                    "host=127.0.0.1 port={} user=agent dbname={APP_DATABASE}",
                    c.sidecar_port
                ))
                .output()
                .ok()?;
            o.status.success().then_some(())
        });
        c
    }

    fn apr(&self, id: &str) -> Value {
        serde_json::from_str(&ok(
            &self.api,
            "alice",
            &["get", "apr", "-n", NS, id, "-o", "json"],
            None,
        ))
        .expect("apr JSON")
    }

    fn logs(&self) -> String {
        format!(
            "--- operator ---\n{}\n--- sidecar ---\n{}",
            self.operator.log(),
            self.sidecar.log()
        )
    }
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
    let c = Cluster::start(&pg, WAIT);

    // psql holds the DDL; the NOTICE names the exact kubectl patch.
    let mut psql = Psql::start(c.sidecar_port, "ALTER TABLE orders ADD COLUMN note text");
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

    // Each phase change is an Event on the request.
    let reasons = eventually(Duration::from_secs(10), "the request's Events", || {
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
    let mut psql = Psql::start(c.sidecar_port, "ALTER TABLE orders ADD COLUMN other int");
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
    let c = Cluster::start(&pg, FAIL_FAST);
    let run = |sql: &str| Psql::start(c.sidecar_port, sql).finish(Duration::from_secs(20));
    // A reviewer watching sees requests appear and change.
    let watch_log = c._dir.path().join("watch.log");
    let mut cmd = c.api.kubectl_command("alice");
    cmd.args(["get", "apr", "-n", NS, "-w"]);
    let watch = Proc::spawn(cmd, watch_log.clone());

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
    let mut c = Cluster::start(&pg, WAIT);
    let mut psql = Psql::start(c.sidecar_port, "ALTER TABLE orders ADD COLUMN late text");
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
