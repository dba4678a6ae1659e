//! The real `pgwarden run` binary in front of a [`PgCluster`], configured from the same
//! YAML a cluster admin would apply (a DatabaseAccessPolicy + a v1 Secret).

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::client::Endpoint;
use crate::net::{free_port, http_get};
use crate::pg::{tail, PgCluster, APP_DATABASE, APP_PASSWORD, APP_USER};

/// How long `pgwarden run` may take to listen and finish its first upstream
/// login check (see [`Gateway::wait_ready`]).
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Grace period between SIGTERM and SIGKILL. Longer than pgwarden's own default
/// drain period for open sessions (`--shutdown-grace-seconds 10`), so a clean exit
/// is never cut short.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
const START_ATTEMPTS: usize = 3;
/// Name of the policy object and of the credentials Secret in the default config.
pub const POLICY_NAME: &str = "e2e";
pub const SECRET_NAME: &str = "shop-cred";

/// The `pgwarden` binary: `$PGWARDEN_BIN`, else `target/<profile>/pgwarden` next to the
/// running test executable (which lives in `target/<profile>/deps/`).
pub fn pgwarden_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("PGWARDEN_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.exists(),
            "PGWARDEN_BIN={} does not exist",
            bin.display()
        );
        return bin;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|profile_dir| profile_dir.join("pgwarden"))
        .expect("test executable has no grandparent dir");
    assert!(
        bin.exists(),
        "{} not found: build it first: cargo build -p pgwarden-sidecar",
        bin.display()
    );
    bin
}

/// The default DatabaseAccessPolicy: localTrust subject `dev`, upstream
/// 127.0.0.1:`port`/shop with credentials from Secret `shop-cred`, under [`REALISTIC_RULES`].
/// `upstream_tls` is `(mode, caFile)` for `spec.database.tls`. `defaultAction` is the
/// last line of `spec`, so more `spec` fields can be appended with two-space indent.
pub fn policy_yaml(port: u16, upstream_tls: Option<(&str, Option<&Path>)>) -> String {
    policy_with_rules(port, upstream_tls, REALISTIC_RULES)
}

/// The same policy with `decision` (the `defaultAction:` and `rules:` lines,
/// indented under `spec:`) in place of [`REALISTIC_RULES`].
pub fn policy_with_rules(
    port: u16,
    upstream_tls: Option<(&str, Option<&Path>)>,
    decision: &str,
) -> String {
    policy_with_identity(port, upstream_tls, "localTrust: {subject: dev}", decision)
}

/// The same, with `identity` (one YAML flow line such as
/// `oidc: {issuer: ..., audiences: [...]}`) in place of localTrust.
pub fn policy_with_identity(
    port: u16,
    upstream_tls: Option<(&str, Option<&Path>)>,
    identity: &str,
    decision: &str,
) -> String {
    let tls = match upstream_tls {
        None => String::new(),
        Some((mode, None)) => format!("    tls: {{mode: {mode}}}\n"),
        Some((mode, Some(ca))) => {
            format!("    tls: {{mode: {mode}, caFile: \"{}\"}}\n", ca.display())
        }
    };
    format!(
        "apiVersion: pgwarden.io/v1alpha1\n\
         kind: DatabaseAccessPolicy\n\
         metadata:\n  name: {POLICY_NAME}\n  namespace: default\n\
         spec:\n\
         \x20 identity:\n    {identity}\n\
         \x20 database:\n\
         \x20   host: 127.0.0.1\n\
         \x20   port: {port}\n\
         \x20   name: {APP_DATABASE}\n\
         \x20   credentialsSecret: {SECRET_NAME}\n\
         {tls}\
         {decision}"
    )
}

/// The default policy every e2e test runs under unless it brings its own: a
/// realistic default-deny policy (ordered rules, built-ins, a table scope), so
/// the client-compatibility tests prove legitimate traffic passes the gate.
pub const REALISTIC_RULES: &str = "  defaultAction: Deny
  rules:
    - {name: no-file-access, action: Deny, functions: [\"pg_read_*\", \"lo_*\"]}
    - {name: vault, action: Deny, tables: [\"vault.*\"]}
    - {name: customer-bulk-writes, action: RequireApproval, statements: [UPDATE, DELETE], unfiltered: true, tables: [\"public.customers\"]}
    - {name: app-schema, action: Allow, statements: [SELECT, INSERT, UPDATE, DELETE, MERGE, TRUNCATE, COPY_FROM, COPY_TO, DDL, EXPLAIN, MAINTENANCE], tables: [\"public.*\"]}
    - {name: app-sessions, action: Allow, statements: [SESSION]}
";

fn secret_yaml(username: &str, password: &str) -> String {
    format!(
        "apiVersion: v1\n\
         kind: Secret\n\
         metadata:\n  name: {SECRET_NAME}\n  namespace: default\n\
         type: Opaque\n\
         stringData:\n  username: {username}\n  password: {password}\n"
    )
}

/// Options for [`Gateway`].
#[derive(Debug, Clone)]
pub struct GatewayBuilder {
    upstream_port: u16,
    upstream_tls: Option<(String, Option<PathBuf>)>,
    policy: Option<String>,
    secret: Option<String>,
    with_secret: bool,
    password: String,
    tls: Option<(PathBuf, PathBuf)>,
    extra_files: Vec<(String, String)>,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
    identity: Option<String>,
    state_dir: Option<PathBuf>,
    /// Operator mode: the config stream's URL and CA file.
    operator: Option<(String, PathBuf)>,
}

/// `pgwarden run` exited (or refused to start) before it became ready.
#[derive(Debug, Clone)]
pub struct GatewayExit {
    /// Exit code; `None` if killed by a signal.
    pub code: Option<i32>,
    /// Everything it wrote to stdout and stderr.
    pub log: String,
}

/// A running `pgwarden run`, killed on drop.
pub struct Gateway {
    child: Child,
    port: u16,
    metrics_port: u16,
    log_path: PathBuf,
    state_dir: PathBuf,
    // Declared last: removed after the child is gone.
    dir: TempDir,
}

// === impl GatewayBuilder ===

impl GatewayBuilder {
    /// The default config for `cluster`: upstream TLS `verify-full` with the cluster's
    /// CA when the cluster has ssl.
    pub fn new(cluster: &PgCluster) -> Self {
        let mut builder = GatewayBuilder::unconnected();
        builder.upstream_port = cluster.port();
        if cluster.ssl() {
            builder.upstream_tls = Some((
                "verify-full".to_string(),
                Some(cluster.ca_cert_path().to_path_buf()),
            ));
        }
        builder
    }

    /// A config whose upstream is 127.0.0.1:1 (nothing listens): for tests of startup
    /// and config handling that never reach a database.
    pub fn unconnected() -> Self {
        GatewayBuilder {
            upstream_port: 1,
            upstream_tls: None,
            policy: None,
            secret: None,
            with_secret: true,
            password: APP_PASSWORD.to_string(),
            tls: None,
            extra_files: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
            identity: None,
            state_dir: None,
            operator: None,
        }
    }

    /// `spec.identity` of the default policy, as one YAML flow line (see
    /// [`policy_with_identity`]).
    pub fn identity(mut self, yaml: impl Into<String>) -> Self {
        self.identity = Some(yaml.into());
        self
    }

    /// Replaces the whole policy.yaml (see [`policy_yaml`] for the default).
    pub fn policy_yaml(mut self, yaml: impl Into<String>) -> Self {
        self.policy = Some(yaml.into());
        self
    }

    /// The policy.yaml this builder will write.
    pub fn policy_text(&self) -> String {
        self.policy.clone().unwrap_or_else(|| {
            policy_with_identity(
                self.upstream_port,
                self.upstream_tls
                    .as_ref()
                    .map(|(mode, ca)| (mode.as_str(), ca.as_deref())),
                self.identity
                    .as_deref()
                    .unwrap_or("localTrust: {subject: dev}"),
                REALISTIC_RULES,
            )
        })
    }

    /// Replaces the whole secret.yaml.
    pub fn secret_yaml(mut self, yaml: impl Into<String>) -> Self {
        self.secret = Some(yaml.into());
        self
    }

    /// Do not pass a secret.yaml at all.
    pub fn without_secret(mut self) -> Self {
        self.with_secret = false;
        self
    }

    /// The password the default Secret holds (to test a wrong credential).
    pub fn secret_password(mut self, password: impl Into<String>) -> Self {
        self.password = password.into();
        self
    }

    /// `spec.database.tls` of the default policy: `mode` and optional `caFile`.
    pub fn upstream_tls(mut self, mode: &str, ca_file: Option<&Path>) -> Self {
        self.upstream_tls = Some((mode.to_string(), ca_file.map(Path::to_path_buf)));
        self
    }

    /// Client-facing TLS: `--tls-cert cert --tls-key key`.
    pub fn tls(mut self, cert: &Path, key: &Path) -> Self {
        self.tls = Some((cert.to_path_buf(), key.to_path_buf()));
        self
    }

    /// Another config file, written into the gateway dir and passed with `-f`.
    pub fn extra_file(mut self, name: &str, contents: impl Into<String>) -> Self {
        self.extra_files.push((name.to_string(), contents.into()));
        self
    }

    /// An extra command-line argument for `pgwarden run`.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// `--state-dir`: an existing directory the test owns instead of a fresh
    /// `state/` in the gateway's temp dir, so a second gateway started from a
    /// clone of this builder finds what the first one stored (restart tests).
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// Operator mode, as the operator injects the sidecar: `--operator url
    /// --operator-ca ca_file --operator-token-file <a token file>` and no `-f`
    /// files (the policy, Secret and extra files of this builder are not used):
    /// the configuration comes down the config stream, e.g. from a
    /// [`crate::FakeOperator`]. [`GatewayBuilder::start`] returns once its
    /// snapshot is in force and the upstream login was checked.
    pub fn fed_by_operator(mut self, url: impl Into<String>, ca_file: &Path) -> Self {
        self.operator = Some((url.into(), ca_file.to_path_buf()));
        self
    }

    /// An environment variable for the gateway process.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// Starts and waits until it listens with its upstream checked (see
    /// [`Gateway::wait_ready`]); panics with the gateway log if it exits first.
    pub fn start(self) -> Gateway {
        match self.try_start() {
            Ok(gateway) => gateway,
            Err(exit) => panic!("pgwarden run exited before it was ready: {exit}"),
        }
    }

    /// Starts and waits as [`GatewayBuilder::start`]; `Err` with the exit code and log if it exits first
    /// (config-error tests). Panics if it neither exits nor becomes ready in 20 s.
    pub fn try_start(self) -> Result<Gateway, GatewayExit> {
        let dir = tempfile::Builder::new()
            .prefix("pgwarden-e2e-gw-")
            .tempdir()
            .expect("create gateway temp dir");
        let state_dir = match &self.state_dir {
            Some(state_dir) => state_dir.clone(),
            None => {
                let state_dir = dir.path().join("state");
                fs::create_dir(&state_dir).expect("create state dir");
                state_dir
            }
        };

        let mut files = Vec::new();
        let mut operator_args: Vec<OsString> = Vec::new();
        match &self.operator {
            Some((url, ca_file)) => {
                // Sent as a bearer token; the fake operator takes any.
                let token = write_file(dir.path(), "operator-token", "e2e-token");
                operator_args = vec![
                    "--operator".into(),
                    url.into(),
                    "--operator-ca".into(),
                    ca_file.into(),
                    "--operator-token-file".into(),
                    token.into(),
                ];
            }
            None => {
                files.push(write_file(dir.path(), "policy.yaml", &self.policy_text()));
                if self.with_secret {
                    let secret = self
                        .secret
                        .clone()
                        .unwrap_or_else(|| secret_yaml(APP_USER, &self.password));
                    files.push(write_file(dir.path(), "secret.yaml", &secret));
                }
                for (name, contents) in &self.extra_files {
                    files.push(write_file(dir.path(), name, contents));
                }
            }
        }

        let mut attempt = 0;
        let mut dir = Some(dir);
        loop {
            attempt += 1;
            let port = free_port();
            let metrics_port = free_port();
            let log_path = dir
                .as_ref()
                .expect("dir kept until started")
                .path()
                .join(format!("pgwarden-{attempt}.log"));
            let mut cmd = Command::new(pgwarden_bin());
            cmd.arg("run");
            for file in &files {
                cmd.arg("-f").arg(file);
            }
            cmd.args(&operator_args);
            cmd.arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--state-dir")
                .arg(&state_dir)
                .arg("--metrics-listen")
                .arg(format!("127.0.0.1:{metrics_port}"));
            if let Some((cert, key)) = &self.tls {
                cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
            }
            cmd.args(&self.args);
            if std::env::var_os("RUST_LOG").is_none() {
                cmd.env("RUST_LOG", "info");
            }
            // The tests run their clients and `pgwarden approvals` as one OS
            // user, which the loopback-owner check would refuse as
            // self-approval; e2e self_approval turns it back on.
            cmd.env("PGWARDEN_LOOPBACK_OWNER", "off");
            for (k, v) in &self.env {
                cmd.env(k, v);
            }
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .expect("open gateway log");
            let log2 = log.try_clone().expect("clone log handle");
            cmd.stdin(Stdio::null())
                .stdout(Stdio::from(log2))
                .stderr(Stdio::from(log));
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", pgwarden_bin().display()));
            let mut gateway = Gateway {
                child,
                port,
                metrics_port,
                log_path,
                state_dir: state_dir.clone(),
                dir: dir.take().expect("dir kept until started"),
            };
            match gateway.wait_ready(READY_TIMEOUT) {
                Ok(()) => return Ok(gateway),
                Err(exit) => {
                    let port_taken = exit.log.contains("Address already in use")
                        || exit.log.contains("address in use");
                    if port_taken && attempt < START_ATTEMPTS {
                        // Keep the files, try other ports.
                        dir = Some(gateway.into_dir());
                        continue;
                    }
                    return Err(exit);
                }
            }
        }
    }
}

/// A /readyz answer from a gateway that listens and has finished its first
/// upstream checks: ready, or not ready only because an upstream failed.
fn started(readyz: std::io::Result<(u16, String)>) -> bool {
    match readyz {
        Ok((200, _)) => true,
        Ok((503, body)) => {
            body.starts_with("not ready: upstream\n") && !body.contains(": checking")
        }
        _ => false,
    }
}

fn write_file(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

// === impl GatewayExit ===

impl fmt::Display for GatewayExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "exit code {code}")?,
            None => write!(f, "killed by a signal")?,
        }
        write!(f, "\n--- pgwarden log ---\n{}", self.log)
    }
}

// === impl Gateway ===

impl Gateway {
    /// The default gateway for `cluster`; panics with the log if it cannot start.
    pub fn start(cluster: &PgCluster) -> Gateway {
        GatewayBuilder::new(cluster).start()
    }

    pub fn builder(cluster: &PgCluster) -> GatewayBuilder {
        GatewayBuilder::new(cluster)
    }

    /// Waits until the gateway listens and its first login to each
    /// upstream has finished: /readyz says 200, or 503 naming an upstream
    /// that failed (tests of a wrong credential, an unreachable or a
    /// TLS-refusing server start gateways that are never ready).
    fn wait_ready(&mut self, timeout: Duration) -> Result<(), GatewayExit> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait pgwarden") {
                return Err(GatewayExit {
                    code: status.code(),
                    log: self.logs(),
                });
            }
            if started(http_get(self.metrics_port, "/readyz")) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "pgwarden run did not start (GET /readyz on 127.0.0.1:{}: neither 200 nor a failed upstream) within {timeout:?}\n--- pgwarden log ---\n{}",
                    self.metrics_port,
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    fn into_dir(mut self) -> TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = tempfile::Builder::new()
            .prefix("pgwarden-e2e-gw-dead-")
            .tempdir()
            .expect("placeholder temp dir");
        // Swap the real dir out so Drop of `self` only removes the placeholder.
        std::mem::replace(&mut self.dir, dir)
    }

    /// The client port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The /metrics, /healthz, /readyz port on 127.0.0.1.
    pub fn metrics_port(&self) -> u16 {
        self.metrics_port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The gateway's temp dir (policy.yaml, secret.yaml, state/ unless
    /// [`GatewayBuilder::state_dir`] chose another, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `--state-dir`.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.clone()
    }

    /// Everything the gateway wrote to stdout/stderr so far.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            use std::io::Read;
            let mut buf = Vec::new();
            let _ = f.read_to_end(&mut buf);
            text = String::from_utf8_lossy(&buf).into_owned();
        }
        text
    }

    /// `GET path` on the metrics port; panics if the request itself fails.
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.metrics_port, path).unwrap_or_else(|e| {
            panic!(
                "GET {path} on 127.0.0.1:{}: {e}\n--- pgwarden log ---\n{}",
                self.metrics_port,
                tail(&self.logs(), 8 * 1024)
            )
        })
    }

    /// Whether the process still runs (not exited, not a zombie).
    pub fn is_running(&self) -> bool {
        match fs::read_to_string(format!("/proc/{}/stat", self.pid())) {
            // The state is the first field after the parenthesised command name.
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X"),
            Err(_) => false,
        }
    }

    /// Panics with the log unless the process still runs.
    pub fn assert_running(&self) {
        assert!(
            self.is_running(),
            "pgwarden (pid {}) is no longer running\n--- pgwarden log ---\n{}",
            self.pid(),
            tail(&self.logs(), 16 * 1024)
        );
    }

    fn proc_status_kib(&self, field: &str) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_else(|e| panic!("read /proc/{}/status: {e}", self.pid()));
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid()))
    }

    /// Current resident set size (VmRSS) in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.proc_status_kib("VmRSS:")
    }

    /// Peak resident set size (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.proc_status_kib("VmHWM:")
    }

    /// SIGTERM, then wait (SIGKILL after 20 s); returns how it exited.
    pub fn shutdown(mut self) -> ExitStatus {
        self.terminate()
    }

    /// Sends `signal` (`TERM`, `QUIT`, ...) and waits for the exit (killed
    /// after the stop timeout).
    pub fn stop_with(mut self, signal: &str) -> ExitStatus {
        self.signal_and_wait(signal)
    }

    fn terminate(&mut self) -> ExitStatus {
        self.signal_and_wait("TERM")
    }

    fn signal_and_wait(&mut self, signal: &str) -> ExitStatus {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status;
        }
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.child.wait().expect("wait for pgwarden")
    }
}

impl Endpoint for Gateway {
    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("PGHOST".to_string(), "127.0.0.1".to_string()),
            ("PGPORT".to_string(), self.port.to_string()),
            ("PGUSER".to_string(), APP_USER.to_string()),
            ("PGDATABASE".to_string(), APP_DATABASE.to_string()),
            ("PGSSLMODE".to_string(), "disable".to_string()),
        ]
    }

    fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={APP_USER} dbname={APP_DATABASE} sslmode=disable",
            self.port
        )
    }

    fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway")
            .field("pid", &self.pid())
            .field("port", &self.port)
            .field("metrics_port", &self.metrics_port)
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.terminate();
        if thread::panicking() {
            eprintln!(
                "--- pgwarden log (port {}) ---\n{}",
                self.port,
                tail(&self.logs(), 16 * 1024)
            );
        }
    }
}
