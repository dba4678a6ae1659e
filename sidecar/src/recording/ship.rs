//! Shipping the recording log out of the gateway: at least once, idempotent.
//!
//! - `driver`: the loop, generic over a [`Sink`] (cursor, batches, capped
//!   backoff, draining after an outage, shutdown);
//! - `postgres`: the audit PostgreSQL sink, its DSN and table, and reading
//!   the table back for the CLI.
//!
//! While a store is down the spool simply grows; the loop retries and
//! drains it when the store returns. A loop ships for as long as some
//! policy names its store: a reload that drops the store stops it.

pub mod driver;
pub mod postgres;

use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;

pub use driver::{Pace, SealedRecord, Sink, Stored};
pub use postgres::{fetch_lines, parse_dsn, store_error, table_ddl, AuditTable, DEFAULT_TABLE};

use super::spool;
use crate::upstream::UpstreamTarget;
use crate::wire::Limits;

/// Ship the log under `state_dir` to an audit table until `shutdown` says
/// true or its sender is dropped; how far it got, for the metrics.
pub fn spawn(
    state_dir: &Path,
    target: Arc<UpstreamTarget>,
    table: String,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
) -> Arc<driver::Progress> {
    let dir = spool::dir(state_dir);
    let progress = Arc::new(driver::Progress::default());
    let p = progress.clone();
    tokio::spawn(async move {
        let chain = match spool::chain_id(&dir) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "recording store: cannot read the chain id; not shipping");
                return;
            }
        };
        let sink = AuditTable::new(target, table, limits);
        driver::run(dir, chain, sink, Pace::default(), shutdown, p).await;
    });
    progress
}
