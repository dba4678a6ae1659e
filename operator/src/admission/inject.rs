//! Pod injection (DESIGN §4 "Injection"), sans-IO: a pod as the API server
//! sent it (raw JSON, so the patch paths match what is really there) plus its
//! namespace's labels in, a [`Decision`] out. The server turns a decision into
//! an AdmissionReview response; nothing here reads the cluster or a clock.

use std::collections::BTreeMap;

use pgwarden_api::{INJECTED_ANNOTATION, SIDECAR_AUDIENCE};
use serde::Serialize;
use serde_json::{json, Map, Value};

#[cfg(test)]
pub(crate) mod tests;

/// Label (namespace: `enabled`; pod: `"true"` / `"false"`) that opts in or out.
pub const INJECT_LABEL: &str = "pgwarden.io/inject";
/// The value of [`INJECTED_ANNOTATION`] this operator writes: bumped when the
/// shape of the injected sidecar changes incompatibly.
pub const INJECTION_VERSION: &str = "v1";
/// The operator's CA (public certificate, PEM), read by the sidecar's
/// downward-API volume: nothing has to exist in the pod's namespace.
pub const CA_ANNOTATION: &str = "pgwarden.io/operator-ca";
/// What injection set in the app containers' env (JSON object).
pub const ENV_ANNOTATION: &str = "pgwarden.io/env";
/// Per-pod overrides of the sidecar's resources.
pub const CPU_ANNOTATION: &str = "pgwarden.io/sidecar-cpu";
pub const MEMORY_ANNOTATION: &str = "pgwarden.io/sidecar-memory";

/// The sidecar's container name; reserved in opted-in pods.
pub const SIDECAR_NAME: &str = "pgwarden";
/// The projected token volume (audience [`SIDECAR_AUDIENCE`]): only the
/// sidecar mounts it, the pod guard refuses any other container that does.
pub const TOKEN_VOLUME: &str = "pgwarden-sidecar-token";
pub const CA_VOLUME: &str = "pgwarden-operator-ca";
pub const STATE_VOLUME: &str = "pgwarden-state";
/// Where the sidecar finds its token: the sidecar's default
/// `--operator-token-file` is `TOKEN_DIR/token`.
pub const TOKEN_DIR: &str = "/var/run/secrets/pgwarden.io/sidecar";
pub const CA_DIR: &str = "/var/run/pgwarden.io/ca";
pub const STATE_DIR: &str = "/var/lib/pgwarden";

/// The distroless image's nonroot user.
const SIDECAR_UID: i64 = 65532;

/// What every injected sidecar gets; built from the operator's flags, the CA
/// from the serving certificate in force.
#[derive(Debug, Clone, PartialEq)]
pub struct InjectSettings {
    pub image: String,
    pub image_pull_policy: Option<String>,
    /// Where sidecars reach the config stream (`https://HOST:PORT`).
    pub operator_url: String,
    /// The operator's CA certificate, PEM.
    pub ca_pem: String,
    /// The gateway's port on the pod's loopback (the apps' `PGPORT`).
    pub port: u16,
    /// /healthz and /readyz for the kubelet's probes.
    pub metrics_port: u16,
    pub resources: SidecarResources,
    /// Lifetime of the projected token (the kubelet refreshes it at 80 %).
    pub token_expiration_seconds: i64,
    /// `--operator-stale-after` of the sidecar (its own default if None).
    pub stale_after: Option<String>,
}

/// Resource quantities, validated when the flags are parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct SidecarResources {
    pub cpu_request: String,
    pub memory_request: String,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
}

/// One RFC 6902 operation; only the two injection needs.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum PatchOp {
    Add { path: String, value: Value },
    Replace { path: String, value: Value },
}

/// Why a pod is left alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// `pgwarden.io/inject: "false"` on the pod.
    OptedOut,
    /// Neither the namespace nor the pod opted in.
    NotOptedIn,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Skip(Skip),
    /// An empty patch: the pod already is as injection wants it.
    Patch(Vec<PatchOp>),
    /// The pod cannot be injected as it is; the message says what to change.
    Refuse(String),
}

/// How a pod came to be in scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptIn {
    Namespace,
    Pod,
}

/// The opt-in rule: the pod label decides when present (`"false"` opts out
/// even in an enabled namespace), else the namespace label. Any other value
/// of the pod label is refused rather than guessed at.
pub fn opt_in(
    pod: &Value,
    ns_labels: &BTreeMap<String, String>,
) -> Result<Result<OptIn, Skip>, String> {
    match pod["metadata"]["labels"][INJECT_LABEL].as_str() {
        Some("true") => Ok(Ok(OptIn::Pod)),
        Some("false") => Ok(Err(Skip::OptedOut)),
        Some(other) => Err(format!(
            "label {INJECT_LABEL}={other:?} is neither \"true\" nor \"false\"; set one of them (or remove the label)"
        )),
        None if ns_labels.get(INJECT_LABEL).map(String::as_str) == Some("enabled") => {
            Ok(Ok(OptIn::Namespace))
        }
        None => Ok(Err(Skip::NotOptedIn)),
    }
}

/// The decision for a pod being created in a namespace with `ns_labels`.
pub fn inject(
    pod: &Value,
    ns_labels: &BTreeMap<String, String>,
    settings: &InjectSettings,
) -> Decision {
    match opt_in(pod, ns_labels) {
        Err(msg) => return Decision::Refuse(msg),
        Ok(Err(skip)) => return Decision::Skip(skip),
        Ok(Ok(_)) => {}
    }
    if !pod.is_object() || !pod["spec"].is_object() {
        return Decision::Refuse("the pod has no spec".to_owned());
    }
    let resources = match resources(pod, &settings.resources) {
        Ok(r) => r,
        Err(msg) => return Decision::Refuse(msg),
    };
    let app_env = app_env(settings);
    let spec = &pod["spec"];
    let already = pod["metadata"]["annotations"][INJECTED_ANNOTATION].is_string()
        && containers(spec, "initContainers").any(|c| c["name"] == SIDECAR_NAME);
    let mut ops = Vec::new();
    if already {
        // Re-admitted (reinvocation, or a copy of an injected pod): only
        // containers added since — by a later webhook — still need the env.
        env_ops(spec, &app_env, &mut ops);
        return Decision::Patch(ops);
    }
    if let Some(msg) = reserved_names(spec) {
        return Decision::Refuse(msg);
    }

    // Env of app init containers first, at their indices before the sidecar
    // is inserted in front of them.
    env_ops(spec, &app_env, &mut ops);
    let sidecar = sidecar_container(settings, resources);
    match spec["initContainers"].as_array() {
        Some(_) => ops.push(PatchOp::Add {
            path: "/spec/initContainers/0".into(),
            value: sidecar,
        }),
        None => ops.push(PatchOp::Add {
            path: "/spec/initContainers".into(),
            value: json!([sidecar]),
        }),
    }
    let volumes = volumes(settings);
    match spec["volumes"].as_array() {
        Some(_) => ops.extend(volumes.into_iter().map(|v| PatchOp::Add {
            path: "/spec/volumes/-".into(),
            value: v,
        })),
        None => ops.push(PatchOp::Add {
            path: "/spec/volumes".into(),
            value: Value::Array(volumes),
        }),
    }
    let env_record: Map<String, Value> = app_env
        .iter()
        .map(|(k, v)| (k.to_string(), Value::String(v.clone())))
        .collect();
    let annotations = [
        (INJECTED_ANNOTATION, INJECTION_VERSION.to_owned()),
        (CA_ANNOTATION, settings.ca_pem.clone()),
        (ENV_ANNOTATION, Value::Object(env_record).to_string()),
    ];
    match pod["metadata"]["annotations"].as_object() {
        Some(_) => ops.extend(annotations.into_iter().map(|(k, v)| PatchOp::Add {
            path: format!("/metadata/annotations/{}", escape(k)),
            value: Value::String(v),
        })),
        None => {
            let map: Map<String, Value> = annotations
                .into_iter()
                .map(|(k, v)| (k.to_owned(), Value::String(v)))
                .collect();
            if pod["metadata"].is_object() {
                ops.push(PatchOp::Add {
                    path: "/metadata/annotations".into(),
                    value: Value::Object(map),
                });
            } else {
                ops.push(PatchOp::Add {
                    path: "/metadata".into(),
                    value: json!({"annotations": map}),
                });
            }
        }
    }
    Decision::Patch(ops)
}

/// RFC 6901: `~` then `/` (in that order, so `/` never becomes `~01`).
pub fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The sidecar's arguments; the guard checks an injected sidecar still has them.
pub fn sidecar_args(settings: &InjectSettings) -> Vec<String> {
    let mut args = vec![
        "run".to_owned(),
        "--operator".to_owned(),
        settings.operator_url.clone(),
        "--operator-ca".to_owned(),
        format!("{CA_DIR}/ca.crt"),
        "--operator-token-file".to_owned(),
        format!("{TOKEN_DIR}/token"),
        "--listen".to_owned(),
        format!("127.0.0.1:{}", settings.port),
        // The kubelet probes the pod IP, not the loopback, and the image has
        // no shell for an exec probe: /healthz and /readyz listen on every
        // address (they carry no credential; /readyz names policies and
        // upstream hosts only).
        "--metrics-listen".to_owned(),
        format!("0.0.0.0:{}", settings.metrics_port),
        "--state-dir".to_owned(),
        STATE_DIR.to_owned(),
    ];
    if let Some(s) = &settings.stale_after {
        args.extend(["--operator-stale-after".to_owned(), s.clone()]);
    }
    args
}

fn sidecar_container(settings: &InjectSettings, resources: Value) -> Value {
    let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
    let probe = |path: &str, period: u32, failures: u32| {
        json!({
            "httpGet": {"path": path, "port": settings.metrics_port},
            "periodSeconds": period,
            "timeoutSeconds": 2,
            "failureThreshold": failures,
        })
    };
    let mut c = json!({
        "name": SIDECAR_NAME,
        "image": settings.image,
        // A native sidecar: started before the next init container and the
        // app containers, kept running, and not waited for when a Job's
        // containers finish.
        "restartPolicy": "Always",
        "args": sidecar_args(settings),
        "env": [
            {"name": "POD_NAME", "valueFrom": field("metadata.name")},
            {"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")},
            {"name": "POD_SERVICE_ACCOUNT", "valueFrom": field("spec.serviceAccountName")},
        ],
        // /readyz fails until the first snapshot is in force and every
        // policy's upstream accepted the gateway's login: the apps start
        // when their first statement can succeed (a CI job that starts
        // against a gateway that cannot serve fails for nothing). Five
        // minutes before the kubelet restarts the sidecar.
        "startupProbe": probe("/readyz", 1, 300),
        "livenessProbe": probe("/healthz", 10, 3),
        "resources": resources,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true},
            {"name": CA_VOLUME, "mountPath": CA_DIR, "readOnly": true},
            {"name": STATE_VOLUME, "mountPath": STATE_DIR},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    });
    if let (Some(policy), Some(obj)) = (&settings.image_pull_policy, c.as_object_mut()) {
        obj.insert("imagePullPolicy".into(), Value::String(policy.clone()));
    }
    c
}

fn volumes(settings: &InjectSettings) -> Vec<Value> {
    vec![
        json!({"name": TOKEN_VOLUME, "projected": {
            "defaultMode": 0o440,
            "sources": [{"serviceAccountToken": {
                "audience": SIDECAR_AUDIENCE,
                "expirationSeconds": settings.token_expiration_seconds,
                "path": "token",
            }}],
        }}),
        json!({"name": CA_VOLUME, "downwardAPI": {
            "defaultMode": 0o444,
            "items": [{"path": "ca.crt", "fieldRef": {
                "fieldPath": format!("metadata.annotations['{CA_ANNOTATION}']"),
            }}],
        }}),
        json!({"name": STATE_VOLUME, "emptyDir": {}}),
    ]
}

/// `PGHOST`, `PGPORT`, `PGSSLMODE` as every app container gets them. No TLS
/// on the pod's loopback: nothing else can reach it (hostNetwork is refused).
fn app_env(settings: &InjectSettings) -> Vec<(&'static str, String)> {
    vec![
        ("PGHOST", "127.0.0.1".to_owned()),
        ("PGPORT", settings.port.to_string()),
        ("PGSSLMODE", "disable".to_owned()),
    ]
}

/// The containers of one list (`containers` or `initContainers`).
fn containers<'a>(spec: &'a Value, list: &str) -> impl Iterator<Item = &'a Value> {
    spec[list].as_array().into_iter().flatten()
}

/// Sets the app env in every container but the sidecar: an existing entry
/// of the same name (value or valueFrom) is replaced, a missing one added.
fn env_ops(spec: &Value, want: &[(&'static str, String)], ops: &mut Vec<PatchOp>) {
    for list in ["initContainers", "containers"] {
        for (i, c) in containers(spec, list).enumerate() {
            if list == "initContainers" && c["name"] == SIDECAR_NAME {
                continue;
            }
            let base = format!("/spec/{list}/{i}/env");
            let Some(env) = c["env"].as_array() else {
                let all: Vec<Value> = want
                    .iter()
                    .map(|(k, v)| json!({"name": k, "value": v}))
                    .collect();
                ops.push(PatchOp::Add {
                    path: base,
                    value: Value::Array(all),
                });
                continue;
            };
            for (name, value) in want {
                let entry = json!({"name": name, "value": value});
                // The last entry of a name is the one in force.
                match env.iter().rposition(|e| e["name"] == *name) {
                    Some(_)
                        if env
                            .iter()
                            .filter(|e| e["name"] == *name)
                            .all(|e| *e == entry) => {}
                    Some(_) => {
                        for (j, _) in env.iter().enumerate().filter(|(_, e)| e["name"] == *name) {
                            ops.push(PatchOp::Replace {
                                path: format!("{base}/{j}"),
                                value: entry.clone(),
                            });
                        }
                    }
                    None => ops.push(PatchOp::Add {
                        path: format!("{base}/-"),
                        value: entry,
                    }),
                }
            }
        }
    }
}

/// Names injection needs that the pod already uses for something else.
fn reserved_names(spec: &Value) -> Option<String> {
    let taken = ["initContainers", "containers", "ephemeralContainers"]
        .into_iter()
        .flat_map(|l| containers(spec, l))
        .any(|c| c["name"] == SIDECAR_NAME);
    if taken {
        return Some(format!(
            "container name {SIDECAR_NAME:?} is reserved for pgwarden's sidecar; rename the container"
        ));
    }
    for v in containers(spec, "volumes") {
        if let Some(name) = [TOKEN_VOLUME, CA_VOLUME, STATE_VOLUME]
            .into_iter()
            .find(|n| v["name"] == *n)
        {
            return Some(format!(
                "volume name {name:?} is reserved for pgwarden's sidecar; rename the volume"
            ));
        }
    }
    None
}

/// The sidecar's resources: the flags, with the pod's annotations
/// overriding the CPU request (and limit, when one is set) and the memory
/// request and limit. A bad annotation refuses the pod: a sidecar with
/// resources nobody asked for is worse than a clear error.
fn resources(pod: &Value, defaults: &SidecarResources) -> Result<Value, String> {
    let annotation = |key: &str| -> Result<Option<String>, String> {
        match &pod["metadata"]["annotations"][key] {
            Value::Null => Ok(None),
            Value::String(s) if is_quantity(s) => Ok(Some(s.clone())),
            v => Err(format!(
                "annotation {key}: {v} is not a positive Kubernetes quantity (for example 100m, 0.5, 128Mi, 1Gi)"
            )),
        }
    };
    let cpu = annotation(CPU_ANNOTATION)?;
    let memory = annotation(MEMORY_ANNOTATION)?;
    let mut requests = Map::new();
    let mut limits = Map::new();
    requests.insert(
        "cpu".into(),
        cpu.clone().unwrap_or(defaults.cpu_request.clone()).into(),
    );
    requests.insert(
        "memory".into(),
        memory
            .clone()
            .unwrap_or(defaults.memory_request.clone())
            .into(),
    );
    if let Some(l) = &defaults.cpu_limit {
        limits.insert("cpu".into(), cpu.unwrap_or(l.clone()).into());
    }
    match (memory, &defaults.memory_limit) {
        (Some(m), _) => {
            limits.insert("memory".into(), m.into());
        }
        (None, Some(l)) => {
            limits.insert("memory".into(), l.clone().into());
        }
        (None, None) => {}
    }
    let mut r = Map::new();
    r.insert("requests".into(), Value::Object(requests));
    if !limits.is_empty() {
        r.insert("limits".into(), Value::Object(limits));
    }
    Ok(Value::Object(r))
}

/// A positive Kubernetes quantity: a decimal number and an optional binary
/// (Ki..Ei) or decimal (n, u, m, k, M..E) suffix or exponent, as the API
/// server's parser accepts them (no sign: resources are never negative).
pub fn is_quantity(s: &str) -> bool {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let digits = number.chars().filter(char::is_ascii_digit).count();
    let well_formed = digits > 0
        && number.matches('.').count() <= 1
        && number.chars().any(|c| c.is_ascii_digit() && c != '0');
    let suffix_ok = match suffix {
        "" | "n" | "u" | "m" | "k" | "M" | "G" | "T" | "P" | "E" => true,
        "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => true,
        exp => exp
            .strip_prefix(['e', 'E'])
            .map(|rest| rest.strip_prefix(['+', '-']).unwrap_or(rest))
            .is_some_and(|d| {
                !d.is_empty() && d.len() <= 3 && d.bytes().all(|b| b.is_ascii_digit())
            }),
    };
    s.len() <= 64 && well_formed && suffix_ok
}
