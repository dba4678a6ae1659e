//! An issuer's signing keys, kept fresh: fetched in the background at the
//! pace the issuer's Cache-Control asks for (within bounds), refreshed once —
//! rate-limited — when a token names a key we do not have, and kept when the
//! issuer is unreachable. No keys yet means logins are refused with the last
//! fetch error; the gateway itself stays up.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use tracing::{info, warn};

use super::fetch::Fetcher;
use super::jwks::KeySet;

/// Refresh pace when the issuer sends no Cache-Control, and its bounds.
const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
const MIN_REFRESH: Duration = Duration::from_secs(60);
const MAX_REFRESH: Duration = Duration::from_secs(3600);
/// Retry pace after a failed fetch: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Unknown-kid refreshes happen at most this often: a stream of tokens with
/// made-up kids must not turn the gateway into a load generator for the
/// issuer.
pub const UNKNOWN_KID_INTERVAL: Duration = Duration::from_secs(5);

/// Where an issuer's keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// `jwksFile`: read from disk (and re-read on an unknown kid).
    File(PathBuf),
    /// `jwksUri`: fetched directly.
    Uri(String),
    /// The issuer's discovery document names `jwks_uri`.
    Discovery { issuer: String },
}

impl KeySource {
    fn describe(&self) -> String {
        match self {
            KeySource::File(p) => format!("file {}", p.display()),
            KeySource::Uri(u) => u.clone(),
            KeySource::Discovery { issuer } => format!("discovery at {issuer}"),
        }
    }
}

#[derive(Default)]
struct State {
    keys: Option<Arc<KeySet>>,
    last_error: Option<String>,
    last_attempt: Option<Instant>,
}

pub struct KeyStore {
    source: KeySource,
    fetcher: Fetcher,
    state: RwLock<State>,
    /// Serialises fetches: concurrent unknown-kid logins share one.
    fetching: tokio::sync::Mutex<()>,
    /// Dropped with the store: its refresher ends at once.
    alive: tokio::sync::watch::Sender<()>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("source", &self.source)
            .finish()
    }
}

impl KeyStore {
    pub fn new(source: KeySource, fetcher: Fetcher) -> Self {
        KeyStore {
            source,
            fetcher,
            state: RwLock::new(State::default()),
            fetching: tokio::sync::Mutex::new(()),
            alive: tokio::sync::watch::Sender::new(()),
        }
    }

    /// The current keys, or why there are none.
    pub fn current(&self) -> Result<Arc<KeySet>, String> {
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        st.keys.clone().ok_or_else(|| {
            st.last_error
                .clone()
                .unwrap_or_else(|| "they have not been fetched yet".into())
        })
    }

    /// Fetch now, keep the result if it is good, and say how long until the
    /// next routine refresh.
    pub async fn refresh(&self) -> Result<Duration, String> {
        let _guard = self.fetching.lock().await;
        self.refresh_locked().await
    }

    async fn refresh_locked(&self) -> Result<Duration, String> {
        self.state
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .last_attempt = Some(Instant::now());
        let result = self.load().await;
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok((keys, max_age)) => {
                let changed = st.keys.as_ref().is_none_or(|old| old.kids() != keys.kids());
                if changed {
                    info!(source = %self.source.describe(), kids = ?keys.kids(), "token signing keys loaded");
                }
                st.keys = Some(Arc::new(keys));
                st.last_error = None;
                Ok(max_age
                    .unwrap_or(DEFAULT_REFRESH)
                    .clamp(MIN_REFRESH, MAX_REFRESH))
            }
            Err(why) => {
                // Keep the last good keys: an issuer outage must not lock out
                // callers whose tokens those keys still verify.
                warn!(source = %self.source.describe(), error = %why, kept_keys = st.keys.is_some(), "fetching token signing keys failed");
                st.last_error = Some(why.clone());
                Err(why)
            }
        }
    }

    /// A token named `kid`, which the current keys lack: refresh once, no
    /// sooner than UNKNOWN_KID_INTERVAL after the previous fetch (waiting
    /// out the remainder rather than refusing a freshly rotated key).
    pub async fn refresh_for_kid(&self, kid: &str) {
        let _guard = self.fetching.lock().await;
        if self.current().is_ok_and(|k| k.has_kid(kid)) {
            return; // another login's refresh already brought it
        }
        let last = self
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .last_attempt;
        if let Some(last) = last {
            let since = last.elapsed();
            if since < UNKNOWN_KID_INTERVAL {
                tokio::time::sleep(UNKNOWN_KID_INTERVAL - since).await;
            }
        }
        let _ = self.refresh_locked().await;
    }

    /// Keep the keys fresh for the life of the process.
    /// Refresh in the background for as long as the store is in use: the
    /// task holds it weakly and ends once the policy that owns it is
    /// replaced (hot reload) and its last session is gone.
    pub fn spawn_refresher(self: Arc<Self>) {
        let store = Arc::downgrade(&self);
        let mut alive = self.alive.subscribe();
        drop(self);
        tokio::spawn(async move {
            let mut retry = RETRY_FIRST;
            loop {
                let Some(me) = store.upgrade() else {
                    return;
                };
                let refreshed = me.refresh().await;
                drop(me);
                let wait = match refreshed {
                    Ok(next) => {
                        retry = RETRY_FIRST;
                        next
                    }
                    Err(_) => {
                        let w = retry;
                        retry = (retry * 2).min(RETRY_MAX);
                        w
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    // The store is gone (its policy was replaced).
                    _ = alive.changed() => return,
                }
            }
        });
    }

    async fn load(&self) -> Result<(KeySet, Option<Duration>), String> {
        match &self.source {
            KeySource::File(path) => {
                // A few KiB from local disk: not worth a blocking-pool hop.
                let bytes =
                    std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
                Ok((KeySet::from_json(&bytes)?, None))
            }
            KeySource::Uri(uri) => self.fetch_jwks(uri).await,
            KeySource::Discovery { issuer } => {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    issuer.trim_end_matches('/')
                );
                let doc = self.fetcher.get(&url).await.map_err(|e| e.to_string())?;
                let jwks_uri = jwks_uri_from_discovery(&doc.body, issuer)?;
                self.fetch_jwks(&jwks_uri).await
            }
        }
    }

    async fn fetch_jwks(&self, uri: &str) -> Result<(KeySet, Option<Duration>), String> {
        let got = self.fetcher.get(uri).await.map_err(|e| e.to_string())?;
        let keys = KeySet::from_json(&got.body).map_err(|e| format!("{uri}: {e}"))?;
        Ok((keys, got.max_age))
    }
}

/// `jwks_uri` from a discovery document whose `issuer` is the one we asked
/// (OpenID Connect Discovery §4.3: a mismatch means the document is not
/// this issuer's).
pub fn jwks_uri_from_discovery(body: &[u8], issuer: &str) -> Result<String, String> {
    let doc: Value = serde_json::from_slice(body)
        .map_err(|e| format!("the discovery document is not JSON: {e}"))?;
    let stated = doc.get("issuer").and_then(Value::as_str).unwrap_or("");
    if stated.trim_end_matches('/') != issuer.trim_end_matches('/') {
        return Err(format!(
            "the discovery document names issuer {stated:?}, not {issuer:?}"
        ));
    }
    let uri = doc
        .get("jwks_uri")
        .and_then(Value::as_str)
        .ok_or("the discovery document has no jwks_uri")?;
    Ok(uri.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_must_name_the_same_issuer() {
        let doc = br#"{"issuer":"https://a.example","jwks_uri":"https://a.example/keys"}"#;
        assert_eq!(
            jwks_uri_from_discovery(doc, "https://a.example/").unwrap(),
            "https://a.example/keys"
        );
        let err = jwks_uri_from_discovery(doc, "https://b.example").unwrap_err();
        assert!(err.contains("not \"https://b.example\""), "{err}");
        let err =
            jwks_uri_from_discovery(br#"{"issuer":"https://a.example"}"#, "https://a.example")
                .unwrap_err();
        assert!(err.contains("no jwks_uri"), "{err}");
        assert!(jwks_uri_from_discovery(b"<html>", "https://a.example").is_err());
    }
}
