//! The cluster installed from the rendered chart (manifests/install.yaml, which
//! scripts/check-chart keeps identical to `helm template`): the CRDs, the
//! operator's ServiceAccount and RBAC, its Service and webhook
//! configurations are applied with the real kubectl; the operator runs with
//! the Deployment's own arguments and environment, authenticated as the
//! chart's ServiceAccount, so the test API server enforces the chart's RBAC
//! on every call. The mission flow then runs: a policy becomes Ready, an
//! opted-in pod is injected, the pod runner starts its real sidecar, which
//! gets its configuration over the stream (served with the certificate the
//! operator made itself) and serves the agent; and the test fails if the
//! operator made any API call the chart does not allow (the audit log tells).
//!
//! The test server runs no Deployment or PodDisruptionBudget controllers: the
//! test plays the Deployment (one replica, its container's args) and skips the
//! PodDisruptionBudget. Needs `cargo build -p pgwarden-operator` first.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use pgwarden_e2e::{free_port, http_get, operator_bin};
use pgwarden_testapi::TestApiServer;
use serde_json::Value;

const NS: &str = "pgwarden-system";
const SA_USER: &str = "system:serviceaccount:pgwarden-system:pgwarden-operator";

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn kubectl(api: &TestApiServer, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = api
        .kubectl_command("admin")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kubectl");
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn ok(api: &TestApiServer, args: &[&str], stdin: Option<&str>) -> String {
    let o = kubectl(api, args, stdin);
    assert!(
        o.status.success(),
        "kubectl {args:?}:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn install_docs() -> Vec<Value> {
    let text = std::fs::read_to_string(repo("manifests/install.yaml")).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("install.yaml parses"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// The operator container of the chart's Deployment.
fn operator_container(docs: &[Value]) -> Value {
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("the chart renders a Deployment");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["serviceAccountName"],
        "pgwarden-operator"
    );
    deployment["spec"]["template"]["spec"]["containers"][0].clone()
}

struct Played {
    child: Child,
    log: PathBuf,
    metrics_port: u16,
}

impl Played {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Played {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the operator as the Deployment would: its args with `$(VAR)`
/// expanded from its env (fieldRefs played), listen addresses moved to free
/// loopback ports, and a kubeconfig holding the ServiceAccount's token.
fn play_deployment(api: &TestApiServer, dir: &std::path::Path, docs: &[Value]) -> Played {
    let container = operator_container(docs);
    let token = api
        .token_request(NS, "pgwarden-operator", &[], None, None)
        .expect("token for the chart's ServiceAccount");
    let kubeconfig = dir.join("operator.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"{}\", certificate-authority: \"{}\"}}\nusers:\n- name: sa\n  user: {{token: \"{token}\"}}\ncontexts:\n- name: sa\n  context: {{cluster: c, user: sa}}\ncurrent-context: sa\n",
            api.url(),
            api.ca_cert().display()
        ),
    )
    .unwrap();
    let mut env: Vec<(String, String)> = Vec::new();
    for e in container["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap().to_string();
        let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("metadata.name") => "pgwarden-operator-7d9f-x2k4p".to_string(),
            Some("metadata.namespace") => NS.to_string(),
            Some(other) => panic!("fieldRef {other} not played by this test"),
            None => e["value"].as_str().unwrap_or_default().to_string(),
        };
        env.push((name, value));
    }
    let metrics_port = free_port();
    let admission_port = free_port();
    let stream_port = free_port();
    let mut args: Vec<String> = Vec::new();
    for a in container["args"].as_array().unwrap() {
        let mut a = a.as_str().unwrap().to_string();
        for (k, v) in &env {
            a = a.replace(&format!("$({k})"), v);
        }
        // No pod network here: the container's ports become free loopback ports.
        for (port, free) in [
            (8080, metrics_port),
            (9443, admission_port),
            (8443, stream_port),
        ] {
            a = a.replace(&format!("0.0.0.0:{port}"), &format!("127.0.0.1:{free}"));
        }
        // No cluster DNS for the sidecar either: it reaches the stream's port
        // by address, which the operator's own certificate then also names.
        if a.starts_with("--operator-url=") {
            a = format!("--operator-url=https://127.0.0.1:{stream_port}");
        }
        args.push(a);
    }
    args.push("--serving-cert-san=127.0.0.1".into());
    // The Service's DNS name leads to the admission port (no cluster DNS).
    api.set_service_endpoint(
        &format!("pgwarden-operator.{NS}.svc"),
        format!("127.0.0.1:{admission_port}").parse().unwrap(),
    );
    let log = dir.join("operator.log");
    let child = Command::new(operator_bin())
        .args(&args)
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start pgwarden-operator");
    Played {
        child,
        log,
        metrics_port,
    }
}

fn eventually<T>(what: &str, op: &Played, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n--- operator log ---\n{}",
            op.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_installs_a_working_operator_that_needs_no_permission_it_does_not_grant() {
    use pgwarden_e2e::{pgwarden_bin, PgCluster, APP_DATABASE, APP_PASSWORD, APP_USER};
    use pgwarden_testapi::kubelet::{Kubelet, KubeletOptions, RunOptions};

    let pg = PgCluster::start();
    pg.admin_sql(&format!(
        "\\c {APP_DATABASE}\nCREATE TABLE orders (id int PRIMARY KEY, total int NOT NULL);\n\
         INSERT INTO orders VALUES (1, 10), (2, 20);"
    ));
    let api = TestApiServer::start().expect("test API server");
    let dir = tempfile::tempdir().unwrap();
    let docs = install_docs();
    let mut applied = Vec::new();
    for doc in &docs {
        let kind = doc["kind"].as_str().unwrap_or_default();
        if matches!(kind, "Deployment" | "PodDisruptionBudget") {
            continue;
        }
        ok(&api, &["apply", "-f", "-"], Some(&doc.to_string()));
        applied.push(kind.to_string());
    }
    for kind in [
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "Role",
        "Service",
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ] {
        assert!(
            applied.iter().any(|k| k == kind),
            "{kind} not in the chart: {applied:?}"
        );
    }

    let op = play_deployment(&api, dir.path(), &docs);
    eventually("/readyz", &op, || {
        matches!(http_get(op.metrics_port, "/readyz"), Ok((200, _))).then_some(())
    });

    // The admin's part of the walkthrough: opt a namespace in, apply a policy
    // (the in-cluster example, pointed at this test's PostgreSQL).
    ok(&api, &["create", "namespace", "ci"], None);
    ok(
        &api,
        &["label", "namespace", "ci", "pgwarden.io/inject=enabled"],
        None,
    );
    ok(
        &api,
        &[
            "-n",
            "ci",
            "create",
            "secret",
            "generic",
            "shop-credentials",
            &format!("--from-literal=username={APP_USER}"),
            &format!("--from-literal=password={APP_PASSWORD}"),
        ],
        None,
    );
    let example = std::fs::read_to_string(repo("manifests/examples/in-cluster-pod-identity.yaml"))
        .unwrap()
        .replace("host: prod-pg.databases.svc", "host: 127.0.0.1")
        .replace("port: 5432", &format!("port: {}", pg.port()))
        .replace("name: shop\n", &format!("name: {APP_DATABASE}\n"))
        .replace("tls: {mode: require}", "tls: {mode: disable}");
    ok(&api, &["apply", "-f", "-"], Some(&example));
    let dap = || -> Value {
        serde_json::from_str(&ok(
            &api,
            &["get", "dap", "-n", "ci", "nightly-agent", "-o", "json"],
            None,
        ))
        .unwrap()
    };
    eventually("the policy Ready", &op, || {
        dap()["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
            .then_some(())
    });

    // A CI pod: injected by the operator's webhook with the chart's
    // configuration, run by the pod runner with the real sidecar.
    ok(
        &api,
        &["create", "serviceaccount", "ci-runner", "-n", "ci"],
        None,
    );
    let kubelet = Kubelet::start(
        &api,
        KubeletOptions {
            pgwarden_bin: Some(pgwarden_bin()),
            ..KubeletOptions::default()
        },
    )
    .expect("pod runner");
    kubelet.run_pod("ci", "nightly-1", RunOptions::new());
    let pod = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"nightly-1","namespace":"ci","labels":{"app":"nightly-agent"}},
      "spec":{"serviceAccountName":"ci-runner","restartPolicy":"Never","containers":[{"name":"agent","image":"agent:1"}]}}"#;
    // The caBundle lands once the operator made its certificate: retry.
    eventually("the pod admitted", &op, || {
        let o = kubectl(&api, &["create", "-f", "-"], Some(pod));
        o.status.success().then_some(())
    });
    let stored: Value = serde_json::from_str(&ok(
        &api,
        &["get", "pod", "-n", "ci", "nightly-1", "-o", "json"],
        None,
    ))
    .unwrap();
    let init = &stored["spec"]["initContainers"][0];
    assert_eq!(init["name"], "pgwarden", "{stored:#}");
    assert_eq!(init["restartPolicy"], "Always");
    assert!(
        stored["metadata"]["annotations"]["pgwarden.io/injected"].is_string(),
        "{stored:#}"
    );

    // The sidecar gets its configuration over the stream, served with the
    // certificate the operator made itself (no cert-manager, no files), and
    // the agent reads through it as the pod (identity.pod): no password.
    let ip = eventually("the pod's IP", &op, || kubelet.pod_ip("ci", "nightly-1"));
    let conninfo =
        format!("host={ip} port=5432 user=agent dbname={APP_DATABASE} connect_timeout=5");
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = loop {
        match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                break client;
            }
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!(
                "the injected sidecar never served: {e:?}\n--- sidecar ---\n{}\n--- operator ---\n{}",
                kubelet.pod_logs("ci", "nightly-1", "pgwarden"),
                op.log()
            ),
        }
    };
    let rows = client
        .query("SELECT total FROM orders ORDER BY id", &[])
        .await
        .expect("an allowed read");
    let totals: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(totals, [10, 20]);
    let denied = client
        .batch_execute("DELETE FROM orders")
        .await
        .expect_err("not allowed by the policy");
    assert_eq!(denied.as_db_error().map(|d| d.code().code()), Some("42501"));
    drop(client);

    // The controller counts the pod and its ACK; then the API server's
    // verdict on every call the operator made.
    eventually("selectedPods = appliedSidecars = 1", &op, || {
        let v = dap();
        (v["status"]["selectedPods"] == 1 && v["status"]["appliedSidecars"] == 1).then_some(())
    });
    let calls: Vec<_> = api
        .audit()
        .into_iter()
        .filter(|e| e.user == SA_USER)
        .collect();
    assert!(
        calls.iter().any(|e| e.resource == "tokenreviews"),
        "the operator ran as the chart's ServiceAccount and reviewed the sidecar's token: {calls:?}"
    );
    let forbidden: Vec<String> = calls
        .iter()
        .filter(|e| e.code == 403)
        .map(|e| {
            format!(
                "{} {}/{} {} ns={} name={}",
                e.verb, e.group, e.resource, e.subresource, e.namespace, e.name
            )
        })
        .collect();
    assert!(
        forbidden.is_empty(),
        "the operator needs permissions the chart does not grant:\n{}\n--- operator log ---\n{}",
        forbidden.join("\n"),
        op.log()
    );
    // The pod runner owns a runtime: it stops outside this one.
    tokio::task::block_in_place(move || drop(kubelet));
}
