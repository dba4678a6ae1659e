//! pgwarden's sidecar: a PostgreSQL wire-protocol proxy that authenticates the
//! caller, judges every statement, masks results and records the session.
//!
//! The data path, one module per stage:
//! `wire` (framing, codec) → `session` (startup, login, relay) → `policy`
//! (statement gate) → `masking` (result filter). `identity` authenticates
//! clients, `upstream` logs in to the real server with the held credential.
#![forbid(unsafe_code)]

pub mod approval;
pub mod cli;
pub mod config;
pub mod glob;
pub mod identity;
pub mod masking;
pub mod observe;
pub mod policy;
pub mod recording;
pub mod session;
pub mod transport;
pub mod upstream;
pub mod wire;
