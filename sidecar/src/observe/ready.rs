//! Readiness (`/readyz`): the gateway listens, and every policy's upstream
//! has accepted the gateway's own login — at least once since start, and at
//! the last check. A wrong credential in a Secret or an unreachable server
//! makes the gateway not ready, and the body says which policy and why
//! (the class of error, never a credential).
//!
//! One background task logs in to each policy's upstream: right away, then
//! every [`RECHECK`] while it works, and with backoff (1 s doubling up to
//! [`MAX_BACKOFF`]) while it fails. Policies added, changed (another
//! database, host or credential) or removed by a reload are followed; a
//! changed upstream must succeed again.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pgwarden_api::DatabaseTarget;

use super::Metrics;
use crate::config::GatewayConfig;
use crate::upstream::{self, Credential, UpstreamError, UpstreamTarget};
use crate::wire::Limits;

/// Between two checks of an upstream that works.
pub const RECHECK: Duration = Duration::from_secs(10);
/// Longest wait before retrying an upstream that failed.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How often the task looks for due checks and changed policies.
const TICK: Duration = Duration::from_millis(200);

/// What `/readyz` answers from.
#[derive(Debug, Default)]
pub struct Readiness {
    listening: AtomicBool,
    /// No configuration in force yet (operator mode before the first
    /// snapshot): an injected pod's startup probe must not pass then.
    unconfigured: AtomicBool,
    /// By policy id (`namespace/name`).
    upstreams: Mutex<BTreeMap<String, UpstreamState>>,
}

/// The upstream a check logged in to: a change resets the state.
#[derive(Debug, Clone, PartialEq)]
struct TargetKey {
    database: DatabaseTarget,
    credential: Credential,
}

#[derive(Debug)]
struct UpstreamState {
    key: TargetKey,
    /// `host:port database` for the body.
    shown: String,
    ever_ok: bool,
    /// The last finished check; None before the first.
    last: Option<Result<(), Failure>>,
    /// Failed checks in a row.
    failures: u32,
    next: Instant,
    checking: bool,
}

/// Why a login failed, as the body and the log say it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// A fixed word: unreachable, credential refused, login refused, tls,
    /// authentication, protocol, io.
    pub class: &'static str,
    pub detail: String,
}

impl Failure {
    /// Never the credential: the server's words only where they cannot
    /// carry it, and the gateway's own error texts (which name no secret).
    pub fn from_error(e: &UpstreamError) -> Failure {
        let (class, detail) = match e {
            UpstreamError::Connect { source, .. } => ("unreachable", source.to_string()),
            UpstreamError::Timeout(_) => ("unreachable", "timed out".to_owned()),
            UpstreamError::Refused { code, .. } if code.starts_with("28") => (
                "credential refused",
                format!(
                    "the server refused the gateway's credential (SQLSTATE {code}); check the policy's credentialsSecret"
                ),
            ),
            UpstreamError::Refused { code, message } => {
                ("login refused", format!("SQLSTATE {code}: {message}"))
            }
            UpstreamError::TlsRefused
            | UpstreamError::Tls(_)
            | UpstreamError::ServerName(_) => ("tls", e.to_string()),
            UpstreamError::Auth(_) => ("authentication", e.to_string()),
            UpstreamError::Protocol(_) | UpstreamError::Query { .. } => ("protocol", e.to_string()),
            UpstreamError::Io(_) => ("io", e.to_string()),
        };
        Failure { class, detail }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.class, self.detail)
    }
}

impl Readiness {
    pub fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::Release);
    }

    fn upstreams(&self) -> MutexGuard<'_, BTreeMap<String, UpstreamState>> {
        self.upstreams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the gateway is ready, and the body that says so (or why not).
    pub fn report(&self, now: Instant) -> (bool, String) {
        if !self.listening.load(Ordering::Acquire) {
            return (
                false,
                "not ready: not listening (starting or shutting down)\n".into(),
            );
        }
        if self.unconfigured.load(Ordering::Acquire) {
            return (
                false,
                "not ready: no configuration yet (waiting for the operator's first snapshot)\n"
                    .into(),
            );
        }
        let upstreams = self.upstreams();
        let ready = upstreams
            .values()
            .all(|s| s.ever_ok && matches!(s.last, Some(Ok(()))));
        let mut body = String::from(if ready {
            "ready\n"
        } else {
            "not ready: upstream\n"
        });
        for (id, s) in upstreams.iter() {
            let _ = write!(body, "policy {id}: upstream {}: ", s.shown);
            let _ = match &s.last {
                None => writeln!(body, "checking (the first login has not finished)"),
                Some(Ok(())) => writeln!(body, "login ok"),
                Some(Err(f)) => {
                    let next = s.next.saturating_duration_since(now).as_secs_f32().ceil();
                    writeln!(
                        body,
                        "{f} ({} failed login(s) in a row{}; next try in {next:.0}s)",
                        s.failures,
                        if s.ever_ok {
                            ""
                        } else {
                            ", none succeeded since start"
                        }
                    )
                }
            };
        }
        (ready, body)
    }

    /// Follow the policies in force: new ones are checked at once, changed
    /// ones start over, removed ones are forgotten. Returns the checks due
    /// now (marked as running).
    fn due(
        &self,
        policies: &[(String, Arc<UpstreamTarget>, TargetKey)],
        now: Instant,
    ) -> Vec<(String, Arc<UpstreamTarget>, TargetKey)> {
        let mut upstreams = self.upstreams();
        upstreams.retain(|id, _| policies.iter().any(|(p, _, _)| p == id));
        let mut due = Vec::new();
        for (id, target, key) in policies {
            let fresh = || UpstreamState {
                key: key.clone(),
                shown: format!(
                    "{}:{} database {}",
                    target.host, target.port, target.database
                ),
                ever_ok: false,
                last: None,
                failures: 0,
                next: now,
                checking: false,
            };
            let s = upstreams.entry(id.clone()).or_insert_with(fresh);
            if s.key != *key {
                *s = fresh();
            }
            if !s.checking && s.next <= now {
                s.checking = true;
                due.push((id.clone(), target.clone(), key.clone()));
            }
        }
        due
    }

    /// Record a finished check (ignored when the policy changed meanwhile).
    /// Returns what to log: the new outcome when it differs from the last.
    fn finished(
        &self,
        id: &str,
        key: &TargetKey,
        outcome: Result<(), Failure>,
        now: Instant,
    ) -> Option<Result<(), Failure>> {
        let mut upstreams = self.upstreams();
        let s = upstreams.get_mut(id).filter(|s| s.key == *key)?;
        s.checking = false;
        let changed = s.last.as_ref() != Some(&outcome);
        match &outcome {
            Ok(()) => {
                s.ever_ok = true;
                s.failures = 0;
                s.next = now + RECHECK;
            }
            Err(_) => {
                s.failures = s.failures.saturating_add(1);
                s.next = now + backoff(s.failures);
            }
        }
        s.last = Some(outcome.clone());
        changed.then_some(outcome)
    }
}

/// 1 s, 2 s, 4 s, ... up to [`MAX_BACKOFF`].
fn backoff(failures: u32) -> Duration {
    let secs = 1u64 << failures.saturating_sub(1).min(16);
    Duration::from_secs(secs).min(MAX_BACKOFF)
}

/// Log in to every policy's upstream, for as long as the gateway runs.
/// `current` is the configuration in force (it changes on reload).
pub async fn watch_upstreams(
    current: impl Fn() -> Option<Arc<GatewayConfig>>,
    metrics: Arc<Metrics>,
    limits: Limits,
    readiness: Arc<Readiness>,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let cfg = current();
        readiness
            .unconfigured
            .store(cfg.is_none(), Ordering::Release);
        let policies: Vec<_> = cfg
            .map(|cfg| {
                cfg.policies
                    .iter()
                    .map(|p| {
                        let key = TargetKey {
                            database: p.spec.database.clone(),
                            credential: p.upstream.credential.clone(),
                        };
                        (p.id.clone(), p.upstream.clone(), key)
                    })
                    .collect()
            })
            .unwrap_or_default();
        for (id, target, key) in readiness.due(&policies, Instant::now()) {
            let (readiness, metrics) = (readiness.clone(), metrics.clone());
            tokio::spawn(async move {
                let outcome = match upstream::connect(&target, &[], limits).await {
                    Ok(mut up) => {
                        upstream::terminate(&mut up).await;
                        Ok(())
                    }
                    Err(e) => Err(e),
                };
                count(&metrics, outcome.as_ref().err());
                let outcome = outcome.map_err(|e| Failure::from_error(&e));
                match readiness.finished(&id, &key, outcome, Instant::now()) {
                    Some(Ok(())) => tracing::info!(policy.name = %id, "upstream login ok: ready"),
                    Some(Err(f)) => tracing::warn!(
                        policy.name = %id,
                        error.class = f.class,
                        "upstream login failed: not ready ({f}); retrying with backoff"
                    ),
                    None => {}
                }
            });
        }
    }
}

fn count(metrics: &Metrics, error: Option<&UpstreamError>) {
    metrics
        .upstream_checks
        .with_label_values(&[error.map_or("ok", UpstreamError::kind)])
        .inc();
}

#[cfg(test)]
mod tests;
