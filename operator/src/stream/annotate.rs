//! ACK/NACK results written to the pods' annotations, off the ACK's path.
//!
//! An ACK is answered as soon as this replica has recorded it (`Sidecars`);
//! the annotation, which the leader counts every replica's sidecars by,
//! follows through a few concurrent writers. Per pod the latest result wins
//! and one write is in flight at a time, so an older result never lands
//! after a newer one. A policy change that reaches 500 sidecars then costs
//! the sidecars no wait on 500 API writes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio::sync::Notify;
use tracing::warn;

use crate::sidecars::PodKey;

/// Concurrent annotation writes (the API server's, not the sidecars', pace).
const WRITERS: usize = 16;
const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Queue {
    /// The newest annotations not yet written, per pod.
    pending: BTreeMap<PodKey, serde_json::Value>,
    in_flight: BTreeSet<PodKey>,
}

pub struct Annotator {
    queue: Mutex<Queue>,
    wake: Notify,
}

impl std::fmt::Debug for Annotator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Annotator").finish_non_exhaustive()
    }
}

impl Annotator {
    pub fn start(client: Client) -> Arc<Annotator> {
        let a = Arc::new(Annotator {
            queue: Mutex::default(),
            wake: Notify::new(),
        });
        for _ in 0..WRITERS {
            tokio::spawn(a.clone().writer(client.clone()));
        }
        a
    }

    /// Queues `annotations` (a merge patch's `metadata.annotations`) for
    /// `pod`, replacing any older result not yet written.
    pub fn record(&self, pod: PodKey, annotations: serde_json::Value) {
        self.lock().pending.insert(pod, annotations);
        self.wake.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next pod with a result to write and no write in flight.
    fn take(&self) -> Option<(PodKey, serde_json::Value)> {
        let mut q = self.lock();
        let pod = q
            .pending
            .keys()
            .find(|k| !q.in_flight.contains(*k))
            .cloned()?;
        let value = q.pending.remove(&pod)?;
        q.in_flight.insert(pod.clone());
        Some((pod, value))
    }

    fn done(&self, pod: &PodKey, retry: Option<serde_json::Value>) {
        let mut q = self.lock();
        q.in_flight.remove(pod);
        if let Some(v) = retry {
            // A newer result queued meanwhile supersedes the failed one.
            q.pending.entry(pod.clone()).or_insert(v);
        }
        let more = !q.pending.is_empty();
        drop(q);
        if more {
            self.wake.notify_one();
        }
    }

    async fn writer(self: Arc<Self>, client: Client) {
        loop {
            let Some((pod, annotations)) = self.take() else {
                self.wake.notified().await;
                continue;
            };
            let patch = serde_json::json!({"metadata": {"annotations": annotations}});
            let result = Api::<Pod>::namespaced(client.clone(), &pod.namespace)
                .patch(&pod.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
            match result {
                Ok(_) => self.done(&pod, None),
                // The pod is gone: nothing to record it on.
                Err(kube::Error::Api(e)) if e.code == 404 => self.done(&pod, None),
                Err(e) => {
                    warn!(pod = %format!("{}/{}", pod.namespace, pod.name), error = %e, "recording the ACK on the pod failed; retrying");
                    tokio::time::sleep(RETRY_AFTER).await;
                    let patch_annotations = patch["metadata"]["annotations"].clone();
                    self.done(&pod, Some(patch_annotations));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> PodKey {
        PodKey {
            namespace: "ci".into(),
            name: n.into(),
        }
    }

    fn queue_only() -> Annotator {
        Annotator {
            queue: Mutex::default(),
            wake: Notify::new(),
        }
    }

    #[test]
    fn the_newest_result_per_pod_wins_and_one_write_per_pod_is_in_flight() {
        let a = queue_only();
        a.record(key("a"), serde_json::json!({"v": 1}));
        a.record(key("a"), serde_json::json!({"v": 2}));
        let (pod, v) = a.take().unwrap();
        assert_eq!((pod.name.as_str(), v["v"].as_i64()), ("a", Some(2)));
        // A result arriving while pod a's write is in flight waits for it.
        a.record(key("a"), serde_json::json!({"v": 3}));
        a.record(key("b"), serde_json::json!({"v": 1}));
        assert_eq!(a.take().unwrap().0.name, "b");
        assert!(a.take().is_none());
        // A failed write does not overwrite the newer result queued meanwhile.
        a.done(&key("a"), Some(serde_json::json!({"v": 2})));
        assert_eq!(a.take().unwrap().1["v"].as_i64(), Some(3));
        a.done(&key("a"), None);
        // A failed write with nothing newer is retried.
        a.record(key("c"), serde_json::json!({"v": 1}));
        let (c, v) = a.take().unwrap();
        a.done(&c, Some(v));
        assert_eq!(a.take().unwrap().1["v"].as_i64(), Some(1));
    }
}
