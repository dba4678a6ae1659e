//! Cancel keys. Clients get proxy-issued (pid, secret) pairs; a CancelRequest
//! carrying one is forwarded to the upstream backend with that backend's real
//! key. The upstream key never reaches the client, so a client cannot cancel
//! other sessions on the server, and a guessed key maps to nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::upstream::{BackendKey, UpstreamTarget};

#[derive(Default)]
pub struct CancelRegistry {
    // A plain mutex: held for a map operation only, never across an await.
    map: Mutex<HashMap<i32, Entry>>,
}

struct Entry {
    secret: i32,
    target: Arc<UpstreamTarget>,
    key: BackendKey,
    /// Wakes the session itself (a statement held for approval).
    interrupt: Arc<Notify>,
}

/// What a valid cancel key reaches: the upstream backend, and the session.
pub type CancelTarget = (Arc<UpstreamTarget>, BackendKey, Arc<Notify>);

/// Removes the session's key when the session ends.
pub struct Registration<'a> {
    registry: &'a CancelRegistry,
    pub pid: i32,
    pub secret: i32,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.pid);
    }
}

impl CancelRegistry {
    fn lock(&self) -> MutexGuard<'_, HashMap<i32, Entry>> {
        // A panic elsewhere while holding the lock leaves a usable map.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(
        &self,
        target: Arc<UpstreamTarget>,
        key: BackendKey,
        interrupt: Arc<Notify>,
    ) -> Registration<'_> {
        let secret: i32 = rand::random();
        let mut map = self.lock();
        let pid = loop {
            // Positive like a real backend pid; unique among live sessions.
            let pid = rand::random::<i32>() & 0x7fff_ffff;
            if pid != 0 && !map.contains_key(&pid) {
                break pid;
            }
        };
        map.insert(
            pid,
            Entry {
                secret,
                target,
                key,
                interrupt,
            },
        );
        Registration {
            registry: self,
            pid,
            secret,
        }
    }

    /// The upstream to cancel for a client's (pid, secret), if it is valid.
    pub fn lookup(&self, pid: i32, secret: &[u8]) -> Option<CancelTarget> {
        let map = self.lock();
        let e = map.get(&pid)?;
        (secret == e.secret.to_be_bytes())
            .then(|| (e.target.clone(), e.key.clone(), e.interrupt.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{tls::UpstreamTls, Credential};
    use pgwarden_api::SecretString;

    fn target() -> Arc<UpstreamTarget> {
        Arc::new(UpstreamTarget {
            host: "127.0.0.1".into(),
            port: 5432,
            database: "shop".into(),
            credential: Credential {
                username: "app".into(),
                password: SecretString::new("pw".into()),
            },
            tls: UpstreamTls::Disable,
        })
    }

    #[test]
    fn only_the_issued_key_maps_to_the_backend_and_only_while_registered() {
        let reg = CancelRegistry::default();
        let key = BackendKey {
            pid: 4242,
            secret: vec![1, 2, 3, 4],
        };
        let r = reg.register(target(), key.clone(), Arc::default());
        let (pid, secret) = (r.pid, r.secret.to_be_bytes());
        assert_eq!(reg.lookup(pid, &secret).map(|(_, k, _)| k), Some(key));
        // The upstream's own key is not a valid client key.
        assert!(reg.lookup(4242, &[1, 2, 3, 4]).is_none());
        let mut wrong = secret;
        wrong[3] ^= 1;
        assert!(reg.lookup(pid, &wrong).is_none());
        drop(r);
        assert!(reg.lookup(pid, &secret).is_none());
    }
}
