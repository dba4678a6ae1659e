//! Standalone mode from a user's chair (issue 20): the reviewer's commands
//! against the right — or a wrong — state directory, two gateways on one
//! state directory, a recording log with one edited byte, the quickstart's
//! example policy and `scripts/standalone` with the user's own policy, and
//! the CLI's output into a closed pipe or against an INSERT-only audit role.
//! Everything runs the real `pgwarden` binary (and the real script) as
//! separate processes, exactly as a user would.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pgwarden_e2e::approvals::{request_id_in, CliOutput};
use pgwarden_e2e::recording::{
    edit_segment, file_name, recording_yaml, session_ids, AuditDb, SessionsCli, Spool,
};
use pgwarden_e2e::{
    free_port, http_get, pgwarden_bin, policy_with_rules, run_command, run_psql, wait_until,
    Endpoint, Gateway, GatewayBuilder, PgCluster, APP_DATABASE, APP_PASSWORD, APP_USER,
    SECRET_NAME,
};
use serde_json::Value;
use tempfile::TempDir;

const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a gateway (or the script) may take to answer 200 on /readyz.
const READY: Duration = Duration::from_secs(30);
/// Longest a record may take to reach the spool.
const SPOOL_WAIT: Duration = Duration::from_secs(10);

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, note text);
INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 5) g;
";

/// Reads allowed, deletes of items need a reviewer (fail fast), recorded.
const RULES: &str = "  defaultAction: Deny
  rules:
    - {name: reads, action: Allow, statements: [SELECT], tables: [\"public.*\"]}
    - {name: item-deletes, action: RequireApproval, statements: [DELETE], tables: [\"public.items\"]}
  approval: {wait: 0s, expiresAfter: 1h}
";

fn cluster() -> PgCluster {
    let pg = PgCluster::start();
    pg.admin_sql(SCHEMA);
    pg
}

fn tempdir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir")
}

fn policy(pg: &PgCluster) -> String {
    policy_with_rules(
        pg.port(),
        None,
        &format!("{RULES}{}", recording_yaml(None, false, None)),
    )
}

fn secret_yaml() -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {SECRET_NAME}\n  namespace: default\n\
         type: Opaque\nstringData:\n  username: {APP_USER}\n  password: {APP_PASSWORD}\n"
    )
}

/// `pgwarden ARGS` run in `cwd` with exactly the `PGWARDEN_STATE_DIR` given
/// (none inherited from whoever runs the tests).
fn pgwarden(cwd: &Path, state_env: Option<&Path>, args: &[&str]) -> CliOutput {
    let mut cmd = Command::new(pgwarden_bin());
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("PGWARDEN_STATE_DIR");
    if let Some(dir) = state_env {
        cmd.env("PGWARDEN_STATE_DIR", dir);
    }
    run_command(&mut cmd, None, CLI_TIMEOUT).into()
}

/// psql through `gw` reading `sql` from stdin, continuing past errors:
/// (stdout, stderr).
fn psql(gw: &(impl Endpoint + ?Sized), sql: &str) -> (String, String) {
    let out = run_psql(&gw.env(), &["-f", "-"], Some(sql));
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A process this test started, killed (by its pid) when dropped.
struct Started {
    child: Child,
    log: PathBuf,
}

impl Started {
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for 200 on /readyz at `metrics_port`; panics with the log if
    /// the process exits or is not ready in time.
    fn wait_ready(&mut self, metrics_port: u16) {
        let ready = wait_until(READY, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("exited before it was ready ({status}):\n{}", self.log());
            }
            matches!(http_get(metrics_port, "/readyz"), Ok((200, _)))
        });
        assert!(ready, "not ready within {READY:?}:\n{}", self.log());
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `cmd` with stdout and stderr into `log`.
fn spawn_logged(mut cmd: Command, log: PathBuf) -> Started {
    let file = fs::File::create(&log).expect("create log");
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone().expect("clone log"))
        .stderr(file);
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    Started { child, log }
}

/// Localhost endpoint on `port` (the gateway this test started by hand).
struct At(u16);

impl Endpoint for At {
    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("PGHOST".into(), "127.0.0.1".into()),
            ("PGPORT".into(), self.0.to_string()),
            ("PGUSER".into(), APP_USER.into()),
            ("PGDATABASE".into(), APP_DATABASE.into()),
            ("PGSSLMODE".into(), "disable".into()),
        ]
    }

    fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={APP_USER} dbname={APP_DATABASE} sslmode=disable",
            self.0
        )
    }

    fn port(&self) -> u16 {
        self.0
    }
}

// === 1. the state directory ===

#[test]
fn reviewer_commands_never_create_a_state_dir_and_follow_pgwarden_state_dir() {
    // No --state-dir, no PGWARDEN_STATE_DIR: the default ./pgwarden-state
    // does not exist here, which is an error naming it — never an empty
    // answer, never a new directory.
    let cwd = tempdir("pgwarden-e2e-cwd-");
    let default = cwd.path().join("pgwarden-state");
    let missing = cwd.path().join("typo-state");
    let commands: &[&[&str]] = &[
        &["approvals", "list"],
        &["approvals", "show", "standalone-0001"],
        &["approvals", "approve", "standalone-0001", "--reason", "x"],
        &["approvals", "deny", "standalone-0001"],
        &["sessions", "list"],
        &["sessions", "list", "-o", "json"],
        &["sessions", "replay", "0123456789abcdef"],
        &["sessions", "verify"],
    ];
    for args in commands {
        let out = pgwarden(cwd.path(), None, args);
        assert_eq!(out.code(), Some(2), "{args:?} without a state dir: {out}");
        assert!(
            out.stderr.contains("./pgwarden-state") && out.stdout.is_empty(),
            "{args:?} should name the missing ./pgwarden-state: {out}"
        );
        // The same through the flag and through the variable.
        let mut flagged: Vec<&str> = args.to_vec();
        let path = missing.to_str().unwrap();
        flagged.extend(["--state-dir", path]);
        let out = pgwarden(cwd.path(), None, &flagged);
        assert_eq!(out.code(), Some(2), "{flagged:?}: {out}");
        assert!(
            out.stderr.contains(path),
            "{flagged:?} should name {path}: {out}"
        );
        let out = pgwarden(cwd.path(), Some(&missing), args);
        assert_eq!(
            out.code(),
            Some(2),
            "{args:?} with PGWARDEN_STATE_DIR: {out}"
        );
        assert!(
            out.stderr.contains(path),
            "{args:?} should name {path}: {out}"
        );
    }
    assert!(
        !default.exists(),
        "a read-only command created {}",
        default.display()
    );
    assert!(!missing.exists(), "a command created {}", missing.display());

    // `pgwarden run` takes its state dir from PGWARDEN_STATE_DIR too.
    let pg = cluster();
    let files = tempdir("pgwarden-e2e-files-");
    fs::write(files.path().join("policy.yaml"), policy(&pg)).unwrap();
    fs::write(files.path().join("secret.yaml"), secret_yaml()).unwrap();
    let state_parent = tempdir("pgwarden-e2e-state-");
    let state = state_parent.path().join("state");
    let (port, metrics) = (free_port(), free_port());
    let mut cmd = Command::new(pgwarden_bin());
    cmd.current_dir(cwd.path())
        .env_remove("PGWARDEN_STATE_DIR")
        .env("PGWARDEN_STATE_DIR", &state)
        .env("RUST_LOG", "info")
        // psql and the reviewer are one OS user here (see e2e self_approval).
        .env("PGWARDEN_LOOPBACK_OWNER", "off")
        .args(["run", "-f"])
        .arg(files.path().join("policy.yaml"))
        .arg("-f")
        .arg(files.path().join("secret.yaml"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")]);
    let mut gw = spawn_logged(cmd, files.path().join("pgwarden.log"));
    gw.wait_ready(metrics);
    assert!(
        state.join("approvals").is_dir() && state.join("recordings").is_dir(),
        "pgwarden run did not use PGWARDEN_STATE_DIR={}:\n{}",
        state.display(),
        gw.log()
    );
    assert!(!default.exists(), "pgwarden run used ./pgwarden-state");

    // A statement waiting for a reviewer, who finds it through the variable.
    let (_, err) = psql(
        &At(port),
        "SELECT count(*) FROM items;\nDELETE FROM items WHERE id = 1;\n",
    );
    let id = request_id_in(&err).unwrap_or_else(|| panic!("no request id in: {err}"));
    let out = pgwarden(
        cwd.path(),
        Some(&state),
        &["approvals", "list", "-o", "json"],
    );
    assert_eq!(out.code(), Some(0), "{out}");
    let list: Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == id.as_str() && r["phase"] == "Pending"),
        "the pending request {id} is not listed: {out}"
    );
    let out = pgwarden(cwd.path(), Some(&state), &["approvals", "approve", &id]);
    assert_eq!(out.code(), Some(0), "{out}");
    // And the recorded session, through the variable as well.
    let listed = wait_until(SPOOL_WAIT, || {
        let out = pgwarden(
            cwd.path(),
            Some(&state),
            &["sessions", "list", "-o", "json"],
        );
        out.code() == Some(0)
            && serde_json::from_str::<Value>(&out.stdout)
                .is_ok_and(|v| v.as_array().is_some_and(|a| a.len() == 1))
    });
    assert!(
        listed,
        "the session was not listed through PGWARDEN_STATE_DIR"
    );
    assert!(!default.exists());
}

// === 2. one writer per recording log ===

#[test]
fn a_second_gateway_on_the_same_state_dir_is_refused_naming_the_first() {
    let pg = cluster();
    let state = tempdir("pgwarden-e2e-state-");
    let builder = Gateway::builder(&pg)
        .policy_yaml(policy(&pg))
        .state_dir(state.path());
    let first = builder.clone().start();
    let second = builder
        .clone()
        .try_start()
        .map(|gw| gw.pid())
        .expect_err("a second gateway started on the same state dir");
    assert_eq!(second.code, Some(2), "{second}");
    let holder = format!("pid {}, started 20", first.pid());
    assert!(
        second.log.contains("another gateway") && second.log.contains(&holder),
        "the refusal should name the holder ({holder}): {second}"
    );
    assert!(
        !second.log.contains("invalid configuration"),
        "not a configuration problem: {second}"
    );

    // The first one records on, and its log verifies.
    psql(&first, "SELECT 1 AS probe;\n");
    let spool = Spool::new(state.path());
    spool.wait_for("an ended session", SPOOL_WAIT, |r| {
        r.iter().any(|r| r["kind"] == "sessionEnd")
    });
    assert!(first.shutdown().success());
    SessionsCli::state_dir(state.path()).assert_intact();
    // Once it has stopped, the state dir is free again.
    let again = builder.start();
    again.assert_running();
}

// === 3. a broken log ===

#[test]
fn one_edited_byte_breaks_one_session_not_the_log_nor_the_gateway() {
    let pg = cluster();
    let state = tempdir("pgwarden-e2e-state-");
    let builder = Gateway::builder(&pg)
        .policy_yaml(policy(&pg))
        .state_dir(state.path());
    let gw = builder.clone().start();
    let spool = Spool::new(state.path());
    for k in 1..=3 {
        psql(&gw, &format!("SELECT {k} AS probe;\n"));
        spool.wait_for(&format!("{k} ended sessions"), SPOOL_WAIT, |r| {
            r.iter().filter(|r| r["kind"] == "sessionEnd").count() >= k
        });
    }
    assert!(gw.shutdown().success());
    let ids = session_ids(&spool.records());
    let lines = spool.lines();
    let edited = lines
        .iter()
        .find(|l| l.text.contains("SELECT 2 AS probe"))
        .expect("the second session's statement")
        .clone();
    edit_segment(&edited.file, |l| {
        l[edited.number - 1] = l[edited.number - 1].replacen("SELECT 2", "SELECT 7", 1);
    });
    let place = edited.place();
    let cli = SessionsCli::state_dir(state.path());

    // list: every session, the damaged one flagged, the line named.
    let out = cli.run(&["list", "-o", "json"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let sessions: Vec<Value> = serde_json::from_str(&out.stdout).expect("a JSON array");
    let listed: Vec<&str> = sessions.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(listed, ids, "{out}");
    assert!(
        sessions[1]["damaged"].to_string().contains(&place),
        "the second session should be flagged at {place}: {out}"
    );
    assert!(sessions[0].get("damaged").is_none() && sessions[2].get("damaged").is_none());
    assert!(
        out.stderr.contains(&place),
        "list should warn about {place}: {out}"
    );
    let text = cli.run(&["list"]);
    assert_eq!(text.code(), Some(0), "{text}");
    assert!(text.stdout.contains("DAMAGED"), "{text}");

    // replay: the untouched sessions as ever; the damaged one refused at the line.
    for i in [0, 2] {
        let transcript = cli.replay(&ids[i]);
        assert!(
            transcript.contains(&format!("SELECT {} AS probe", i + 1)),
            "{transcript}"
        );
    }
    let out = cli.run(&["replay", &ids[1]]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stderr.contains(&place) && out.stderr.contains("edited"),
        "replay of the damaged session should name {place}: {out}"
    );
    assert!(
        !out.stdout.contains("SELECT 7"),
        "an edited record was replayed: {out}"
    );

    // The gateway starts anyway, in a new chain that names the break.
    let gw = builder.start();
    let log = gw.logs();
    assert!(
        log.contains(&place) && log.contains("broken") && log.contains("aside"),
        "the start should warn naming {place} and how to move the log aside:\n{log}"
    );
    let (_, metrics) = gw.http_get("/metrics");
    assert!(
        metrics.contains("pgwarden_recording_log_breaks_total 1"),
        "{metrics}"
    );
    let restart = spool
        .records()
        .into_iter()
        .find(|r| r["kind"] == "logRestart")
        .expect("a logRestart record");
    assert!(
        restart["brokenAt"].as_str().unwrap().ends_with(&place)
            && restart["reason"].as_str().unwrap().contains("edited"),
        "{restart}"
    );
    let segments = spool.segments();
    assert_eq!(segments.len(), 2, "a new segment for the new chain");
    psql(&gw, "SELECT 4 AS probe;\n");
    spool.wait_for("the new session's end", SPOOL_WAIT, |r| {
        r.iter().filter(|r| r["kind"] == "sessionEnd").count() >= 4
    });
    let all = cli.list();
    assert_eq!(all.len(), 4, "{all:#?}");
    let newest = all[3]["id"].as_str().unwrap().to_string();
    assert!(cli.replay(&newest).contains("SELECT 4 AS probe"));

    // verify: the old chain's break is still reported (exit 1), the new
    // chain is checked and intact.
    let out = cli.verify();
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("BROKEN:") && l.contains(&format!("{place}:"))),
        "{out}"
    );
    assert!(
        out.stdout.lines().any(|l| l.starts_with("intact:")
            && l.contains("chain from")
            && l.contains(&format!("{}:1", file_name(&segments[1])))),
        "the new chain should verify: {out}"
    );
    gw.assert_running();
}

// === 4. the quickstart shows masking ===

/// The sample data `scripts/standalone` creates (its `customers` and
/// `orders` SQL, read from the script itself).
fn standalone_sample_sql() -> String {
    let script = fs::read_to_string(repo().join("scripts/standalone")).expect("scripts/standalone");
    let start = script
        .find("CREATE TABLE IF NOT EXISTS customers")
        .expect("the sample customers table in scripts/standalone");
    let end = start
        + script[start..]
            .find("\nSQL\n")
            .expect("end of the sample SQL");
    script[start..end].to_string()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The example policy pointed at `pg`, with the Secret it names.
fn example_policy(pg: &PgCluster) -> String {
    let text = fs::read_to_string(repo().join("manifests/examples/standalone-policy.yaml"))
        .expect("the example policy");
    assert!(
        text.contains("    port: 5432\n"),
        "the example's port moved"
    );
    text.replace("    port: 5432\n", &format!("    port: {}\n", pg.port()))
}

#[test]
fn the_example_policy_masks_the_sample_cards_and_emails() {
    let pg = PgCluster::start();
    pg.admin_sql(&standalone_sample_sql());
    let gw = GatewayBuilder::new(&pg)
        .policy_yaml(example_policy(&pg))
        .secret_yaml(secret_yaml().replace(SECRET_NAME, "shop-credentials"))
        .start();
    let (out, err) = psql(&gw, "SELECT * FROM customers ORDER BY id;\n");
    assert!(err.is_empty(), "{err}");
    for raw in [
        "4929123456781234",
        "5500005555555559",
        "340000000000009",
        "ada@example.com",
        "alan@example.org",
        "grace@example.net",
    ] {
        assert!(!out.contains(raw), "{raw} shown unmasked:\n{out}");
    }
    for masked in [
        "************1234",
        "************5559",
        "***********0009",
        "****@example.com",
        "****@example.org",
        "****@example.net",
        "Ada Lovelace",
        "(3 rows)",
    ] {
        assert!(out.contains(masked), "{masked} missing:\n{out}");
    }
}

// === 4b. scripts/standalone with the user's own policy ===

/// A policy of the user's: only orders may be read; its Secret has its own
/// name and namespace, and it names no port (the script sets it).
const MY_POLICY: &str = "apiVersion: pgwarden.io/v1alpha1
kind: DatabaseAccessPolicy
metadata:
  name: mine
  namespace: team
spec:
  identity:
    localTrust: {subject: dev}
  database:
    host: db.invalid
    name: elsewhere
    credentialsSecret: my-credentials
  defaultAction: Deny
  rules:
    - {name: orders-only, action: Allow, statements: [SELECT], tables: [\"public.orders\"]}
";

/// Runs scripts/standalone in front of `pg` (no build, no throwaway
/// PostgreSQL) with `policy_arg` and `env`; returns it once ready, and the
/// port it listens on.
fn standalone(
    pg: &PgCluster,
    dev: &Path,
    policy_arg: Option<&Path>,
    env: &[(&str, &Path)],
) -> (Started, u16) {
    let (port, metrics) = (free_port(), free_port());
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("scripts/standalone"));
    if let Some(p) = policy_arg {
        cmd.arg(p);
    }
    cmd.current_dir(dev)
        .env_remove("PGWARDEN_POLICY")
        .env("PGWARDEN_BIN", pgwarden_bin())
        .env("PGWARDEN_DEV_DIR", dev.join("dev"))
        .env("PGWARDEN_UPSTREAM", format!("127.0.0.1:{}", pg.port()))
        .env("PGWARDEN_UPSTREAM_USER", APP_USER)
        .env("PGWARDEN_UPSTREAM_PASSWORD", APP_PASSWORD)
        .env("PGWARDEN_UPSTREAM_DATABASE", APP_DATABASE)
        .env("PGWARDEN_LISTEN", format!("127.0.0.1:{port}"))
        .env("PGWARDEN_METRICS_LISTEN", format!("127.0.0.1:{metrics}"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    // Its own process group: stopping it stops the gateway it runs.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut started = spawn_logged(cmd, dev.join(format!("standalone-{port}.log")));
    started.wait_ready(metrics);
    (started, port)
}

/// SIGTERM to the script's process group (it and the gateway it started).
fn stop_group(s: &mut Started) {
    let _ = Command::new("kill")
        .args(["-TERM", "--", &format!("-{}", s.child.id())])
        .status();
    let _ = s.child.wait();
}

#[test]
fn scripts_standalone_runs_the_users_own_policy() {
    let pg = PgCluster::start();
    pg.admin_sql(&standalone_sample_sql());
    let dir = tempdir("pgwarden-e2e-standalone-");
    let mine = dir.path().join("my-policy.yaml");
    fs::write(&mine, MY_POLICY).unwrap();

    // As an argument, relative to where the script is started.
    let (mut s, port) = standalone(&pg, dir.path(), Some(Path::new("my-policy.yaml")), &[]);
    let (out, err) = psql(
        &At(port),
        "SELECT count(*) AS n FROM orders;\nSELECT name FROM customers;\n",
    );
    assert!(
        out.contains("4"),
        "orders are readable under my policy: {out}\n{err}"
    );
    assert!(
        err.contains("denied") && !out.contains("Ada Lovelace"),
        "customers are not readable under my policy (the example allows them):\n{out}\n{err}"
    );
    let secret = fs::read_to_string(dir.path().join("dev/secret.yaml")).unwrap();
    assert!(
        secret.contains("name: my-credentials") && secret.contains("namespace: team"),
        "{secret}"
    );
    stop_group(&mut s);

    // As PGWARDEN_POLICY.
    let (mut s, port) = standalone(&pg, dir.path(), None, &[("PGWARDEN_POLICY", &mine)]);
    let (_, err) = psql(&At(port), "SELECT name FROM customers;\n");
    assert!(
        err.contains("denied"),
        "PGWARDEN_POLICY was not used:\n{err}\n{}",
        s.log()
    );
    stop_group(&mut s);
    assert!(
        s.log().contains(&mine.display().to_string()),
        "the script should say which policy it runs:\n{}",
        s.log()
    );
}

// === 5. output into a closed pipe; an INSERT-only audit role ===

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let state = tempdir("pgwarden-e2e-state-");
    fs::create_dir(state.path().join("recordings")).unwrap();
    fs::create_dir(state.path().join("approvals")).unwrap();
    let dir = state.path().to_str().unwrap();
    let commands: &[&[&str]] = &[
        &["sessions", "list", "-o", "json", "--state-dir", dir],
        &["sessions", "list", "--state-dir", dir],
        &["sessions", "verify", "--state-dir", dir],
        &["approvals", "list", "--state-dir", dir],
        &["approvals", "list", "-o", "json", "--state-dir", dir],
    ];
    for args in commands {
        // `pgwarden ... | head -1` whose reader is already gone.
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = Command::new(pgwarden_bin())
            .args(*args)
            .env_remove("PGWARDEN_STATE_DIR")
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .expect("run pgwarden");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}\n{stderr}",
            out.status
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn an_insert_only_audit_role_is_named_when_it_cannot_read() {
    let audit = AuditDb::start();
    let out = SessionsCli::store_dsn(&audit.writer_dsn()).run(&["list"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("role writer")
            && out.stderr.contains("SELECT privilege")
            && out.stderr.contains("pgwarden_records"),
        "the error should name the role and the missing privilege: {out}"
    );
    assert!(!out.stderr.contains("broke the protocol"), "{out}");
    // The auditor role reads the (empty) table.
    let out = SessionsCli::store_dsn(&audit.auditor_dsn()).run(&["list", "-o", "json"]);
    assert_eq!(out.code(), Some(0), "{out}");
}
