//! The config stream (issue 16): the real `pgwarden-operator` serves it, the
//! real `pgwarden run --operator` follows it, on the test API server with the
//! real kubectl and a real PostgreSQL.
//!
//! A policy applied with kubectl reaches the sidecar of the pod it selects
//! (no password in the pod spec: the credential comes over the stream); an
//! edit changes an open session's next verdict within 2 s; unselecting the pod
//! ends its session with a FATAL that says why; deleting the Secret leaves the
//! sidecar on its last good credential; the ACK shows on the pod. Tokens that
//! must not fetch a configuration (another audience, expired, a deleted pod,
//! a pod that was not injected) get nothing: the sidecar stays 57P03 and the
//! operator logs why.
//!
//! Needs `cargo build -p pgwarden-sidecar -p pgwarden-operator` first.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use pgwarden_e2e::process::LoggedProcess;
use pgwarden_e2e::{free_port, pgwarden_bin, wait_until, PgCluster, TestCa, APP_DATABASE};
use pgwarden_testapi::{Options, TestApiServer};
use serde_json::{json, Value};
use tokio_postgres::NoTls;

/// How fast a change must reach an open session (DESIGN §4, issue 16).
const PUSH_WITHIN: Duration = Duration::from_secs(2);

fn text(o: &Output) -> String {
    pgwarden_testapi::output_text(o)
}

fn kubectl(api: &TestApiServer, args: &[&str], stdin: Option<&str>) -> String {
    let o = api.kubectl_stdin("admin", args, stdin);
    assert!(o.status.success(), "kubectl {args:?}:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn bin_dir() -> PathBuf {
    pgwarden_bin().parent().expect("binary dir").to_path_buf()
}

/// The test API server with the CRDs and namespace `ci`, a service account,
/// the database's Secret, a policy selecting `app=agent`, an operator.
struct Cluster {
    api: TestApiServer,
    operator: LoggedProcess,
    stream_port: u16,
    ca: PathBuf,
    cert: pgwarden_e2e::ServerCert,
    dir: tempfile::TempDir,
}

const POD: &str = "agent-1";

fn policy(pg_port: u16, rules: &str) -> String {
    format!(
        "apiVersion: pgwarden.io/v1alpha1
kind: DatabaseAccessPolicy
metadata: {{name: shop, namespace: ci}}
spec:
  podSelector: {{matchLabels: {{app: agent}}}}
  identity: {{pod: {{}}}}
  database: {{host: 127.0.0.1, port: {pg_port}, name: {APP_DATABASE}, credentialsSecret: pg-cred}}
  defaultAction: Deny
  rules:
{rules}"
    )
}

const READ_AND_DELETE: &str =
    "    - {name: app, action: Allow, statements: [SELECT, DELETE], tables: [public.orders]}\n";

fn start_operator(
    api: &TestApiServer,
    cert: &pgwarden_e2e::ServerCert,
    stream_port: u16,
    log: &Path,
) -> LoggedProcess {
    let mut cmd = Command::new(bin_dir().join("pgwarden-operator"));
    cmd.arg("--kubeconfig")
        .arg(api.kubeconfig())
        .args(["--context", "admin", "--namespace", "pgwarden-system"])
        .args(["--leader-election", "false"])
        // Watches per namespace, as with the chart's per-namespace RBAC.
        .args(["--namespaces", "ci"])
        .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--stream-addr", &format!("127.0.0.1:{stream_port}")])
        .arg("--stream-cert")
        .arg(&cert.cert)
        .arg("--stream-key")
        .arg(&cert.key);
    let operator = LoggedProcess::spawn(cmd, log.to_path_buf());
    assert!(
        wait_until(Duration::from_secs(20), || operator
            .log()
            .contains("serving the config stream")),
        "the operator did not start its stream:\n{}",
        operator.log()
    );
    operator
}

impl Cluster {
    fn start(pg: &PgCluster, opts: Options) -> Cluster {
        Cluster::start_at(pg.port(), opts)
    }

    /// As [`Cluster::start`], the policy's upstream at `pg_port`.
    fn start_at(pg_port: u16, opts: Options) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("pgwarden-e2e-stream-")
            .tempdir()
            .expect("temp dir");
        let api = TestApiServer::start_with(opts).expect("test API server");
        let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
        for f in ["databaseaccesspolicies.yaml", "approvalrequests.yaml"] {
            kubectl(&api, &["apply", "-f", crds.join(f).to_str().unwrap()], None);
        }
        kubectl(&api, &["create", "namespace", "ci"], None);
        kubectl(&api, &["create", "namespace", "pgwarden-system"], None);
        kubectl(
            &api,
            &["-n", "ci", "create", "serviceaccount", "runner"],
            None,
        );
        kubectl(
            &api,
            &[
                "-n",
                "ci",
                "create",
                "secret",
                "generic",
                "pg-cred",
                &format!("--from-literal=username={}", pgwarden_e2e::APP_USER),
                &format!("--from-literal=password={}", pgwarden_e2e::APP_PASSWORD),
            ],
            None,
        );
        kubectl(
            &api,
            &["apply", "-f", "-"],
            Some(&policy(pg_port, READ_AND_DELETE)),
        );
        let ca = TestCa::generate(dir.path(), "operator");
        let cert = ca.issue_server_cert(dir.path(), "stream");
        let stream_port = free_port();
        let operator = start_operator(&api, &cert, stream_port, &dir.path().join("operator.log"));
        Cluster {
            api,
            operator,
            stream_port,
            ca: ca.cert_path().to_path_buf(),
            cert,
            dir,
        }
    }

    /// Stop the operator (SIGKILL: as a crash) and later start another on
    /// the same address.
    fn kill_operator(&mut self) {
        let _ = self.operator.child.kill();
        let _ = self.operator.child.wait();
    }

    fn restart_operator(&mut self) {
        let log = self
            .dir
            .path()
            .join(format!("operator-{}.log", free_port()));
        self.operator = start_operator(&self.api, &self.cert, self.stream_port, &log);
    }

    fn create_pod(&self, name: &str, labels: Value, injected: bool) {
        let pod = if injected {
            pgwarden_e2e::injected_pod("ci", name, labels, "runner")
        } else {
            json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "ci", "labels": labels},
                "spec": {"serviceAccountName": "runner",
                    "containers": [{"name": "app", "image": "busybox"}]}})
        };
        kubectl(&self.api, &["apply", "-f", "-"], Some(&pod.to_string()));
    }

    fn token(&self, pod: &str, audience: &str, ttl: Option<Duration>) -> PathBuf {
        let token = self
            .api
            .token_request("ci", "runner", &[audience], Some(pod), ttl)
            .expect("TokenRequest");
        let path = self.dir.path().join(format!("token-{}", free_port()));
        fs::write(&path, token).expect("write token");
        path
    }

    /// `pgwarden run --operator` with this token file.
    fn sidecar(&self, token: &Path) -> Sidecar {
        self.sidecar_with(token, &[])
    }

    fn sidecar_with(&self, token: &Path, extra: &[&str]) -> Sidecar {
        let port = free_port();
        let metrics_port = free_port();
        let state = self.dir.path().join(format!("state-{port}"));
        let mut cmd = Command::new(pgwarden_bin());
        cmd.args(["run", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--state-dir")
            .arg(&state)
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .args([
                "--operator",
                &format!("https://127.0.0.1:{}", self.stream_port),
            ])
            .arg("--operator-ca")
            .arg(&self.ca)
            .arg("--operator-token-file")
            .arg(token)
            .args(extra);
        let proc = LoggedProcess::spawn(cmd, self.dir.path().join(format!("pgwarden-{port}.log")));
        Sidecar {
            proc,
            port,
            metrics_port,
        }
    }

    fn pod_annotation(&self, name: &str) -> Option<Value> {
        let pod: Value = serde_json::from_str(&kubectl(
            &self.api,
            &["-n", "ci", "get", "pod", POD, "-o", "json"],
            None,
        ))
        .expect("pod JSON");
        let a = pod["metadata"]["annotations"][name].as_str()?;
        serde_json::from_str(a).ok()
    }
}

struct Sidecar {
    proc: LoggedProcess,
    port: u16,
    metrics_port: u16,
}

impl Sidecar {
    fn metrics(&self) -> String {
        match pgwarden_e2e::http_get(self.metrics_port, "/metrics") {
            Ok((200, body)) => body,
            other => panic!("/metrics: {other:?}"),
        }
    }

    fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=agent dbname={APP_DATABASE} connect_timeout=5",
            self.port
        )
    }

    async fn connect(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::connect(&self.conninfo(), NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// The first connection the gateway admits (57P03 before its first
    /// configuration), within `timeout`.
    async fn connect_when_ready(&self, timeout: Duration) -> tokio_postgres::Client {
        let deadline = Instant::now() + timeout;
        loop {
            match self.connect().await {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    let not_ready = e.as_db_error().is_some_and(|d| d.code().code() == "57P03");
                    assert!(
                        not_ready || e.as_db_error().is_none(),
                        "unexpected refusal: {e:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!(
                    "the sidecar never served within {timeout:?}: {e:?}\n--- sidecar ---\n{}",
                    self.proc.log()
                ),
            }
        }
    }
}

fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_owned())
}

fn fixture(pg: &PgCluster) {
    pg.admin_sql(&format!(
        "\\c {APP_DATABASE}\nCREATE TABLE orders (id int PRIMARY KEY, total int NOT NULL);\n\
         INSERT INTO orders VALUES (1, 10), (2, 20);"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_reaches_the_selected_pods_sidecar_and_follows_every_change() {
    let pg = PgCluster::start();
    fixture(&pg);
    let c = Cluster::start(&pg, Options::default());
    c.create_pod(POD, json!({"app": "agent"}), true);
    let token = c.token(POD, "pgwarden.io/sidecar", None);
    let sidecar = c.sidecar(&token);

    // Served under the policy, with the credential from the stream.
    let client = sidecar.connect_when_ready(Duration::from_secs(20)).await;
    let rows = client
        .query("SELECT total FROM orders ORDER BY id", &[])
        .await
        .expect("SELECT is allowed");
    assert_eq!(rows.len(), 2);
    let denied = client
        .simple_query("UPDATE orders SET total = 0")
        .await
        .expect_err("UPDATE is not allowed");
    assert_eq!(sqlstate(&denied).as_deref(), Some("42501"), "{denied:?}");
    client
        .simple_query("DELETE FROM orders WHERE id = 999")
        .await
        .expect("DELETE is allowed");

    // The ACK shows on the pod: the version in force and the policy's generation.
    let mut applied = None;
    assert!(
        wait_until(Duration::from_secs(5), || {
            applied = c.pod_annotation("pgwarden.io/config-applied");
            applied.is_some()
        }),
        "no config-applied annotation\n--- operator ---\n{}",
        c.operator.log()
    );
    let applied = applied.unwrap();
    let version = applied["version"].as_u64().expect("version");
    assert!(applied["policies"]["shop"].as_i64().is_some(), "{applied}");
    let metrics = sidecar.metrics();
    assert!(
        metrics.contains("pgwarden_config_stream_connected 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("pgwarden_config_version {version}")),
        "{metrics}"
    );
    assert!(
        metrics.contains("pgwarden_config_snapshots_total{result=\"applied\"} 1"),
        "{metrics}"
    );

    // An edit reaches the open session's next statement within 2 s.
    kubectl(
        &c.api,
        &[
            "-n",
            "ci",
            "patch",
            "dap",
            "shop",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"rules":[{"name":"reads-only","action":"Allow","statements":["SELECT"],"tables":["public.orders"]}]}}"#,
        ],
        None,
    );
    let patched = Instant::now();
    loop {
        match client
            .simple_query("DELETE FROM orders WHERE id = 999")
            .await
        {
            Err(e) => {
                assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{e:?}");
                break;
            }
            Ok(_) => {
                assert!(
                    patched.elapsed() < PUSH_WITHIN,
                    "the edit did not reach the open session within {PUSH_WITHIN:?}\n--- sidecar ---\n{}",
                    sidecar.proc.log()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    println!("edit → verdict: {:?}", patched.elapsed());
    assert!(wait_until(Duration::from_secs(5), || {
        c.pod_annotation("pgwarden.io/config-applied")
            .and_then(|a| a["version"].as_u64())
            .is_some_and(|v| v > version)
    }));

    // The Secret is deleted: the sidecar keeps its last good credential.
    kubectl(&c.api, &["-n", "ci", "delete", "secret", "pg-cred"], None);
    assert!(
        wait_until(Duration::from_secs(5), || c
            .operator
            .log()
            .contains("Secret ci/pg-cred not found")),
        "{}",
        c.operator.log()
    );
    let fresh = sidecar
        .connect()
        .await
        .expect("a new session after the Secret is gone");
    fresh
        .query("SELECT total FROM orders", &[])
        .await
        .expect("still served with the last good credential");
    assert!(!sidecar.proc.log().contains(pgwarden_e2e::APP_PASSWORD));
    assert!(!c.operator.log().contains(pgwarden_e2e::APP_PASSWORD));

    // The pod is no longer selected: its open session ends, saying why.
    kubectl(&c.api, &["-n", "ci", "label", "pod", POD, "app-"], None);
    let unlabelled = Instant::now();
    loop {
        match client.simple_query("SELECT 1").await {
            Err(e) => {
                let db = e.as_db_error().unwrap_or_else(|| panic!("{e:?}"));
                assert_eq!(db.severity(), "FATAL", "{db:?}");
                assert!(db.message().contains("no policy serves database"), "{db:?}");
                break;
            }
            Ok(_) => {
                assert!(
                    unlabelled.elapsed() < PUSH_WITHIN,
                    "the open session outlived its policy\n--- sidecar ---\n{}",
                    sidecar.proc.log()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_that_must_not_fetch_a_configuration_get_nothing() {
    let pg = PgCluster::start();
    fixture(&pg);
    let c = Cluster::start(
        &pg,
        Options {
            min_token_expiration: Duration::from_secs(1),
            token_leeway: Duration::ZERO,
            ..Options::default()
        },
    );
    c.create_pod(POD, json!({"app": "agent"}), true);
    c.create_pod("plain", json!({"app": "agent"}), false);
    c.create_pod("doomed", json!({"app": "agent"}), true);

    let expired = c.token(POD, "pgwarden.io/sidecar", Some(Duration::from_secs(1)));
    let doomed = c.token("doomed", "pgwarden.io/sidecar", None);
    kubectl(&c.api, &["-n", "ci", "delete", "pod", "doomed"], None);
    std::thread::sleep(Duration::from_secs(2));
    let cases = [
        (
            "a token for the client audience",
            c.token(POD, "pgwarden", None),
            "token not authenticated",
        ),
        ("an expired token", expired, "token not authenticated"),
        (
            "a token whose pod was deleted",
            doomed,
            "token not authenticated",
        ),
        (
            "a pod that was not injected",
            c.token("plain", "pgwarden.io/sidecar", None),
            "was not injected by pgwarden",
        ),
    ];
    for (case, token, reason) in cases {
        let before = c.operator.log().matches("config stream refused").count();
        let sidecar = c.sidecar(&token);
        assert!(
            wait_until(Duration::from_secs(10), || {
                let log = c.operator.log();
                log.matches("config stream refused").count() > before
            }),
            "{case}: the operator logged no refusal\n{}",
            c.operator.log()
        );
        let log = c.operator.log();
        let line = log
            .lines()
            .filter(|l| l.contains("config stream refused"))
            .nth(before)
            .unwrap_or_default()
            .to_owned();
        assert!(line.contains(reason), "{case}: {line}");
        let token_text = fs::read_to_string(&token).unwrap();
        assert!(
            !log.contains(token_text.trim()),
            "{case}: the token was logged"
        );
        // Still not ready: never an open door.
        let err = sidecar.connect().await.expect_err(case);
        assert_eq!(sqlstate(&err).as_deref(), Some("57P03"), "{case}: {err:?}");
        // The sidecar logs the refusal when the answer arrives.
        assert!(
            wait_until(Duration::from_secs(5), || sidecar
                .proc
                .log()
                .contains("the operator answered 40")),
            "{case}: {}",
            sidecar.proc.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_operator_gone_the_sidecar_serves_its_last_snapshot_then_refuses_until_it_is_back()
{
    const STALE_AFTER: Duration = Duration::from_secs(3);
    let pg = PgCluster::start();
    fixture(&pg);
    let mut c = Cluster::start(&pg, Options::default());
    c.create_pod(POD, json!({"app": "agent"}), true);
    let token = c.token(POD, "pgwarden.io/sidecar", None);
    let sidecar = c.sidecar_with(&token, &["--operator-stale-after", "3s"]);
    let client = sidecar.connect_when_ready(Duration::from_secs(20)).await;

    c.kill_operator();
    let killed = Instant::now();
    // Within the bound: the last good snapshot keeps serving, old and new sessions.
    client
        .query("SELECT total FROM orders", &[])
        .await
        .expect("served while the operator is briefly gone");
    let other = sidecar
        .connect()
        .await
        .expect("a new session while the operator is gone");
    other.simple_query("SELECT 1").await.expect("served");
    assert!(
        wait_until(Duration::from_secs(5), || sidecar
            .metrics()
            .contains("pgwarden_config_stream_connected 0")),
        "{}",
        sidecar.metrics()
    );
    assert!(
        killed.elapsed() < STALE_AFTER,
        "the checks above took too long"
    );

    // Past the bound: statements are refused, saying why.
    tokio::time::sleep(STALE_AFTER.saturating_sub(killed.elapsed()) + Duration::from_millis(500))
        .await;
    let err = client
        .simple_query("SELECT 1")
        .await
        .expect_err("stale: refused");
    let db = err.as_db_error().unwrap_or_else(|| panic!("{err:?}"));
    assert_eq!(db.code().code(), "57P03", "{db:?}");
    assert!(db.message().contains("configuration is stale"), "{db:?}");
    let err = sidecar
        .connect()
        .await
        .expect_err("stale: new sessions refused");
    assert_eq!(sqlstate(&err).as_deref(), Some("57P03"), "{err:?}");
    assert!(sidecar.proc.log().contains("configuration is stale"));

    // The operator is back: the stream resumes and statements are served again.
    c.restart_operator();
    let back = sidecar.connect_when_ready(Duration::from_secs(40)).await;
    back.query("SELECT total FROM orders", &[])
        .await
        .expect("served again once the stream is back");
    assert!(sidecar.proc.log().contains("config stream is back"));
    // The new operator's snapshot holds what was in force: no rebuild.
    assert!(
        wait_until(Duration::from_secs(5), || sidecar
            .proc
            .log()
            .contains("unchanged; ACKed without a rebuild")),
        "{}",
        sidecar.proc.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_the_sidecar_cannot_build_is_nacked_and_the_last_good_stays() {
    let pg = PgCluster::start();
    fixture(&pg);
    let c = Cluster::start(&pg, Options::default());
    c.create_pod(POD, json!({"app": "agent"}), true);
    let token = c.token(POD, "pgwarden.io/sidecar", None);
    let sidecar = c.sidecar(&token);
    let client = sidecar.connect_when_ready(Duration::from_secs(20)).await;

    // Valid to the API server, but its CA is no certificate: the sidecar
    // cannot build it.
    kubectl(
        &c.api,
        &[
            "-n",
            "ci",
            "create",
            "secret",
            "generic",
            "bad-ca",
            "--from-literal=ca.crt=not a certificate",
        ],
        None,
    );
    kubectl(
        &c.api,
        &[
            "-n",
            "ci",
            "patch",
            "dap",
            "shop",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"database":{"tls":{"mode":"verify-full","caSecret":"bad-ca"}}}}"#,
        ],
        None,
    );
    let mut nack = None;
    assert!(
        wait_until(Duration::from_secs(5), || {
            nack = c.pod_annotation("pgwarden.io/config-error");
            nack.is_some()
        }),
        "no config-error annotation\n--- sidecar ---\n{}",
        sidecar.proc.log()
    );
    let nack = nack.unwrap();
    let error = nack["error"].as_str().unwrap_or_default();
    assert!(error.contains("spec.database.tls"), "{nack}");
    let applied = c
        .pod_annotation("pgwarden.io/config-applied")
        .expect("the earlier ACK");
    assert!(
        nack["version"].as_u64() > applied["version"].as_u64(),
        "{nack} {applied}"
    );
    // The last good configuration serves on, old and new sessions alike.
    client
        .query("SELECT total FROM orders", &[])
        .await
        .expect("the open session is served by the last good configuration");
    let fresh = sidecar.connect().await.expect("a new session");
    fresh
        .query("SELECT total FROM orders", &[])
        .await
        .expect("served");
    assert!(
        sidecar
            .metrics()
            .contains("pgwarden_config_snapshots_total{result=\"refused\"} 1"),
        "{}",
        sidecar.metrics()
    );
}

/// Two replicas behind a Service: a connection may reach either. The
/// sidecar's ACK must reach the replica that sent the snapshot, or the pod
/// never shows the version it runs (that replica alone knows what it sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_service_with_two_replicas_every_ack_lands() {
    let pg = PgCluster::start();
    fixture(&pg);
    let c = Cluster::start(&pg, Options::default());
    let second_port = free_port();
    let second = start_operator(
        &c.api,
        &c.cert,
        second_port,
        &c.dir.path().join("operator-2.log"),
    );
    // The Service: each new connection goes to the next replica in turn.
    let service_port = round_robin(vec![c.stream_port, second_port]).await;
    c.create_pod(POD, json!({"app": "agent"}), true);
    let token = c.token(POD, "pgwarden.io/sidecar", None);
    let port = free_port();
    let mut cmd = Command::new(pgwarden_bin());
    cmd.args(["run", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--state-dir")
        .arg(c.dir.path().join("state"))
        .args(["--operator", &format!("https://127.0.0.1:{service_port}")])
        .arg("--operator-ca")
        .arg(&c.ca)
        .arg("--operator-token-file")
        .arg(&token);
    let sidecar = LoggedProcess::spawn(cmd, c.dir.path().join("sidecar.log"));

    let logs = || {
        format!(
            "--- sidecar ---\n{}\n--- operator 1 ---\n{}\n--- operator 2 ---\n{}",
            sidecar.log(),
            c.operator.log(),
            second.log()
        )
    };
    let applied_version = || {
        c.pod_annotation("pgwarden.io/config-applied")
            .and_then(|a| a["version"].as_u64())
    };
    assert!(
        wait_until(Duration::from_secs(20), || applied_version().is_some()),
        "the first snapshot's ACK never showed on the pod\n{}",
        logs()
    );
    let first = applied_version().unwrap();

    // Each change is a new version from whichever replica holds the
    // stream; each ACK lands. Reconnects (a new connection, maybe the other
    // replica) must not lose ACKs either.
    let mut last = first;
    for (n, rules) in [
        r#"{"spec":{"rules":[{"name":"reads-only","action":"Allow","statements":["SELECT"],"tables":["public.orders"]}]}}"#,
        r#"{"spec":{"rules":[{"name":"app","action":"Allow","statements":["SELECT","DELETE"],"tables":["public.orders"]}]}}"#,
    ]
    .into_iter()
    .enumerate()
    {
        kubectl(
            &c.api,
            &["-n", "ci", "patch", "dap", "shop", "--type", "merge", "-p", rules],
            None,
        );
        assert!(
            wait_until(Duration::from_secs(5), || applied_version()
                .is_some_and(|v| v > last)),
            "change {n}: the ACK of the new version never showed on the pod (still {last})\n{}",
            logs()
        );
        last = applied_version().unwrap();
    }
    assert!(
        !sidecar.log().contains("sending the ACK failed"),
        "{}",
        logs()
    );
    assert!(
        c.pod_annotation("pgwarden.io/config-error").is_none(),
        "{}",
        logs()
    );
}

/// A TCP balancer on loopback, as a Service's virtual IP: connection n goes
/// to `backends[n % len]`. Returns its port.
async fn round_robin(backends: Vec<u16>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut n = 0usize;
        while let Ok((mut client, _)) = listener.accept().await {
            let backend = backends[n % backends.len()];
            n += 1;
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", backend)).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    port
}

/// Scale (issue 16): 500 simulated sidecars (real HTTPS streams with real
/// tokens, ACKing every snapshot) on one operator. Reports the operator's RSS
/// and CPU while idle and during a policy change, and the time until every
/// sidecar ACKed the new version. A benchmark, not a timed test:
/// `cargo test --release -p pgwarden-e2e --test operator_stream -- --ignored --nocapture`
/// (build the operator with `--release` too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by hand"]
async fn scale_500_sidecars_on_one_operator() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    const SIDECARS: usize = 500;
    let c = Cluster::start_at(1, Options::default());
    let items: Vec<Value> = (0..SIDECARS)
        .map(|i| {
            pgwarden_e2e::injected_pod("ci", &format!("sim-{i}"), json!({"app": "agent"}), "runner")
        })
        .collect();
    // One kubectl call: a stream of JSON objects.
    let docs: Vec<String> = items.iter().map(Value::to_string).collect();
    let file = c.dir.path().join("pods.json");
    fs::write(&file, docs.join("\n")).unwrap();
    kubectl(&c.api, &["apply", "-f", file.to_str().unwrap()], None);

    let ca = fs::read(&c.ca).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject as _;
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tls = Arc::new(tls);
    let port = c.stream_port;
    let rss_before = rss_kib(c.operator.child.id());
    // received[n] / acked[n]: sidecars that got / ACKed their n-th snapshot.
    let received: Arc<[AtomicUsize; 4]> = Arc::new(Default::default());
    let acked: Arc<[AtomicUsize; 4]> = Arc::new(Default::default());
    // The version each simulated sidecar (sim-i) last ACKed.
    let acked_versions = Arc::new(std::sync::Mutex::new(vec![0u64; SIDECARS]));
    for i in 0..SIDECARS {
        let token = c
            .api
            .token_request(
                "ci",
                "runner",
                &["pgwarden.io/sidecar"],
                Some(&format!("sim-{i}")),
                None,
            )
            .unwrap();
        let (tls, acked, received) = (tls.clone(), acked.clone(), received.clone());
        let acked_versions = acked_versions.clone();
        tokio::spawn(async move {
            // As the sidecar does: one HTTP/2 connection for the stream and
            // its ACKs.
            let conn = sim_connect(&tls, port).await;
            let mut body = sim_request(&conn, port, &token, "/v1/config", None).await;
            let mut lines = pgwarden_api::stream::LineDecoder::new(1 << 20);
            let mut n = 0;
            while let Some(Ok(frame)) = http_body_util::BodyExt::frame(&mut body).await {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                lines.push(&data);
                while let Ok(Some(line)) = lines.next_line() {
                    if let Ok(pgwarden_api::stream::StreamEvent::Snapshot { snapshot }) =
                        pgwarden_api::stream::decode_event(&line)
                    {
                        if let Some(r) = received.get(n) {
                            r.fetch_add(1, Ordering::SeqCst);
                        }
                        let ack = format!("{{\"version\":{}}}", snapshot.version);
                        let _ = sim_request(&conn, port, &token, "/v1/ack", Some(ack)).await;
                        acked_versions.lock().unwrap()[i] = snapshot.version;
                        if let Some(a) = acked.get(n) {
                            a.fetch_add(1, Ordering::SeqCst);
                        }
                        n += 1;
                    }
                }
            }
        });
    }
    let started = Instant::now();
    while acked[0].load(Ordering::SeqCst) < SIDECARS {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "only {} of {SIDECARS} sidecars got their first snapshot\n{}",
            acked[0].load(Ordering::SeqCst),
            c.operator
                .log()
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{SIDECARS} sidecars connected and ACKed in {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    let pid = c.operator.child.id();
    let idle_cpu = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_cpu = cpu_ticks(pid) - idle_cpu;
    let idle_rss = rss_kib(pid);

    let before = cpu_ticks(pid);
    let changed = Instant::now();
    kubectl(
        &c.api,
        &[
            "-n",
            "ci",
            "patch",
            "dap",
            "shop",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"rules":[{"name":"reads-only","action":"Allow","statements":["SELECT"],"tables":["public.orders"]}]}}"#,
        ],
        None,
    );
    let mut all_received = None;
    while acked[1].load(Ordering::SeqCst) < SIDECARS {
        if all_received.is_none() && received[1].load(Ordering::SeqCst) == SIDECARS {
            all_received = Some(changed.elapsed());
        }
        assert!(
            changed.elapsed() < Duration::from_secs(60),
            "only {} ACKed the change",
            acked[1].load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all_acked = changed.elapsed();
    // The pods' annotations (what the policy's status counts) follow the
    // ACKs, written a few at a time.
    let recorded = |versions: &[u64]| {
        let list: Value = serde_json::from_str(&kubectl(
            &c.api,
            &["-n", "ci", "get", "pods", "-o", "json"],
            None,
        ))
        .unwrap();
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| {
                let i: usize = p["metadata"]["name"].as_str().unwrap()["sim-".len()..]
                    .parse()
                    .unwrap();
                p["metadata"]["annotations"]["pgwarden.io/config-applied"]
                    .as_str()
                    .and_then(|a| serde_json::from_str::<Value>(a).ok())
                    .and_then(|a| a["version"].as_u64())
                    == Some(versions[i])
            })
            .count()
    };
    let versions = acked_versions.lock().unwrap().clone();
    while recorded(&versions) < SIDECARS {
        assert!(
            changed.elapsed() < Duration::from_secs(120),
            "the ACKs never all reached the pods"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all_recorded = changed.elapsed();
    let change_cpu = cpu_ticks(pid) - before;
    let rss = rss_kib(pid);
    let hz = 100.0; // USER_HZ
    println!(
        "operator: RSS {} MiB with no stream; with {SIDECARS} streams: idle RSS {} MiB, idle CPU {:.1}% of a core over 10 s; \
         policy change (timed from before `kubectl patch`): every sidecar had the new snapshot in {all_received:?} \
         and its ACK answered in {all_acked:?} (a request on the stream's HTTP/2 connection); every pod annotated \
         in {all_recorded:?} (an API write each, {} at a time); CPU {:.2} s, RSS after {} MiB",
        rss_before / 1024,
        idle_rss / 1024,
        idle_cpu as f64 / hz / 10.0 * 100.0,
        16,
        change_cpu as f64 / hz,
        rss / 1024
    );
}

type SimConn = hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>;

/// A simulated sidecar's HTTP/2 connection to the operator.
async fn sim_connect(tls: &std::sync::Arc<rustls::ClientConfig>, port: u16) -> SimConn {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    sender
}

/// One request of a simulated sidecar on its connection.
async fn sim_request(
    conn: &SimConn,
    port: u16,
    token: &str,
    path: &str,
    post: Option<String>,
) -> hyper::body::Incoming {
    let req = http::Request::builder()
        .method(if post.is_some() { "POST" } else { "GET" })
        .uri(format!("https://127.0.0.1:{port}{path}"))
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Full::new(bytes::Bytes::from(
            post.unwrap_or_default(),
        )))
        .unwrap();
    let resp = conn.clone().send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200, "{path}");
    resp.into_body()
}

fn proc_status(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    proc_status(pid, "VmRSS:")
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the state.
    f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0)
}
