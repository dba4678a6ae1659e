//! Approvals on the config stream (wire in `pgwarden_api::stream::approvals`):
//! the sidecar's POSTs to open, claim and finish a request, and the feed of
//! decided requests each pod's stream carries down as `ApprovalDecided`.
//!
//! The operator creates the ApprovalRequest (the pod's service account needs
//! no RBAC) in the pod's namespace, with the pod and service account the
//! token review proved. Only the pod that opened a request (same name and
//! uid) may claim or finish it. Claims are resourceVersion-guarded status
//! updates: of two racing claims, one gets the approval, the other a 409.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt as _;
use http::Request;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::{Api, Client, ResourceExt as _};
use pgwarden_api::stream::approvals::{
    approve_command, Claim, ClaimOutcome, Claimed, Finish, FinishOutcome, OpenApproval,
    OpenOutcome, Opened, MAX_BODY_BYTES,
};
use pgwarden_api::{ApprovalPhase, ApprovalRequest, ApprovalRequestSpec, Requester};
use tokio::sync::broadcast;
use tracing::{info, warn};

pub use pgwarden_api::stream::approvals::{CLAIM_PATH, FINISH_PATH, OPEN_PATH};

use super::auth::{BoundToken, Refusal};
use super::{text, unavailable, Body, StreamServer};
use crate::approvals::lifecycle::announce;
use crate::approvals::{effective_phase, expires_at, set_phase, stored_phase};

pub const POLICY_LABEL: &str = "pgwarden.io/policy";
pub const POD_LABEL: &str = "pgwarden.io/pod";
/// The first 40 hex digits of the fingerprint (a label value holds 63
/// characters); the full fingerprint is compared after listing.
pub const FINGERPRINT_LABEL: &str = "pgwarden.io/fingerprint";
pub const POD_UID_ANNOTATION: &str = "pgwarden.io/pod-uid";
/// When a request was created, to the nanosecond (orders requests made
/// within one second; the same annotation the standalone store writes).
pub const CREATED_ANNOTATION: &str = "pgwarden.io/created";

/// Every replica's feed of decided ApprovalRequests, watched per namespace
/// as streams of that namespace open (the operator's RBAC may cover only
/// the namespaces it serves).
pub struct Feed {
    client: Client,
    decided: broadcast::Sender<Arc<ApprovalRequest>>,
    watched: std::sync::Mutex<std::collections::HashSet<String>>,
    pub recorder: Recorder,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed").finish_non_exhaustive()
    }
}

/// A request worth telling its sidecar about: decided or expired, not yet used.
fn announceable(r: &ApprovalRequest, now: Timestamp) -> bool {
    matches!(
        effective_phase(r, now),
        ApprovalPhase::Approved | ApprovalPhase::Denied | ApprovalPhase::Expired
    ) && !matches!(
        stored_phase(r),
        ApprovalPhase::Executed | ApprovalPhase::Failed
    )
}

/// The request was opened by this pod (name and uid).
fn opened_by(r: &ApprovalRequest, bound: &BoundToken) -> bool {
    let pod = format!("{}/{}", bound.pod.namespace, bound.pod.name);
    r.spec.requester.pod.as_deref() == Some(pod.as_str())
        && r.annotations().get(POD_UID_ANNOTATION) == Some(&bound.pod_uid)
}

impl Feed {
    pub fn start(client: Client) -> Arc<Feed> {
        let (decided, _) = broadcast::channel(256);
        let reporter = Reporter {
            controller: "pgwarden-operator".into(),
            instance: None,
        };
        Arc::new(Feed {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            decided,
            watched: Default::default(),
        })
    }

    /// Decided requests of `namespace` (and others already watched) as
    /// reviewers' patches are admitted.
    pub fn subscribe(&self, namespace: &str) -> broadcast::Receiver<Arc<ApprovalRequest>> {
        let rx = self.decided.subscribe();
        let first = self
            .watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(namespace.to_owned());
        if first {
            let events = watcher(
                Api::<ApprovalRequest>::namespaced(self.client.clone(), namespace),
                watcher::Config::default(),
            )
            .default_backoff()
            .applied_objects();
            let tx = self.decided.clone();
            tokio::spawn(async move {
                let mut events = std::pin::pin!(events);
                while let Some(ev) = events.next().await {
                    match ev {
                        Ok(r) if announceable(&r, Timestamp::now()) => {
                            let _ = tx.send(Arc::new(r));
                        }
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "approval request watch failed; retrying"),
                    }
                }
            });
        }
        rx
    }

    /// The decided requests of a pod (sent when its stream opens, so a
    /// decision made while it was away, or across an operator restart,
    /// still reaches it).
    pub async fn decided_for(&self, bound: &BoundToken) -> Vec<Arc<ApprovalRequest>> {
        let api: Api<ApprovalRequest> = Api::namespaced(self.client.clone(), &bound.pod.namespace);
        let selector = format!("{POD_LABEL}={}", pod_label(&bound.pod.name));
        let now = Timestamp::now();
        match api.list(&ListParams::default().labels(&selector)).await {
            Ok(list) => list
                .items
                .into_iter()
                .filter(|r| opened_by(r, bound) && announceable(r, now))
                .map(Arc::new)
                .collect(),
            Err(e) => {
                warn!(error = %e, "listing the pod's approval requests failed");
                Vec::new()
            }
        }
    }

    /// Whether a decided request belongs to this pod's stream.
    pub fn is_for(r: &ApprovalRequest, bound: &BoundToken) -> bool {
        opened_by(r, bound)
    }
}

fn bad_request(reason: String) -> Refusal {
    Refusal {
        status: 400,
        reason,
    }
}

fn api_failed(what: &str, e: kube::Error) -> Refusal {
    unavailable(format!("{what}: {e}"))
}

fn json(value: &impl serde::Serialize) -> http::Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let mut r = http::Response::new(Full::new(Bytes::from(bytes)).boxed());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

async fn read_body<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Refusal> {
    let body = Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|_| bad_request(format!("the body must be at most {MAX_BODY_BYTES} bytes")))?
        .to_bytes();
    // serde's message names a position and a type; the statement may be in
    // the body, so the body itself is never quoted back.
    serde_json::from_slice(&body).map_err(|e| {
        bad_request(format!(
            "not a valid approval call (line {} column {})",
            e.line(),
            e.column()
        ))
    })
}

/// `hmac-sha256:` and 64 lowercase hex digits.
fn fingerprint_hex(fp: &str) -> Option<&str> {
    let hex = fp.strip_prefix("hmac-sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(hex)
}

/// A label value for a pod name (63 characters at most; a longer name is
/// cut: the full name is compared in `requester.pod`).
fn pod_label(name: &str) -> String {
    name.chars()
        .take(63)
        .collect::<String>()
        .trim_end_matches(['-', '.'])
        .to_owned()
}

fn created(r: &ApprovalRequest) -> (Timestamp, String) {
    let at = r
        .annotations()
        .get(CREATED_ANNOTATION)
        .and_then(|t| t.parse().ok())
        .or_else(|| r.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .unwrap_or(Timestamp::MIN);
    (at, r.name_any())
}

impl StreamServer {
    pub(super) async fn open_approval(
        &self,
        req: Request<Incoming>,
    ) -> Result<http::Response<Body>, Refusal> {
        let (bound, pod) = self.authenticate(&req).await?;
        let ask: OpenApproval = read_body(req).await?;
        let Some(hex) = fingerprint_hex(&ask.fingerprint) else {
            return Err(bad_request(
                "the fingerprint is not hmac-sha256:<64 hex>".into(),
            ));
        };
        let ns = bound.pod.namespace.clone();
        // The policy must be one this pod is owed now: a sidecar opens
        // requests only for policies that select it.
        let resolved = self.index.resolve(&pod, self.keys.as_ref());
        let Some(Ok(policy)) = resolved.get(&ask.policy) else {
            return Err(Refusal {
                status: 403,
                reason: format!("policy {ns}/{} does not select this pod", ask.policy),
            });
        };
        let spec = &policy.policy.spec;
        let settings = spec.approval.clone().unwrap_or_default();
        let api: Api<ApprovalRequest> = Api::namespaced(self.client.clone(), &ns);
        let selector = format!(
            "{POLICY_LABEL}={},{POD_LABEL}={},{FINGERPRINT_LABEL}={}",
            ask.policy,
            pod_label(&bound.pod.name),
            &hex[..40]
        );
        let same = api
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| api_failed("listing approval requests", e))?
            .items
            .into_iter()
            .filter(|r| {
                r.spec.fingerprint == ask.fingerprint
                    && r.spec.requester.subject == ask.subject
                    && opened_by(r, &bound)
            })
            .max_by_key(created);
        let now = Timestamp::now();
        if let Some(r) = same {
            match effective_phase(&r, now) {
                ApprovalPhase::Approved => {
                    if let Ok(r) = self.try_claim(&api, r, now).await? {
                        return Ok(json(&Opened {
                            outcome: OpenOutcome::Released,
                            request: Box::new(r),
                        }));
                    }
                }
                ApprovalPhase::Pending => {
                    return Ok(json(&Opened {
                        outcome: OpenOutcome::Pending,
                        request: Box::new(r),
                    }))
                }
                ApprovalPhase::Denied if now < expires_at(&r) => {
                    return Ok(json(&Opened {
                        outcome: OpenOutcome::Denied,
                        request: Box::new(r),
                    }))
                }
                _ => {}
            }
        }
        let expires = now
            .checked_add(
                jiff::SignedDuration::try_from(settings.effective_expires_after().as_std())
                    .unwrap_or(jiff::SignedDuration::MAX),
            )
            .unwrap_or(Timestamp::MAX);
        let approvers = Some(settings.approvers.clone())
            .filter(|a| !a.users.is_empty() || !a.groups.is_empty());
        let spec = ApprovalRequestSpec {
            policy: ask.policy.clone(),
            requester: Requester {
                subject: ask.subject.clone(),
                pod: Some(format!("{ns}/{}", bound.pod.name)),
                service_account: Some(bound.service_account.clone()),
                os_user: None,
            },
            database: spec.database.name.clone(),
            statement: ask.statement,
            parameters: ask.parameters,
            fingerprint: ask.fingerprint.clone(),
            reason: ask.reason,
            expires_at: expires.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
            approvers,
            estimate: ask.estimate,
            decision: None,
        };
        // Names are `<policy>-<6 hex>`; a taken one is drawn again.
        let base: String = ask.policy.chars().take(200).collect();
        let mut made = None;
        for _ in 0..5 {
            let name = format!("{base}-{:06x}", rand::random::<u32>() & 0xff_ffff);
            let mut r = ApprovalRequest::new(&name, spec.clone());
            r.metadata.namespace = Some(ns.clone());
            r.metadata.labels = Some(
                [
                    (POLICY_LABEL.to_owned(), ask.policy.clone()),
                    (POD_LABEL.to_owned(), pod_label(&bound.pod.name)),
                    (FINGERPRINT_LABEL.to_owned(), hex[..40].to_owned()),
                ]
                .into(),
            );
            r.metadata.annotations = Some(
                [
                    (POD_UID_ANNOTATION.to_owned(), bound.pod_uid.clone()),
                    (
                        CREATED_ANNOTATION.to_owned(),
                        now.strftime("%Y-%m-%dT%H:%M:%S%.9fZ").to_string(),
                    ),
                ]
                .into(),
            );
            match api.create(&PostParams::default(), &r).await {
                Ok(r) => {
                    made = Some(r);
                    break;
                }
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(api_failed("creating the approval request", e)),
            }
        }
        let Some(mut r) = made else {
            return Err(unavailable(
                "no free approval request name after 5 tries".into(),
            ));
        };
        // The status subresource is not written by create.
        let patch = serde_json::json!({ "status": { "phase": "Pending" } });
        match api
            .patch_status(
                &r.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(written) => r = written,
            Err(e) => {
                warn!(approval.name = %r.name_any(), error = %e, "writing the Pending phase failed")
            }
        }
        let id = r.name_any();
        info!(approval.namespace = %ns, approval.name = %id, pod = %bound.pod.name, "approval request opened");
        announce(
            &self.approvals.recorder,
            &r,
            false,
            "Requested",
            format!(
                "{} (pod {ns}/{}) waits for approval: {}; approve with: {}",
                r.spec.requester.subject,
                bound.pod.name,
                r.spec.reason,
                approve_command(&ns, &id)
            ),
        )
        .await;
        crate::approvals::notify::requested(&r);
        Ok(json(&Opened {
            outcome: OpenOutcome::Pending,
            request: Box::new(r),
        }))
    }

    /// Approved → Executed, guarded by the resourceVersion read. A 409
    /// means the request changed since: the controller writing the phase
    /// (still claimable: read again, try again) or another claim (not).
    /// `Err(r)` carries the request as it now is when it cannot be claimed.
    async fn try_claim(
        &self,
        api: &Api<ApprovalRequest>,
        mut r: ApprovalRequest,
        now: Timestamp,
    ) -> Result<Result<ApprovalRequest, ApprovalRequest>, Refusal> {
        for _ in 0..5 {
            if effective_phase(&r, now) != ApprovalPhase::Approved {
                return Ok(Err(r));
            }
            let mut claimed = r.clone();
            set_phase(&mut claimed, ApprovalPhase::Executed, now);
            match api
                .replace_status(&r.name_any(), &PostParams::default(), &claimed)
                .await
            {
                Ok(written) => {
                    crate::approvals::notify::decided_write(&r, ApprovalPhase::Executed);
                    return Ok(Ok(written));
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    r = api
                        .get(&r.name_any())
                        .await
                        .map_err(|e| api_failed("reading the approval request", e))?;
                }
                Err(e) => return Err(api_failed("claiming the approval", e)),
            }
        }
        Err(unavailable(
            "claiming the approval: the request kept changing".into(),
        ))
    }

    async fn own_request(
        &self,
        bound: &BoundToken,
        id: &str,
    ) -> Result<(Api<ApprovalRequest>, ApprovalRequest), Refusal> {
        let api: Api<ApprovalRequest> = Api::namespaced(self.client.clone(), &bound.pod.namespace);
        let r = api
            .get_opt(id)
            .await
            .map_err(|e| api_failed("reading the approval request", e))?
            .ok_or_else(|| Refusal {
                status: 404,
                reason: format!("no approval request {}/{id}", bound.pod.namespace),
            })?;
        if !opened_by(&r, bound) {
            return Err(Refusal {
                status: 403,
                reason: format!(
                    "approval request {}/{id} was not opened by this pod",
                    bound.pod.namespace
                ),
            });
        }
        Ok((api, r))
    }

    pub(super) async fn claim_approval(
        &self,
        req: Request<Incoming>,
    ) -> Result<http::Response<Body>, Refusal> {
        let (bound, _) = self.authenticate(&req).await?;
        let claim: Claim = read_body(req).await?;
        let (api, r) = self.own_request(&bound, &claim.id).await?;
        let now = Timestamp::now();
        let (outcome, r) = match effective_phase(&r, now) {
            ApprovalPhase::Approved => match self.try_claim(&api, r, now).await? {
                Ok(r) => (ClaimOutcome::Released, r),
                Err(r) => (
                    match effective_phase(&r, now) {
                        ApprovalPhase::Denied => ClaimOutcome::Denied,
                        ApprovalPhase::Expired => ClaimOutcome::Expired,
                        ApprovalPhase::Pending => ClaimOutcome::Pending,
                        _ => ClaimOutcome::UsedElsewhere,
                    },
                    r,
                ),
            },
            ApprovalPhase::Pending => (ClaimOutcome::Pending, r),
            ApprovalPhase::Denied => (ClaimOutcome::Denied, r),
            ApprovalPhase::Expired => (ClaimOutcome::Expired, r),
            ApprovalPhase::Executed | ApprovalPhase::Failed => (ClaimOutcome::UsedElsewhere, r),
        };
        if outcome == ClaimOutcome::Released {
            info!(approval.namespace = %bound.pod.namespace, approval.name = %claim.id, "approval claimed");
        }
        Ok(json(&Claimed {
            outcome,
            request: Box::new(r),
        }))
    }

    pub(super) async fn finish_approval(
        &self,
        req: Request<Incoming>,
    ) -> Result<http::Response<Body>, Refusal> {
        let (bound, _) = self.authenticate(&req).await?;
        let finish: Finish = read_body(req).await?;
        let (phase, result) = match &finish.outcome {
            FinishOutcome::Executed(tag) => (ApprovalPhase::Executed, tag.clone()),
            FinishOutcome::Failed(e) => (ApprovalPhase::Failed, e.clone()),
        };
        // Only a claimed request is finished; a lost race re-reads.
        for _ in 0..3 {
            let (api, mut r) = self.own_request(&bound, &finish.id).await?;
            if stored_phase(&r) != ApprovalPhase::Executed
                || r.status.as_ref().is_some_and(|s| s.result.is_some())
            {
                return Err(Refusal {
                    status: 409,
                    reason: format!(
                        "approval request {} was not claimed, or is finished",
                        finish.id
                    ),
                });
            }
            set_phase(&mut r, phase, Timestamp::now());
            r.status.get_or_insert_with(Default::default).result = Some(result.clone());
            match api
                .replace_status(&finish.id, &PostParams::default(), &r)
                .await
            {
                Ok(r) => {
                    let (reason, warning) = match phase {
                        ApprovalPhase::Failed => ("Failed", true),
                        _ => ("Executed", false),
                    };
                    announce(
                        &self.approvals.recorder,
                        &r,
                        warning,
                        reason,
                        format!("the approved statement ran: {result}"),
                    )
                    .await;
                    return Ok(text(200, "ok"));
                }
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(api_failed("recording the outcome", e)),
            }
        }
        Err(unavailable(
            "recording the outcome: the request kept changing".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sidecars::PodKey;
    use pgwarden_api::{Decision, DecisionAction};

    fn bound(name: &str, uid: &str) -> BoundToken {
        BoundToken {
            pod: PodKey {
                namespace: "ci".into(),
                name: name.into(),
            },
            pod_uid: uid.into(),
            service_account: "runner".into(),
        }
    }

    fn opened(pod: &str, uid: &str, phase: ApprovalPhase, decided: bool) -> ApprovalRequest {
        let mut r = ApprovalRequest::new(
            "shop-1",
            ApprovalRequestSpec {
                policy: "shop".into(),
                requester: Requester {
                    subject: "s".into(),
                    pod: Some(format!("ci/{pod}")),
                    ..Requester::default()
                },
                database: "shop".into(),
                statement: "ALTER TABLE t ADD c int".into(),
                parameters: vec![],
                fingerprint: "hmac-sha256:00".into(),
                reason: "r".into(),
                expires_at: "2999-01-01T00:00:00Z".into(),
                approvers: None,
                estimate: None,
                decision: decided.then(|| Decision {
                    action: DecisionAction::Approve,
                    reason: None,
                    decided_by: Some("alice".into()),
                    decided_at: None,
                }),
            },
        );
        r.metadata.annotations = Some([(POD_UID_ANNOTATION.to_owned(), uid.to_owned())].into());
        r.status = Some(pgwarden_api::ApprovalRequestStatus {
            phase,
            ..Default::default()
        });
        r
    }

    #[test]
    fn only_the_pod_that_opened_a_request_hears_of_it_or_claims_it() {
        let r = opened("agent-1", "uid-1", ApprovalPhase::Pending, true);
        assert!(opened_by(&r, &bound("agent-1", "uid-1")));
        // Same name, a new pod (a StatefulSet's replacement): not its request.
        assert!(!opened_by(&r, &bound("agent-1", "uid-2")));
        assert!(!opened_by(&r, &bound("agent-2", "uid-1")));
    }

    #[test]
    fn decided_unused_requests_are_announced_and_nothing_else() {
        let now = Timestamp::now();
        let a = |phase, decided| announceable(&opened("p", "u", phase, decided), now);
        assert!(
            a(ApprovalPhase::Pending, true),
            "decided, phase not yet written"
        );
        assert!(a(ApprovalPhase::Approved, true));
        assert!(!a(ApprovalPhase::Pending, false));
        assert!(!a(ApprovalPhase::Executed, true));
        assert!(!a(ApprovalPhase::Failed, true));
    }

    #[test]
    fn fingerprints_and_pod_labels_fit_their_shapes() {
        let hex = "ab".repeat(32);
        assert_eq!(
            fingerprint_hex(&format!("hmac-sha256:{hex}")),
            Some(hex.as_str())
        );
        for bad in [
            "",
            "sha256:00",
            "hmac-sha256:AB",
            &format!("hmac-sha256:{hex}0"),
        ] {
            assert_eq!(fingerprint_hex(bad), None, "{bad}");
        }
        assert_eq!(pod_label("runner-1"), "runner-1");
        let long = format!("{}-x", "a".repeat(62));
        assert_eq!(pod_label(&long), "a".repeat(62));
    }
}
