use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::ByteString;
use pgwarden_api::DatabaseAccessPolicy;
use serde_json::json;

use super::*;

const PASSWORD: &str = "s3cret-value";

fn policy(spec_patch: serde_json::Value) -> DatabaseAccessPolicy {
    let mut p = json!({
        "apiVersion": "pgwarden.io/v1alpha1", "kind": "DatabaseAccessPolicy",
        "metadata": {"name": "nightly", "namespace": "ci", "generation": 3},
        "spec": {
            "podSelector": {"matchLabels": {"app": "agent"}},
            "identity": {"kubernetes": {"audience": "pgwarden"}},
            "database": {"host": "pg", "port": 5432, "name": "shop", "credentialsSecret": "cred"},
            "defaultAction": "Deny",
            "rules": [{"name": "reads", "action": "Allow", "statements": ["SELECT"]}]
        }
    });
    json_merge(&mut p["spec"], &spec_patch);
    serde_json::from_value(p).unwrap()
}

fn json_merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                json_merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn secret(name: &str, keys: &[(&str, &str)]) -> (String, Secret) {
    let data = keys
        .iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect();
    let s = Secret {
        data: Some(data),
        ..Secret::default()
    };
    (name.to_owned(), s)
}

fn creds() -> BTreeMap<String, Secret> {
    BTreeMap::from([secret(
        "cred",
        &[("username", "app"), ("password", PASSWORD)],
    )])
}

fn pod(name: &str, app: &str, annotations: &[(&str, &str)], phase: &str) -> Pod {
    let mut ann: BTreeMap<String, String> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    ann.entry(pgwarden_api::INJECTED_ANNOTATION.into())
        .or_insert_with(|| "true".into());
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "ci", "labels": {"app": app}, "annotations": ann},
        "status": {"phase": phase}
    }))
    .unwrap()
}

fn t(s: i64) -> jiff::Timestamp {
    jiff::Timestamp::from_second(1_700_000_000 + s).unwrap()
}

fn cond<'a>(s: &'a DatabaseAccessPolicyStatus, t: &str) -> &'a Condition {
    s.conditions
        .iter()
        .find(|c| c.type_ == t)
        .unwrap_or_else(|| panic!("no {t} condition in {s:?}"))
}

/// The policy as it reads back after its status was written.
fn with_status(
    mut p: DatabaseAccessPolicy,
    s: &DatabaseAccessPolicyStatus,
) -> DatabaseAccessPolicy {
    p.status = Some(s.clone());
    p
}

#[test]
fn a_valid_policy_with_its_secret_is_ready_once_and_then_quiet() {
    let p = policy(json!({}));
    let first = decide(&p, &creds(), &[], t(0));
    let s = &first.status;
    assert_eq!(cond(s, READY).status, "True");
    assert_eq!(cond(s, READY).reason, "Valid");
    assert_eq!(cond(s, READY).observed_generation, Some(3));
    assert_eq!(cond(s, INVALID).status, "False");
    assert_eq!(cond(s, APPLIED).reason, "NoSelectedPods");
    assert_eq!(s.observed_generation, Some(3));
    assert_eq!((s.selected_pods, s.applied_sidecars), (Some(0), Some(0)));
    assert_eq!(first.events.len(), 1);
    assert_eq!(first.events[0].reason, "Ready");
    assert!(!first.events[0].warning);

    // Reconciled again later with nothing changed: the very same status (no
    // write, so no watch event, so no loop) and no Event.
    let again = decide(&with_status(p, s), &creds(), &[], t(60));
    assert_eq!(&again.status, s);
    assert!(again.events.is_empty(), "{:?}", again.events);
}

#[test]
fn an_invalid_spec_names_the_field_path_in_status_and_an_event() {
    let p = policy(json!({"rules": [
        {"name": "bulk", "action": "Allow", "statements": ["SELECT"], "unfiltered": true}
    ]}));
    let out = decide(&p, &creds(), &[], t(0));
    let ready = cond(&out.status, READY);
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "InvalidSpec")
    );
    let invalid = cond(&out.status, INVALID);
    assert_eq!(invalid.status, "True");
    assert!(
        invalid.message.starts_with("spec.rules[0].unfiltered: "),
        "{}",
        invalid.message
    );
    assert_eq!(out.events.len(), 1);
    assert_eq!(out.events[0].reason, "InvalidSpec");
    assert!(out.events[0].warning);
    assert_eq!(out.events[0].message, invalid.message);
    assert!(out.status.conditions.iter().all(|c| c.type_ != APPLIED));
    // Still invalid in the same way: no second Event.
    let again = decide(&with_status(p, &out.status), &creds(), &[], t(5));
    assert!(again.events.is_empty());
    assert_eq!(again.status, out.status);
}

#[test]
fn missing_secrets_and_keys_are_named_never_their_values() {
    let p = policy(json!({
        "database": {"tls": {"mode": "verify-full", "caSecret": "ca"}},
        "recording": {"store": {"postgres": {"dsnSecret": "audit"}}}
    }));
    let mut secrets = creds();
    let out = decide(&p, &secrets, &[], t(0));
    let ready = cond(&out.status, READY);
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "SecretMissing")
    );
    assert_eq!(
        ready.message,
        "Secret \"ca\" (spec.database.tls.caSecret) not found"
    );
    assert_eq!(out.events[0].reason, "SecretMissing");

    secrets.extend([
        secret("ca", &[("tls.crt", "x")]),
        secret("audit", &[("dsn", "")]),
    ]);
    let out = decide(&with_status(p.clone(), &out.status), &secrets, &[], t(1));
    let ready = cond(&out.status, READY);
    assert_eq!(ready.reason, "SecretKeyMissing");
    assert_eq!(
        ready.message,
        "Secret \"ca\" (spec.database.tls.caSecret) has no key \"ca.crt\""
    );
    assert_eq!(out.events[0].reason, "SecretKeyMissing");

    secrets.extend([secret("ca", &[("ca.crt", "PEM")])]);
    let out = decide(&with_status(p.clone(), &out.status), &secrets, &[], t(2));
    assert_eq!(
        cond(&out.status, READY).message,
        "Secret \"audit\" (spec.recording.store.postgres.dsnSecret): key \"dsn\" is empty"
    );

    let mut no_password = secrets.clone();
    no_password.extend([secret("cred", &[("username", PASSWORD)])]);
    let out2 = decide(&p, &no_password, &[], t(3));
    let text = format!("{:?}", out2);
    assert!(text.contains("has no key \\\"password\\\""), "{text}");
    assert!(!text.contains(PASSWORD), "a Secret value leaked: {text}");

    // Fixed: Ready again, with a Ready Event.
    secrets.extend([secret("audit", &[("dsn", "postgres://x")])]);
    let fixed = decide(&with_status(p, &out.status), &secrets, &[], t(4));
    assert_eq!(cond(&fixed.status, READY).status, "True");
    assert_eq!(cond(&fixed.status, READY).last_transition_time.0, t(4));
    assert_eq!(
        fixed.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
        ["Ready"]
    );
}

#[test]
fn selected_and_applied_count_live_injected_pods_at_the_current_generation() {
    let p = policy(json!({}));
    let at = |gen: i64| format!(r#"{{"version":7,"policies":{{"nightly":{gen},"other":1}}}}"#);
    let (g3, g2) = (at(3), at(2));
    let applied = CONFIG_APPLIED_ANNOTATION;
    let mut plain = pod("not-injected", "agent", &[], "Running");
    plain.metadata.annotations = None;
    let pods = vec![
        pod("a", "agent", &[(applied, &g3)], "Running"),
        pod("b", "agent", &[(applied, &g2)], "Running"),
        pod("c", "agent", &[], "Pending"),
        pod("done", "agent", &[(applied, &g3)], "Succeeded"),
        pod("other-app", "web", &[(applied, &g3)], "Running"),
        plain,
    ];
    let out = decide(&p, &creds(), &pods, t(0));
    assert_eq!(out.status.selected_pods, Some(3));
    assert_eq!(out.status.applied_sidecars, Some(1));
    let a = cond(&out.status, APPLIED);
    assert_eq!((a.status.as_str(), a.reason.as_str()), ("False", "Pending"));
    assert_eq!(a.message, "1 of 3 selected sidecars run generation 3");

    let all: Vec<Pod> = ["a", "b"]
        .iter()
        .map(|n| pod(n, "agent", &[(applied, &g3)], "Running"))
        .collect();
    let out = decide(&p, &creds(), &all, t(0));
    assert_eq!(cond(&out.status, APPLIED).reason, "Applied");
    assert_eq!(out.status.applied_sidecars, Some(2));
}

#[test]
fn a_refusal_newer_than_the_last_ack_shows_in_applied_and_an_event() {
    let p = policy(json!({}));
    let acked = r#"{"version":4,"policies":{"nightly":3}}"#;
    let nack = r#"{"version":5,"error":"bad CA certificate"}"#;
    let old_nack = r#"{"version":3,"error":"older problem"}"#;
    let pods = vec![
        pod(
            "a",
            "agent",
            &[
                (CONFIG_APPLIED_ANNOTATION, acked),
                (CONFIG_ERROR_ANNOTATION, nack),
            ],
            "Running",
        ),
        pod(
            "b",
            "agent",
            &[
                (CONFIG_APPLIED_ANNOTATION, acked),
                (CONFIG_ERROR_ANNOTATION, old_nack),
            ],
            "Running",
        ),
    ];
    let out = decide(&p, &creds(), &pods, t(0));
    let a = cond(&out.status, APPLIED);
    assert_eq!(
        (a.status.as_str(), a.reason.as_str()),
        ("False", "SidecarRejected")
    );
    assert_eq!(a.message, "pod a refused version 5: bad CA certificate");
    assert!(out
        .events
        .iter()
        .any(|e| e.reason == "SidecarRejected" && e.warning));
    // Both still run generation 3.
    assert_eq!(out.status.applied_sidecars, Some(2));
}

#[test]
fn transition_times_move_only_when_a_condition_flips() {
    let p = policy(json!({}));
    let ready = decide(&p, &creds(), &[], t(0)).status;
    let broken = decide(
        &with_status(p.clone(), &ready),
        &BTreeMap::new(),
        &[],
        t(10),
    )
    .status;
    assert_eq!(cond(&broken, READY).last_transition_time.0, t(10));
    assert_eq!(
        cond(&broken, INVALID).last_transition_time.0,
        t(0),
        "Invalid stayed False"
    );
    let still = decide(&with_status(p, &broken), &BTreeMap::new(), &[], t(20)).status;
    assert_eq!(cond(&still, READY).last_transition_time.0, t(10));
}

#[test]
fn secret_refs_list_what_the_spec_names() {
    let p = policy(json!({
        "database": {"tls": {"mode": "verify-full", "caSecret": "ca"}},
        "recording": {"store": {"postgres": {"dsnSecret": "audit"}}}
    }));
    let refs = secret_refs(&p.spec);
    let refs: Vec<(&str, &str)> = refs.iter().map(|r| (r.field, r.name.as_str())).collect();
    assert_eq!(
        refs,
        [
            ("spec.database.credentialsSecret", "cred"),
            ("spec.database.tls.caSecret", "ca"),
            ("spec.recording.store.postgres.dsnSecret", "audit"),
        ]
    );
}
