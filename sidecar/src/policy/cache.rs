//! A bounded verdict cache keyed by statement text, so a repeated statement
//! costs a hash lookup instead of a parse. Session-dependent parts of a
//! verdict (EXECUTE resolution) are applied after the lookup, so the text
//! alone is a sound key.
//!
//! Admission: a text is cached the second time it is judged. Texts with
//! inlined literals (`... WHERE aid = 48213`) are usually unique; caching
//! each one would only churn memory and evict the statements that do
//! repeat. A "seen once" doorkeeper of 64-bit text hashes (bounded, reset
//! when full) decides; a hash collision only admits a text early.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};

use super::Judgement;

pub struct VerdictCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<Box<str>, (Arc<Judgement>, u64)>,
    tick: u64,
    seen_once: HashSet<u64>,
    hasher: RandomState,
}

impl VerdictCache {
    pub fn new(capacity: usize) -> Self {
        VerdictCache {
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, sql: &str) -> Option<Arc<Judgement>> {
        if self.capacity == 0 {
            return None;
        }
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        let entry = inner.map.get_mut(sql)?;
        entry.1 = tick;
        Some(entry.0.clone())
    }

    pub fn insert(&self, sql: &str, j: Arc<Judgement>) {
        if self.capacity == 0 {
            return;
        }
        let mut inner = self.lock();
        let h = inner.hasher.hash_one(sql);
        if inner.seen_once.insert(h) {
            // First sighting: remember only that it was seen.
            if inner.seen_once.len() > 4 * self.capacity {
                inner.seen_once.clear();
            }
            return;
        }
        inner.seen_once.remove(&h);
        if inner.map.len() >= self.capacity {
            // Evict the least recently used quarter in one pass: amortised
            // O(1) per insert without a linked list.
            let mut ticks: Vec<u64> = inner.map.values().map(|(_, t)| *t).collect();
            let cut = ticks.len() / 4;
            let (_, threshold, _) = ticks.select_nth_unstable(cut);
            let threshold = *threshold;
            inner.map.retain(|_, (_, t)| *t > threshold);
        }
        inner.tick += 1;
        let tick = inner.tick;
        inner.map.insert(sql.into(), (j, tick));
    }
}
