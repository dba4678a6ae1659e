//! Real drivers through the gateway: the programs in `e2e/clients/` (psycopg 3,
//! asyncpg, pgjdbc) each run a series of checks and print `ok: <check>` per passed
//! check. Every program runs twice: through a gateway and directly against the
//! cluster (the control that proves the program's expectations hold for PostgreSQL).
//!
//! A missing interpreter, module, JDK or driver jar fails the test with the package to
//! install: CI installs them (see `.ci/run`), so a skip would hide a broken setup.
//! Overrides: `PGWARDEN_E2E_PYTHON` (default `python3`), `PGWARDEN_E2E_PGJDBC_JAR`
//! (default `/usr/share/java/postgresql.jar`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use pgwarden_e2e::{gateway_and_direct, libpq_command, run_command, Endpoint, PgCluster};

gateway_and_direct!(psycopg, asyncpg, jdbc);

/// A driver program may run this long (the slowest take a few seconds).
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(300);
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

const PSYCOPG_CHECKS: &[&str] = &[
    "connect and server version",
    "setup table",
    "text-format parameters of several types",
    "insert with parameters and read back",
    "binary results (cursor(binary=True))",
    "binary results (execute(..., binary=True)) of computed values",
    "pipeline mode with an error and recovery",
    "server-side prepared statements reused (prepare_threshold=0)",
    "COPY FROM STDIN (text) and COPY TO STDOUT",
    "COPY binary in and out",
    "transaction rollback",
    "executemany",
    "error then reuse of the connection",
    "server-side cursor streaming",
    "notices and parameter status",
    "cleanup",
];

const ASYNCPG_CHECKS: &[&str] = &[
    "connect and server version",
    "setup tables",
    "fetch with parameters: type round-trips",
    "insert and select table row",
    "prepared statement reuse (conn.prepare)",
    "executemany of 1000 rows",
    "copy_records_to_table of 10k records",
    "copy_from_query out",
    "transaction rollback",
    "error then reuse",
    "cursor iteration over 50k rows in a transaction",
    "cleanup",
];

const JDBC_CHECKS: &[&str] = &[
    "setup table",
    "PreparedStatement reused 50 times (prepareThreshold=1)",
    "batch insert of 1000 rows",
    "getBytes/getTimestamp/getBigDecimal round-trip",
    "transaction commit and rollback",
    "SQLException then reuse",
    "DatabaseMetaData catalog queries",
    "fetchSize streaming cursor over 100k rows",
    "cleanup",
];

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Panics unless `out` succeeded and printed `ok: <check>` for every check.
fn assert_checks_passed(program: &str, ep: &dyn Endpoint, out: &Output, checks: &[&str]) {
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    let passed: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("ok: "))
        .collect();
    let missing: Vec<&&str> = checks.iter().filter(|c| !passed.contains(c)).collect();
    assert!(
        out.status.success() && missing.is_empty(),
        "{program} against port {} failed ({}); checks not passed: {missing:?}\n\
         --- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        ep.port(),
        out.status,
    );
}

fn env_value<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
    env.iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

// === Python ===

fn python() -> String {
    std::env::var("PGWARDEN_E2E_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Fails the test, naming the package, unless `python3 -c "import <module>"` works.
fn require_python_module(module: &str, package: &str) {
    let python = python();
    let out = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {python} ({e}): install python3 (Debian package python3)")
        });
    assert!(
        out.status.success(),
        "{python} cannot import {module}: install the Python package {package} \
         (python3 -m pip install '{package}')\n{}",
        text(&out.stderr)
    );
}

fn run_python(ep: &dyn Endpoint, script: &str) -> Output {
    let mut cmd = libpq_command(&python(), &ep.env());
    cmd.arg(clients_dir().join(script))
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    run_command(&mut cmd, None, PROGRAM_TIMEOUT)
}

fn psycopg(ep: &dyn Endpoint, _pg: &PgCluster) {
    require_python_module("psycopg", "psycopg[binary]");
    let out = run_python(ep, "psycopg_compat.py");
    assert_checks_passed("psycopg_compat.py", ep, &out, PSYCOPG_CHECKS);
}

fn asyncpg(ep: &dyn Endpoint, _pg: &PgCluster) {
    require_python_module("asyncpg", "asyncpg");
    let out = run_python(ep, "asyncpg_compat.py");
    assert_checks_passed("asyncpg_compat.py", ep, &out, ASYNCPG_CHECKS);
}

// === JDBC ===

fn pgjdbc_jar() -> PathBuf {
    let jar = std::env::var_os("PGWARDEN_E2E_PGJDBC_JAR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/share/java/postgresql.jar"));
    assert!(
        jar.exists(),
        "{} not found: install the Debian package libpostgresql-jdbc-java \
         (or set PGWARDEN_E2E_PGJDBC_JAR)",
        jar.display()
    );
    jar
}

fn require_tool(tool: &str, package: &str) {
    let found = Command::new(tool)
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "`{tool} -version` failed: install a JDK (Debian package {package})"
    );
}

/// `jdbc:postgresql://` URL for the libpq environment `env`: server-side prepare from
/// the first execution, no TLS (the gateway and the plain cluster both speak plain
/// TCP in these tests).
fn jdbc_url(env: &[(String, String)]) -> String {
    let get = |name: &str| {
        env_value(env, name).unwrap_or_else(|| panic!("endpoint env has no {name}: {env:?}"))
    };
    let mut url = format!(
        "jdbc:postgresql://{}:{}/{}?user={}&sslmode=disable&prepareThreshold=1\
         &ApplicationName=pgwarden-e2e-jdbc&connectTimeout=10",
        get("PGHOST"),
        get("PGPORT"),
        get("PGDATABASE"),
        percent_encode(get("PGUSER")),
    );
    if let Some(password) = env_value(env, "PGPASSWORD") {
        url.push_str("&password=");
        url.push_str(&percent_encode(password));
    }
    url
}

/// Percent-encodes everything but unreserved URL characters.
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn jdbc(ep: &dyn Endpoint, _pg: &PgCluster) {
    let jar = pgjdbc_jar();
    require_tool("javac", "default-jdk-headless");
    require_tool("java", "default-jdk-headless");
    let classes = tempfile::Builder::new()
        .prefix("pgwarden-e2e-jdbc-")
        .tempdir()
        .expect("create classes dir");
    let javac = run_command(
        Command::new("javac")
            .arg("-encoding")
            .arg("UTF-8")
            .arg("-cp")
            .arg(&jar)
            .arg("-d")
            .arg(classes.path())
            .arg(clients_dir().join("Jdbc.java")),
        None,
        TOOL_TIMEOUT,
    );
    assert!(
        javac.status.success(),
        "javac Jdbc.java failed ({}):\n{}\n{}",
        javac.status,
        text(&javac.stdout),
        text(&javac.stderr)
    );
    let classpath = format!("{}:{}", classes.path().display(), jar.display());
    let mut cmd = libpq_command("java", &[]);
    cmd.arg("-Dfile.encoding=UTF-8")
        .arg("-cp")
        .arg(classpath)
        .arg("Jdbc")
        .arg(jdbc_url(&ep.env()));
    let out = run_command(&mut cmd, None, PROGRAM_TIMEOUT);
    assert_checks_passed("Jdbc.java", ep, &out, JDBC_CHECKS);
}
