use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// Handles to every metric, resolved once so the hot path only does an
/// atomic add.
pub struct Metrics {
    registry: Registry,
    pub connections_total: IntCounter,
    pub connections_active: IntGauge,
    pub connections_rejected: IntCounterVec,
    pub statements_simple: IntCounter,
    pub statements_extended: IntCounter,
    pub statements_refused: IntCounter,
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
            statements_refused: counter(
                "statements_refused_total",
                "Statements refused by the gateway",
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
