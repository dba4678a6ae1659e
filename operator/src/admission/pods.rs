//! `/inject` and `/guard`: the pure decisions of [`inject`](super::inject)
//! and [`guard`](super::guard) with what they need from the cluster (the
//! namespace's labels, which an AdmissionReview does not carry) and the CA
//! in force.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Namespace;
use kube::{Api, Client};
use serde_json::Value;
use tokio::sync::watch;
use tracing::{debug, info};

use super::guard::{guard, Change, GuardSettings};
use super::inject::{inject, Decision, InjectSettings};
use super::{allow, allow_patched, deny, BoxFuture, Webhook};
use crate::certs::ServingCert;

/// What both pod webhooks share.
pub struct Pods {
    client: Client,
    settings: InjectSettings,
    operator_namespace: String,
    tls_secret: String,
    cert: watch::Receiver<Arc<ServingCert>>,
}

impl Pods {
    pub fn new(
        client: Client,
        settings: InjectSettings,
        operator_namespace: String,
        tls_secret: String,
        cert: watch::Receiver<Arc<ServingCert>>,
    ) -> Arc<Pods> {
        Arc::new(Pods {
            client,
            settings,
            operator_namespace,
            tls_secret,
            cert,
        })
    }

    fn settings(&self) -> InjectSettings {
        let mut s = self.settings.clone();
        s.ca_pem = self.cert.borrow().ca_pem.clone();
        s
    }

    /// The namespace's labels. An error refuses the pod: deciding the
    /// opt-in without them could start an opted-in pod unguarded.
    async fn ns_labels(&self, ns: &str) -> Result<BTreeMap<String, String>, String> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        match api.get_opt(ns).await {
            Ok(Some(n)) => Ok(n.metadata.labels.unwrap_or_default()),
            Ok(None) => Ok(BTreeMap::new()),
            Err(e) => Err(format!(
                "pgwarden could not read namespace {ns}'s labels to decide injection ({e}); retry"
            )),
        }
    }
}

/// The request fields the pod webhooks read.
fn fields(r: &Value) -> (&str, &str, Option<&str>, &str) {
    (
        r["kind"]["kind"].as_str().unwrap_or_default(),
        r["operation"].as_str().unwrap_or_default(),
        r["subResource"].as_str().filter(|s| !s.is_empty()),
        r["namespace"].as_str().unwrap_or_default(),
    )
}

/// The mutating webhook.
pub struct Inject(pub Arc<Pods>);

impl Webhook for Inject {
    fn review<'a>(&'a self, r: &'a Value) -> BoxFuture<'a, Value> {
        Box::pin(async move {
            let (kind, op, sub, ns) = fields(r);
            if kind != "Pod" || op != "CREATE" || sub.is_some() {
                return allow();
            }
            let labels = match self.0.ns_labels(ns).await {
                Ok(l) => l,
                Err(msg) => return deny(msg),
            };
            match inject(&r["object"], &labels, &self.0.settings()) {
                Decision::Skip(why) => {
                    debug!(namespace = ns, reason = ?why, "not injected");
                    allow()
                }
                Decision::Patch(ops) => {
                    if !ops.is_empty() {
                        info!(namespace = ns, ops = ops.len(), "injecting the sidecar");
                    }
                    allow_patched(&ops)
                }
                Decision::Refuse(msg) => {
                    info!(namespace = ns, "refused injection: {msg}");
                    deny(msg)
                }
            }
        })
    }
}

/// The validating webhook.
pub struct Guard(pub Arc<Pods>);

impl Webhook for Guard {
    fn review<'a>(&'a self, r: &'a Value) -> BoxFuture<'a, Value> {
        Box::pin(async move {
            let (kind, op, sub, ns) = fields(r);
            if kind != "Pod" {
                return allow();
            }
            let change = match (op, sub) {
                ("CREATE", None) => Change::Create,
                ("UPDATE", None | Some("ephemeralcontainers")) => Change::Update {
                    old: &r["oldObject"],
                    subresource: sub,
                },
                _ => return allow(),
            };
            let labels = match self.0.ns_labels(ns).await {
                Ok(l) => l,
                Err(msg) => return deny(msg),
            };
            let settings = GuardSettings {
                inject: self.0.settings(),
                operator_namespace: self.0.operator_namespace.clone(),
                tls_secret: self.0.tls_secret.clone(),
            };
            match guard(&r["object"], ns, &labels, change, &settings) {
                Ok(()) => allow(),
                Err(msg) => {
                    info!(namespace = ns, operation = op, "pod guard refused: {msg}");
                    deny(msg)
                }
            }
        })
    }
}
