//! Hot reload in standalone mode: editing a `-f` file (or SIGHUP) puts a new
//! configuration in force without a restart. Open sessions judge their next
//! statement by it, sessions it no longer admits end with a FATAL that says
//! why, a broken edit is refused whole while the last good configuration keeps
//! serving, and reloading again and again leaks neither tasks nor memory.

use std::fs;
use std::time::{Duration, Instant};

use pgwarden_e2e::{policy_with_rules, wait_until, Endpoint, Gateway, PgCluster};
use tokio_postgres::{Client, NoTls};

/// How fast an edit must reach an open session (the files are polled every second).
const RELOAD_WITHIN: Duration = Duration::from_secs(2);

const FIXTURE: &str = "CREATE TABLE orders (id int PRIMARY KEY, total int NOT NULL);
CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL);
INSERT INTO orders VALUES (1, 10), (2, 20);
INSERT INTO notes VALUES (1, 'hello');";

fn rules(tables: &str) -> String {
    format!(
        "  defaultAction: Deny\n  rules:\n    - {{name: app, action: Allow, statements: [SELECT], tables: [{tables}]}}\n"
    )
}

async fn connect(
    gw: &Gateway,
) -> (
    Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let (client, connection) = tokio_postgres::connect(&gw.conninfo(), NoTls)
        .await
        .expect("connect through the gateway");
    (client, tokio::spawn(connection))
}

/// Replace the policy file the way editors do: write a new file, rename it over.
fn edit_policy(gw: &Gateway, text: &str) {
    let path = gw.dir().join("policy.yaml");
    let tmp = gw.dir().join("policy.yaml.new");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, &path).unwrap();
}

fn metric(gw: &Gateway, name: &str) -> f64 {
    let (_, body) = gw.http_get("/metrics");
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn allowed(client: &Client, sql: &str) -> Result<(), String> {
    match client.simple_query(sql).await {
        Ok(_) => Ok(()),
        Err(e) => Err(e
            .as_db_error()
            .map(|d| format!("{} {}", d.code().code(), d.message()))
            .unwrap_or_else(|| e.to_string())),
    }
}

/// Keep asking on the same connection until `want` holds or the time is up.
async fn within(client: &Client, sql: &str, want: bool) -> Duration {
    let start = Instant::now();
    loop {
        if allowed(client, sql).await.is_ok() == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < RELOAD_WITHIN + Duration::from_secs(1),
            "after {:?} `{sql}` is still {}",
            start.elapsed(),
            if want { "refused" } else { "allowed" }
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_session_follows_edits_of_the_policy_file() {
    let pg = PgCluster::start();
    pg.admin_sql(FIXTURE);
    let gw = Gateway::builder(&pg)
        .policy_yaml(policy_with_rules(
            pg.port(),
            None,
            &rules("\"public.orders\""),
        ))
        .start();
    let (client, _conn) = connect(&gw).await;
    allowed(&client, "SELECT * FROM orders").await.unwrap();
    let refused = allowed(&client, "SELECT * FROM notes").await.unwrap_err();
    assert!(refused.starts_with("42501"), "{refused}");

    // Widen: the same connection may read notes within the reload delay.
    edit_policy(
        &gw,
        &policy_with_rules(
            pg.port(),
            None,
            &rules("\"public.orders\", \"public.notes\""),
        ),
    );
    let took = within(&client, "SELECT * FROM notes", true).await;
    assert!(took <= RELOAD_WITHIN, "took {took:?}");

    // Narrow again: refused on the same connection, which stays usable.
    edit_policy(
        &gw,
        &policy_with_rules(pg.port(), None, &rules("\"public.notes\"")),
    );
    within(&client, "SELECT * FROM orders", false).await;
    allowed(&client, "SELECT * FROM notes").await.unwrap();
    assert_eq!(
        metric(&gw, "pgwarden_config_reloads_total{result=\"ok\"}"),
        2.0
    );

    // SIGHUP reloads too (and no longer kills the gateway).
    let before = metric(&gw, "pgwarden_config_reloads_total{result=\"ok\"}");
    let status = std::process::Command::new("kill")
        .args(["-HUP", &gw.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        wait_until(Duration::from_secs(5), || metric(
            &gw,
            "pgwarden_config_reloads_total{result=\"ok\"}"
        ) > before),
        "SIGHUP did not reload:\n{}",
        gw.logs()
    );
    gw.assert_running();
    allowed(&client, "SELECT * FROM notes").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_subject_ends_its_open_session_with_the_reason() {
    let pg = PgCluster::start();
    pg.admin_sql(FIXTURE);
    let gw = Gateway::builder(&pg)
        .policy_yaml(policy_with_rules(
            pg.port(),
            None,
            &rules("\"public.orders\""),
        ))
        .start();
    let (client, conn) = connect(&gw).await;
    allowed(&client, "SELECT * FROM orders").await.unwrap();
    // A second session that only executes what it prepared before the edit
    // (Bind/Execute/Sync: no new statement text).
    let (prepared_client, _c) = connect(&gw).await;
    let stmt = prepared_client
        .prepare("SELECT total FROM orders WHERE id = $1")
        .await
        .unwrap();
    prepared_client.query(&stmt, &[&1i32]).await.unwrap();

    // The policy now trusts local clients as somebody else.
    let text = policy_with_rules(pg.port(), None, &rules("\"public.orders\"")).replace(
        "localTrust: {subject: dev}",
        "localTrust: {subject: ci-bot}",
    );
    assert!(text.contains("ci-bot"));
    edit_policy(&gw, &text);
    let start = Instant::now();
    let err = loop {
        match allowed(&client, "SELECT * FROM orders").await {
            Ok(()) => {
                assert!(
                    start.elapsed() < RELOAD_WITHIN + Duration::from_secs(1),
                    "never revoked"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => break e,
        }
    };
    assert!(err.starts_with("28000"), "{err}");
    assert!(err.contains("access revoked"), "{err}");
    assert!(err.contains("dev"), "{err}");
    let again = prepared_client.query(&stmt, &[&1i32]).await.unwrap_err();
    let again = again
        .as_db_error()
        .map(|d| format!("{} {}", d.code().code(), d.message()))
        .unwrap_or_else(|| again.to_string());
    assert!(
        again.starts_with("28000"),
        "a prepared statement ran after revocation: {again}"
    );
    // The connection is closed, not left open.
    let closed = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(closed.is_ok(), "the revoked connection stayed open");
    assert!(
        metric(
            &gw,
            "pgwarden_sessions_reconfigured_total{reason=\"revoked\"}"
        ) >= 1.0
    );
    // A new connection is the new subject.
    let (client, _conn) = connect(&gw).await;
    allowed(&client, "SELECT * FROM orders").await.unwrap();
    assert!(
        gw.logs().contains("ci-bot") || gw.logs().contains("session ended by a new configuration")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_edit_is_refused_and_the_last_good_policy_keeps_serving() {
    let pg = PgCluster::start();
    pg.admin_sql(FIXTURE);
    let good = policy_with_rules(pg.port(), None, &rules("\"public.orders\""));
    let gw = Gateway::builder(&pg).policy_yaml(good.clone()).start();
    let (client, _conn) = connect(&gw).await;
    allowed(&client, "SELECT * FROM orders").await.unwrap();

    // An invalid action, and a widening that would have allowed notes.
    let broken = policy_with_rules(
        pg.port(),
        None,
        &rules("\"public.orders\", \"public.notes\"").replace("action: Allow", "action: Permit"),
    );
    edit_policy(&gw, &broken);
    assert!(
        wait_until(Duration::from_secs(5), || metric(
            &gw,
            "pgwarden_config_reloads_total{result=\"failed\"}"
        ) >= 1.0),
        "the broken edit was not counted:\n{}",
        gw.logs()
    );
    // Old verdicts on the open session and on a new one.
    allowed(&client, "SELECT * FROM orders").await.unwrap();
    assert!(allowed(&client, "SELECT * FROM notes").await.is_err());
    let (fresh, _c) = connect(&gw).await;
    assert!(allowed(&fresh, "SELECT * FROM notes").await.is_err());
    // The log names the field.
    let logs = gw.logs();
    assert!(logs.contains("reload refused"), "{logs}");
    assert!(logs.contains("spec.rules[0].action"), "{logs}");
    gw.assert_running();
}

/// 200 reloads: the gateway's task count and memory stay flat (old policies'
/// background work ends with them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_reloads_leave_tasks_and_memory_flat() {
    let pg = PgCluster::start();
    pg.admin_sql(FIXTURE);
    // With masking, so each policy has background work (its column-map
    // refresher) that must end when the policy is replaced.
    let masked = |tables: &str| {
        format!(
            "{}  masking:\n    - {{columns: [\"public.notes.body\"], strategy: Redact}}\n",
            rules(tables)
        )
    };
    let a = policy_with_rules(pg.port(), None, &masked("\"public.orders\""));
    let b = policy_with_rules(
        pg.port(),
        None,
        &masked("\"public.orders\", \"public.notes\""),
    );
    let gw = Gateway::builder(&pg).policy_yaml(a.clone()).start();
    let (client, _conn) = connect(&gw).await;
    // Warm up: a few reloads and statements so lazily created state exists.
    let hup = |gw: &Gateway| {
        let s = std::process::Command::new("kill")
            .args(["-HUP", &gw.pid().to_string()])
            .status()
            .unwrap();
        assert!(s.success());
    };
    let reloads = |gw: &Gateway| metric(gw, "pgwarden_config_reloads_total{result=\"ok\"}");
    for i in 0..10 {
        edit_policy(&gw, if i % 2 == 0 { &b } else { &a });
        hup(&gw);
        let want = reloads(&gw) + 1.0;
        assert!(wait_until(Duration::from_secs(5), || reloads(&gw) >= want));
        allowed(&client, "SELECT * FROM orders").await.unwrap();
    }
    let tasks_before = metric(&gw, "pgwarden_runtime_tasks");
    let rss_before = gw.rss_kib();
    for i in 0..200 {
        edit_policy(&gw, if i % 2 == 0 { &b } else { &a });
        hup(&gw);
        let want = reloads(&gw) + 1.0;
        assert!(
            wait_until(Duration::from_secs(5), || reloads(&gw) >= want),
            "reload {i} did not happen"
        );
        allowed(&client, "SELECT * FROM orders").await.unwrap();
    }
    let tasks_after = metric(&gw, "pgwarden_runtime_tasks");
    let rss_after = gw.rss_kib();
    eprintln!("tasks {tasks_before} -> {tasks_after}, RSS {rss_before} KiB -> {rss_after} KiB");
    assert!(
        tasks_after <= tasks_before + 2.0,
        "tasks grew from {tasks_before} to {tasks_after}"
    );
    assert!(
        rss_after <= rss_before + 8 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB over 200 reloads"
    );
}
