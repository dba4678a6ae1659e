//! The kubectl plugin (issue 17 item 7) and the reviewer's estimate (item
//! 6), on the test API server with the real operator, sidecar, PostgreSQL
//! and kubectl: the built `pgwarden` binary is put on PATH as
//! `kubectl-pgwarden`, and `kubectl pgwarden pending|show|approve|deny`
//! run as the reviewers `alice` (dba-oncall) and `bob`.
//!
//! A held `DELETE FROM t WHERE id < 100` shows the planner's estimate
//! (`kubectl pgwarden pending`, `show`, `kubectl get apr -o wide`); bob's
//! approval is refused with the webhook's message; alice's (by an ID
//! prefix) releases it. A DELETE whose WHERE calls a user function shows
//! `unknown` and why; alice denies it and psql reads her reason. Without
//! kubectl on PATH the plugin says so.
//!
//! Needs `cargo build -p pgwarden-sidecar -p pgwarden-operator` first.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use pgwarden_e2e::approval_cluster::{
    eventually, kubectl_ok as ok, shop_policy, text, ApprovalCluster, ApprovalClusterSpec, NS,
    REVIEWER_RBAC,
};
use pgwarden_e2e::psql_session::PsqlSession;
use pgwarden_e2e::{pgwarden_bin, PgCluster, APP_DATABASE};
use pgwarden_testapi::TestApiServer;
use serde_json::json;

/// DELETEs of `t` wait for dba-oncall; `keep()` (a user function) may be
/// called, so a DELETE that calls it is held too, not refused.
fn policy(pg_port: u16, approval: &str) -> String {
    shop_policy(
        pg_port,
        &format!(
            "  rules:
    - {{name: app, action: Allow, statements: [SELECT], tables: [public.t]}}
    - {{name: deletes, action: RequireApproval, statements: [DELETE], tables: [public.t]}}
    - {{name: keep, action: Allow, functions: [keep, public.keep]}}
  approval:
    approvers: {{groups: [dba-oncall]}}
    {approval}
"
        ),
    )
}

fn cluster(pg: &PgCluster, approval: &str) -> ApprovalCluster {
    ApprovalCluster::start(&ApprovalClusterSpec {
        dir_prefix: "pgwarden-e2e-kplug-",
        manifests: &[&policy(pg.port(), approval), REVIEWER_RBAC],
        ready_table: "t",
    })
}

fn fixture(pg: &PgCluster) {
    pg.admin_sql(&format!(
        "\\c {APP_DATABASE}\n\
         CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL);\n\
         INSERT INTO t SELECT g, g FROM generate_series(1, 1000) g;\n\
         ANALYZE t;\n\
         CREATE FUNCTION keep(int) RETURNS boolean IMMUTABLE LANGUAGE sql AS 'SELECT $1 % 2 = 0';\n\
         ALTER TABLE t OWNER TO {user};\n\
         ALTER FUNCTION keep(int) OWNER TO {user};",
        user = pgwarden_e2e::APP_USER
    ));
}

/// The request id in a hold NOTICE.
fn id_from_notice(notice: &str) -> String {
    notice
        .split("approval of request ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("request id in the NOTICE")
        .to_owned()
}

/// `kubectl pgwarden ARGS` as `user`, with `bin_dir` (holding the plugin)
/// first on PATH.
struct Plugin {
    kubeconfig: PathBuf,
    cache: PathBuf,
    path: std::ffi::OsString,
}

impl Plugin {
    fn install(api: &TestApiServer, dir: &Path) -> Plugin {
        let bin_dir = dir.join("plugin-bin");
        fs::create_dir_all(&bin_dir).expect("plugin dir");
        std::os::unix::fs::symlink(pgwarden_bin(), bin_dir.join("kubectl-pgwarden"))
            .expect("symlink kubectl-pgwarden");
        let mut path = vec![bin_dir];
        path.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        Plugin {
            kubeconfig: api.kubeconfig().to_owned(),
            cache: api.dir().join("kubectl-cache"),
            path: std::env::join_paths(path).expect("PATH"),
        }
    }

    fn run(&self, user: &str, args: &[&str]) -> Output {
        Command::new("kubectl")
            .arg("pgwarden")
            .args(args)
            .args(["-n", NS, "--context", user])
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .env("PATH", &self.path)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl pgwarden")
    }

    fn ok(&self, user: &str, args: &[&str]) -> String {
        let o = self.run(user, args);
        assert!(
            o.status.success(),
            "kubectl pgwarden {args:?} as {user}:\n{}",
            text(&o)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

/// The estimated rows in `pending`'s line for `id`.
fn pending_rows(table: &str, id: &str) -> String {
    let header = table.lines().next().expect("header");
    let col = header.find("EST. ROWS").expect("EST. ROWS column");
    let row = table
        .lines()
        .find(|l| l.starts_with(id))
        .unwrap_or_else(|| panic!("{id} not pending:\n{table}"));
    row[col..]
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[test]
fn reviewers_decide_with_kubectl_pgwarden_and_see_the_estimate() {
    let pg = PgCluster::start();
    fixture(&pg);
    let c = cluster(&pg, "wait: 60s");
    let plugin = Plugin::install(&c.api, c.dir.path());

    // A held DELETE: the reviewer sees the planner's estimate.
    let mut psql = PsqlSession::start(c.sidecar_port, "DELETE FROM t WHERE id < 100");
    let id = id_from_notice(&psql.wait_line("waiting up to", Duration::from_secs(20)));
    let pending = plugin.ok("alice", &["pending"]);
    assert!(
        pending.contains("DELETE FROM t WHERE id < 100"),
        "{pending}"
    );
    let rows: u64 = pending_rows(&pending, &id)
        .parse()
        .unwrap_or_else(|_| panic!("no estimate for {id}:\n{pending}\n{}", c.logs()));
    // 99 rows match; the planner's estimate from the statistics is close.
    assert!((50..=200).contains(&rows), "{pending}");
    let r = c.apr(&id);
    assert_eq!(r["spec"]["estimate"]["rows"], rows, "{r}");
    assert_eq!(r["spec"]["estimate"]["tables"], json!(["public.t"]), "{r}");
    let wide = ok(
        &c.api,
        "alice",
        &["get", "apr", "-n", NS, "-o", "wide"],
        None,
    );
    let header = wide.lines().next().unwrap_or_default();
    assert!(header.contains("EST. ROWS"), "{wide}");
    let row = wide
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_default();
    assert!(
        row.split_whitespace().any(|w| w == rows.to_string()),
        "{wide}"
    );
    let described = ok(&c.api, "alice", &["describe", "apr", "-n", NS, &id], None);
    assert!(described.contains("Estimate:"), "{described}");
    assert!(described.contains("public.t"), "{described}");

    // show, by a unique prefix of the ID.
    let prefix = &id[..id.len() - 2];
    let shown = plugin.ok("alice", &["show", prefix]);
    assert!(shown.contains(&format!("id:          {id}")), "{shown}");
    assert!(
        shown.contains(&format!("estimate:    ~{rows} rows (public.t)")),
        "{shown}"
    );

    // bob is not an approver: the webhook's refusal, verbatim.
    let o = plugin.run("bob", &["approve", &id, "--reason", "lgtm"]);
    assert!(
        !o.status.success(),
        "bob's approval was admitted: {}",
        text(&o)
    );
    let e = text(&o);
    assert!(e.contains("bob may not decide ApprovalRequest ci/"), "{e}");
    assert!(e.contains("group dba-oncall"), "{e}");
    assert_eq!(c.apr(&id)["status"]["phase"], "Pending");

    // alice approves by the prefix: the statement runs on psql's connection.
    plugin.ok("alice", &["approve", prefix, "--reason", "reviewed"]);
    let (success, out, err) = psql.finish(Duration::from_secs(20));
    assert!(success, "psql failed:\n{out}\n{err}\n{}", c.logs());
    assert!(out.contains("DELETE 99"), "{out}");
    let r = eventually(Duration::from_secs(10), "Executed", || {
        let r = c.apr(&id);
        (r["status"]["phase"] == "Executed").then_some(r)
    });
    assert_eq!(r["spec"]["decision"]["decidedBy"], "alice");
    assert_eq!(r["spec"]["decision"]["reason"], "reviewed");
    assert!(!plugin.ok("alice", &["pending"]).contains(&id));

    // A DELETE whose WHERE calls user code is never planned: unknown, and why.
    let mut psql = PsqlSession::start(c.sidecar_port, "DELETE FROM t WHERE keep(id)");
    let id2 = id_from_notice(&psql.wait_line("waiting up to", Duration::from_secs(20)));
    let pending = plugin.ok("alice", &["pending"]);
    assert_eq!(pending_rows(&pending, &id2), "unknown", "{pending}");
    let shown = plugin.ok("alice", &["show", &id2]);
    assert!(
        shown.contains("estimate:    unknown: the statement calls user code"),
        "{shown}"
    );
    assert!(c.apr(&id2)["spec"]["estimate"]["rows"].is_null());
    // "shop-" starts both requests.
    let o = plugin.run("alice", &["show", "shop-"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("is the start of several requests"),
        "{}",
        text(&o)
    );
    plugin.ok(
        "alice",
        &["deny", &id2, "--reason", "not during the freeze"],
    );
    let (success, _, err) = psql.finish(Duration::from_secs(20));
    assert!(!success);
    assert!(
        err.contains("denied by alice: not during the freeze"),
        "{err}"
    );
    assert_eq!(pg.admin_sql("SELECT count(*) FROM t"), "901");

    // Without kubectl on PATH the plugin says what it needs.
    let empty = c.dir.path().join("empty-bin");
    fs::create_dir_all(&empty).expect("dir");
    let o = Command::new(pgwarden_bin())
        .args(["kubectl", "pending", "-n", NS])
        .env("PATH", &empty)
        .output()
        .expect("run pgwarden kubectl");
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("kubectl was not found on PATH"),
        "{}",
        text(&o)
    );
}
