//! Observability: Prometheus metrics and the admin HTTP endpoints
//! (/metrics, /healthz, /readyz). Labels are bounded enums — never a subject,
//! a statement or a value.

mod http;
mod metrics;

pub use http::serve_admin;
pub use metrics::Metrics;
