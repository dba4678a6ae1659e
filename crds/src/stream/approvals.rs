//! Approvals on the config stream (DESIGN §4 "Approvals in a cluster"): a
//! sidecar holding a statement asks its operator to open (or find) the
//! ApprovalRequest, claims an approval, and reports what the statement did
//! — each a POST with the same bearer token as the stream. Decisions come
//! down the stream as [`super::StreamEvent::ApprovalDecided`].
//!
//! The operator takes the pod and service account from the verified token,
//! never from these bodies; a request is only ever claimed by the pod that
//! opened it.

use serde::{Deserialize, Serialize};

use crate::ApprovalRequest;

/// Open or find the request for a held statement: POST an [`OpenApproval`],
/// answered with an [`Opened`].
pub const OPEN_PATH: &str = "/v1/approvals";
/// Use an approval once: POST a [`Claim`], answered with a [`Claimed`].
pub const CLAIM_PATH: &str = "/v1/approvals/claim";
/// What the released statement did: POST a [`Finish`].
pub const FINISH_PATH: &str = "/v1/approvals/finish";
/// Largest body either end reads (a statement, its rendered parameters and
/// the request object).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// A held statement, as the sidecar saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenApproval {
    /// The policy (in the pod's namespace) whose rule held it.
    pub policy: String,
    /// The client's authenticated subject.
    pub subject: String,
    pub statement: String,
    /// Rendered for a reviewer, sensitive values already masked.
    pub parameters: Vec<Option<String>>,
    /// Keyed with the policy's fingerprint key (from the snapshot) over the
    /// statement and the raw parameters: the sidecar releases only a
    /// request whose fingerprint is the one it computed.
    pub fingerprint: String,
    pub reason: String,
    /// The planner's estimate for DML (absent from older sidecars).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<crate::Estimate>,
}

/// Where a held statement stands after opening.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpenOutcome {
    /// An approval for exactly this was waiting; it is now claimed: run it.
    Released,
    Pending,
    Denied,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Opened {
    pub outcome: OpenOutcome,
    pub request: Box<ApprovalRequest>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The request's name (in the pod's namespace).
    pub id: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClaimOutcome {
    /// Approved and now claimed by this call: run it once.
    Released,
    Pending,
    Denied,
    Expired,
    /// Approved, but already used (an approval releases one execution).
    UsedElsewhere,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Claimed {
    pub outcome: ClaimOutcome,
    pub request: Box<ApprovalRequest>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finish {
    pub id: String,
    pub outcome: FinishOutcome,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FinishOutcome {
    /// The command tag (`ALTER TABLE`).
    Executed(String),
    /// The server's error, or why it never ran.
    Failed(String),
}

/// The command a reviewer runs to approve request `id` (the NOTICE a held
/// client reads, the Event on the request).
pub fn approve_command(namespace: &str, id: &str) -> String {
    format!(
        "kubectl patch apr -n {namespace} {id} --type merge -p '{{\"spec\":{{\"decision\":{{\"action\":\"Approve\",\"reason\":\"…\"}}}}}}'"
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_approve_command_is_a_plain_kubectl_patch_of_spec_decision() {
        assert_eq!(
            super::approve_command("ci", "nightly-5f2c9a"),
            r#"kubectl patch apr -n ci nightly-5f2c9a --type merge -p '{"spec":{"decision":{"action":"Approve","reason":"…"}}}'"#
        );
    }
}
