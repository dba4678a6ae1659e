//! Admission webhooks of the test API server (issue 15 item 7), with the real
//! `kubectl` as the client and a small HTTPS webhook server in the test (its
//! certificate from the API server's CA, which is the configurations' caBundle):
//! a mutating webhook's JSON Patch, a validating refusal as kubectl prints it,
//! failurePolicy Fail vs Ignore for a webhook that is down, namespaceSelector and
//! objectSelector, sideEffects on dry run, reinvocation, the AdmissionReview the
//! webhook receives, and the same round trip from the kube-rs client.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Output;
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use pgwarden_testapi::TestApiServer;
use serde_json::{json, Value};

fn text(o: &Output) -> String {
    pgwarden_testapi::output_text(o)
}

fn run(api: &TestApiServer, args: &[&str], stdin: Option<&str>) -> Output {
    api.kubectl_stdin("admin", args, stdin)
}

fn apply(api: &TestApiServer, obj: &Value) {
    let o = run(api, &["apply", "-f", "-"], Some(&obj.to_string()));
    assert!(o.status.success(), "{}", text(&o));
}

fn create(api: &TestApiServer, obj: &Value, extra: &[&str]) -> Output {
    let mut args = vec!["create", "-f", "-", "-o", "json"];
    args.extend_from_slice(extra);
    run(api, &args, Some(&obj.to_string()))
}

fn configmap(name: &str, ns: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": name, "namespace": ns, "labels": labels}, "data": {"k": "v"}})
}

/// The test's webhook server: `/label` adds `injected=true`, `/deny` refuses
/// objects labelled `forbidden`, `/echo-labels` records the labels it saw in an
/// annotation. Every AdmissionReview it receives is kept.
struct Webhook {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(String, Value)>>>,
    rt: tokio::runtime::Runtime,
}

fn patch_response(uid: &Value, patch: Value) -> Value {
    let p = base64::engine::general_purpose::STANDARD.encode(patch.to_string());
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
           "response": {"uid": uid, "allowed": true, "patchType": "JSONPatch", "patch": p}})
}

fn respond(path: &str, review: &Value) -> Value {
    let req = &review["request"];
    let uid = &req["uid"];
    let labels = &req["object"]["metadata"]["labels"];
    match path {
        "/label" => {
            let patch = if labels.is_object() {
                json!([{"op": "add", "path": "/metadata/labels/injected", "value": "true"}])
            } else {
                json!([{"op": "add", "path": "/metadata/labels", "value": {"injected": "true"}}])
            };
            patch_response(uid, patch)
        }
        "/echo-labels" => {
            let mut keys: Vec<&str> = labels
                .as_object()
                .map(|m| m.keys().map(String::as_str).collect())
                .unwrap_or_default();
            keys.sort();
            let op = if req["object"]["metadata"]["annotations"].is_object() {
                json!({"op": "add", "path": "/metadata/annotations/seen-labels", "value": keys.join(",")})
            } else {
                json!({"op": "add", "path": "/metadata/annotations", "value": {"seen-labels": keys.join(",")}})
            };
            patch_response(uid, json!([op]))
        }
        "/deny" if labels.get("forbidden").is_some() => json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "response": {"uid": uid, "allowed": false,
                         "status": {"code": 403, "message": "objects labelled forbidden are refused"}}}),
        _ => json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                    "response": {"uid": uid, "allowed": true}}),
    }
}

impl Webhook {
    fn start(api: &TestApiServer) -> Webhook {
        let (cert, key) = api
            .issue_serving_cert(&["webhook.hooks.svc", "127.0.0.1"])
            .expect("issue webhook certificate");
        use rustls_pki_types::pem::PemObject;
        let certs = rustls_pki_types::CertificateDer::pem_slice_iter(&cert)
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(&key).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
        let seen2 = seen.clone();
        rt.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, seen) = (acceptor.clone(), seen2.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let seen = seen.clone();
                            async move {
                                let path = req.uri().path().to_string();
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let review: Value =
                                    serde_json::from_slice(&body).unwrap_or(Value::Null);
                                seen.lock().unwrap().push((path.clone(), review.clone()));
                                let out = respond(&path, &review);
                                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(
                                    out.to_string(),
                                ))))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        api.set_service_endpoint("webhook.hooks.svc", addr);
        Webhook { addr, seen, rt }
    }

    fn reviews(&self, path: &str) -> Vec<Value> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, r)| r.clone())
            .collect()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = &self.rt;
    }
}

fn ca_bundle(api: &TestApiServer) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(api.ca_cert()).unwrap())
}

/// A webhook entry for configmaps CREATE/UPDATE reached through service `webhook.hooks`.
fn hook(api: &TestApiServer, name: &str, path: &str, extra: Value) -> Value {
    let mut h = json!({
        "name": name,
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "clientConfig": {"service": {"name": "webhook", "namespace": "hooks", "path": path, "port": 443},
                         "caBundle": ca_bundle(api)},
        "rules": [{"operations": ["CREATE", "UPDATE"], "apiGroups": [""], "apiVersions": ["v1"],
                   "resources": ["configmaps"], "scope": "Namespaced"}],
    });
    if let (Some(h), Some(e)) = (h.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            h.insert(k.clone(), v.clone());
        }
    }
    h
}

fn mutating(name: &str, hooks: Vec<Value>) -> Value {
    json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
           "metadata": {"name": name}, "webhooks": hooks})
}

fn validating(name: &str, hooks: Vec<Value>) -> Value {
    json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
           "metadata": {"name": name}, "webhooks": hooks})
}

fn created(o: &Output) -> Value {
    assert!(o.status.success(), "{}", text(o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn mutating_webhook_patches_and_receives_a_full_admission_review() {
    let api = TestApiServer::start().unwrap();
    let wh = Webhook::start(&api);
    apply(
        &api,
        &mutating(
            "label",
            vec![hook(&api, "label.pgwarden.test", "/label", json!({}))],
        ),
    );

    let cm = created(&create(
        &api,
        &configmap("app", "default", json!({"a": "b"})),
        &[],
    ));
    assert_eq!(
        cm["metadata"]["labels"],
        json!({"a": "b", "injected": "true"}),
        "{cm}"
    );
    // Stored as patched, not only returned.
    let got = run(
        &api,
        &[
            "get",
            "configmap",
            "app",
            "-o",
            "jsonpath={.metadata.labels.injected}",
        ],
        None,
    );
    assert_eq!(
        String::from_utf8_lossy(&got.stdout),
        "true",
        "{}",
        text(&got)
    );

    let reviews = wh.reviews("/label");
    assert_eq!(reviews.len(), 1, "{reviews:?}");
    let r = &reviews[0];
    assert_eq!(r["apiVersion"], "admission.k8s.io/v1");
    let req = &r["request"];
    assert_eq!(req["uid"].as_str().unwrap().len(), 36);
    assert_eq!(
        req["kind"],
        json!({"group": "", "version": "v1", "kind": "ConfigMap"})
    );
    assert_eq!(
        req["resource"],
        json!({"group": "", "version": "v1", "resource": "configmaps"})
    );
    assert_eq!(req["requestKind"], req["kind"]);
    assert_eq!(
        (
            req["operation"].as_str(),
            req["namespace"].as_str(),
            req["name"].as_str()
        ),
        (Some("CREATE"), Some("default"), Some("app"))
    );
    assert_eq!(req["userInfo"]["username"], "admin");
    assert_eq!(req["dryRun"], false);
    assert_eq!(req["object"]["data"], json!({"k": "v"}));
    assert!(req["oldObject"].is_null());

    // An update carries the old object; no-label objects get the map created.
    let o = run(&api, &["label", "configmap", "app", "x=y"], None);
    assert!(o.status.success(), "{}", text(&o));
    let upd = wh.reviews("/label").pop().unwrap();
    assert_eq!(upd["request"]["operation"], "UPDATE");
    assert_eq!(upd["request"]["oldObject"]["metadata"]["labels"]["a"], "b");
    let cm = created(&create(
        &api,
        &configmap("bare", "default", Value::Null),
        &[],
    ));
    assert_eq!(cm["metadata"]["labels"], json!({"injected": "true"}));

    // Other resources do not match the rules: no call.
    let before = wh.reviews("/label").len();
    let o = run(
        &api,
        &["create", "secret", "generic", "s", "--from-literal=a=b"],
        None,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(wh.reviews("/label").len(), before);
    let _ = wh.addr;
}

#[test]
fn validating_webhook_refusal_is_what_kubectl_shows() {
    let api = TestApiServer::start().unwrap();
    let wh = Webhook::start(&api);
    apply(
        &api,
        &validating(
            "deny",
            vec![hook(&api, "deny.pgwarden.test", "/deny", json!({}))],
        ),
    );
    let o = create(
        &api,
        &configmap("bad", "default", json!({"forbidden": "yes"})),
        &[],
    );
    assert!(!o.status.success());
    let e = text(&o);
    // The webhook's status has no reason, so kubectl names none (as on a real
    // server); the code is the webhook's 403.
    assert!(
        e.contains("Error from server: error when creating \"STDIN\": admission webhook \"deny.pgwarden.test\" denied the request: objects labelled forbidden are refused"),
        "{e}"
    );
    let o = run(&api, &["get", "configmap", "bad"], None);
    assert!(text(&o).contains("NotFound"), "{}", text(&o));
    created(&create(
        &api,
        &configmap("good", "default", json!({"ok": "1"})),
        &[],
    ));
    // Both creates were sent; only the labelled one refused.
    assert_eq!(wh.reviews("/deny").len(), 2);
}

#[test]
fn a_webhook_that_is_down_fails_closed_or_is_ignored_by_policy() {
    let api = TestApiServer::start().unwrap();
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let url_hook = |name: &str, policy: &str| {
        json!({"name": name, "admissionReviewVersions": ["v1"], "sideEffects": "None",
               "failurePolicy": policy, "timeoutSeconds": 2,
               "clientConfig": {"url": format!("https://127.0.0.1:{port}/deny"), "caBundle": ca_bundle(&api)},
               "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["configmaps"]}]})
    };
    apply(
        &api,
        &validating("down", vec![url_hook("down.pgwarden.test", "Fail")]),
    );
    let o = create(&api, &configmap("a", "default", json!({})), &[]);
    assert!(!o.status.success());
    let e = text(&o);
    assert!(
        e.contains("Internal error occurred: failed calling webhook \"down.pgwarden.test\": failed to call webhook: Post \"https://127.0.0.1:")
            && e.contains("connection refused"),
        "{e}"
    );
    apply(
        &api,
        &validating("down", vec![url_hook("down.pgwarden.test", "Ignore")]),
    );
    created(&create(&api, &configmap("a", "default", json!({})), &[]));

    // A certificate the caBundle does not vouch for is a failed call too.
    let wh = Webhook::start(&api);
    let mut h = url_hook("untrusted.pgwarden.test", "Fail");
    h["clientConfig"] = json!({"url": format!("https://127.0.0.1:{}/label", wh.addr.port()),
        "caBundle": base64::engine::general_purpose::STANDARD.encode(api.issue_serving_cert(&["other"]).unwrap().0)});
    apply(&api, &validating("down", vec![h]));
    let e = text(&create(&api, &configmap("b", "default", json!({})), &[]));
    assert!(
        e.contains("failed calling webhook \"untrusted.pgwarden.test\"")
            && e.contains("certificate"),
        "{e}"
    );
    assert!(wh.reviews("/label").is_empty());
}

#[test]
fn namespace_and_object_selectors_decide_which_objects_are_sent() {
    let api = TestApiServer::start().unwrap();
    let wh = Webhook::start(&api);
    apply(
        &api,
        &mutating(
            "label",
            vec![hook(
                &api,
                "label.pgwarden.test",
                "/label",
                json!({"namespaceSelector": {"matchLabels": {"pgwarden.io/inject": "enabled"}},
                       "objectSelector": {"matchExpressions": [{"key": "skip", "operator": "DoesNotExist"}]}}),
            )],
        ),
    );
    let o = run(&api, &["create", "namespace", "ci"], None);
    assert!(o.status.success(), "{}", text(&o));
    let cm = created(&create(&api, &configmap("a", "ci", json!({})), &[]));
    assert!(cm["metadata"]["labels"].get("injected").is_none(), "{cm}");
    let o = run(
        &api,
        &["label", "namespace", "ci", "pgwarden.io/inject=enabled"],
        None,
    );
    assert!(o.status.success(), "{}", text(&o));
    let cm = created(&create(&api, &configmap("b", "ci", json!({})), &[]));
    assert_eq!(cm["metadata"]["labels"]["injected"], "true", "{cm}");
    let cm = created(&create(
        &api,
        &configmap("c", "ci", json!({"skip": "1"})),
        &[],
    ));
    assert!(cm["metadata"]["labels"].get("injected").is_none(), "{cm}");
    let cm = created(&create(&api, &configmap("d", "default", json!({})), &[]));
    assert!(cm["metadata"]["labels"].get("injected").is_none(), "{cm}");
    assert_eq!(wh.reviews("/label").len(), 1);
}

#[test]
fn dry_run_side_effects_and_reinvocation() {
    let api = TestApiServer::start().unwrap();
    let wh = Webhook::start(&api);
    // `a-echo` runs first (configurations by name) and sees no `injected` label;
    // `b-label` adds it afterwards, so `a-echo` (IfNeeded) is called once more.
    apply(
        &api,
        &mutating(
            "a-echo",
            vec![hook(
                &api,
                "echo.pgwarden.test",
                "/echo-labels",
                json!({"reinvocationPolicy": "IfNeeded"}),
            )],
        ),
    );
    apply(
        &api,
        &mutating(
            "b-label",
            vec![hook(&api, "label.pgwarden.test", "/label", json!({}))],
        ),
    );
    let cm = created(&create(
        &api,
        &configmap("a", "default", json!({"app": "x"})),
        &[],
    ));
    assert_eq!(
        cm["metadata"]["annotations"]["seen-labels"], "app,injected",
        "{cm}"
    );
    assert_eq!(wh.reviews("/echo-labels").len(), 2);

    // Dry run: webhooks with side effects are refused, side-effect-free ones run.
    let o = create(
        &api,
        &configmap("dry", "default", json!({})),
        &["--dry-run=server"],
    );
    let cm = created(&o);
    assert_eq!(cm["metadata"]["labels"]["injected"], "true");
    assert_eq!(
        wh.reviews("/label").last().unwrap()["request"]["dryRun"],
        true
    );
    apply(
        &api,
        &validating(
            "effects",
            vec![hook(
                &api,
                "effects.pgwarden.test",
                "/deny",
                json!({"sideEffects": "Some"}),
            )],
        ),
    );
    let e = text(&create(
        &api,
        &configmap("dry", "default", json!({})),
        &["--dry-run=server"],
    ));
    assert!(
        e.contains("admission webhook \"effects.pgwarden.test\" does not support dry run"),
        "{e}"
    );
    assert!(wh.reviews("/deny").is_empty());
}

#[test]
fn kube_rs_round_trip_through_webhooks() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, PostParams};

    let api = TestApiServer::start().unwrap();
    let wh = Webhook::start(&api);
    apply(
        &api,
        &mutating(
            "label",
            vec![hook(&api, "label.pgwarden.test", "/label", json!({}))],
        ),
    );
    apply(
        &api,
        &validating(
            "deny",
            vec![hook(&api, "deny.pgwarden.test", "/deny", json!({}))],
        ),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use kube::config::{KubeConfigOptions, Kubeconfig};
        let kc = Kubeconfig::read_from(api.kubeconfig()).unwrap();
        let opts = KubeConfigOptions { context: Some("alice".into()), ..Default::default() };
        let config = kube::Config::from_custom_kubeconfig(kc, &opts).await.unwrap();
        let client = kube::Client::try_from(config).unwrap();
        // alice may write configmaps in default (the bootstrap `edit` role).
        let o = run(&api, &["create", "rolebinding", "alice-edit", "--clusterrole=edit", "--user=alice"], None);
        assert!(o.status.success(), "{}", text(&o));
        let cms: Api<ConfigMap> = Api::namespaced(client, "default");
        let cm: ConfigMap = serde_json::from_value(configmap("via-kube", "default", json!({"a": "b"}))).unwrap();
        let made = cms.create(&PostParams::default(), &cm).await.unwrap();
        assert_eq!(made.metadata.labels.unwrap().get("injected").map(String::as_str), Some("true"));
        let seen = wh.reviews("/label").pop().unwrap();
        assert_eq!(seen["request"]["userInfo"]["username"], "alice");
        assert_eq!(seen["request"]["userInfo"]["groups"], json!(["dba-oncall", "system:authenticated"]));

        let bad: ConfigMap = serde_json::from_value(configmap("bad", "default", json!({"forbidden": "1"}))).unwrap();
        match cms.create(&PostParams::default(), &bad).await {
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 403, "{s:?}");
                assert_eq!(
                    s.message,
                    "admission webhook \"deny.pgwarden.test\" denied the request: objects labelled forbidden are refused"
                );
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    });
}
