//! `ApprovalRequest` (pgwarden.io/v1alpha1): one held statement waiting for a
//! named human. Created by the operator on a sidecar's behalf; reviewers decide
//! by patching `spec.decision` with kubectl.
//!
//! The operator's admission webhook is the real guard (it stamps the reviewer's
//! identity, refuses self-approval and re-decisions). The CEL rules below repeat the
//! invariants that need no identity, so a cluster without the webhook still cannot
//! rewrite what was requested or change a decision. `parameters` has no CEL rule:
//! comparing an unbounded list exceeds the apiserver's CEL cost budget, and the
//! `fingerprint` (which covers the parameters) is immutable.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A statement held by a pgwarden sidecar until a reviewer approves or denies it.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "pgwarden.io",
    version = "v1alpha1",
    kind = "ApprovalRequest",
    namespaced,
    shortname = "apr",
    category = "pgwarden",
    status = "ApprovalRequestStatus",
    derive = "PartialEq",
    doc = "A SQL statement held by pgwarden until a reviewer approves or denies it. Decide with: kubectl patch apr NAME --type merge -p '{\"spec\":{\"decision\":{\"action\":\"Approve\",\"reason\":\"...\"}}}'",
    // JSON form: clippy's duplicated_attributes misfires on repeated printcolumn(..).
    printcolumn = r#"{"name":"Policy", "type":"string", "jsonPath":".spec.policy"}"#,
    printcolumn = r#"{"name":"Phase", "type":"string", "jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Requester", "type":"string", "jsonPath":".spec.requester.subject"}"#,
    printcolumn = r#"{"name":"Decider", "type":"string", "jsonPath":".spec.decision.decidedBy"}"#,
    printcolumn = r#"{"name":"Result", "type":"string", "jsonPath":".status.result", "priority":1}"#,
    printcolumn = r#"{"name":"Statement", "type":"string", "jsonPath":".spec.statement", "priority":1}"#,
    printcolumn = r#"{"name":"Est. rows", "type":"integer", "jsonPath":".spec.estimate.rows", "priority":1}"#,
    // A string, not a date: kubectl renders future dates as "<invalid>".
    printcolumn = r#"{"name":"Expires", "type":"string", "jsonPath":".spec.expiresAt"}"#,
    printcolumn = r#"{"name":"Age", "type":"date", "jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(oldSelf.decision) || (has(self.decision) && self.decision == oldSelf.decision)",
    "message": "decision cannot be changed or removed once made"
}]))]
pub struct ApprovalRequestSpec {
    /// The DatabaseAccessPolicy whose rule asked for approval.
    #[schemars(extend("x-kubernetes-validations" = immutable()))]
    pub policy: String,

    #[schemars(extend("x-kubernetes-validations" = immutable()))]
    pub requester: Requester,

    /// Database name (`spec.database.name` of the policy).
    #[schemars(extend("x-kubernetes-validations" = immutable()))]
    pub database: String,

    /// The SQL text exactly as the client sent it.
    #[schemars(extend("x-kubernetes-validations" = immutable()))]
    pub statement: String,

    /// Bind parameters in order, as text; `null` is SQL NULL. Masked where sensitive.
    #[serde(default)]
    pub parameters: Vec<Option<String>>,

    /// `sha256:` over statement, parameters and subject; an approval releases only this.
    #[schemars(extend("x-kubernetes-validations" = immutable()))]
    pub fingerprint: String,

    /// Why approval is needed, e.g. `rule schema-changes: DDL`.
    #[schemars(extend("x-kubernetes-validations" = immutable()))]
    pub reason: String,

    /// RFC 3339 time after which the request can no longer be approved.
    #[schemars(extend("x-kubernetes-validations" = immutable()))]
    pub expires_at: String,

    /// Who may decide, as the policy said when the request was opened
    /// (standalone: `pgwarden approvals` checks the deciding OS user against it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = immutable()))]
    pub approvers: Option<crate::policy::Approvers>,

    /// What the statement would touch, by the planner's estimate (DML only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = immutable()))]
    pub estimate: Option<Estimate>,

    /// Set by a reviewer; `decidedBy`/`decidedAt` are stamped by the admission webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
}

/// The planner's view of a held DML statement, from a plain `EXPLAIN` the
/// gateway ran on its own connection (never `EXPLAIN ANALYZE`: nothing ran).
/// Either `rows` (with `tables`) or `unknown` is set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Estimate {
    /// Rows the statement would insert, update, delete or merge, as estimated
    /// by the planner (statistics, not a count); capped at 2^63-1, as the
    /// API server's integers are int64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "int64"))]
    pub rows: Option<u64>,

    /// Tables in the plan as `schema.name`, the written ones first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<String>,

    /// Why there is no estimate (the statement calls user code, its
    /// parameters cannot be planned safely, an error, a timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown: Option<String>,
}

impl Estimate {
    /// No estimate, and why.
    pub fn unknown(why: impl Into<String>) -> Self {
        Estimate {
            unknown: Some(why.into()),
            ..Estimate::default()
        }
    }
}

fn immutable() -> serde_json::Value {
    serde_json::json!([{"rule": "self == oldSelf", "message": "is immutable"}])
}

/// Who asked: the authenticated subject, and in a cluster the pod it came from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Requester {
    /// Identity subject (`sub` of the token, or the localTrust subject).
    pub subject: String,

    /// `namespace/name` of the requesting pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,

    /// The requesting pod's service account; it may never approve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,

    /// Standalone: the client's OS user as the kernel reported it (Unix-socket
    /// peer credentials); it may never decide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_user: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Decision {
    pub action: DecisionAction,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,

    /// Reviewer identity, stamped by the admission webhook (never trusted from the patch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,

    /// RFC 3339, stamped by the admission webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum DecisionAction {
    Approve,
    Deny,
}

/// Set by the operator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRequestStatus {
    #[serde(default)]
    pub phase: ApprovalPhase,

    /// Command tag of the released statement (e.g. `ALTER TABLE`), or its error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,

    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Pending: waiting for a decision. Approved: not yet run. Denied. Expired: no decision
/// before expiresAt. Executed: approved and run (once). Failed: approved, but running
/// it failed; see result.
// No variant doc comments; see `StatementClass`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ApprovalPhase {
    #[default]
    Pending,
    Approved,
    Denied,
    Expired,
    Executed,
    Failed,
}

impl ApprovalPhase {
    /// No further transition happens from this phase.
    pub const fn is_final(self) -> bool {
        matches!(
            self,
            Self::Denied | Self::Expired | Self::Executed | Self::Failed
        )
    }
}
