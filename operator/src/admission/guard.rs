//! The pod guard (validating), sans-IO: in an opted-in or injected pod,
//! nothing but the sidecar may reach what fetches the database credential
//! (the sidecar-audience token) or the gateway's loopback from outside the
//! pod. Each refusal says what to change.

use std::collections::BTreeMap;

use pgwarden_api::{INJECTED_ANNOTATION, SIDECAR_AUDIENCE};
use serde_json::Value;

use super::inject::{
    opt_in, sidecar_args, InjectSettings, CA_ANNOTATION, SIDECAR_NAME, TOKEN_VOLUME,
};

#[cfg(test)]
mod tests;

/// What the guard compares a pod with.
#[derive(Debug, Clone)]
pub struct GuardSettings {
    /// The sidecar injection builds: an injected `pgwarden` container must
    /// still be it (image, no command, same args).
    pub inject: InjectSettings,
    /// The operator's namespace and the Secret holding its CA key.
    pub operator_namespace: String,
    pub tls_secret: String,
}

/// The admission request as far as the guard cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change<'a> {
    Create,
    /// An update of the pod or of a subresource (`ephemeralcontainers`).
    Update {
        old: &'a Value,
        subresource: Option<&'a str>,
    },
}

/// `Ok` admits; `Err` carries the message the user sees.
pub fn guard(
    pod: &Value,
    namespace: &str,
    ns_labels: &BTreeMap<String, String>,
    change: Change<'_>,
    settings: &GuardSettings,
) -> Result<(), String> {
    let old = match change {
        Change::Update { old, .. } => Some(old),
        Change::Create => None,
    };
    let in_scope = |p: &Value| {
        matches!(opt_in(p, ns_labels), Ok(Ok(_)) | Err(_))
            || p["metadata"]["annotations"][INJECTED_ANNOTATION].is_string()
    };
    if !in_scope(pod) && !old.is_some_and(in_scope) {
        return Ok(());
    }
    let spec = &pod["spec"];
    if spec["hostNetwork"] == Value::Bool(true) {
        return Err("spec.hostNetwork: true puts the pod on the node's network, where every process on the node reaches pgwarden's loopback port; remove hostNetwork, or opt the pod out with the label pgwarden.io/inject: \"false\"".into());
    }
    if spec["shareProcessNamespace"] == Value::Bool(true) {
        return Err("spec.shareProcessNamespace: true lets every container read the sidecar's memory and files (its credential); remove shareProcessNamespace".into());
    }
    check_volumes(spec, namespace, settings)?;
    check_mounts(spec)?;
    check_sidecar(pod, old, settings)?;
    if let Change::Update { old, subresource } = change {
        if pod["metadata"]["annotations"][CA_ANNOTATION]
            != old["metadata"]["annotations"][CA_ANNOTATION]
            && old["metadata"]["annotations"][CA_ANNOTATION].is_string()
        {
            return Err(format!(
                "annotation {CA_ANNOTATION} is the CA the sidecar trusts for the operator and cannot be changed; leave it as injection set it"
            ));
        }
        if subresource == Some("ephemeralcontainers") {
            check_ephemeral(spec, &old["spec"])?;
        }
    }
    Ok(())
}

fn list(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

/// Whether a volume projects a token for the sidecar's audience.
fn has_sidecar_token(volume: &Value) -> bool {
    list(&volume["projected"]["sources"])
        .any(|s| s["serviceAccountToken"]["audience"] == SIDECAR_AUDIENCE)
}

fn check_volumes(spec: &Value, namespace: &str, settings: &GuardSettings) -> Result<(), String> {
    for v in list(&spec["volumes"]) {
        let name = v["name"].as_str().unwrap_or_default();
        if name != TOKEN_VOLUME && has_sidecar_token(v) {
            return Err(format!(
                "volume {name:?} projects a service-account token for audience {SIDECAR_AUDIENCE}, which only pgwarden's sidecar may hold (it fetches the database credential); use another audience"
            ));
        }
        if namespace == settings.operator_namespace {
            let secret = &settings.tls_secret;
            let uses = v["secret"]["secretName"] == secret.as_str()
                || list(&v["projected"]["sources"]).any(|s| s["secret"]["name"] == secret.as_str());
            if uses {
                return Err(format!(
                    "volume {name:?} mounts Secret {secret}, the operator's CA and serving key; remove the volume"
                ));
            }
        }
    }
    Ok(())
}

/// No container but the sidecar mounts its token volume.
fn check_mounts(spec: &Value) -> Result<(), String> {
    for (kind, field) in [
        ("container", "containers"),
        ("init container", "initContainers"),
        ("ephemeral container", "ephemeralContainers"),
    ] {
        for c in list(&spec[field]) {
            let name = c["name"].as_str().unwrap_or_default();
            if field == "initContainers" && name == SIDECAR_NAME {
                continue;
            }
            if list(&c["volumeMounts"]).any(|m| m["name"] == TOKEN_VOLUME) {
                return Err(format!(
                    "{kind} {name:?} mounts volume {TOKEN_VOLUME}, pgwarden's sidecar token (it fetches the database credential); remove that volumeMount — apps reach the database through PGHOST/PGPORT"
                ));
            }
        }
    }
    Ok(())
}

/// A `pgwarden` container is the sidecar injection built, nothing else: the
/// token volume goes to whatever has that name. On update it must be as it
/// was (a pod's images are mutable; the sidecar injected by an older
/// operator version stays valid).
fn check_sidecar(pod: &Value, old: Option<&Value>, settings: &GuardSettings) -> Result<(), String> {
    let spec = &pod["spec"];
    for field in ["containers", "ephemeralContainers"] {
        if list(&spec[field]).any(|c| c["name"] == SIDECAR_NAME) {
            return Err(format!(
                "container name {SIDECAR_NAME:?} is reserved for pgwarden's sidecar; rename the container"
            ));
        }
    }
    let Some(sidecar) = list(&spec["initContainers"]).find(|c| c["name"] == SIDECAR_NAME) else {
        return Ok(());
    };
    let want = &settings.inject;
    let same = match old
        .and_then(|o| list(&o["spec"]["initContainers"]).find(|c| c["name"] == SIDECAR_NAME))
    {
        Some(before) => ["image", "command", "args", "restartPolicy", "volumeMounts"]
            .iter()
            .all(|f| sidecar[f] == before[f]),
        None => {
            let args: Vec<&str> = list(&sidecar["args"]).filter_map(Value::as_str).collect();
            sidecar["image"] == want.image.as_str()
                && list(&sidecar["command"]).next().is_none()
                && args == sidecar_args(want)
                && sidecar["restartPolicy"] == "Always"
        }
    };
    if !same {
        return Err(format!(
            "init container {SIDECAR_NAME:?} differs from the sidecar pgwarden injects (image {}, its arguments); remove it and let injection add it",
            want.image
        ));
    }
    Ok(())
}

/// Ephemeral containers added by this update: debugging containers share the
/// pod's network (which is the pod's to use) but must not mount volumes or
/// join the sidecar's process namespace.
fn check_ephemeral(spec: &Value, old: &Value) -> Result<(), String> {
    let before: Vec<&Value> = list(&old["ephemeralContainers"]).collect();
    for c in list(&spec["ephemeralContainers"]).filter(|c| !before.contains(c)) {
        let name = c["name"].as_str().unwrap_or_default();
        if c["targetContainerName"] == SIDECAR_NAME {
            return Err(format!(
                "ephemeral container {name:?} targets {SIDECAR_NAME:?}, which would share the sidecar's process namespace (its memory holds the credential); target an app container instead (kubectl debug --target=APP)"
            ));
        }
        if list(&c["volumeMounts"]).next().is_some() {
            return Err(format!(
                "ephemeral container {name:?} mounts volumes, which is not allowed in a pod pgwarden guards; debug without volumeMounts"
            ));
        }
    }
    Ok(())
}
