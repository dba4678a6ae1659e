//! Running client programs (psql, pgbench, openssl, the PostgreSQL tools) with a
//! deadline, and the [`Endpoint`] abstraction that lets one test body talk either to
//! the cluster directly or through the gateway.

use std::io::{Read, Write};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long a single psql invocation may run before the harness kills it and fails
/// the test: a hung proxy must fail a test, never hang CI.
const PSQL_TIMEOUT: Duration = Duration::from_secs(120);

/// Somewhere a libpq client can connect to: the cluster itself (direct, with the
/// password) or the gateway (no password; the gateway holds the credential).
pub trait Endpoint {
    /// libpq environment (`PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`, `PGSSLMODE`, ...).
    fn env(&self) -> Vec<(String, String)>;
    /// The same target as a libpq / tokio-postgres `key=value` connection string.
    fn conninfo(&self) -> String;
    /// The TCP port clients connect to.
    fn port(&self) -> u16;
}

/// Runs `cmd` to completion with `stdin` fed in and stdout/stderr captured, killing it
/// and panicking (with what it printed so far) if it outlives `timeout`.
pub fn run_command(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));

    // Feed stdin and drain both pipes on their own threads so that a child blocked on
    // a full pipe can never deadlock against us.
    let writer = match (stdin, child.stdin.take()) {
        (Some(input), Some(mut pipe)) => {
            let input = input.to_vec();
            Some(thread::spawn(move || {
                // A child that exits early closes the pipe; that is its business.
                let _ = pipe.write_all(&input);
            }))
        }
        _ => None,
    };
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());

    let deadline = Instant::now() + timeout;
    let status: ExitStatus = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let out = stdout.join().unwrap_or_default();
                let err = stderr.join().unwrap_or_default();
                panic!(
                    "{cmd:?} did not finish within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    String::from_utf8_lossy(&out),
                    String::from_utf8_lossy(&err)
                );
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waiting for {cmd:?}: {e}"),
        }
    };
    if let Some(writer) = writer {
        let _ = writer.join();
    }
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

/// A `Command` for a libpq client program with a clean environment: every inherited
/// `PG*` variable is removed (a developer's own `PGHOST` must not redirect a test),
/// then `env` is applied. Run it with [`run_command`].
pub fn libpq_command(program: &str, env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PG") {
            cmd.env_remove(name);
        }
    }
    cmd.env("PGCONNECT_TIMEOUT", "10")
        .env("PGPASSFILE", "/nonexistent/pgwarden-e2e-pgpass")
        // Stable, untranslated messages to assert on.
        .env("LC_ALL", "C")
        .env("LANG", "C");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `psql -X <args>` with the libpq environment `env` (see [`Endpoint::env`]) and
/// optional stdin; fails the test if psql runs longer than two minutes.
pub fn run_psql(env: &[(String, String)], args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = libpq_command("psql", env);
    cmd.arg("-X").args(args);
    run_command(&mut cmd, stdin.map(str::as_bytes), PSQL_TIMEOUT)
}

/// Runs `sql` with `psql -X -A -t -q -v ON_ERROR_STOP=1` against `endpoint` and returns
/// the trimmed stdout; panics with psql's stderr if it fails.
pub fn psql_query(endpoint: &(impl Endpoint + ?Sized), sql: &str) -> String {
    let out = run_psql(
        &endpoint.env(),
        &["-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql],
        None,
    );
    assert!(
        out.status.success(),
        "psql -c {sql:?} against port {} failed ({}):\n{}",
        endpoint.port(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Polls `condition` every 20 ms until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}
