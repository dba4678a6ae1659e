use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::*;
use crate::admission::inject::{inject, Decision, INJECT_LABEL};

fn settings() -> GuardSettings {
    GuardSettings {
        inject: crate::admission::inject::tests::settings(),
        operator_namespace: "pgwarden-system".into(),
        tls_secret: "pgwarden-webhook-tls".into(),
    }
}

fn enabled() -> BTreeMap<String, String> {
    BTreeMap::from([(INJECT_LABEL.to_owned(), "enabled".to_owned())])
}

/// A pod as it is stored after injection.
fn injected() -> Value {
    let pod = json!({
        "metadata": {"generateName": "nightly-"},
        "spec": {"containers": [{"name": "agent", "image": "agent:1"}]},
    });
    let Decision::Patch(ops) = inject(&pod, &enabled(), &settings().inject) else {
        panic!()
    };
    let patch: json_patch::Patch =
        serde_json::from_value(serde_json::to_value(ops).unwrap()).unwrap();
    let mut out = pod;
    json_patch::patch(&mut out, &patch).unwrap();
    out
}

fn create(pod: &Value) -> Result<(), String> {
    guard(pod, "ci", &enabled(), Change::Create, &settings())
}

fn refused(r: Result<(), String>, want: &str) {
    match r {
        Err(msg) => assert!(msg.contains(want), "{msg:?} lacks {want:?}"),
        Ok(()) => panic!("admitted; wanted a refusal with {want:?}"),
    }
}

#[test]
fn an_injected_pod_passes() {
    create(&injected()).unwrap();
}

#[test]
fn host_network_and_shared_pid_are_refused() {
    let mut pod = injected();
    pod["spec"]["hostNetwork"] = json!(true);
    refused(create(&pod), "remove hostNetwork");
    let mut pod = injected();
    pod["spec"]["shareProcessNamespace"] = json!(true);
    refused(create(&pod), "remove shareProcessNamespace");
    // Outside the opt-in, the guard has no say.
    let plain = json!({"spec": {"hostNetwork": true, "containers": [{"name": "a"}]}});
    guard(
        &plain,
        "other",
        &BTreeMap::new(),
        Change::Create,
        &settings(),
    )
    .unwrap();
}

#[test]
fn only_the_sidecar_mounts_the_token() {
    let mut pod = injected();
    pod["spec"]["containers"][0]["volumeMounts"] =
        json!([{"name": "pgwarden-sidecar-token", "mountPath": "/t"}]);
    refused(create(&pod), "remove that volumeMount");
    let mut pod = injected();
    pod["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "thief", "image": "x",
                     "volumeMounts": [{"name": "pgwarden-sidecar-token", "mountPath": "/t"}]}));
    refused(
        create(&pod),
        "container \"thief\" mounts volume pgwarden-sidecar-token",
    );
}

#[test]
fn no_other_sidecar_audience_token() {
    let mut pod = injected();
    pod["spec"]["volumes"].as_array_mut().unwrap().push(json!({
        "name": "mine", "projected": {"sources": [{"serviceAccountToken":
            {"audience": "pgwarden.io/sidecar", "path": "t"}}]}}));
    refused(create(&pod), "use another audience");
    // Another audience is fine (identity.kubernetes clients use one).
    let mut pod = injected();
    pod["spec"]["volumes"].as_array_mut().unwrap().push(json!({
        "name": "mine", "projected": {"sources": [{"serviceAccountToken":
            {"audience": "pgwarden", "path": "t"}}]}}));
    create(&pod).unwrap();
}

#[test]
fn the_operators_tls_secret_is_not_mounted() {
    let mut pod = injected();
    pod["spec"]["volumes"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "k", "secret": {"secretName": "pgwarden-webhook-tls"}}));
    let r = guard(
        &pod,
        "pgwarden-system",
        &enabled(),
        Change::Create,
        &settings(),
    );
    refused(r, "the operator's CA and serving key");
    // A Secret of that name in another namespace is someone else's.
    create(&pod).unwrap();
}

#[test]
fn a_fake_sidecar_is_refused() {
    let mut pod = injected();
    pod["spec"]["initContainers"][0]["image"] = json!("evil:1");
    refused(create(&pod), "remove it and let injection add it");
    let mut pod = injected();
    pod["spec"]["initContainers"][0]["command"] = json!(["/bin/sh"]);
    refused(create(&pod), "differs from the sidecar");
    // An app container named like the sidecar.
    let mut pod = injected();
    pod["spec"]["containers"][0]["name"] = json!("pgwarden");
    refused(create(&pod), "reserved");
    // Swapping the image later.
    let old = injected();
    let mut new = old.clone();
    new["spec"]["initContainers"][0]["image"] = json!("evil:1");
    let update = Change::Update {
        old: &old,
        subresource: None,
    };
    refused(
        guard(&new, "ci", &enabled(), update, &settings()),
        "differs from the sidecar",
    );
    // A sidecar from an older operator (other image) may still be updated.
    let mut s = settings();
    s.inject.image = "ghcr.io/pgwarden/pgwarden:2.0".into();
    let mut relabelled = old.clone();
    relabelled["metadata"]["labels"] = json!({"x": "y"});
    guard(&relabelled, "ci", &enabled(), update, &s).unwrap();
}

#[test]
fn ephemeral_containers() {
    let old = injected();
    let with = |c: Value| {
        let mut p = old.clone();
        p["spec"]["ephemeralContainers"] = json!([c]);
        p
    };
    let eph = |p: &Value| {
        guard(
            p,
            "ci",
            &enabled(),
            Change::Update {
                old: &old,
                subresource: Some("ephemeralcontainers"),
            },
            &settings(),
        )
    };
    eph(&with(
        json!({"name": "debug", "image": "busybox", "targetContainerName": "agent"}),
    ))
    .unwrap();
    refused(
        eph(&with(
            json!({"name": "debug", "image": "busybox", "targetContainerName": "pgwarden"}),
        )),
        "target an app container instead",
    );
    refused(
        eph(&with(json!({"name": "debug", "image": "busybox",
                         "volumeMounts": [{"name": "pgwarden-state", "mountPath": "/s"}]}))),
        "debug without volumeMounts",
    );
    refused(
        eph(&with(json!({"name": "debug", "image": "busybox",
                         "volumeMounts": [{"name": "pgwarden-sidecar-token", "mountPath": "/t"}]}))),
        "pgwarden-sidecar-token",
    );
}

#[test]
fn the_ca_annotation_is_fixed() {
    let old = injected();
    let mut new = old.clone();
    new["metadata"]["annotations"]["pgwarden.io/operator-ca"] = json!("attacker CA");
    refused(
        guard(
            &new,
            "ci",
            &enabled(),
            Change::Update {
                old: &old,
                subresource: None,
            },
            &settings(),
        ),
        "cannot be changed",
    );
}

#[test]
fn opted_out_pods_in_an_enabled_namespace_are_not_guarded() {
    let pod = json!({"metadata": {"labels": {"pgwarden.io/inject": "false"}},
                     "spec": {"hostNetwork": true, "containers": [{"name": "a"}]}});
    create(&pod).unwrap();
    // But a pod carrying the injection is guarded whatever its labels say.
    let mut pod = injected();
    pod["metadata"]["labels"] = json!({"pgwarden.io/inject": "false"});
    pod["spec"]["hostNetwork"] = json!(true);
    refused(create(&pod), "hostNetwork");
}
