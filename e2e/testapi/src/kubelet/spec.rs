//! The pure half of the pod runner: which containers execute and how, the
//! environment a container gets (env, envFrom, downward API, Secret/ConfigMap keys,
//! `$(VAR)` expansion), and the two rewrites that let a pod run on the host:
//!
//! - **mount paths**: an arg, the value after `=` of an arg, or an env value that is
//!   a container's `mountPath` or lies below it is rewritten to the volume's
//!   directory on the host (longest mountPath first). Paths inside longer strings
//!   (`sh -c 'cat /etc/x'`) are not touched.
//! - **listen addresses**: the value of a flag whose name ends in `listen`
//!   (`--listen 127.0.0.1:5432`, `--metrics-listen=0.0.0.0:9090`) and of an env
//!   var whose name ends in `LISTEN` (`PGWARDEN_LISTEN`) with host `127.0.0.1`,
//!   `0.0.0.0` or `localhost` gets the pod's IP instead, so two pods can both
//!   listen on 5432. Outbound addresses (the database host) are left alone; the
//!   stored pod spec is never changed.

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::Value;

/// Whether a container is pgwarden's sidecar, which runs as the real binary: its
/// name is `pgwarden`, or its image's repository is `…/pgwarden` (any registry,
/// any tag).
pub fn is_pgwarden(c: &Value) -> bool {
    if c["name"] == "pgwarden" {
        return true;
    }
    let image = c["image"].as_str().unwrap_or_default();
    let repo = image.split('@').next().unwrap_or_default();
    let last = repo.rsplit('/').next().unwrap_or_default();
    last.split(':').next() == Some("pgwarden")
}

/// The argv of the real pgwarden binary for the sidecar container: the image's
/// entrypoint (`command[0]`, if any) is replaced by `bin`, the rest kept.
pub fn pgwarden_argv(bin: &str, c: &Value) -> Vec<String> {
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut argv = vec![bin.to_string()];
    argv.extend(strs(&c["command"]).into_iter().skip(1));
    argv.extend(strs(&c["args"]));
    argv
}

/// The container's own `command` + `args`.
pub fn own_argv(c: &Value) -> Vec<String> {
    ["command", "args"]
        .iter()
        .flat_map(|k| c[*k].as_array().cloned().unwrap_or_default())
        .filter_map(|x| x.as_str().map(String::from))
        .collect()
}

/// A downward-API `fieldRef.fieldPath` of the pod.
pub fn field_ref(pod: &Value, path: &str) -> Result<String, String> {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let map_key = |prefix: &str| -> Option<String> {
        let rest = path.strip_prefix(prefix)?.strip_prefix("['")?;
        Some(rest.strip_suffix("']")?.to_string())
    };
    if let Some(k) = map_key("metadata.labels") {
        return Ok(s(&pod["metadata"]["labels"][k]));
    }
    if let Some(k) = map_key("metadata.annotations") {
        return Ok(s(&pod["metadata"]["annotations"][k]));
    }
    Ok(match path {
        "metadata.name" => s(&pod["metadata"]["name"]),
        "metadata.namespace" => s(&pod["metadata"]["namespace"]),
        "metadata.uid" => s(&pod["metadata"]["uid"]),
        "spec.nodeName" => s(&pod["spec"]["nodeName"]),
        "spec.serviceAccountName" => s(&pod["spec"]["serviceAccountName"]),
        "status.hostIP" | "status.hostIPs" => s(&pod["status"]["hostIP"]),
        "status.podIP" | "status.podIPs" => s(&pod["status"]["podIP"]),
        "metadata.labels" | "metadata.annotations" => {
            let field = path.trim_start_matches("metadata.");
            let mut lines: Vec<String> = pod["metadata"][field]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect())
                .unwrap_or_default();
            lines.sort();
            lines.join("\n")
        }
        other => return Err(format!("unsupported fieldRef {other:?}")),
    })
}

/// `$(VAR)` references to defined variables are replaced, `$$` is a literal `$`,
/// anything else stays as written (the kubelet's expansion).
pub fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(body) = after.strip_prefix('(') {
            match body.find(')') {
                Some(end) if vars.contains_key(&body[..end]) => {
                    out.push_str(&vars[&body[..end]]);
                    rest = &body[end + 1..];
                }
                _ => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A key of a Secret (base64 `data`) or ConfigMap (`data`, base64 `binaryData`).
pub fn key_of(obj: &Value, kind: &str, key: &str) -> Option<Vec<u8>> {
    let b64 = |v: &Value| {
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str()?)
            .ok()
    };
    if kind == "Secret" {
        return b64(&obj["data"][key]);
    }
    match obj["data"][key].as_str() {
        Some(s) => Some(s.as_bytes().to_vec()),
        None => b64(&obj["binaryData"][key]),
    }
}

/// Looks up a Secret or ConfigMap of the pod's namespace by kind and name.
pub type Lookup<'a> = dyn Fn(&str, &str) -> Option<Value> + 'a;

/// The environment of container `c` (in order, later definitions win).
pub fn container_env(
    pod: &Value,
    c: &Value,
    lookup: &Lookup<'_>,
) -> Result<BTreeMap<String, String>, String> {
    let mut vars = BTreeMap::new();
    for from in c["envFrom"].as_array().into_iter().flatten() {
        let prefix = from["prefix"].as_str().unwrap_or_default();
        let (kind, r) = if from["secretRef"].is_object() {
            ("Secret", &from["secretRef"])
        } else {
            ("ConfigMap", &from["configMapRef"])
        };
        let name = r["name"].as_str().unwrap_or_default();
        match lookup(kind, name) {
            Some(obj) => {
                let keys: Vec<String> = ["data", "binaryData"]
                    .iter()
                    .flat_map(|f| obj[*f].as_object().into_iter().flatten())
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in keys {
                    if let Some(v) = key_of(&obj, kind, &k) {
                        vars.insert(
                            format!("{prefix}{k}"),
                            String::from_utf8_lossy(&v).into_owned(),
                        );
                    }
                }
            }
            None if r["optional"] == true => {}
            None => return Err(format!("{} {name:?} not found", kind.to_lowercase())),
        }
    }
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap_or_default().to_string();
        let vf = &e["valueFrom"];
        let value = if let Some(v) = e["value"].as_str() {
            expand(v, &vars)
        } else if vf["fieldRef"].is_object() {
            field_ref(
                pod,
                vf["fieldRef"]["fieldPath"].as_str().unwrap_or_default(),
            )?
        } else if vf["secretKeyRef"].is_object() || vf["configMapKeyRef"].is_object() {
            let (kind, r) = if vf["secretKeyRef"].is_object() {
                ("Secret", &vf["secretKeyRef"])
            } else {
                ("ConfigMap", &vf["configMapKeyRef"])
            };
            let (oname, key) = (
                r["name"].as_str().unwrap_or_default(),
                r["key"].as_str().unwrap_or_default(),
            );
            match lookup(kind, oname).and_then(|o| key_of(&o, kind, key)) {
                Some(v) => String::from_utf8_lossy(&v).into_owned(),
                None if r["optional"] == true => continue,
                None => return Err(format!("couldn't find key {key} in {} {oname}", kind)),
            }
        } else if vf.is_object() {
            return Err(format!("env {name}: unsupported valueFrom {vf}"));
        } else {
            String::new()
        };
        vars.insert(name, value);
    }
    Ok(vars)
}

fn rewrite_listen_value(v: &str, pod_ip: &str) -> String {
    for host in ["127.0.0.1:", "0.0.0.0:", "localhost:"] {
        if let Some(port) = v.strip_prefix(host) {
            return format!("{pod_ip}:{port}");
        }
    }
    v.to_string()
}

fn rewrite_path(v: &str, mounts: &[(String, String)]) -> String {
    for (mount, host) in mounts {
        let m = mount.trim_end_matches('/');
        if v == m {
            return host.clone();
        }
        if let Some(rest) = v.strip_prefix(m).filter(|r| r.starts_with('/')) {
            return format!("{host}{rest}");
        }
    }
    v.to_string()
}

/// Applies both rewrites to an argv (`mounts`: mountPath → host dir, longest
/// first) and returns the new argv.
pub fn rewrite_args(argv: &[String], pod_ip: &str, mounts: &[(String, String)]) -> Vec<String> {
    let mut out = Vec::with_capacity(argv.len());
    let mut listen_next = false;
    for a in argv {
        if listen_next {
            out.push(rewrite_listen_value(a, pod_ip));
            listen_next = false;
            continue;
        }
        if let Some((flag, val)) = a.split_once('=').filter(|(f, _)| f.starts_with('-')) {
            let val = if flag.ends_with("listen") {
                rewrite_listen_value(val, pod_ip)
            } else {
                rewrite_path(val, mounts)
            };
            out.push(format!("{flag}={val}"));
            continue;
        }
        if a.starts_with('-') && a.ends_with("listen") {
            listen_next = true;
        }
        out.push(rewrite_path(a, mounts));
    }
    out
}

/// Applies both rewrites to env values.
pub fn rewrite_env(env: &mut BTreeMap<String, String>, pod_ip: &str, mounts: &[(String, String)]) {
    for (k, v) in env.iter_mut() {
        *v = if k.ends_with("LISTEN") {
            rewrite_listen_value(v, pod_ip)
        } else {
            rewrite_path(v, mounts)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Value {
        json!({"metadata": {"name": "p", "namespace": "ns", "uid": "u",
            "labels": {"app": "agent"}, "annotations": {"a": "b"}},
            "spec": {"serviceAccountName": "sa"}, "status": {"podIP": "127.0.0.7"}})
    }

    #[test]
    fn env_from_values_fields_and_keys() {
        let secret = json!({"data": {"password": "c2VjcmV0"}});
        let lookup =
            |kind: &str, name: &str| (kind == "Secret" && name == "db").then(|| secret.clone());
        let c = json!({"env": [
            {"name": "A", "value": "x"},
            {"name": "B", "value": "$(A)-$$(A)-$(NOPE)"},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
            {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k", "optional": true}}},
        ]});
        let env = container_env(&pod(), &c, &lookup).unwrap();
        assert_eq!(env["B"], "x-$(A)-$(NOPE)");
        assert_eq!(env["POD"], "p");
        assert_eq!(env["NS"], "ns");
        assert_eq!(env["UID"], "u");
        assert_eq!(env["APP"], "agent");
        assert_eq!(env["SA"], "sa");
        assert_eq!(env["IP"], "127.0.0.7");
        assert_eq!(env["PW"], "secret");
        assert!(!env.contains_key("OPT"));
        let missing = json!({"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k"}}}]});
        assert!(container_env(&pod(), &missing, &lookup).is_err());
    }

    #[test]
    fn listen_and_mount_rewrites() {
        let mounts = vec![
            (
                "/etc/pgwarden/policy".to_string(),
                "/tmp/v/policy".to_string(),
            ),
            ("/etc/pgwarden".to_string(), "/tmp/v/conf".to_string()),
        ];
        let argv: Vec<String> = [
            "pgwarden",
            "run",
            "-f",
            "/etc/pgwarden/policy/p.yaml",
            "--listen",
            "127.0.0.1:5432",
            "--metrics-listen=0.0.0.0:9090",
            "--state-dir=/etc/pgwarden",
            "--x",
            "/etcetera",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            rewrite_args(&argv, "127.0.0.9", &mounts),
            vec![
                "pgwarden",
                "run",
                "-f",
                "/tmp/v/policy/p.yaml",
                "--listen",
                "127.0.0.9:5432",
                "--metrics-listen=127.0.0.9:9090",
                "--state-dir=/tmp/v/conf",
                "--x",
                "/etcetera",
            ]
        );
        let mut env = BTreeMap::from([
            ("PGWARDEN_LISTEN".to_string(), "localhost:6432".to_string()),
            ("PGHOST".to_string(), "127.0.0.1".to_string()),
            ("CA".to_string(), "/etc/pgwarden/ca.crt".to_string()),
        ]);
        rewrite_env(&mut env, "127.0.0.9", &mounts);
        assert_eq!(env["PGWARDEN_LISTEN"], "127.0.0.9:6432");
        assert_eq!(env["PGHOST"], "127.0.0.1", "outbound/app addresses stay");
        assert_eq!(env["CA"], "/tmp/v/conf/ca.crt");
    }

    #[test]
    fn the_sidecar_rule() {
        assert!(is_pgwarden(&json!({"name": "pgwarden", "image": "x"})));
        assert!(is_pgwarden(
            &json!({"name": "s", "image": "ghcr.io/acme/pgwarden:0.3"})
        ));
        assert!(!is_pgwarden(
            &json!({"name": "s", "image": "ghcr.io/pgwarden/agent:1"})
        ));
        assert_eq!(
            pgwarden_argv(
                "/bin/pw",
                &json!({"command": ["/pgwarden", "run"], "args": ["-f", "x"]})
            ),
            vec!["/bin/pw", "run", "-f", "x"]
        );
    }
}
