//! An approvals cluster on the test API server (issue 17): the CRDs, namespaces
//! `ci` and `pgwarden-system`, the `runner` service account, the database's
//! Secret, the test's manifests (policy, reviewers' RBAC, ...), the chart's
//! admission webhooks served by the real operator, an injected pod `agent-1`
//! and the real sidecar (`pgwarden run --operator`) with that pod's token.
//!
//! The approval tests differ only in the manifests they apply and the table
//! that proves the sidecar serves, so those are the parameters.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use pgwarden_testapi::TestApiServer;
use serde_json::{json, Value};

use crate::process::LoggedProcess;
use crate::{free_port, libpq_command, pgwarden_bin, Operator, TestCa, APP_DATABASE};

pub const NS: &str = "ci";
pub const OPERATOR_NS: &str = "pgwarden-system";
/// The operator's Service (and webhook configurations' name), as the chart names it.
pub const SERVICE: &str = "pgwarden-operator";
pub const POD: &str = "agent-1";

/// Reviewers: alice and bob may read and patch requests (RBAC); the
/// webhook decides who may decide. alice may also create (to show that the
/// webhook, not RBAC, refuses a request made by a person).
pub const REVIEWER_RBAC: &str = "apiVersion: rbac.authorization.k8s.io/v1
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

/// kubectl output (stdout and stderr) for assertion messages.
pub fn text(o: &Output) -> String {
    pgwarden_testapi::output_text(o)
}

/// `kubectl ARGS` as `user`; panics with its output unless it succeeds.
pub fn kubectl_ok(api: &TestApiServer, user: &str, args: &[&str], stdin: Option<&str>) -> String {
    let o = api.kubectl_stdin(user, args, stdin);
    assert!(
        o.status.success(),
        "kubectl {args:?} as {user}:\n{}",
        text(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Polls `f` every 100 ms until it returns `Some`; panics after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The chart's Mutating- and ValidatingWebhookConfigurations (manifests/install.yaml).
pub fn webhook_configurations() -> String {
    let install =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/install.yaml"))
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

/// The policy `shop` in `ci` for pods `app=agent` (default Deny) on the
/// database at 127.0.0.1:`pg_port`; `rest` is its YAML from `  rules:` on.
pub fn shop_policy(pg_port: u16, rest: &str) -> String {
    format!(
        "apiVersion: pgwarden.io/v1alpha1
kind: DatabaseAccessPolicy
metadata: {{name: shop, namespace: {NS}}}
spec:
  podSelector: {{matchLabels: {{app: agent}}}}
  identity: {{pod: {{}}}}
  database: {{host: 127.0.0.1, port: {pg_port}, name: {APP_DATABASE}, credentialsSecret: pg-cred}}
  defaultAction: Deny
{rest}"
    )
}

/// The operator watching `ci`, without leader election, with `args`.
pub fn start_operator(api: &TestApiServer, args: &[String]) -> Operator {
    let mut b = Operator::builder(api.kubeconfig())
        .namespace(OPERATOR_NS)
        .leader_election(false)
        .watch_namespaces(&[NS]);
    for a in args {
        b = b.arg(a.clone());
    }
    b.start()
}

/// What differs between the approval tests.
pub struct ApprovalClusterSpec<'a> {
    /// Prefix of the temp dir (names the test in leftover dirs).
    pub dir_prefix: &'a str,
    /// Applied in order as admin after the database's Secret `pg-cred`
    /// (the policy, the reviewers' RBAC, anything they refer to).
    pub manifests: &'a [&'a str],
    /// A table `agent` may SELECT: the sidecar serves once `count(*)` works.
    pub ready_table: &'a str,
}

pub struct ApprovalCluster {
    pub api: TestApiServer,
    pub operator: Operator,
    /// The operator's arguments, to start it again the same way.
    pub operator_args: Vec<String>,
    pub sidecar: LoggedProcess,
    pub sidecar_port: u16,
    /// The agent's own service-account token, for the API server's audience.
    pub runner_token: String,
    pub dir: tempfile::TempDir,
}

impl ApprovalCluster {
    pub fn start(spec: &ApprovalClusterSpec) -> ApprovalCluster {
        let ok = kubectl_ok;
        let dir = tempfile::Builder::new()
            .prefix(spec.dir_prefix)
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
                &format!("--from-literal=username={}", crate::APP_USER),
                &format!("--from-literal=password={}", crate::APP_PASSWORD),
            ],
            None,
        );
        for m in spec.manifests {
            ok(&api, "admin", &["apply", "-f", "-"], Some(m));
        }

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

        let pod = crate::injected_pod(NS, POD, json!({"app": "agent"}), "runner");
        ok(&api, "admin", &["apply", "-f", "-"], Some(&pod.to_string()));
        let token = api
            .token_request(NS, "runner", &["pgwarden.io/sidecar"], Some(POD), None)
            .expect("TokenRequest");
        let token_file = dir.path().join("token");
        fs::write(&token_file, token).expect("write token");
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
        let sidecar = LoggedProcess::spawn(cmd, dir.path().join("pgwarden.log"));
        let c = ApprovalCluster {
            api,
            operator,
            operator_args,
            sidecar,
            sidecar_port,
            runner_token,
            dir,
        };
        let probe = format!("SELECT count(*) FROM {}", spec.ready_table);
        eventually(Duration::from_secs(20), "the sidecar serving", || {
            let o = libpq_command("psql", &[])
                .args(["-X", "-A", "-t", "-c", &probe])
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

    /// ApprovalRequest `id` as alice sees it.
    pub fn apr(&self, id: &str) -> Value {
        serde_json::from_str(&kubectl_ok(
            &self.api,
            "alice",
            &["get", "apr", "-n", NS, id, "-o", "json"],
            None,
        ))
        .expect("apr JSON")
    }

    /// The operator's and the sidecar's logs, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- operator ---\n{}\n--- sidecar ---\n{}",
            self.operator.log(),
            self.sidecar.log()
        )
    }
}
