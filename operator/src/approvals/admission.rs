//! Admission of ApprovalRequests (DESIGN §2, §4 "Reviewers"), sans-IO: an
//! AdmissionReview request in, a [`Verdict`] out. The server looks up the
//! policy's approvers and the clock; nothing here reads the cluster.
//!
//! - [`mutate`] stamps `spec.decision.decidedBy`/`decidedAt` from the
//!   authenticated reviewer, overwriting whatever the patch carried;
//! - [`validate`] refuses what the mutation cannot fix: creation by anyone
//!   but the operator, status written by anyone but the operator, a change to
//!   what was requested, a second decision, self-approval, a reviewer the
//!   policy does not name, a decision after expiry.
//!
//! Refusals are sentences a reviewer reads in kubectl's output.

use jiff::Timestamp;
use k8s_openapi::api::authentication::v1::UserInfo;
use pgwarden_api::{ApprovalPhase, ApprovalRequest, ApprovalRequestSpec, Approvers, Decision};
use serde::Deserialize;
use serde_json::{json, Value};

#[cfg(test)]
mod tests;

/// The part of an AdmissionReview's `request` these checks read.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    pub uid: String,
    /// CREATE, UPDATE, DELETE, CONNECT.
    pub operation: String,
    #[serde(default)]
    pub sub_resource: Option<String>,
    pub user_info: UserInfo,
    #[serde(default)]
    pub object: Option<Value>,
    #[serde(default)]
    pub old_object: Option<Value>,
}

/// What admission answers.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub allowed: bool,
    /// Why not (shown by kubectl as the error).
    pub message: Option<String>,
    /// JSON Patch operations (mutation only).
    pub patch: Vec<Value>,
}

impl Verdict {
    fn allow() -> Verdict {
        Verdict {
            allowed: true,
            message: None,
            patch: Vec::new(),
        }
    }

    fn deny(message: String) -> Verdict {
        Verdict {
            allowed: false,
            message: Some(message),
            patch: Vec::new(),
        }
    }

    /// The `response` of an `admission.k8s.io/v1` AdmissionReview.
    pub fn to_response(&self, uid: &str) -> Value {
        use base64::Engine as _;
        let mut r = json!({ "uid": uid, "allowed": self.allowed });
        if let Some(m) = &self.message {
            // 403: kubectl prints "… denied the request: <message>".
            r["status"] = json!({ "code": 403, "reason": "Forbidden", "message": m });
        }
        if !self.patch.is_empty() {
            let bytes = serde_json::to_vec(&self.patch).unwrap_or_default();
            r["patchType"] = json!("JSONPatch");
            r["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
        r
    }
}

/// The full AdmissionReview answer to `request`.
pub fn to_review(request: &AdmissionRequest, verdict: &Verdict) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": verdict.to_response(&request.uid),
    })
}

fn username(r: &AdmissionRequest) -> &str {
    r.user_info.username.as_deref().unwrap_or("")
}

/// RFC 3339, seconds, `Z` (as Kubernetes writes times).
fn rfc3339(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Mutating: a decision being made is stamped with who made it and when.
/// Anything else passes unchanged (validation decides whether it may).
pub fn mutate(request: &AdmissionRequest, now: Timestamp) -> Verdict {
    if request.operation != "UPDATE" || request.sub_resource.is_some() {
        return Verdict::allow();
    }
    let decision = |o: Option<&Value>| {
        o.and_then(|o| o.pointer("/spec/decision"))
            .filter(|d| !d.is_null())
            .cloned()
    };
    let (Some(new), None) = (
        decision(request.object.as_ref()),
        decision(request.old_object.as_ref()),
    ) else {
        return Verdict::allow();
    };
    if !new.is_object() {
        // Not a decision at all: the schema refuses it.
        return Verdict::allow();
    }
    Verdict {
        // `add` replaces a member that is already there (RFC 6902 §4.1):
        // a forged decidedBy is overwritten.
        patch: vec![
            json!({"op": "add", "path": "/spec/decision/decidedBy", "value": username(request)}),
            json!({"op": "add", "path": "/spec/decision/decidedAt", "value": rfc3339(now)}),
        ],
        ..Verdict::allow()
    }
}

/// Who may decide a request: the current `approval.approvers` of its policy.
#[derive(Clone, Debug, PartialEq)]
pub enum PolicyApprovers {
    Found(Approvers),
    /// The policy is gone: nobody can be shown to be an approver.
    Missing,
}

/// What validation needs besides the request.
pub struct Checks<'a> {
    /// The operator's own username (only it creates requests and writes status).
    pub operator: &'a str,
    /// `(namespace, policy)` → its approvers now.
    pub approvers: &'a dyn Fn(&str, &str) -> PolicyApprovers,
    pub now: Timestamp,
}

/// Validating: see the module comment for what is refused.
pub fn validate(request: &AdmissionRequest, checks: &Checks<'_>) -> Verdict {
    let user = username(request);
    match (request.operation.as_str(), request.sub_resource.as_deref()) {
        ("CREATE", _) => validate_create(request, checks),
        ("UPDATE", Some("status")) if user == checks.operator => Verdict::allow(),
        ("UPDATE", Some("status")) => Verdict::deny(format!(
            "{user} may not write the status of an ApprovalRequest: only the pgwarden operator \
             ({}) does; decide with kubectl patch on spec.decision",
            checks.operator
        )),
        ("UPDATE", None) => validate_update(request, checks),
        _ => Verdict::allow(),
    }
}

fn parse(object: Option<&Value>) -> Result<ApprovalRequest, String> {
    let Some(o) = object else {
        return Err("the admission request carries no object".into());
    };
    // Fail closed: what cannot be read cannot be shown to be safe.
    serde_json::from_value(o.clone())
        .map_err(|e| format!("not a valid ApprovalRequest ({e}); refused"))
}

fn name_of(r: &ApprovalRequest) -> String {
    format!(
        "{}/{}",
        r.metadata.namespace.as_deref().unwrap_or(""),
        r.metadata.name.as_deref().unwrap_or("")
    )
}

fn validate_create(request: &AdmissionRequest, checks: &Checks<'_>) -> Verdict {
    let user = username(request);
    if user != checks.operator {
        return Verdict::deny(format!(
            "{user} may not create ApprovalRequests: the pgwarden operator ({}) creates them \
             when a sidecar holds a statement; run the statement through pgwarden instead",
            checks.operator
        ));
    }
    match parse(request.object.as_ref()) {
        Err(e) => Verdict::deny(e),
        Ok(r) if r.spec.decision.is_some() => {
            Verdict::deny("a new ApprovalRequest cannot carry a decision".into())
        }
        Ok(_) => Verdict::allow(),
    }
}

/// The first field of what was requested that differs, by its spec path.
fn changed_field(old: &ApprovalRequestSpec, new: &ApprovalRequestSpec) -> Option<&'static str> {
    if old.statement != new.statement {
        return Some("statement");
    }
    if old.parameters != new.parameters {
        return Some("parameters");
    }
    if old.requester != new.requester {
        return Some("requester");
    }
    if old.fingerprint != new.fingerprint {
        return Some("fingerprint");
    }
    if old.expires_at != new.expires_at {
        return Some("expiresAt");
    }
    if old.policy != new.policy {
        return Some("policy");
    }
    if old.database != new.database {
        return Some("database");
    }
    if old.reason != new.reason {
        return Some("reason");
    }
    if old.approvers != new.approvers {
        return Some("approvers");
    }
    if old.estimate != new.estimate {
        return Some("estimate");
    }
    None
}

fn describe(d: &Decision) -> String {
    let mut s = format!("{:?}", d.action);
    if let Some(by) = &d.decided_by {
        s.push_str(&format!(" by {by}"));
    }
    if let Some(at) = &d.decided_at {
        s.push_str(&format!(" at {at}"));
    }
    s
}

fn validate_update(request: &AdmissionRequest, checks: &Checks<'_>) -> Verdict {
    let (old, new) = match (
        parse(request.old_object.as_ref()),
        parse(request.object.as_ref()),
    ) {
        (Ok(o), Ok(n)) => (o, n),
        (Err(e), _) | (_, Err(e)) => return Verdict::deny(e),
    };
    let id = name_of(&old);
    if let Some(field) = changed_field(&old.spec, &new.spec) {
        return Verdict::deny(format!(
            "spec.{field} of ApprovalRequest {id} cannot be changed: a request covers exactly \
             what was held; only spec.decision may be set"
        ));
    }
    match (&old.spec.decision, &new.spec.decision) {
        (None, None) => Verdict::allow(),
        (Some(a), Some(b)) if a == b => Verdict::allow(),
        (Some(a), _) => Verdict::deny(format!(
            "ApprovalRequest {id} was already decided ({}); a decision cannot be changed or \
             withdrawn",
            describe(a)
        )),
        (None, Some(d)) => validate_decision(request, checks, &id, &old, d),
    }
}

fn validate_decision(
    request: &AdmissionRequest,
    checks: &Checks<'_>,
    id: &str,
    old: &ApprovalRequest,
    decision: &Decision,
) -> Verdict {
    let user = username(request);
    if user.is_empty() {
        return Verdict::deny("an anonymous user may not decide an ApprovalRequest".into());
    }
    let phase = old.status.as_ref().map(|s| s.phase).unwrap_or_default();
    let expired = old
        .spec
        .expires_at
        .parse::<Timestamp>()
        .map_or(true, |at| checks.now >= at);
    if phase == ApprovalPhase::Expired || (phase == ApprovalPhase::Pending && expired) {
        return Verdict::deny(format!(
            "ApprovalRequest {id} expired at {}; it can no longer be decided (the client runs the \
             statement again to open a new request)",
            old.spec.expires_at
        ));
    }
    if phase != ApprovalPhase::Pending {
        return Verdict::deny(format!(
            "ApprovalRequest {id} is already {phase:?}; it can no longer be decided"
        ));
    }
    let req = &old.spec.requester;
    let namespace = old.metadata.namespace.as_deref().unwrap_or("");
    let pod_sa = req.service_account.as_deref().map(|sa| {
        let ns = req
            .pod
            .as_deref()
            .and_then(|p| p.split_once('/'))
            .map_or(namespace, |(ns, _)| ns);
        format!("system:serviceaccount:{ns}:{sa}")
    });
    if user == req.subject || pod_sa.as_deref() == Some(user) {
        return Verdict::deny(format!(
            "{user} requested ApprovalRequest {id} (as its subject or its pod's service account) \
             and cannot decide it: a request is decided by someone else"
        ));
    }
    let policy = format!("{namespace}/{}", old.spec.policy);
    match (checks.approvers)(namespace, &old.spec.policy) {
        PolicyApprovers::Missing => {
            return Verdict::deny(format!(
                "policy {policy} no longer exists, so nobody can be shown to be its approver; \
                 ApprovalRequest {id} cannot be decided"
            ))
        }
        PolicyApprovers::Found(a) if !a.users.is_empty() || !a.groups.is_empty() => {
            let groups = request.user_info.groups.as_deref().unwrap_or_default();
            let allowed =
                a.users.iter().any(|u| u == user) || groups.iter().any(|g| a.groups.contains(g));
            if !allowed {
                let mut names: Vec<String> = a.users.iter().map(|u| format!("user {u}")).collect();
                names.extend(a.groups.iter().map(|g| format!("group {g}")));
                return Verdict::deny(format!(
                    "{user} may not decide ApprovalRequest {id}: policy {policy} allows only {} \
                     (spec.approval.approvers)",
                    names.join(", ")
                ));
            }
        }
        // No approvers named: RBAC alone decides who may patch.
        PolicyApprovers::Found(_) => {}
    }
    // The mutating webhook ran before this one; if it did not, nothing
    // vouches for the name in decidedBy.
    if decision.decided_by.as_deref() != Some(user) || decision.decided_at.is_none() {
        return Verdict::deny(
            "spec.decision.decidedBy/decidedAt were not stamped by the pgwarden admission webhook \
             (is its mutating webhook installed?); refused"
                .into(),
        );
    }
    Verdict::allow()
}
