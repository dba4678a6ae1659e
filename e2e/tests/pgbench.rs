//! pgbench through the gateway: initialisation (DDL + COPY + VACUUM) and a short
//! select-only run in each query protocol mode.

use std::time::Duration;

use pgwarden_e2e::{gateway_and_direct, libpq_command, run_command, Endpoint, PgCluster};

gateway_and_direct!(simple_mode, extended_mode, prepared_mode);

const PGBENCH_TIMEOUT: Duration = Duration::from_secs(180);

fn pgbench(ep: &dyn Endpoint, args: &[&str]) -> (String, String) {
    let out = run_command(
        libpq_command("pgbench", &ep.env()).args(args),
        None,
        PGBENCH_TIMEOUT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "pgbench {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

/// The number after `prefix` on the first line that starts with it.
fn number_after(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix:?} in pgbench output:\n{text}"))
}

fn init_and_run(ep: &dyn Endpoint, pg: &PgCluster, mode: &str) {
    let (_, init_log) = pgbench(ep, &["-i", "-s", "1"]);
    assert!(init_log.contains("done in"), "{init_log}");
    assert_eq!(
        pg.admin_sql(
            "SELECT (SELECT count(*) FROM pgbench_accounts), (SELECT count(*) FROM pgbench_branches), \
             (SELECT count(*) FROM pgbench_tellers)"
        ),
        "100000|1|10"
    );

    let (report, stderr) = pgbench(ep, &["-S", "-T", "3", "-c", "4", "-M", mode]);
    assert!(
        report.contains(&format!("query mode: {mode}")),
        "{report}\n{stderr}"
    );
    let processed = number_after(&report, "number of transactions actually processed:");
    let failed = number_after(&report, "number of failed transactions:");
    let tps = number_after(&report, "tps =");
    assert!(processed > 0.0, "{report}");
    assert_eq!(failed, 0.0, "{report}");
    assert!(tps > 0.0, "{report}");
    assert!(!stderr.contains("error"), "{stderr}");
}

fn simple_mode(ep: &dyn Endpoint, pg: &PgCluster) {
    init_and_run(ep, pg, "simple");
}

fn extended_mode(ep: &dyn Endpoint, pg: &PgCluster) {
    init_and_run(ep, pg, "extended");
}

fn prepared_mode(ep: &dyn Endpoint, pg: &PgCluster) {
    init_and_run(ep, pg, "prepared");
}
