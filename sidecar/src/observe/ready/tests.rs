use super::*;
use crate::upstream::tls::UpstreamTls;
use pgwarden_api::SecretString;

fn target(password: &str) -> (Arc<UpstreamTarget>, TargetKey) {
    let credential = Credential {
        username: "app".into(),
        password: SecretString::new(password.into()),
    };
    let database: DatabaseTarget = serde_yaml_ng::from_str(
        "{host: 127.0.0.1, port: 5432, name: shop, credentialsSecret: shop-cred}",
    )
    .unwrap();
    let t = UpstreamTarget {
        host: "127.0.0.1".into(),
        port: 5432,
        database: "shop".into(),
        credential: credential.clone(),
        tls: UpstreamTls::Disable,
    };
    (
        Arc::new(t),
        TargetKey {
            database,
            credential,
        },
    )
}

fn refused() -> Failure {
    Failure::from_error(&UpstreamError::Refused {
        code: "28P01".into(),
        message: "password authentication failed for user \"app\"".into(),
    })
}

#[test]
fn ready_only_when_listening_and_every_upstream_took_the_login() {
    let r = Readiness::default();
    let now = Instant::now();
    let (t, key) = target("secret-pw");
    let policies = vec![("default/shop".to_string(), t, key.clone())];
    // Not listening yet.
    assert!(!r.report(now).0);
    r.set_listening(true);
    // Listening with no policy checked: nothing to wait for.
    assert!(r.report(now).0);
    // The first check is due at once, and only once while it runs.
    assert_eq!(r.due(&policies, now).len(), 1);
    assert!(r.due(&policies, now).is_empty());
    let (ready, body) = r.report(now);
    assert!(!ready);
    assert!(body.starts_with("not ready: upstream\n"), "{body}");
    assert!(body.contains("policy default/shop: upstream 127.0.0.1:5432 database shop: checking"));

    // A wrong credential: not ready, the class and the policy are named,
    // never the password.
    assert_eq!(
        r.finished("default/shop", &key, Err(refused()), now),
        Some(Err(refused()))
    );
    let (ready, body) = r.report(now);
    assert!(!ready);
    assert!(body.contains("policy default/shop: upstream 127.0.0.1:5432 database shop: credential refused: the server refused the gateway's credential (SQLSTATE 28P01)"), "{body}");
    assert!(
        body.contains("1 failed login(s) in a row, none succeeded since start; next try in 1s"),
        "{body}"
    );
    assert!(!body.contains("secret-pw"));
    // Retried after the backoff, not before.
    assert!(r.due(&policies, now).is_empty());
    let later = now + Duration::from_secs(1);
    assert_eq!(r.due(&policies, later).len(), 1);
    // The same failure again is not logged again.
    assert_eq!(
        r.finished("default/shop", &key, Err(refused()), later),
        None
    );

    // It works: ready, and checked again after RECHECK.
    assert_eq!(
        r.finished("default/shop", &key, Ok(()), later),
        Some(Ok(()))
    );
    let (ready, body) = r.report(later);
    assert!(ready, "{body}");
    assert_eq!(
        body,
        "ready\npolicy default/shop: upstream 127.0.0.1:5432 database shop: login ok\n"
    );
    assert!(r.due(&policies, later + RECHECK / 2).is_empty());
    assert_eq!(r.due(&policies, later + RECHECK).len(), 1);
    // The server goes away: not ready again, though it once worked.
    let unreachable = Failure {
        class: "unreachable",
        detail: "Connection refused (os error 111)".into(),
    };
    r.finished("default/shop", &key, Err(unreachable), later + RECHECK);
    let (ready, body) = r.report(later + RECHECK);
    assert!(!ready);
    assert!(body.contains("unreachable: Connection refused"), "{body}");
    assert!(!body.contains("none succeeded since start"), "{body}");

    // Shutting down: not ready whatever the upstreams say.
    r.set_listening(false);
    assert!(!r.report(now).0);
}

#[test]
fn a_changed_or_removed_policy_is_followed() {
    let r = Readiness::default();
    r.set_listening(true);
    let now = Instant::now();
    let (t, key) = target("old");
    let id = "default/shop".to_string();
    r.due(&[(id.clone(), t, key.clone())], now);
    r.finished(&id, &key, Ok(()), now);
    assert!(r.report(now).0);
    // A new credential must succeed again: checked at once, not ready until then.
    let (t2, key2) = target("new");
    assert_eq!(r.due(&[(id.clone(), t2, key2.clone())], now).len(), 1);
    assert!(!r.report(now).0);
    // A result for the old credential arriving late is ignored.
    assert_eq!(r.finished(&id, &key, Ok(()), now), None);
    assert!(!r.report(now).0);
    r.finished(&id, &key2, Ok(()), now);
    assert!(r.report(now).0);
    // Removed: forgotten.
    assert!(r.due(&[], now).is_empty());
    assert_eq!(r.report(now).1, "ready\n");
}

#[test]
fn backoff_doubles_up_to_the_cap() {
    let secs: Vec<_> = (1..=6).map(|n| backoff(n).as_secs()).collect();
    assert_eq!(secs, [1, 2, 4, 8, 10, 10]);
    assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
}

#[test]
fn failures_name_their_class_and_never_the_server_words_about_credentials() {
    let f = refused();
    assert_eq!(f.class, "credential refused");
    assert!(!f.detail.contains("password authentication failed"));
    let f = Failure::from_error(&UpstreamError::Refused {
        code: "3D000".into(),
        message: "database \"shop\" does not exist".into(),
    });
    assert_eq!(
        f.to_string(),
        "login refused: SQLSTATE 3D000: database \"shop\" does not exist"
    );
    let f = Failure::from_error(&UpstreamError::Timeout("h:1".into()));
    assert_eq!(f.class, "unreachable");
    assert_eq!(Failure::from_error(&UpstreamError::TlsRefused).class, "tls");
}

#[test]
fn not_ready_before_any_configuration() {
    let r = Readiness::default();
    r.set_listening(true);
    r.unconfigured.store(true, Ordering::Release);
    let (ready, body) = r.report(Instant::now());
    assert!(!ready);
    assert!(body.contains("no configuration yet"), "{body}");
    r.unconfigured.store(false, Ordering::Release);
    assert!(r.report(Instant::now()).0, "no policies, nothing to check");
}
