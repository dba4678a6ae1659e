use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::*;

pub(crate) fn settings() -> InjectSettings {
    InjectSettings {
        image: "ghcr.io/pgwarden/pgwarden:1.0".into(),
        image_pull_policy: Some("IfNotPresent".into()),
        operator_url: "https://pgwarden-operator.pgwarden-system.svc:8443".into(),
        ca_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
        port: 5432,
        metrics_port: 9102,
        resources: SidecarResources {
            cpu_request: "50m".into(),
            memory_request: "32Mi".into(),
            cpu_limit: None,
            memory_limit: Some("128Mi".into()),
        },
        token_expiration_seconds: 600,
        stale_after: Some("10m".into()),
    }
}

fn enabled() -> BTreeMap<String, String> {
    BTreeMap::from([(INJECT_LABEL.to_owned(), "enabled".to_owned())])
}

fn none() -> BTreeMap<String, String> {
    BTreeMap::new()
}

/// A Job's pod as the API server sends it: generateName, no name, no
/// annotations, no volumes, no init containers.
fn job_pod() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "nightly-", "labels": {"job-name": "nightly"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "agent", "image": "agent:1"}],
        }
    })
}

fn apply(pod: &Value, d: &Decision) -> Value {
    let Decision::Patch(ops) = d else {
        panic!("expected a patch, got {d:?}")
    };
    let patch: json_patch::Patch =
        serde_json::from_value(serde_json::to_value(ops).unwrap()).unwrap();
    let mut out = pod.clone();
    json_patch::patch(&mut out, &patch).unwrap_or_else(|e| panic!("{e}: {ops:#?}"));
    out
}

fn env_of(c: &Value) -> BTreeMap<String, Value> {
    c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e.clone()))
        .collect()
}

fn assert_app_env(c: &Value) {
    let env = env_of(c);
    assert_eq!(env["PGHOST"]["value"], "127.0.0.1", "{c}");
    assert_eq!(env["PGPORT"]["value"], "5432", "{c}");
    assert_eq!(env["PGSSLMODE"]["value"], "disable", "{c}");
}

#[test]
fn job_pod_gets_a_native_sidecar_first() {
    let pod = job_pod();
    let out = apply(&pod, &inject(&pod, &enabled(), &settings()));
    let init = out["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(init.len(), 1);
    let s = &init[0];
    assert_eq!(s["name"], "pgwarden");
    assert_eq!(s["restartPolicy"], "Always");
    assert_eq!(s["image"], "ghcr.io/pgwarden/pgwarden:1.0");
    let args: Vec<&str> = s["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            "run",
            "--operator",
            "https://pgwarden-operator.pgwarden-system.svc:8443",
            "--operator-ca",
            "/var/run/pgwarden.io/ca/ca.crt",
            "--operator-token-file",
            "/var/run/secrets/pgwarden.io/sidecar/token",
            "--listen",
            "127.0.0.1:5432",
            "--metrics-listen",
            "0.0.0.0:9102",
            "--state-dir",
            "/var/lib/pgwarden",
            "--operator-stale-after",
            "10m",
        ]
    );
    // Probes reach the pod IP on the metrics port.
    assert_eq!(s["startupProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(s["startupProbe"]["httpGet"]["port"], 9102);
    assert_eq!(s["livenessProbe"]["httpGet"]["path"], "/healthz");
    let env = env_of(s);
    assert_eq!(
        env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(
        env["POD_SERVICE_ACCOUNT"]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.serviceAccountName"
    );
    assert!(!env.contains_key("PGHOST"), "the sidecar is no app");
    assert_eq!(
        s["securityContext"],
        json!({
            "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
        })
    );
    assert_eq!(
        s["resources"],
        json!({"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}})
    );

    // The app container: the gateway's address, no credential.
    let app = &out["spec"]["containers"][0];
    assert_app_env(app);
    assert!(app.get("volumeMounts").is_none());
    assert!(!out.to_string().contains("password"));

    // Volumes: the token (sidecar audience, short-lived), the CA from the
    // pod's own annotation, the state dir.
    let vols = out["spec"]["volumes"].as_array().unwrap();
    let token = vols.iter().find(|v| v["name"] == TOKEN_VOLUME).unwrap();
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"],
        json!({"audience": "pgwarden.io/sidecar", "expirationSeconds": 600, "path": "token"})
    );
    let ca = vols.iter().find(|v| v["name"] == CA_VOLUME).unwrap();
    assert_eq!(
        ca["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"],
        "metadata.annotations['pgwarden.io/operator-ca']"
    );
    assert!(vols
        .iter()
        .any(|v| v["name"] == STATE_VOLUME && v["emptyDir"].is_object()));
    let mounts: Vec<(&str, &str)> = s["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap(),
                m["mountPath"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        mounts,
        [
            (TOKEN_VOLUME, "/var/run/secrets/pgwarden.io/sidecar"),
            (CA_VOLUME, "/var/run/pgwarden.io/ca"),
            (STATE_VOLUME, "/var/lib/pgwarden"),
        ]
    );

    let ann = &out["metadata"]["annotations"];
    assert_eq!(ann["pgwarden.io/injected"], "v1");
    assert_eq!(ann["pgwarden.io/operator-ca"], settings().ca_pem.as_str());
    let recorded: Value = serde_json::from_str(ann["pgwarden.io/env"].as_str().unwrap()).unwrap();
    assert_eq!(
        recorded,
        json!({"PGHOST": "127.0.0.1", "PGPORT": "5432", "PGSSLMODE": "disable"})
    );
    // Nothing relies on a name the pod does not have yet.
    assert!(out["metadata"].get("name").is_none());
}

#[test]
fn existing_init_containers_keep_their_order_after_the_sidecar() {
    let mut pod = job_pod();
    pod["spec"]["initContainers"] = json!([
        {"name": "migrate", "image": "m:1", "env": [{"name": "X", "value": "1"}]},
        {"name": "seed", "image": "s:1"},
    ]);
    pod["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
    pod["metadata"]["annotations"] = json!({"team": "ci"});
    let out = apply(&pod, &inject(&pod, &enabled(), &settings()));
    let names: Vec<&str> = out["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["pgwarden", "migrate", "seed"]);
    // Init containers are apps too: migrations go through the gateway.
    let migrate = &out["spec"]["initContainers"][1];
    assert_app_env(migrate);
    assert_eq!(env_of(migrate)["X"]["value"], "1");
    assert_app_env(&out["spec"]["initContainers"][2]);
    let vols: Vec<&str> = out["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vols, ["data", TOKEN_VOLUME, CA_VOLUME, STATE_VOLUME]);
    assert_eq!(out["metadata"]["annotations"]["team"], "ci");
    assert_eq!(out["metadata"]["annotations"]["pgwarden.io/injected"], "v1");
}

#[test]
fn own_pghost_is_replaced() {
    let mut pod = job_pod();
    pod["spec"]["containers"][0]["env"] = json!([
        {"name": "PGHOST", "value": "prod-pg.databases.svc"},
        {"name": "PGPORT", "valueFrom": {"configMapKeyRef": {"name": "db", "key": "port"}}},
        {"name": "PGDATABASE", "value": "shop"},
    ]);
    let out = apply(&pod, &inject(&pod, &enabled(), &settings()));
    let app = &out["spec"]["containers"][0];
    assert_app_env(app);
    assert!(env_of(app)["PGPORT"].get("valueFrom").is_none());
    assert_eq!(env_of(app)["PGDATABASE"]["value"], "shop");
    assert_eq!(app["env"].as_array().unwrap().len(), 4);
}

#[test]
fn readmitted_pod_is_not_injected_twice() {
    let pod = job_pod();
    let once = apply(&pod, &inject(&pod, &enabled(), &settings()));
    assert_eq!(
        inject(&once, &enabled(), &settings()),
        Decision::Patch(vec![])
    );
    // A later webhook added a container: only it gets the env.
    let mut more = once.clone();
    more["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "late", "image": "l:1"}));
    let twice = apply(&more, &inject(&more, &enabled(), &settings()));
    assert_eq!(twice["spec"]["initContainers"].as_array().unwrap().len(), 1);
    assert_app_env(&twice["spec"]["containers"][1]);
    assert_eq!(twice["spec"]["volumes"], once["spec"]["volumes"]);
}

#[test]
fn opt_in_and_opt_out() {
    let mut pod = job_pod();
    assert_eq!(
        inject(&pod, &none(), &settings()),
        Decision::Skip(Skip::NotOptedIn)
    );
    pod["metadata"]["labels"][INJECT_LABEL] = json!("true");
    assert!(matches!(
        inject(&pod, &none(), &settings()),
        Decision::Patch(ops) if !ops.is_empty()
    ));
    pod["metadata"]["labels"][INJECT_LABEL] = json!("false");
    assert_eq!(
        inject(&pod, &enabled(), &settings()),
        Decision::Skip(Skip::OptedOut)
    );
    pod["metadata"]["labels"][INJECT_LABEL] = json!("yes");
    let Decision::Refuse(msg) = inject(&pod, &enabled(), &settings()) else {
        panic!()
    };
    assert!(msg.contains("\"true\" nor \"false\""), "{msg}");
    // Another namespace label value is no opt-in.
    let other = BTreeMap::from([(INJECT_LABEL.to_owned(), "disabled".to_owned())]);
    assert_eq!(
        inject(&job_pod(), &other, &settings()),
        Decision::Skip(Skip::NotOptedIn)
    );
}

#[test]
fn deployment_pod_without_labels_or_metadata_maps() {
    // A pod template's pod with no labels at all in an enabled namespace.
    let pod = json!({"metadata": {"generateName": "web-5f6d-"},
                     "spec": {"containers": [{"name": "web", "image": "w"}]}});
    let out = apply(&pod, &inject(&pod, &enabled(), &settings()));
    assert_eq!(out["spec"]["initContainers"][0]["name"], "pgwarden");
    // No metadata at all.
    let pod = json!({"spec": {"containers": [{"name": "web", "image": "w"}]}});
    let out = apply(&pod, &inject(&pod, &enabled(), &settings()));
    assert_eq!(out["metadata"]["annotations"]["pgwarden.io/injected"], "v1");
}

#[test]
fn resources_from_annotations_are_validated() {
    let mut pod = job_pod();
    pod["metadata"]["annotations"] =
        json!({"pgwarden.io/sidecar-cpu": "250m", "pgwarden.io/sidecar-memory": "256Mi"});
    let out = apply(&pod, &inject(&pod, &enabled(), &settings()));
    assert_eq!(
        out["spec"]["initContainers"][0]["resources"],
        json!({"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "256Mi"}})
    );
    for bad in ["lots", "-1", "0", "1.2.3", "10Qi", "", "1e9999", "1 Gi"] {
        pod["metadata"]["annotations"]["pgwarden.io/sidecar-memory"] = json!(bad);
        let Decision::Refuse(msg) = inject(&pod, &enabled(), &settings()) else {
            panic!("{bad:?} accepted")
        };
        assert!(
            msg.contains("pgwarden.io/sidecar-memory") && msg.contains("quantity"),
            "{msg}"
        );
    }
    for good in ["1", "0.5", "100m", "1Gi", "1e3", "512M", ".5"] {
        assert!(is_quantity(good), "{good}");
    }
}

#[test]
fn reserved_names_are_refused() {
    let mut pod = job_pod();
    pod["spec"]["containers"][0]["name"] = json!("pgwarden");
    let Decision::Refuse(msg) = inject(&pod, &enabled(), &settings()) else {
        panic!()
    };
    assert!(msg.contains("rename the container"), "{msg}");
    let mut pod = job_pod();
    pod["spec"]["volumes"] = json!([{"name": TOKEN_VOLUME, "emptyDir": {}}]);
    let Decision::Refuse(msg) = inject(&pod, &enabled(), &settings()) else {
        panic!()
    };
    assert!(msg.contains("rename the volume"), "{msg}");
}

#[test]
fn annotation_keys_are_escaped() {
    assert_eq!(escape("pgwarden.io/injected"), "pgwarden.io~1injected");
    assert_eq!(escape("a~/b"), "a~0~1b");
    // Through a real applier: the keys land verbatim.
    let mut pod = job_pod();
    pod["metadata"]["annotations"] = json!({});
    let out = apply(&pod, &inject(&pod, &enabled(), &settings()));
    let mut keys: Vec<&String> = out["metadata"]["annotations"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "pgwarden.io/env",
            "pgwarden.io/injected",
            "pgwarden.io/operator-ca"
        ]
    );
}

/// The Pod Security Standards "restricted" profile (v1.29+ policy, the checks
/// that depend on the pod spec), as the admission plugin evaluates it.
fn restricted_violations(pod: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let spec = &pod["spec"];
    const VOLUMES: [&str; 8] = [
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    ];
    for v in spec["volumes"].as_array().into_iter().flatten() {
        let kinds: Vec<&String> = v
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "name")
            .collect();
        if kinds.iter().any(|k| !VOLUMES.contains(&k.as_str())) {
            out.push(format!("volume {} of type {kinds:?}", v["name"]));
        }
    }
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        if spec[host] == true {
            out.push(host.to_string());
        }
    }
    let pod_sc = &spec["securityContext"];
    let all = ["initContainers", "containers", "ephemeralContainers"]
        .into_iter()
        .flat_map(|k| spec[k].as_array().into_iter().flatten());
    for c in all {
        let sc = &c["securityContext"];
        let name = &c["name"];
        if sc["privileged"] == true {
            out.push(format!("{name}: privileged"));
        }
        if sc["allowPrivilegeEscalation"] != false {
            out.push(format!("{name}: allowPrivilegeEscalation must be false"));
        }
        let drops = sc["capabilities"]["drop"].as_array();
        if !drops.is_some_and(|d| d.iter().any(|x| x == "ALL")) {
            out.push(format!("{name}: capabilities must drop ALL"));
        }
        if let Some(add) = sc["capabilities"]["add"].as_array() {
            if add.iter().any(|x| x != "NET_BIND_SERVICE") {
                out.push(format!("{name}: adds capabilities"));
            }
        }
        let non_root = if sc["runAsNonRoot"].is_boolean() {
            sc["runAsNonRoot"] == true
        } else {
            pod_sc["runAsNonRoot"] == true
        };
        if !non_root {
            out.push(format!("{name}: runAsNonRoot"));
        }
        if sc["runAsUser"] == 0 || (sc["runAsUser"].is_null() && pod_sc["runAsUser"] == 0) {
            out.push(format!("{name}: runAsUser 0"));
        }
        let seccomp = if sc["seccompProfile"]["type"].is_string() {
            &sc["seccompProfile"]["type"]
        } else {
            &pod_sc["seccompProfile"]["type"]
        };
        if seccomp != "RuntimeDefault" && seccomp != "Localhost" {
            out.push(format!("{name}: seccompProfile"));
        }
        for p in c["ports"].as_array().into_iter().flatten() {
            if p["hostPort"].as_u64().is_some_and(|h| h != 0) {
                out.push(format!("{name}: hostPort"));
            }
        }
    }
    out
}

#[test]
fn injection_keeps_a_restricted_pod_restricted() {
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "nightly-", "labels": {"job-name": "nightly"}},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "agent", "image": "agent:1",
                "securityContext": {"allowPrivilegeEscalation": false,
                                    "capabilities": {"drop": ["ALL"]}}}],
        }
    });
    assert_eq!(restricted_violations(&pod), Vec::<String>::new());
    let out = apply(&pod, &inject(&pod, &enabled(), &settings()));
    assert_eq!(restricted_violations(&out), Vec::<String>::new(), "{out:#}");
    // The checker is not blind: a baseline pod fails it.
    let mut loose = out.clone();
    loose["spec"]["containers"][0]["securityContext"] = json!({});
    assert!(!restricted_violations(&loose).is_empty());
}
