//! End-to-end harness: a throwaway PostgreSQL cluster per test, the real `pgwarden`
//! binary in front of it, and the real clients (psql, pgbench, drivers) talking to
//! either of them.
//!
//! Every test owns its cluster, ports and temp dirs, so `cargo test` may run them on
//! parallel threads. Nothing here needs the proxy to exist except [`Gateway`]; the
//! harness self-tests (`cargo test -p pgwarden-e2e --lib`) only start PostgreSQL.
//!
//! The same client code can be pointed at the cluster directly (a *control* run) or at
//! the gateway through the [`Endpoint`] trait: when a test fails only through the
//! gateway, the proxy is at fault, not the test's expectation.
//!
//! Running:
//! ```text
//! cargo build -p pgwarden-sidecar          # the tests run target/<profile>/pgwarden
//! cargo test -p pgwarden-e2e               # everything
//! cargo test -p pgwarden-e2e direct        # only the control runs (no proxy needed)
//! PGWARDEN_BIN=/path/to/pgwarden cargo test -p pgwarden-e2e --test robustness
//! ```
//! Needs PostgreSQL 15 server binaries (`/usr/lib/postgresql/15/bin`, or
//! `PGWARDEN_E2E_PG_BINDIR`), psql, pgbench and openssl. As root, PostgreSQL runs as
//! the `postgres` OS user. `PGWARDEN_E2E_SEED` reseeds the random-input tests.
#![forbid(unsafe_code)]

pub mod approval_cluster;
pub mod approvals;
mod client;
pub mod fake_operator;
mod gateway;
mod net;
pub mod oidc;
pub mod operator;
mod pg;
pub mod process;
pub mod psql_session;
pub mod recording;
mod tls;
pub mod wire;

pub use approvals::{ApprovalsCli, CliOutput};
pub use client::{libpq_command, psql_query, run_command, run_psql, wait_until, Endpoint};
pub use fake_operator::FakeOperator;
pub use gateway::{
    pgwarden_bin, policy_with_identity, policy_with_rules, policy_yaml, Gateway, GatewayBuilder,
    GatewayExit, POLICY_NAME, REALISTIC_RULES, SECRET_NAME,
};
pub use net::{free_port, http_get, http_post};
pub use operator::{injected_pod, operator_bin, Operator, OperatorBuilder};
pub use pg::{PgCluster, PgClusterBuilder, UpstreamAuth, APP_DATABASE, APP_PASSWORD, APP_USER};
pub use tls::{ServerCert, TestCa, TestPki};

/// For each `name`, a module `name` with two tests: `through_gateway` runs
/// `name(&gateway, &cluster)` against a fresh default [`Gateway`] in front of a fresh
/// [`PgCluster`] (and then checks the gateway is still alive), `direct` runs
/// `name(&cluster, &cluster)` against the cluster alone. The direct run is the control:
/// it proves the test's expectations hold for PostgreSQL itself.
///
/// `name` must be a `fn(&dyn Endpoint, &PgCluster)` in the invoking module.
#[macro_export]
macro_rules! gateway_and_direct {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[test]
            fn through_gateway() {
                let pg = $crate::PgCluster::start();
                let gw = $crate::Gateway::start(&pg);
                super::$name(&gw, &pg);
                gw.assert_running();
            }

            #[test]
            fn direct() {
                let pg = $crate::PgCluster::start();
                super::$name(&pg, &pg);
            }
        }
    )+};
}

/// Like [`gateway_and_direct!`] for async checks: `name` must be an
/// `async fn(String /* conninfo */, &PgCluster)`; the tests run on a two-worker tokio
/// runtime (the invoking crate needs `tokio` with `macros` and `rt-multi-thread`).
#[macro_export]
macro_rules! gateway_and_direct_async {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn through_gateway() {
                let pg = $crate::PgCluster::start();
                let gw = $crate::Gateway::start(&pg);
                super::$name($crate::Endpoint::conninfo(&gw), &pg).await;
                gw.assert_running();
            }

            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn direct() {
                let pg = $crate::PgCluster::start();
                super::$name($crate::Endpoint::conninfo(&pg), &pg).await;
            }
        }
    )+};
}

#[cfg(test)]
mod tests;
