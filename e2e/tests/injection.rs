//! Injection and the pod guard (issue 18): the real `pgwarden-operator`
//! serves its admission webhooks over TLS with the certificate it made
//! itself; the test API server calls them for the webhook configurations
//! the chart renders (manifests/install.yaml), with the caBundle the
//! operator patched in; pods are created with the real kubectl.
//!
//! Needs `cargo build -p pgwarden-operator` first.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use pgwarden_e2e::{free_port, Operator};
use pgwarden_testapi::TestApiServer;
use serde_json::Value;

const OPERATOR_NS: &str = "pgwarden-system";
const SERVICE: &str = "pgwarden-operator";
/// Labelled pgwarden.io/inject=enabled.
const CI: &str = "ci";
/// Not labelled.
const OTHER: &str = "other";

fn text(o: &Output) -> String {
    pgwarden_testapi::output_text(o)
}

fn kubectl_in(api: &TestApiServer, args: &[&str], stdin: Option<&str>) -> Output {
    api.kubectl_stdin("admin", args, stdin)
}

fn ok(api: &TestApiServer, args: &[&str], stdin: Option<&str>) -> String {
    let o = kubectl_in(api, args, stdin);
    assert!(o.status.success(), "kubectl {args:?}:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// kubectl must fail; returns what it printed.
fn refused(api: &TestApiServer, args: &[&str], stdin: Option<&str>) -> String {
    let o = kubectl_in(api, args, stdin);
    assert!(
        !o.status.success(),
        "kubectl {args:?} succeeded:\n{}",
        text(&o)
    );
    text(&o)
}

fn get(api: &TestApiServer, ns: &str, what: &str) -> Value {
    serde_json::from_str(&ok(api, &["get", "-n", ns, what, "-o", "json"], None)).unwrap()
}

fn eventually<T>(timeout: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    eventually_or(timeout, what, String::new, f)
}

/// As `eventually`, with `context()` (the operator's log) in the failure.
fn eventually_or<T>(
    timeout: Duration,
    what: &str,
    context: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The webhook configurations exactly as the chart renders them.
fn webhook_configurations() -> String {
    let install = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/install.yaml"),
    )
    .expect("manifests/install.yaml");
    let docs: Vec<&str> = install
        .split("\n---\n")
        .filter(|d| {
            d.contains("\nkind: MutatingWebhookConfiguration")
                || d.contains("\nkind: ValidatingWebhookConfiguration")
        })
        .collect();
    assert_eq!(docs.len(), 2, "both configurations are in install.yaml");
    docs.join("\n---\n")
}

struct Cluster {
    api: TestApiServer,
    operator: Operator,
    admission: std::net::SocketAddr,
}

impl Cluster {
    fn start() -> Cluster {
        let api = TestApiServer::start().expect("test API server");
        let crds = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds");
        for crd in ["databaseaccesspolicies.yaml", "approvalrequests.yaml"] {
            ok(
                &api,
                &["apply", "-f", crds.join(crd).to_str().unwrap()],
                None,
            );
        }
        for ns in [OPERATOR_NS, CI, OTHER] {
            ok(&api, &["create", "namespace", ns], None);
        }
        ok(
            &api,
            &["label", "namespace", CI, "pgwarden.io/inject=enabled"],
            None,
        );
        let admission: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        // No cluster DNS: the Service's name leads to the operator's port.
        api.set_service_endpoint(&format!("{SERVICE}.{OPERATOR_NS}.svc"), admission);
        ok(&api, &["apply", "-f", "-"], Some(&webhook_configurations()));
        let operator = start_operator(&api, admission);
        let c = Cluster {
            api,
            operator,
            admission,
        };
        c.wait_for_ca_bundle();
        c
    }

    /// Every webhook of both configurations carries the operator's CA.
    fn wait_for_ca_bundle(&self) -> String {
        let log = || self.operator.log();
        eventually_or(Duration::from_secs(20), "caBundle patched", log, || {
            let mut bundles = Vec::new();
            for kind in [
                "mutatingwebhookconfiguration",
                "validatingwebhookconfiguration",
            ] {
                let c: Value = serde_json::from_str(&ok(
                    &self.api,
                    &["get", kind, SERVICE, "-o", "json"],
                    None,
                ))
                .unwrap();
                for w in c["webhooks"].as_array()? {
                    bundles.push(w["clientConfig"]["caBundle"].as_str()?.to_owned());
                }
            }
            let first = bundles.first()?.clone();
            (bundles.len() == 9 && bundles.iter().all(|b| *b == first)).then_some(first)
        })
    }

    /// POSTs an AdmissionReview to the operator as the API server does
    /// (curl, trusting only the CA in the operator's Secret).
    fn review(&self, path: &str, review: &Value) -> Value {
        use base64::Engine as _;
        let secret = get(&self.api, OPERATOR_NS, "secret/pgwarden-webhook-tls");
        let ca = base64::engine::general_purpose::STANDARD
            .decode(secret["data"]["ca.crt"].as_str().unwrap())
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, ca).unwrap();
        let host = format!("{SERVICE}.{OPERATOR_NS}.svc");
        let port = self.admission.port();
        let mut child = std::process::Command::new("curl")
            .args(["-sS", "--fail-with-body", "--cacert"])
            .arg(&ca_file)
            .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
            .args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                "@-",
            ])
            .arg(format!("https://{host}:{port}{path}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("curl");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(review.to_string().as_bytes())
            .unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "curl: {}", text(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    fn create_pod(&self, ns: &str, yaml: &str) -> Output {
        kubectl_in(&self.api, &["create", "-n", ns, "-f", "-"], Some(yaml))
    }
}

fn start_operator(api: &TestApiServer, admission: std::net::SocketAddr) -> Operator {
    let operator = Operator::builder(api.kubeconfig())
        .namespace(OPERATOR_NS)
        .leader_election(false)
        .arg(format!("--admission-addr={admission}"))
        .arg(format!("--webhook-config-name={SERVICE}"))
        .arg("--cert-check-interval=1s")
        .arg("--sidecar-image=pgwarden:e2e")
        .start();
    operator.wait_ready(Duration::from_secs(20));
    operator
}

fn pod(name: &str, labels: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{app: agent{labels}}}
spec:
  restartPolicy: Never
  containers:
    - name: agent
      image: agent:1
      env: [{{name: PGHOST, value: prod-pg.databases.svc}}]
{extra_spec}"
    )
}

fn env(c: &Value, name: &str) -> Option<String> {
    c["env"]
        .as_array()?
        .iter()
        .rev()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str().map(str::to_owned))
}

/// What an injected pod must look like.
fn assert_injected(p: &Value) {
    let init = p["spec"]["initContainers"]
        .as_array()
        .expect("init containers");
    let sidecar = &init[0];
    assert_eq!(sidecar["name"], "pgwarden", "{p:#}");
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["image"], "pgwarden:e2e");
    assert_eq!(
        init.iter().filter(|c| c["name"] == "pgwarden").count(),
        1,
        "injected once"
    );
    let token_mounts: Vec<&str> = ["initContainers", "containers"]
        .iter()
        .flat_map(|l| p["spec"][l].as_array().into_iter().flatten())
        .filter(|c| {
            c["volumeMounts"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["name"] == "pgwarden-sidecar-token"))
        })
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        token_mounts,
        ["pgwarden"],
        "only the sidecar mounts the token"
    );
    let token = p["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "pgwarden-sidecar-token")
        .expect("token volume");
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "pgwarden.io/sidecar"
    );
    for c in p["spec"]["containers"].as_array().unwrap() {
        assert_eq!(env(c, "PGHOST").as_deref(), Some("127.0.0.1"), "{c:#}");
        assert_eq!(env(c, "PGPORT").as_deref(), Some("5432"));
        assert_eq!(env(c, "PGSSLMODE").as_deref(), Some("disable"));
    }
    let ann = &p["metadata"]["annotations"];
    assert_eq!(ann["pgwarden.io/injected"], "v1");
    assert!(ann["pgwarden.io/operator-ca"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN CERTIFICATE-----"));
    // No credential anywhere in the pod.
    let all = p.to_string().to_lowercase();
    assert!(
        !all.contains("password") && !all.contains("secretkeyref"),
        "{all}"
    );
}

#[test]
fn injection_and_the_pod_guard() {
    let c = Cluster::start();
    let api = &c.api;

    // A bare pod in the labelled namespace.
    let o = c.create_pod(CI, &pod("bare", "", ""));
    assert!(o.status.success(), "{}", text(&o));
    assert_injected(&get(api, CI, "pod/bare"));

    // A Job's pod (generateName, created by the Job controller).
    ok(
        api,
        &[
            "create",
            "job",
            "nightly",
            "-n",
            CI,
            "--image=agent:1",
            "--",
            "true",
        ],
        None,
    );
    let job_pod = eventually(Duration::from_secs(10), "the job's pod", || {
        let pods = get(api, CI, "pods");
        pods["items"]
            .as_array()?
            .iter()
            .find(|p| p["metadata"]["labels"]["job-name"] == "nightly")
            .cloned()
    });
    assert_injected(&job_pod);
    assert!(job_pod["metadata"]["generateName"].is_string());

    // A pod that opts out, and a pod in another namespace: untouched.
    let o = c.create_pod(CI, &pod("optout", ", pgwarden.io/inject: \"false\"", ""));
    assert!(o.status.success(), "{}", text(&o));
    let p = get(api, CI, "pod/optout");
    assert!(p["spec"]["initContainers"].is_null(), "{p:#}");
    assert_eq!(
        env(&p["spec"]["containers"][0], "PGHOST").as_deref(),
        Some("prod-pg.databases.svc")
    );
    let o = c.create_pod(OTHER, &pod("plain", "", ""));
    assert!(o.status.success(), "{}", text(&o));
    assert!(get(api, OTHER, "pod/plain")["spec"]["initContainers"].is_null());
    // ...unless the pod itself opts in.
    let o = c.create_pod(OTHER, &pod("optin", ", pgwarden.io/inject: \"true\"", ""));
    assert!(o.status.success(), "{}", text(&o));
    assert_injected(&get(api, OTHER, "pod/optin"));

    // Creating an already injected pod again (a copy of the stored one)
    // does not inject twice.
    let mut copy = get(api, CI, "pod/bare");
    let meta = copy["metadata"].as_object_mut().unwrap();
    meta.retain(|k, _| ["labels", "annotations"].contains(&k.as_str()));
    meta.insert("name".into(), "copy".into());
    copy.as_object_mut().unwrap().remove("status");
    let o = c.create_pod(CI, &copy.to_string());
    assert!(o.status.success(), "{}", text(&o));
    assert_injected(&get(api, CI, "pod/copy"));

    // The guard: hostNetwork, the token volume in an app container.
    let out = refused(
        api,
        &["create", "-n", CI, "-f", "-"],
        Some(&pod("hostnet", "", "  hostNetwork: true\n")),
    );
    assert!(
        out.contains("denied the request") && out.contains("remove hostNetwork"),
        "{out}"
    );
    let thief = pod("thief", "", "").replace(
        "      env: [",
        "      volumeMounts: [{name: pgwarden-sidecar-token, mountPath: /t}]\n      env: [",
    );
    let out = refused(api, &["create", "-n", CI, "-f", "-"], Some(&thief));
    assert!(
        out.contains("mounts volume pgwarden-sidecar-token")
            && out.contains("remove that volumeMount"),
        "{out}"
    );
    // Another token for the sidecar's audience, in a pod that opted in.
    let stolen = pod(
        "audience",
        ", pgwarden.io/inject: \"true\"",
        "  volumes: [{name: mine, projected: {sources: [{serviceAccountToken: {audience: pgwarden.io/sidecar, path: t}}]}}]\n",
    );
    let out = refused(api, &["create", "-n", OTHER, "-f", "-"], Some(&stolen));
    assert!(out.contains("use another audience"), "{out}");

    // An ephemeral container added later that targets the sidecar. The
    // test API server has no pods/ephemeralcontainers subresource, so the
    // review the real server would send goes to the operator directly, over
    // TLS verified with the CA from its Secret.
    let stored = get(api, CI, "pod/bare");
    let with_debug = |target: &str| {
        let mut p = stored.clone();
        p["spec"]["ephemeralContainers"] = serde_json::json!([
            {"name": "debug", "image": "busybox", "targetContainerName": target}]);
        p
    };
    let review = |object: Value| {
        serde_json::json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "e2e-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "subResource": "ephemeralcontainers", "operation": "UPDATE",
                "namespace": CI, "name": "bare", "object": object, "oldObject": stored,
                "userInfo": {"username": "admin"}}})
    };
    let answer = c.review("/guard", &review(with_debug("pgwarden")));
    assert_eq!(answer["response"]["uid"], "e2e-1");
    assert_eq!(answer["response"]["allowed"], false, "{answer:#}");
    let msg = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(msg.contains("target an app container instead"), "{msg}");
    let answer = c.review("/guard", &review(with_debug("agent")));
    assert_eq!(answer["response"]["allowed"], true, "{answer:#}");

    // Deleting the certificate Secret: a new CA, the caBundle follows, and
    // injection keeps working without a restart.
    let before = c.wait_for_ca_bundle();
    ok(
        api,
        &[
            "delete",
            "secret",
            "-n",
            OPERATOR_NS,
            "pgwarden-webhook-tls",
        ],
        None,
    );
    eventually(Duration::from_secs(20), "a new CA in caBundle", || {
        (c.wait_for_ca_bundle() != before).then_some(())
    });
    eventually(
        Duration::from_secs(20),
        "injection with the new certificate",
        || {
            let name = format!("after-{}", free_port());
            let o = c.create_pod(CI, &pod(&name, "", ""));
            o.status
                .success()
                .then(|| assert_injected(&get(api, CI, &format!("pod/{name}"))))
        },
    );
    assert!(c.operator.running());
}

#[test]
fn with_the_webhook_down_opted_in_pods_are_refused_and_others_are_not() {
    let mut c = Cluster::start();
    let o = c.create_pod(CI, &pod("running", "", ""));
    assert!(o.status.success(), "{}", text(&o));
    c.operator.terminate();
    // Nothing listens on the webhook's address any more.
    assert!(std::net::TcpStream::connect(c.admission).is_err());
    let out = refused(
        &c.api,
        &["create", "-n", CI, "-f", "-"],
        Some(&pod("unguarded", "", "")),
    );
    assert!(out.contains("inject-namespace.pgwarden.io"), "{out}");
    let out = refused(
        &c.api,
        &["create", "-n", OTHER, "-f", "-"],
        Some(&pod("optin", ", pgwarden.io/inject: \"true\"", "")),
    );
    assert!(out.contains("inject-pod.pgwarden.io"), "{out}");
    let o = c.create_pod(OTHER, &pod("plain", "", ""));
    assert!(o.status.success(), "{}", text(&o));
    // Updates of running opted-in pods (controllers removing finalizers,
    // relabelling) do not stall with the operator.
    ok(
        &c.api,
        &["label", "-n", CI, "pod/running", "stage=done"],
        None,
    );
    // The operator's own namespace is never blocked by its webhooks.
    let o = c.create_pod(
        OPERATOR_NS,
        &pod("operator-ns", ", pgwarden.io/inject: \"true\"", ""),
    );
    assert!(o.status.success(), "{}", text(&o));
}

/// The whole path: `kubectl create` in the labelled namespace → the pod is
/// injected → the pod runner starts the real sidecar from the mutated spec
/// (token, CA annotation, args) → it gets its configuration from the
/// operator's stream → the agent queries through it under the policy, with
/// no credential anywhere in the pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_pod_runs_its_sidecar_and_queries_through_it() {
    use pgwarden_e2e::{pgwarden_bin, PgCluster, APP_DATABASE, APP_PASSWORD, APP_USER};
    use pgwarden_testapi::kubelet::{Kubelet, KubeletOptions, RunOptions};

    let pg = PgCluster::start();
    pg.admin_sql(&format!(
        "\\c {APP_DATABASE}\nCREATE TABLE orders (id int PRIMARY KEY, total int NOT NULL);\n\
         INSERT INTO orders VALUES (1, 10), (2, 20);"
    ));
    let api = TestApiServer::start().expect("test API server");
    let crds = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds");
    for crd in ["databaseaccesspolicies.yaml", "approvalrequests.yaml"] {
        ok(
            &api,
            &["apply", "-f", crds.join(crd).to_str().unwrap()],
            None,
        );
    }
    for ns in [OPERATOR_NS, CI] {
        ok(&api, &["create", "namespace", ns], None);
    }
    ok(
        &api,
        &["label", "namespace", CI, "pgwarden.io/inject=enabled"],
        None,
    );
    ok(
        &api,
        &["-n", CI, "create", "serviceaccount", "runner"],
        None,
    );
    ok(
        &api,
        &[
            "-n",
            CI,
            "create",
            "secret",
            "generic",
            "pg-cred",
            &format!("--from-literal=username={APP_USER}"),
            &format!("--from-literal=password={APP_PASSWORD}"),
        ],
        None,
    );
    let policy = format!(
        "apiVersion: pgwarden.io/v1alpha1
kind: DatabaseAccessPolicy
metadata: {{name: shop, namespace: {CI}}}
spec:
  podSelector: {{matchLabels: {{app: agent}}}}
  identity: {{pod: {{}}}}
  database: {{host: 127.0.0.1, port: {}, name: {APP_DATABASE}, credentialsSecret: pg-cred}}
  defaultAction: Deny
  rules: [{{name: reads, action: Allow, statements: [SELECT], tables: [public.orders]}}]
",
        pg.port()
    );
    ok(&api, &["apply", "-f", "-"], Some(&policy));

    // One certificate (from the test server's CA) for the webhooks and the
    // stream, as cert-manager would provide it: the stream takes files.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = api
        .issue_serving_cert(&[&format!("{SERVICE}.{OPERATOR_NS}.svc"), "127.0.0.1"])
        .unwrap();
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    let admission: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let stream_port = free_port();
    api.set_service_endpoint(&format!("{SERVICE}.{OPERATOR_NS}.svc"), admission);
    ok(&api, &["apply", "-f", "-"], Some(&webhook_configurations()));
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let operator = Operator::builder(api.kubeconfig())
        .namespace(OPERATOR_NS)
        .leader_election(false)
        .arg(format!("--admission-addr={admission}"))
        .arg(format!("--webhook-config-name={SERVICE}"))
        .arg(format!("--tls-cert-file={}", path(&cert_file)))
        .arg(format!("--tls-key-file={}", path(&key_file)))
        .arg(format!("--ca-file={}", path(&api.ca_cert())))
        .arg(format!("--stream-addr=127.0.0.1:{stream_port}"))
        .arg(format!("--stream-cert={}", path(&cert_file)))
        .arg(format!("--stream-key={}", path(&key_file)))
        .arg(format!("--operator-url=https://127.0.0.1:{stream_port}"))
        .arg("--sidecar-image=pgwarden:e2e")
        .start();
    operator.wait_ready(Duration::from_secs(20));

    let kubelet = Kubelet::start(
        &api,
        KubeletOptions {
            pgwarden_bin: Some(pgwarden_bin()),
            ..KubeletOptions::default()
        },
    )
    .expect("pod runner");
    kubelet.run_pod(CI, "agent-1", RunOptions::new());
    let agent = "apiVersion: v1
kind: Pod
metadata: {name: agent-1, labels: {app: agent}}
spec:
  serviceAccountName: runner
  containers: [{name: agent, image: agent:1}]
";
    // The caBundle may take a check interval to land: retry the create.
    eventually_or(
        Duration::from_secs(90),
        "the pod admitted",
        || operator.log(),
        || {
            kubectl_in(&api, &["create", "-n", CI, "-f", "-"], Some(agent))
                .status
                .success()
                .then_some(())
        },
    );
    let p = get(&api, CI, "pod/agent-1");
    assert_injected(&p);

    let ip = eventually_or(
        Duration::from_secs(30),
        "the pod's IP",
        || operator.log(),
        || kubelet.pod_ip(CI, "agent-1"),
    );
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
                kubelet.pod_logs(CI, "agent-1", "pgwarden"),
                operator.log()
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
    assert_eq!(
        denied.as_db_error().map(|d| d.code().code()),
        Some("42501"),
        "{denied:?}"
    );
    drop(client);
    // The pod runner owns a runtime: it stops outside this one.
    tokio::task::block_in_place(move || drop(kubelet));
}
