//! A Rust driver (tokio-postgres: extended protocol, binary results, pipelining)
//! through the gateway, each check with a direct control run.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use pgwarden_e2e::{gateway_and_direct_async, PgCluster};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, NoTls, SimpleQueryMessage};

gateway_and_direct_async!(
    typed_params_and_binary_results,
    prepared_statement_reused_100_times,
    transaction_commit_and_rollback,
    error_then_reuse,
    copy_in_and_out,
    pipelined_queries_answer_in_order,
    listen_notify,
    simple_query_protocol,
    concurrent_sessions_stay_isolated,
);

async fn connect(conninfo: &str) -> Client {
    let (client, connection) = tokio::time::timeout(
        Duration::from_secs(15),
        tokio_postgres::connect(conninfo, NoTls),
    )
    .await
    .expect("connect timed out")
    .unwrap_or_else(|e| panic!("connect {conninfo}: {e}"));
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("connection error: {e}");
        }
    });
    client
}

async fn typed_params_and_binary_results(conninfo: String, _pg: &PgCluster) {
    let client = connect(&conninfo).await;
    client
        .batch_execute(
            "CREATE TABLE typed (i int4, b int8, f float8, s text, flag bool, data bytea, \
             arr int4[], n int4)",
        )
        .await
        .unwrap();
    let data: Vec<u8> = (0..=255).collect();
    let arr = vec![3, 1, 4, 1, 5];
    let inserted = client
        .execute(
            "INSERT INTO typed VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &-42i32,
                &9_007_199_254_740_993i64,
                &2.5f64,
                &"ünïcode \u{1F418} and 'quotes'",
                &true,
                &data,
                &arr,
                &None::<i32>,
            ],
        )
        .await
        .unwrap();
    assert_eq!(inserted, 1);

    let row = client
        .query_one("SELECT i, b, f, s, flag, data, arr, n FROM typed", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), -42);
    assert_eq!(row.get::<_, i64>(1), 9_007_199_254_740_993);
    assert_eq!(row.get::<_, f64>(2), 2.5);
    assert_eq!(row.get::<_, String>(3), "ünïcode \u{1F418} and 'quotes'");
    assert!(row.get::<_, bool>(4));
    assert_eq!(row.get::<_, Vec<u8>>(5), data);
    assert_eq!(row.get::<_, Vec<i32>>(6), arr);
    assert_eq!(row.get::<_, Option<i32>>(7), None);

    // Parameters used inside expressions and in a WHERE clause.
    let row = client
        .query_one(
            "SELECT $1::int4 + $2::int4, upper($3::text), length($4::bytea)",
            &[&40i32, &2i32, &"abc", &data],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, String>(1), "ABC");
    assert_eq!(row.get::<_, i32>(2), 256);
    let rows = client
        .query("SELECT i FROM typed WHERE flag = $1", &[&false])
        .await
        .unwrap();
    assert!(rows.is_empty());
}

async fn prepared_statement_reused_100_times(conninfo: String, _pg: &PgCluster) {
    let client = connect(&conninfo).await;
    let stmt = client
        .prepare("SELECT $1::int4 * 2, 'v' || $2::text")
        .await
        .unwrap();
    assert_eq!(stmt.columns().len(), 2);
    for i in 0..100i32 {
        let label = i.to_string();
        let row = client.query_one(&stmt, &[&i, &label]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i * 2);
        assert_eq!(row.get::<_, String>(1), format!("v{i}"));
    }
    // A second statement prepared afterwards does not disturb the first.
    let other = client.prepare("SELECT $1::text || '!'").await.unwrap();
    let row = client.query_one(&other, &[&"hey"]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "hey!");
    let row = client.query_one(&stmt, &[&7i32, &"x"]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 14);
}

async fn transaction_commit_and_rollback(conninfo: String, pg: &PgCluster) {
    let mut client = connect(&conninfo).await;
    client
        .batch_execute("CREATE TABLE ledger (id int PRIMARY KEY, amount int)")
        .await
        .unwrap();

    let tx = client.transaction().await.unwrap();
    tx.execute("INSERT INTO ledger VALUES (1, 100)", &[])
        .await
        .unwrap();
    // Visible inside the transaction...
    let n: i64 = tx
        .query_one("SELECT count(*) FROM ledger", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    tx.rollback().await.unwrap();
    // ...and gone after the rollback.
    let n: i64 = client
        .query_one("SELECT count(*) FROM ledger", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);

    let mut tx = client.transaction().await.unwrap();
    tx.execute("INSERT INTO ledger VALUES (2, 200)", &[])
        .await
        .unwrap();
    let sp = tx.savepoint("before_third").await.unwrap();
    sp.execute("INSERT INTO ledger VALUES (3, 300)", &[])
        .await
        .unwrap();
    sp.rollback().await.unwrap();
    tx.execute("UPDATE ledger SET amount = amount + 1 WHERE id = 2", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let pg_view =
        tokio::task::block_in_place(|| pg.admin_sql("SELECT id, amount FROM ledger ORDER BY id"));
    assert_eq!(pg_view, "2|201");
}

async fn error_then_reuse(conninfo: String, _pg: &PgCluster) {
    let mut client = connect(&conninfo).await;
    let err = client.query("SELECT 1/0", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO), "{err:?}");
    // PostgreSQL: 42601. The gateway refuses what it cannot parse (42501, "cannot
    // parse statement: <parser message>") before it reaches the server.
    let err = client.query("SELEC 1", &[]).await.unwrap_err();
    let db = err.as_db_error().expect("a server-style error");
    assert!(
        [SqlState::SYNTAX_ERROR, SqlState::INSUFFICIENT_PRIVILEGE].contains(db.code()),
        "{err:?}"
    );
    assert!(
        db.message().contains("syntax error at or near \"SELEC\""),
        "{err:?}"
    );
    let err = client
        .query("SELECT * FROM no_such_table", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_TABLE), "{err:?}");
    // An error raised at execution with bound parameters.
    let err = client
        .query_one("SELECT $1::int4 / $2::int4", &[&1i32, &0i32])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO), "{err:?}");

    let n: i32 = client.query_one("SELECT 2", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);

    // Inside a transaction the error aborts it until rollback.
    let tx = client.transaction().await.unwrap();
    tx.query("SELECT 1/0", &[]).await.unwrap_err();
    let err = tx.query("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::IN_FAILED_SQL_TRANSACTION),
        "{err:?}"
    );
    tx.rollback().await.unwrap();
    let n: i32 = client.query_one("SELECT 3", &[]).await.unwrap().get(0);
    assert_eq!(n, 3);
}

async fn copy_in_and_out(conninfo: String, pg: &PgCluster) {
    let client = connect(&conninfo).await;
    client
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        .await
        .unwrap();
    let mut csv = String::new();
    for i in 1..=10_000 {
        csv.push_str(&format!("{i},\"name, {i}\"\n"));
    }
    let sink = client
        .copy_in("COPY items (id, name) FROM STDIN (FORMAT csv)")
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    // Chunks that do not line up with rows, as a streaming client sends them.
    for chunk in csv.as_bytes().chunks(4093) {
        sink.send(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    let rows = sink.finish().await.unwrap();
    assert_eq!(rows, 10_000);
    let checked = tokio::task::block_in_place(|| {
        pg.admin_sql("SELECT count(*), sum(id), min(name), max(name) FROM items")
    });
    assert_eq!(checked, "10000|50005000|name, 1|name, 9999");

    let stream = client
        .copy_out("COPY (SELECT id, name FROM items ORDER BY id) TO STDOUT (FORMAT csv)")
        .await
        .unwrap();
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    let out: Vec<u8> = chunks.concat();
    assert_eq!(out.len(), csv.len());
    assert!(out == csv.as_bytes(), "COPY OUT differs from COPY IN");

    // A COPY that fails part-way leaves the session usable.
    let sink = client
        .copy_in("COPY items (id, name) FROM STDIN (FORMAT csv)")
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    sink.send(Bytes::from_static(b"20001,ok\nnot-a-number,bad\n"))
        .await
        .unwrap();
    let err = sink.finish().await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_TEXT_REPRESENTATION),
        "{err:?}"
    );
    let n: i64 = client
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 10_000);
}

async fn pipelined_queries_answer_in_order(conninfo: String, _pg: &PgCluster) {
    let client = connect(&conninfo).await;
    // tokio-postgres writes all of these before reading any answer.
    let queries = (0..50i32).map(|i| {
        let client = &client;
        async move {
            let row = client
                .query_one("SELECT $1::int4, repeat('x', $1::int4)", &[&i])
                .await
                .unwrap();
            (row.get::<_, i32>(0), row.get::<_, String>(1).len())
        }
    });
    let answers = futures_util::future::join_all(queries).await;
    for (i, (n, len)) in answers.into_iter().enumerate() {
        assert_eq!(n as usize, i);
        assert_eq!(len, i);
    }
}

async fn listen_notify(conninfo: String, _pg: &PgCluster) {
    let (listener, mut connection) = tokio_postgres::connect(&conninfo, NoTls).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(message) => {
                    if tx.send(message).is_err() {
                        break;
                    }
                }
                Err(e) => panic!("listener connection: {e}"),
            }
        }
    });
    listener
        .batch_execute("LISTEN orders_changed")
        .await
        .unwrap();

    let notifier = connect(&conninfo).await;
    notifier
        .batch_execute("NOTIFY orders_changed, 'order 42'")
        .await
        .unwrap();
    notifier
        .query("SELECT pg_notify('orders_changed', $1)", &[&"order 43"])
        .await
        .unwrap();

    let mut payloads = Vec::new();
    while payloads.len() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("notification did not arrive within 10 s")
            .expect("listener connection closed");
        if let AsyncMessage::Notification(n) = message {
            assert_eq!(n.channel(), "orders_changed");
            payloads.push(n.payload().to_string());
        }
    }
    assert_eq!(payloads, ["order 42", "order 43"]);
}

async fn simple_query_protocol(conninfo: String, _pg: &PgCluster) {
    let client = connect(&conninfo).await;
    let messages = client
        .simple_query("SELECT 1 AS a, NULL AS b; SELECT 'two'; CREATE TEMP TABLE tt (x int)")
        .await
        .unwrap();
    let mut seen = Vec::new();
    for m in &messages {
        match m {
            SimpleQueryMessage::Row(row) => seen.push(format!(
                "row:{:?}",
                (0..row.len()).map(|i| row.get(i)).collect::<Vec<_>>()
            )),
            SimpleQueryMessage::CommandComplete(n) => seen.push(format!("done:{n}")),
            SimpleQueryMessage::RowDescription(_) => {}
            _ => seen.push("other".to_string()),
        }
    }
    assert_eq!(
        seen,
        [
            "row:[Some(\"1\"), None]",
            "done:1",
            "row:[Some(\"two\")]",
            "done:1",
            "done:0"
        ]
    );
}

async fn concurrent_sessions_stay_isolated(conninfo: String, _pg: &PgCluster) {
    const SESSIONS: i32 = 40;
    let sessions = (0..SESSIONS).map(|i| {
        let conninfo = conninfo.clone();
        tokio::spawn(async move {
            let client = connect(&conninfo).await;
            // Session state that must not bleed between clients.
            client
                .batch_execute(&format!(
                    "CREATE TEMP TABLE mine (v int); INSERT INTO mine VALUES ({i}); \
                     SET application_name = 'session-{i}'"
                ))
                .await
                .unwrap();
            let mut pids = Vec::new();
            for _ in 0..5 {
                let row = client
                    .query_one(
                        "SELECT (SELECT v FROM mine), current_setting('application_name'), \
                         pg_backend_pid()",
                        &[],
                    )
                    .await
                    .unwrap();
                assert_eq!(row.get::<_, i32>(0), i);
                assert_eq!(row.get::<_, String>(1), format!("session-{i}"));
                pids.push(row.get::<_, i32>(2));
                tokio::task::yield_now().await;
            }
            pids.dedup();
            assert_eq!(pids.len(), 1, "session {i} moved between server processes");
            pids[0]
        })
    });
    let mut pids = Vec::new();
    for handle in futures_util::future::join_all(sessions).await {
        pids.push(handle.unwrap());
    }
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(
        pids.len(),
        SESSIONS as usize,
        "sessions shared a server process"
    );
}
