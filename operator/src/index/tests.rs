use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use pgwarden_api::{DatabaseAccessPolicy, SecretBytes};
use serde_json::json;

use super::*;

struct Keys;

impl KeySource for Keys {
    fn masking_key(&self) -> Option<SecretBytes> {
        Some(SecretBytes(vec![1; 32]))
    }
    fn fingerprint_key(&self, namespace: &str, policy: &str) -> Option<SecretBytes> {
        Some(SecretBytes(format!("{namespace}/{policy}").into_bytes()))
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn selector(v: serde_json::Value) -> LabelSelector {
    serde_json::from_value(v).unwrap()
}

#[test]
fn selectors_match_labels_and_expressions_as_kubernetes_does() {
    let agent = labels(&[("app", "agent"), ("tier", "ci")]);
    let web = labels(&[("app", "web")]);
    assert!(selects(None, &agent), "no selector: every injected pod");
    assert!(selects(Some(&selector(json!({}))), &web), "empty selector");
    let by_label = selector(json!({"matchLabels": {"app": "agent"}}));
    assert!(selects(Some(&by_label), &agent));
    assert!(!selects(Some(&by_label), &web));
    let cases = [
        (
            json!({"key": "app", "operator": "In", "values": ["agent", "x"]}),
            true,
            false,
        ),
        (
            json!({"key": "app", "operator": "NotIn", "values": ["web"]}),
            true,
            false,
        ),
        (json!({"key": "tier", "operator": "Exists"}), true, false),
        (
            json!({"key": "tier", "operator": "DoesNotExist"}),
            false,
            true,
        ),
        // NotIn also selects pods without the key (Kubernetes semantics).
        (
            json!({"key": "tier", "operator": "NotIn", "values": ["prod"]}),
            true,
            true,
        ),
    ];
    for (expr, on_agent, on_web) in cases {
        let s = selector(json!({"matchExpressions": [expr.clone()]}));
        assert_eq!(selects(Some(&s), &agent), on_agent, "{expr} on agent");
        assert_eq!(selects(Some(&s), &web), on_web, "{expr} on web");
    }
    // Both parts must hold.
    let both = selector(json!({"matchLabels": {"app": "agent"},
        "matchExpressions": [{"key": "tier", "operator": "In", "values": ["prod"]}]}));
    assert!(!selects(Some(&both), &agent));
    // Unreadable: fails closed.
    let bad = selector(json!({"matchExpressions": [{"key": "app", "operator": "Near"}]}));
    assert!(!selects(Some(&bad), &agent));
    let no_values = selector(json!({"matchExpressions": [{"key": "app", "operator": "In"}]}));
    assert!(!selects(Some(&no_values), &agent));
}

fn policy(
    ns: &str,
    name: &str,
    generation: i64,
    extra: serde_json::Value,
) -> Arc<DatabaseAccessPolicy> {
    let mut spec = json!({
        "identity": {"kubernetes": {"audience": "pgwarden"}},
        "database": {"host": "db", "name": name, "credentialsSecret": "cred"},
        "defaultAction": "Deny",
    });
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "pgwarden.io/v1alpha1", "kind": "DatabaseAccessPolicy",
            "metadata": {"name": name, "namespace": ns, "generation": generation},
            "spec": spec,
        }))
        .unwrap(),
    )
}

fn secret(name: &str, data: &[(&str, &str)]) -> Arc<Secret> {
    use base64::Engine as _;
    let data: serde_json::Map<String, serde_json::Value> = data
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                json!(base64::engine::general_purpose::STANDARD.encode(v)),
            )
        })
        .collect();
    Arc::new(
        serde_json::from_value(
            json!({"metadata": {"name": name, "namespace": "ci"}, "data": data}),
        )
        .unwrap(),
    )
}

fn pod(labels: serde_json::Value) -> Pod {
    serde_json::from_value(
        json!({"metadata": {"name": "agent-1", "namespace": "ci", "labels": labels}}),
    )
    .unwrap()
}

fn lookup(secrets: Vec<Arc<Secret>>) -> impl Fn(&str, &str) -> Option<Arc<Secret>> {
    move |ns, name| {
        secrets
            .iter()
            .find(|s| {
                s.metadata.namespace.as_deref() == Some(ns)
                    && s.metadata.name.as_deref() == Some(name)
            })
            .cloned()
    }
}

#[test]
fn a_pod_gets_the_policies_of_its_namespace_that_select_it_with_their_secrets() {
    let policies = vec![
        policy(
            "ci",
            "shop",
            3,
            json!({"podSelector": {"matchLabels": {"app": "agent"}}}),
        ),
        policy(
            "ci",
            "web-only",
            1,
            json!({"podSelector": {"matchLabels": {"app": "web"}}}),
        ),
        policy("ci", "everyone", 2, json!({})),
        policy("other", "elsewhere", 1, json!({})),
    ];
    let secrets = lookup(vec![
        secret("cred", &[("username", "app"), ("password", "pw-1")]),
        secret("ca", &[("ca.crt", "-----BEGIN CERTIFICATE-----")]),
    ]);
    let got = resolve_for_pod(&pod(json!({"app": "agent"})), &policies, &secrets, &Keys);
    assert_eq!(got.keys().collect::<Vec<_>>(), ["everyone", "shop"]);
    let shop = got["shop"].as_ref().unwrap();
    assert_eq!(shop.generation, 3);
    assert_eq!(shop.policy.namespace, "ci");
    assert_eq!(shop.policy.credential.username, "app");
    assert_eq!(shop.policy.credential.password.expose(), "pw-1");
    assert_eq!(
        shop.policy.fingerprint_key,
        Some(SecretBytes(b"ci/shop".to_vec()))
    );
    assert_eq!(shop.policy.ca_pem, None);

    // With verify-full and a caSecret, the CA comes along; a recording
    // store brings its DSN.
    let tls = vec![policy(
        "ci",
        "tls",
        1,
        json!({"database": {"host": "db", "name": "tls", "credentialsSecret": "cred",
            "tls": {"mode": "verify-full", "caSecret": "ca"}}}),
    )];
    let got = resolve_for_pod(&pod(json!({})), &tls, &secrets, &Keys);
    assert_eq!(
        got["tls"].as_ref().unwrap().policy.ca_pem.as_deref(),
        Some("-----BEGIN CERTIFICATE-----")
    );
}

#[test]
fn unresolvable_policies_say_why_without_values_and_keep_their_last_good_resolution() {
    let policies = vec![
        policy("ci", "shop", 1, json!({})),
        policy(
            "ci",
            "nokey",
            1,
            json!({"database": {"host": "db", "name": "nokey", "credentialsSecret": "half"}}),
        ),
        policy(
            "ci",
            "invalid",
            1,
            json!({"defaultAction": "Allow", "rules": [{"name": "x", "action": "Allow"}]}),
        ),
    ];
    let ok = lookup(vec![
        secret("cred", &[("username", "app"), ("password", "pw-1")]),
        secret("half", &[("username", "app")]),
    ]);
    let first = resolve_for_pod(&pod(json!({})), &policies, &ok, &Keys);
    assert!(first["shop"].is_ok());
    let nokey = first["nokey"].as_ref().unwrap_err();
    assert!(
        nokey.contains("ci/half") && nokey.contains("\"password\""),
        "{nokey}"
    );
    let invalid = first["invalid"].as_ref().unwrap_err();
    assert!(invalid.starts_with("invalid: spec."), "{invalid}");
    let sent = compose(first, &BTreeMap::new());
    assert_eq!(sent.keys().collect::<Vec<_>>(), ["shop"]);

    // The Secret is deleted: shop stays on what was sent.
    let gone = resolve_for_pod(&pod(json!({})), &policies, &lookup(vec![]), &Keys);
    let err = gone["shop"].as_ref().unwrap_err();
    assert!(
        err.contains("Secret ci/cred not found") && !err.contains("pw-1"),
        "{err}"
    );
    let next = compose(gone, &sent);
    assert_eq!(next, sent);

    // The policy stops selecting the pod: it is gone, last good or not.
    let narrowed = vec![policy(
        "ci",
        "shop",
        2,
        json!({"podSelector": {"matchLabels": {"app": "x"}}}),
    )];
    let none = compose(
        resolve_for_pod(&pod(json!({})), &narrowed, &ok, &Keys),
        &sent,
    );
    assert!(none.is_empty());
}

#[test]
fn the_index_keeps_only_what_a_snapshot_reads() {
    let mut s = (*secret(
        "helm-release",
        &[
            ("release", "a large blob"),
            ("username", "app"),
            ("ca.crt", "pem"),
        ],
    ))
    .clone();
    trim_secret(&mut s);
    let keys: Vec<&String> = s.data.as_ref().unwrap().keys().collect();
    assert_eq!(keys, ["ca.crt", "username"]);

    let mut p: Pod = serde_json::from_value(json!({
        "metadata": {"name": "a", "namespace": "ci", "uid": "u1", "labels": {"app": "agent"},
            "annotations": {"pgwarden.io/injected": "true"},
            "managedFields": [{"manager": "kubectl"}]},
        "spec": {"serviceAccountName": "runner", "containers": [{"name": "app", "image": "x"}]},
        "status": {"phase": "Running"},
    }))
    .unwrap();
    trim_pod(&mut p);
    assert_eq!(p.metadata.uid.as_deref(), Some("u1"));
    assert!(p.metadata.labels.as_ref().unwrap().contains_key("app"));
    assert!(p
        .metadata
        .annotations
        .as_ref()
        .unwrap()
        .contains_key("pgwarden.io/injected"));
    assert!(p.metadata.managed_fields.is_none() && p.status.is_none());
    let spec = p.spec.unwrap();
    assert_eq!(spec.service_account_name.as_deref(), Some("runner"));
    assert!(spec.containers.is_empty());
}

#[test]
fn a_pod_change_wakes_its_own_stream_and_a_namespace_change_wakes_all() {
    let index = Index {
        scopes: Vec::new(),
        wakers: Mutex::default(),
    };
    let ns_a = index.subscribe("ci");
    let pod_a = index.subscribe(&pod_key("ci", "a"));
    let pod_b = index.subscribe(&pod_key("ci", "b"));
    let other = index.subscribe("other");
    index.wake(&pod_key("ci", "a"));
    assert!(pod_a.has_changed().unwrap());
    assert!(!pod_b.has_changed().unwrap() && !ns_a.has_changed().unwrap());
    index.wake("ci");
    assert!(ns_a.has_changed().unwrap());
    assert!(!other.has_changed().unwrap());
    // A namespace nobody follows any more is forgotten.
    drop(other);
    index.wake("other");
    assert!(!index.wakers.lock().unwrap().contains_key("other"));
}
