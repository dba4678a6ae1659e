//! The configuration in force. A new one replaces it whole and atomically:
//! new sessions take the new one at once, open sessions notice the changed
//! generation at their next statement (one atomic load) and move to it, or
//! end when it no longer admits them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::GatewayConfig;

#[derive(Debug, Default)]
pub struct LiveConfig {
    /// None until the first good configuration (a sidecar waiting for the
    /// operator): clients are refused with 57P03, never let through.
    current: RwLock<Option<Arc<GatewayConfig>>>,
    generation: AtomicU64,
}

impl LiveConfig {
    pub fn new(initial: Option<GatewayConfig>) -> Self {
        LiveConfig {
            current: RwLock::new(initial.map(Arc::new)),
            generation: AtomicU64::new(0),
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
}
