//! A throwaway PostgreSQL cluster per test: initdb into a temp dir, listen on
//! 127.0.0.1:<free port> plus a unix socket in the temp dir, role `app` + database
//! `shop`, stopped and removed on drop.
//!
//! PostgreSQL refuses to run as root and CI runs as root, so when the effective uid
//! is 0 every server-side program runs as the `postgres` OS user via `runuser`, in a
//! directory that user owns.

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use tempfile::TempDir;

use crate::client::{libpq_command, run_command, Endpoint};
use crate::net::free_port;
use crate::tls::{path_str, ServerCert, TestCa};

/// The application role every cluster has (LOGIN SUPERUSER).
pub const APP_USER: &str = "app";
/// Its password; the gateway's Secret holds it, clients of the gateway never do.
pub const APP_PASSWORD: &str = "app-secret-pw";
/// The application database, owned by `app`.
pub const APP_DATABASE: &str = "shop";

const SERVER_TOOL_TIMEOUT: Duration = Duration::from_secs(60);
const ADMIN_TIMEOUT: Duration = Duration::from_secs(120);
/// Tries with a fresh port when another process grabbed ours between pick and bind.
const START_ATTEMPTS: usize = 3;

/// How the cluster authenticates TCP clients on 127.0.0.1 (pg_hba method, and the
/// `password_encryption` the `app` password is stored with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamAuth {
    Scram,
    Md5,
    Password,
    Trust,
}

// === impl UpstreamAuth ===

impl UpstreamAuth {
    fn hba_method(self) -> &'static str {
        match self {
            UpstreamAuth::Scram => "scram-sha-256",
            UpstreamAuth::Md5 => "md5",
            UpstreamAuth::Password => "password",
            UpstreamAuth::Trust => "trust",
        }
    }

    fn password_encryption(self) -> &'static str {
        match self {
            UpstreamAuth::Md5 => "md5",
            _ => "scram-sha-256",
        }
    }
}

impl fmt::Display for UpstreamAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.hba_method())
    }
}

/// Options for [`PgCluster`]; `PgCluster::builder().auth(..).ssl(true).start()`.
#[derive(Debug, Clone)]
pub struct PgClusterBuilder {
    auth: UpstreamAuth,
    ssl: bool,
    settings: Vec<(String, String)>,
}

/// A running PostgreSQL 15 cluster owned by one test.
pub struct PgCluster {
    port: u16,
    auth: UpstreamAuth,
    tls: Option<ClusterTls>,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    running: bool,
    // Declared last: removed after the server is stopped.
    dir: TempDir,
}

#[derive(Debug, Clone)]
struct ClusterTls {
    ca: TestCa,
    server: ServerCert,
}

// === impl PgClusterBuilder ===

impl PgClusterBuilder {
    /// The pg_hba method for 127.0.0.1 (default SCRAM-SHA-256).
    pub fn auth(mut self, auth: UpstreamAuth) -> Self {
        self.auth = auth;
        self
    }

    /// With `true`: generate a CA and a `localhost`/127.0.0.1 server certificate,
    /// enable ssl and accept TCP clients only over TLS (`hostssl`).
    pub fn ssl(mut self, ssl: bool) -> Self {
        self.ssl = ssl;
        self
    }

    /// An extra `postgresql.conf` setting (value written verbatim, quote strings).
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_string(), value.to_string()));
        self
    }

    pub fn start(self) -> PgCluster {
        PgCluster::start_with(self)
    }
}

impl Default for PgClusterBuilder {
    fn default() -> Self {
        PgClusterBuilder {
            auth: UpstreamAuth::Scram,
            ssl: false,
            settings: Vec::new(),
        }
    }
}

// === impl PgCluster ===

impl PgCluster {
    /// A SCRAM cluster without TLS.
    pub fn start() -> PgCluster {
        PgCluster::builder().start()
    }

    pub fn builder() -> PgClusterBuilder {
        PgClusterBuilder::default()
    }

    fn start_with(opts: PgClusterBuilder) -> PgCluster {
        let dir = tempfile::Builder::new()
            .prefix("pgwarden-e2e-pg-")
            .tempdir()
            .expect("create cluster temp dir");
        give_to_postgres_user(dir.path(), 0o700);
        let data_dir = dir.path().join("data");
        let socket_dir = dir.path().join("sock");
        fs::create_dir(&socket_dir).expect("create socket dir");
        give_to_postgres_user(&socket_dir, 0o700);
        let log_path = dir.path().join("postgres.log");

        let initdb = run_command(
            server_command("initdb", dir.path()).args([
                "-D",
                path_str(&data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "--no-instructions",
                "--encoding=UTF8",
                "--locale=C",
            ]),
            None,
            SERVER_TOOL_TIMEOUT,
        );
        assert_success("initdb", &initdb);

        let tls = opts.ssl.then(|| {
            let tls_dir = dir.path().join("tls");
            fs::create_dir(&tls_dir).expect("create tls dir");
            let ca = TestCa::generate(&tls_dir, "upstream");
            let server = ca.issue_server_cert(&tls_dir, "server");
            // The server reads its key as the postgres user and insists on 0600.
            give_to_postgres_user(&tls_dir, 0o755);
            give_to_postgres_user(&server.cert, 0o644);
            give_to_postgres_user(&server.key, 0o600);
            ClusterTls { ca, server }
        });

        // Everything test-specific lives in one included file so a port retry only
        // rewrites that file.
        let conf = data_dir.join("postgresql.conf");
        let mut base = fs::read_to_string(&conf).expect("read postgresql.conf");
        base.push_str("\ninclude 'pgwarden_e2e.conf'\n");
        fs::write(&conf, base).expect("write postgresql.conf");
        fs::write(data_dir.join("pg_hba.conf"), hba_conf(opts.auth, opts.ssl))
            .expect("write pg_hba.conf");

        let mut cluster = PgCluster {
            port: 0,
            auth: opts.auth,
            tls,
            data_dir,
            socket_dir,
            log_path,
            running: false,
            dir,
        };
        for attempt in 1..=START_ATTEMPTS {
            cluster.port = free_port();
            fs::write(
                cluster.data_dir.join("pgwarden_e2e.conf"),
                cluster.settings(&opts),
            )
            .expect("write pgwarden_e2e.conf");
            let out = cluster.pg_ctl_start();
            if out.status.success() {
                cluster.running = true;
                break;
            }
            let log = cluster.log();
            let port_taken = log.contains("Address already in use");
            if !port_taken || attempt == START_ATTEMPTS {
                // pg_ctl may have given up on a postmaster that is still starting:
                // let Drop stop whatever runs.
                cluster.running = true;
                panic!(
                    "pg_ctl start failed:\n{}{}\n--- postgres.log ---\n{log}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }

        cluster.admin_sql_in(
            "postgres",
            &format!(
                "CREATE ROLE {APP_USER} LOGIN SUPERUSER PASSWORD '{APP_PASSWORD}';\n\
                 CREATE DATABASE {APP_DATABASE} OWNER {APP_USER};\n"
            ),
        );
        cluster
    }

    fn settings(&self, opts: &PgClusterBuilder) -> String {
        let mut s = format!(
            "listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{sock}'\n\
             max_connections = 50\n\
             shared_buffers = 16MB\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             wal_level = minimal\n\
             max_wal_senders = 0\n\
             autovacuum = off\n\
             log_connections = on\n\
             log_disconnections = on\n\
             password_encryption = '{enc}'\n",
            port = self.port,
            sock = self.socket_dir.display(),
            enc = opts.auth.password_encryption(),
        );
        if let Some(tls) = &self.tls {
            s.push_str(&format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                tls.server.cert.display(),
                tls.server.key.display()
            ));
        }
        for (name, value) in &opts.settings {
            s.push_str(&format!("{name} = {value}\n"));
        }
        s
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn auth(&self) -> UpstreamAuth {
        self.auth
    }

    pub fn ssl(&self) -> bool {
        self.tls.is_some()
    }

    /// The CA that signed the server certificate; panics if the cluster has no TLS.
    pub fn ca_cert_path(&self) -> &Path {
        self.tls
            .as_ref()
            .expect("ca_cert_path() on a cluster started without .ssl(true)")
            .ca
            .cert_path()
    }

    /// The directory holding the server's unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Runs `sql` (one or more statements) as superuser `postgres` over the unix
    /// socket in database `shop` with `psql -X -A -t -q -v ON_ERROR_STOP=1`; returns the
    /// trimmed stdout, panics with psql's stderr on error.
    pub fn admin_sql(&self, sql: &str) -> String {
        self.admin_sql_in(APP_DATABASE, sql)
    }

    fn admin_sql_in(&self, database: &str, sql: &str) -> String {
        let port = self.port.to_string();
        let mut cmd = libpq_command("psql", &[]);
        cmd.args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            path_str(&self.socket_dir),
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            database,
            "-f",
            "-",
        ]);
        let out = run_command(&mut cmd, Some(sql.as_bytes()), ADMIN_TIMEOUT);
        assert!(
            out.status.success(),
            "admin_sql failed ({}):\n{sql}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// libpq environment for connecting directly (bypassing any gateway) as `app`
    /// with the password.
    pub fn direct_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("PGHOST".to_string(), "127.0.0.1".to_string()),
            ("PGPORT".to_string(), self.port.to_string()),
            ("PGUSER".to_string(), APP_USER.to_string()),
            ("PGPASSWORD".to_string(), APP_PASSWORD.to_string()),
            ("PGDATABASE".to_string(), APP_DATABASE.to_string()),
        ];
        match &self.tls {
            Some(tls) => {
                env.push(("PGSSLMODE".to_string(), "verify-full".to_string()));
                env.push((
                    "PGSSLROOTCERT".to_string(),
                    tls.ca.cert_path().display().to_string(),
                ));
            }
            None => env.push(("PGSSLMODE".to_string(), "disable".to_string())),
        }
        env
    }

    /// `pg_ctl start` on this cluster's data dir (waits up to 30 s).
    fn pg_ctl_start(&self) -> std::process::Output {
        run_command(
            server_command("pg_ctl", self.dir.path()).args([
                "-D",
                path_str(&self.data_dir),
                "-l",
                path_str(&self.log_path),
                "-w",
                "-t",
                "30",
                "start",
            ]),
            None,
            SERVER_TOOL_TIMEOUT,
        )
    }

    /// Starts a cluster stopped with [`PgCluster::stop`] again, on the same port
    /// with the same data (the end of an outage).
    pub fn start_again(&mut self) {
        if self.running {
            return;
        }
        let out = self.pg_ctl_start();
        // Whatever pg_ctl says, let Drop stop what may run.
        self.running = true;
        assert!(
            out.status.success(),
            "pg_ctl start (again, port {}) failed:\n{}{}\n--- postgres.log ---\n{}",
            self.port,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 8 * 1024)
        );
    }

    /// Stops the server now (`pg_ctl stop -m immediate`); drop does this too.
    pub fn stop(&mut self) {
        if !std::mem::replace(&mut self.running, false) {
            return;
        }
        let stopped = run_command(
            server_command("pg_ctl", self.dir.path()).args([
                "-D",
                path_str(&self.data_dir),
                "-m",
                "immediate",
                "-w",
                "-t",
                "20",
                "stop",
            ]),
            None,
            SERVER_TOOL_TIMEOUT,
        );
        if !stopped.status.success() {
            // Last resort: never leave a postmaster behind. Only a pid that is still a
            // postgres process with our data dir is killed (a stale pid file may name
            // an unrelated process by now).
            let pid = fs::read_to_string(self.data_dir.join("postmaster.pid"))
                .ok()
                .and_then(|s| s.lines().next().map(|l| l.trim().to_string()));
            if let Some(pid) = pid {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline);
                if cmdline.contains("postgres") && cmdline.contains(path_str(&self.data_dir)) {
                    let _ = Command::new("kill").args(["-KILL", &pid]).status();
                }
            }
        }
    }
}

/// Direct access as `app` with the password. With `.ssl(true)` the conninfo says
/// `sslmode=require`, which tokio-postgres' `NoTls` cannot do: use psql there.
impl Endpoint for PgCluster {
    fn env(&self) -> Vec<(String, String)> {
        self.direct_env()
    }

    fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={APP_USER} password={APP_PASSWORD} dbname={APP_DATABASE} sslmode={}",
            self.port,
            if self.tls.is_some() { "require" } else { "disable" }
        )
    }

    fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgCluster")
            .field("port", &self.port)
            .field("auth", &self.auth)
            .field("ssl", &self.tls.is_some())
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- postgres.log (port {}) ---\n{}",
                self.port,
                tail(&self.log(), 8 * 1024)
            );
        }
        self.stop();
    }
}

fn hba_conf(auth: UpstreamAuth, ssl: bool) -> String {
    let host = if ssl { "hostssl" } else { "host" };
    format!(
        "# written by pgwarden-e2e\n\
         local all all trust\n\
         {host} all all 127.0.0.1/32 {}\n",
        auth.hba_method()
    )
}

pub(crate) fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// === running as the postgres OS user ===

fn pg_bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("PGWARDEN_E2E_PG_BINDIR") {
            return PathBuf::from(dir);
        }
        let debian = PathBuf::from("/usr/lib/postgresql/15/bin");
        if debian.join("initdb").exists() {
            return debian;
        }
        let out = Command::new("pg_config")
            .arg("--bindir")
            .output()
            .expect("PostgreSQL server binaries not found: set PGWARDEN_E2E_PG_BINDIR");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// `program` from the PostgreSQL bin dir, as the `postgres` user when we are root,
/// with `cwd` (a directory that user can enter).
fn server_command(program: &str, cwd: &Path) -> Command {
    let path = pg_bin_dir().join(program);
    let mut cmd = if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(path);
        cmd
    } else {
        Command::new(path)
    };
    cmd.current_dir(cwd).env("LC_ALL", "C").env("LANG", "C");
    cmd
}

/// Whether our effective uid is 0 (read from /proc, no libc needed).
pub(crate) fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
            .unwrap_or(false)
    })
}

/// uid and gid of the `postgres` OS user, from /etc/passwd.
fn postgres_ids() -> (u32, u32) {
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    *IDS.get_or_init(|| {
        let passwd = fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
        passwd
            .lines()
            .find_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                (fields.first() == Some(&"postgres") && fields.len() > 3).then(|| {
                    (
                        fields[2].parse().expect("postgres uid"),
                        fields[3].parse().expect("postgres gid"),
                    )
                })
            })
            .expect("running as root needs a `postgres` OS user to run PostgreSQL")
    })
}

/// chmod `path`, and when root chown it to the postgres user.
fn give_to_postgres_user(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    if is_root() {
        let (uid, gid) = postgres_ids();
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }
}
