//! What the cluster holds that a sidecar's configuration is made of:
//! DatabaseAccessPolicies, Secrets and pods, kept by reflectors (one watch per
//! kind for the whole replica, never one per sidecar), and the pure function
//! that turns them into the snapshot a pod is owed.
//!
//! Wakeups are per namespace for policies and Secrets (a `watch` channel
//! each, no polling) and per pod for pods; a woken stream recomputes its own
//! snapshot and sends only if the content changed. A policy only ever selects pods of its own namespace, so
//! nothing outside it can change a pod's snapshot.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use pgwarden_api::{
    DatabaseAccessPolicy, SecretBytes, SecretString, SnapshotCredential, SnapshotPolicy,
};
use tokio::sync::watch;

/// The keys a snapshot carries, held by the operator (`keys`).
pub trait KeySource: Send + Sync {
    /// Key of the `Hash` masking strategy, the same for every pod.
    fn masking_key(&self) -> Option<SecretBytes>;
    /// Key of one policy's approval fingerprints.
    fn fingerprint_key(&self, namespace: &str, policy: &str) -> Option<SecretBytes>;
}

impl KeySource for crate::keys::Keys {
    fn masking_key(&self) -> Option<SecretBytes> {
        Some(crate::keys::Keys::masking_key(self))
    }
    fn fingerprint_key(&self, namespace: &str, policy: &str) -> Option<SecretBytes> {
        Some(crate::keys::Keys::fingerprint_key(self, namespace, policy))
    }
}

/// Whether a `podSelector` selects a pod with these labels. An absent
/// selector selects every injected pod of the namespace; an empty one too
/// (as in Kubernetes). A selector that cannot be read selects nothing.
pub fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    match Selector::try_from(selector.clone()) {
        Ok(s) => s.matches(labels),
        Err(_) => false,
    }
}

/// One policy as it went into a snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub policy: SnapshotPolicy,
    pub generation: i64,
}

/// Why a selected policy could not be resolved (it is left out, or its last
/// good resolution is kept). Names fields and Secrets, never values.
pub type Unresolved = String;

/// The policies that select `pod`, each resolved with its Secrets and keys
/// (pure: the objects are passed in). Sorted by name.
pub fn resolve_for_pod(
    pod: &Pod,
    policies: &[Arc<DatabaseAccessPolicy>],
    secret: &dyn Fn(&str, &str) -> Option<Arc<Secret>>,
    keys: &dyn KeySource,
) -> BTreeMap<String, Result<Resolved, Unresolved>> {
    let ns = pod.namespace().unwrap_or_default();
    let labels = pod.labels();
    policies
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(ns.as_str()))
        .filter(|p| selects(p.spec.pod_selector.as_ref(), labels))
        .map(|p| {
            let name = p.name_any();
            let resolved = resolve(p, &|name| secret(&ns, name), keys);
            (name, resolved)
        })
        .collect()
}

fn resolve(
    p: &DatabaseAccessPolicy,
    secret: &dyn Fn(&str) -> Option<Arc<Secret>>,
    keys: &dyn KeySource,
) -> Result<Resolved, Unresolved> {
    let ns = p.namespace().unwrap_or_default();
    let name = p.name_any();
    if let Some(e) = p.spec.validate().into_iter().next() {
        return Err(format!("invalid: {}: {}", e.path, e.message));
    }
    let db = &p.spec.database;
    let value = |field: &str, secret_name: &str, key: &str| -> Result<String, Unresolved> {
        let s = secret(secret_name)
            .ok_or_else(|| format!("{field}: Secret {ns}/{secret_name} not found"))?;
        secret_value(&s, key).ok_or_else(|| {
            format!("{field}: Secret {ns}/{secret_name} has no key {key:?} (or it is not UTF-8)")
        })
    };
    let f = "spec.database.credentialsSecret";
    let credential = SnapshotCredential {
        username: value(f, &db.credentials_secret, "username")?,
        password: SecretString(value(f, &db.credentials_secret, "password")?),
    };
    let ca_pem =
        match &db.tls {
            Some(tls) => match (&tls.ca_secret, &tls.ca_file) {
                (Some(ca), _) => Some(value("spec.database.tls.caSecret", ca, "ca.crt")?),
                // The sidecar has no files of the policy's author.
                (None, Some(_)) => return Err(
                    "spec.database.tls.caFile: a file exists only in standalone mode; use caSecret"
                        .into(),
                ),
                (None, None) => None,
            },
            None => None,
        };
    let recording_dsn = match p
        .spec
        .recording
        .as_ref()
        .and_then(|r| r.store.as_ref())
        .and_then(|s| s.postgres.as_ref())
    {
        Some(pg) => Some(SecretString(value(
            "spec.recording.store.postgres.dsnSecret",
            &pg.dsn_secret,
            "dsn",
        )?)),
        None => None,
    };
    Ok(Resolved {
        generation: p.metadata.generation.unwrap_or(0),
        policy: SnapshotPolicy {
            fingerprint_key: keys.fingerprint_key(&ns, &name),
            namespace: ns,
            name,
            spec: p.spec.clone(),
            credential,
            ca_pem,
            recording_dsn,
            source: None,
        },
    })
}

fn secret_value(s: &Secret, key: &str) -> Option<String> {
    if let Some(bytes) = s.data.as_ref().and_then(|d| d.get(key)) {
        return String::from_utf8(bytes.0.clone()).ok();
    }
    s.string_data.as_ref()?.get(key).cloned()
}

/// The policies a pod gets now: what resolved, and for what did not, the
/// resolution it was last sent (so deleting a Secret or a bad edit leaves
/// the sidecar on its last good credential instead of dropping the policy).
/// A policy that no longer selects the pod, or was deleted, is gone.
pub fn compose(
    now: BTreeMap<String, Result<Resolved, Unresolved>>,
    last_sent: &BTreeMap<String, Resolved>,
) -> BTreeMap<String, Resolved> {
    now.into_iter()
        .filter_map(|(name, r)| match r {
            Ok(r) => Some((name, r)),
            Err(_) => last_sent.get(&name).cloned().map(|r| (name, r)),
        })
        .collect()
}

/// The Secret keys a snapshot reads; the rest is never stored.
const SECRET_KEYS: [&str; 4] = ["username", "password", "ca.crt", "dsn"];

/// What the index keeps of a Secret: its name and the keys a snapshot
/// reads. A cluster's other Secrets (Helm releases, TLS material) would
/// otherwise all sit in the operator's memory.
fn trim_secret(s: &mut Secret) {
    s.metadata.managed_fields = None;
    s.metadata.annotations = None;
    s.metadata.labels = None;
    if let Some(data) = s.data.as_mut() {
        data.retain(|k, _| SECRET_KEYS.contains(&k.as_str()));
    }
    s.string_data = None;
}

/// What the index keeps of a pod: metadata for selection and injection,
/// and the service account.
fn trim_pod(p: &mut Pod) {
    p.metadata.managed_fields = None;
    p.status = None;
    let service_account = p.spec.as_ref().and_then(|s| s.service_account_name.clone());
    p.spec = Some(k8s_openapi::api::core::v1::PodSpec {
        service_account_name: service_account,
        ..Default::default()
    });
}

/// Whom a change wakes: the streams of a namespace (a policy or a Secret
/// may matter to any of its pods), or of the one pod that changed (its
/// sidecar's ACK annotation must not wake every stream of the namespace).
#[derive(Clone, Copy, Debug)]
enum Wake {
    Namespace,
    Object,
}

/// The wakeup key of one pod (`/` occurs in no namespace or pod name).
pub fn pod_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// One scope's stores: all namespaces, or one.
struct Stores {
    policies: Store<DatabaseAccessPolicy>,
    secrets: Store<Secret>,
    pods: Store<Pod>,
}

/// The reflectors' stores and the per-namespace wakeups.
pub struct Index {
    /// `None`: every namespace; else one entry per watched namespace (the
    /// operator's RBAC may cover only those).
    scopes: Vec<(Option<String>, Stores)>,
    wakers: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index").finish_non_exhaustive()
    }
}

impl Index {
    /// Starts the watches (policies, Secrets, pods) on the current runtime:
    /// cluster-wide when `namespaces` is empty, else per namespace. The
    /// index is usable at once; [`Index::ready`] waits for the first lists.
    pub fn start(client: Client, namespaces: &[String]) -> Arc<Index> {
        let scopes: Vec<Option<String>> = if namespaces.is_empty() {
            vec![None]
        } else {
            namespaces.iter().cloned().map(Some).collect()
        };
        let mut writers = Vec::new();
        let mut stores = Vec::new();
        for scope in scopes {
            let (policies, pw) = reflector::store();
            let (secrets, sw) = reflector::store();
            let (pods, podw) = reflector::store();
            writers.push((scope.clone(), pw, sw, podw));
            stores.push((
                scope,
                Stores {
                    policies,
                    secrets,
                    pods,
                },
            ));
        }
        let index = Arc::new(Index {
            scopes: stores,
            wakers: Mutex::default(),
        });
        for (scope, pw, sw, podw) in writers {
            fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
            where
                K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
                K::DynamicType: Default,
            {
                match ns {
                    Some(ns) => Api::namespaced(client.clone(), ns),
                    None => Api::all(client.clone()),
                }
            }
            let ns = scope.as_deref();
            let cfg = watcher::Config::default;
            let i = index.clone();
            let s = watcher(api::<DatabaseAccessPolicy>(&client, ns), cfg())
                .default_backoff()
                .reflect(pw);
            tokio::spawn(async move { i.follow(s, Wake::Namespace).await });
            let i = index.clone();
            let s = watcher(api::<Secret>(&client, ns), cfg())
                .default_backoff()
                .modify(trim_secret)
                .reflect(sw);
            tokio::spawn(async move { i.follow(s, Wake::Namespace).await });
            let i = index.clone();
            let s = watcher(api::<Pod>(&client, ns), cfg())
                .default_backoff()
                .modify(trim_pod)
                .reflect(podw);
            tokio::spawn(async move { i.follow(s, Wake::Object).await });
        }
        index
    }

    /// The stores that hold `namespace`, if it is watched.
    fn stores(&self, namespace: &str) -> Option<&Stores> {
        self.scopes
            .iter()
            .find(|(scope, _)| scope.as_deref().is_none_or(|s| s == namespace))
            .map(|(_, s)| s)
    }

    async fn follow<K: kube::Resource>(
        &self,
        stream: impl futures_util::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
        wake: Wake,
    ) {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => {
                    let ns = o.meta().namespace.as_deref().unwrap_or("");
                    match wake {
                        Wake::Namespace => self.wake(ns),
                        Wake::Object => {
                            self.wake(&pod_key(ns, o.meta().name.as_deref().unwrap_or("")))
                        }
                    }
                }
                // A relist may have changed anything (missed deletes too).
                Ok(watcher::Event::InitDone) => self.wake_all(),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "watch failed; retrying"),
            }
        }
    }

    /// Waits until every store holds its first full list.
    pub async fn ready(&self) {
        for (_, s) in &self.scopes {
            let _ = s.policies.wait_until_ready().await;
            let _ = s.secrets.wait_until_ready().await;
            let _ = s.pods.wait_until_ready().await;
        }
    }

    /// Changes whenever a policy or Secret of `namespace` changes (with
    /// `namespace/pod`: whenever that pod changes).
    pub fn subscribe(&self, namespace: &str) -> watch::Receiver<u64> {
        let mut wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        wakers
            .entry(namespace.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    pub fn wake(&self, namespace: &str) {
        let mut wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = wakers.get(namespace) {
            if tx.receiver_count() == 0 {
                wakers.remove(namespace);
            } else {
                tx.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }

    fn wake_all(&self) {
        let mut wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        wakers.retain(|_, tx| tx.receiver_count() > 0);
        for tx in wakers.values() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// The pod as the watch last saw it.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.stores(namespace)?
            .pods
            .get(&ObjectRef::new(name).within(namespace))
    }

    /// The policies `pod` is owed now (see [`resolve_for_pod`]).
    pub fn resolve(
        &self,
        pod: &Pod,
        keys: &dyn KeySource,
    ) -> BTreeMap<String, Result<Resolved, Unresolved>> {
        let ns = pod.namespace().unwrap_or_default();
        // An unwatched namespace has no policies for its pods.
        let Some(stores) = self.stores(&ns) else {
            return BTreeMap::new();
        };
        let policies = stores
            .policies
            .state_filter(|p| p.namespace().as_deref() == Some(ns.as_str()));
        let secret = |ns: &str, name: &str| stores.secrets.get(&ObjectRef::new(name).within(ns));
        resolve_for_pod(pod, &policies, &secret, keys)
    }
}

#[cfg(test)]
mod tests;
