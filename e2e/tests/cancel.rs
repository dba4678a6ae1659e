//! Query cancellation through the gateway: the client's CancelRequest carries the
//! proxy-issued keys, which the gateway maps to the upstream session's keys.

use std::time::{Duration, Instant};

use pgwarden_e2e::{gateway_and_direct_async, PgCluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

gateway_and_direct_async!(
    cancel_stops_a_running_query,
    cancel_with_wrong_keys_does_nothing,
    cancel_only_hits_its_own_session,
);

async fn connect(conninfo: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {conninfo}: {e}"));
    tokio::spawn(connection);
    client
}

/// Blocks (on this worker) until `n` upstream sessions run `query`.
fn wait_for_running(pg: &PgCluster, query: &str, n: usize) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE query = '{query}' AND state = 'active'"
    );
    let running = tokio::task::block_in_place(|| {
        pgwarden_e2e::wait_until(Duration::from_secs(15), || {
            pg.admin_sql(&sql) == n.to_string()
        })
    });
    assert!(running, "{query:?} never started on the server");
}

fn port_of(conninfo: &str) -> u16 {
    conninfo
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("port="))
        .and_then(|p| p.parse().ok())
        .expect("conninfo has port=")
}

async fn cancel_stops_a_running_query(conninfo: String, pg: &PgCluster) {
    let client = connect(&conninfo).await;
    let token = client.cancel_token();
    let started = Instant::now();
    let sleeping = client.simple_query("SELECT pg_sleep(30)");
    let cancel = async {
        wait_for_running(pg, "SELECT pg_sleep(30)", 1);
        token.cancel_query(NoTls).await
    };
    let (result, cancelled) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(sleeping, cancel)
    })
    .await
    .expect("the cancelled query was still running after 20 s");
    cancelled.expect("sending the CancelRequest");
    let err = result.expect_err("pg_sleep(30) finished instead of being cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err:?}");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.message(), "canceling statement due to user request");
    assert_eq!(db.severity(), "ERROR");
    assert!(started.elapsed() < Duration::from_secs(20));

    // The session survives its cancelled statement.
    let rows = client.simple_query("SELECT 'after cancel'").await.unwrap();
    assert!(matches!(
        &rows[1],
        tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("after cancel")
    ));
}

/// A CancelRequest packet: length 16, code 80877102, process id, secret key.
fn cancel_request(pid: i32, key: i32) -> Vec<u8> {
    let mut msg = Vec::with_capacity(16);
    msg.extend_from_slice(&16i32.to_be_bytes());
    msg.extend_from_slice(&80_877_102i32.to_be_bytes());
    msg.extend_from_slice(&pid.to_be_bytes());
    msg.extend_from_slice(&key.to_be_bytes());
    msg
}

async fn cancel_with_wrong_keys_does_nothing(conninfo: String, pg: &PgCluster) {
    let client = connect(&conninfo).await;
    let port = port_of(&conninfo);
    let started = Instant::now();
    let sleeping = client.simple_query("SELECT pg_sleep(2)");
    let bogus_cancels = async {
        wait_for_running(pg, "SELECT pg_sleep(2)", 1);
        for (pid, key) in [(1, 1), (0, 0), (i32::MAX, -1), (12345, 0x5eed)] {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            s.write_all(&cancel_request(pid, key)).await.unwrap();
            // The server answers a CancelRequest by closing, never with data.
            let mut buf = [0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("CancelRequest connection not closed within 5 s")
                .unwrap_or(0);
            assert_eq!(
                n,
                0,
                "unexpected answer to a CancelRequest: {:?}",
                &buf[..n]
            );
        }
    };
    let (result, ()) = tokio::join!(sleeping, bogus_cancels);
    result.expect("a CancelRequest with wrong keys cancelled the query");
    assert!(started.elapsed() >= Duration::from_secs(2));
}

async fn cancel_only_hits_its_own_session(conninfo: String, pg: &PgCluster) {
    let idle = connect(&conninfo).await;
    let busy = connect(&conninfo).await;
    let idle_token = idle.cancel_token();
    let busy_token = busy.cancel_token();
    let sleeping = busy.simple_query("SELECT pg_sleep(2.5)");
    let wrong_cancel = async {
        wait_for_running(pg, "SELECT pg_sleep(2.5)", 1);
        idle_token.cancel_query(NoTls).await.unwrap();
    };
    let (result, ()) = tokio::join!(sleeping, wrong_cancel);
    result.expect("cancelling the idle session cancelled the busy one");
    // Both sessions still work, and the busy one's own token still cancels it.
    idle.simple_query("SELECT 1").await.unwrap();
    let sleeping = busy.simple_query("SELECT pg_sleep(30)");
    let right_cancel = async {
        wait_for_running(pg, "SELECT pg_sleep(30)", 1);
        busy_token.cancel_query(NoTls).await.unwrap();
    };
    let (result, ()) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(sleeping, right_cancel)
    })
    .await
    .expect("not cancelled within 20 s");
    let err = result.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err:?}");
}
