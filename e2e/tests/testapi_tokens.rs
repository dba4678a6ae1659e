//! Service-account tokens of the test API server (issue 15 item 1), driven by the
//! real `kubectl`: `kubectl create token` bound to a pod, TokenReview (wrong
//! audience, expiry, a deleted or re-created pod), the token as a bearer credential
//! under RBAC, and the issuer's discovery document and JWKS verifying a token with
//! an independent JWT library.

use std::process::Output;
use std::time::Duration;

use pgwarden_testapi::{Options, TestApiServer};
use serde_json::{json, Value};

fn text(o: &Output) -> String {
    pgwarden_testapi::output_text(o)
}

fn run(api: &TestApiServer, ctx: &str, args: &[&str], stdin: Option<&str>) -> Output {
    api.kubectl_stdin(ctx, args, stdin)
}

fn ok(api: &TestApiServer, ctx: &str, args: &[&str]) -> String {
    let o = run(api, ctx, args, None);
    assert!(
        o.status.success(),
        "kubectl {args:?} as {ctx}:\n{}",
        text(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails(api: &TestApiServer, ctx: &str, args: &[&str]) -> String {
    let o = run(api, ctx, args, None);
    assert!(
        !o.status.success(),
        "kubectl {args:?} as {ctx} succeeded:\n{}",
        text(&o)
    );
    text(&o)
}

fn create_pod(api: &TestApiServer, name: &str, sa: &str) -> String {
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "busybox"}]}});
    let o = run(
        api,
        "admin",
        &["create", "-f", "-", "-o", "json"],
        Some(&pod.to_string()),
    );
    assert!(o.status.success(), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["metadata"]["uid"].as_str().unwrap().to_string()
}

/// A TokenReview through the API (as admin, who may create tokenreviews).
fn review(api: &TestApiServer, token: &str, audiences: &[&str]) -> Value {
    let tr = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
        "spec": {"token": token, "audiences": audiences}});
    let o = run(
        api,
        "admin",
        // --raw: kubectl's client-side validation of `create -f` wants OpenAPI v2
        // for kinds without a PATCH operation, which this server does not serve.
        &[
            "create",
            "--raw",
            "/apis/authentication.k8s.io/v1/tokenreviews",
            "-f",
            "-",
        ],
        Some(&tr.to_string()),
    );
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn short_lived() -> TestApiServer {
    TestApiServer::start_with(Options {
        min_token_expiration: Duration::from_secs(1),
        token_leeway: Duration::ZERO,
        ..Options::default()
    })
    .expect("start test API server")
}

#[test]
fn kubectl_create_token_bound_to_a_pod_reviews_until_the_pod_is_gone() {
    let api = TestApiServer::start().unwrap();
    ok(&api, "admin", &["create", "serviceaccount", "agent"]);
    let uid = create_pod(&api, "ci", "agent");
    let token = ok(
        &api,
        "admin",
        &[
            "create",
            "token",
            "agent",
            "--audience",
            "pgwarden",
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            "ci",
        ],
    );
    let token = token.trim();

    let r = review(&api, token, &["pgwarden"]);
    let st = &r["status"];
    assert_eq!(st["authenticated"], true, "{r}");
    assert_eq!(
        st["user"]["username"],
        "system:serviceaccount:default:agent"
    );
    assert_eq!(
        st["user"]["groups"],
        json!([
            "system:serviceaccounts",
            "system:serviceaccounts:default",
            "system:authenticated"
        ])
    );
    assert_eq!(
        st["user"]["extra"]["authentication.kubernetes.io/pod-name"],
        json!(["ci"])
    );
    assert_eq!(
        st["user"]["extra"]["authentication.kubernetes.io/pod-uid"],
        json!([uid])
    );
    assert_eq!(st["audiences"], json!(["pgwarden"]));

    // Another audience (or none, which means the API server's own) does not take it.
    for auds in [&["vault"][..], &[]] {
        let r = review(&api, token, auds);
        assert_ne!(r["status"]["authenticated"], true, "{r}");
        let err = r["status"]["error"].as_str().unwrap();
        assert!(
            err.contains("token audiences [\"pgwarden\"] is invalid for the target audiences"),
            "{err}"
        );
    }

    // A pod the token is not bound to, or a service account that does not exist.
    let e = fails(
        &api,
        "admin",
        &[
            "create",
            "token",
            "agent",
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            "nope",
        ],
    );
    assert!(e.contains("pods \"nope\" not found"), "{e}");
    let e = fails(&api, "admin", &["create", "token", "ghost"]);
    assert!(e.contains("serviceaccounts \"ghost\" not found"), "{e}");

    // The pod goes: the token is invalidated; a new pod of the same name is not it.
    ok(&api, "admin", &["delete", "pod", "ci"]);
    let r = review(&api, token, &["pgwarden"]);
    assert_eq!(
        r["status"]["error"], "[invalid bearer token, service account token has been invalidated]",
        "{r}"
    );
    let new_uid = create_pod(&api, "ci", "agent");
    let r = review(&api, token, &["pgwarden"]);
    let err = r["status"]["error"].as_str().unwrap();
    assert!(
        err.contains(&format!("pod UID ({new_uid}) does not match claim ({uid})")),
        "{err}"
    );
    assert_ne!(r["status"]["authenticated"], true);
}

#[test]
fn expired_tokens_fail_review() {
    let api = short_lived();
    let token = ok(
        &api,
        "admin",
        &[
            "create",
            "token",
            "default",
            "--audience",
            "pgwarden",
            "--duration",
            "1s",
        ],
    );
    assert_eq!(
        review(&api, token.trim(), &["pgwarden"])["status"]["authenticated"],
        true
    );
    std::thread::sleep(Duration::from_millis(2100));
    let r = review(&api, token.trim(), &["pgwarden"]);
    assert_eq!(
        r["status"]["error"], "[invalid bearer token, service account token has expired]",
        "{r}"
    );
    // A real server's floor is ten minutes; this one's is lowered to one second.
    let real = TestApiServer::start().unwrap();
    let e = fails(
        &real,
        "admin",
        &["create", "token", "default", "--duration", "60s"],
    );
    assert!(
        e.contains("may not specify a duration less than 10 minutes"),
        "{e}"
    );
}

#[test]
fn service_account_tokens_authenticate_requests_under_rbac() {
    let api = TestApiServer::start().unwrap();
    ok(&api, "admin", &["create", "serviceaccount", "agent"]);
    // Audience: the API server's own (the default of TokenRequest).
    let token = api
        .token_request("default", "agent", &[], None, None)
        .expect("token");
    let as_agent = |args: &[&str]| {
        let mut a = vec!["--token", token.as_str()];
        a.extend_from_slice(args);
        run(&api, "bob", &a, None)
    };
    let who = as_agent(&["auth", "whoami", "-o", "json"]);
    let who: Value =
        serde_json::from_slice(&who.stdout).unwrap_or_else(|_| panic!("{}", text(&who)));
    assert_eq!(
        who["status"]["userInfo"]["username"],
        "system:serviceaccount:default:agent"
    );
    let denied = as_agent(&["get", "pods"]);
    assert!(
        text(&denied).contains(
            "User \"system:serviceaccount:default:agent\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\""
        ),
        "{}",
        text(&denied)
    );
    ok(
        &api,
        "admin",
        &[
            "create",
            "rolebinding",
            "agent-view",
            "--clusterrole",
            "view",
            "--serviceaccount",
            "default:agent",
        ],
    );
    let allowed = as_agent(&["get", "pods"]);
    assert!(allowed.status.success(), "{}", text(&allowed));

    // A token for another audience is no API credential; nor is a forged one.
    let other = api
        .token_request("default", "agent", &["pgwarden"], None, None)
        .unwrap();
    let mut b = vec!["--token", other.as_str(), "get", "pods"];
    let o = run(&api, "bob", &b, None);
    assert!(text(&o).contains("Unauthorized"), "{}", text(&o));
    let forged = format!("{}x", &token[..token.len() - 1]);
    b[1] = &forged;
    let o = run(&api, "bob", &b, None);
    assert!(text(&o).contains("Unauthorized"), "{}", text(&o));

    // The service account goes: its tokens stop working.
    ok(&api, "admin", &["delete", "serviceaccount", "agent"]);
    let o = as_agent(&["get", "pods"]);
    assert!(text(&o).contains("Unauthorized"), "{}", text(&o));
}

#[test]
fn the_issuer_jwks_verifies_tokens() {
    use jsonwebtoken::jwk::JwkSet;
    use jsonwebtoken::{decode, decode_header, DecodingKey, Validation};

    let api = TestApiServer::start().unwrap();
    ok(&api, "admin", &["create", "serviceaccount", "agent"]);
    create_pod(&api, "ci", "agent");
    let token = api
        .token_request(
            "default",
            "agent",
            &["pgwarden"],
            Some("ci"),
            Some(Duration::from_secs(600)),
        )
        .unwrap();

    // Unauthenticated, as a relying party outside the cluster fetches them.
    let curl = |path: &str| {
        let o = std::process::Command::new("curl")
            .args(["-sS", "--fail", "--cacert"])
            .arg(api.ca_cert())
            .arg(format!("{}{path}", api.url()))
            .output()
            .expect("curl");
        assert!(o.status.success(), "{path}: {}", text(&o));
        serde_json::from_slice::<Value>(&o.stdout).unwrap()
    };
    let disco = curl("/.well-known/openid-configuration");
    assert_eq!(disco["issuer"], api.url());
    let jwks_uri = disco["jwks_uri"].as_str().unwrap();
    assert_eq!(jwks_uri, format!("{}/openid/v1/jwks", api.url()));
    let jwks: JwkSet = serde_json::from_value(curl("/openid/v1/jwks")).unwrap();

    let header = decode_header(&token).unwrap();
    let jwk = jwks
        .find(header.kid.as_deref().unwrap())
        .expect("kid in the JWKS");
    let key = DecodingKey::from_jwk(jwk).unwrap();
    let mut v = Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_audience(&["pgwarden"]);
    v.set_issuer(&[api.url()]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub", "nbf"]);
    let claims = decode::<Value>(&token, &key, &v).expect("verifies").claims;
    assert_eq!(claims["sub"], "system:serviceaccount:default:agent");
    assert_eq!(claims["kubernetes.io"]["pod"]["name"], "ci");
    assert_eq!(claims["kubernetes.io"]["serviceaccount"]["name"], "agent");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        600
    );
    assert!(claims["jti"].as_str().is_some_and(|j| j.len() == 36));

    // Another audience fails the relying party's own check too.
    v.set_audience(&["vault"]);
    assert!(decode::<Value>(&token, &key, &v).is_err());

    // Discovery lists the subresource and the review.
    let res = ok(&api, "admin", &["get", "--raw", "/api/v1"]);
    assert!(res.contains("\"serviceaccounts/token\""), "{res}");
    let res = ok(
        &api,
        "admin",
        &["api-resources", "--api-group", "authentication.k8s.io"],
    );
    assert!(res.contains("tokenreviews"), "{res}");
}
