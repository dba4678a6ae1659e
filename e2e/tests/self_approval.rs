//! An agent cannot approve its own request (issue 20, item 4), with real
//! OS users: a client of the gateway's Unix socket (`--listen-unix`) is
//! known to the kernel by uid, and so is a loopback TCP client (the owner
//! of its socket); its approval request records that OS user;
//! `pgwarden approvals approve` run by the same OS user is refused, and so
//! is anyone `approval.approvers.users` does not list (root included).
//!
//! The state directory is opened to every user here on purpose: that is
//! the setup the issue reproduced (the agent can run the approve command
//! the NOTICE hands it), so the OS-user checks are the only guard left.
//! Needs root (to create users and run commands as them); skipped otherwise.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use pgwarden_e2e::approvals::request_id_in;
use pgwarden_e2e::{pgwarden_bin, policy_with_rules, Gateway, PgCluster, APP_DATABASE};
use serde_json::Value;

const AGENT: &str = "pgw-agent";
const REVIEWER: &str = "pgw-reviewer";
const OTHER: &str = "pgw-other";

const DELETE: &str = "DELETE FROM items WHERE id = 1";

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("run id -u");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// A system user without a home, created once (exit 9: created meanwhile
/// by a parallel test).
fn ensure_user(name: &str) {
    if Command::new("id")
        .arg(name)
        .output()
        .unwrap()
        .status
        .success()
    {
        return;
    }
    let out = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/bin/false",
            name,
        ])
        .output()
        .expect("run useradd");
    assert!(
        out.status.success() || out.status.code() == Some(9),
        "useradd {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn as_user(user: &str, program: &Path, args: &[&str]) -> Output {
    Command::new("runuser")
        .args(["-u", user, "--"])
        .arg(program)
        .args(args)
        .env("LC_ALL", "C")
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGPASSWORD")
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .output()
        .expect("run runuser")
}

/// `psql -c sql` as `user` through the gateway's Unix socket in `dir`.
fn psql_as(user: &str, dir: &Path, port: u16, sql: &str) -> Output {
    psql_at(user, dir.to_str().unwrap(), port, sql)
}

/// `psql -h host -c sql` as `user` (a socket directory or a TCP address).
fn psql_at(user: &str, host: &str, port: u16, sql: &str) -> Output {
    let port = port.to_string();
    as_user(
        user,
        Path::new("psql"),
        &[
            "-X",
            "-h",
            host,
            "-p",
            &port,
            "-d",
            APP_DATABASE,
            "-U",
            "dev",
            "-c",
            sql,
        ],
    )
}

fn decide_as(user: &str, state: &Path, verb: &str, id: &str) -> Output {
    as_user(
        user,
        &pgwarden_bin(),
        &[
            "approvals",
            verb,
            id,
            "--state-dir",
            state.to_str().unwrap(),
        ],
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Everyone may read and write everything under `dir` (see the module doc).
fn open_to_all(dir: &Path) {
    let out = Command::new("chmod")
        .args(["-R", "a+rwX"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn the_requesting_os_user_and_unlisted_users_cannot_decide() {
    if !is_root() {
        eprintln!("skipped: needs root (useradd, runuser) to act as several OS users");
        return;
    }
    for u in [AGENT, REVIEWER, OTHER] {
        ensure_user(u);
    }
    let pg = PgCluster::start();
    pg.admin_sql(
        "CREATE TABLE items (id int PRIMARY KEY);
         INSERT INTO items SELECT generate_series(1, 10);",
    );
    let socket_dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    for d in [socket_dir.path(), state.path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let rules = format!(
        "  defaultAction: Deny
  rules:
    - {{name: deletes, action: RequireApproval, statements: [DELETE]}}
    - {{name: app, action: Allow, statements: [SELECT, DELETE], tables: [\"public.*\"]}}
  approval:
    approvers: {{users: [{REVIEWER}]}}
    wait: 0s
"
    );
    let gw = Gateway::builder(&pg)
        .policy_yaml(policy_with_rules(pg.port(), None, &rules))
        .state_dir(state.path().join("state"))
        .arg("--listen-unix")
        .arg(socket_dir.path())
        .start();
    let sock = socket_dir.path().join(format!(".s.PGSQL.{}", gw.port()));
    assert!(sock.exists(), "no {}", sock.display());

    // The agent asks through the socket: held, fail fast, with a request.
    let out = psql_as(AGENT, socket_dir.path(), gw.port(), DELETE);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "the DELETE ran unapproved: {stderr}");
    let id = request_id_in(&stderr).unwrap_or_else(|| panic!("no request id in: {stderr}"));
    open_to_all(&gw.state_dir());

    let show = Command::new(pgwarden_bin())
        .args(["approvals", "show", &id, "-o", "json", "--state-dir"])
        .arg(gw.state_dir())
        .output()
        .unwrap();
    let shown: Value = serde_json::from_slice(&show.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", text(&show.stderr)));
    assert_eq!(shown["requester"]["osUser"], AGENT, "{shown}");
    assert_eq!(shown["approvers"]["users"][0], REVIEWER, "{shown}");

    // The agent itself, a user the policy does not list, and root: refused.
    let mine = decide_as(AGENT, &gw.state_dir(), "approve", &id);
    assert_eq!(mine.status.code(), Some(1), "{mine:?}");
    assert!(
        text(&mine.stderr).contains(&format!(
            "{AGENT} requested {id} and cannot decide it: you cannot decide your own request"
        )),
        "{mine:?}"
    );
    let denied_self = decide_as(AGENT, &gw.state_dir(), "deny", &id);
    assert_eq!(denied_self.status.code(), Some(1), "{denied_self:?}");
    for who in [OTHER, "root"] {
        let out = decide_as(who, &gw.state_dir(), "approve", &id);
        assert_eq!(out.status.code(), Some(1), "{who}: {out:?}");
        assert!(
            text(&out.stderr).contains(&format!(
                "{who} may not decide {id}: the policy's approval.approvers allows user {REVIEWER}"
            )),
            "{who}: {out:?}"
        );
    }
    assert_eq!(pg.admin_sql("SELECT count(*) FROM items"), "10");

    // The listed reviewer approves; the agent's retry runs once.
    let ok = decide_as(REVIEWER, &gw.state_dir(), "approve", &id);
    assert!(ok.status.success(), "{ok:?}");
    assert!(
        text(&ok.stdout).contains(&format!("approved {id} (decided by {REVIEWER})")),
        "{ok:?}"
    );
    let retry = psql_as(AGENT, socket_dir.path(), gw.port(), DELETE);
    assert!(retry.status.success(), "{}", text(&retry.stderr));
    assert_eq!(pg.admin_sql("SELECT count(*) FROM items"), "9");
    gw.assert_running();

    // The socket file goes with the gateway.
    gw.shutdown();
    assert!(!sock.exists(), "{} left behind", sock.display());
}

/// The gateway and its policy for these tests: DELETEs need approval by
/// [`REVIEWER`], fail fast. `env` goes to `pgwarden run`.
fn held_deletes(pg: &PgCluster, state: &Path, env: &[(&str, &str)]) -> Gateway {
    pg.admin_sql(
        "CREATE TABLE items (id int PRIMARY KEY);
         INSERT INTO items SELECT generate_series(1, 10);",
    );
    let rules = format!(
        "  defaultAction: Deny
  rules:
    - {{name: deletes, action: RequireApproval, statements: [DELETE]}}
    - {{name: app, action: Allow, statements: [SELECT, DELETE], tables: [\"public.*\"]}}
  approval:
    approvers: {{users: [{REVIEWER}, {AGENT}]}}
    wait: 0s
"
    );
    let mut b = Gateway::builder(pg)
        .policy_yaml(policy_with_rules(pg.port(), None, &rules))
        .state_dir(state.join("state"));
    for (k, v) in env {
        b = b.env(k, v);
    }
    b.start()
}

fn requested_os_user(state: &Path, id: &str) -> Value {
    let show = Command::new(pgwarden_bin())
        .args(["approvals", "show", id, "-o", "json", "--state-dir"])
        .arg(state)
        .output()
        .unwrap();
    let shown: Value = serde_json::from_slice(&show.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", text(&show.stderr)));
    shown["requester"]["osUser"].clone()
}

#[test]
fn a_loopback_tcp_clients_os_user_cannot_decide_its_request() {
    if !is_root() {
        eprintln!("skipped: needs root (useradd, runuser) to act as several OS users");
        return;
    }
    for u in [AGENT, REVIEWER] {
        ensure_user(u);
    }
    let pg = PgCluster::start();
    let state = tempfile::tempdir().unwrap();
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The default (the e2e harness turns it off for the other tests).
    let gw = held_deletes(&pg, state.path(), &[("PGWARDEN_LOOPBACK_OWNER", "on")]);

    // The agent, as an OS user listed as an approver, asks over TCP.
    let out = psql_at(AGENT, "127.0.0.1", gw.port(), DELETE);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "the DELETE ran unapproved: {stderr}");
    let id = request_id_in(&stderr).unwrap_or_else(|| panic!("no request id in: {stderr}"));
    open_to_all(&gw.state_dir());
    assert_eq!(requested_os_user(&gw.state_dir(), &id), AGENT);

    // Listed or not, the agent's own OS user cannot decide it.
    let mine = decide_as(AGENT, &gw.state_dir(), "approve", &id);
    assert_eq!(mine.status.code(), Some(1), "{mine:?}");
    assert!(
        text(&mine.stderr).contains(&format!(
            "{AGENT} requested {id} and cannot decide it: you cannot decide your own request"
        )),
        "{mine:?}"
    );
    assert_eq!(pg.admin_sql("SELECT count(*) FROM items"), "10");

    // Another listed OS user can; the agent's retry then runs once.
    let ok = decide_as(REVIEWER, &gw.state_dir(), "approve", &id);
    assert!(ok.status.success(), "{ok:?}");
    let retry = psql_at(AGENT, "127.0.0.1", gw.port(), DELETE);
    assert!(retry.status.success(), "{}", text(&retry.stderr));
    assert_eq!(pg.admin_sql("SELECT count(*) FROM items"), "9");
    gw.assert_running();
}

#[test]
fn with_the_lookup_off_a_tcp_clients_os_user_is_unknown_and_not_refused() {
    if !is_root() {
        eprintln!("skipped: needs root (useradd, runuser) to act as several OS users");
        return;
    }
    ensure_user(AGENT);
    let pg = PgCluster::start();
    let state = tempfile::tempdir().unwrap();
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let gw = held_deletes(&pg, state.path(), &[("PGWARDEN_LOOPBACK_OWNER", "off")]);

    let out = psql_at(AGENT, "127.0.0.1", gw.port(), DELETE);
    let stderr = text(&out.stderr);
    let id = request_id_in(&stderr).unwrap_or_else(|| panic!("no request id in: {stderr}"));
    open_to_all(&gw.state_dir());
    // The request says the kernel was not asked; today's checks apply.
    assert_eq!(requested_os_user(&gw.state_dir(), &id), "unknown");
    let mine = decide_as(AGENT, &gw.state_dir(), "approve", &id);
    assert!(mine.status.success(), "{mine:?}");
}
