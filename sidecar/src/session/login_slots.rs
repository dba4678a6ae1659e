//! Connections that have not logged in yet, counted per source address.
//!
//! Before login a connection costs the gateway a slot and gives it nothing;
//! PostgreSQL drops such connections after `authentication_timeout`, and so
//! does pgwarden (`Shared::startup_timeout`). The per-source cap keeps one
//! address from holding every slot for that long.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub struct LoginSlots {
    per_source: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place until it has logged in; dropping it frees it.
#[derive(Debug)]
pub struct LoginSlot {
    slots: Arc<LoginSlots>,
    source: IpAddr,
}

impl LoginSlots {
    pub fn new(per_source: usize) -> Arc<Self> {
        Arc::new(LoginSlots {
            per_source,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a new connection from `source`, or None at the cap.
    pub fn enter(self: &Arc<Self>, source: IpAddr) -> Option<LoginSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(source).or_insert(0);
        if *n >= self.per_source {
            return None;
        }
        *n += 1;
        Some(LoginSlot {
            slots: self.clone(),
            source,
        })
    }

    #[cfg(test)]
    fn count(&self, source: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&source).copied().unwrap_or(0)
    }
}

impl Drop for LoginSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_is_per_source_and_slots_come_back() {
        let slots = LoginSlots::new(2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "10.1.2.3".parse().unwrap();
        let s1 = slots.enter(a).unwrap();
        let _s2 = slots.enter(a).unwrap();
        assert!(slots.enter(a).is_none());
        let _other = slots.enter(b).expect("another source has its own cap");
        drop(s1);
        assert_eq!(slots.count(a), 1);
        let _s3 = slots.enter(a).expect("a freed slot is reusable");
        assert!(slots.enter(a).is_none());
    }
}
