//! Who is asking for a snapshot: the sidecar's projected token, checked by
//! the API server (TokenReview), and the pod it is bound to. The decision is
//! a pure function of the review and the pod, so every refusal is tested
//! without a cluster.

use k8s_openapi::api::authentication::v1::TokenReviewStatus;
use k8s_openapi::api::core::v1::Pod;
use pgwarden_api::{INJECTED_ANNOTATION, SIDECAR_AUDIENCE};

use crate::sidecars::PodKey;

const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// A token the API server vouched for, bound to a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundToken {
    pub pod: PodKey,
    pub pod_uid: String,
    pub service_account: String,
}

/// A refused request: the HTTP status and a one-line reason (logged by the
/// operator, sent to the sidecar; never the token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
}

fn unauthorized(reason: impl Into<String>) -> Refusal {
    Refusal {
        status: 401,
        reason: reason.into(),
    }
}

fn forbidden(reason: impl Into<String>) -> Refusal {
    Refusal {
        status: 403,
        reason: reason.into(),
    }
}

/// Step 1: what the TokenReview (asked with audience [`SIDECAR_AUDIENCE`])
/// says about the token.
pub fn check_review(status: Option<&TokenReviewStatus>) -> Result<BoundToken, Refusal> {
    let Some(status) = status else {
        return Err(unauthorized("the token review returned no status"));
    };
    if status.authenticated != Some(true) {
        // The API server's reason (expired, bad signature, wrong audience)
        // names no token content.
        let why = status.error.as_deref().unwrap_or("not authenticated");
        return Err(unauthorized(format!("token not authenticated: {why}")));
    }
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.iter().any(|a| a == SIDECAR_AUDIENCE) {
        return Err(unauthorized(format!(
            "the token is not for audience {SIDECAR_AUDIENCE}"
        )));
    }
    let Some(user) = &status.user else {
        return Err(unauthorized("the token review named no user"));
    };
    let username = user.username.as_deref().unwrap_or_default();
    let Some((namespace, service_account)) = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
    else {
        return Err(forbidden(format!(
            "{username:?} is not a service account; only a sidecar's token may fetch a configuration"
        )));
    };
    let extra = |key: &str| {
        user.extra
            .as_ref()
            .and_then(|e| e.get(key))
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let (Some(pod), Some(pod_uid)) = (extra(POD_NAME_EXTRA), extra(POD_UID_EXTRA)) else {
        return Err(forbidden(format!(
            "the token of {username} is not bound to a pod"
        )));
    };
    Ok(BoundToken {
        pod: PodKey {
            namespace: namespace.to_owned(),
            name: pod,
        },
        pod_uid,
        service_account: service_account.to_owned(),
    })
}

/// Step 2: the pod the token is bound to, as the API server has it now.
pub fn check_pod(token: &BoundToken, pod: Option<&Pod>) -> Result<(), Refusal> {
    let name = format!("{}/{}", token.pod.namespace, token.pod.name);
    let Some(pod) = pod else {
        return Err(forbidden(format!("pod {name} does not exist")));
    };
    if pod.metadata.uid.as_deref() != Some(token.pod_uid.as_str()) {
        return Err(forbidden(format!(
            "pod {name} is not the pod the token was issued for (its uid differs)"
        )));
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return Err(forbidden(format!("pod {name} is being deleted")));
    }
    let injected = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(INJECTED_ANNOTATION));
    if !injected {
        return Err(forbidden(format!(
            "pod {name} was not injected by pgwarden (no annotation {INJECTED_ANNOTATION})"
        )));
    }
    only_the_sidecar_holds_the_token(pod, &name)?;
    let pod_sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default");
    if pod_sa != token.service_account {
        return Err(forbidden(format!(
            "the token's service account {} is not pod {name}'s ({pod_sa})",
            token.service_account
        )));
    }
    Ok(())
}

/// The annotation alone proves nothing: a pod in a namespace the webhooks
/// never see (no opt-in label) can set it itself. What the snapshot must go
/// to is the token the injected sidecar holds, so the pod must be shaped as
/// injection built it: one volume projecting a `pgwarden.io/sidecar` token,
/// mounted by the native sidecar `pgwarden` and by no other container
/// (ephemeral ones included), and no hostNetwork or shared process namespace.
fn only_the_sidecar_holds_the_token(pod: &Pod, name: &str) -> Result<(), Refusal> {
    use crate::admission::inject::{SIDECAR_NAME, TOKEN_VOLUME};
    let refuse = |why: String| Err(forbidden(format!("pod {name}: {why}")));
    let Some(spec) = pod.spec.as_ref() else {
        return refuse("no spec".into());
    };
    if spec.host_network == Some(true) {
        return refuse("hostNetwork puts the sidecar's port on the node".into());
    }
    if spec.share_process_namespace == Some(true) {
        return refuse("shareProcessNamespace exposes the sidecar's memory".into());
    }
    let token_volumes: Vec<&str> = spec
        .volumes
        .iter()
        .flatten()
        .filter(|v| {
            v.projected.iter().any(|p| {
                p.sources.iter().flatten().any(|s| {
                    s.service_account_token
                        .as_ref()
                        .is_some_and(|t| t.audience.as_deref() == Some(SIDECAR_AUDIENCE))
                })
            })
        })
        .map(|v| v.name.as_str())
        .collect();
    if token_volumes != [TOKEN_VOLUME] {
        return refuse(format!(
            "the {SIDECAR_AUDIENCE} token must be projected by exactly the volume {TOKEN_VOLUME} injection adds (found {token_volumes:?})"
        ));
    }
    let mounts = |c: &k8s_openapi::api::core::v1::Container| {
        c.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == TOKEN_VOLUME)
    };
    let mut sidecar_mounts = false;
    for c in spec.init_containers.iter().flatten() {
        let is_sidecar = c.name == SIDECAR_NAME && c.restart_policy.as_deref() == Some("Always");
        if mounts(c) && !is_sidecar {
            return refuse(format!("init container {} mounts {TOKEN_VOLUME}", c.name));
        }
        sidecar_mounts |= is_sidecar && mounts(c);
    }
    if let Some(c) = spec.containers.iter().find(|c| mounts(c)) {
        return refuse(format!("container {} mounts {TOKEN_VOLUME}", c.name));
    }
    for e in spec.ephemeral_containers.iter().flatten() {
        let touches = e
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == TOKEN_VOLUME)
            || e.target_container_name.as_deref() == Some(SIDECAR_NAME);
        if touches {
            return refuse(format!(
                "ephemeral container {} reaches the sidecar",
                e.name
            ));
        }
    }
    if !sidecar_mounts {
        return refuse(format!(
            "no native sidecar {SIDECAR_NAME} mounts {TOKEN_VOLUME}"
        ));
    }
    Ok(())
}

/// The bearer token of an `Authorization` header.
pub fn bearer(header: Option<&http::HeaderValue>) -> Result<&str, Refusal> {
    header
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| unauthorized("no bearer token (Authorization: Bearer <projected token>)"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn review(v: serde_json::Value) -> TokenReviewStatus {
        serde_json::from_value(v).unwrap()
    }

    fn good() -> serde_json::Value {
        json!({
            "authenticated": true,
            "audiences": ["pgwarden.io/sidecar"],
            "user": {
                "username": "system:serviceaccount:ci:runner",
                "uid": "sa-uid",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:ci", "system:authenticated"],
                "extra": {
                    "authentication.kubernetes.io/pod-name": ["agent-1"],
                    "authentication.kubernetes.io/pod-uid": ["uid-1"],
                },
            },
        })
    }

    fn pod(v: serde_json::Value) -> Pod {
        let mut p = json!({
            "metadata": {"name": "agent-1", "namespace": "ci", "uid": "uid-1",
                "annotations": {"pgwarden.io/injected": "true"}},
            "spec": {"serviceAccountName": "runner", "containers": [{"name": "app"}],
                "initContainers": [{"name": "pgwarden", "restartPolicy": "Always",
                    "volumeMounts": [{"name": "pgwarden-sidecar-token", "mountPath": "/t"}]}],
                "volumes": [{"name": "pgwarden-sidecar-token", "projected": {"sources": [
                    {"serviceAccountToken": {"audience": "pgwarden.io/sidecar", "path": "token"}}]}}]},
        });
        for (k, v) in v.as_object().unwrap() {
            for (k2, v2) in v.as_object().unwrap() {
                p[k][k2] = v2.clone();
            }
        }
        serde_json::from_value(p).unwrap()
    }

    #[test]
    fn a_sidecar_token_bound_to_its_injected_pod_is_accepted() {
        let token = check_review(Some(&review(good()))).unwrap();
        assert_eq!(token.pod.namespace, "ci");
        assert_eq!(token.pod.name, "agent-1");
        assert_eq!(token.service_account, "runner");
        assert_eq!(check_pod(&token, Some(&pod(json!({})))), Ok(()));
    }

    #[test]
    fn reviews_that_are_refused() {
        let mut unauth = good();
        unauth["authenticated"] = json!(false);
        unauth["error"] = json!("token has expired");
        let mut other_audience = good();
        other_audience["audiences"] = json!(["pgwarden"]);
        let mut no_audiences = good();
        no_audiences["audiences"] = json!(null);
        let mut user = good();
        user["user"]["username"] = json!("alice");
        let mut unbound = good();
        unbound["user"]["extra"] = json!({});
        let mut no_uid = good();
        no_uid["user"]["extra"]["authentication.kubernetes.io/pod-uid"] = json!([]);
        for (case, status, want) in [
            (
                "expired",
                unauth,
                "token not authenticated: token has expired",
            ),
            (
                "audience pgwarden",
                other_audience,
                "not for audience pgwarden.io/sidecar",
            ),
            ("no audiences", no_audiences, "not for audience"),
            ("a user", user, "\"alice\" is not a service account"),
            ("not bound", unbound, "is not bound to a pod"),
            ("no pod uid", no_uid, "is not bound to a pod"),
        ] {
            let err = check_review(Some(&review(status))).unwrap_err();
            assert!(err.reason.contains(want), "{case}: {err:?}");
            assert!([401, 403].contains(&err.status), "{case}");
        }
        assert_eq!(check_review(None).unwrap_err().status, 401);
    }

    #[test]
    fn pods_that_are_refused() {
        let token = check_review(Some(&review(good()))).unwrap();
        for (case, p, want) in [
            ("deleted", None, "pod ci/agent-1 does not exist"),
            (
                "recreated",
                Some(pod(json!({"metadata": {"uid": "uid-2"}}))),
                "uid differs",
            ),
            (
                "not injected",
                Some(pod(json!({"metadata": {"annotations": {"other": "x"}}}))),
                "not injected by pgwarden",
            ),
            (
                "another service account",
                Some(pod(json!({"spec": {"serviceAccountName": "admin"}}))),
                "service account runner is not pod ci/agent-1's (admin)",
            ),
            (
                "the token mounted into an app container",
                Some(pod(
                    json!({"spec": {"containers": [{"name": "app", "volumeMounts": [
                    {"name": "pgwarden-sidecar-token", "mountPath": "/t"}]}]}}),
                )),
                "container app mounts pgwarden-sidecar-token",
            ),
            (
                "no sidecar (annotation set by hand)",
                Some(pod(json!({"spec": {"initContainers": []}}))),
                "no native sidecar pgwarden",
            ),
            (
                "a second sidecar-audience token",
                Some(pod(json!({"spec": {"volumes": [
                    {"name": "pgwarden-sidecar-token", "projected": {"sources": [
                        {"serviceAccountToken": {"audience": "pgwarden.io/sidecar", "path": "token"}}]}},
                    {"name": "mine", "projected": {"sources": [
                        {"serviceAccountToken": {"audience": "pgwarden.io/sidecar", "path": "token"}}]}}]}}))),
                "exactly the volume",
            ),
            (
                "hostNetwork",
                Some(pod(json!({"spec": {"hostNetwork": true}}))),
                "hostNetwork",
            ),
            (
                "an ephemeral container targeting the sidecar",
                Some(pod(json!({"spec": {"ephemeralContainers": [
                    {"name": "debug", "targetContainerName": "pgwarden"}]}}))),
                "ephemeral container debug",
            ),
            (
                "terminating",
                Some(pod(
                    json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}),
                )),
                "being deleted",
            ),
        ] {
            let err = check_pod(&token, p.as_ref()).unwrap_err();
            assert_eq!(err.status, 403, "{case}");
            assert!(err.reason.contains(want), "{case}: {err:?}");
        }
    }

    #[test]
    fn the_bearer_header() {
        let h = |s: &str| http::HeaderValue::from_str(s).unwrap();
        assert_eq!(bearer(Some(&h("Bearer abc"))), Ok("abc"));
        assert_eq!(bearer(None).unwrap_err().status, 401);
        assert_eq!(bearer(Some(&h("Basic abc"))).unwrap_err().status, 401);
        assert_eq!(bearer(Some(&h("Bearer "))).unwrap_err().status, 401);
    }
}
