//! The cluster store: ApprovalRequests live in the Kubernetes API, created
//! and written by the operator on this sidecar's behalf (the pod's service
//! account needs no RBAC). Each call is a POST to the operator with the
//! sidecar's projected token (`pgwarden_api::stream::approvals`); a decision
//! arrives as an `ApprovalDecided` event on the config stream, so a held
//! statement is released the moment the reviewer's patch is admitted,
//! without polling.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use pgwarden_api::stream::approvals::{
    Claim, ClaimOutcome, Claimed, Finish, FinishOutcome, OpenApproval, OpenOutcome, Opened,
    CLAIM_PATH, FINISH_PATH, MAX_BODY_BYTES, OPEN_PATH,
};
use pgwarden_api::{ApprovalRequest, ApprovalSettings};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use super::request::{self, Outcome};
use super::store::StoreError;
use super::{Approvals, Ask, Opened as Open, Store, Waited};
use crate::config::stream::{post, StreamOptions};

/// Decisions seen on the stream and not yet taken by a waiting session.
/// More than this many untaken is a flood, not a backlog: the oldest are
/// dropped (their sessions still claim at their deadline).
const MAX_UNTAKEN: usize = 4096;

/// One per gateway: the operator's address and the decisions it announced.
pub struct ClusterClient {
    opts: StreamOptions,
    /// Request name → the decided request, until a session takes it.
    decided: Mutex<HashMap<String, ApprovalRequest>>,
    /// Bumped on every announced decision.
    tick: watch::Sender<u64>,
    /// Requests this sidecar opened that were pending when last heard of
    /// (for the pending-approvals metric); a decision or expiry removes them.
    pending: Mutex<HashMap<String, ApprovalRequest>>,
}

impl std::fmt::Debug for ClusterClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterClient")
            .field("operator", &self.opts.url)
            .finish_non_exhaustive()
    }
}

/// Why the operator could not be asked (shown to the client: no token, no
/// statement text).
#[derive(Debug, thiserror::Error)]
#[error("the operator ({url}): {message}")]
pub struct OperatorError {
    pub url: String,
    pub message: String,
}

impl ClusterClient {
    pub fn new(opts: StreamOptions) -> Self {
        ClusterClient {
            opts,
            decided: Mutex::default(),
            tick: watch::channel(0).0,
            pending: Mutex::default(),
        }
    }

    /// The config stream announced a decision (or expiry) of a request.
    pub fn announce(&self, r: ApprovalRequest) {
        let id = request::id(&r).to_owned();
        self.settled(&id);
        {
            let mut d = self.decided.lock().unwrap_or_else(|e| e.into_inner());
            if d.len() >= MAX_UNTAKEN && !d.contains_key(&id) {
                d.clear();
            }
            d.insert(id, r);
        }
        self.tick.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Resolves once a decision of `id` is announced (taking it, so the next
    /// call waits for a new one). Safe to drop at any point.
    pub async fn decided(&self, id: &str) {
        let mut tick = self.tick.subscribe();
        loop {
            let taken = self
                .decided
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
            if taken.is_some() {
                return;
            }
            if tick.changed().await.is_err() {
                // Never: the sender lives in self. Wait for the caller's deadline.
                std::future::pending::<()>().await;
            }
        }
    }

    /// How many requests this sidecar opened are still pending.
    pub fn pending_count(&self, now: k8s_openapi::jiff::Timestamp) -> usize {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.retain(|_, r| request::phase(r, now) == pgwarden_api::ApprovalPhase::Pending);
        p.len()
    }

    fn still_pending(&self, r: &ApprovalRequest) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.len() >= MAX_UNTAKEN {
            // A flood: the metric undercounts rather than grow for ever.
            p.clear();
        }
        p.insert(request::id(r).to_owned(), r.clone());
    }

    fn settled(&self, id: &str) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    pub async fn open(&self, ask: &OpenApproval) -> Result<Opened, OperatorError> {
        self.call(OPEN_PATH, ask).await
    }

    pub async fn claim(&self, id: &str) -> Result<Claimed, OperatorError> {
        self.call(CLAIM_PATH, &Claim { id: id.to_owned() }).await
    }

    pub async fn finish(&self, id: &str, outcome: &Outcome) -> Result<(), OperatorError> {
        let outcome = match outcome {
            Outcome::Done(tag) => FinishOutcome::Executed(tag.clone()),
            Outcome::Failed(e) => FinishOutcome::Failed(e.clone()),
        };
        let body = Finish {
            id: id.to_owned(),
            outcome,
        };
        self.send(FINISH_PATH, &body).await.map(drop)
    }

    async fn call<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<T, OperatorError> {
        let bytes = self.send(path, body).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| self.error(format!("{path}: not an answer ({e})")))
    }

    async fn send(&self, path: &str, body: &impl serde::Serialize) -> Result<Bytes, OperatorError> {
        let json = serde_json::to_vec(body).map_err(|e| self.error(e.to_string()))?;
        let incoming = post(&self.opts, path, Bytes::from(json))
            .await
            .map_err(|e| self.error(e))?;
        Limited::new(incoming, MAX_BODY_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| self.error(format!("{path}: reading the answer: {e}")))
    }

    fn error(&self, message: String) -> OperatorError {
        OperatorError {
            url: self.opts.url.to_string(),
            message,
        }
    }
}

// === impl Approvals (the cluster half) ===

impl Approvals {
    /// One policy's approvals in the cluster: requests are the operator's
    /// ApprovalRequests; `key` is the policy's fingerprint key from the
    /// snapshot.
    #[allow(clippy::too_many_arguments)]
    pub fn in_cluster(
        client: Arc<ClusterClient>,
        key: Vec<u8>,
        settings: Option<&ApprovalSettings>,
        policy: &str,
        namespace: &str,
        database: &str,
        pod: Option<String>,
        service_account: Option<String>,
    ) -> Self {
        let defaults = ApprovalSettings::default();
        let settings = settings.unwrap_or(&defaults);
        Approvals {
            store: Store::Cluster(client),
            key,
            policy: policy.to_owned(),
            namespace: namespace.to_owned(),
            database: database.to_owned(),
            wait: settings.effective_wait().as_std(),
            expires_after: settings.effective_expires_after().as_std(),
            pod,
            service_account,
            approvers: Some(settings.approvers.clone())
                .filter(|a| !a.users.is_empty() || !a.groups.is_empty()),
        }
    }

    pub(super) async fn open_in_cluster(
        &self,
        client: &ClusterClient,
        ask: Ask<'_>,
    ) -> Result<Open, StoreError> {
        let fingerprint = request::fingerprint(
            &self.key,
            &format!("{}/{}", self.namespace, self.policy),
            &self.database,
            ask.subject,
            ask.statement,
            ask.params,
        );
        let body = OpenApproval {
            policy: self.policy.clone(),
            subject: ask.subject.to_owned(),
            statement: ask.statement.to_owned(),
            parameters: request::render_params(ask.params, ask.sensitive),
            fingerprint: fingerprint.clone(),
            reason: ask.reason.to_owned(),
            estimate: ask.estimate,
        };
        let opened = client.open(&body).await?;
        let r = *opened.request;
        // Exact binding is the sidecar's to keep: whatever the operator
        // answers, only a request for exactly this statement, these
        // parameters and this subject is ever run.
        if r.spec.fingerprint != fingerprint || r.spec.requester.subject != ask.subject {
            return Err(StoreError::Operator(format!(
                "the operator answered with request {}, which is not for this statement",
                request::id(&r)
            )));
        }
        Ok(match opened.outcome {
            OpenOutcome::Released => Open::Released(r),
            OpenOutcome::Pending => {
                client.still_pending(&r);
                Open::Pending(r)
            }
            OpenOutcome::Denied => Open::Denied(r),
        })
    }

    pub(super) async fn check_in_cluster(
        &self,
        client: &ClusterClient,
        id: &str,
    ) -> Result<Waited, StoreError> {
        let claimed = client.claim(id).await?;
        let r = *claimed.request;
        if !matches!(claimed.outcome, ClaimOutcome::Pending) {
            client.settled(id);
        }
        Ok(match claimed.outcome {
            ClaimOutcome::Released => Waited::Released(r),
            ClaimOutcome::Pending => Waited::Pending,
            ClaimOutcome::Denied => Waited::Denied(r),
            ClaimOutcome::Expired => Waited::Expired(r),
            ClaimOutcome::UsedElsewhere => Waited::UsedElsewhere(r),
        })
    }
}

impl From<OperatorError> for StoreError {
    fn from(e: OperatorError) -> Self {
        StoreError::Operator(e.to_string())
    }
}
