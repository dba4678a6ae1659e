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
//! The test server runs no Deployment or PodDisruptionBudget controllers:
//! `pgwarden_testapi::install` plays the Deployment (one replica, its
//! container's args) and skips the PodDisruptionBudget. Needs
//! `cargo build -p pgwarden-operator -p pgwarden-sidecar` first.

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use pgwarden_e2e::{http_get, operator_bin};
use pgwarden_testapi::install::{install, PlayedOperator};
use pgwarden_testapi::TestApiServer;
use serde_json::Value;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn kubectl(api: &TestApiServer, args: &[&str], stdin: Option<&str>) -> Output {
    api.kubectl_stdin("admin", args, stdin)
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

fn eventually<T>(what: &str, op: &PlayedOperator, mut f: impl FnMut() -> Option<T>) -> T {
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

#[test]
fn the_chart_installs_a_working_operator_that_needs_no_permission_it_does_not_grant() {
    use pgwarden_e2e::{pgwarden_bin, run_psql, PgCluster, APP_DATABASE, APP_PASSWORD, APP_USER};
    use pgwarden_testapi::kubelet::{Kubelet, KubeletOptions, RunOptions};

    let pg = PgCluster::start();
    pg.admin_sql(&format!(
        "\\c {APP_DATABASE}\nCREATE TABLE orders (id int PRIMARY KEY, total int NOT NULL);\n\
         INSERT INTO orders VALUES (1, 10), (2, 20);"
    ));
    let api = TestApiServer::start().expect("test API server");
    let dir = tempfile::tempdir().unwrap();
    let (applied, op) = install(
        &api,
        &repo("manifests/install.yaml"),
        &operator_bin(),
        dir.path(),
    )
    .expect("install from the rendered chart");
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
    // A policy that can never serve is refused at apply, with the field path
    // (the operator's validating webhook, the same validate() as its status).
    let bad = example.replace(
        "pod:\n      serviceAccounts: [\"ci-*\"]",
        "kubernetes: {audience: pgwarden.io/sidecar}",
    );
    assert_ne!(bad, example);
    let bad = bad.replace("nightly-agent\n", "bad-agent\n");
    // Until the operator has patched its CA into the webhook configurations
    // the call fails and, failurePolicy Ignore, the write passes: retry.
    let refusal = eventually("the bad policy refused", &op, || {
        let o = kubectl(&api, &["apply", "-f", "-"], Some(&bad));
        (!o.status.success()).then(|| pgwarden_testapi::output_text(&o))
    });
    assert!(
        refusal.contains("policies-validate.pgwarden.io")
            && refusal.contains("spec.identity.kubernetes.audience"),
        "{refusal}"
    );
    ok(
        &api,
        &[
            "delete",
            "dap",
            "-n",
            "ci",
            "bad-agent",
            "--ignore-not-found",
        ],
        None,
    );
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

    // A CI Job: its pod injected by the operator's webhook with the chart's
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
    kubelet
        .run_matching("ci", "job-name=nightly", RunOptions::new())
        .unwrap();
    let job = r#"{"apiVersion":"batch/v1","kind":"Job","metadata":{"name":"nightly","namespace":"ci"},
      "spec":{"backoffLimit":0,"template":{"metadata":{"labels":{"app":"nightly-agent"}},
        "spec":{"serviceAccountName":"ci-runner","restartPolicy":"Never",
                "containers":[{"name":"agent","image":"agent:1"}]}}}}"#;
    ok(&api, &["apply", "-f", "-"], Some(job));
    // The caBundle lands once the operator made its certificate; until then
    // the Job controller's pod creation is refused and retried.
    let pod_name = eventually("the Job's pod", &op, || {
        let out = ok(
            &api,
            &[
                "get",
                "pods",
                "-n",
                "ci",
                "-l",
                "job-name=nightly",
                "-o",
                "name",
            ],
            None,
        );
        out.lines()
            .next()
            .map(|l| l.trim_start_matches("pod/").to_string())
    });
    let stored: Value = serde_json::from_str(&ok(
        &api,
        &["get", "pod", "-n", "ci", &pod_name, "-o", "json"],
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
    // The injected pod is a valid Pod for every Kubernetes the chart supports
    // (the PyPI kubernetes-validate that scripts/check-chart installs).
    let manifest = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name, "namespace": "ci",
            "labels": stored["metadata"]["labels"], "annotations": stored["metadata"]["annotations"]},
        "spec": stored["spec"],
    });
    let file = dir.path().join("injected-pod.json");
    std::fs::write(&file, manifest.to_string()).unwrap();
    for version in ["1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0"] {
        let o = std::process::Command::new("python3")
            .args([
                "-m",
                "kubernetes_validate",
                "--strict",
                "--quiet",
                "-k",
                version,
            ])
            .arg(&file)
            .output()
            .expect("python3");
        assert!(
            o.status.success(),
            "the injected pod does not validate for Kubernetes {version} (scripts/check-chart installs kubernetes-validate):\n{}",
            pgwarden_testapi::output_text(&o)
        );
    }
    let spec_text = stored["spec"].to_string();
    assert!(
        !spec_text.contains(APP_PASSWORD),
        "no credential in the pod spec"
    );

    // The agent: psql with the pod's own env (injection set PGHOST/PGPORT/
    // PGSSLMODE), reaching the sidecar at the pod's IP as the runner reports
    // it. The sidecar got its configuration over the stream, served with the
    // certificate the operator made itself; the agent is the pod
    // (identity.pod): no password, no token.
    let ip = eventually("the pod's IP", &op, || kubelet.pod_ip("ci", &pod_name));
    let mut env: Vec<(String, String)> = stored["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_string(),
                e["value"].as_str()?.to_string(),
            ))
        })
        .collect();
    assert!(
        env.iter().any(|(k, v)| k == "PGHOST" && v == "127.0.0.1"),
        "{env:?}"
    );
    for (k, v) in env.iter_mut() {
        if k == "PGHOST" {
            *v = ip.clone();
        }
    }
    env.push(("PGUSER".into(), "agent".into()));
    env.push(("PGDATABASE".into(), APP_DATABASE.into()));
    let totals = eventually("a read through the sidecar", &op, || {
        let o = run_psql(
            &env,
            &["-At", "-c", "SELECT total FROM orders ORDER BY id"],
            None,
        );
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
    });
    assert_eq!(totals, "10\n20");
    let o = run_psql(&env, &["-c", "DELETE FROM orders"], None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("ERROR"), "{err}");

    eventually("selectedPods = appliedSidecars = 1", &op, || {
        let v = dap();
        (v["status"]["selectedPods"] == 1 && v["status"]["appliedSidecars"] == 1).then_some(())
    });

    // The agent's container ends: the runner stops the sidecar as a kubelet
    // does, and the Job completes (a native sidecar never holds it open).
    kubelet.finish_pod("ci", &pod_name, 0);
    ok(
        &api,
        &[
            "wait",
            "-n",
            "ci",
            "--for=condition=complete",
            "job/nightly",
            "--timeout=60s",
        ],
        None,
    );

    // The controller counts the pod and its ACK; then the API server's
    // verdict on every call the operator made.
    eventually("the finished pod no longer selected", &op, || {
        let v = dap();
        // The Job's pod has finished: it no longer counts as selected.
        (v["status"]["selectedPods"] == 0).then_some(())
    });
    let calls: Vec<_> = api
        .audit()
        .into_iter()
        .filter(|e| e.user == op.user)
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
    drop(kubelet);
}
