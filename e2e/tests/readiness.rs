//! `/readyz` tells the truth about the upstream (issue 20, item 10): a
//! gateway whose Secret holds a wrong password, or whose server is down, is
//! not ready, and the body names the policy and the class of error — never
//! the password. It becomes ready once the gateway's own login works again
//! (a fixed Secret, a server back up), without a restart.

use std::fs;
use std::time::{Duration, Instant};

use pgwarden_e2e::{Gateway, PgCluster, APP_PASSWORD, POLICY_NAME};

/// Longer than the longest retry interval (10 s) plus a login.
const CHANGE: Duration = Duration::from_secs(30);
const WRONG_PASSWORD: &str = "not-the-password-7f3a";

/// Polls /readyz until `want` answers; the last answer either way.
fn readyz_becomes(gw: &Gateway, want: u16, timeout: Duration) -> (u16, String) {
    let deadline = Instant::now() + timeout;
    loop {
        let (code, body) = gw.http_get("/readyz");
        if code == want || Instant::now() >= deadline {
            return (code, body);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn metric(gw: &Gateway, sample: &str) -> f64 {
    let (_, body) = gw.http_get("/metrics");
    body.lines()
        .find(|l| l.starts_with(sample))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_wrong_upstream_password_keeps_the_gateway_unready_until_the_secret_is_fixed() {
    let pg = PgCluster::start();
    let gw = Gateway::builder(&pg)
        .secret_password(WRONG_PASSWORD)
        .start();
    // Alive and listening, but not ready: the body says which policy and why.
    assert_eq!(gw.http_get("/healthz").0, 200);
    let (code, body) = gw.http_get("/readyz");
    assert_eq!(code, 503, "{body}");
    let policy = format!("policy default/{POLICY_NAME}: upstream 127.0.0.1:{} database shop: credential refused: the server refused the gateway's credential (SQLSTATE 28P01)", pg.port());
    assert!(body.starts_with("not ready: upstream\n"), "{body}");
    assert!(body.contains(&policy), "{body}");
    assert!(body.contains("none succeeded since start"), "{body}");
    assert!(
        metric(
            &gw,
            "pgwarden_upstream_login_checks_total{result=\"refused\"}"
        ) >= 1.0,
        "the failed check is counted"
    );
    // Never the password, in the body or the log.
    assert!(!body.contains(WRONG_PASSWORD));
    let logs = gw.logs();
    assert!(logs.contains("upstream login failed: not ready"), "{logs}");
    assert!(!logs.contains(WRONG_PASSWORD), "{logs}");

    // The admin fixes the Secret: ready without a restart.
    let secret = gw.dir().join("secret.yaml");
    let text = fs::read_to_string(&secret).unwrap();
    fs::write(&secret, text.replace(WRONG_PASSWORD, APP_PASSWORD)).unwrap();
    let (code, body) = readyz_becomes(&gw, 200, CHANGE);
    assert_eq!(code, 200, "{body}\n{}", gw.logs());
    assert!(body.starts_with("ready\n"), "{body}");
    assert!(
        body.contains(&format!(
            "policy default/{POLICY_NAME}: upstream 127.0.0.1:{} database shop: login ok",
            pg.port()
        )),
        "{body}"
    );
    gw.assert_running();
}

#[test]
fn a_stopped_upstream_makes_the_gateway_unready_until_it_is_back() {
    let mut pg = PgCluster::start();
    let gw = Gateway::start(&pg);
    let (code, body) = readyz_becomes(&gw, 200, CHANGE);
    assert_eq!(code, 200, "{body}");

    pg.stop();
    let (code, body) = readyz_becomes(&gw, 503, CHANGE);
    assert_eq!(code, 503, "still ready with the server stopped: {body}");
    assert!(
        body.contains(&format!(
            "policy default/{POLICY_NAME}: upstream 127.0.0.1:{} database shop: unreachable: ",
            pg.port()
        )),
        "{body}"
    );
    // It worked once: the body does not claim otherwise.
    assert!(!body.contains("none succeeded since start"), "{body}");
    assert!(
        gw.logs().contains("error.class=\"unreachable\""),
        "{}",
        gw.logs()
    );

    pg.start_again();
    let (code, body) = readyz_becomes(&gw, 200, CHANGE);
    assert_eq!(
        code, 200,
        "not ready again after the server came back: {body}"
    );
    gw.assert_running();
}
