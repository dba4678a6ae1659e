//! ApprovalRequests in a cluster (DESIGN §2, §4 "Approvals in a cluster"):
//!
//! - `admission`: the decision webhooks (stamp who decided; refuse what
//!   may not happen), as pure functions;
//! - `lifecycle`: the controller (leader only) that writes Approved/Denied,
//!   Expired at `expiresAt`, deletes after the retention, and Events;
//! - `webhooks`: those checks as the admission server's `/approvals/*`;
//! - `notify`: the policy's webhook told of new and decided requests;
//! - this module: the phase model both share with the stream endpoints.
//!
//! The phase lives in `status.phase`, written only by the operator; the
//! decision lives in `spec.decision`, written by a reviewer. Between a
//! reviewer's patch and the controller's write, [`effective_phase`] is what
//! the request already is.

pub mod admission;
pub mod lifecycle;
pub mod notify;
pub mod webhooks;

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use pgwarden_api::{ApprovalPhase, ApprovalRequest, DecisionAction};

/// The condition a request gets when its phase becomes final; its
/// lastTransitionTime starts the retention.
pub const FINISHED_CONDITION: &str = "Finished";

/// The approval flags (flattened into the operator's).
#[derive(Debug, Clone, clap::Args)]
pub struct ApprovalArgs {
    /// How long a finished ApprovalRequest (Denied, Expired, Executed,
    /// Failed) is kept before the operator deletes it.
    #[arg(long, env = "PGWARDEN_APPROVAL_RETENTION", default_value = "168h", value_parser = parse_retention)]
    pub approval_retention: Duration,
    /// The username allowed to create ApprovalRequests and write their
    /// status (the admission webhook refuses everyone else). Default: this
    /// operator's service account, system:serviceaccount:<--namespace>:<its SA>.
    #[arg(long, env = "PGWARDEN_APPROVAL_CREATOR")]
    pub approval_creator: Option<String>,
}

impl ApprovalArgs {
    /// `--approval-creator`, else the operator's service account as the
    /// chart names it.
    pub fn creator(&self, namespace: &str) -> String {
        self.approval_creator
            .clone()
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| format!("system:serviceaccount:{namespace}:pgwarden-operator"))
    }
}

fn parse_retention(s: &str) -> Result<Duration, String> {
    let d = s
        .parse::<pgwarden_api::Duration>()
        .map_err(|e| e.to_string())?;
    Ok(d.as_std())
}

pub fn stored_phase(r: &ApprovalRequest) -> ApprovalPhase {
    r.status.as_ref().map(|s| s.phase).unwrap_or_default()
}

/// An unreadable expiry counts as past: fail closed.
pub fn expires_at(r: &ApprovalRequest) -> Timestamp {
    r.spec.expires_at.parse().unwrap_or(Timestamp::MIN)
}

/// What the request is at `now`, whether or not the controller has written
/// it down yet: a decision counts from the moment it was admitted, and an
/// undecided or unused request past `expiresAt` is Expired.
pub fn effective_phase(r: &ApprovalRequest, now: Timestamp) -> ApprovalPhase {
    let expired = now >= expires_at(r);
    match stored_phase(r) {
        ApprovalPhase::Pending => match r.spec.decision.as_ref().map(|d| d.action) {
            Some(DecisionAction::Deny) => ApprovalPhase::Denied,
            _ if expired => ApprovalPhase::Expired,
            Some(DecisionAction::Approve) => ApprovalPhase::Approved,
            None => ApprovalPhase::Pending,
        },
        ApprovalPhase::Approved if expired => ApprovalPhase::Expired,
        p => p,
    }
}

/// When the request reached its final phase.
pub fn finished_at(r: &ApprovalRequest) -> Option<Timestamp> {
    r.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == FINISHED_CONDITION && c.status == "True")
        .map(|c| c.last_transition_time.0)
}

/// Set the phase; a final one also gets the Finished condition (what
/// `kubectl describe` shows, and where the retention starts).
pub fn set_phase(r: &mut ApprovalRequest, phase: ApprovalPhase, now: Timestamp) {
    let status = r.status.get_or_insert_with(Default::default);
    status.phase = phase;
    if phase.is_final()
        && !status
            .conditions
            .iter()
            .any(|c| c.type_ == FINISHED_CONDITION)
    {
        status.conditions.push(Condition {
            type_: FINISHED_CONDITION.into(),
            status: "True".into(),
            reason: format!("{phase:?}"),
            message: format!("the request is {phase:?}"),
            last_transition_time: Time(now),
            observed_generation: r.metadata.generation,
        });
    }
}
