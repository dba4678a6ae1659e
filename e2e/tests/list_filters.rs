//! The reviewer's listings narrowed as a busy gateway needs (issue 20):
//! `approvals list --phase/--subject/--since/--limit`, `sessions list` with
//! the same filters, and IDs given as a unique prefix to every command that
//! takes one (an ambiguous prefix is refused naming the candidates). Real
//! PostgreSQL, the real gateway, the real `pgwarden` CLI as separate
//! processes.

use std::time::Duration;

use pgwarden_e2e::approvals::{os_user, request_id_in};
use pgwarden_e2e::recording::{recording_yaml, SessionsCli, Spool};
use pgwarden_e2e::{
    policy_with_rules, run_psql, wait_until, ApprovalsCli, Endpoint, Gateway, PgCluster,
    POLICY_NAME,
};
use serde_json::Value;

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, note text);
INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 5) g;
";

fn rules() -> String {
    format!(
        "  defaultAction: Deny
  rules:
    - {{name: reads, action: Allow, statements: [SELECT], tables: [\"public.*\"]}}
    - {{name: item-deletes, action: RequireApproval, statements: [DELETE], tables: [\"public.items\"]}}
  approval:
    approvers: {{users: [{}]}}
    wait: 0s
    expiresAfter: 1h
{}",
        os_user(),
        recording_yaml(None, false, None)
    )
}

/// The request ID a fail-fast approval NOTICE names for `sql`.
fn ask(gw: &Gateway, sql: &str) -> String {
    let out = run_psql(&gw.env(), &["-c", sql], None);
    let err = String::from_utf8_lossy(&out.stderr);
    request_id_in(&err).unwrap_or_else(|| panic!("no request id for {sql}: {err}"))
}

fn ids(list: &[Value]) -> Vec<String> {
    list.iter()
        .map(|v| v["id"].as_str().expect("id").to_owned())
        .collect()
}

fn json_list(out: &pgwarden_e2e::CliOutput) -> Vec<Value> {
    assert_eq!(out.code(), Some(0), "{out}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|_| panic!("not JSON: {out}"))
}

/// The shortest prefix of `id` (past the policy name) no other ID starts with.
fn unique_prefix(id: &str, all: &[String]) -> String {
    (POLICY_NAME.len() + 2..=id.len())
        .map(|n| id[..n].to_owned())
        .find(|p| all.iter().filter(|o| o.starts_with(p.as_str())).count() == 1)
        .expect("a unique prefix")
}

#[test]
fn approvals_list_filters_and_ids_by_unique_prefix() {
    let pg = PgCluster::start();
    pg.admin_sql(SCHEMA);
    let state = tempfile::tempdir().unwrap();
    let gw = Gateway::builder(&pg)
        .policy_yaml(policy_with_rules(pg.port(), None, &rules()))
        .state_dir(state.path())
        .start();
    let cli = ApprovalsCli::new(state.path());
    // createdAt has whole seconds (as Kubernetes timestamps do): one second
    // apart, so "newest first" has one right answer.
    let first = ask(&gw, "DELETE FROM items WHERE id = 1");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let second = ask(&gw, "DELETE FROM items WHERE id = 2");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let third = ask(&gw, "DELETE FROM items WHERE id = 3");
    let all = vec![first.clone(), second.clone(), third.clone()];

    // A unique prefix is the request: show, approve and deny take it.
    let shown = cli.show(&unique_prefix(&first, &all));
    assert_eq!(shown["id"], first.as_str());
    let out = cli.run(&["deny", &unique_prefix(&second, &all), "--reason", "no"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stdout.contains(&second), "{out}");
    let out = cli.run(&["approve", &unique_prefix(&third, &all), "--reason", "ok"]);
    assert_eq!(out.code(), Some(0), "{out}");
    // Every request starts with the policy's name: ambiguous, all named.
    let out = cli.run(&["show", &format!("{POLICY_NAME}-")]);
    assert_eq!(out.code(), Some(1), "{out}");
    for id in &all {
        assert!(out.stderr.contains(id.as_str()), "{out}");
    }
    let out = cli.run(&["approve", "nothing-like-it"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("nothing-like-it"), "{out}");

    // --phase.
    let pending = json_list(&cli.run(&["list", "--phase", "pending", "-o", "json"]));
    assert_eq!(ids(&pending), vec![first.clone()]);
    let denied = json_list(&cli.run(&["list", "--phase", "Denied", "-o", "json"]));
    assert_eq!(ids(&denied), vec![second.clone()]);
    let out = cli.run(&["list", "--phase", "maybe"]);
    assert_eq!(out.code(), Some(2), "{out}");

    // --subject (a glob on the requester's subject).
    assert_eq!(
        json_list(&cli.run(&["list", "--subject", "d?v", "-o", "json"])).len(),
        3
    );
    assert!(json_list(&cli.run(&["list", "--subject", "ci:*", "-o", "json"])).is_empty());

    // --since: a duration back from now, or an RFC 3339 time.
    assert_eq!(
        json_list(&cli.run(&["list", "--since", "1h", "-o", "json"])).len(),
        3
    );
    let future = json_list(&cli.run(&["list", "--since", "2999-01-01T00:00:00Z", "-o", "json"]));
    assert!(future.is_empty());

    // --limit: the newest N, newest first.
    let newest = json_list(&cli.run(&["list", "--limit", "2", "-o", "json"]));
    assert_eq!(ids(&newest), vec![third.clone(), second.clone()]);
}

#[test]
fn sessions_list_filters_and_replay_by_unique_prefix() {
    let pg = PgCluster::start();
    pg.admin_sql(SCHEMA);
    let state = tempfile::tempdir().unwrap();
    let gw = Gateway::builder(&pg)
        .policy_yaml(policy_with_rules(pg.port(), None, &rules()))
        .state_dir(state.path())
        .start();
    for n in 1..=3 {
        let out = run_psql(
            &gw.env(),
            &["-c", &format!("SELECT {n} AS session_{n}")],
            None,
        );
        assert!(out.status.success());
        // Distinct start times, so "newest" is well defined.
        std::thread::sleep(Duration::from_millis(20));
    }
    let cli = SessionsCli::state_dir(state.path());
    assert!(
        wait_until(Duration::from_secs(10), || cli
            .list()
            .iter()
            .filter(|s| s["ended"].is_string())
            .count()
            == 3),
        "three ended sessions: {:?}",
        Spool::new(state.path()).records()
    );
    let all = ids(&cli.list());
    assert_eq!(all.len(), 3);

    let newest = json_list(&cli.run(&["list", "--limit", "2", "-o", "json"]));
    assert_eq!(ids(&newest), vec![all[2].clone(), all[1].clone()]);
    assert_eq!(
        json_list(&cli.run(&["list", "--since", "10m", "--subject", "dev", "-o", "json"])).len(),
        3
    );
    assert!(json_list(&cli.run(&["list", "--subject", "ci:*", "-o", "json"])).is_empty());
    assert!(
        json_list(&cli.run(&["list", "--since", "2999-01-01T00:00:00Z", "-o", "json"])).is_empty()
    );

    // replay by a unique prefix of the last session's ID.
    let last = &all[2];
    let prefix = (1..=last.len())
        .map(|n| &last[..n])
        .find(|p| all.iter().filter(|o| o.starts_with(p)).count() == 1)
        .unwrap();
    let replay = cli.run(&["replay", prefix]);
    assert_eq!(replay.code(), Some(0), "{replay}");
    assert!(replay.stdout.contains("SELECT 3 AS session_3"), "{replay}");
    let out = cli.run(&["replay", "zzzz"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("no session zzzz"), "{out}");
    // A shared prefix (when two IDs have one) is refused naming both.
    let shared = all.iter().enumerate().find_map(|(i, a)| {
        all[i + 1..].iter().find_map(|b| {
            let n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
            (n > 0).then(|| (a[..n].to_owned(), a.clone(), b.clone()))
        })
    });
    if let Some((p, a, b)) = shared {
        let out = cli.run(&["replay", &p]);
        assert_eq!(out.code(), Some(1), "{out}");
        assert!(out.stderr.contains(&a) && out.stderr.contains(&b), "{out}");
    }
}
