//! Process lifecycle: the gateway shuts down cleanly on SIGTERM, even with a client
//! session open.

use std::time::{Duration, Instant};

use pgwarden_e2e::{psql_query, Endpoint, Gateway, PgCluster};
use tokio_postgres::NoTls;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_cleanly_with_an_idle_session_open() {
    let pg = PgCluster::start();
    let gw = Gateway::start(&pg);
    assert_eq!(psql_query(&gw, "SELECT 'up'"), "up");
    let (client, connection) = tokio_postgres::connect(&gw.conninfo(), NoTls)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    client.simple_query("SELECT 1").await.unwrap();

    let started = Instant::now();
    let status = tokio::task::block_in_place(|| gw.shutdown());
    assert!(status.success(), "pgwarden exited with {status} on SIGTERM");
    assert!(
        started.elapsed() < Duration::from_secs(10) + Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
    // The idle session was closed, not left dangling.
    let closed = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(
        closed.is_ok(),
        "client connection still open after shutdown"
    );
    assert!(client.simple_query("SELECT 1").await.is_err());
    // And the upstream session ended with it.
    let gone = tokio::task::block_in_place(|| {
        pgwarden_e2e::wait_until(Duration::from_secs(10), || {
            pg.admin_sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'") == "0"
        })
    });
    assert!(gone, "upstream sessions outlived the gateway");
}

/// SIGHUP reloads and the gateway goes on; SIGTERM, SIGINT and SIGQUIT each
/// shut it down cleanly with the recording log flushed: the session that just
/// ended is there and the log verifies.
#[test]
fn every_termination_signal_flushes_the_recording() {
    use pgwarden_e2e::recording::{recording_yaml, SessionsCli};
    use pgwarden_e2e::{policy_with_rules, REALISTIC_RULES};
    let pg = PgCluster::start();
    for signal in ["TERM", "INT", "QUIT"] {
        let state = tempfile::tempdir().unwrap();
        let spec = format!("{REALISTIC_RULES}{}", recording_yaml(Some(5), false, None));
        let gw = Gateway::builder(&pg)
            .policy_yaml(policy_with_rules(pg.port(), None, &spec))
            .state_dir(state.path())
            .start();
        assert_eq!(
            psql_query(&gw, &format!("SELECT 'before-{signal}'")),
            format!("before-{signal}")
        );
        let hup = std::process::Command::new("kill")
            .args(["-HUP", &gw.pid().to_string()])
            .status()
            .unwrap();
        assert!(hup.success());
        std::thread::sleep(Duration::from_millis(300));
        gw.assert_running();
        assert_eq!(psql_query(&gw, "SELECT 'after-hup'"), "after-hup");
        let status = gw.stop_with(signal);
        assert!(status.success(), "SIG{signal}: {status}");
        let cli = SessionsCli::state_dir(state.path());
        let (_, sessions) = cli.assert_intact();
        assert_eq!(sessions, 2, "SIG{signal}: both sessions recorded");
        let listed = cli.run(&["list", "-o", "json"]);
        assert_eq!(listed.code(), Some(0), "{listed}");
    }
}
