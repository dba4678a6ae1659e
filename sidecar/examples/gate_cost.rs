//! Cost of judging one statement, with and without the verdict cache:
//! `cargo run --release -p pgwarden-sidecar --example gate_cost`.
//! The numbers the benchmark (scripts/bench) shows end to end, isolated.
use std::time::Instant;

use pgwarden_sidecar::policy::{analyze, Gate, SessionState};

const POLICY: &str = r#"
identity: {localTrust: {subject: dev}}
database: {host: h, name: shop, credentialsSecret: c}
defaultAction: Deny
rules:
  - {name: no-file-access, action: Deny, functions: ["pg_read_*", "lo_*"]}
  - {name: schema-changes, action: RequireApproval, statements: [DDL]}
  - {name: bulk-writes, action: RequireApproval, statements: [UPDATE, DELETE], unfiltered: true}
  - {name: app-data, action: Allow, statements: [SELECT, INSERT, UPDATE, DELETE], tables: ["public.pgbench_*", "public.orders"]}
"#;

fn per_call(n: u32, mut f: impl FnMut(u32)) -> f64 {
    let start = Instant::now();
    for i in 0..n {
        f(i);
    }
    start.elapsed().as_secs_f64() * 1e6 / f64::from(n)
}

fn main() {
    let spec = serde_yaml_ng::from_str(POLICY).expect("policy");
    let statements = [
        "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
        "SELECT o.id, sum(i.qty) FROM orders o JOIN order_items i ON i.order_id = o.id WHERE o.id = 7 GROUP BY o.id",
    ];
    let n = 20_000;
    for sql in statements {
        let parse = per_call(n, |_| {
            let _ = pg_query::parse(sql, 0);
        });
        let analysis = per_call(n, |_| {
            let _ = analyze::analyze(sql, analyze::Settings::default());
        });
        let cold = Gate::new(&spec, 0);
        let uncached = per_call(n, |_| {
            let _ = cold.judge(sql, &mut SessionState::default());
        });
        let warm = Gate::new(&spec, 4096);
        let cached = per_call(n, |_| {
            let _ = warm.judge(sql, &mut SessionState::default());
        });
        println!("{sql}");
        println!("  pg_query::parse {parse:6.2} µs | analyse {analysis:6.2} µs | judge uncached {uncached:6.2} µs | judge cached {cached:6.2} µs");
    }
}
