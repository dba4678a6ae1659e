//! Admission webhooks: the [`AdmissionPlugin`] that reads Mutating/Validating
//! WebhookConfigurations from storage (at every request, so a configuration works
//! from the next write on) and calls the matching webhooks over HTTPS with an
//! AdmissionReview v1, as the real server's `MutatingAdmissionWebhook` and
//! `ValidatingAdmissionWebhook` plugins do:
//!
//! - matching: `rules` (operations, apiGroups, apiVersions, resources incl.
//!   `pods/status`, `pods/*`, `*/status`, `*/*`; scope), `namespaceSelector` (the
//!   namespace's labels; a Namespace's own), `objectSelector` (object or old object);
//! - transport: `clientConfig.url`, or `clientConfig.service` resolved through the
//!   server's `service_endpoints` map (no cluster DNS here), TLS verified against
//!   `caBundle` with the name the real server uses (`NAME.NAMESPACE.svc`);
//! - `timeoutSeconds` (default 10), `failurePolicy` (default Fail), `sideEffects`
//!   (dry-run refused unless None/NoneOnDryRun), JSON Patch responses, and one
//!   reinvocation round for `reinvocationPolicy: IfNeeded`;
//! - configurations in name order, webhooks in list order (validating ones run one
//!   after another here; the real server runs them in parallel, which only changes
//!   which denial is reported when several deny).
//!
//! Not modelled: `matchConditions` (CEL), `matchPolicy: Equivalent` across versions
//! (each type has one version here), DELETE/CONNECT admission.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{json, Value};

use crate::admission::{AdmissionAttributes, AdmissionPlugin, BoxFuture};
use crate::handlers::State;
use crate::status::{ApiError, ApiResult};

const MUTATING: &str = "admissionregistration.k8s.io/mutatingwebhookconfigurations";
const VALIDATING: &str = "admissionregistration.k8s.io/validatingwebhookconfigurations";
/// A webhook's response larger than this is a failure (the real limit is similar).
const MAX_RESPONSE: usize = 3 * 1024 * 1024;

/// Where `NAME.NAMESPACE.svc` webhooks are reached (tests fill it).
pub type ServiceEndpoints = Arc<Mutex<HashMap<String, SocketAddr>>>;

/// The webhook admission plugin.
pub struct Webhooks {
    pub endpoints: ServiceEndpoints,
}

/// One webhook of a configuration, with what matching needs.
#[derive(Debug, Clone)]
struct Hook {
    name: String,
    spec: Value,
}

/// Webhooks of `key`'s configurations: configurations by name, webhooks in order.
fn hooks(state: &State, key: &str) -> Vec<Hook> {
    let mut cfgs = state.store().list(key, None);
    cfgs.sort_by(|a, b| {
        a["metadata"]["name"]
            .as_str()
            .cmp(&b["metadata"]["name"].as_str())
    });
    cfgs.iter()
        .flat_map(|c| c["webhooks"].as_array().cloned().unwrap_or_default())
        .map(|w| Hook {
            name: w["name"].as_str().unwrap_or_default().to_string(),
            spec: w,
        })
        .collect()
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn any_or(list: &[&str], want: &str) -> bool {
    list.iter().any(|x| *x == "*" || *x == want)
}

/// Does one RuleWithOperations match the request?
fn rule_matches(rule: &Value, a: &AdmissionAttributes, namespaced: bool) -> bool {
    if !any_or(&strs(&rule["operations"]), a.operation)
        || !any_or(&strs(&rule["apiGroups"]), &a.group)
        || !any_or(&strs(&rule["apiVersions"]), &a.version)
    {
        return false;
    }
    let resource_ok = strs(&rule["resources"]).iter().any(|r| {
        let (res, sub) = r.split_once('/').unwrap_or((r, ""));
        // As the real matcher: `pods` is the main resource only, `pods/*` it and
        // every subresource, `*/status` every status, `*/*` everything.
        (res == "*" || res == a.resource) && (sub == "*" || sub == a.subresource)
    });
    if !resource_ok {
        return false;
    }
    match rule["scope"].as_str().unwrap_or("*") {
        "Cluster" => !namespaced,
        "Namespaced" => namespaced,
        _ => true,
    }
}

/// A structured `metav1.LabelSelector` against a label map (absent selector: all).
pub fn selector_matches(sel: &Value, labels: &Value) -> bool {
    if !sel.is_object() {
        return true;
    }
    let get = |k: &str| labels.get(k).and_then(Value::as_str);
    if let Some(m) = sel["matchLabels"].as_object() {
        if !m.iter().all(|(k, v)| get(k) == v.as_str()) {
            return false;
        }
    }
    sel["matchExpressions"]
        .as_array()
        .map(|es| {
            es.iter().all(|e| {
                let key = e["key"].as_str().unwrap_or_default();
                let values = strs(&e["values"]);
                match e["operator"].as_str().unwrap_or_default() {
                    "In" => get(key).is_some_and(|v| values.contains(&v)),
                    "NotIn" => get(key).is_none_or(|v| !values.contains(&v)),
                    "Exists" => get(key).is_some(),
                    "DoesNotExist" => get(key).is_none(),
                    // An unknown operator matches nothing (fail closed).
                    _ => false,
                }
            })
        })
        .unwrap_or(true)
}

fn matches(state: &State, h: &Hook, a: &AdmissionAttributes, object: &Value) -> bool {
    let namespaced = !a.namespace.is_empty();
    let is_namespace = a.group.is_empty() && a.resource == "namespaces";
    let rules = h.spec["rules"].as_array().cloned().unwrap_or_default();
    if !rules
        .iter()
        .any(|r| rule_matches(r, a, namespaced && !is_namespace))
    {
        return false;
    }
    let ns_sel = &h.spec["namespaceSelector"];
    if is_namespace {
        if !selector_matches(ns_sel, &object["metadata"]["labels"]) {
            return false;
        }
    } else if namespaced {
        let labels = state
            .store()
            .get("/namespaces", "", &a.namespace)
            .map(|n| n["metadata"]["labels"].clone())
            .unwrap_or(Value::Null);
        if !selector_matches(ns_sel, &labels) {
            return false;
        }
    }
    let obj_sel = &h.spec["objectSelector"];
    selector_matches(obj_sel, &object["metadata"]["labels"])
        || a.old_object
            .as_ref()
            .is_some_and(|o| selector_matches(obj_sel, &o["metadata"]["labels"]))
}

fn review_request(a: &AdmissionAttributes, object: &Value, uid: &str) -> Value {
    let kind = json!({"group": a.group, "version": a.version, "kind": a.kind});
    let resource = json!({"group": a.group, "version": a.version, "resource": a.resource});
    let mut req = json!({
        "uid": uid,
        "kind": kind, "resource": resource,
        "requestKind": kind, "requestResource": resource,
        "name": a.name,
        "operation": a.operation,
        "userInfo": a.user.to_json(),
        "object": object,
        "oldObject": a.old_object.clone().unwrap_or(Value::Null),
        "dryRun": a.dry_run,
        "options": {"kind": if a.operation == "CREATE" { "CreateOptions" } else { "UpdateOptions" },
                    "apiVersion": "meta.k8s.io/v1"},
    });
    if !a.subresource.is_empty() {
        req["subResource"] = json!(a.subresource);
        req["requestSubResource"] = json!(a.subresource);
    }
    if !a.namespace.is_empty() {
        req["namespace"] = json!(a.namespace);
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": req})
}

/// Where and how to reach a webhook: address, TLS name, path.
fn endpoint(
    endpoints: &ServiceEndpoints,
    cc: &Value,
) -> Result<(SocketAddr, String, String, String), String> {
    if let Some(url) = cc["url"].as_str() {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| format!("{url:?}: webhook URLs must use https"))?;
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        // `host`, `host:port`, `[v6]`, `[v6]:port`
        let (host, port) = match hostport.strip_prefix('[') {
            Some(v6) => {
                let (h, rest) = v6
                    .split_once(']')
                    .ok_or_else(|| format!("bad host in {url:?}"))?;
                match rest.strip_prefix(':') {
                    Some(p) => (
                        h,
                        p.parse::<u16>()
                            .map_err(|_| format!("bad port in {url:?}"))?,
                    ),
                    None if rest.is_empty() => (h, 443),
                    None => return Err(format!("bad host in {url:?}")),
                }
            }
            None => match hostport.split_once(':') {
                Some((h, p)) => (
                    h,
                    p.parse::<u16>()
                        .map_err(|_| format!("bad port in {url:?}"))?,
                ),
                None => (hostport, 443),
            },
        };
        use std::net::ToSocketAddrs;
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("dial tcp: lookup {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("dial tcp: lookup {host}: no such host"))?;
        return Ok((addr, host.to_string(), path.to_string(), url.to_string()));
    }
    let svc = &cc["service"];
    let (name, ns) = (
        svc["name"].as_str().unwrap_or_default(),
        svc["namespace"].as_str().unwrap_or_default(),
    );
    let port = svc["port"].as_u64().unwrap_or(443);
    let path = svc["path"].as_str().unwrap_or("/").to_string();
    let host = format!("{name}.{ns}.svc");
    let url = format!("https://{host}:{port}{path}");
    let addr = endpoints
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&host)
        .copied()
        .ok_or_else(|| format!("service \"{name}\" not found"))?;
    Ok((addr, host, path, url))
}

/// How Go's net package words the common dial errors (what kubectl users see).
fn go_io_error(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ConnectionRefused => "connection refused".into(),
        ErrorKind::ConnectionReset => "connection reset by peer".into(),
        ErrorKind::TimedOut => "i/o timeout".into(),
        _ => e.to_string(),
    }
}

fn tls_config(ca_bundle: &str) -> Result<rustls::ClientConfig, String> {
    use base64::Engine;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let pem = base64::engine::general_purpose::STANDARD
        .decode(ca_bundle.trim())
        .map_err(|_| "caBundle is not base64".to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| format!("caBundle: {e}"))?;
        roots.add(c).map_err(|e| format!("caBundle: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// POSTs the review; the AdmissionReview response, or why the call failed.
async fn call(endpoints: &ServiceEndpoints, hook: &Hook, review: &Value) -> Result<Value, String> {
    let cc = &hook.spec["clientConfig"];
    let (addr, host, path, url) = endpoint(endpoints, cc)?;
    let timeout = hook.spec["timeoutSeconds"]
        .as_u64()
        .unwrap_or(10)
        .clamp(1, 30);
    let url_t = format!("{url}?timeout={timeout}s");
    let fut = async {
        let cfg = tls_config(cc["caBundle"].as_str().unwrap_or_default())?;
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("dial tcp {addr}: connect: {}", go_io_error(&e)))?;
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|e| format!("bad server name {host:?}: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls: failed to verify certificate: {e}"))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = http::Request::post(format!("{path}?timeout={timeout}s"))
            .header(http::header::HOST, host.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(review.to_string())))
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let code = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if code != 200 {
            return Err(format!("the server responded with status code {code}"));
        }
        serde_json::from_slice::<Value>(&body).map_err(|e| format!("decoding the response: {e}"))
    };
    let r = match tokio::time::timeout(Duration::from_secs(timeout), fut).await {
        Ok(r) => r,
        Err(_) => Err("context deadline exceeded".into()),
    };
    r.map_err(|e| format!("failed to call webhook: Post \"{url_t}\": {e}"))
}

/// A webhook's refusal as the real server phrases it.
fn denied(hook: &Hook, status: &Value) -> ApiError {
    // As `webhookerrors.ToStatusErr`: a refusal is never below 400; the message,
    // else the reason, follows the webhook's name.
    let code = status["code"]
        .as_u64()
        .and_then(|c| u16::try_from(c).ok())
        .filter(|c| (400..600).contains(c))
        .unwrap_or(400);
    let msg = status["message"].as_str().unwrap_or_default();
    let why = status["reason"].as_str().unwrap_or_default();
    let denied_by = format!("admission webhook {:?} denied the request", hook.name);
    let message = match (msg.is_empty(), why.is_empty()) {
        (false, _) => format!("{denied_by}: {msg}"),
        (true, false) => format!("{denied_by}: {why}"),
        (true, true) => format!("{denied_by} without explanation"),
    };
    // The webhook's reason is kept when it is one clients know.
    let reason = match status["reason"].as_str().unwrap_or_default() {
        "Forbidden" => "Forbidden",
        "Invalid" => "Invalid",
        "BadRequest" => "BadRequest",
        "Conflict" => "Conflict",
        "NotFound" => "NotFound",
        _ => "",
    };
    ApiError::new(code, reason, message)
}

enum Outcome {
    /// Allowed, with the object possibly changed.
    Allowed { changed: bool },
    /// Failed to call, failurePolicy Ignore.
    Ignored,
}

impl Webhooks {
    async fn run(
        &self,
        hook: &Hook,
        a: &AdmissionAttributes,
        object: &mut Value,
        mutating: bool,
    ) -> ApiResult<Outcome> {
        if a.dry_run
            && !matches!(
                hook.spec["sideEffects"].as_str().unwrap_or_default(),
                "None" | "NoneOnDryRun"
            )
        {
            return Err(ApiError::bad_request(format!(
                "admission webhook {:?} does not support dry run",
                hook.name
            )));
        }
        let uid = crate::handlers::new_uid();
        let review = review_request(a, object, &uid);
        let ignore = hook.spec["failurePolicy"].as_str() == Some("Ignore");
        let fail = |why: String| -> ApiResult<Outcome> {
            if ignore {
                Ok(Outcome::Ignored)
            } else {
                Err(ApiError::new(
                    500,
                    "InternalError",
                    format!(
                        "Internal error occurred: failed calling webhook {:?}: {why}",
                        hook.name
                    ),
                ))
            }
        };
        let resp = match call(&self.endpoints, hook, &review).await {
            Ok(r) => r,
            Err(e) => return fail(e),
        };
        let r = &resp["response"];
        if r["uid"].as_str() != Some(uid.as_str()) {
            return fail(format!(
                "expected response.uid={uid:?}, got {:?}",
                r["uid"].as_str().unwrap_or_default()
            ));
        }
        if r["allowed"].as_bool() != Some(true) {
            return Err(denied(hook, &r["status"]));
        }
        let Some(p) = r["patch"].as_str().filter(|p| !p.is_empty()) else {
            return Ok(Outcome::Allowed { changed: false });
        };
        if !mutating {
            return fail("validating webhook may not return a patch".into());
        }
        if r["patchType"].as_str() != Some("JSONPatch") {
            return fail(format!(
                "unsupported patch type {:?}",
                r["patchType"].as_str().unwrap_or_default()
            ));
        }
        use base64::Engine;
        let patch: Value = match base64::engine::general_purpose::STANDARD
            .decode(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            Some(p) => p,
            None => return fail("the patch is not base64-encoded JSON".into()),
        };
        let mut patched = object.clone();
        if let Err(e) = crate::patch::json_patch(&mut patched, &patch) {
            return fail(format!("applying the patch: {}", e.message));
        }
        let changed = patched != *object;
        *object = patched;
        Ok(Outcome::Allowed { changed })
    }
}

impl AdmissionPlugin for Webhooks {
    fn mutate<'a>(
        &'a self,
        state: &'a State,
        a: &'a AdmissionAttributes,
        object: &'a mut Value,
    ) -> BoxFuture<'a, ApiResult<()>> {
        Box::pin(async move {
            let hooks = hooks(state, MUTATING);
            // Index of the last webhook that changed the object, and which
            // IfNeeded webhooks ran before that change.
            let mut ran: Vec<usize> = Vec::new();
            let mut last_change: Option<usize> = None;
            for (i, h) in hooks.iter().enumerate() {
                if !matches(state, h, a, object) {
                    continue;
                }
                if let Outcome::Allowed { changed } = self.run(h, a, object, true).await? {
                    ran.push(i);
                    if changed {
                        last_change = Some(i);
                    }
                }
            }
            // One reinvocation round: IfNeeded webhooks that ran before a later
            // webhook changed the object see it again.
            if let Some(last) = last_change {
                for &i in ran.iter().filter(|i| **i < last) {
                    let h = &hooks[i];
                    if h.spec["reinvocationPolicy"].as_str() == Some("IfNeeded")
                        && matches(state, h, a, object)
                    {
                        self.run(h, a, object, true).await?;
                    }
                }
            }
            Ok(())
        })
    }

    fn validate<'a>(
        &'a self,
        state: &'a State,
        a: &'a AdmissionAttributes,
        object: &'a Value,
    ) -> BoxFuture<'a, ApiResult<()>> {
        Box::pin(async move {
            for h in hooks(state, VALIDATING) {
                if matches(state, &h, a, object) {
                    let mut o = object.clone();
                    self.run(&h, a, &mut o, false).await?;
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::UserInfo;

    fn attrs(op: &'static str, resource: &str, sub: &str) -> AdmissionAttributes {
        AdmissionAttributes {
            operation: op,
            group: "".into(),
            version: "v1".into(),
            kind: "Pod".into(),
            resource: resource.into(),
            subresource: sub.into(),
            namespace: "ns".into(),
            name: "p".into(),
            user: UserInfo::anonymous(),
            old_object: None,
            dry_run: false,
        }
    }

    #[test]
    fn rules_match_resources_subresources_and_scope() {
        let r = |res: &str, scope: &str| {
            json!({"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                   "resources": [res], "scope": scope})
        };
        let pod = attrs("CREATE", "pods", "");
        let status = attrs("CREATE", "pods", "status");
        assert!(rule_matches(&r("pods", "*"), &pod, true));
        assert!(!rule_matches(&r("pods", "*"), &status, true));
        assert!(rule_matches(&r("pods/status", "*"), &status, true));
        assert!(!rule_matches(&r("pods/status", "*"), &pod, true));
        assert!(rule_matches(&r("pods/*", "*"), &status, true));
        assert!(rule_matches(&r("*/status", "*"), &status, true));
        assert!(!rule_matches(&r("*", "*"), &status, true));
        assert!(rule_matches(&r("*/*", "*"), &pod, true));
        assert!(!rule_matches(&r("pods", "Cluster"), &pod, true));
        assert!(!rule_matches(
            &r("pods", "*"),
            &attrs("UPDATE", "pods", ""),
            true
        ));
    }

    #[test]
    fn webhook_urls() {
        let eps: ServiceEndpoints = Arc::default();
        let ep = |u: &str| endpoint(&eps, &json!({"url": u}));
        let (addr, host, path, _) = ep("https://127.0.0.1:8443/mutate").unwrap();
        assert_eq!(
            (addr.port(), host.as_str(), path.as_str()),
            (8443, "127.0.0.1", "/mutate")
        );
        let (addr, host, path, _) = ep("https://[::1]").unwrap();
        assert_eq!(
            (addr.port(), host.as_str(), path.as_str()),
            (443, "::1", "/")
        );
        assert_eq!(ep("https://[::1]:9/x").unwrap().0.port(), 9);
        for bad in [
            "http://127.0.0.1/",
            "https://[::1",
            "https://h:port/",
            "https://[::1]x/",
        ] {
            assert!(ep(bad).is_err(), "{bad}");
        }
        let svc = json!({"service": {"name": "w", "namespace": "n", "path": "/v"}});
        assert!(endpoint(&eps, &svc)
            .unwrap_err()
            .contains("service \"w\" not found"));
        eps.lock()
            .unwrap()
            .insert("w.n.svc".into(), "127.0.0.1:1".parse().unwrap());
        let (_, host, path, url) = endpoint(&eps, &svc).unwrap();
        assert_eq!(
            (host.as_str(), path.as_str(), url.as_str()),
            ("w.n.svc", "/v", "https://w.n.svc:443/v")
        );
    }

    #[test]
    fn label_selectors() {
        let labels = json!({"env": "ci", "team": "db"});
        assert!(selector_matches(&Value::Null, &labels));
        assert!(selector_matches(&json!({}), &Value::Null));
        assert!(selector_matches(
            &json!({"matchLabels": {"env": "ci"}}),
            &labels
        ));
        assert!(!selector_matches(
            &json!({"matchLabels": {"env": "prod"}}),
            &labels
        ));
        let e = |op: &str, vals: Value| json!({"matchExpressions": [{"key": "env", "operator": op, "values": vals}]});
        assert!(selector_matches(&e("In", json!(["ci", "x"])), &labels));
        assert!(!selector_matches(&e("NotIn", json!(["ci"])), &labels));
        assert!(selector_matches(&e("Exists", json!([])), &labels));
        assert!(!selector_matches(&e("DoesNotExist", json!([])), &labels));
        assert!(!selector_matches(&e("Bogus", json!([])), &labels));
    }
}
