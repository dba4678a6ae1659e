use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::approval::cluster::ClusterClient;
use crate::recording::{ship, spool};

/// Handles to every metric, resolved once so the hot path only does an
/// atomic add.
pub struct Metrics {
    registry: Registry,
    pub connections_total: IntCounter,
    pub connections_active: IntGauge,
    pub connections_rejected: IntCounterVec,
    pub statements_simple: IntCounter,
    pub statements_extended: IntCounter,
    /// By policy and the rule that refused ("default" without one: the
    /// default action or a built-in refusal). Rule names come from the
    /// policy, never from the statement, so the label set stays bounded.
    pub statements_refused: IntCounterVec,
    /// Audit-mode policies: statements forwarded that the rules would have
    /// refused, by policy, would-be verdict and rule (never the statement).
    pub statements_audited: IntCounterVec,
    pub bytes_to_client: IntCounter,
    pub bytes_to_upstream: IntCounter,
    pub upstream_errors: IntCounterVec,
    pub protocol_errors_client: IntCounter,
    pub protocol_errors_upstream: IntCounter,
    /// Sessions ended because the server changed a setting pgwarden relies on.
    pub server_setting_changes: IntCounter,
    /// Statements refused because analysing them would cost too much.
    pub statements_too_large: IntCounter,
    /// Connections closed before login completed, by reason.
    pub startup_aborted: IntCounterVec,
    /// Recording logs found broken at start (recording went on in a new chain).
    pub recording_log_breaks: IntCounter,
    /// Configuration reloads, by result (ok, failed).
    pub config_reloads: IntCounterVec,
    /// Open sessions ended by a new configuration, by reason (revoked, reconnect).
    pub sessions_reconfigured: IntCounterVec,
    /// Tasks alive on the gateway's runtime (flat across reloads).
    pub runtime_tasks: IntGauge,
    /// The readiness check's own logins to each policy's upstream, by
    /// result (ok, or the failure's kind).
    pub upstream_checks: IntCounterVec,
    /// Operator mode: 1 while the config stream is connected.
    pub config_stream_connected: IntGauge,
    /// Operator mode: snapshots received, by result (applied, refused).
    pub config_snapshots: IntCounterVec,
    /// Operator mode: the version of the snapshot last put in force.
    pub config_version: IntGauge,
    /// Approval requests waiting for a decision (sampled: [`sample`]).
    pub approvals_pending: IntGauge,
    /// Records on their way, by stage: `disk` (handed to the recorder, not
    /// yet fsynced), `store` (on disk, not yet in the audit store).
    pub recording_backlog: IntGaugeVec,
    /// Seconds since the oldest record the audit store does not hold yet
    /// was written; 0 when it holds everything (or there is no store).
    pub recording_shipping_lag: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("pgwarden".into()), None)
            .expect("static registry prefix is valid");
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("static metric definition");
            registry
                .register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .expect("static metric definition");
            registry
                .register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("static metric definition");
            registry
                .register(Box::new(g.clone()))
                .expect("metric registered once");
            g
        };
        let connections_active = IntGauge::new(
            "client_connections_active",
            "Client sessions currently open",
        )
        .expect("static metric definition");
        registry
            .register(Box::new(connections_active.clone()))
            .expect("metric registered once");
        let statements = counter_vec(
            "statements_total",
            "Statements received from clients, by protocol",
            &["protocol"],
        );
        let bytes = counter_vec(
            "bytes_total",
            "Bytes relayed after login, by direction",
            &["direction"],
        );
        let protocol = counter_vec(
            "protocol_errors_total",
            "Malformed or unexpected messages, by the peer that sent them",
            &["peer"],
        );
        Metrics {
            connections_total: counter("client_connections_total", "Client connections accepted"),
            connections_active,
            connections_rejected: counter_vec(
                "client_connections_rejected_total",
                "Client connections refused before the session started, by reason",
                &["reason"],
            ),
            statements_simple: statements.with_label_values(&["simple"]),
            statements_extended: statements.with_label_values(&["extended"]),
            statements_refused: counter_vec(
                "statements_refused_total",
                "Statements refused by the gateway, by policy and rule (default: the default action or a built-in refusal)",
                &["policy", "rule"],
            ),
            statements_audited: counter_vec(
                "statements_audited_total",
                "Statements an audit-mode policy forwarded that its rules would deny or hold, by policy, verdict (would_deny, would_hold) and rule",
                &["policy", "verdict", "rule"],
            ),
            bytes_to_client: bytes.with_label_values(&["to_client"]),
            bytes_to_upstream: bytes.with_label_values(&["to_upstream"]),
            upstream_errors: counter_vec(
                "upstream_errors_total",
                "Failures connecting or logging in to the upstream server, by kind",
                &["kind"],
            ),
            protocol_errors_client: protocol.with_label_values(&["client"]),
            protocol_errors_upstream: protocol.with_label_values(&["upstream"]),
            server_setting_changes: counter(
                "server_setting_changes_total",
                "Sessions ended because the server changed a setting pgwarden relies on (standard_conforming_strings, client_encoding, session_authorization, ...)",
            ),
            statements_too_large: counter(
                "statements_too_large_total",
                "Statements refused because they exceed the analysis limits",
            ),
            config_reloads: counter_vec(
                "config_reloads_total",
                "Configuration reloads, by result (ok; failed: the previous configuration stays)",
                &["result"],
            ),
            sessions_reconfigured: counter_vec(
                "sessions_reconfigured_total",
                "Open sessions ended by a new configuration, by reason (revoked, reconnect)",
                &["reason"],
            ),
            runtime_tasks: {
                let g = IntGauge::new("runtime_tasks", "Tasks alive on the gateway's runtime")
                    .expect("static metric definition");
                registry
                    .register(Box::new(g.clone()))
                    .expect("metric registered once");
                g
            },
            startup_aborted: counter_vec(
                "startup_aborted_total",
                "Client connections closed before login completed, by reason (timeout, per_source_limit)",
                &["reason"],
            ),
            config_stream_connected: {
                let g = IntGauge::new(
                    "config_stream_connected",
                    "Operator mode: 1 while the config stream to the operator is connected",
                )
                .expect("static metric definition");
                registry
                    .register(Box::new(g.clone()))
                    .expect("metric registered once");
                g
            },
            config_snapshots: counter_vec(
                "config_snapshots_total",
                "Operator mode: configuration snapshots received, by result (applied; refused: NACKed, the previous configuration stays)",
                &["result"],
            ),
            config_version: {
                let g = IntGauge::new(
                    "config_version",
                    "Operator mode: version of the configuration snapshot last put in force",
                )
                .expect("static metric definition");
                registry
                    .register(Box::new(g.clone()))
                    .expect("metric registered once");
                g
            },
            upstream_checks: counter_vec(
                "upstream_login_checks_total",
                "The readiness check's logins to the policies' upstreams, by result (ok, connect, tls, auth, refused, protocol, io)",
                &["result"],
            ),
            approvals_pending: gauge(
                "approvals_pending",
                "Approval requests waiting for a decision (standalone: in the state directory; in a cluster: those this sidecar opened)",
            ),
            recording_backlog: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "recording_backlog_records",
                        "Session records on their way, by stage (disk: not yet fsynced; store: not yet in the audit store)",
                    ),
                    &["stage"],
                )
                .expect("static metric definition");
                registry
                    .register(Box::new(g.clone()))
                    .expect("metric registered once");
                g
            },
            recording_shipping_lag: gauge(
                "recording_shipping_lag_seconds",
                "Seconds since the oldest record the audit store does not hold yet was written (0: caught up, or no store)",
            ),
            recording_log_breaks: counter(
                "recording_log_breaks_total",
                "Recording logs found broken when the gateway started; recording went on in a new chain (pgwarden sessions verify reports the break)",
            ),
            registry,
        }
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            self.runtime_tasks
                .set(i64::try_from(h.metrics().num_alive_tasks()).unwrap_or(i64::MAX));
        }
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// How often the sampled gauges are brought up to date.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Where pending approvals are counted.
pub enum PendingFrom {
    /// The standalone store in this state directory.
    Dir(PathBuf),
    /// The requests this sidecar opened in the cluster.
    Cluster(Arc<ClusterClient>),
}

/// What the sampled gauges read, off the data path.
pub struct Sources {
    pub approvals: PendingFrom,
    /// The gateway's recorder, once a policy records.
    pub recorder: Box<dyn Fn() -> Option<spool::Recorder> + Send + Sync>,
    /// The shipping loops running now.
    pub shipping: Box<dyn Fn() -> Vec<Arc<ship::driver::Progress>> + Send + Sync>,
}

/// Keep the sampled gauges current, every [`SAMPLE_EVERY`], for ever.
pub async fn sample(metrics: Arc<Metrics>, sources: Sources) {
    let sources = Arc::new(sources);
    loop {
        let s = sources.clone();
        // Listing the store reads files: not on a runtime thread.
        if let Ok(Some(n)) = tokio::task::spawn_blocking(move || pending(&s.approvals)).await {
            metrics
                .approvals_pending
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let now = k8s_openapi::jiff::Timestamp::now().as_second();
        let r = recording(
            (sources.recorder)().as_ref().map(spool::Recorder::progress),
            &(sources.shipping)(),
            now,
        );
        let set = |stage: &str, n: u64| {
            metrics
                .recording_backlog
                .with_label_values(&[stage])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        };
        set("disk", r.unwritten);
        set("store", r.unshipped);
        metrics.recording_shipping_lag.set(r.lag_seconds);
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
}

/// Pending requests now; `None` when the store cannot be read (the gauge
/// keeps its last value; the error shows wherever the store is used).
fn pending(from: &PendingFrom) -> Option<usize> {
    use crate::approval::{request, store};
    let now = k8s_openapi::jiff::Timestamp::now();
    match from {
        PendingFrom::Cluster(c) => Some(c.pending_count(now)),
        PendingFrom::Dir(dir) => match store::DirStore::open_existing(dir) {
            Ok(s) => s.list().ok().map(|all| {
                all.iter()
                    .filter(|r| request::phase(r, now) == pgwarden_api::ApprovalPhase::Pending)
                    .count()
            }),
            // No store yet: nothing was ever held.
            Err(store::StoreError::Missing(_)) => Some(0),
            Err(_) => None,
        },
    }
}

/// The recording gauges' values.
#[derive(Debug, PartialEq, Eq)]
pub struct Recording {
    pub unwritten: u64,
    pub unshipped: u64,
    pub lag_seconds: i64,
}

/// From the recorder's and the shipping loops' progress: with several
/// stores, the one furthest behind.
pub fn recording(
    spool: Option<&spool::Progress>,
    ships: &[Arc<ship::driver::Progress>],
    now: i64,
) -> Recording {
    use std::sync::atomic::Ordering::Relaxed;
    let durable = spool.map_or(0, |p| p.durable_seq.load(Relaxed));
    Recording {
        unwritten: spool.map_or(0, spool::Progress::backlog),
        unshipped: ships
            .iter()
            .map(|s| durable.saturating_sub(s.shipped_seq.load(Relaxed)))
            .max()
            .unwrap_or(0),
        lag_seconds: ships.iter().map(|s| s.lag_seconds(now)).max().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests;
