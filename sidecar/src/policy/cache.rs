//! A bounded verdict cache keyed by statement text, so a repeated statement
//! costs a hash lookup instead of a parse. Session-dependent parts of a
//! verdict (EXECUTE resolution) are applied after the lookup, so the text
//! alone is a sound key.

use std::collections::HashMap;
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
