//! The DatabaseAccessPolicy controller (DESIGN §4): `validate()`, the
//! Secrets a policy names, the injected pods it selects and what their
//! sidecars applied → `status` and Events. Runs on the leader only.
//!
//! [`decide`] is the whole decision, pure (objects in, status and Events
//! out); [`reconcile`] only reads what it needs and writes what changed.
//! Secret and pod watches map each change back to the policies it touches,
//! so a Secret edit re-reconciles every policy that names it.
//!
//! `appliedSidecars` is counted from the pods' `pgwarden.io/config-applied`
//! annotation, which the replica holding a pod's stream writes after an ACK:
//! sidecars connected to any replica count, not only the leader's.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{ListParams, Patch, PatchParams};
use kube::core::Selector;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{watcher, Controller};
use kube::{Api, Client, Resource, ResourceExt};
use pgwarden_api::stream::{
    AppliedAnnotation, ErrorAnnotation, CONFIG_APPLIED_ANNOTATION, CONFIG_ERROR_ANNOTATION,
};
use pgwarden_api::INJECTED_ANNOTATION;
use pgwarden_api::{DatabaseAccessPolicy, DatabaseAccessPolicySpec, DatabaseAccessPolicyStatus};

use crate::index::selects;
use crate::observe::Observe;

pub const READY: &str = "Ready";
pub const INVALID: &str = "Invalid";
pub const APPLIED: &str = "Applied";

/// The readiness gate this controller holds while it starts.
pub const READINESS_GATE: &str = "policy controller caches";

// === the decision ===

/// A Secret a policy names, where, and the keys it must hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretRef {
    pub field: &'static str,
    pub name: String,
    pub keys: &'static [&'static str],
}

/// Every Secret `spec` names, in document order.
pub fn secret_refs(spec: &DatabaseAccessPolicySpec) -> Vec<SecretRef> {
    let mut out = vec![SecretRef {
        field: "spec.database.credentialsSecret",
        name: spec.database.credentials_secret.clone(),
        keys: &["username", "password"],
    }];
    if let Some(ca) = spec.database.tls.as_ref().and_then(|t| t.ca_secret.clone()) {
        out.push(SecretRef {
            field: "spec.database.tls.caSecret",
            name: ca,
            keys: &["ca.crt"],
        });
    }
    if let Some(pg) = spec
        .recording
        .as_ref()
        .and_then(|r| r.store.as_ref())
        .and_then(|s| s.postgres.as_ref())
    {
        out.push(SecretRef {
            field: "spec.recording.store.postgres.dsnSecret",
            name: pg.dsn_secret.clone(),
            keys: &["dsn"],
        });
    }
    out.retain(|r| !r.name.is_empty());
    out
}

/// An Event to publish about the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    pub status: DatabaseAccessPolicyStatus,
    pub events: Vec<Note>,
}

/// Pure: the status `policy` should have given the Secrets of its namespace
/// that it names (`secrets`, by name; absent = not found) and the pods of its
/// namespace, and the Events that the change from its current status is
/// worth. `now` stamps conditions whose status changes.
pub fn decide(
    policy: &DatabaseAccessPolicy,
    secrets: &BTreeMap<String, Secret>,
    pods: &[Pod],
    now: jiff::Timestamp,
) -> Planned {
    let generation = policy.metadata.generation.unwrap_or(0);
    let old = policy.status.clone().unwrap_or_default();
    let cond = |type_: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        let since = old
            .conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| Time(now));
        Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            last_transition_time: since,
            observed_generation: Some(generation),
        }
    };

    let selected: Vec<&Pod> = pods
        .iter()
        .filter(|p| is_live_injected(p) && selects(policy.spec.pod_selector.as_ref(), p.labels()))
        .collect();
    let name = policy.name_any();
    let applied = selected
        .iter()
        .filter(|p| applied_generation(p, &name) == Some(generation))
        .count();

    let mut conditions = Vec::new();
    let errors = policy.spec.validate();
    if !errors.is_empty() {
        let message = errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        conditions.push(cond(READY, false, "InvalidSpec", message.clone()));
        conditions.push(cond(INVALID, true, "InvalidSpec", message));
    } else {
        conditions.push(cond(INVALID, false, "Valid", "the spec is valid".into()));
        match check_secrets(&policy.spec, secrets) {
            Err((reason, message)) => conditions.push(cond(READY, false, reason, message)),
            Ok(()) => {
                conditions.push(cond(
                    READY,
                    true,
                    "Valid",
                    "the spec is valid and its Secrets hold the keys it needs".into(),
                ));
                conditions.push(applied_condition(&selected, applied, generation, &cond));
            }
        }
    }

    let status = DatabaseAccessPolicyStatus {
        conditions,
        observed_generation: Some(generation),
        selected_pods: Some(i32::try_from(selected.len()).unwrap_or(i32::MAX)),
        applied_sidecars: Some(i32::try_from(applied).unwrap_or(i32::MAX)),
    };
    let events = notes(&old, &status);
    Planned { status, events }
}

fn check_secrets(
    spec: &DatabaseAccessPolicySpec,
    secrets: &BTreeMap<String, Secret>,
) -> Result<(), (&'static str, String)> {
    for r in secret_refs(spec) {
        let Some(secret) = secrets.get(&r.name) else {
            return Err((
                "SecretMissing",
                format!("Secret {:?} ({}) not found", r.name, r.field),
            ));
        };
        for key in r.keys {
            let data = secret.data.as_ref().and_then(|d| d.get(*key)).map(|b| &b.0);
            let string_data = secret.string_data.as_ref().and_then(|d| d.get(*key));
            let empty = match (data, string_data) {
                (Some(b), _) => b.is_empty(),
                (None, Some(s)) => s.is_empty(),
                (None, None) => {
                    return Err((
                        "SecretKeyMissing",
                        format!("Secret {:?} ({}) has no key {key:?}", r.name, r.field),
                    ))
                }
            };
            if empty {
                return Err((
                    "SecretKeyMissing",
                    format!("Secret {:?} ({}): key {key:?} is empty", r.name, r.field),
                ));
            }
        }
    }
    Ok(())
}

fn applied_condition(
    selected: &[&Pod],
    applied: usize,
    generation: i64,
    cond: &impl Fn(&str, bool, &str, String) -> Condition,
) -> Condition {
    // A refusal newer than the pod's last ACK is the pod's current state.
    let mut refused: Vec<String> = selected
        .iter()
        .filter_map(|p| {
            let err: ErrorAnnotation = annotation(p, CONFIG_ERROR_ANNOTATION)?;
            let acked =
                annotation::<AppliedAnnotation>(p, CONFIG_APPLIED_ANNOTATION).map(|a| a.version);
            (acked.is_none_or(|v| v < err.version)).then(|| {
                format!(
                    "pod {} refused version {}: {}",
                    p.name_any(),
                    err.version,
                    err.error
                )
            })
        })
        .collect();
    refused.sort();
    if !refused.is_empty() {
        return cond(APPLIED, false, "SidecarRejected", refused.join("; "));
    }
    let n = selected.len();
    match (n, applied == n) {
        (0, _) => cond(
            APPLIED,
            true,
            "NoSelectedPods",
            "no injected pod is selected".into(),
        ),
        (_, true) => cond(
            APPLIED,
            true,
            "Applied",
            format!("all {n} selected sidecars run generation {generation}"),
        ),
        (_, false) => cond(
            APPLIED,
            false,
            "Pending",
            format!("{applied} of {n} selected sidecars run generation {generation}"),
        ),
    }
}

/// Events for what changed: a new or different problem, and becoming Ready.
fn notes(old: &DatabaseAccessPolicyStatus, new: &DatabaseAccessPolicyStatus) -> Vec<Note> {
    let get = |s: &DatabaseAccessPolicyStatus, t: &str| {
        s.conditions.iter().find(|c| c.type_ == t).cloned()
    };
    let mut out = Vec::new();
    let (old_ready, new_ready) = (get(old, READY), get(new, READY));
    let (old_applied, new_applied) = (get(old, APPLIED), get(new, APPLIED));
    if let Some(r) = &new_ready {
        let changed = old_ready
            .as_ref()
            .is_none_or(|o| o.status != r.status || o.reason != r.reason || o.message != r.message);
        match (r.status.as_str(), r.reason.as_str()) {
            ("False", reason @ ("InvalidSpec" | "SecretMissing" | "SecretKeyMissing"))
                if changed =>
            {
                let reason = match reason {
                    "InvalidSpec" => "InvalidSpec",
                    "SecretMissing" => "SecretMissing",
                    _ => "SecretKeyMissing",
                };
                out.push(Note {
                    warning: true,
                    reason,
                    message: r.message.clone(),
                });
            }
            ("True", _) if old_ready.as_ref().is_none_or(|o| o.status != "True") => {
                out.push(Note {
                    warning: false,
                    reason: "Ready",
                    message: r.message.clone(),
                })
            }
            _ => {}
        }
    }
    if let Some(a) = &new_applied {
        if a.reason == "SidecarRejected"
            && old_applied.as_ref().is_none_or(|o| o.message != a.message)
        {
            out.push(Note {
                warning: true,
                reason: "SidecarRejected",
                message: a.message.clone(),
            });
        }
    }
    out
}

/// An injected pod that has not finished (a terminating pod still runs).
fn is_live_injected(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    pod.annotations().contains_key(INJECTED_ANNOTATION)
        && !matches!(phase, Some("Succeeded" | "Failed"))
}

fn annotation<T: serde::de::DeserializeOwned>(pod: &Pod, key: &str) -> Option<T> {
    serde_json::from_str(pod.annotations().get(key)?).ok()
}

fn applied_generation(pod: &Pod, policy: &str) -> Option<i64> {
    annotation::<AppliedAnnotation>(pod, CONFIG_APPLIED_ANNOTATION)?
        .policies
        .get(policy)
        .copied()
}

// === the IO shell ===

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub observe: Arc<Observe>,
}

impl Context {
    pub fn new(client: Client, identity: &str, observe: Arc<Observe>) -> Context {
        let reporter = Reporter {
            controller: "pgwarden-operator".into(),
            instance: Some(identity.to_owned()),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            observe,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: Box<kube::Error>,
    },
}

fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ReconcileError {
    let what = what.into();
    move |source| ReconcileError::Api {
        what,
        source: Box::new(source),
    }
}

pub async fn reconcile(
    policy: Arc<DatabaseAccessPolicy>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let timer = ctx.observe.metrics.reconcile_duration.start_timer();
    let result = reconcile_inner(&policy, &ctx).await;
    timer.observe_duration();
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.observe
        .metrics
        .reconciles
        .with_label_values(&[label])
        .inc();
    result
}

async fn reconcile_inner(
    policy: &DatabaseAccessPolicy,
    ctx: &Context,
) -> Result<Action, ReconcileError> {
    let ns = policy.namespace().unwrap_or_default();
    let name = policy.name_any();

    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut secrets = BTreeMap::new();
    for r in secret_refs(&policy.spec) {
        if secrets.contains_key(&r.name) {
            continue;
        }
        let got = secrets_api
            .get_opt(&r.name)
            .await
            .map_err(api_err(format!("reading Secret {ns}/{}", r.name)))?;
        if let Some(s) = got {
            secrets.insert(r.name.clone(), s);
        }
    }
    // Only the pods the selector can match; one that cannot be read selects
    // nothing (the pure function says so too).
    let pods = match policy.spec.pod_selector.clone().map(Selector::try_from) {
        Some(Err(_)) => Vec::new(),
        selector => {
            let mut lp = ListParams::default();
            if let Some(Ok(s)) = selector {
                lp = lp.labels_from(&s);
            }
            Api::<Pod>::namespaced(ctx.client.clone(), &ns)
                .list(&lp)
                .await
                .map_err(api_err(format!("listing pods in {ns}")))?
                .items
        }
    };

    let now = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second()).unwrap_or_default();
    let planned = decide(policy, &secrets, &pods, now);
    // Only a change is written: the write itself comes back as a watch
    // event, and an unchanged status must end the loop there.
    if policy.status.as_ref() != Some(&planned.status) {
        let api: Api<DatabaseAccessPolicy> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = serde_json::json!({ "status": planned.status });
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(api_err(format!("writing status of policy {ns}/{name}")))?;
        tracing::info!(policy.namespace = %ns, policy.name = %name,
            generation = policy.metadata.generation.unwrap_or(0), "status updated");
    }
    let reference = policy.object_ref(&());
    for note in planned.events {
        let event = Event {
            type_: if note.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: note.reason.into(),
            note: Some(note.message),
            action: "Reconcile".into(),
            secondary: None,
        };
        // An Event is advice: failing to record one must not fail the status.
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(policy.namespace = %ns, policy.name = %name, error = %e, "publishing an Event failed");
        }
    }
    Ok(Action::await_change())
}

fn error_policy(
    policy: Arc<DatabaseAccessPolicy>,
    error: &ReconcileError,
    _ctx: Arc<Context>,
) -> Action {
    tracing::warn!(policy.namespace = ?policy.namespace(), policy.name = %policy.name_any(),
        error = %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

fn policies_naming(
    store: &Store<DatabaseAccessPolicy>,
    secret: &Secret,
) -> Vec<ObjectRef<DatabaseAccessPolicy>> {
    let ns = secret.namespace();
    let name = secret.name_any();
    store
        .state()
        .iter()
        .filter(|p| p.namespace() == ns && secret_refs(&p.spec).iter().any(|r| r.name == name))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// Every policy of an injected pod's namespace: one that selected the pod
/// before its labels changed must recount as much as one that selects it now.
fn policies_near(
    store: &Store<DatabaseAccessPolicy>,
    pod: &Pod,
) -> Vec<ObjectRef<DatabaseAccessPolicy>> {
    if !pod.annotations().contains_key(INJECTED_ANNOTATION) {
        return Vec::new();
    }
    let ns = pod.namespace();
    store
        .state()
        .iter()
        .filter(|p| p.namespace() == ns)
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// Runs the controller over `namespaces` (all when empty) until `shutdown`
/// resolves; reconciles in flight finish first.
pub async fn run(
    ctx: Arc<Context>,
    namespaces: Vec<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + Clone + 'static,
) {
    let client = ctx.client.clone();
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    ctx.observe.readiness.set(READINESS_GATE, false);
    let mut runs = Vec::new();
    let mut stores = Vec::new();
    for scope in scopes {
        let (policies, secrets, pods) = match &scope {
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
        };
        let controller =
            Controller::<DatabaseAccessPolicy>::new(policies, watcher::Config::default());
        let store = controller.store();
        stores.push(store.clone());
        let for_secrets = store.clone();
        let for_pods = store;
        let run = controller
            .watches::<Secret, _>(secrets, watcher::Config::default(), move |s| {
                policies_naming(&for_secrets, &s)
            })
            .watches::<Pod, _>(pods, watcher::Config::default(), move |p| {
                policies_near(&for_pods, &p)
            })
            // Coalesces a burst (a pod's status and annotation updates).
            .with_config(
                kube::runtime::controller::Config::default().debounce(Duration::from_millis(200)),
            )
            .graceful_shutdown_on(shutdown.clone())
            .run(reconcile, error_policy, ctx.clone())
            .for_each(|r| async move {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "controller");
                }
            });
        runs.push(run);
    }
    let observe = ctx.observe.clone();
    let ready = async move {
        for s in stores {
            if s.wait_until_ready().await.is_err() {
                return;
            }
        }
        observe.readiness.set(READINESS_GATE, true);
    };
    tokio::join!(futures_util::future::join_all(runs), ready);
    ctx.observe.readiness.remove(READINESS_GATE);
}

#[cfg(test)]
mod tests;
