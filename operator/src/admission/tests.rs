use serde_json::{json, Value};

use super::*;

/// Answers with what it was asked (to see what reaches a webhook).
struct Echo;

impl Webhook for Echo {
    fn review<'a>(&'a self, request: &'a Value) -> BoxFuture<'a, Value> {
        Box::pin(async move { json!({"allowed": true, "seen": request["operation"]}) })
    }
}

fn dispatcher() -> Dispatcher {
    Dispatcher::default().route(INJECT_PATH, Arc::new(Echo))
}

fn review() -> Value {
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
           "request": {"uid": "u-1", "operation": "CREATE"}})
}

#[tokio::test]
async fn a_review_is_answered_with_its_uid() {
    let body = serde_json::to_vec(&review()).unwrap();
    let (status, v) = dispatcher().handle(INJECT_PATH, &body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(v["kind"], "AdmissionReview");
    assert_eq!(v["response"]["uid"], "u-1");
    assert_eq!(v["response"]["seen"], "CREATE");
}

#[tokio::test]
async fn malformed_reviews_are_400_not_a_panic() {
    let d = dispatcher();
    let mut no_uid = review();
    no_uid["request"]["uid"] = json!(7);
    let mut v1beta1 = review();
    v1beta1["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let bodies: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"{".to_vec(),
        b"[]".to_vec(),
        b"\xff\xfe".to_vec(),
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
        serde_json::to_vec(&no_uid).unwrap(),
        serde_json::to_vec(&v1beta1).unwrap(),
    ];
    for b in bodies {
        let (status, v) = d.handle(INJECT_PATH, &b).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{}",
            String::from_utf8_lossy(&b)
        );
        assert!(v["error"].is_string());
    }
    let (status, _) = d
        .handle("/nope", &serde_json::to_vec(&review()).unwrap())
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[test]
fn responses() {
    assert_eq!(allow(), json!({"allowed": true}));
    let d = deny("remove hostNetwork");
    assert_eq!(d["allowed"], false);
    assert_eq!(d["status"]["message"], "remove hostNetwork");
    assert_eq!(allow_patched(&[]), allow());
    let p = allow_patched(&[inject::PatchOp::Add {
        path: "/a".into(),
        value: json!(1),
    }]);
    assert_eq!(p["patchType"], "JSONPatch");
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(p["patch"].as_str().unwrap())
        .unwrap();
    let ops: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(ops, json!([{"op": "add", "path": "/a", "value": 1}]));
}

#[test]
fn args_defaults_and_validation() {
    #[derive(clap::Parser)]
    struct A {
        #[command(flatten)]
        a: AdmissionArgs,
    }
    use clap::Parser as _;
    let a = A::try_parse_from(["x"]).unwrap().a;
    let s = a.inject_settings("pgwarden-system");
    assert_eq!(
        s.operator_url,
        "https://pgwarden-operator.pgwarden-system.svc:8443"
    );
    assert_eq!(s.port, 5432);
    let certs::Source::Bootstrap { sans, secret, .. } = a.cert_source("pgwarden-system") else {
        panic!()
    };
    assert_eq!(secret, "pgwarden-webhook-tls");
    assert_eq!(
        sans,
        [
            "pgwarden-operator.pgwarden-system.svc",
            "pgwarden-operator.pgwarden-system.svc.cluster.local"
        ]
    );
    assert!(A::try_parse_from(["x", "--sidecar-memory-request", "lots"]).is_err());
    assert!(A::try_parse_from(["x", "--sidecar-token-expiration-seconds", "60"]).is_err());
    assert!(A::try_parse_from(["x", "--tls-cert-file", "c"]).is_err());
    let a = A::try_parse_from([
        "x",
        "--tls-cert-file",
        "c",
        "--tls-key-file",
        "k",
        "--ca-file",
        "ca",
    ])
    .unwrap()
    .a;
    assert!(matches!(a.cert_source("ns"), certs::Source::Files { .. }));
}
