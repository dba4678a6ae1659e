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
