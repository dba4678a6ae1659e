//! pgwarden's operator (DESIGN §4): reconciles DatabaseAccessPolicies into
//! status, and streams each injected sidecar the configuration snapshot of
//! the policies that select its pod.
//!
//! Layout, as data flows:
//! - `index`: what the cluster holds (policies, Secrets, injected pods), kept
//!   by reflectors; computes the snapshot a given pod is owed.
//! - `keys`: the masking and fingerprint keys, kept in a Secret the operator owns.
//! - `stream`: the HTTPS config stream sidecars connect to (auth by TokenReview,
//!   snapshots down, ACK/NACK up).
//! - `controller`: policy status (validate, conditions, selected/applied sidecars,
//!   Events); runs on the leader only (`leader`).
//! - `sidecars`: which sidecars are connected and what each acknowledged.
//! - `observe`: /metrics, /healthz, /readyz.

pub mod args;
pub mod controller;
pub mod index;
pub mod keys;
pub mod leader;
pub mod observe;
pub mod sidecars;
pub mod stream;

pub fn main() -> std::process::ExitCode {
    std::process::ExitCode::SUCCESS
}
