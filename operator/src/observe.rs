//! `/metrics` (Prometheus text), `/healthz` (the process serves) and
//! `/readyz` (the API server was reached and every registered cache synced),
//! on one plain HTTP/1 listener.
//!
//! Metric labels never carry a policy, pod, subject or Secret name: the
//! cardinality stays fixed, and names of things stay in logs and status.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::sidecars::Sidecars;

pub struct Metrics {
    registry: Registry,
    /// `result`: `ok` (status computed and written if it changed) or `error`
    /// (the API refused a read or write; retried with backoff).
    pub reconciles: IntCounterVec,
    pub reconcile_duration: Histogram,
    /// Pods with an open config stream to this replica (set at scrape).
    connected_sidecars: IntGauge,
    /// 1 while this replica holds the Lease (or leader election is off).
    pub is_leader: IntGauge,
    /// Set by the config stream: over the sidecars connected to this
    /// replica, how many snapshot versions the furthest-behind one is behind
    /// the last version sent to it (0: every sidecar ACKed what it was sent).
    /// A value that stays above 0 means a sidecar neither ACKs nor NACKs.
    pub snapshot_version_lag: IntGauge,
    /// Approval notifications by `result`: sent, failed (every try),
    /// dropped (the queue was full).
    pub approval_notifications: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        // Metric definitions are constants: a failure here is a bug caught by
        // the unit test, never a runtime condition.
        let reconciles = IntCounterVec::new(
            Opts::new(
                "pgwarden_operator_reconciles_total",
                "Policy reconciles by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "pgwarden_operator_reconcile_duration_seconds",
                "Time to reconcile one policy, API calls included",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )
        .expect("valid metric");
        let connected_sidecars = IntGauge::new(
            "pgwarden_operator_connected_sidecars",
            "Sidecars with an open config stream to this replica",
        )
        .expect("valid metric");
        let is_leader = IntGauge::new(
            "pgwarden_operator_is_leader",
            "1 while this replica runs the controllers",
        )
        .expect("valid metric");
        let snapshot_version_lag = IntGauge::new(
            "pgwarden_operator_snapshot_version_lag",
            "Versions the furthest-behind connected sidecar is behind the last snapshot sent to it",
        )
        .expect("valid metric");
        let approval_notifications = IntCounterVec::new(
            Opts::new(
                "pgwarden_operator_approval_notifications_total",
                "Approval notification webhooks by result (sent, failed, dropped)",
            ),
            &["result"],
        )
        .expect("valid metric");
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(approval_notifications.clone()),
            Box::new(reconcile_duration.clone()),
            Box::new(connected_sidecars.clone()),
            Box::new(is_leader.clone()),
            Box::new(snapshot_version_lag.clone()),
        ] {
            registry.register(c).expect("unique metric");
        }
        for result in ["ok", "error"] {
            reconciles.with_label_values(&[result]);
        }
        Metrics {
            registry,
            reconciles,
            reconcile_duration,
            connected_sidecars,
            is_leader,
            snapshot_version_lag,
            approval_notifications,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Named readiness gates. `/readyz` answers 200 only when every registered
/// gate is ready; the 503 body names the ones that are not.
#[derive(Debug, Default)]
pub struct Readiness {
    gates: Mutex<BTreeMap<String, bool>>,
}

impl Readiness {
    pub fn set(&self, gate: &str, ready: bool) {
        let mut g = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        g.insert(gate.to_owned(), ready);
    }

    /// For a component that stopped (the controller on a replica that lost
    /// the lease): it no longer holds readiness back.
    pub fn remove(&self, gate: &str) {
        let mut g = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        g.remove(gate);
    }

    /// The gates not ready, in name order.
    pub fn waiting(&self) -> Vec<String> {
        let g = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        g.iter()
            .filter(|(_, ready)| !**ready)
            .map(|(name, _)| name.clone())
            .collect()
    }
}

pub struct Observe {
    pub metrics: Metrics,
    pub readiness: Readiness,
    pub sidecars: Arc<Sidecars>,
}

impl Observe {
    pub fn new(sidecars: Arc<Sidecars>) -> Observe {
        Observe {
            metrics: Metrics::new(),
            readiness: Readiness::default(),
            sidecars,
        }
    }

    fn respond(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        let reply = |code: StatusCode, ctype: &str, body: String| {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = code;
            if let Ok(v) = http::HeaderValue::from_str(ctype) {
                r.headers_mut().insert(http::header::CONTENT_TYPE, v);
            }
            r
        };
        if method != Method::GET && method != Method::HEAD {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET only\n".into(),
            );
        }
        match path {
            "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            "/readyz" => match self.readiness.waiting() {
                w if w.is_empty() => reply(StatusCode::OK, "text/plain", "ready\n".into()),
                w => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: waiting for {}\n", w.join(", ")),
                ),
            },
            "/metrics" => {
                let m = &self.metrics;
                m.connected_sidecars
                    .set(i64::try_from(self.sidecars.connected_count()).unwrap_or(i64::MAX));
                let mut out = Vec::new();
                match TextEncoder::new().encode(&m.registry.gather(), &mut out) {
                    Ok(()) => reply(
                        StatusCode::OK,
                        prometheus::TEXT_FORMAT,
                        String::from_utf8_lossy(&out).into_owned(),
                    ),
                    Err(e) => reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        format!("encoding metrics: {e}\n"),
                    ),
                }
            }
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        }
    }
}

/// Serves until `shutdown` turns true. Connections are short-lived scrapes
/// and probes; each gets its own task.
pub async fn serve(
    listener: TcpListener,
    observe: Arc<Observe>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let observe = observe.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let r = observe.respond(req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(r: Response<Full<Bytes>>) -> (StatusCode, String) {
        use http_body_util::BodyExt;
        let code = r.status();
        let bytes = futures_util::FutureExt::now_or_never(r.into_body().collect())
            .expect("a full body is ready")
            .expect("infallible")
            .to_bytes();
        (code, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[test]
    fn readyz_names_what_it_waits_for() {
        let o = Observe::new(Arc::default());
        assert_eq!(body(o.respond(&Method::GET, "/readyz")).0, StatusCode::OK);
        o.readiness.set("kubernetes API", false);
        o.readiness.set("policy controller caches", false);
        let (code, text) = body(o.respond(&Method::GET, "/readyz"));
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            text,
            "not ready: waiting for kubernetes API, policy controller caches\n"
        );
        o.readiness.set("kubernetes API", true);
        o.readiness.remove("policy controller caches");
        assert_eq!(body(o.respond(&Method::GET, "/readyz")).0, StatusCode::OK);
        assert_eq!(body(o.respond(&Method::GET, "/healthz")).0, StatusCode::OK);
        assert_eq!(body(o.respond(&Method::GET, "/x")).0, StatusCode::NOT_FOUND);
        assert_eq!(
            body(o.respond(&Method::POST, "/metrics")).0,
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn metrics_show_reconciles_leadership_and_connected_sidecars() {
        let sidecars = Arc::new(Sidecars::default());
        sidecars.connected(&crate::sidecars::PodKey {
            namespace: "ci".into(),
            name: "a".into(),
        });
        let o = Observe::new(sidecars);
        o.metrics.reconciles.with_label_values(&["ok"]).inc();
        o.metrics.is_leader.set(1);
        o.metrics.reconcile_duration.observe(0.02);
        let (code, text) = body(o.respond(&Method::GET, "/metrics"));
        assert_eq!(code, StatusCode::OK);
        for line in [
            "pgwarden_operator_reconciles_total{result=\"ok\"} 1",
            "pgwarden_operator_reconciles_total{result=\"error\"} 0",
            "pgwarden_operator_reconcile_duration_seconds_count 1",
            "pgwarden_operator_connected_sidecars 1",
            "pgwarden_operator_is_leader 1",
            "pgwarden_operator_snapshot_version_lag 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }
}
