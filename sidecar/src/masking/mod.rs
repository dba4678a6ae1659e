//! Stage 4: what leaves the proxy in a result. Masking is by column
//! identity — the table column a value came from, as RowDescription
//! reports it and the column map resolves it — never by the name a result
//! column happens to have.
//!
//! - `rules`: the policy's `masking:` entries, compiled;
//! - `strategy`: what a masked value becomes (type-aware, pure);
//! - `columns`: the column map (tables and the views over them), sans-IO;
//! - `catalog`: reading it from the database on a proxy-owned connection;
//! - `plan`: per statement, per RowDescription, per DataRow, per error.
//!
//! The relay drives it (session/relay/); this module holds no socket.

mod catalog;
pub mod columns;
pub mod detect;
pub mod plan;
pub mod rules;
pub mod strategy;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::upstream::UpstreamTarget;
use crate::wire::Limits;
pub use columns::MaskMap;
pub use plan::{MaskCtx, Refusal, RowPlan, StatementMask};
pub use rules::MaskRules;
pub use strategy::HashKey;

/// A map older than this is read again, in the background.
pub const REFRESH_EVERY: Duration = Duration::from_secs(60);
/// Refreshes asked for by a relation the map does not know: at most this often.
const MIN_REFRESH_GAP: Duration = Duration::from_secs(1);

/// One policy's masking: its rules, key and current column map.
pub struct Masking {
    pub rules: MaskRules,
    pub key: Option<HashKey>,
    target: Arc<UpstreamTarget>,
    map: RwLock<Option<Arc<MaskMap>>>,
    loading: tokio::sync::Mutex<()>,
    refresh_queued: AtomicBool,
    last_attempt: std::sync::Mutex<Option<Instant>>,
    /// Dropped with the masking: its refresher ends at once.
    alive: tokio::sync::watch::Sender<()>,
}

impl std::fmt::Debug for Masking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Masking")
            .field("rules", &self.rules)
            .finish()
    }
}

impl Masking {
    pub fn new(rules: MaskRules, key: Option<HashKey>, target: Arc<UpstreamTarget>) -> Self {
        Masking {
            rules,
            key,
            target,
            map: RwLock::new(None),
            loading: tokio::sync::Mutex::new(()),
            refresh_queued: AtomicBool::new(false),
            last_attempt: std::sync::Mutex::new(None),
            alive: tokio::sync::watch::Sender::new(()),
        }
    }

    /// The current map, if one was ever read.
    pub fn map(&self) -> Option<Arc<MaskMap>> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A column map as if just read from the database (relay tests run
    /// without one).
    #[cfg(test)]
    pub(crate) fn set_map(&self, map: MaskMap) {
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(map));
    }

    /// The map a new session starts with: read now if there is none (a
    /// session never runs without one), refreshed in the background if old.
    pub async fn map_for_session(self: &Arc<Self>, limits: Limits) -> Result<Arc<MaskMap>, String> {
        if let Some(m) = self.map() {
            if m.loaded_at.elapsed() > REFRESH_EVERY {
                self.refresh_soon(limits);
            }
            return Ok(m);
        }
        self.reload(limits).await
    }

    /// Read the map now (one load at a time; a concurrent caller waits for
    /// it and takes its result). On failure the previous map stays.
    pub async fn reload(&self, limits: Limits) -> Result<Arc<MaskMap>, String> {
        let started = Instant::now();
        let _guard = self.loading.lock().await;
        if let Some(m) = self.map() {
            if m.loaded_at > started {
                return Ok(m); // loaded while we waited
            }
        }
        *self.last_attempt.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        match catalog::load(&self.rules, &self.target, limits).await {
            Ok(m) => {
                let m = Arc::new(m);
                info!(
                    masked_columns = m.masked_column_count(),
                    "masking column map loaded"
                );
                *self.map.write().unwrap_or_else(|p| p.into_inner()) = Some(m.clone());
                Ok(m)
            }
            Err(e) => {
                warn!(error = %e, "reading the masking column map failed");
                Err(format!("the masking column map could not be read: {e}"))
            }
        }
    }

    /// Ask for a background refresh (a relation the map does not know was
    /// seen, a schema change went through, or the map is old). Requests
    /// while one is queued are folded into it; it runs no sooner than
    /// MIN_REFRESH_GAP after the previous read. Never blocks.
    pub fn refresh_soon(self: &Arc<Self>, limits: Limits) {
        if self.refresh_queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let wait = self
            .last_attempt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map_or(Duration::ZERO, |t| {
                MIN_REFRESH_GAP.saturating_sub(t.elapsed())
            });
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            // Cleared first: a request arriving during the read queues another.
            me.refresh_queued.store(false, Ordering::Release);
            let _ = me.reload(limits).await;
        });
    }

    /// Keep the map fresh for the life of the process (admins change
    /// schemas outside pgwarden too).
    /// Re-read the column map periodically while the masking is in use; the
    /// task holds it weakly and ends once the policy is replaced and its
    /// last session is gone.
    pub fn spawn_refresher(self: &Arc<Self>, limits: Limits) {
        let masking = Arc::downgrade(self);
        let mut alive = self.alive.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(REFRESH_EVERY) => {}
                    // The masking is gone (its policy was replaced).
                    _ = alive.changed() => return,
                }
                let Some(me) = masking.upgrade() else {
                    return;
                };
                let _ = me.reload(limits).await;
            }
        });
    }
}
