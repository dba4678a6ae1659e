//! A two-million-row result (~120 MB on the wire) must stream through the gateway:
//! every row arrives, and the gateway's peak RSS stays far below the result size.

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use pgwarden_e2e::{libpq_command, Endpoint, Gateway, PgCluster};
use tokio_postgres::NoTls;

const ROWS: i32 = 2_000_000;
const QUERY: &str = "SELECT g, repeat('x', 50) FROM generate_series(1, 2000000) g";
/// Peak RSS budget for the gateway while relaying the whole result.
const PEAK_RSS_LIMIT_KIB: u64 = 64 * 1024;
const DEADLINE: Duration = Duration::from_secs(300);

/// Streams the result with the extended protocol and checks every row.
async fn stream_with_tokio_postgres(conninfo: &str) -> i32 {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await.unwrap();
    tokio::spawn(connection);
    let rows = client
        .query_raw(QUERY, std::iter::empty::<i32>())
        .await
        .unwrap();
    futures_util::pin_mut!(rows);
    let mut expected = 1;
    while let Some(row) = rows.next().await {
        let row = row.unwrap();
        let g: i32 = row.get(0);
        assert_eq!(g, expected, "rows out of order or lost");
        if g % 99_991 == 0 {
            assert_eq!(row.get::<_, &str>(1), "x".repeat(50));
        }
        expected += 1;
    }
    expected - 1
}

/// `psql -A -t` (simple protocol) with stdout counted as it streams.
fn count_psql_lines(ep: &dyn Endpoint) -> usize {
    let mut child = libpq_command("psql", &ep.env())
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", QUERY])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut lines = 0usize;
    let mut last = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count();
        last.extend_from_slice(&buf[..n]);
        if last.len() > 256 {
            last.drain(..last.len() - 256);
        }
    }
    let status = child.wait().unwrap();
    let err = err_reader.join().unwrap();
    assert!(status.success(), "psql failed: {err}");
    let tail = String::from_utf8_lossy(&last);
    assert!(
        tail.ends_with(&format!("2000000|{}\n", "x".repeat(50))),
        "last row wrong: {tail}"
    );
    lines
}

fn assert_peak_rss(gw: &Gateway) {
    let peak = gw.peak_rss_kib();
    eprintln!("gateway peak RSS {peak} KiB, now {} KiB", gw.rss_kib());
    assert!(
        peak < PEAK_RSS_LIMIT_KIB,
        "gateway peak RSS {peak} KiB >= {PEAK_RSS_LIMIT_KIB} KiB: the result was buffered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_million_rows_stream_extended_protocol() {
    let pg = PgCluster::start();
    let gw = Gateway::start(&pg);
    let started = Instant::now();
    let n = tokio::time::timeout(DEADLINE, stream_with_tokio_postgres(&gw.conninfo()))
        .await
        .expect("result did not finish streaming in time");
    eprintln!("{n} rows through the gateway in {:?}", started.elapsed());
    assert_eq!(n, ROWS);
    assert_peak_rss(&gw);
    gw.assert_running();
}

#[test]
fn two_million_rows_stream_simple_protocol() {
    let pg = PgCluster::start();
    let gw = Gateway::start(&pg);
    let started = Instant::now();
    assert_eq!(count_psql_lines(&gw), ROWS as usize);
    eprintln!(
        "psql: {ROWS} rows through the gateway in {:?}",
        started.elapsed()
    );
    assert_peak_rss(&gw);
    gw.assert_running();
}

/// Controls: the same client code against PostgreSQL directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_million_rows_direct() {
    let pg = PgCluster::start();
    assert_eq!(stream_with_tokio_postgres(&pg.conninfo()).await, ROWS);
    assert_eq!(
        tokio::task::block_in_place(|| count_psql_lines(&pg)),
        ROWS as usize
    );
}
