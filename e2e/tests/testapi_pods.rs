//! The test API server's control plane with the real `kubectl`: the Job controller,
//! ownerReference garbage collection (background, orphan, foreground), and the pod
//! runner playing the kubelet (issue 15 items 4, 6, 8, 10).

use std::process::Output;
use std::time::{Duration, Instant};

use pgwarden_testapi::kubelet::{Kubelet, KubeletOptions, RunOptions};
use pgwarden_testapi::TestApiServer;
use serde_json::Value;

fn text(o: &Output) -> String {
    pgwarden_testapi::output_text(o)
}

/// Runs kubectl as admin and requires success; returns stdout.
fn ok(api: &TestApiServer, args: &[&str]) -> String {
    let o = api.kubectl("admin", args);
    assert!(o.status.success(), "kubectl {args:?} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json_of(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}):\n{s}"))
}

/// Polls `f` until it returns `Some`, panicking with `what` after `timeout`.
fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The names of the pods of Job `job` (by the controller's `job-name` label).
fn job_pods(api: &TestApiServer, job: &str) -> Vec<String> {
    let out = ok(
        api,
        &[
            "get",
            "pods",
            "-l",
            &format!("job-name={job}"),
            "-o",
            "json",
        ],
    );
    json_of(&out)["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["metadata"]["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn one_job_pod(api: &TestApiServer, job: &str) -> String {
    eventually("the Job's pod", Duration::from_secs(10), || {
        job_pods(api, job).into_iter().next()
    })
}

fn pod_exists(api: &TestApiServer, name: &str) -> bool {
    api.kubectl("admin", &["get", "pod", name]).status.success()
}

#[test]
fn a_job_creates_its_owned_pod_completes_and_its_deletion_collects_the_pod() {
    let api = TestApiServer::start().unwrap();
    ok(
        &api,
        &[
            "create",
            "job",
            "hello",
            "--image=busybox",
            "--",
            "sh",
            "-c",
            "echo hi",
        ],
    );
    let pod = one_job_pod(&api, "hello");
    assert!(
        pod.starts_with("hello-") && pod.len() == "hello-".len() + 5,
        "{pod}"
    );
    let p = json_of(&ok(&api, &["get", "pod", &pod, "-o", "json"]));
    let job = json_of(&ok(&api, &["get", "job", "hello", "-o", "json"]));
    let owner = &p["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "Job");
    assert_eq!(owner["uid"], job["metadata"]["uid"]);
    assert_eq!(owner["controller"], true);
    assert_eq!(
        p["metadata"]["labels"]["batch.kubernetes.io/controller-uid"],
        job["metadata"]["uid"]
    );
    assert_eq!(
        job["spec"]["selector"]["matchLabels"]["batch.kubernetes.io/controller-uid"],
        job["metadata"]["uid"]
    );
    // The pod was created by the job controller, through the API.
    assert!(api.audit().iter().any(|e| e.verb == "create"
        && e.resource == "pods"
        && e.user == "system:serviceaccount:kube-system:job-controller"
        && e.code == 201));
    assert_eq!(job["status"]["active"], 1, "{job}");

    // Played by hand here (the runner's tests below run it for real).
    ok(
        &api,
        &[
            "patch",
            "pod",
            &pod,
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"Succeeded"}}"#,
        ],
    );
    ok(
        &api,
        &[
            "wait",
            "--for=condition=complete",
            "job/hello",
            "--timeout=10s",
        ],
    );
    let job = json_of(&ok(&api, &["get", "job", "hello", "-o", "json"]));
    assert_eq!(job["status"]["succeeded"], 1);
    assert!(job["status"]["completionTime"].is_string(), "{job}");

    // kubectl deletes with propagationPolicy=Background: the collector removes the pod.
    ok(&api, &["delete", "job", "hello"]);
    ok(
        &api,
        &[
            "wait",
            "--for=delete",
            &format!("pod/{pod}"),
            "--timeout=10s",
        ],
    );
    assert!(api.audit().iter().any(|e| e.verb == "delete"
        && e.resource == "pods"
        && e.user == "system:serviceaccount:kube-system:generic-garbage-collector"));
}

#[test]
fn a_job_whose_pod_fails_past_its_backoff_limit_fails() {
    let api = TestApiServer::start().unwrap();
    ok(
        &api,
        &["create", "job", "doomed", "--image=busybox", "--", "false"],
    );
    ok(
        &api,
        &[
            "patch",
            "job",
            "doomed",
            "--type=merge",
            "-p",
            r#"{"spec":{"backoffLimit":1}}"#,
        ],
    );
    // Each failed pod is replaced until more than backoffLimit failed.
    for round in 0..2 {
        let pod = eventually("a live pod", Duration::from_secs(10), || {
            job_pods(&api, "doomed").into_iter().find(|p| {
                let o = json_of(&ok(&api, &["get", "pod", p, "-o", "json"]));
                o["status"]["phase"] != "Failed"
            })
        });
        ok(
            &api,
            &[
                "patch",
                "pod",
                &pod,
                "--subresource=status",
                "--type=merge",
                "-p",
                r#"{"status":{"phase":"Failed"}}"#,
            ],
        );
        if round == 0 {
            eventually("a replacement pod", Duration::from_secs(10), || {
                (job_pods(&api, "doomed").len() == 2).then_some(())
            });
        }
    }
    ok(
        &api,
        &[
            "wait",
            "--for=condition=failed",
            "job/doomed",
            "--timeout=10s",
        ],
    );
    let job = json_of(&ok(&api, &["get", "job", "doomed", "-o", "json"]));
    assert_eq!(job["status"]["failed"], 2, "{job}");
    let failed = job["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Failed")
        .cloned()
        .unwrap();
    assert_eq!(failed["reason"], "BackoffLimitExceeded");
    assert_eq!(job_pods(&api, "doomed").len(), 2, "no third pod");
}

#[test]
fn orphan_and_foreground_deletion_as_kubectl_asks() {
    let api = TestApiServer::start().unwrap();
    ok(
        &api,
        &["create", "job", "kept", "--image=busybox", "--", "true"],
    );
    let pod = one_job_pod(&api, "kept");
    // --cascade=orphan: the Job goes, the pod stays without its owner reference.
    ok(&api, &["delete", "job", "kept", "--cascade=orphan"]);
    ok(&api, &["wait", "--for=delete", "job/kept", "--timeout=10s"]);
    let p = eventually("the orphaned pod", Duration::from_secs(10), || {
        let p = json_of(&ok(&api, &["get", "pod", &pod, "-o", "json"]));
        p["metadata"]["ownerReferences"].is_null().then_some(p)
    });
    assert!(p["metadata"]["deletionTimestamp"].is_null(), "{p}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(pod_exists(&api, &pod), "an orphan must not be collected");

    // --cascade=foreground: the pod goes first, then the Job.
    ok(
        &api,
        &["create", "job", "fg", "--image=busybox", "--", "true"],
    );
    let pod = one_job_pod(&api, "fg");
    ok(
        &api,
        &[
            "delete",
            "job",
            "fg",
            "--cascade=foreground",
            "--wait=true",
            "--timeout=10s",
        ],
    );
    assert!(
        !pod_exists(&api, &pod),
        "the dependent goes before its owner"
    );
    assert!(!api.kubectl("admin", &["get", "job", "fg"]).status.success());
}

fn kubelet(api: &TestApiServer) -> Kubelet {
    Kubelet::start(
        api,
        KubeletOptions {
            pgwarden_bin: Some(pgwarden_e2e::pgwarden_bin()),
            ..KubeletOptions::default()
        },
    )
    .expect("start the pod runner")
}

fn pod_json(api: &TestApiServer, name: &str) -> Value {
    json_of(&ok(api, &["get", "pod", name, "-o", "json"]))
}

#[test]
fn the_runner_runs_a_jobs_pod_with_a_host_command_and_the_job_completes() {
    let api = TestApiServer::start().unwrap();
    let k = kubelet(&api);
    k.run_matching(
        "default",
        "job-name=hello",
        RunOptions::new().as_specified("hello"),
    )
    .unwrap();
    ok(
        &api,
        &[
            "create",
            "job",
            "hello",
            "--image=busybox",
            "--",
            "sh",
            "-c",
            "echo hi from $(hostname -s >/dev/null; echo the job)",
        ],
    );
    ok(
        &api,
        &[
            "wait",
            "--for=condition=complete",
            "job/hello",
            "--timeout=20s",
        ],
    );
    let pod = one_job_pod(&api, "hello");
    let p = pod_json(&api, &pod);
    assert_eq!(p["status"]["phase"], "Succeeded", "{p}");
    let st = &p["status"]["containerStatuses"][0];
    assert_eq!(st["state"]["terminated"]["exitCode"], 0, "{p}");
    assert_eq!(st["state"]["terminated"]["reason"], "Completed");
    assert!(
        p["status"]["podIP"].as_str().unwrap().starts_with("127.0."),
        "{p}"
    );
    assert_eq!(k.pod_logs("default", &pod, "hello"), "hi from the job\n");
    // The same through the API (pods/log), by pod and by Job.
    assert_eq!(ok(&api, &["logs", &pod]), "hi from the job\n");
    assert_eq!(ok(&api, &["logs", "job/hello"]), "hi from the job\n");
    // The kubelet wrote status through the API as the node.
    assert!(api.audit().iter().any(|e| e.user == "system:node:testnode"
        && e.resource == "pods"
        && e.subresource == "status"));
}

/// A Secret with the standalone policy (upstream: nothing listens there) and its
/// credentials, as files for `pgwarden run -f`.
fn sidecar_config(api: &TestApiServer) {
    let port = pgwarden_e2e::free_port();
    let policy = pgwarden_e2e::policy_yaml(port, None);
    let cred = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: shop-cred\n  namespace: default\ntype: Opaque\nstringData:\n  username: app\n  password: app-pw\n";
    let secret = serde_json::json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "pgwarden-config"},
        "stringData": {"policy.yaml": policy, "secret.yaml": cred}});
    apply(api, &secret);
}

fn apply(api: &TestApiServer, obj: &Value) {
    use std::io::Write;
    let mut child = api
        .kubectl_command("admin")
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(obj.to_string().as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "kubectl apply failed:\n{}", text(&o));
}

/// An agent pod with pgwarden as a native sidecar (restartPolicy Always init
/// container with a startup probe), its policy from a Secret volume.
fn agent_pod(name: &str) -> Value {
    serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "agent"}},
        "spec": {
            "terminationGracePeriodSeconds": 10,
            "initContainers": [{
                "name": "pgwarden", "image": "ghcr.io/example/pgwarden:dev", "restartPolicy": "Always",
                "command": ["/pgwarden"],
                "args": ["run", "-f", "/etc/pgwarden/policy.yaml", "-f", "/etc/pgwarden/secret.yaml",
                         "--listen", "127.0.0.1:5432", "--state-dir", "/var/lib/pgwarden"],
                "env": [
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "POD_SERVICE_ACCOUNT", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
                    {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}}],
                "startupProbe": {"tcpSocket": {"port": 5432}, "periodSeconds": 1, "failureThreshold": 30},
                "volumeMounts": [{"name": "config", "mountPath": "/etc/pgwarden", "readOnly": true},
                                 {"name": "state", "mountPath": "/var/lib/pgwarden"}]}],
            "containers": [{"name": "agent", "image": "postgres:15",
                            "env": [{"name": "PGHOST", "value": "127.0.0.1"}, {"name": "PGPORT", "value": "5432"}]}],
            "volumes": [{"name": "config", "secret": {"secretName": "pgwarden-config"}},
                        {"name": "state", "emptyDir": {}}]}})
}

fn environ(pid: &str) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default())
        .replace('\0', "\n")
}

#[test]
fn native_sidecars_run_as_the_real_pgwarden_on_their_own_pod_ips() {
    let api = TestApiServer::start().unwrap();
    let k = kubelet(&api);
    sidecar_config(&api);
    k.run_matching("default", "app=agent", RunOptions::new())
        .unwrap();
    apply(&api, &agent_pod("agent-a"));
    apply(&api, &agent_pod("agent-b"));
    for p in ["agent-a", "agent-b"] {
        ok(
            &api,
            &[
                "wait",
                "--for=condition=Ready",
                &format!("pod/{p}"),
                "--timeout=30s",
            ],
        );
    }
    // `kubectl get pod -o wide` shows each pod's own address.
    let wide = ok(&api, &["get", "pods", "-o", "wide"]);
    let ip_of = |name: &str| -> String {
        let line = wide
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{wide}"));
        line.split_whitespace()
            .find(|w| w.starts_with("127.0."))
            .unwrap_or_else(|| panic!("no IP column: {wide}"))
            .to_string()
    };
    let (a, b) = (ip_of("agent-a"), ip_of("agent-b"));
    assert_ne!(a, b, "{wide}");
    assert!(wide.contains("Running"), "{wide}");
    // Both sidecars listen on 5432, each at its own pod IP.
    for ip in [&a, &b] {
        std::net::TcpStream::connect((ip.as_str(), 5432))
            .unwrap_or_else(|e| panic!("pgwarden at {ip}:5432: {e}"));
    }
    let pa = pod_json(&api, "agent-a");
    let side = &pa["status"]["initContainerStatuses"][0];
    assert_eq!(side["started"], true, "{pa}");
    assert!(side["state"]["running"].is_object(), "{pa}");
    assert!(
        pa["status"]["containerStatuses"][0]["state"]["running"].is_object(),
        "{pa}"
    );
    // The stored spec still says 127.0.0.1: only the process was told otherwise.
    assert_eq!(pa["spec"]["initContainers"][0]["args"][6], "127.0.0.1:5432");

    // Downward-API values reached the process.
    let pid = side["containerID"]
        .as_str()
        .unwrap()
        .trim_start_matches("testapi://")
        .to_string();
    let env = environ(&pid);
    for want in [
        "POD_NAME=agent-a".to_string(),
        "POD_NAMESPACE=default".into(),
        "POD_SERVICE_ACCOUNT=default".into(),
        format!("MY_IP={a}"),
        "APP=agent".into(),
    ] {
        assert!(env.lines().any(|l| l == want), "{want} not in\n{env}");
    }

    // The agent finishes: the sidecar gets SIGTERM and shuts down cleanly.
    k.finish_pod("default", "agent-a", 0);
    let pa = eventually("agent-a Succeeded", Duration::from_secs(20), || {
        let p = pod_json(&api, "agent-a");
        (p["status"]["phase"] == "Succeeded").then_some(p)
    });
    let side = &pa["status"]["initContainerStatuses"][0];
    assert_eq!(side["state"]["terminated"]["exitCode"], 0, "{pa}");
    // The kubelet's Events, as `kubectl describe pod` shows them.
    let described = ok(&api, &["describe", "pod", "agent-a"]);
    for want in [
        "Started container pgwarden",
        "Started container agent (played",
        "Stopping container pgwarden",
    ] {
        assert!(described.contains(want), "{want:?} not in\n{described}");
    }
    let log = k.pod_logs("default", "agent-a", "pgwarden");
    assert!(log.contains("shutting down"), "{log}");
    let via_api = ok(&api, &["logs", "agent-a", "-c", "pgwarden"]);
    assert!(
        via_api.contains(&format!("pgwarden listening listen={a}:5432")),
        "{via_api}"
    );
    assert!(std::net::TcpStream::connect((a.as_str(), 5432)).is_err());
    // Secret changes reach a running pod's volume files (the sidecar's hot reload).
    ok(
        &api,
        &[
            "patch",
            "secret",
            "pgwarden-config",
            "--type=merge",
            "-p",
            r#"{"stringData":{"note.txt":"v2"}}"#,
        ],
    );
    let note = k
        .pod_dir("default", "agent-b")
        .unwrap()
        .join("volumes/config/note.txt");
    eventually(
        "the updated Secret in agent-b's volume",
        Duration::from_secs(10),
        || (std::fs::read_to_string(&note).ok()? == "v2").then_some(()),
    );
    // The other pod is untouched.
    std::net::TcpStream::connect((b.as_str(), 5432)).expect("agent-b still serves");
    assert_eq!(pod_json(&api, "agent-b")["status"]["phase"], "Running");
    // Deleting a running pod is graceful: kubectl returns once the sidecar is down.
    ok(&api, &["delete", "pod", "agent-b", "--timeout=30s"]);
    assert!(
        std::net::TcpStream::connect((b.as_str(), 5432)).is_err(),
        "the sidecar was stopped before the pod went"
    );
    assert!(k
        .pod_logs("default", "agent-b", "pgwarden")
        .contains("shutting down"));
    assert!(api.audit().iter().any(|e| e.user == "system:node:testnode"
        && e.verb == "delete"
        && e.name == "agent-b"
        && e.code == 200));
}

#[test]
fn init_containers_run_in_order_and_share_volumes_at_their_mount_paths() {
    let api = TestApiServer::start().unwrap();
    let k = kubelet(&api);
    k.run_pod(
        "default",
        "steps",
        RunOptions::new()
            .as_specified("prepare")
            .as_specified("main"),
    );
    let sh = |script: &str, var: &str| {
        serde_json::json!({"name": if var == "OUT" { "prepare" } else { "main" }, "image": "busybox",
            "command": ["sh", "-c", script],
            "env": [{"name": var, "value": "/work/state"}],
            "volumeMounts": [{"name": "work", "mountPath": "/work"}]})
    };
    apply(
        &api,
        &serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "steps"},
            "spec": {"restartPolicy": "Never",
                "initContainers": [sh("sleep 0.3; echo prepared > \"$OUT\"", "OUT")],
                "containers": [sh("cat \"$IN\"", "IN")],
                "volumes": [{"name": "work", "emptyDir": {}}]}}),
    );
    let p = eventually("steps Succeeded", Duration::from_secs(20), || {
        let p = pod_json(&api, "steps");
        (p["status"]["phase"] == "Succeeded").then_some(p)
    });
    // The main container read what the init container wrote before it started.
    assert_eq!(k.pod_logs("default", "steps", "main"), "prepared\n");
    assert_eq!(
        p["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"], 0,
        "{p}"
    );
    let ready = p["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .cloned()
        .unwrap();
    assert_eq!(ready["reason"], "PodCompleted", "{p}");

    // A failing ordinary init container fails the pod; the main container never runs.
    k.run_pod(
        "default",
        "broken",
        RunOptions::new().as_specified("prepare"),
    );
    apply(
        &api,
        &serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "broken"},
            "spec": {"restartPolicy": "Never",
                "initContainers": [sh("exit 3", "OUT")],
                "containers": [sh("echo must not run", "IN")],
                "volumes": [{"name": "work", "emptyDir": {}}]}}),
    );
    let p = eventually("broken Failed", Duration::from_secs(20), || {
        let p = pod_json(&api, "broken");
        (p["status"]["phase"] == "Failed").then_some(p)
    });
    assert_eq!(
        p["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"], 3,
        "{p}"
    );
    assert!(
        p["status"]["containerStatuses"][0]["state"]["waiting"].is_object(),
        "{p}"
    );
    assert_eq!(k.pod_logs("default", "broken", "main"), "");
}

fn jwt_claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url payload");
    serde_json::from_slice(&bytes).expect("JSON claims")
}

#[test]
fn projected_service_account_tokens_are_bound_to_the_pod_and_renewed() {
    let api = TestApiServer::start_with(pgwarden_testapi::Options {
        min_token_expiration: Duration::from_secs(1),
        ..Default::default()
    })
    .unwrap();
    let k = kubelet(&api);
    k.run_pod("default", "tok", RunOptions::new());
    apply(
        &api,
        &serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "tok"},
            "spec": {"containers": [{"name": "app", "image": "busybox",
                "volumeMounts": [{"name": "sidecar-token", "mountPath": "/var/run/pgwarden"}]}],
                "volumes": [{"name": "sidecar-token", "projected": {"sources": [
                    {"serviceAccountToken": {"audience": "pgwarden.io/sidecar", "expirationSeconds": 8, "path": "token"}},
                    {"downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.name"}}]}}]}}]}}),
    );
    ok(
        &api,
        &["wait", "--for=condition=Ready", "pod/tok", "--timeout=20s"],
    );
    let vol = k
        .pod_dir("default", "tok")
        .unwrap()
        .join("volumes/sidecar-token");
    let read = || std::fs::read_to_string(vol.join("token")).unwrap();
    let first = read();
    let c = jwt_claims(&first);
    let uid = pod_json(&api, "tok")["metadata"]["uid"].clone();
    assert_eq!(c["aud"], serde_json::json!(["pgwarden.io/sidecar"]), "{c}");
    assert_eq!(c["kubernetes.io"]["pod"]["name"], "tok", "{c}");
    assert_eq!(c["kubernetes.io"]["pod"]["uid"], uid, "{c}");
    assert_eq!(
        c["kubernetes.io"]["serviceaccount"]["name"], "default",
        "{c}"
    );
    assert_eq!(std::fs::read_to_string(vol.join("labels")).unwrap(), "tok");
    // Renewed at 80% of its 8 s lifetime, before it expires.
    let second = eventually("a renewed token", Duration::from_secs(15), || {
        let t = read();
        (t != first).then_some(t)
    });
    let c2 = jwt_claims(&second);
    assert!(c2["exp"].as_i64() > c["exp"].as_i64(), "{c} {c2}");
    assert!(
        c["exp"].as_i64().unwrap() >= jiff::Timestamp::now().as_second(),
        "renewed before the first token expired"
    );
}

#[test]
fn run_all_mode_plays_app_containers_until_an_outside_tool_ends_them() {
    let api = TestApiServer::start().unwrap();
    let k = Kubelet::start(
        &api,
        KubeletOptions {
            pgwarden_bin: Some(pgwarden_e2e::pgwarden_bin()),
            run_all: true,
            ..KubeletOptions::default()
        },
    )
    .unwrap();
    // A pod whose Secret does not exist yet waits in ContainerCreating.
    let mut pod = agent_pod("late");
    // An httpGet startup probe on the metrics port (rewritten to the pod IP too).
    let side = &mut pod["spec"]["initContainers"][0];
    side["args"]
        .as_array_mut()
        .unwrap()
        .extend(["--metrics-listen".into(), "127.0.0.1:9090".into()]);
    side["startupProbe"] = serde_json::json!({"httpGet": {"path": "/healthz", "port": 9090},
        "periodSeconds": 1, "failureThreshold": 30});
    apply(&api, &pod);
    let waiting = eventually("a mount failure", Duration::from_secs(10), || {
        let p = pod_json(&api, "late");
        p["status"]["message"].as_str().map(String::from)
    });
    assert!(waiting.contains("pgwarden-config"), "{waiting}");
    let events = json_of(&ok(
        &api,
        &[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=late,reason=FailedMount",
            "-o",
            "json",
        ],
    ));
    assert_eq!(events["items"][0]["type"], "Warning", "{events}");
    assert_eq!(pod_json(&api, "late")["status"]["phase"], "Pending");
    sidecar_config(&api);
    ok(
        &api,
        &["wait", "--for=condition=Ready", "pod/late", "--timeout=30s"],
    );
    let ip = k.pod_ip("default", "late").unwrap();
    let (code, _) = http_status(&ip, 9090, "/healthz");
    assert_eq!(code, 200);
    ok(
        &api,
        &["annotate", "pod", "late", "testapi.pgwarden.io/exit-code=1"],
    );
    let p = eventually("late Failed", Duration::from_secs(20), || {
        let p = pod_json(&api, "late");
        (p["status"]["phase"] == "Failed").then_some(p)
    });
    assert_eq!(
        p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"], 1,
        "{p}"
    );
    assert!(k
        .pod_logs("default", "late", "pgwarden")
        .contains("shutting down"));
}

fn http_status(ip: &str, port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect((ip, port)).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out)
}

#[test]
fn a_sidecar_that_exits_before_its_startup_probe_passes_fails_the_pod() {
    let api = TestApiServer::start().unwrap();
    let k = kubelet(&api);
    k.run_pod("default", "bad-config", RunOptions::new());
    // The policy file the sidecar is told to read is not in the Secret.
    let secret = serde_json::json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "pgwarden-config"}, "stringData": {"other.yaml": "x: 1"}});
    apply(&api, &secret);
    let mut pod = agent_pod("bad-config");
    pod["metadata"]["labels"] = serde_json::json!({"app": "broken"});
    apply(&api, &pod);
    let p = eventually("bad-config Failed", Duration::from_secs(20), || {
        let p = pod_json(&api, "bad-config");
        (p["status"]["phase"] == "Failed").then_some(p)
    });
    let msg = p["status"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("before its startup probe passed"), "{p}");
    let side = &p["status"]["initContainerStatuses"][0];
    assert_ne!(side["state"]["terminated"]["exitCode"], 0, "{p}");
    // The app container never started.
    assert!(
        p["status"]["containerStatuses"][0]["state"]["waiting"].is_object(),
        "{p}"
    );
    assert!(k
        .pod_logs("default", "bad-config", "pgwarden")
        .contains("policy.yaml"));
}
