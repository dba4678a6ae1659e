//! Which sidecars are connected to this replica and which configuration each
//! has acknowledged. The stream writes it (connect, send, ACK/NACK,
//! disconnect); the policy controller reads it for `appliedSidecars` and NACK
//! errors, and the metrics read the counts.
//!
//! Each replica knows only its own streams. The leader's controller would
//! miss sidecars connected to other replicas, so a replica also publishes its
//! view (see `controller`); this type is the per-replica truth.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;

/// A pod by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

/// A policy at one generation, as it went out in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PolicyAt {
    pub name: String,
    pub generation: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SidecarState {
    /// Streams open for this pod (a reconnect may overlap the old stream).
    pub streams: u32,
    /// The last snapshot sent: its version and the policies it held.
    pub sent: Option<(u64, Vec<PolicyAt>)>,
    /// The policies of the last snapshot the sidecar acknowledged.
    pub applied: Vec<PolicyAt>,
    pub acked_version: Option<u64>,
    /// The last refusal: version and the sidecar's error.
    pub nack: Option<(u64, String)>,
}

#[derive(Debug)]
pub struct Sidecars {
    pods: Mutex<HashMap<PodKey, SidecarState>>,
    /// Bumped on every change, so a controller can re-reconcile.
    changed: watch::Sender<u64>,
}

impl Default for Sidecars {
    fn default() -> Self {
        Sidecars {
            pods: Mutex::default(),
            changed: watch::channel(0).0,
        }
    }
}

impl Sidecars {
    fn update(&self, pod: &PodKey, f: impl FnOnce(&mut SidecarState)) {
        {
            let mut pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
            let state = pods.entry(pod.clone()).or_default();
            f(state);
            if state.streams == 0 && state.sent.is_none() {
                pods.remove(pod);
            }
        }
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn connected(&self, pod: &PodKey) {
        self.update(pod, |s| s.streams += 1);
    }

    /// A stream ended. The pod's record goes with its last stream: a sidecar
    /// that is gone has applied nothing.
    pub fn disconnected(&self, pod: &PodKey) {
        self.update(pod, |s| {
            s.streams = s.streams.saturating_sub(1);
            if s.streams == 0 {
                *s = SidecarState::default();
            }
        });
    }

    pub fn sent(&self, pod: &PodKey, version: u64, policies: Vec<PolicyAt>) {
        self.update(pod, |s| s.sent = Some((version, policies)));
    }

    /// An ACK counts only for the snapshot last sent: a late ACK of an older
    /// version must not mark the current generation applied.
    pub fn acked(&self, pod: &PodKey, version: u64) {
        self.update(pod, |s| {
            if let Some((sent, policies)) = &s.sent {
                if *sent == version {
                    s.applied = policies.clone();
                    s.acked_version = Some(version);
                    s.nack = None;
                }
            }
        });
    }

    pub fn nacked(&self, pod: &PodKey, version: u64, error: String) {
        self.update(pod, |s| s.nack = Some((version, error)));
    }

    /// Pods in `namespace` whose acknowledged snapshot holds `policy` at
    /// `generation`, sorted.
    pub fn applied(&self, namespace: &str, policy: &str, generation: i64) -> Vec<String> {
        let pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<String> = pods
            .iter()
            .filter(|(k, s)| {
                k.namespace == namespace
                    && s.streams > 0
                    && s.applied
                        .iter()
                        .any(|p| p.name == policy && p.generation == generation)
            })
            .map(|(k, _)| k.name.clone())
            .collect();
        names.sort();
        names
    }

    /// `(pod, error)` for connected pods in `namespace` that refused a
    /// snapshot holding `policy`, sorted by pod.
    pub fn rejected(&self, namespace: &str, policy: &str) -> Vec<(String, String)> {
        let pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(String, String)> = pods
            .iter()
            .filter(|(k, s)| k.namespace == namespace && s.streams > 0)
            .filter_map(|(k, s)| {
                let (version, error) = s.nack.as_ref()?;
                let (sent, policies) = s.sent.as_ref()?;
                (sent == version && policies.iter().any(|p| p.name == policy))
                    .then(|| (k.name.clone(), error.clone()))
            })
            .collect();
        out.sort();
        out
    }

    /// Pods with at least one open stream.
    pub fn connected_count(&self) -> usize {
        let pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        pods.values().filter(|s| s.streams > 0).count()
    }

    pub fn get(&self, pod: &PodKey) -> Option<SidecarState> {
        let pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        pods.get(pod).cloned()
    }

    /// Changes with every update.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> PodKey {
        PodKey {
            namespace: "ci".into(),
            name: name.into(),
        }
    }

    fn at(name: &str, generation: i64) -> PolicyAt {
        PolicyAt {
            name: name.into(),
            generation,
        }
    }

    #[test]
    fn applied_needs_an_ack_of_the_snapshot_last_sent() {
        let s = Sidecars::default();
        s.connected(&pod("a"));
        s.sent(&pod("a"), 1, vec![at("p", 1)]);
        assert!(s.applied("ci", "p", 1).is_empty(), "sent is not applied");
        s.acked(&pod("a"), 1);
        assert_eq!(s.applied("ci", "p", 1), ["a"]);
        // The policy changed; the pod still runs generation 1 until it ACKs 2.
        s.sent(&pod("a"), 2, vec![at("p", 2)]);
        assert!(s.applied("ci", "p", 2).is_empty());
        s.acked(&pod("a"), 1); // a late ACK of the old version
        assert!(s.applied("ci", "p", 2).is_empty());
        s.acked(&pod("a"), 2);
        assert_eq!(s.applied("ci", "p", 2), ["a"]);
        assert!(s.applied("other", "p", 2).is_empty());
    }

    #[test]
    fn a_nack_is_reported_until_a_later_ack_and_a_gone_pod_counts_for_nothing() {
        let s = Sidecars::default();
        let rx = s.subscribe();
        s.connected(&pod("a"));
        s.sent(&pod("a"), 3, vec![at("p", 4)]);
        s.nacked(&pod("a"), 3, "bad CA".into());
        assert_eq!(
            s.rejected("ci", "p"),
            [("a".to_string(), "bad CA".to_string())]
        );
        assert!(s.rejected("ci", "q").is_empty());
        s.acked(&pod("a"), 3);
        assert!(s.rejected("ci", "p").is_empty());
        assert_eq!(s.connected_count(), 1);
        s.disconnected(&pod("a"));
        assert_eq!(s.connected_count(), 0);
        assert!(s.applied("ci", "p", 4).is_empty());
        assert!(s.get(&pod("a")).is_none());
        assert!(rx.has_changed().unwrap());
    }

    #[test]
    fn overlapping_streams_keep_the_pod_until_the_last_closes() {
        let s = Sidecars::default();
        s.connected(&pod("a"));
        s.connected(&pod("a"));
        s.sent(&pod("a"), 1, vec![at("p", 1)]);
        s.acked(&pod("a"), 1);
        s.disconnected(&pod("a"));
        assert_eq!(s.applied("ci", "p", 1), ["a"]);
        s.disconnected(&pod("a"));
        assert!(s.applied("ci", "p", 1).is_empty());
    }
}
