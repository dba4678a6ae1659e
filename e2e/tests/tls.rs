//! TLS on both legs and the upstream login methods.
//!
//! (a) client → gateway: `--tls-cert/--tls-key`, libpq `sslmode=verify-full`.
//! (b) gateway → upstream: `spec.database.tls` against a `hostssl`-only cluster.
//! (c) upstream auth: SCRAM, md5, cleartext password, trust; a wrong credential.

use std::process::Output;

use pgwarden_e2e::{
    psql_query, run_psql, Endpoint, Gateway, PgCluster, TestPki, UpstreamAuth, APP_PASSWORD,
};

fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn with_env(mut env: Vec<(String, String)>, vars: &[(&str, &str)]) -> Vec<(String, String)> {
    for (name, value) in vars {
        env.retain(|(k, _)| k != name);
        env.push((name.to_string(), value.to_string()));
    }
    env
}

fn conninfo_and_query(env: &[(String, String)]) -> Output {
    run_psql(
        env,
        &["-A", "-t", "-c", "\\conninfo", "-c", "SELECT 'query ok'"],
        None,
    )
}

// === (a) client → gateway ===

#[test]
fn client_tls_verify_full() {
    let pg = PgCluster::start();
    let pki = TestPki::generate();
    let gw = Gateway::builder(&pg)
        .tls(&pki.server.cert, &pki.server.key)
        .start();
    let ca = pki.ca.cert_path().to_str().unwrap();

    let env = with_env(
        gw.env(),
        &[
            ("PGHOST", "localhost"),
            ("PGSSLMODE", "verify-full"),
            ("PGSSLROOTCERT", ca),
        ],
    );
    let out = conninfo_and_query(&env);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let text = stdout_of(&out);
    assert!(text.contains("SSL connection (protocol: TLSv1."), "{text}");
    assert!(text.contains("query ok"), "{text}");

    // The IP SAN works too, and sslmode=require needs no CA.
    let out = conninfo_and_query(&with_env(
        gw.env(),
        &[("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", ca)],
    ));
    assert!(out.status.success(), "{}", stderr_of(&out));
    let out = conninfo_and_query(&with_env(gw.env(), &[("PGSSLMODE", "require")]));
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        stdout_of(&out).contains("SSL connection"),
        "{}",
        stdout_of(&out)
    );

    // A client trusting another CA refuses the gateway's certificate.
    let other = TestPki::generate();
    let out = conninfo_and_query(&with_env(
        env.clone(),
        &[("PGSSLROOTCERT", other.ca.cert_path().to_str().unwrap())],
    ));
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("certificate verify failed"),
        "{}",
        stderr_of(&out)
    );

    // Plaintext clients are still served when TLS is offered (sslmode=disable).
    assert_eq!(psql_query(&gw, "SELECT 'plain ok'"), "plain ok");
    gw.assert_running();
}

#[test]
fn client_tls_refused_cleanly_without_certs() {
    let pg = PgCluster::start();
    let gw = Gateway::start(&pg);

    let out = conninfo_and_query(&with_env(gw.env(), &[("PGSSLMODE", "require")]));
    assert!(!out.status.success(), "{}", stdout_of(&out));
    assert!(
        stderr_of(&out).contains("server does not support SSL, but SSL was required"),
        "{}",
        stderr_of(&out)
    );

    let out = conninfo_and_query(&with_env(gw.env(), &[("PGSSLMODE", "prefer")]));
    assert!(out.status.success(), "{}", stderr_of(&out));
    let text = stdout_of(&out);
    assert!(!text.contains("SSL connection"), "{text}");
    assert!(text.contains("query ok"), "{text}");
    gw.assert_running();
}

// === (b) gateway → upstream ===

fn upstream_ssl_query(gw: &Gateway) -> String {
    psql_query(
        gw,
        "SELECT ssl, version LIKE 'TLSv1.%' FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
}

#[test]
fn upstream_tls_verify_full() {
    let pg = PgCluster::builder().ssl(true).start();
    // The default builder config for an ssl cluster: verify-full with its CA.
    let gw = Gateway::start(&pg);
    assert_eq!(upstream_ssl_query(&gw), "t|t");
    gw.assert_running();
}

#[test]
fn upstream_tls_require_without_ca() {
    let pg = PgCluster::builder().ssl(true).start();
    let gw = Gateway::builder(&pg).upstream_tls("require", None).start();
    assert_eq!(upstream_ssl_query(&gw), "t|t");
}

#[test]
fn upstream_tls_wrong_ca_is_a_fatal_for_the_client() {
    let pg = PgCluster::builder().ssl(true).start();
    let other = TestPki::generate();
    let gw = Gateway::builder(&pg)
        .upstream_tls("verify-full", Some(other.ca.cert_path()))
        .start();
    let out = run_psql(&gw.env(), &["-c", "SELECT 1"], None);
    assert!(!out.status.success(), "{}", stdout_of(&out));
    let err = stderr_of(&out);
    assert!(err.contains("FATAL"), "{err}");
    let lower = err.to_lowercase();
    assert!(
        lower.contains("upstream"),
        "does not blame the upstream: {err}"
    );
    assert!(
        lower.contains("tls") || lower.contains("certificate") || lower.contains("ssl"),
        "does not say it is about TLS: {err}"
    );
    // The gateway is unharmed and the server saw no successful login.
    gw.assert_running();
    assert!(
        !pg.log().contains("connection authorized: user=app"),
        "{}",
        pg.log()
    );
}

#[test]
fn upstream_plaintext_to_hostssl_only_server_is_refused() {
    let pg = PgCluster::builder().ssl(true).start();
    let gw = Gateway::builder(&pg).upstream_tls("disable", None).start();
    let out = run_psql(&gw.env(), &["-c", "SELECT 1"], None);
    assert!(!out.status.success(), "{}", stdout_of(&out));
    assert!(stderr_of(&out).contains("FATAL"), "{}", stderr_of(&out));
    gw.assert_running();
}

// === (c) upstream auth methods ===

fn login_through_gateway(auth: UpstreamAuth) {
    let pg = PgCluster::builder().auth(auth).start();
    let gw = Gateway::start(&pg);
    assert_eq!(
        psql_query(&gw, "SELECT current_user || '@' || current_database()"),
        "app@shop"
    );
    // The server log proves which method the gateway actually went through.
    let log = pg.log();
    match auth {
        UpstreamAuth::Trust => assert!(log.contains("connection authorized: user=app"), "{log}"),
        _ => assert!(
            log.contains(&format!(
                "connection authenticated: identity=\"app\" method={auth}"
            )),
            "{log}"
        ),
    }
    gw.assert_running();
}

#[test]
fn upstream_scram() {
    login_through_gateway(UpstreamAuth::Scram);
}

#[test]
fn upstream_md5() {
    login_through_gateway(UpstreamAuth::Md5);
}

#[test]
fn upstream_cleartext_password() {
    login_through_gateway(UpstreamAuth::Password);
}

#[test]
fn upstream_trust() {
    login_through_gateway(UpstreamAuth::Trust);
}

#[test]
fn upstream_scram_over_tls() {
    let pg = PgCluster::builder()
        .auth(UpstreamAuth::Scram)
        .ssl(true)
        .start();
    let gw = Gateway::start(&pg);
    assert_eq!(upstream_ssl_query(&gw), "t|t");
    assert!(pg.log().contains("method=scram-sha-256"), "{}", pg.log());
}

#[test]
fn wrong_upstream_password_is_a_fatal_without_the_password() {
    const WRONG: &str = "definitely-wrong-pw-7731";
    for auth in [
        UpstreamAuth::Scram,
        UpstreamAuth::Md5,
        UpstreamAuth::Password,
    ] {
        let pg = PgCluster::builder().auth(auth).start();
        let gw = Gateway::builder(&pg).secret_password(WRONG).start();
        let out = run_psql(&gw.env(), &["-c", "SELECT 1"], None);
        assert!(!out.status.success(), "{auth}: {}", stdout_of(&out));
        let err = stderr_of(&out);
        assert!(err.contains("FATAL"), "{auth}: {err}");
        let lower = err.to_lowercase();
        assert!(
            lower.contains("upstream"),
            "{auth}: does not blame the upstream: {err}"
        );
        assert!(
            ["password", "credential", "authentication"]
                .iter()
                .any(|w| lower.contains(w)),
            "{auth}: does not say the credential was refused: {err}"
        );
        for secret in [WRONG, APP_PASSWORD] {
            assert!(
                !err.contains(secret),
                "{auth}: client saw a password: {err}"
            );
            assert!(
                !gw.logs().contains(secret),
                "{auth}: gateway log shows a password:\n{}",
                gw.logs()
            );
            assert!(
                !gw.http_get("/metrics").1.contains(secret),
                "{auth}: metrics show a password"
            );
        }
        gw.assert_running();
    }
}
