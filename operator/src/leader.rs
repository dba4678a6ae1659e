//! Leader election on a coordination.k8s.io Lease: one replica runs the
//! controllers that write (DESIGN §4); every replica serves streams.
//!
//! The algorithm is client-go's: a replica reads the Lease, and takes or
//! renews it with an update conditioned on the `resourceVersion` it read, so
//! of two replicas racing only one update succeeds (the other gets 409).
//! Expiry is judged on this replica's clock from when it last saw the record
//! change, never by comparing another node's `renewTime` with ours, so clock
//! skew between nodes cannot hand the lease to two holders. A leader that
//! cannot renew steps down (stops its controller) at the renew deadline,
//! before anyone else may consider the lease expired.
//!
//! Why not kube-lease-manager: it takes a free lease with a server-side
//! apply whose conflict detection on field managers is what makes racing
//! replicas safe; an optimistic-concurrency update gives the same guarantee
//! with only GET and PUT, which every API server (and the test API server,
//! which has no server-side apply) serves.
//!
//! A follower watches the Lease, so when the leader releases it on shutdown
//! the follower takes over at once rather than at its next poll.

use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// The operator's own namespace.
    pub namespace: String,
    pub name: String,
    /// Unique per process: two replicas with one identity would both lead.
    pub identity: String,
    /// How long a lease lasts after its last renewal.
    pub duration: Duration,
}

impl LeaseSettings {
    /// How often the leader renews (client-go's default ratio 2 s : 15 s is
    /// closer to a fifth; a third keeps API load low and still leaves two
    /// renewal attempts before the deadline).
    pub fn renew_every(&self) -> Duration {
        self.duration / 3
    }

    /// A leader that has not renewed for this long stops leading; others
    /// take over only after the full duration, so the two never overlap.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// How often a follower re-reads the lease besides watching it.
    fn retry_every(&self) -> Duration {
        self.duration / 3
    }
}

/// The lease record as one replica last saw it, and when (its clock) it
/// last changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub holder: Option<String>,
    pub renew_time: Option<String>,
    pub duration: Duration,
    pub changed_at: Instant,
}

impl Observed {
    /// Records `lease` as seen at `now`, keeping the earlier time if the
    /// record is the one seen before.
    pub fn update(
        previous: Option<&Observed>,
        lease: &Lease,
        default: Duration,
        now: Instant,
    ) -> Observed {
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.filter(|h| !h.is_empty());
        let renew_time = spec.renew_time.map(|t| t.0.to_string());
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(default);
        let changed_at = match previous {
            Some(p) if p.holder == holder && p.renew_time == renew_time => p.changed_at,
            _ => now,
        };
        Observed {
            holder,
            renew_time,
            duration,
            changed_at,
        }
    }
}

/// What to do with the lease as observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// We hold it: renew.
    Renew,
    /// Free or expired: take it.
    Acquire,
    /// Another replica holds it, for at most this long unless renewed.
    Follow {
        holder: String,
        expires_in: Duration,
    },
}

/// Pure: the next step for replica `me`.
pub fn decide(me: &str, seen: &Observed, now: Instant) -> Step {
    match &seen.holder {
        Some(h) if h == me => Step::Renew,
        None => Step::Acquire,
        Some(h) => {
            let expires = seen.changed_at + seen.duration;
            if now >= expires {
                Step::Acquire
            } else {
                Step::Follow {
                    holder: h.clone(),
                    expires_in: expires - now,
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("Lease {namespace}/{name}: {source}")]
pub struct LeaseError {
    namespace: String,
    name: String,
    #[source]
    source: Box<kube::Error>,
}

pub struct Election {
    api: Api<Lease>,
    settings: LeaseSettings,
}

impl Election {
    pub fn new(client: kube::Client, settings: LeaseSettings) -> Election {
        Election {
            api: Api::namespaced(client, &settings.namespace),
            settings,
        }
    }

    fn err(&self, source: kube::Error) -> LeaseError {
        LeaseError {
            namespace: self.settings.namespace.clone(),
            name: self.settings.name.clone(),
            source: Box::new(source),
        }
    }

    /// Campaigns until `shutdown` turns true, publishing whether this replica
    /// leads on `leading`. Does not release the lease: the caller stops the
    /// work it guards first, then calls [`Election::release`].
    pub async fn run(&self, leading: &watch::Sender<bool>, mut shutdown: watch::Receiver<bool>) {
        let changed = std::sync::Arc::new(Notify::new());
        let watch_task = tokio::spawn(watch_lease(
            self.api.clone(),
            self.settings.name.clone(),
            changed.clone(),
        ));
        let mut seen: Option<Observed> = None;
        let mut renewed_at: Option<Instant> = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            match self.attempt(&mut seen).await {
                Ok(true) => renewed_at = Some(Instant::now()),
                Ok(false) => renewed_at = None,
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: reading or updating the lease failed")
                }
            }
            let lead = renewed_at.is_some_and(|t| t.elapsed() < self.settings.renew_deadline());
            if *leading.borrow() != lead {
                match lead {
                    true => tracing::info!(lease.holder = %self.settings.identity, "leading"),
                    false => tracing::info!("not leading"),
                }
                leading.send_replace(lead);
            }
            let wait = match lead {
                true => self.settings.renew_every(),
                false => self.settings.retry_every(),
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = changed.notified(), if !lead => {}
                _ = shutdown.changed() => {}
            }
        }
        watch_task.abort();
    }

    /// One read-decide-write round. `Ok(true)`: we hold the lease now.
    async fn attempt(&self, seen: &mut Option<Observed>) -> Result<bool, LeaseError> {
        let s = &self.settings;
        let now = Instant::now();
        let Some(lease) = self.api.get_opt(&s.name).await.map_err(|e| self.err(e))? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(s.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.held_spec(None, true)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.is_already_exists() => Ok(false),
                Err(e) => Err(self.err(e)),
            };
        };
        let observed = Observed::update(seen.as_ref(), &lease, s.duration, now);
        let step = decide(&s.identity, &observed, now);
        *seen = Some(observed);
        let acquire = match step {
            Step::Renew => false,
            Step::Acquire => true,
            Step::Follow { .. } => return Ok(false),
        };
        let mut next = lease.clone();
        next.spec = Some(self.held_spec(lease.spec.as_ref(), acquire));
        // `next` carries the resourceVersion read: a concurrent writer makes
        // this a 409, and the round is lost.
        match self
            .api
            .replace(&s.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.is_conflict() => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }

    fn held_spec(&self, old: Option<&LeaseSpec>, acquire: bool) -> LeaseSpec {
        let now = MicroTime(jiff::Timestamp::now());
        let old = old.cloned().unwrap_or_default();
        let transitions = old.lease_transitions.unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.settings.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.settings.duration.as_secs().max(1)).unwrap_or(i32::MAX),
            ),
            acquire_time: if acquire {
                Some(now.clone())
            } else {
                old.acquire_time
            },
            renew_time: Some(now),
            lease_transitions: Some(if acquire && old.holder_identity.is_some() {
                transitions.saturating_add(1)
            } else {
                transitions
            }),
            ..old
        }
    }

    /// Gives the lease up if this replica holds it, so another takes over at
    /// once instead of after the lease duration.
    pub async fn release(&self) -> Result<(), LeaseError> {
        let s = &self.settings;
        let Some(mut lease) = self.api.get_opt(&s.name).await.map_err(|e| self.err(e))? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(s.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        match self
            .api
            .replace(&s.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                tracing::info!("released the lease");
                Ok(())
            }
            // Someone else wrote it first: it is no longer ours to release.
            Err(kube::Error::Api(e)) if e.is_conflict() => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }
}

/// Wakes the campaign whenever the Lease changes (a release, a new holder).
async fn watch_lease(api: Api<Lease>, name: String, changed: std::sync::Arc<Notify>) {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    // Backoff: a watch that keeps failing (RBAC, API down) must not spin.
    let mut events = std::pin::pin!(watcher(api, config).default_backoff());
    while let Some(event) = events.next().await {
        if event.is_ok() {
            changed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renew: &str, secs: i32) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                renew_time: Some(MicroTime(renew.parse().unwrap())),
                lease_duration_seconds: Some(secs),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        }
    }

    #[test]
    fn a_held_lease_expires_by_the_local_clock_from_its_last_change() {
        let t0 = Instant::now();
        let d = Duration::from_secs(15);
        let l = lease(Some("a"), "2025-01-01T00:00:00Z", 15);
        let seen = Observed::update(None, &l, d, t0);
        assert_eq!(decide("a", &seen, t0), Step::Renew);
        assert_eq!(
            decide("b", &seen, t0 + Duration::from_secs(5)),
            Step::Follow {
                holder: "a".into(),
                expires_in: Duration::from_secs(10)
            }
        );
        // The same record seen again later keeps its first sighting: a
        // leader that stopped renewing expires 15 s after b first saw it,
        // whatever the renewTime says (clocks may disagree).
        let later = Observed::update(Some(&seen), &l, d, t0 + Duration::from_secs(14));
        assert_eq!(later.changed_at, t0);
        assert_eq!(
            decide("b", &later, t0 + Duration::from_secs(15)),
            Step::Acquire
        );
        // A renewal resets the clock.
        let renewed = lease(Some("a"), "2025-01-01T00:00:05Z", 15);
        let again = Observed::update(Some(&later), &renewed, d, t0 + Duration::from_secs(15));
        assert!(matches!(
            decide("b", &again, t0 + Duration::from_secs(16)),
            Step::Follow { .. }
        ));
    }

    #[test]
    fn a_released_or_empty_lease_is_taken_at_once() {
        let t0 = Instant::now();
        let d = Duration::from_secs(15);
        for holder in [None, Some("")] {
            let seen = Observed::update(None, &lease(holder, "2025-01-01T00:00:00Z", 1), d, t0);
            assert_eq!(decide("b", &seen, t0), Step::Acquire);
        }
        let empty = Observed::update(None, &Lease::default(), d, t0);
        assert_eq!(empty.duration, d);
        assert_eq!(decide("b", &empty, t0), Step::Acquire);
    }

    #[test]
    fn a_leader_steps_down_before_a_follower_may_take_over() {
        let s = LeaseSettings {
            namespace: "ns".into(),
            name: "l".into(),
            identity: "a".into(),
            duration: Duration::from_secs(15),
        };
        assert!(s.renew_every() < s.renew_deadline());
        assert!(s.renew_deadline() < s.duration);
    }
}
