//! Workload identity end to end: a real OpenID Provider (oidc-provider on
//! loopback) issues short-lived tokens, clients send them as the Postgres
//! password, and the gateway admits, refuses, follows key rotation and rides
//! out an issuer outage. Tokens are never echoed or logged.

use std::str::FromStr;
use std::time::{Duration, Instant};

use base64::Engine;
use pgwarden_e2e::oidc::{sign_token, OidcProvider, ACME, AUDIENCE, EVIL, OTHER_AUDIENCE};
use pgwarden_e2e::{free_port, run_psql, Endpoint, Gateway, PgCluster};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

fn oidc_identity(issuer: &str) -> String {
    format!(
        "oidc: {{issuer: \"{issuer}\", audiences: [\"{AUDIENCE}\"], subjects: [\"ci-*\"], \
         claims: {{repository_owner: acme}}}}"
    )
}

fn oidc_gateway(pg: &PgCluster, issuer: &str) -> Gateway {
    Gateway::builder(pg).identity(oidc_identity(issuer)).start()
}

async fn login(gw: &Gateway, token: &str) -> Result<Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::from_str(&gw.conninfo()).unwrap();
    config.password(token);
    let (client, connection) = tokio::time::timeout(Duration::from_secs(20), config.connect(NoTls))
        .await
        .expect("login timed out")?;
    tokio::spawn(connection);
    Ok(client)
}

async fn current_user(client: &Client) -> String {
    client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// The claims of a valid `ci-acme` token from `issuer` (times relative to
/// now, for `sign_token`), with `extra` JSON members appended.
fn acme_claims(issuer: &str, extra: &str) -> String {
    format!(
        "{{\"iss\":\"{issuer}\",\"aud\":\"{AUDIENCE}\",\"sub\":\"ci-acme\",\
         \"repository_owner\":\"acme\",\"iat\":\"$now\",\"exp\":\"$now+300\"{extra}}}"
    )
}

/// The refusal a client sees: FATAL 28P01 with the reason in the message.
async fn refused(gw: &Gateway, token: &str) -> String {
    let err = match login(gw, token).await {
        Ok(_) => panic!("a bad token was accepted"),
        Err(e) => e,
    };
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("expected a server error, got {err}"));
    assert_eq!(db.code(), &SqlState::INVALID_PASSWORD, "{db:?}");
    assert_eq!(db.severity(), "FATAL");
    db.message().to_string()
}

/// No part of a token's signature may appear in the gateway's log.
fn assert_not_logged(gw: &Gateway, tokens: &[&str]) {
    let logs = gw.logs();
    for t in tokens {
        if let Some(sig) = t.rsplit('.').next().filter(|s| s.len() >= 16) {
            assert!(!logs.contains(sig), "a token reached the log:\n{logs}");
        }
    }
}

#[tokio::test]
async fn provider_token_logs_in_and_names_the_caller() {
    let provider = OidcProvider::start(300);
    let pg = PgCluster::start();
    let gw = oidc_gateway(&pg, provider.issuer());
    let token = provider.token(ACME, AUDIENCE);

    // psql, the way an agent would: the token in PGPASSWORD.
    let mut env = gw.env();
    env.push(("PGPASSWORD".into(), token.clone()));
    let out = run_psql(&env, &["-A", "-t", "-c", "SELECT current_user"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The upstream login is pgwarden's held credential, not the caller's.
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "app");

    let client = login(&gw, &token).await.unwrap();
    assert_eq!(current_user(&client).await, "app");
    drop(client);

    let logs = gw.logs();
    assert!(logs.contains("ci-acme"), "subject not logged:\n{logs}");
    assert!(
        logs.contains("repository=\"acme/shop\"") && logs.contains("workflow=\"nightly\""),
        "claims not logged:\n{logs}"
    );
    assert_not_logged(&gw, &[&token]);
}

#[tokio::test]
async fn bad_tokens_are_refused_with_a_reason() {
    let provider = OidcProvider::start(300);
    let pg = PgCluster::start();
    let gw = oidc_gateway(&pg, provider.issuer());
    let iss = provider.issuer();
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let claims = |extra: &str| acme_claims(iss, extra);
    let unsigned = format!(
        "{}.{}.",
        b64(r#"{"alg":"none"}"#),
        b64(&claims("")
            .replace("\"$now\"", "1")
            .replace("\"$now+300\"", "9999999999"))
    );
    let cases: Vec<(String, &str)> = vec![
        (
            provider.token(EVIL, AUDIENCE),
            "claim \"repository_owner\" = \"evil\"",
        ),
        (
            provider.token(ACME, OTHER_AUDIENCE),
            "audience [\"urn:other\"]",
        ),
        ("not-a-token".into(), "not a valid JWT"),
        (unsigned, "unsigned tokens"),
        // Right claims, but signed by a key the provider never published.
        (
            sign_token("rsa-1", "rsa-1", &claims("")),
            "does not publish",
        ),
        // The provider's current kid, but another key's signature.
        (
            sign_token("rsa-1", provider.kid(), &claims("")),
            "signature is invalid",
        ),
    ];
    for (token, reason) in &cases {
        let msg = refused(&gw, token).await;
        assert!(msg.contains(reason), "want {reason:?} in {msg:?}");
        assert!(!msg.contains(token.as_str()), "token echoed: {msg}");
    }
    // psql shows the reason too.
    let mut env = gw.env();
    env.push(("PGPASSWORD".into(), "not-a-token".into()));
    let out = run_psql(&env, &["-c", "SELECT 1"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("FATAL:  pgwarden: token rejected: the password is not a valid JWT"),
        "{stderr}"
    );
    // The gateway is fine and a good token still works.
    let client = login(&gw, &provider.token(ACME, AUDIENCE)).await.unwrap();
    assert_eq!(current_user(&client).await, "app");
    let tokens: Vec<&str> = cases.iter().map(|(t, _)| t.as_str()).collect();
    assert_not_logged(&gw, &tokens);
}

#[tokio::test]
async fn key_rotation_is_followed_without_a_restart() {
    let mut provider = OidcProvider::start(300);
    let pg = PgCluster::start();
    let gw = oidc_gateway(&pg, provider.issuer());
    let pid = gw.pid();
    let first = provider.token(ACME, AUDIENCE);
    login(&gw, &first).await.unwrap();

    // Normal rotation: a new signing key, the old one still published.
    let old_kid = provider.kid().to_string();
    let new_kid = provider.rotate(false);
    assert_ne!(old_kid, new_kid);
    let second = provider.token(ACME, AUDIENCE);
    let started = Instant::now();
    let client = login(&gw, &second).await.unwrap();
    assert_eq!(current_user(&client).await, "app");
    // The unknown kid triggered one rate-limited refresh, not a wait for the
    // routine one (minutes away).
    assert!(started.elapsed() < Duration::from_secs(15));
    login(&gw, &first).await.unwrap();

    // Rotation that unpublishes the old keys: tokens signed by them stop
    // working once the gateway has seen the new key set.
    provider.rotate(true);
    let third = provider.token(ACME, AUDIENCE);
    login(&gw, &third).await.unwrap();
    let msg = refused(&gw, &first).await;
    assert!(msg.contains("does not publish"), "{msg}");
    assert_eq!(gw.pid(), pid);
    gw.assert_running();
}

#[tokio::test]
async fn issuer_outage_keeps_cached_keys_working() {
    let mut provider = OidcProvider::start(300);
    let pg = PgCluster::start();
    let gw = oidc_gateway(&pg, provider.issuer());
    let before = provider.token(ACME, AUDIENCE);
    let also_before = provider.token(ACME, AUDIENCE);
    login(&gw, &before).await.unwrap();
    let issuer = provider.issuer().to_string();

    provider.stop();
    let client = login(&gw, &also_before).await.unwrap();
    assert_eq!(current_user(&client).await, "app");
    // A kid the cache lacks: the refresh fails, the cached keys stay, and the
    // token is refused for what it is.
    let stranger = sign_token("rsa-2", "rotated-while-down", &acme_claims(&issuer, ""));
    let msg = refused(&gw, &stranger).await;
    assert!(msg.contains("does not publish"), "{msg}");
    let client = login(&gw, &before).await.unwrap();
    assert_eq!(current_user(&client).await, "app");
    let logs = gw.logs();
    assert!(
        logs.contains("fetching token signing keys failed") && logs.contains("kept_keys=true"),
        "{logs}"
    );
}

#[tokio::test]
async fn issuer_down_at_start_leaves_the_gateway_ready_but_refusing() {
    let pg = PgCluster::start();
    let issuer = format!("http://127.0.0.1:{}", free_port());
    // `start` waits for /readyz: the gateway is up although no key was fetched.
    let gw = oidc_gateway(&pg, &issuer);
    let token = sign_token("rsa-1", "rsa-1", &acme_claims(&issuer, ""));
    let msg = refused(&gw, &token).await;
    assert!(msg.contains("keys are not available yet"), "{msg}");
    assert!(msg.contains("connect"), "the fetch error is named: {msg}");
}

#[tokio::test]
async fn a_session_ends_when_its_token_expires() {
    // Tokens live 2 s; the session may run until exp + the 30 s leeway.
    let provider = OidcProvider::start(2);
    let pg = PgCluster::start();
    let gw = oidc_gateway(&pg, provider.issuer());
    let token = provider.token(ACME, AUDIENCE);
    let mut config = tokio_postgres::Config::from_str(&gw.conninfo()).unwrap();
    config.password(&token);
    let (client, connection) = config.connect(NoTls).await.unwrap();
    let conn = tokio::spawn(connection);
    assert_eq!(current_user(&client).await, "app");

    let ended = tokio::time::timeout(Duration::from_secs(60), conn)
        .await
        .expect("the session outlived its token by far")
        .unwrap();
    let err = ended.expect_err("the server side should end the session with a FATAL");
    let db = err.as_db_error().unwrap_or_else(|| panic!("{err}"));
    assert_eq!(db.code(), &SqlState::INVALID_PASSWORD);
    assert!(db.message().contains("expired"), "{}", db.message());
    assert!(client.simple_query("SELECT 1").await.is_err());
    // A fresh token is all it takes.
    let fresh = provider.token(ACME, AUDIENCE);
    let client = login(&gw, &fresh).await.unwrap();
    assert_eq!(current_user(&client).await, "app");
}

#[tokio::test]
async fn kubernetes_tokens_must_come_from_this_pod() {
    let pg = PgCluster::start();
    let issuer = "https://kubernetes.default.svc.cluster.local";
    let jwks = pgwarden_e2e::oidc::fixture_key("jwks.json");
    let gw = Gateway::builder(&pg)
        .identity("kubernetes: {audience: pgwarden}")
        .arg("--kubernetes-issuer")
        .arg(issuer)
        .arg("--kubernetes-jwks-file")
        .arg(jwks.as_os_str())
        .arg("--pod-namespace")
        .arg("ci")
        .arg("--pod-name")
        .arg("agent-1")
        .arg("--service-account")
        .arg("runner")
        .start();
    let token = |ns: &str, pod: &str, sa: &str, aud: &str| {
        sign_token(
            "rsa-1",
            "rsa-1",
            &format!(
                "{{\"iss\":\"{issuer}\",\"aud\":[\"{aud}\"],\
                 \"sub\":\"system:serviceaccount:{ns}:{sa}\",\
                 \"kubernetes.io\":{{\"namespace\":\"{ns}\",\
                 \"pod\":{{\"name\":\"{pod}\",\"uid\":\"u1\"}},\
                 \"serviceaccount\":{{\"name\":\"{sa}\",\"uid\":\"u2\"}}}},\
                 \"iat\":\"$now\",\"nbf\":\"$now\",\"exp\":\"$now+600\"}}"
            ),
        )
    };
    let pod_token = |ns: &str, pod: &str, aud: &str| token(ns, pod, "runner", aud);
    let client = login(&gw, &pod_token("ci", "agent-1", "pgwarden"))
        .await
        .unwrap();
    assert_eq!(current_user(&client).await, "app");
    let logs = gw.logs();
    assert!(
        logs.contains("system:serviceaccount:ci:runner")
            && logs.contains("kubernetes.io.pod.name=\"agent-1\""),
        "{logs}"
    );

    let msg = refused(&gw, &pod_token("ci", "agent-2", "pgwarden")).await;
    assert!(msg.contains("kubernetes.io.pod.name"), "{msg}");
    let msg = refused(&gw, &pod_token("prod", "agent-1", "pgwarden")).await;
    assert!(msg.contains("kubernetes.io.namespace"), "{msg}");
    let msg = refused(
        &gw,
        &pod_token("ci", "agent-1", "https://kubernetes.default.svc"),
    )
    .await;
    assert!(msg.contains("audience"), "{msg}");
}
