//! The configuration in force. A new one replaces it whole and atomically:
//! new sessions take the new one at once, open sessions notice the changed
//! generation at their next statement (one atomic load) and move to it, or
//! end when it no longer admits them.
//!
//! In operator mode the configuration can also go *stale*: the stream has
//! been down longer than allowed, so policy changes and revocations may be
//! missed. Stale, it still exists but is not served (new clients and the
//! next statement of open sessions are refused) until the stream is back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::GatewayConfig;

#[derive(Debug, Default)]
pub struct LiveConfig {
    /// None until the first good configuration (a sidecar waiting for the
    /// operator): clients are refused with 57P03, never let through.
    current: RwLock<Option<Arc<GatewayConfig>>>,
    generation: AtomicU64,
    stale: AtomicBool,
}

impl LiveConfig {
    pub fn new(initial: Option<GatewayConfig>) -> Self {
        LiveConfig {
            current: RwLock::new(initial.map(Arc::new)),
            generation: AtomicU64::new(0),
            stale: AtomicBool::new(false),
        }
    }

    pub fn current(&self) -> Option<Arc<GatewayConfig>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Changes with every replacement; compare before `current()`.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Put a new configuration in force; returns the one it replaced.
    pub fn replace(&self, config: GatewayConfig) -> Option<Arc<GatewayConfig>> {
        let old = {
            let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
            cur.replace(Arc::new(config))
        };
        self.generation.fetch_add(1, Ordering::AcqRel);
        old
    }

    /// Mark the configuration stale (or fresh again); returns whether that
    /// changed anything. A change bumps the generation, so open sessions
    /// look at their next statement.
    pub fn set_stale(&self, stale: bool) -> bool {
        let was = self.stale.swap(stale, Ordering::AcqRel);
        if was != stale {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        was != stale
    }

    /// Whether the configuration must not be served (operator mode only).
    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn going_stale_and_back_is_seen_by_open_sessions() {
        let live = LiveConfig::new(None);
        let g = live.generation();
        assert!(!live.is_stale());
        assert!(live.set_stale(true));
        assert!(live.is_stale());
        assert_ne!(live.generation(), g, "open sessions must look again");
        let g = live.generation();
        assert!(!live.set_stale(true), "already stale");
        assert_eq!(live.generation(), g);
        assert!(live.set_stale(false));
        assert!(!live.is_stale());
    }
}
