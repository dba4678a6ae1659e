//! pgwarden benchmark: the same workloads directly against PostgreSQL and through the
//! gateway, on one throwaway cluster.
//!
//! ```text
//! scripts/bench [--quick] [--json] [--pgbouncer] [--secs N] [--rounds N] [--scale N]
//! cargo run --release -p pgwarden-e2e --bin bench -- [same flags]
//! ```
//!
//! 1. `pgbench -S` (select-only) in simple, extended and prepared mode with 1 and 8
//!    clients, in rounds that alternate direct and gateway runs (so drift on the
//!    machine affects both): TPS, p99 latency (from pgbench's per-transaction
//!    log), and the gateway's CPU time per statement (utime+stime of the process
//!    over the run / transactions processed; one statement per transaction with
//!    `-S`). The gateway runs a realistic policy: ordered default-deny rules and
//!    a masked column on a table pgbench does not touch. Target `operator-fed`
//!    is the same gateway configured as in a cluster: the same policy in one
//!    snapshot down a (fake) operator's config stream, no files; it should match
//!    `pgwarden` within noise.
//! 2. Streaming 2,000,000 rows with psql: seconds, MB/s of psql output, and the peak
//!    RSS (VmHWM) of a fresh gateway that did nothing else.
//! 3. Streaming 1,000,000 rows of a table with a masked column (`Partial`,
//!    keepLast 4) direct and through a gateway whose policy masks it: MB/s and
//!    the gateway's peak RSS.
//! 4. RSS of a fresh gateway holding 500 idle client sessions.
//!
//! The gateway binary is `$PGWARDEN_BIN`, else `pgwarden` next to this executable
//! (`target/release/pgwarden`: `cargo build --release -p pgwarden-sidecar`).
//! Progress goes to stderr, the report (or JSON with `--json`) to stdout.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use pgwarden_e2e::fake_operator::snapshot_line;
use pgwarden_e2e::{
    libpq_command, run_command, Endpoint, FakeOperator, Gateway, PgCluster, TestPki, APP_PASSWORD,
    APP_USER,
};
use serde_json::{json, Value};

const STREAM_ROWS: u32 = 2_000_000;
const MASKED_ROWS: u32 = 1_000_000;
/// The masked-streaming table: a 16-digit card number (masked) between an
/// id and a 40-character note (both passed through).
const MASKED_SETUP: &str = "DROP TABLE IF EXISTS stream_masked; \
     CREATE TABLE stream_masked AS SELECT g AS id, lpad(g::text, 16, '4') AS card, \
     repeat('n', 40) AS note FROM generate_series(1, 1000000) g";
const REALISTIC_MASKING: &str = "  masking:
    - {columns: [\"public.customers.card_number\"], strategy: Partial, keepLast: 4}
";
const MASKED_POLICY: &str = "  defaultAction: Allow
  masking:
    - {columns: [\"public.stream_masked.card\"], strategy: Partial, keepLast: 4}
";
const IDLE_SESSIONS: usize = 500;
const MODES: [&str; 3] = ["simple", "extended", "prepared"];
const CLIENTS: [u32; 2] = [1, 8];

// === options ===

#[derive(Debug, Clone)]
struct Options {
    quick: bool,
    json: bool,
    pgbouncer: bool,
    /// CI's regression guard: a quick run of direct, pgwarden, operator-fed
    /// (at 8 clients) and (when installed) pgbouncer; exit 1 on a gross
    /// regression.
    guard: bool,
    secs: u32,
    rounds: u32,
    scale: u32,
}

impl Options {
    fn from_args() -> Result<Options, String> {
        let mut args = std::env::args().skip(1);
        let mut quick = false;
        let mut json = false;
        let mut pgbouncer = false;
        let mut guard = false;
        let (mut secs, mut rounds, mut scale) = (None, None, None);
        while let Some(arg) = args.next() {
            let mut number = |name: &str| -> Result<u32, String> {
                args.next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n: &u32| n > 0)
                    .ok_or_else(|| format!("{name} needs a positive number"))
            };
            match arg.as_str() {
                "--quick" => quick = true,
                "--json" => json = true,
                "--pgbouncer" => pgbouncer = true,
                "--guard" => guard = true,
                "--secs" => secs = Some(number("--secs")?),
                "--rounds" => rounds = Some(number("--rounds")?),
                "--scale" => scale = Some(number("--scale")?),
                "-h" | "--help" => {
                    return Err("usage: bench [--quick] [--guard] [--json] [--pgbouncer] \
                                [--secs N] [--rounds N] [--scale N]"
                        .to_string())
                }
                other => return Err(format!("unknown argument {other:?} (try --help)")),
            }
        }
        // The guard is a quick run.
        let quick = quick || guard;
        Ok(Options {
            quick,
            json,
            pgbouncer: pgbouncer || guard,
            guard,
            secs: secs.unwrap_or(if quick { 2 } else { 10 }),
            rounds: rounds.unwrap_or(if quick { 2 } else { 3 }),
            scale: scale.unwrap_or(if quick { 2 } else { 10 }),
        })
    }
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

// === /proc ===

/// utime + stime of `pid` in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    // Fields after the parenthesised command name start at field 3 (state); utime and
    // stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .expect("/proc/pid/stat has a command name");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> u64 {
        fields
            .get(n - 3)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bad /proc/{pid}/stat field {n}: {stat}"))
    };
    field(14) + field(15)
}

fn clock_ticks_per_sec() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .filter(|&t: &u64| t > 0)
        .unwrap_or(100)
}

/// A `VmRSS:`/`VmHWM:` line of /proc/<pid>/status, in KiB.
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

// === pgbench ===

/// What one `pgbench -S` run reported.
#[derive(Debug, Clone, Copy)]
struct PgbenchRun {
    tps: f64,
    latency_ms: f64,
    transactions: u64,
    /// Gateway CPU ticks during the run (gateway runs only).
    proxy_ticks: Option<u64>,
    /// Latency percentiles from pgbench's per-transaction log.
    p50_ms: f64,
    p99_ms: f64,
}

fn pgbench(env: &[(String, String)], args: &[&str], timeout: Duration) -> String {
    let out = run_command(libpq_command("pgbench", env).args(args), None, timeout);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "pgbench {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The first number after `prefix` on the line starting with it.
fn number_after(report: &str, prefix: &str) -> f64 {
    report
        .lines()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix:?} in pgbench output:\n{report}"))
}

fn run_select_only(
    env: &[(String, String)],
    mode: &str,
    clients: u32,
    secs: u32,
    proxy_pid: Option<u32>,
) -> PgbenchRun {
    let (c, t) = (clients.to_string(), secs.to_string());
    // Per-transaction latencies go to log files, for percentiles.
    let logs = tempfile::tempdir().expect("temp dir for pgbench logs");
    let prefix = format!("--log-prefix={}", logs.path().join("lat").display());
    let args = [
        "-n", "-S", "-M", mode, "-c", &c, "-j", &c, "-T", &t, "--log", &prefix,
    ];
    let before = proxy_pid.map(cpu_ticks);
    let report = pgbench(env, &args, Duration::from_secs(u64::from(secs) + 120));
    let (p50_ms, p99_ms) = latency_percentiles(logs.path());
    let proxy_ticks = proxy_pid
        .zip(before)
        .map(|(pid, before)| cpu_ticks(pid) - before);
    let failed = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("number of failed transactions:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert_eq!(failed, 0, "pgbench reported failed transactions:\n{report}");
    PgbenchRun {
        tps: number_after(&report, "tps ="),
        latency_ms: number_after(&report, "latency average ="),
        transactions: number_after(&report, "number of transactions actually processed:") as u64,
        proxy_ticks,
        p50_ms,
        p99_ms,
    }
}

/// p50 and p99 of the third field (latency, µs) of pgbench's log files.
fn latency_percentiles(dir: &std::path::Path) -> (f64, f64) {
    let mut us: Vec<u64> = Vec::new();
    for entry in fs::read_dir(dir).expect("read pgbench log dir").flatten() {
        let text = fs::read_to_string(entry.path()).unwrap_or_default();
        us.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok()),
        );
    }
    if us.is_empty() {
        return (0.0, 0.0);
    }
    us.sort_unstable();
    let at = |q: f64| us[((us.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    (at(0.50), at(0.99))
}

/// Averages over the rounds of one target.
#[derive(Debug, Clone, Copy, Default)]
struct Summary {
    tps: f64,
    latency_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    transactions: u64,
    proxy_us_per_stmt: Option<f64>,
}

fn summarize(runs: &[PgbenchRun], ticks_per_sec: u64) -> Summary {
    let n = runs.len().max(1) as f64;
    let transactions: u64 = runs.iter().map(|r| r.transactions).sum();
    let ticks: Option<u64> = runs.iter().map(|r| r.proxy_ticks).sum();
    Summary {
        tps: runs.iter().map(|r| r.tps).sum::<f64>() / n,
        latency_ms: runs.iter().map(|r| r.latency_ms).sum::<f64>() / n,
        p50_ms: runs.iter().map(|r| r.p50_ms).sum::<f64>() / n,
        p99_ms: runs.iter().map(|r| r.p99_ms).sum::<f64>() / n,
        transactions,
        proxy_us_per_stmt: ticks
            .filter(|_| transactions > 0)
            .map(|t| t as f64 * 1_000_000.0 / ticks_per_sec as f64 / transactions as f64),
    }
}

/// One target of the pgbench comparison.
struct Target<'a> {
    name: &'static str,
    env: Vec<(String, String)>,
    pid: Option<u32>,
    /// Modes this target cannot run (pgbouncer's transaction pooling vs `-M prepared`).
    skip_modes: &'a [&'a str],
    /// Client counts it is not measured at (the guard's operator-fed gateway).
    skip_clients: &'a [u32],
}

struct PgbenchRow {
    mode: &'static str,
    clients: u32,
    results: Vec<Option<Summary>>,
}

fn pgbench_matrix(opts: &Options, targets: &[Target<'_>], ticks_per_sec: u64) -> Vec<PgbenchRow> {
    let mut rows = Vec::new();
    for mode in MODES {
        for clients in CLIENTS {
            let mut runs: Vec<Vec<PgbenchRun>> = vec![Vec::new(); targets.len()];
            for round in 1..=opts.rounds {
                for (i, target) in targets.iter().enumerate() {
                    if target.skip_modes.contains(&mode) || target.skip_clients.contains(&clients) {
                        continue;
                    }
                    let run = run_select_only(&target.env, mode, clients, opts.secs, target.pid);
                    progress(format!(
                        "pgbench -S -M {mode} -c {clients} round {round}/{}: {:<9} {:>9.0} tps {:>7.3} ms",
                        opts.rounds, target.name, run.tps, run.latency_ms
                    ));
                    runs[i].push(run);
                }
            }
            rows.push(PgbenchRow {
                mode,
                clients,
                results: runs
                    .iter()
                    .map(|r| (!r.is_empty()).then(|| summarize(r, ticks_per_sec)))
                    .collect(),
            });
        }
    }
    rows
}

// === streaming ===

struct StreamResult {
    secs: f64,
    bytes: u64,
}

impl StreamResult {
    fn mb_per_sec(&self) -> f64 {
        self.bytes as f64 / 1_000_000.0 / self.secs
    }
}

fn mean_stream(runs: &[StreamResult]) -> StreamResult {
    let n = runs.len().max(1) as f64;
    StreamResult {
        secs: runs.iter().map(|r| r.secs).sum::<f64>() / n,
        bytes: runs.first().map_or(0, |r| r.bytes),
    }
}

/// `psql -A -t -c <2M rows>` with stdout counted as it arrives and then discarded.
fn stream_rows(env: &[(String, String)]) -> StreamResult {
    let sql = format!("SELECT g, repeat('x', 50) FROM generate_series(1, {STREAM_ROWS}) g");
    stream_query(env, &sql, STREAM_ROWS)
}

fn stream_query(env: &[(String, String)], sql: &str, expect_rows: u32) -> StreamResult {
    let start = Instant::now();
    let mut child = libpq_command("psql", env)
        .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn psql");
    let mut stderr = child.stderr.take().expect("psql stderr");
    let errors = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut stdout = child.stdout.take().expect("psql stdout");
    let mut buf = vec![0u8; 1 << 16];
    let mut bytes = 0u64;
    let mut lines = 0u64;
    loop {
        let n = stdout.read(&mut buf).expect("read psql stdout");
        if n == 0 {
            break;
        }
        bytes += n as u64;
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
    }
    let status = child.wait().expect("wait psql");
    let secs = start.elapsed().as_secs_f64();
    let errors = errors.join().unwrap_or_default();
    assert!(
        status.success(),
        "streaming psql failed ({status}): {errors}"
    );
    assert_eq!(lines, u64::from(expect_rows), "rows streamed");
    StreamResult { secs, bytes }
}

// === idle sessions ===

/// Opens a session with a plain StartupMessage (no TLS, no password: the gateway's
/// localTrust) and returns the socket once ReadyForQuery arrived.
fn open_idle_session(port: u16) -> Result<TcpStream, String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut body = Vec::new();
    body.extend_from_slice(&196_608u32.to_be_bytes()); // protocol 3.0
    for (k, v) in [
        ("user", "app"),
        ("database", "shop"),
        ("application_name", "pgwarden-bench-idle"),
    ] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    stream
        .write_all(&msg)
        .map_err(|e| format!("send startup: {e}"))?;
    loop {
        let mut header = [0u8; 5];
        stream
            .read_exact(&mut header)
            .map_err(|e| format!("read message header: {e}"))?;
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if !(4..=1 << 20).contains(&len) {
            return Err(format!("bad message length {len}"));
        }
        let mut payload = vec![0u8; len - 4];
        stream
            .read_exact(&mut payload)
            .map_err(|e| format!("read message: {e}"))?;
        match header[0] {
            b'Z' => return Ok(stream),
            b'R' if payload.get(..4) != Some(&[0, 0, 0, 0]) => {
                return Err("the gateway asked for a password".to_string())
            }
            b'E' => {
                return Err(format!(
                    "ErrorResponse: {}",
                    String::from_utf8_lossy(&payload).replace('\0', " ")
                ))
            }
            _ => {}
        }
    }
}

struct IdleResult {
    baseline_kib: u64,
    with_sessions_kib: u64,
    open_secs: f64,
}

fn idle_sessions(gw: &Gateway) -> IdleResult {
    let baseline_kib = proc_status_kib(gw.pid(), "VmRSS:");
    let start = Instant::now();
    const OPENERS: usize = 8;
    let port = gw.port();
    let handles: Vec<_> = (0..OPENERS)
        .map(|i| {
            let count = IDLE_SESSIONS / OPENERS + usize::from(i < IDLE_SESSIONS % OPENERS);
            thread::spawn(move || {
                (0..count)
                    .map(|_| open_idle_session(port))
                    .collect::<Result<Vec<_>, _>>()
            })
        })
        .collect();
    let mut sessions = Vec::new();
    for handle in handles {
        match handle.join().expect("opener thread") {
            Ok(mut opened) => sessions.append(&mut opened),
            Err(e) => panic!(
                "opening {IDLE_SESSIONS} idle sessions failed after {}: {e}\n--- pgwarden log (tail) ---\n{}",
                sessions.len(),
                tail_lines(&gw.logs(), 20)
            ),
        }
    }
    let open_secs = start.elapsed().as_secs_f64();
    assert_eq!(sessions.len(), IDLE_SESSIONS);
    // Let the gateway settle (buffers shrink after the startup burst).
    thread::sleep(Duration::from_secs(1));
    let with_sessions_kib = proc_status_kib(gw.pid(), "VmRSS:");
    drop(sessions);
    IdleResult {
        baseline_kib,
        with_sessions_kib,
        open_secs,
    }
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// === pgbouncer (optional) ===

/// A pgbouncer in front of the cluster (transaction pooling, or session
/// pooling for `-M prepared`), run as the `postgres` user when we are root
/// (it refuses to run as root).
struct Pgbouncer {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Pgbouncer {
    fn start(pg: &PgCluster, pool_mode: &str) -> Result<Pgbouncer, String> {
        let bin = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or("pgbouncer not found (Debian package pgbouncer)")?;
        let dir = tempfile::Builder::new()
            .prefix("pgwarden-bench-pgbouncer-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let port = pgwarden_e2e::free_port();
        let ini = format!(
            "[databases]\n\
             shop = host=127.0.0.1 port={upstream} dbname=shop user=app password={APP_PASSWORD}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {dir}/userlist.txt\n\
             pool_mode = {pool_mode}\n\
             max_client_conn = 1000\n\
             default_pool_size = 16\n\
             logfile = {dir}/pgbouncer.log\n\
             pidfile = {dir}/pgbouncer.pid\n",
            upstream = pg.port(),
            dir = dir.path().display(),
        );
        fs::write(dir.path().join("pgbouncer.ini"), ini).map_err(|e| e.to_string())?;
        fs::write(dir.path().join("userlist.txt"), "\"app\" \"\"\n").map_err(|e| e.to_string())?;
        let root = fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1).map(|u| u == "0"))
            .unwrap_or(false);
        let mut cmd = if root {
            let chown = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(dir.path())
                .status()
                .map_err(|e| e.to_string())?;
            if !chown.success() {
                return Err("chown of the pgbouncer dir to postgres failed".to_string());
            }
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(&bin);
            cmd
        } else {
            Command::new(&bin)
        };
        cmd.arg(dir.path().join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().map_err(|e| format!("spawn pgbouncer: {e}"))?;
        let bouncer = Pgbouncer {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(format!(
                    "pgbouncer did not listen on {port}: {}",
                    fs::read_to_string(bouncer._dir.path().join("pgbouncer.log"))
                        .unwrap_or_default()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(bouncer)
    }

    fn env(&self) -> Vec<(String, String)> {
        [
            ("PGHOST", "127.0.0.1".to_string()),
            ("PGPORT", self.port.to_string()),
            ("PGUSER", "app".to_string()),
            ("PGDATABASE", "shop".to_string()),
            ("PGSSLMODE", "disable".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The pgbouncer process itself (runuser's child when started through runuser).
    fn pid(&self) -> u32 {
        let pidfile = self._dir.path().join("pgbouncer.pid");
        fs::read_to_string(pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| self.child.id())
    }
}

impl Drop for Pgbouncer {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

// === operator-fed ===

/// The target name of the gateway fed by the config stream.
const OPERATOR_FED: &str = "operator-fed";

/// A gateway configured as in a cluster (`--operator`, no files) by a fake
/// operator that serves one snapshot and then heartbeats, on a runtime of its
/// own (the bench itself is synchronous).
struct OperatorFed {
    // Declared first: stopped while its operator still answers.
    gateway: Gateway,
    _operator: FakeOperator,
    _runtime: tokio::runtime::Runtime,
    _pki: TestPki,
}

impl OperatorFed {
    /// Serves `policy_yaml` (a whole DatabaseAccessPolicy) with the cluster's
    /// login, the one the file-fed gateway's Secret holds.
    fn start(pg: &PgCluster, policy_yaml: &str) -> OperatorFed {
        const VERSION: u64 = 1;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime for the fake operator");
        let pki = TestPki::generate();
        let line = snapshot_line(VERSION, policy_yaml, APP_USER, APP_PASSWORD);
        let operator = runtime.block_on(FakeOperator::serving(&pki.server, line));
        let gateway = Gateway::builder(pg)
            .fed_by_operator(operator.url(), pki.ca.cert_path())
            .start();
        // Ready means in force; the ACK proves it came down the stream.
        assert!(
            pgwarden_e2e::wait_until(Duration::from_secs(5), || operator
                .acks()
                .contains(&format!("{{\"version\":{VERSION}}}"))),
            "the operator-fed gateway never ACKed the snapshot: {:?}\n--- pgwarden log ---\n{}",
            operator.acks(),
            tail_lines(&gateway.logs(), 20)
        );
        OperatorFed {
            gateway,
            _operator: operator,
            _runtime: runtime,
            _pki: pki,
        }
    }
}

// === report ===

fn ratio(a: Option<Summary>, b: Option<Summary>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if a.tps > 0.0 => Some(b.tps / a.tps),
        _ => None,
    }
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.decimals$}"))
}

fn summary_json(s: Option<Summary>) -> Value {
    match s {
        None => Value::Null,
        Some(s) => json!({
            "tps": s.tps,
            "latency_ms": s.latency_ms,
            "p50_ms": s.p50_ms,
            "p99_ms": s.p99_ms,
            "transactions": s.transactions,
            "proxy_cpu_us_per_stmt": s.proxy_us_per_stmt,
        }),
    }
}

struct Report {
    rows: Vec<PgbenchRow>,
    target_names: Vec<&'static str>,
    stream_direct: StreamResult,
    stream_gateway: StreamResult,
    stream_peak_before_kib: u64,
    stream_peak_kib: u64,
    masked_direct: StreamResult,
    masked_gateway: StreamResult,
    masked_peak_kib: u64,
    idle: IdleResult,
}

impl Report {
    /// The index of target `name` in every row's results.
    fn column(&self, name: &str) -> Option<usize> {
        self.target_names.iter().position(|n| *n == name)
    }
}

fn print_text(opts: &Options, r: &Report) {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\npgbench -S (select-only), scale {}, {} round(s) x {} s per target, targets interleaved; {} CPUs",
        opts.scale,
        opts.rounds,
        opts.secs,
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    // One column group per target after `direct`: tps, ratio to direct, and
    // the target process's CPU time per transaction.
    let _ = write!(
        out,
        "{:<9} {:>7} {:>11} {:>7}",
        "mode", "clients", "direct tps", "p99 ms"
    );
    // Each tps column as wide as its heading.
    let widths: Vec<usize> = r
        .target_names
        .iter()
        .map(|n| (n.len() + 4).max(13))
        .collect();
    for (name, w) in r.target_names.iter().zip(&widths).skip(1) {
        let _ = write!(
            out,
            " | {:>w$} {:>6} {:>7} {:>9}",
            format!("{name} tps"),
            "ratio",
            "p99 ms",
            "us/stmt"
        );
    }
    out.push('\n');
    for row in &r.rows {
        let direct = row.results[0];
        let _ = write!(
            out,
            "{:<9} {:>7} {:>11} {:>7}",
            row.mode,
            row.clients,
            opt(direct.map(|s| s.tps), 0),
            opt(direct.map(|s| s.p99_ms), 3),
        );
        for (result, w) in row.results.iter().zip(&widths).skip(1) {
            let _ = write!(
                out,
                " | {:>w$} {:>6} {:>7} {:>9}",
                opt(result.map(|s| s.tps), 0),
                opt(ratio(direct, *result), 2),
                opt(result.map(|s| s.p99_ms), 3),
                opt(result.and_then(|s| s.proxy_us_per_stmt), 1),
            );
        }
        out.push('\n');
    }
    write_operator_fed(&mut out, r);
    let rounds = opts.rounds.min(2);
    write_stream(
        &mut out,
        &format!("{STREAM_ROWS} rows with psql (simple protocol)"),
        rounds,
        &r.stream_direct,
        &r.stream_gateway,
    );
    let _ = writeln!(
        out,
        "  pgwarden peak RSS (VmHWM): {} KiB before, {} KiB after streaming",
        r.stream_peak_before_kib, r.stream_peak_kib
    );
    write_stream(
        &mut out,
        &format!("{MASKED_ROWS} rows with one masked column (Partial keepLast 4)"),
        rounds,
        &r.masked_direct,
        &r.masked_gateway,
    );
    let _ = writeln!(
        out,
        "  pgwarden peak RSS (VmHWM): {} KiB",
        r.masked_peak_kib
    );
    let per_session =
        (r.idle.with_sessions_kib as f64 - r.idle.baseline_kib as f64) / IDLE_SESSIONS as f64;
    let _ = writeln!(
        out,
        "\n{IDLE_SESSIONS} idle sessions through pgwarden (opened in {:.1} s):\n  RSS {} KiB idle, {} KiB with the sessions ({per_session:.1} KiB per session)",
        r.idle.open_secs, r.idle.baseline_kib, r.idle.with_sessions_kib
    );
    print!("{out}");
}

/// The operator-fed gateway beside the file-fed one, row by row: the same
/// policy, so any gap is what operator mode costs.
fn write_operator_fed(out: &mut String, r: &Report) {
    let (Some(file), Some(fed)) = (r.column("pgwarden"), r.column(OPERATOR_FED)) else {
        return;
    };
    let _ = writeln!(
        out,
        "\n{OPERATOR_FED} (config snapshot from the operator's stream) vs pgwarden (files), same policy:"
    );
    for row in &r.rows {
        let (f, o) = (row.results[file], row.results[fed]);
        if o.is_none() {
            continue;
        }
        let _ = writeln!(
            out,
            "  {:<9} {:>2} clients: tps {} vs {} ({}x), us/stmt {} vs {}",
            row.mode,
            row.clients,
            opt(o.map(|s| s.tps), 0),
            opt(f.map(|s| s.tps), 0),
            opt(ratio(f, o), 2),
            opt(o.and_then(|s| s.proxy_us_per_stmt), 1),
            opt(f.and_then(|s| s.proxy_us_per_stmt), 1),
        );
    }
}

fn write_stream(
    out: &mut String,
    what: &str,
    rounds: u32,
    direct: &StreamResult,
    gateway: &StreamResult,
) {
    let _ = writeln!(
        out,
        "\nstreaming {what}, {:.1} MB of output, mean of {rounds} round(s):",
        direct.bytes as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "  direct    {:>6.2} s {:>7.1} MB/s",
        direct.secs,
        direct.mb_per_sec()
    );
    let _ = writeln!(
        out,
        "  pgwarden  {:>6.2} s {:>7.1} MB/s   (ratio {:.2})",
        gateway.secs,
        gateway.mb_per_sec(),
        gateway.mb_per_sec() / direct.mb_per_sec()
    );
}

fn print_json(opts: &Options, r: &Report) {
    let rows: Vec<Value> = r
        .rows
        .iter()
        .map(|row| {
            let mut v = json!({
                "mode": row.mode,
                "clients": row.clients,
                "direct": summary_json(row.results[0]),
            });
            // Every other target by name, with its ratio to direct.
            for (name, result) in r.target_names.iter().zip(&row.results).skip(1) {
                v[*name] = summary_json(*result);
                v[format!("{name}_ratio")] = json!(ratio(row.results[0], *result));
            }
            // What operator mode costs: its tps over the file-fed gateway's.
            if let (Some(file), Some(fed)) = (r.column("pgwarden"), r.column(OPERATOR_FED)) {
                v[format!("{OPERATOR_FED}_vs_pgwarden")] =
                    json!(ratio(row.results[file], row.results[fed]));
            }
            v
        })
        .collect();
    let doc = json!({
        "options": {"quick": opts.quick, "secs": opts.secs, "rounds": opts.rounds, "scale": opts.scale},
        "cpus": thread::available_parallelism().map_or(0, |n| n.get()),
        "pgbench_select_only": rows,
        "streaming": {
            "rows": STREAM_ROWS,
            "bytes": r.stream_direct.bytes,
            "direct": {"secs": r.stream_direct.secs, "mb_per_sec": r.stream_direct.mb_per_sec()},
            "pgwarden": {"secs": r.stream_gateway.secs, "mb_per_sec": r.stream_gateway.mb_per_sec()},
            "pgwarden_peak_rss_kib_before": r.stream_peak_before_kib,
            "pgwarden_peak_rss_kib": r.stream_peak_kib,
        },
        "streaming_masked": {
            "rows": MASKED_ROWS,
            "bytes": r.masked_direct.bytes,
            "direct": {"secs": r.masked_direct.secs, "mb_per_sec": r.masked_direct.mb_per_sec()},
            "pgwarden": {"secs": r.masked_gateway.secs, "mb_per_sec": r.masked_gateway.mb_per_sec()},
            "pgwarden_peak_rss_kib": r.masked_peak_kib,
        },
        "idle_sessions": {
            "sessions": IDLE_SESSIONS,
            "open_secs": r.idle.open_secs,
            "rss_kib_baseline": r.idle.baseline_kib,
            "rss_kib_with_sessions": r.idle.with_sessions_kib,
        },
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&doc).expect("serialize report")
    );
}

// === main ===

/// `$PGWARDEN_BIN`, else `pgwarden` next to this executable; exported so the harness
/// (which looks next to test executables) starts the same binary.
fn locate_pgwarden() -> Result<PathBuf, String> {
    let bin = match std::env::var_os("PGWARDEN_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("pgwarden"),
    };
    if !bin.exists() {
        return Err(format!(
            "{} not found: build it first (cargo build --release -p pgwarden-sidecar) or set PGWARDEN_BIN",
            bin.display()
        ));
    }
    // Still single-threaded here.
    std::env::set_var("PGWARDEN_BIN", &bin);
    Ok(bin)
}

fn main() -> ExitCode {
    let opts = match Options::from_args() {
        Ok(opts) => opts,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let bin = match locate_pgwarden() {
        Ok(bin) => bin,
        Err(msg) => {
            eprintln!("bench: {msg}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    progress(format!("pgwarden binary: {}", bin.display()));
    let ticks_per_sec = clock_ticks_per_sec();

    progress("starting PostgreSQL");
    let pg = PgCluster::builder()
        .setting("max_connections", &(IDLE_SESSIONS + 100).to_string())
        .setting("shared_buffers", "'256MB'")
        .setting("log_connections", "off")
        .setting("log_disconnections", "off")
        .start();
    let direct_env = pg.direct_env();

    progress(format!("pgbench -i -s {}", opts.scale));
    pgbench(
        &direct_env,
        &["-i", "-q", "-s", &opts.scale.to_string()],
        Duration::from_secs(600),
    );

    // The realistic policy: ordered default-deny rules and a masked column
    // on a table pgbench does not touch (so masking's bookkeeping runs on
    // every statement without changing the results).
    let realistic = format!(
        "{}{REALISTIC_MASKING}",
        pgwarden_e2e::policy_yaml(pg.port(), None)
    );
    let gw = Gateway::builder(&pg).policy_yaml(realistic.clone()).start();
    // The same policy, masking and credential fed as in a cluster: one
    // snapshot down the operator's config stream, no files.
    let fed = OperatorFed::start(&pg, &realistic);
    // The same gateway with the verdict cache off: every statement is parsed
    // and judged again, which shows what the cache saves.
    let gw_nocache = Gateway::builder(&pg)
        .policy_yaml(realistic.clone())
        .arg("--verdict-cache-entries")
        .arg("0")
        .start();
    // Session recording on top (issue: measure both modes): records flushed
    // within 200 ms, and durable (fsync before the result completes).
    let gw_recorded = Gateway::builder(&pg)
        .policy_yaml(format!("{realistic}  recording: {{resultRows: 10}}\n"))
        .start();
    let gw_durable = Gateway::builder(&pg)
        .policy_yaml(format!(
            "{realistic}  recording: {{resultRows: 10, durable: true}}\n"
        ))
        .start();
    // The runtime flavour: the same gateway on tokio's multi-threaded
    // runtime (2 workers) instead of the default single thread.
    let gw_mt = (!opts.quick).then(|| {
        Gateway::builder(&pg)
            .policy_yaml(realistic.clone())
            .arg("--worker-threads")
            .arg("2")
            .start()
    });
    let (bouncer, bouncer_session) = if opts.pgbouncer {
        match (
            Pgbouncer::start(&pg, "transaction"),
            Pgbouncer::start(&pg, "session"),
        ) {
            (Ok(b), Ok(s)) => (Some(b), Some(s)),
            (Err(e), _) | (_, Err(e)) => {
                progress(format!("skipping the pgbouncer comparison: {e}"));
                (None, None)
            }
        }
    } else {
        (None, None)
    };
    let mut targets = vec![
        Target {
            name: "direct",
            env: direct_env.clone(),
            pid: None,
            skip_modes: &[],
            skip_clients: &[],
        },
        Target {
            name: "pgwarden",
            env: gw.env(),
            pid: Some(gw.pid()),
            skip_modes: &[],
            skip_clients: &[],
        },
        Target {
            name: OPERATOR_FED,
            env: fed.gateway.env(),
            pid: Some(fed.gateway.pid()),
            skip_modes: &[],
            // The guard checks it at 8 clients only.
            skip_clients: if opts.guard { &[1] } else { &[] },
        },
    ];
    let mut more = vec![
        Target {
            name: "no-cache",
            env: gw_nocache.env(),
            pid: Some(gw_nocache.pid()),
            skip_modes: &[],
            skip_clients: &[],
        },
        Target {
            name: "recorded",
            env: gw_recorded.env(),
            pid: Some(gw_recorded.pid()),
            skip_modes: &[],
            skip_clients: &[],
        },
        Target {
            name: "durable",
            env: gw_durable.env(),
            pid: Some(gw_durable.pid()),
            skip_modes: &[],
            skip_clients: &[],
        },
    ];
    if let Some(g) = &gw_mt {
        more.push(Target {
            name: "mt2",
            env: g.env(),
            pid: Some(g.pid()),
            skip_modes: &["extended", "prepared"],
            skip_clients: &[],
        });
    }
    // The guard compares only what its thresholds need.
    if !opts.guard {
        targets.extend(more);
    }
    if let (Some(b), Some(s)) = (&bouncer, &bouncer_session) {
        targets.push(Target {
            name: "pgbouncer",
            env: b.env(),
            pid: Some(b.pid()),
            // Transaction pooling cannot keep protocol-level prepared statements.
            skip_modes: &["prepared"],
            skip_clients: &[],
        });
        targets.push(Target {
            name: "pgb-session",
            env: s.env(),
            pid: Some(s.pid()),
            // Session pooling: the mode that can (and only where it matters).
            skip_modes: &["simple", "extended"],
            skip_clients: &[],
        });
    }
    let rows = pgbench_matrix(&opts, &targets, ticks_per_sec);
    let target_names = targets.iter().map(|t| t.name).collect();
    gw.assert_running();
    fed.gateway.assert_running();
    gw_nocache.assert_running();
    gw_recorded.assert_running();
    gw_durable.assert_running();
    drop(gw);
    drop(fed);
    drop(gw_nocache);
    drop(gw_recorded);
    drop(gw_durable);
    drop(gw_mt);
    drop(bouncer);
    drop(bouncer_session);

    let stream_rounds = opts.rounds.min(2);
    progress(format!(
        "streaming {STREAM_ROWS} rows: {stream_rounds} round(s) direct / fresh gateway"
    ));
    let gw = Gateway::start(&pg);
    let stream_peak_before_kib = proc_status_kib(gw.pid(), "VmHWM:");
    let (mut stream_direct, mut stream_gateway) = (Vec::new(), Vec::new());
    for _ in 0..stream_rounds {
        stream_direct.push(stream_rows(&direct_env));
        stream_gateway.push(stream_rows(&gw.env()));
    }
    let stream_peak_kib = proc_status_kib(gw.pid(), "VmHWM:");
    let (stream_direct, stream_gateway) =
        (mean_stream(&stream_direct), mean_stream(&stream_gateway));
    progress(format!(
        "streaming: direct {:.2} s, pgwarden {:.2} s",
        stream_direct.secs, stream_gateway.secs
    ));
    gw.assert_running();
    drop(gw);

    progress(format!(
        "streaming {MASKED_ROWS} rows with a masked column: {stream_rounds} round(s) direct / masking gateway"
    ));
    let out = run_command(
        libpq_command("psql", &direct_env).args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            MASKED_SETUP,
        ]),
        None,
        Duration::from_secs(600),
    );
    assert!(
        out.status.success(),
        "masked table setup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gw = Gateway::builder(&pg)
        .policy_yaml(pgwarden_e2e::policy_with_rules(
            pg.port(),
            None,
            MASKED_POLICY,
        ))
        .start();
    let masked_sql = "SELECT id, card, note FROM stream_masked";
    let (mut masked_direct, mut masked_gateway) = (Vec::new(), Vec::new());
    for _ in 0..stream_rounds {
        masked_direct.push(stream_query(&direct_env, masked_sql, MASKED_ROWS));
        masked_gateway.push(stream_query(&gw.env(), masked_sql, MASKED_ROWS));
    }
    let masked_peak_kib = proc_status_kib(gw.pid(), "VmHWM:");
    // The point of the exercise: no raw card number came through.
    let sample = run_command(
        libpq_command("psql", &gw.env()).args([
            "-X",
            "-A",
            "-t",
            "-c",
            "SELECT card FROM stream_masked WHERE id = 123456",
        ]),
        None,
        Duration::from_secs(60),
    );
    assert_eq!(
        String::from_utf8_lossy(&sample.stdout).trim(),
        "************3456"
    );
    let (masked_direct, masked_gateway) =
        (mean_stream(&masked_direct), mean_stream(&masked_gateway));
    gw.assert_running();
    drop(gw);

    progress(format!(
        "{IDLE_SESSIONS} idle sessions through a fresh gateway"
    ));
    let gw = Gateway::start(&pg);
    let idle = idle_sessions(&gw);
    gw.assert_running();
    drop(gw);

    let report = Report {
        rows,
        target_names,
        stream_direct,
        stream_gateway,
        stream_peak_before_kib,
        stream_peak_kib,
        masked_direct,
        masked_gateway,
        masked_peak_kib,
        idle,
    };
    if opts.json {
        print_json(&opts, &report);
    } else {
        print_text(&opts, &report);
    }
    progress(format!("done in {:.0} s", started.elapsed().as_secs_f64()));
    if opts.guard {
        let failures = guard(&report);
        if !failures.is_empty() {
            for f in &failures {
                eprintln!("bench guard: FAILED: {f}");
            }
            return ExitCode::FAILURE;
        }
        eprintln!("bench guard: ok (no gross regression)");
    }
    ExitCode::SUCCESS
}

/// Gross regressions only: a guard that flakes on a noisy machine gets
/// ignored. Measured on the 2-core CI machine: 1-client TPS 0.85-1.0 of
/// pgbouncer's (0.3-0.8 of direct: a busy machine slows every extra hop, and
/// CI once saw both proxies at 0.30), CPU per statement 1.0-1.6x
/// pgbouncer's, masked streaming 0.9-1.0, 52 KiB per idle session.
const GUARD_MIN_1C_VS_POOLER: f64 = 0.50;
/// Only when no pooler ran beside it.
const GUARD_MIN_RATIO_1C: f64 = 0.40;
const GUARD_MAX_CPU_VS_PGBOUNCER: f64 = 3.0;
const GUARD_MIN_MASKED_STREAM: f64 = 0.70;
const GUARD_MAX_IDLE_KIB: f64 = 100.0;
/// The operator-fed gateway's mean TPS at 8 clients over the modes, as a share
/// of the file-fed gateway's: the same policy, so it should be ~1.0.
const GUARD_MIN_OPERATOR_FED: f64 = 0.75;

fn guard(r: &Report) -> Vec<String> {
    let mut failures = Vec::new();
    let Some(pw) = r.column("pgwarden") else {
        return vec!["no pgwarden column in the report".into()];
    };
    // What each row is compared with: pgbouncer, or in session pooling
    // (-M prepared).
    let poolers = [r.column("pgbouncer"), r.column("pgb-session")];
    for row in &r.rows {
        let (direct, ours) = (row.results[0], row.results[pw]);
        let theirs = poolers.iter().flatten().find_map(|&c| row.results[c]);
        if row.clients == 1 {
            // Against the pooler in the same rounds: the machine's noise
            // hits both alike.
            let (got, min, what) = match theirs {
                Some(_) => (ratio(theirs, ours), GUARD_MIN_1C_VS_POOLER, "pgbouncer's"),
                None => (ratio(direct, ours), GUARD_MIN_RATIO_1C, "direct"),
            };
            if got.is_none_or(|x| x < min) {
                failures.push(format!(
                    "-M {} 1 client: pgwarden at {} of {what} TPS (minimum {min})",
                    row.mode,
                    opt(got, 2)
                ));
            }
        }
        if let (Some(o), Some(t)) = (
            ours.and_then(|s| s.proxy_us_per_stmt),
            theirs.and_then(|s| s.proxy_us_per_stmt),
        ) {
            if o > GUARD_MAX_CPU_VS_PGBOUNCER * t {
                failures.push(format!(
                    "-M {} {} clients: pgwarden {o:.1} CPU-us per statement, more than {GUARD_MAX_CPU_VS_PGBOUNCER}x pgbouncer's {t:.1}",
                    row.mode, row.clients
                ));
            }
        }
    }
    match r.column(OPERATOR_FED) {
        None => failures.push(format!("no {OPERATOR_FED} column in the report")),
        Some(fed) => {
            // Modes where both ran, at 8 clients.
            let pairs: Vec<(f64, f64)> = r
                .rows
                .iter()
                .filter(|row| row.clients == 8)
                .filter_map(|row| Some((row.results[pw]?.tps, row.results[fed]?.tps)))
                .collect();
            let n = pairs.len().max(1) as f64;
            let file_tps = pairs.iter().map(|p| p.0).sum::<f64>() / n;
            let fed_tps = pairs.iter().map(|p| p.1).sum::<f64>() / n;
            if pairs.is_empty() || fed_tps < GUARD_MIN_OPERATOR_FED * file_tps {
                failures.push(format!(
                    "8 clients: {OPERATOR_FED} at {fed_tps:.0} mean TPS over {} mode(s), {} of the file-fed gateway's {file_tps:.0} (minimum {GUARD_MIN_OPERATOR_FED})",
                    pairs.len(),
                    opt((file_tps > 0.0).then(|| fed_tps / file_tps), 2)
                ));
            }
        }
    }
    let masked = r.masked_gateway.mb_per_sec() / r.masked_direct.mb_per_sec();
    if masked < GUARD_MIN_MASKED_STREAM {
        failures.push(format!(
            "masked streaming at {masked:.2} of direct (minimum {GUARD_MIN_MASKED_STREAM})"
        ));
    }
    let per_session =
        (r.idle.with_sessions_kib as f64 - r.idle.baseline_kib as f64) / IDLE_SESSIONS as f64;
    if per_session > GUARD_MAX_IDLE_KIB {
        failures.push(format!(
            "{per_session:.1} KiB per idle session (maximum {GUARD_MAX_IDLE_KIB})"
        ));
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(tps: f64, us: f64) -> Option<Summary> {
        Some(Summary {
            tps,
            latency_ms: 1.0,
            p50_ms: 1.0,
            p99_ms: 1.0,
            transactions: 1000,
            proxy_us_per_stmt: Some(us),
        })
    }

    fn report(ours_1c: f64, ours_us: f64, masked_mb: f64, idle_kib: u64) -> Report {
        report_fed(ours_1c, ours_us, masked_mb, idle_kib, 1.0)
    }

    /// `fed`: the operator-fed gateway's TPS over the file-fed one's at 8
    /// clients (the guard measures it at 8 clients only).
    fn report_fed(ours_1c: f64, ours_us: f64, masked_mb: f64, idle_kib: u64, fed: f64) -> Report {
        let stream = |mb: f64| StreamResult {
            secs: 1.0,
            bytes: (mb * 1_000_000.0) as u64,
        };
        Report {
            rows: vec![
                PgbenchRow {
                    mode: "simple",
                    clients: 1,
                    results: vec![
                        summary(10_000.0, 0.0),
                        summary(ours_1c, ours_us),
                        None,
                        summary(8_000.0, 20.0),
                    ],
                },
                PgbenchRow {
                    mode: "simple",
                    clients: 8,
                    results: vec![
                        summary(30_000.0, 0.0),
                        summary(20_000.0, ours_us),
                        summary(20_000.0 * fed, ours_us),
                        summary(20_000.0, 20.0),
                    ],
                },
                PgbenchRow {
                    mode: "extended",
                    clients: 8,
                    results: vec![
                        summary(28_000.0, 0.0),
                        summary(16_000.0, ours_us),
                        summary(16_000.0 * fed, ours_us),
                        summary(17_000.0, 20.0),
                    ],
                },
            ],
            target_names: vec!["direct", "pgwarden", OPERATOR_FED, "pgbouncer"],
            stream_direct: stream(100.0),
            stream_gateway: stream(95.0),
            stream_peak_before_kib: 0,
            stream_peak_kib: 0,
            masked_direct: stream(100.0),
            masked_gateway: stream(masked_mb),
            masked_peak_kib: 0,
            idle: IdleResult {
                baseline_kib: 8_000,
                with_sessions_kib: 8_000 + idle_kib * IDLE_SESSIONS as u64,
                open_secs: 1.0,
            },
        }
    }

    #[test]
    fn the_guard_passes_todays_numbers_and_fails_gross_regressions() {
        assert!(guard(&report(6_000.0, 25.0, 95.0, 35)).is_empty());
        let slow = guard(&report(3_000.0, 25.0, 95.0, 35));
        assert!(slow.len() == 1 && slow[0].contains("1 client"), "{slow:?}");
        let hungry = guard(&report(6_000.0, 70.0, 95.0, 35));
        assert!(
            hungry.iter().all(|f| f.contains("CPU-us")) && hungry.len() == 3,
            "{hungry:?}"
        );
        let masked = guard(&report(6_000.0, 25.0, 50.0, 35));
        assert!(
            masked.len() == 1 && masked[0].contains("masked"),
            "{masked:?}"
        );
        let fat = guard(&report(6_000.0, 25.0, 95.0, 150));
        assert!(fat.len() == 1 && fat[0].contains("idle"), "{fat:?}");
    }

    #[test]
    fn one_client_is_judged_against_the_pooler_in_the_same_rounds() {
        // A busy machine: both proxies at 0.3 of direct (CI, stop 27).
        let busy = |ours: f64, theirs: f64| {
            let mut r = report(6_000.0, 25.0, 95.0, 35);
            r.rows[0].results[1] = summary(ours, 25.0);
            r.rows[0].results[3] = summary(theirs, 20.0);
            guard(&r)
        };
        assert!(
            busy(3_000.0, 3_100.0).is_empty(),
            "{:?}",
            busy(3_000.0, 3_100.0)
        );
        let slow = busy(1_400.0, 3_100.0);
        assert!(
            slow.len() == 1 && slow[0].contains("0.45 of pgbouncer's"),
            "{slow:?}"
        );
        // With no pooler beside it, the ratio to direct decides.
        let mut alone = report(3_000.0, 25.0, 95.0, 35);
        for row in &mut alone.rows {
            row.results[3] = None;
        }
        let alone = guard(&alone);
        assert!(
            alone.len() == 1 && alone[0].contains("0.30 of direct"),
            "{alone:?}"
        );
    }

    #[test]
    fn the_guard_fails_an_operator_fed_gateway_at_half_the_file_fed_ones_tps() {
        // Within noise of the file-fed gateway passes.
        assert!(guard(&report_fed(6_000.0, 25.0, 95.0, 35, 0.9)).is_empty());
        let slow = guard(&report_fed(6_000.0, 25.0, 95.0, 35, 0.5));
        assert!(
            slow.len() == 1 && slow[0].contains("operator-fed") && slow[0].contains(" 0.50 "),
            "{slow:?}"
        );
        // Not measured at all is a failure too, not a pass.
        let mut missing = report(6_000.0, 25.0, 95.0, 35);
        for row in &mut missing.rows {
            row.results[2] = None;
        }
        let missing = guard(&missing);
        assert!(
            missing.len() == 1 && missing[0].contains("operator-fed"),
            "{missing:?}"
        );
    }
}
