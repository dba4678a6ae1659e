//! The real `pgwarden-operator` against the test API server, driven by the
//! real kubectl (issue 16): policy status from `kubectl apply` to Ready, an
//! invalid spec with its field path and Event, generation tracking, a Secret
//! deleted and restored, selected/applied pods, metrics, and leader election
//! between replicas (graceful and hard failover, measured).
//!
//! Needs `cargo build -p pgwarden-operator` first.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use pgwarden_e2e::Operator;
use pgwarden_testapi::{auth, Options, StaticUser, TestApiServer};
use serde_json::Value;

const NS: &str = "ci";

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn text(o: &Output) -> String {
    pgwarden_testapi::output_text(o)
}

fn kubectl(api: &TestApiServer, args: &[&str]) -> Output {
    api.kubectl("admin", args)
}

fn ok(api: &TestApiServer, args: &[&str]) -> String {
    let o = kubectl(api, args);
    assert!(o.status.success(), "kubectl {args:?} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn apply(api: &TestApiServer, yaml: &str) -> String {
    let mut child = api
        .kubectl_command("admin")
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kubectl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "kubectl apply failed:\n{}\n{yaml}",
        text(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The server with both CRDs (as installed: the operator's approval
/// controller runs under the same Lease), namespace `ci`, and extra system:masters users
/// (one per operator replica, so the audit log tells them apart).
fn cluster(replicas: &[&str]) -> TestApiServer {
    let mut users = auth::default_users();
    for r in replicas {
        users.push(StaticUser {
            name: r.to_string(),
            token: format!("{r}-{}", auth::random_token()),
            groups: vec!["system:masters".into()],
        });
    }
    let api = TestApiServer::start_with(Options {
        users,
        ..Options::default()
    })
    .expect("start test API server");
    ok(
        &api,
        &[
            "apply",
            "-f",
            repo("crds/databaseaccesspolicies.yaml").to_str().unwrap(),
            "-f",
            repo("crds/approvalrequests.yaml").to_str().unwrap(),
        ],
    );
    ok(&api, &["create", "namespace", NS]);
    api
}

fn secret_yaml() -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: shop-cred, namespace: {NS}}}\n\
         stringData: {{username: app, password: not-logged-anywhere}}\n"
    )
}

fn policy_yaml(name: &str, rules: &str) -> String {
    format!(
        "apiVersion: pgwarden.io/v1alpha1
kind: DatabaseAccessPolicy
metadata: {{name: {name}, namespace: {NS}}}
spec:
  podSelector: {{matchLabels: {{app: agent}}}}
  identity: {{kubernetes: {{audience: pgwarden}}}}
  database: {{host: pg.example, port: 5432, name: shop, credentialsSecret: shop-cred}}
  defaultAction: Deny
  rules: {rules}
"
    )
}

const GOOD_RULES: &str = "[{name: reads, action: Allow, statements: [SELECT]}]";

fn get_json(api: &TestApiServer, what: &str) -> Value {
    serde_json::from_str(&ok(api, &["get", "-n", NS, what, "-o", "json"])).unwrap()
}

fn condition(policy: &Value, type_: &str) -> Value {
    policy["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_).cloned())
        .unwrap_or(Value::Null)
}

/// Polls `f` every 50 ms until it returns Some; panics after `timeout`.
fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn ready_reason(api: &TestApiServer, name: &str) -> String {
    let p = get_json(api, &format!("dap/{name}"));
    condition(&p, "Ready")["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn policy_status_follows_spec_secrets_and_pods() {
    let api = cluster(&[]);
    let mut op = Operator::builder(api.kubeconfig()).identity("op-0").start();
    op.wait_ready(Duration::from_secs(15));

    // Apply a Secret and a policy: Ready within seconds, shown by kubectl.
    apply(&api, &secret_yaml());
    apply(&api, &policy_yaml("nightly", GOOD_RULES));
    let w = kubectl(
        &api,
        &[
            "wait",
            "-n",
            NS,
            "--for=condition=Ready",
            "dap/nightly",
            "--timeout=10s",
        ],
    );
    assert!(
        w.status.success(),
        "{}\n--- operator ---\n{}",
        text(&w),
        op.log()
    );
    let p = get_json(&api, "dap/nightly");
    assert_eq!(p["status"]["observedGeneration"], 1);
    assert_eq!(condition(&p, "Invalid")["status"], "False");
    let table = ok(&api, &["get", "dap", "-n", NS]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..5], ["nightly", "shop", "Deny", "0", "0"], "{table}");

    // A policy the CRD schema admits but validate() refuses.
    apply(
        &api,
        &policy_yaml(
            "bulk",
            "[{name: bulk, action: Allow, statements: [SELECT], unfiltered: true}]",
        ),
    );
    let w = kubectl(
        &api,
        &[
            "wait",
            "-n",
            NS,
            "--for=condition=Invalid",
            "dap/bulk",
            "--timeout=10s",
        ],
    );
    assert!(
        w.status.success(),
        "{}\n--- operator ---\n{}",
        text(&w),
        op.log()
    );
    let bulk = get_json(&api, "dap/bulk");
    let msg = condition(&bulk, "Invalid")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.starts_with("spec.rules[0].unfiltered: "), "{msg}");
    assert_eq!(condition(&bulk, "Ready")["status"], "False");
    assert_eq!(condition(&bulk, "Ready")["reason"], "InvalidSpec");
    let events = eventually(Duration::from_secs(5), "InvalidSpec Event", || {
        let ev = ok(&api, &["get", "events.events.k8s.io", "-n", NS]);
        ev.lines()
            .any(|l| l.contains("InvalidSpec") && l.contains("bulk"))
            .then_some(ev)
    });
    assert!(events.contains("spec.rules[0].unfiltered"), "{events}");
    assert!(
        events
            .lines()
            .any(|l| l.contains("Ready") && l.contains("nightly")),
        "a Ready Event for nightly:\n{events}"
    );

    // An edit bumps the generation; observedGeneration follows.
    ok(
        &api,
        &[
            "patch",
            "dap",
            "nightly",
            "-n",
            NS,
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"defaultAction":"Allow"}}"#,
        ],
    );
    let w = kubectl(
        &api,
        &[
            "wait",
            "-n",
            NS,
            "--for=jsonpath={.status.observedGeneration}=2",
            "dap/nightly",
            "--timeout=10s",
        ],
    );
    assert!(
        w.status.success(),
        "{}\n--- operator ---\n{}",
        text(&w),
        op.log()
    );
    assert_eq!(
        condition(&get_json(&api, "dap/nightly"), "Ready")["observedGeneration"],
        2
    );

    // The Secret goes: SecretMissing within a couple of seconds, naming it.
    let t = Instant::now();
    ok(&api, &["delete", "secret", "shop-cred", "-n", NS]);
    eventually(Duration::from_secs(5), "SecretMissing", || {
        (ready_reason(&api, "nightly") == "SecretMissing").then_some(())
    });
    let took = t.elapsed();
    println!("Secret deleted → SecretMissing in {took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    let p = get_json(&api, "dap/nightly");
    let msg = condition(&p, "Ready")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains("\"shop-cred\""), "{msg}");
    // A key missing is named too, and no value is ever shown.
    apply(
        &api,
        &format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: shop-cred, namespace: {NS}}}\nstringData: {{username: app}}\n"),
    );
    eventually(Duration::from_secs(5), "SecretKeyMissing", || {
        (ready_reason(&api, "nightly") == "SecretKeyMissing").then_some(())
    });
    let p = get_json(&api, "dap/nightly");
    assert!(
        condition(&p, "Ready")["message"]
            .as_str()
            .unwrap()
            .contains("\"password\""),
        "{p}"
    );
    // Restored: Ready again.
    apply(&api, &secret_yaml());
    let w = kubectl(
        &api,
        &[
            "wait",
            "-n",
            NS,
            "--for=condition=Ready",
            "dap/nightly",
            "--timeout=10s",
        ],
    );
    assert!(w.status.success(), "{}", text(&w));

    // An injected pod the selector matches, whose sidecar ACKed generation 2.
    apply(
        &api,
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: agent-1
  namespace: {NS}
  labels: {{app: agent}}
  annotations:
    pgwarden.io/injected: "true"
    pgwarden.io/config-applied: '{{"version":5,"policies":{{"nightly":2}}}}'
spec:
  containers: [{{name: app, image: busybox}}]
"#
        ),
    );
    apply(
        &api,
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: agent-2
  namespace: {NS}
  labels: {{app: agent}}
  annotations: {{pgwarden.io/injected: "true"}}
spec:
  containers: [{{name: app, image: busybox}}]
"#
        ),
    );
    let p = eventually(Duration::from_secs(5), "selectedPods 2", || {
        let p = get_json(&api, "dap/nightly");
        (p["status"]["selectedPods"] == 2).then_some(p)
    });
    assert_eq!(p["status"]["appliedSidecars"], 1, "{p}");
    assert_eq!(condition(&p, "Applied")["reason"], "Pending");
    let table = ok(&api, &["get", "dap", "nightly", "-n", NS]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[3..5], ["2", "1"], "{table}");
    // Its labels change: no longer selected.
    ok(
        &api,
        &[
            "label",
            "pod",
            "agent-2",
            "-n",
            NS,
            "app=web",
            "--overwrite",
        ],
    );
    eventually(Duration::from_secs(5), "selectedPods 1", || {
        let p = get_json(&api, "dap/nightly");
        (p["status"]["selectedPods"] == 1 && condition(&p, "Applied")["status"] == "True")
            .then_some(())
    });

    // Quiet when nothing changes: no status write in a second of idling.
    let writes = |api: &TestApiServer| {
        api.audit()
            .iter()
            .filter(|e| e.resource == "databaseaccesspolicies" && e.subresource == "status")
            .count()
    };
    let before = writes(&api);
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(writes(&api), before, "status written with nothing changed");

    let m = op.metrics();
    let ok_reconciles = op
        .metric("pgwarden_operator_reconciles_total{result=\"ok\"}")
        .unwrap_or(0.0);
    assert!(ok_reconciles >= 5.0, "{m}");
    assert_eq!(op.metric("pgwarden_operator_is_leader"), Some(1.0), "{m}");
    assert!(
        m.contains("pgwarden_operator_reconcile_duration_seconds_count"),
        "{m}"
    );
    let log = op.log();
    assert!(
        !log.contains("not-logged-anywhere"),
        "a Secret value was logged:\n{log}"
    );

    let status = op.terminate();
    assert!(status.success(), "{status:?}");
}

/// Who wrote policy status since audit event `from`.
fn status_writers(api: &TestApiServer, from: usize) -> Vec<String> {
    let mut users: Vec<String> = api.audit()[from..]
        .iter()
        .filter(|e| {
            e.resource == "databaseaccesspolicies"
                && e.subresource == "status"
                && e.verb == "patch"
                && e.code < 300
        })
        .map(|e| e.user.clone())
        .collect();
    users.dedup();
    users
}

fn lease_holder(api: &TestApiServer) -> String {
    let o = kubectl(
        api,
        &[
            "get",
            "lease",
            "pgwarden-operator",
            "-n",
            "default",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn is_leader(op: &Operator) -> bool {
    pgwarden_e2e::http_get(op.metrics_port(), "/metrics")
        .map(|(_, body)| body.lines().any(|l| l == "pgwarden_operator_is_leader 1"))
        .unwrap_or(false)
}

#[test]
fn one_leader_writes_and_the_other_replica_takes_over() {
    let api = cluster(&["op-a", "op-b", "op-c"]);
    apply(&api, &secret_yaml());
    let start = |id: &str| {
        let op = Operator::builder(api.kubeconfig())
            .context(id)
            .identity(id)
            .lease_duration_seconds(3)
            .start();
        op.wait_ready(Duration::from_secs(15));
        op
    };
    let mut a = start("op-a");
    eventually(Duration::from_secs(5), "op-a leads", || {
        is_leader(&a).then_some(())
    });
    let mut b = start("op-b");
    assert_eq!(lease_holder(&api), "op-a");

    let from = api.audit().len();
    apply(&api, &policy_yaml("nightly", GOOD_RULES));
    let w = kubectl(
        &api,
        &[
            "wait",
            "-n",
            NS,
            "--for=condition=Ready",
            "dap/nightly",
            "--timeout=10s",
        ],
    );
    assert!(
        w.status.success(),
        "{}\n--- op-a ---\n{}",
        text(&w),
        a.log()
    );
    thread::sleep(Duration::from_millis(500));
    assert_eq!(status_writers(&api, from), ["op-a"]);
    assert!(!is_leader(&b));
    assert_eq!(b.metric("pgwarden_operator_is_leader"), Some(0.0));

    // SIGTERM: op-a stops its controller, releases the Lease, exits 0; op-b
    // (watching the Lease) takes over at once.
    let t = Instant::now();
    let status = a.terminate();
    let exited = t.elapsed();
    assert!(status.success(), "{status:?}");
    println!("op-a exited {exited:?} after SIGTERM");
    eventually(Duration::from_secs(10), "op-b leads", || {
        is_leader(&b).then_some(())
    });
    let gap = t.elapsed();
    println!("graceful failover (SIGTERM to new leader): {gap:?}");
    assert!(
        gap < Duration::from_secs(2),
        "took {gap:?}, lease duration is 3 s\n--- op-a ---\n{}\n--- op-b ---\n{}",
        a.log(),
        b.log()
    );
    assert_eq!(lease_holder(&api), "op-b");

    // The new leader reconciles.
    let from = api.audit().len();
    ok(
        &api,
        &[
            "patch",
            "dap",
            "nightly",
            "-n",
            NS,
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"defaultAction":"Allow"}}"#,
        ],
    );
    let w = kubectl(
        &api,
        &[
            "wait",
            "-n",
            NS,
            "--for=jsonpath={.status.observedGeneration}=2",
            "dap/nightly",
            "--timeout=10s",
        ],
    );
    assert!(
        w.status.success(),
        "{}\n--- op-b ---\n{}",
        text(&w),
        b.log()
    );
    assert_eq!(status_writers(&api, from), ["op-b"]);

    // SIGKILL: nothing is released; op-c takes over once the lease expires.
    let mut c = start("op-c");
    thread::sleep(Duration::from_millis(300));
    assert!(!is_leader(&c));
    let t = Instant::now();
    let _ = b.kill();
    eventually(Duration::from_secs(10), "op-c leads", || {
        is_leader(&c).then_some(())
    });
    let gap = t.elapsed();
    println!("hard failover (SIGKILL to new leader, lease 3 s): {gap:?}");
    assert!(
        gap >= Duration::from_millis(1500) && gap < Duration::from_secs(6),
        "took {gap:?}"
    );
    assert_eq!(lease_holder(&api), "op-c");
    let from = api.audit().len();
    ok(
        &api,
        &[
            "patch",
            "dap",
            "nightly",
            "-n",
            NS,
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"defaultAction":"Deny"}}"#,
        ],
    );
    let w = kubectl(
        &api,
        &[
            "wait",
            "-n",
            NS,
            "--for=jsonpath={.status.observedGeneration}=3",
            "dap/nightly",
            "--timeout=10s",
        ],
    );
    assert!(
        w.status.success(),
        "{}\n--- op-c ---\n{}",
        text(&w),
        c.log()
    );
    assert_eq!(status_writers(&api, from), ["op-c"]);
    assert!(c.terminate().success());
    // Released on the way out.
    assert_eq!(lease_holder(&api), "");
}
