//! Observability: Prometheus metrics and the admin HTTP endpoints
//! (/metrics, /healthz, /readyz with the upstream check behind it). Labels
//! are bounded enums — never a subject, a statement or a value.

mod http;
mod metrics;
pub mod ready;

pub use http::serve_admin;
pub use metrics::{sample, Metrics, PendingFrom, Sources};
pub use ready::{watch_upstreams, Readiness};
