//! The ApprovalRequest controller (leader only): a decision becomes the
//! Approved/Denied phase, an undecided or unused request becomes Expired at
//! `expiresAt`, a finished request is deleted after the retention, and
//! every phase change it writes is an Event.
//!
//! [`plan`] is pure; the reconciler requeues each request for the moment its
//! plan says something will change (a timer per request, no sweeps).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use jiff::Timestamp;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Resource as _, ResourceExt as _};
use pgwarden_api::{ApprovalPhase, ApprovalRequest, DecisionAction};

use super::{effective_phase, expires_at, finished_at, set_phase};

#[cfg(test)]
mod tests;

/// What the controller does with one request now.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Write this phase (and tell it as an Event).
    pub phase: Option<Transition>,
    /// Retention is over: delete the request.
    pub delete: bool,
    /// Look again then (expiry or end of retention), unless a change comes first.
    pub wake_at: Option<Timestamp>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub phase: ApprovalPhase,
    /// The Event's reason and note.
    pub reason: &'static str,
    pub note: String,
}

/// The step for `r` at `now`.
pub fn plan(r: &ApprovalRequest, now: Timestamp, retention: Duration) -> Plan {
    let stored = super::stored_phase(r);
    let target = effective_phase(r, now);
    let expires = expires_at(r);
    if target != stored {
        let note = match target {
            ApprovalPhase::Approved | ApprovalPhase::Denied => {
                let d = r.spec.decision.as_ref();
                format!(
                    "{} by {}: {}",
                    if target == ApprovalPhase::Approved {
                        "approved"
                    } else {
                        "denied"
                    },
                    d.and_then(|d| d.decided_by.as_deref())
                        .unwrap_or("a reviewer"),
                    d.and_then(|d| d.reason.as_deref())
                        .unwrap_or("no reason given")
                )
            }
            ApprovalPhase::Expired if stored == ApprovalPhase::Approved => format!(
                "the approval was not used before {}; the statement did not run",
                r.spec.expires_at
            ),
            _ => format!("not decided before {}", r.spec.expires_at),
        };
        let reason = match target {
            ApprovalPhase::Approved => "Approved",
            ApprovalPhase::Denied => "Denied",
            ApprovalPhase::Expired => "Expired",
            ApprovalPhase::Executed => "Executed",
            ApprovalPhase::Failed => "Failed",
            ApprovalPhase::Pending => "Pending",
        };
        return Plan {
            phase: Some(Transition {
                phase: target,
                reason,
                note,
            }),
            delete: false,
            // The write comes back as a watch event; that reconcile plans on.
            wake_at: None,
        };
    }
    if target.is_final() {
        let done = finished_at(r).unwrap_or(expires);
        let gone = done
            .checked_add(
                jiff::SignedDuration::try_from(retention).unwrap_or(jiff::SignedDuration::MAX),
            )
            .unwrap_or(Timestamp::MAX);
        if now >= gone {
            return Plan {
                phase: None,
                delete: true,
                wake_at: None,
            };
        }
        return Plan {
            phase: None,
            delete: false,
            wake_at: Some(gone),
        };
    }
    // Pending or Approved: the next change on its own is expiry.
    Plan {
        phase: None,
        delete: false,
        wake_at: Some(expires),
    }
}

// === the IO shell ===

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub retention: Duration,
}

impl Context {
    pub fn new(client: Client, identity: &str, retention: Duration) -> Context {
        let reporter = Reporter {
            controller: "pgwarden-operator".into(),
            instance: Some(identity.to_owned()),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            retention,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct ReconcileError {
    what: String,
    #[source]
    source: Box<kube::Error>,
}

/// Publish an Event about `r` (advice: a failure is logged, never fatal).
pub async fn announce(
    recorder: &Recorder,
    r: &ApprovalRequest,
    warning: bool,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note),
        action: "Approval".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &r.object_ref(&())).await {
        tracing::warn!(approval.namespace = ?r.namespace(), approval.name = %r.name_any(),
            error = %e, "publishing an Event failed");
    }
}

async fn reconcile(r: Arc<ApprovalRequest>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let ns = r.namespace().unwrap_or_default();
    let name = r.name_any();
    let api: Api<ApprovalRequest> = Api::namespaced(ctx.client.clone(), &ns);
    let now = Timestamp::now();
    let step = plan(&r, now, ctx.retention);
    if let Some(t) = step.phase {
        let mut next = (*r).clone();
        set_phase(&mut next, t.phase, now);
        // resourceVersion-guarded: a claim that won meanwhile is not undone.
        match api
            .replace_status(&name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => {
                tracing::info!(approval.namespace = %ns, approval.name = %name, phase = ?t.phase, "approval request phase");
                super::notify::decided_write(&r, t.phase);
                let warning = matches!(t.phase, ApprovalPhase::Denied | ApprovalPhase::Expired);
                announce(&ctx.recorder, &r, warning, t.reason, t.note).await;
            }
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
            Err(source) => {
                return Err(ReconcileError {
                    what: format!("writing the phase of {ns}/{name}"),
                    source: Box::new(source),
                })
            }
        }
        return Ok(Action::await_change());
    }
    if step.delete {
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(approval.namespace = %ns, approval.name = %name, "approval request deleted after its retention")
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => {
                return Err(ReconcileError {
                    what: format!("deleting {ns}/{name}"),
                    source: Box::new(source),
                })
            }
        }
        return Ok(Action::await_change());
    }
    Ok(match step.wake_at {
        // A second late rather than early: the phase is then surely due.
        Some(at) => Action::requeue(
            Duration::try_from(at.duration_since(now))
                .unwrap_or(Duration::ZERO)
                .saturating_add(Duration::from_millis(200)),
        ),
        None => Action::await_change(),
    })
}

fn error_policy(r: Arc<ApprovalRequest>, error: &ReconcileError, _ctx: Arc<Context>) -> Action {
    tracing::warn!(approval.namespace = ?r.namespace(), approval.name = %r.name_any(),
        error = %error, "approval reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Runs over `namespaces` (all when empty) until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespaces: Vec<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + Clone + 'static,
) {
    let apis: Vec<Api<ApprovalRequest>> = if namespaces.is_empty() {
        vec![Api::all(ctx.client.clone())]
    } else {
        namespaces
            .iter()
            .map(|ns| Api::namespaced(ctx.client.clone(), ns))
            .collect()
    };
    let runs = apis.into_iter().map(|api| {
        Controller::new(api, watcher::Config::default())
            .graceful_shutdown_on(shutdown.clone())
            .run(reconcile, error_policy, ctx.clone())
            .for_each(|r| async move {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "approval controller");
                }
            })
    });
    futures_util::future::join_all(runs).await;
}

/// The decision's action as the phase it leads to.
pub fn decided_phase(action: DecisionAction) -> ApprovalPhase {
    match action {
        DecisionAction::Approve => ApprovalPhase::Approved,
        DecisionAction::Deny => ApprovalPhase::Denied,
    }
}

/// Runs the controller while this replica leads (the policy controller's
/// Lease), until `shutdown`.
pub async fn supervise(
    ctx: Arc<Context>,
    namespaces: Vec<String>,
    mut leading: tokio::sync::watch::Receiver<bool>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use futures_util::FutureExt as _;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return,
            r = leading.wait_for(|l| *l) => if r.is_err() { return },
        }
        tracing::info!("starting the approval controller");
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let stop = async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        }
        .boxed()
        .shared();
        let mut task = tokio::spawn(run(ctx.clone(), namespaces.clone(), stop));
        let (done, ended) = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => (true, false),
            r = leading.wait_for(|l| !*l) => (r.is_err(), false),
            _ = &mut task => (false, true),
        };
        if ended {
            tracing::error!("the approval controller ended by itself; restarting");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        stop_tx.send_replace(true);
        if tokio::time::timeout(Duration::from_secs(3), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
        tracing::info!("approval controller stopped");
        if done {
            return;
        }
    }
}
