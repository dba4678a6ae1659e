//! In-memory object storage with etcd's observable semantics: one global
//! resourceVersion counter bumped by every write, a bounded history of changes that
//! watches replay from a resourceVersion (older than the history → 410 Gone, which
//! [`Store::compact`] lets a test force), and a broadcast of new changes.
//!
//! The store also owns the [`Registry`], so a CRD's write and the serving of its
//! resource change under one lock, like the real apiextensions controller (only
//! without the delay).
//!
//! Everything here is synchronous and short: handlers never hold the lock across an
//! await (admission webhooks will run between a read and a conditional commit).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::broadcast;

use crate::registry::Registry;

/// One change, as watches see it.
#[derive(Debug, Clone)]
pub struct Change {
    pub rv: u64,
    /// [`crate::registry::ResourceType::storage_key`]
    pub key: String,
    pub namespace: String,
    /// `ADDED`, `MODIFIED`, `DELETED`
    pub kind: &'static str,
    pub object: Value,
    /// The object before the change (MODIFIED/DELETED): selector-filtered watches
    /// turn a MODIFIED that leaves or enters the selection into DELETED/ADDED.
    pub previous: Option<Value>,
}

pub type ObjKey = (String, String, String);

/// What a watch starts from: the changes to replay, and the live feed.
pub type Subscription = (Vec<Arc<Change>>, broadcast::Receiver<Arc<Change>>);

pub struct Store {
    objects: BTreeMap<ObjKey, Value>,
    rv: u64,
    history: VecDeque<Arc<Change>>,
    history_cap: usize,
    /// Watches from a resourceVersion below this cannot be served (410).
    floor: u64,
    tx: broadcast::Sender<Arc<Change>>,
    pub registry: Registry,
}

/// Why a conditional write failed.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteError {
    NotFound,
    AlreadyExists,
    /// The stored resourceVersion is not the expected one.
    Conflict,
}

pub fn rv_of(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

impl Store {
    pub fn new(registry: Registry, history_cap: usize) -> Store {
        let (tx, _) = broadcast::channel(4096);
        Store {
            objects: BTreeMap::new(),
            // Real clusters never show small numbers; start where a fresh one might.
            rv: 100,
            history: VecDeque::new(),
            history_cap,
            floor: 100,
            tx,
            registry,
        }
    }

    pub fn current_rv(&self) -> u64 {
        self.rv
    }

    pub fn get(&self, key: &str, ns: &str, name: &str) -> Option<&Value> {
        self.objects.get(&(key.into(), ns.into(), name.into()))
    }

    /// Objects of `key`, in one namespace or all (`None`), in key order.
    pub fn list(&self, key: &str, ns: Option<&str>) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((k, n, _), _)| k == key && ns.is_none_or(|ns| n == ns))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Every object with its key (the garbage collector's scan).
    pub fn iter(&self) -> impl Iterator<Item = (&ObjKey, &Value)> {
        self.objects.iter()
    }

    /// Every object in a namespace, of any type (namespace deletion).
    pub fn keys_in_namespace(&self, ns: &str) -> Vec<ObjKey> {
        self.objects
            .keys()
            .filter(|(_, n, _)| n == ns)
            .cloned()
            .collect()
    }

    fn record(&mut self, change: Change) {
        let change = Arc::new(change);
        self.history.push_back(change.clone());
        while self.history.len() > self.history_cap {
            if let Some(old) = self.history.pop_front() {
                self.floor = old.rv;
            }
        }
        // No receivers is fine.
        let _ = self.tx.send(change);
    }

    fn stamp(&mut self, obj: &mut Value) -> u64 {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = Value::String(self.rv.to_string());
        self.rv
    }

    pub fn create(
        &mut self,
        key: &str,
        ns: &str,
        name: &str,
        mut obj: Value,
    ) -> Result<Value, WriteError> {
        let k: ObjKey = (key.into(), ns.into(), name.into());
        if self.objects.contains_key(&k) {
            return Err(WriteError::AlreadyExists);
        }
        let rv = self.stamp(&mut obj);
        self.objects.insert(k, obj.clone());
        self.record(Change {
            rv,
            key: key.into(),
            namespace: ns.into(),
            kind: "ADDED",
            object: obj.clone(),
            previous: None,
        });
        Ok(obj)
    }

    /// Replaces the object if its stored resourceVersion is still `expected_rv`.
    pub fn update(
        &mut self,
        key: &str,
        ns: &str,
        name: &str,
        expected_rv: u64,
        mut obj: Value,
    ) -> Result<Value, WriteError> {
        let k: ObjKey = (key.into(), ns.into(), name.into());
        let Some(prev) = self.objects.get(&k).cloned() else {
            return Err(WriteError::NotFound);
        };
        if rv_of(&prev) != expected_rv {
            return Err(WriteError::Conflict);
        }
        let rv = self.stamp(&mut obj);
        self.objects.insert(k, obj.clone());
        self.record(Change {
            rv,
            key: key.into(),
            namespace: ns.into(),
            kind: "MODIFIED",
            object: obj.clone(),
            previous: Some(prev),
        });
        Ok(obj)
    }

    /// Removes the object (if `expected_rv` is given, only at that version). The
    /// DELETED event carries the object at a new resourceVersion, as etcd's does.
    pub fn delete(
        &mut self,
        key: &str,
        ns: &str,
        name: &str,
        expected_rv: Option<u64>,
    ) -> Result<Value, WriteError> {
        let k: ObjKey = (key.into(), ns.into(), name.into());
        let Some(prev) = self.objects.get(&k).cloned() else {
            return Err(WriteError::NotFound);
        };
        if expected_rv.is_some_and(|e| e != rv_of(&prev)) {
            return Err(WriteError::Conflict);
        }
        self.objects.remove(&k);
        let mut obj = prev.clone();
        let rv = self.stamp(&mut obj);
        self.record(Change {
            rv,
            key: key.into(),
            namespace: ns.into(),
            kind: "DELETED",
            object: obj.clone(),
            previous: Some(prev),
        });
        Ok(obj)
    }

    /// Changes after `from_rv` still in history, plus a receiver for later ones;
    /// `Err(floor)` when `from_rv` is older than the history (410 Gone).
    pub fn subscribe(&self, from_rv: u64) -> Result<Subscription, u64> {
        if from_rv < self.floor {
            return Err(self.floor);
        }
        let backlog = self
            .history
            .iter()
            .filter(|c| c.rv > from_rv)
            .cloned()
            .collect();
        Ok((backlog, self.tx.subscribe()))
    }

    /// Forgets all history: watches from any earlier resourceVersion get 410 Gone
    /// (what etcd compaction does; tests use it to drive reflectors through a relist).
    /// Open watches end too (as when the API server's watch cache is reset), so a
    /// client re-watches from the last version it saw — and relists on the 410 if
    /// anything changed since.
    pub fn compact(&mut self) {
        self.history.clear();
        self.floor = self.rv;
        // Dropping the sender closes every subscribed receiver.
        self.tx = broadcast::channel(4096).0;
    }
}
