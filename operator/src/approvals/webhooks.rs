//! The decision webhooks as the admission server runs them
//! (`/approvals/mutate`, `/approvals/validate`): the pure checks of
//! `admission`, with the clock and the policy's current approvers read here.

use std::sync::Arc;

use jiff::Timestamp;
use kube::{Api, Client};
use pgwarden_api::{ApprovalRequest, DatabaseAccessPolicy};
use serde_json::Value;

use super::admission::{self, AdmissionRequest, Checks, PolicyApprovers, Verdict};
use crate::admission::{BoxFuture, Webhook, APPROVALS_MUTATE_PATH, APPROVALS_VALIDATE_PATH};

fn response(v: &Verdict) -> Value {
    let mut r = v.to_response("");
    // The dispatcher sets the uid.
    if let Some(o) = r.as_object_mut() {
        o.remove("uid");
    }
    r
}

fn parse(request: &Value) -> Result<AdmissionRequest, Value> {
    serde_json::from_value(request.clone()).map_err(|e| {
        crate::admission::deny(format!("not an ApprovalRequest admission review: {e}"))
    })
}

pub struct Mutate;

impl Webhook for Mutate {
    fn review<'a>(&'a self, request: &'a Value) -> BoxFuture<'a, Value> {
        Box::pin(async move {
            match parse(request) {
                Ok(r) => response(&admission::mutate(&r, Timestamp::now())),
                Err(denied) => denied,
            }
        })
    }
}

pub struct Validate {
    client: Client,
    /// The operator's username: the only creator and status writer.
    operator: String,
}

impl Webhook for Validate {
    fn review<'a>(&'a self, request: &'a Value) -> BoxFuture<'a, Value> {
        Box::pin(async move {
            let r = match parse(request) {
                Ok(r) => r,
                Err(denied) => return denied,
            };
            // Who may decide is the policy's now (an approver removed since
            // the request was opened no longer decides).
            let old: Option<ApprovalRequest> = r
                .old_object
                .as_ref()
                .and_then(|o| serde_json::from_value(o.clone()).ok());
            let approvers = match &old {
                Some(old) => {
                    let ns = old.metadata.namespace.clone().unwrap_or_default();
                    let api: Api<DatabaseAccessPolicy> = Api::namespaced(self.client.clone(), &ns);
                    match api.get_opt(&old.spec.policy).await {
                        Ok(Some(p)) => PolicyApprovers::Found(
                            p.spec.approval.map(|a| a.approvers).unwrap_or_default(),
                        ),
                        Ok(None) => PolicyApprovers::Missing,
                        Err(e) => {
                            return crate::admission::deny(format!(
                                "reading policy {ns}/{} failed ({e}); refused",
                                old.spec.policy
                            ))
                        }
                    }
                }
                None => PolicyApprovers::Missing,
            };
            let lookup = move |_: &str, _: &str| approvers.clone();
            let v = admission::validate(
                &r,
                &Checks {
                    operator: &self.operator,
                    approvers: &lookup,
                    now: Timestamp::now(),
                },
            );
            if let Some(m) = &v.message {
                tracing::info!(user = r.user_info.username.as_deref().unwrap_or(""), operation = %r.operation, "approval request change refused: {m}");
            }
            response(&v)
        })
    }
}

/// The two routes for the admission server.
pub fn routes(client: Client, operator: String) -> Vec<(&'static str, Arc<dyn Webhook>)> {
    vec![
        (APPROVALS_MUTATE_PATH, Arc::new(Mutate) as Arc<dyn Webhook>),
        (
            APPROVALS_VALIDATE_PATH,
            Arc::new(Validate { client, operator }),
        ),
    ]
}
