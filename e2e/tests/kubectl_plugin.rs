//! The kubectl plugin (issue 17 item 7) and the reviewer's estimate (item
//! 6), on the test API server with the real operator, sidecar, PostgreSQL
//! and kubectl: the built `pgwarden` binary is put on PATH as
//! `kubectl-pgwarden`, and `kubectl pgwarden pending|show|approve|deny`
//! run as the reviewers `alice` (dba-oncall) and `bob`.
//!
//! A held `DELETE FROM t WHERE id < 100` shows the planner's estimate
//! (`kubectl pgwarden pending`, `show`, `kubectl get apr -o wide`); bob's
//! approval is refused with the webhook's message; alice's (by an ID
//! prefix) releases it. A DELETE whose WHERE calls a user function shows
//! `unknown` and why; alice denies it and psql reads her reason. Without
//! kubectl on PATH the plugin says so.
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

/// DELETEs of `t` wait for dba-oncall; `keep()` (a user function) may be
/// called, so a DELETE that calls it is held too, not refused.
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
    - {{name: app, action: Allow, statements: [SELECT], tables: [public.t]}}
    - {{name: deletes, action: RequireApproval, statements: [DELETE], tables: [public.t]}}
    - {{name: keep, action: Allow, functions: [keep, public.keep]}}
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
    sidecar: Proc,
    sidecar_port: u16,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start(pg: &PgCluster, approval: &str) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("pgwarden-e2e-kplug-")
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
            sidecar,
            sidecar_port,
            _dir: dir,
        };
        eventually(Duration::from_secs(20), "the sidecar serving", || {
            let o = libpq_command("psql", &[])
                .args(["-X", "-A", "-t", "-c", "SELECT count(*) FROM t"])
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
        "\\c {APP_DATABASE}\n\
         CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL);\n\
         INSERT INTO t SELECT g, g FROM generate_series(1, 1000) g;\n\
         ANALYZE t;\n\
         CREATE FUNCTION keep(int) RETURNS boolean IMMUTABLE LANGUAGE sql AS 'SELECT $1 % 2 = 0';\n\
         ALTER TABLE t OWNER TO {user};\n\
         ALTER FUNCTION keep(int) OWNER TO {user};",
        user = pgwarden_e2e::APP_USER
    ));
}

/// The request id in a hold NOTICE.
fn id_from_notice(notice: &str) -> String {
    notice
        .split("approval of request ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("request id in the NOTICE")
        .to_owned()
}

/// `kubectl pgwarden ARGS` as `user`, with `bin_dir` (holding the plugin)
/// first on PATH.
struct Plugin {
    kubeconfig: PathBuf,
    cache: PathBuf,
    path: std::ffi::OsString,
}

impl Plugin {
    fn install(api: &TestApiServer, dir: &Path) -> Plugin {
        let bin_dir = dir.join("plugin-bin");
        fs::create_dir_all(&bin_dir).expect("plugin dir");
        std::os::unix::fs::symlink(pgwarden_bin(), bin_dir.join("kubectl-pgwarden"))
            .expect("symlink kubectl-pgwarden");
        let mut path = vec![bin_dir];
        path.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        Plugin {
            kubeconfig: api.kubeconfig().to_owned(),
            cache: api.dir().join("kubectl-cache"),
            path: std::env::join_paths(path).expect("PATH"),
        }
    }

    fn run(&self, user: &str, args: &[&str]) -> Output {
        Command::new("kubectl")
            .arg("pgwarden")
            .args(args)
            .args(["-n", NS, "--context", user])
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .env("PATH", &self.path)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl pgwarden")
    }

    fn ok(&self, user: &str, args: &[&str]) -> String {
        let o = self.run(user, args);
        assert!(
            o.status.success(),
            "kubectl pgwarden {args:?} as {user}:\n{}",
            text(&o)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

/// The estimated rows in `pending`'s line for `id`.
fn pending_rows(table: &str, id: &str) -> String {
    let header = table.lines().next().expect("header");
    let col = header.find("EST. ROWS").expect("EST. ROWS column");
    let row = table
        .lines()
        .find(|l| l.starts_with(id))
        .unwrap_or_else(|| panic!("{id} not pending:\n{table}"));
    row[col..]
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[test]
fn reviewers_decide_with_kubectl_pgwarden_and_see_the_estimate() {
    let pg = PgCluster::start();
    fixture(&pg);
    let c = Cluster::start(&pg, "wait: 60s");
    let plugin = Plugin::install(&c.api, c._dir.path());

    // A held DELETE: the reviewer sees the planner's estimate.
    let mut psql = Psql::start(c.sidecar_port, "DELETE FROM t WHERE id < 100");
    let id = id_from_notice(&psql.wait_line("waiting up to", Duration::from_secs(20)));
    let pending = plugin.ok("alice", &["pending"]);
    assert!(
        pending.contains("DELETE FROM t WHERE id < 100"),
        "{pending}"
    );
    let rows: u64 = pending_rows(&pending, &id)
        .parse()
        .unwrap_or_else(|_| panic!("no estimate for {id}:\n{pending}\n{}", c.logs()));
    // 99 rows match; the planner's estimate from the statistics is close.
    assert!((50..=200).contains(&rows), "{pending}");
    let r = c.apr(&id);
    assert_eq!(r["spec"]["estimate"]["rows"], rows, "{r}");
    assert_eq!(r["spec"]["estimate"]["tables"], json!(["public.t"]), "{r}");
    let wide = ok(
        &c.api,
        "alice",
        &["get", "apr", "-n", NS, "-o", "wide"],
        None,
    );
    let header = wide.lines().next().unwrap_or_default();
    assert!(header.contains("EST. ROWS"), "{wide}");
    let row = wide
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_default();
    assert!(
        row.split_whitespace().any(|w| w == rows.to_string()),
        "{wide}"
    );
    let described = ok(&c.api, "alice", &["describe", "apr", "-n", NS, &id], None);
    assert!(described.contains("Estimate:"), "{described}");
    assert!(described.contains("public.t"), "{described}");

    // show, by a unique prefix of the ID.
    let prefix = &id[..id.len() - 2];
    let shown = plugin.ok("alice", &["show", prefix]);
    assert!(shown.contains(&format!("id:          {id}")), "{shown}");
    assert!(
        shown.contains(&format!("estimate:    ~{rows} rows (public.t)")),
        "{shown}"
    );

    // bob is not an approver: the webhook's refusal, verbatim.
    let o = plugin.run("bob", &["approve", &id, "--reason", "lgtm"]);
    assert!(
        !o.status.success(),
        "bob's approval was admitted: {}",
        text(&o)
    );
    let e = text(&o);
    assert!(e.contains("bob may not decide ApprovalRequest ci/"), "{e}");
    assert!(e.contains("group dba-oncall"), "{e}");
    assert_eq!(c.apr(&id)["status"]["phase"], "Pending");

    // alice approves by the prefix: the statement runs on psql's connection.
    plugin.ok("alice", &["approve", prefix, "--reason", "reviewed"]);
    let (success, out, err) = psql.finish(Duration::from_secs(20));
    assert!(success, "psql failed:\n{out}\n{err}\n{}", c.logs());
    assert!(out.contains("DELETE 99"), "{out}");
    let r = eventually(Duration::from_secs(10), "Executed", || {
        let r = c.apr(&id);
        (r["status"]["phase"] == "Executed").then_some(r)
    });
    assert_eq!(r["spec"]["decision"]["decidedBy"], "alice");
    assert_eq!(r["spec"]["decision"]["reason"], "reviewed");
    assert!(!plugin.ok("alice", &["pending"]).contains(&id));

    // A DELETE whose WHERE calls user code is never planned: unknown, and why.
    let mut psql = Psql::start(c.sidecar_port, "DELETE FROM t WHERE keep(id)");
    let id2 = id_from_notice(&psql.wait_line("waiting up to", Duration::from_secs(20)));
    let pending = plugin.ok("alice", &["pending"]);
    assert_eq!(pending_rows(&pending, &id2), "unknown", "{pending}");
    let shown = plugin.ok("alice", &["show", &id2]);
    assert!(
        shown.contains("estimate:    unknown: the statement calls user code"),
        "{shown}"
    );
    assert!(c.apr(&id2)["spec"]["estimate"]["rows"].is_null());
    // "shop-" starts both requests.
    let o = plugin.run("alice", &["show", "shop-"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("is the start of several requests"),
        "{}",
        text(&o)
    );
    plugin.ok(
        "alice",
        &["deny", &id2, "--reason", "not during the freeze"],
    );
    let (success, _, err) = psql.finish(Duration::from_secs(20));
    assert!(!success);
    assert!(
        err.contains("denied by alice: not during the freeze"),
        "{err}"
    );
    assert_eq!(pg.admin_sql("SELECT count(*) FROM t"), "901");

    // Without kubectl on PATH the plugin says what it needs.
    let empty = c._dir.path().join("empty-bin");
    fs::create_dir_all(&empty).expect("dir");
    let o = Command::new(pgwarden_bin())
        .args(["kubectl", "pending", "-n", NS])
        .env("PATH", &empty)
        .output()
        .expect("run pgwarden kubectl");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("kubectl was not found on PATH"),
        "{}",
        text(&o)
    );
}
