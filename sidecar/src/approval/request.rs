//! One approval request, sans-IO: built from a held statement, its
//! fingerprint, and every phase transition (who may move it where, and when).
//!
//! The model is exactly the `ApprovalRequest` resource, so the standalone
//! store and the cluster store hold the same object.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use pgwarden_api::{
    ApprovalPhase, ApprovalRequest, ApprovalRequestSpec, ApprovalRequestStatus, Approvers,
    Decision, DecisionAction, Detector, Requester,
};
use serde::Serialize;

use crate::masking::detect;
use crate::masking::strategy::Strategy;
use crate::wire::values;

/// A bind parameter as the client sent it.
#[derive(Clone, Copy, Debug)]
pub struct Param<'a> {
    /// 0 text, 1 binary.
    pub format: i16,
    /// As the client declared it in Parse; 0 when it left it to the server.
    pub type_oid: u32,
    pub value: Option<&'a [u8]>,
}

/// What the data path knows about a statement that needs approval.
#[derive(Clone, Debug)]
pub struct Draft {
    pub database: String,
    pub requester: Requester,
    pub statement: String,
    /// Rendered for a human, sensitive values masked (`render_params`).
    pub parameters: Vec<Option<String>>,
    pub fingerprint: String,
    pub reason: String,
    /// Who may decide (the policy's `approval.approvers`), if it names any.
    pub approvers: Option<Approvers>,
    /// The planner's estimate, for DML.
    pub estimate: Option<pgwarden_api::Estimate>,
}

/// Shown instead of a sensitive parameter.
pub const MASKED: &str = "****";
/// Longer parameter texts are cut (the fingerprint still covers all of it).
const MAX_PARAM_CHARS: usize = 1000;
/// Binary parameters are shown as hex up to this many bytes.
const MAX_PARAM_HEX: usize = 64;

/// The single-use binding: a keyed hash over policy, database, subject,
/// statement and parameters (formats included). Keyed, so a stored
/// fingerprint cannot be used to guess a masked parameter offline.
pub fn fingerprint(
    key: &[u8],
    policy: &str,
    database: &str,
    subject: &str,
    statement: &str,
    params: &[Param<'_>],
) -> String {
    use aws_lc_rs::hmac;
    let mut ctx = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, key));
    // Length-prefixed fields: no two different inputs hash the same bytes.
    let mut field = |b: &[u8]| {
        ctx.update(&(b.len() as u64).to_be_bytes());
        ctx.update(b);
    };
    field(policy.as_bytes());
    field(database.as_bytes());
    field(subject.as_bytes());
    field(statement.as_bytes());
    field(&(params.len() as u64).to_be_bytes());
    for p in params {
        field(&p.format.to_be_bytes());
        field(&p.type_oid.to_be_bytes());
        match p.value {
            None => field(b"\xffNULL"),
            Some(v) => field(&[&[0u8][..], v].concat()),
        }
    }
    let tag = ctx.sign();
    let mut out = String::from("hmac-sha256:");
    for b in tag.as_ref() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Parameters as a reviewer reads them. Every value is masked when the
/// statement touches a masked column (which parameter lands where is not
/// provable), and any value a content detector flags (card number, SSN,
/// email) is masked regardless.
pub fn render_params(params: &[Param<'_>], sensitive_statement: bool) -> Vec<Option<String>> {
    let detectors = [(
        vec![Detector::CreditCard, Detector::UsSsn, Detector::Email],
        Strategy::Redact,
    )];
    params
        .iter()
        .map(|p| {
            let v = p.value?;
            if sensitive_statement {
                return Some(MASKED.into());
            }
            if p.format != 0 {
                if let Some(decoded) = decode_binary(p.type_oid, v) {
                    return Some(decoded);
                }
                // Text-like types travel as their UTF-8 bytes in binary too:
                // shown (and scanned) as text.
                let printable = std::str::from_utf8(v).ok().filter(|t| {
                    !t.is_empty() && !t.chars().any(|c| c.is_control() && c != '\n' && c != '\t')
                });
                if let Some(t) = printable {
                    if detect::scan(t, &detectors, None).is_some() {
                        return Some(MASKED.into());
                    }
                    return Some(cut_text(t, v.len()));
                }
                let shown: String = v
                    .iter()
                    .take(MAX_PARAM_HEX)
                    .map(|b| format!("{b:02x}"))
                    .collect();
                let cut = if v.len() > MAX_PARAM_HEX {
                    format!("… ({} bytes)", v.len())
                } else {
                    String::new()
                };
                return Some(format!("\\x{shown}{cut}"));
            }
            let text = String::from_utf8_lossy(v);
            if detect::scan(&text, &detectors, None).is_some() {
                return Some(MASKED.into());
            }
            Some(cut_text(&text, v.len()))
        })
        .collect()
}

fn cut_text(text: &str, bytes: usize) -> String {
    if text.chars().count() > MAX_PARAM_CHARS {
        let head: String = text.chars().take(MAX_PARAM_CHARS).collect();
        format!("{head}… ({bytes} bytes)")
    } else {
        text.to_owned()
    }
}

/// Binary parameters of the common scalar types, as their text form.
/// (Text-like binary values go through the detectors like text.)
fn decode_binary(type_oid: u32, v: &[u8]) -> Option<String> {
    if type_oid == 17 {
        // bytea: hex, as PostgreSQL prints it.
        return Some(values::hex(v, MAX_PARAM_HEX));
    }
    if values::is_text_type(type_oid) {
        return None;
    }
    values::scalar_text(type_oid, v)
}

/// A new Pending request.
pub fn new_request(
    draft: Draft,
    policy_name: &str,
    namespace: &str,
    id: &str,
    now: Timestamp,
    expires_after: std::time::Duration,
) -> ApprovalRequest {
    let expires = now
        .checked_add(SignedDuration::try_from(expires_after).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX);
    let mut r = ApprovalRequest::new(
        id,
        ApprovalRequestSpec {
            policy: policy_name.to_owned(),
            requester: draft.requester,
            database: draft.database,
            statement: draft.statement,
            parameters: draft.parameters,
            fingerprint: draft.fingerprint,
            reason: draft.reason,
            expires_at: rfc3339(expires),
            approvers: draft.approvers,
            estimate: draft.estimate,
            decision: None,
        },
    );
    r.metadata = ObjectMeta {
        name: Some(id.to_owned()),
        namespace: Some(namespace.to_owned()),
        creation_timestamp: Some(Time(now)),
        // creationTimestamp has whole seconds; this orders requests made
        // within one second.
        annotations: Some(
            [(
                CREATED_ANNOTATION.to_owned(),
                now.strftime("%Y-%m-%dT%H:%M:%S%.9fZ").to_string(),
            )]
            .into(),
        ),
        ..ObjectMeta::default()
    };
    r.status = Some(ApprovalRequestStatus::default());
    r
}

/// When a request was created, to the nanosecond.
pub const CREATED_ANNOTATION: &str = "pgwarden.io/created";

/// Seconds precision, `Z`: what Kubernetes writes.
pub fn rfc3339(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

pub fn id(r: &ApprovalRequest) -> &str {
    r.metadata.name.as_deref().unwrap_or("")
}

pub fn stored_phase(r: &ApprovalRequest) -> ApprovalPhase {
    r.status.as_ref().map(|s| s.phase).unwrap_or_default()
}

fn expires_at(r: &ApprovalRequest) -> Timestamp {
    // An unreadable expiry is treated as already past: fail closed.
    r.spec.expires_at.parse().unwrap_or(Timestamp::MIN)
}

/// The phase at `now`: a request still Pending or Approved (unused) past
/// `expiresAt` is Expired, whether or not anyone has written that down yet.
pub fn phase(r: &ApprovalRequest, now: Timestamp) -> ApprovalPhase {
    match stored_phase(r) {
        ApprovalPhase::Pending | ApprovalPhase::Approved if now >= expires_at(r) => {
            ApprovalPhase::Expired
        }
        p => p,
    }
}

fn set_phase(r: &mut ApprovalRequest, phase: ApprovalPhase) {
    r.status.get_or_insert_with(Default::default).phase = phase;
}

/// Write down an expiry that has happened; true when something changed.
pub fn expire(r: &mut ApprovalRequest, now: Timestamp) -> bool {
    if phase(r, now) == ApprovalPhase::Expired && stored_phase(r) != ApprovalPhase::Expired {
        set_phase(r, ApprovalPhase::Expired);
        return true;
    }
    false
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecideError {
    #[error("request {id} expired at {at}; it can no longer be decided")]
    Expired { id: String, at: String },
    #[error("request {id} is already {phase:?}{by}")]
    AlreadyDecided {
        id: String,
        phase: ApprovalPhase,
        by: String,
    },
    #[error("{who} requested {id} and cannot decide it: you cannot decide your own request")]
    SelfApproval { id: String, who: String },
    #[error("{who} may not decide {id}: the policy's approval.approvers allows {allowed}")]
    NotAnApprover {
        id: String,
        who: String,
        allowed: String,
    },
}

/// Who decides: a name and, standalone, the OS groups it belongs to.
#[derive(Debug, Clone, Copy)]
pub struct Decider<'a> {
    pub name: &'a str,
    pub groups: &'a [String],
}

impl<'a> From<&'a str> for Decider<'a> {
    fn from(name: &'a str) -> Self {
        Decider { name, groups: &[] }
    }
}

/// A reviewer's decision. On `Expired` the request is marked Expired (the
/// caller persists it either way).
///
/// Nobody is special (root included): the requester, by subject, service
/// account or OS user, never decides; when the request names approvers,
/// only those users (or members of those groups) do.
pub fn decide<'a>(
    r: &mut ApprovalRequest,
    action: DecisionAction,
    by: impl Into<Decider<'a>>,
    reason: Option<String>,
    now: Timestamp,
) -> Result<(), DecideError> {
    let decider = by.into();
    let by = decider.name;
    let id = id(r).to_owned();
    if expire(r, now) || stored_phase(r) == ApprovalPhase::Expired {
        return Err(DecideError::Expired {
            id,
            at: r.spec.expires_at.clone(),
        });
    }
    if stored_phase(r) != ApprovalPhase::Pending || r.spec.decision.is_some() {
        let by = r
            .spec
            .decision
            .as_ref()
            .and_then(|d| d.decided_by.as_deref())
            .map(|b| format!(" (decided by {b})"))
            .unwrap_or_default();
        return Err(DecideError::AlreadyDecided {
            id,
            phase: stored_phase(r),
            by,
        });
    }
    let req = &r.spec.requester;
    if by == req.subject
        || req.service_account.as_deref() == Some(by)
        || req.os_user.as_deref() == Some(by)
    {
        return Err(DecideError::SelfApproval {
            id,
            who: by.to_owned(),
        });
    }
    if let Some(a) = &r.spec.approvers {
        let listed = !a.users.is_empty() || !a.groups.is_empty();
        let allowed =
            a.users.iter().any(|u| u == by) || decider.groups.iter().any(|g| a.groups.contains(g));
        if listed && !allowed {
            let mut names: Vec<String> = a.users.iter().map(|u| format!("user {u}")).collect();
            names.extend(a.groups.iter().map(|g| format!("group {g}")));
            return Err(DecideError::NotAnApprover {
                id,
                who: by.to_owned(),
                allowed: names.join(", "),
            });
        }
    }
    r.spec.decision = Some(Decision {
        action,
        reason,
        decided_by: Some(by.to_owned()),
        decided_at: Some(rfc3339(now)),
    });
    set_phase(
        r,
        match action {
            DecisionAction::Approve => ApprovalPhase::Approved,
            DecisionAction::Deny => ApprovalPhase::Denied,
        },
    );
    Ok(())
}

/// Use an approval: Approved (and unexpired) becomes Executed, once. The
/// store applies this under its lock, so two sessions cannot both claim it.
pub fn claim(r: &mut ApprovalRequest, now: Timestamp) -> Result<(), ApprovalPhase> {
    match phase(r, now) {
        ApprovalPhase::Approved => {
            set_phase(r, ApprovalPhase::Executed);
            Ok(())
        }
        other => {
            expire(r, now);
            Err(other)
        }
    }
}

/// What running a released statement gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Its command tag (the last one, for several statements in one Query).
    Done(String),
    /// The server's error, or why it never ran.
    Failed(String),
}

pub fn finish(r: &mut ApprovalRequest, outcome: &Outcome) {
    let status = r.status.get_or_insert_with(Default::default);
    match outcome {
        Outcome::Done(tag) => {
            status.phase = ApprovalPhase::Executed;
            status.result = Some(tag.clone());
        }
        Outcome::Failed(why) => {
            status.phase = ApprovalPhase::Failed;
            status.result = Some(why.clone());
        }
    }
}

/// Where a statement stands, from the requests with its fingerprint.
#[derive(Debug)]
pub enum Standing {
    /// Approved and unused: claim it and run.
    Approved(ApprovalRequest),
    /// Waiting for a reviewer.
    Pending(ApprovalRequest),
    /// Denied, and the denial has not expired: the retry is denied too.
    Denied(ApprovalRequest),
    /// Nothing open (never asked, or the last request was used, failed or
    /// expired): a new request is needed.
    None,
}

/// Only the newest request with the fingerprint counts.
pub fn standing(same_fingerprint: &[ApprovalRequest], now: Timestamp) -> Standing {
    let Some(newest) = same_fingerprint.iter().max_by_key(|r| created(r)) else {
        return Standing::None;
    };
    match phase(newest, now) {
        ApprovalPhase::Approved => Standing::Approved(newest.clone()),
        ApprovalPhase::Pending => Standing::Pending(newest.clone()),
        ApprovalPhase::Denied if now < expires_at(newest) => Standing::Denied(newest.clone()),
        _ => Standing::None,
    }
}

fn created(r: &ApprovalRequest) -> (Timestamp, String) {
    let precise = r
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CREATED_ANNOTATION))
        .and_then(|t| t.parse().ok());
    let at = precise
        .or_else(|| r.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .unwrap_or(Timestamp::MIN);
    (at, id(r).to_owned())
}

/// Oldest first.
pub fn sort(requests: &mut [ApprovalRequest]) {
    requests.sort_by_key(created);
}

/// The flat view `pgwarden approvals -o json` prints.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct View<'a> {
    pub id: &'a str,
    pub phase: ApprovalPhase,
    pub policy: &'a str,
    pub namespace: &'a str,
    pub database: &'a str,
    pub requester: &'a Requester,
    pub statement: &'a str,
    pub parameters: &'a [Option<String>],
    pub fingerprint: &'a str,
    pub reason: &'a str,
    pub created_at: Option<String>,
    pub expires_at: &'a str,
    pub decision: Option<&'a Decision>,
    pub result: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approvers: Option<&'a Approvers>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimate: Option<&'a pgwarden_api::Estimate>,
}

pub fn view(r: &ApprovalRequest, now: Timestamp) -> View<'_> {
    View {
        id: id(r),
        phase: phase(r, now),
        policy: &r.spec.policy,
        namespace: r.metadata.namespace.as_deref().unwrap_or(""),
        database: &r.spec.database,
        requester: &r.spec.requester,
        statement: &r.spec.statement,
        parameters: &r.spec.parameters,
        fingerprint: &r.spec.fingerprint,
        reason: &r.spec.reason,
        created_at: r.metadata.creation_timestamp.as_ref().map(|t| rfc3339(t.0)),
        expires_at: &r.spec.expires_at,
        decision: r.spec.decision.as_ref(),
        result: r.status.as_ref().and_then(|s| s.result.as_deref()),
        approvers: r.spec.approvers.as_ref(),
        estimate: r.spec.estimate.as_ref(),
    }
}

#[cfg(test)]
mod tests;
