//! The masking key and the per-policy fingerprint keys (DESIGN §2, §4).
//!
//! Hash pseudonyms and approval fingerprints must stay the same across operator
//! restarts and between replicas, so the keys live in one Secret the operator
//! owns (default `pgwarden-keys` in its namespace), never in a pod spec. The
//! Secret holds two random 32-byte keys: the masking key (shared by every
//! policy, so pseudonyms join across policies) and a root key from which each
//! policy's fingerprint key is derived, so a fingerprint made under one policy
//! never verifies under another.

use std::collections::BTreeMap;

use aws_lc_rs::hmac;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{ObjectMeta, PostParams};
use kube::Api;
use pgwarden_api::SecretBytes;

/// Key names in the Secret.
pub const MASKING_KEY: &str = "masking-key";
pub const ROOT_KEY: &str = "root-key";
const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("reading or creating Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        // Boxed: kube::Error is large and this is the cold path.
        #[source]
        source: Box<kube::Error>,
    },
    /// Fail closed: a damaged Secret is not silently replaced, which would
    /// change every pseudonym; an admin deletes it to start over.
    #[error("Secret {namespace}/{name}: key {key:?} {problem}")]
    Malformed {
        namespace: String,
        name: String,
        key: &'static str,
        problem: &'static str,
    },
    #[error("the system random generator failed")]
    Random,
}

/// The operator's keys. `Debug` never prints key bytes.
#[derive(Clone)]
pub struct Keys {
    masking: [u8; KEY_LEN],
    root: [u8; KEY_LEN],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys { <redacted> }")
    }
}

impl Keys {
    /// Fresh random keys (not stored anywhere).
    pub fn generate() -> Result<Keys, KeysError> {
        let mut masking = [0u8; KEY_LEN];
        let mut root = [0u8; KEY_LEN];
        aws_lc_rs::rand::fill(&mut masking).map_err(|_| KeysError::Random)?;
        aws_lc_rs::rand::fill(&mut root).map_err(|_| KeysError::Random)?;
        Ok(Keys { masking, root })
    }

    /// Reads the keys Secret `namespace/name`, creating it with fresh keys if
    /// it does not exist. Replicas racing to create it all end with the
    /// winner's keys (the losers' create gets 409 and they read it).
    pub async fn load_or_create(
        client: kube::Client,
        namespace: &str,
        name: &str,
    ) -> Result<Keys, KeysError> {
        let api: Api<Secret> = Api::namespaced(client, namespace);
        let api_err = |source| KeysError::Api {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            source: Box::new(source),
        };
        if let Some(secret) = api.get_opt(name).await.map_err(api_err)? {
            return Keys::from_secret(&secret, namespace, name);
        }
        let keys = Keys::generate()?;
        match api
            .create(&PostParams::default(), &keys.to_secret(name))
            .await
        {
            Ok(_) => {
                tracing::warn!(
                    secret.namespace = namespace,
                    secret.name = name,
                    "created a new keys Secret: if one existed before (deleted?), Hash pseudonyms \
                     and approval fingerprints made with the old keys no longer match new ones"
                );
                Ok(keys)
            }
            Err(kube::Error::Api(s)) if s.is_already_exists() => {
                let secret = api.get(name).await.map_err(api_err)?;
                Keys::from_secret(&secret, namespace, name)
            }
            Err(e) => Err(api_err(e)),
        }
    }

    /// Puts the keys back if their Secret is deleted while this replica
    /// runs, so an accidental delete does not rotate them: without this, the
    /// next replica to start would create new keys and stream a different
    /// masking key than the replicas still running. Runs until `shutdown`.
    pub async fn keep_stored(
        &self,
        client: kube::Client,
        namespace: &str,
        name: &str,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        use futures_util::StreamExt as _;
        use kube::runtime::{watcher, WatchStreamExt as _};
        let api: Api<Secret> = Api::namespaced(client, namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        // Backoff: a watch that keeps failing (RBAC, API down) must not spin.
        let mut events = std::pin::pin!(watcher(api.clone(), config).default_backoff());
        loop {
            let event = tokio::select! {
                e = events.next() => e,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            let Some(event) = event else { return };
            let deleted = match event {
                Ok(watcher::Event::Delete(_)) => true,
                // A relist that no longer holds it (deleted while the watch was down).
                Ok(watcher::Event::InitDone) => matches!(api.get_opt(name).await, Ok(None)),
                _ => false,
            };
            if !deleted {
                continue;
            }
            match api
                .create(&PostParams::default(), &self.to_secret(name))
                .await
            {
                Ok(_) => tracing::warn!(
                    secret.namespace = namespace,
                    secret.name = name,
                    "the keys Secret was deleted; restored it with the keys in use"
                ),
                Err(kube::Error::Api(s)) if s.is_already_exists() => {
                    // Another replica restored it, or one that started since
                    // created new keys: only the first is harmless.
                    match api
                        .get(name)
                        .await
                        .map(|s| Keys::from_secret(&s, namespace, name))
                    {
                        Ok(Ok(k)) if k.masking == self.masking && k.root == self.root => {}
                        _ => tracing::error!(
                            secret.namespace = namespace,
                            secret.name = name,
                            "the keys Secret now holds other keys than this replica uses: \
                             restart this replica so every replica uses one set"
                        ),
                    }
                }
                Err(e) => tracing::warn!(error = %e, "restoring the keys Secret failed"),
            }
        }
    }

    fn from_secret(secret: &Secret, namespace: &str, name: &str) -> Result<Keys, KeysError> {
        let key = |key: &'static str| -> Result<[u8; KEY_LEN], KeysError> {
            let malformed = |problem| KeysError::Malformed {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                key,
                problem,
            };
            let bytes = secret
                .data
                .as_ref()
                .and_then(|d| d.get(key))
                .ok_or_else(|| malformed("is missing"))?;
            <[u8; KEY_LEN]>::try_from(bytes.0.as_slice()).map_err(|_| malformed("is not 32 bytes"))
        };
        Ok(Keys {
            masking: key(MASKING_KEY)?,
            root: key(ROOT_KEY)?,
        })
    }

    fn to_secret(&self, name: &str) -> Secret {
        let data = BTreeMap::from([
            (MASKING_KEY.to_owned(), ByteString(self.masking.to_vec())),
            (ROOT_KEY.to_owned(), ByteString(self.root.to_vec())),
        ]);
        Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "pgwarden-operator".to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".to_owned()),
            data: Some(data),
            ..Secret::default()
        }
    }

    /// The key of `Hash` masking, the same for every policy.
    pub fn masking_key(&self) -> SecretBytes {
        SecretBytes(self.masking.to_vec())
    }

    /// The approval fingerprint key of policy `namespace/policy`:
    /// HMAC-SHA256(root, "fingerprint\0" + namespace + "/" + policy). The NUL
    /// separates the purpose from the name; "/" cannot occur in either name.
    pub fn fingerprint_key(&self, namespace: &str, policy: &str) -> SecretBytes {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.root);
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(b"fingerprint\0");
        ctx.update(namespace.as_bytes());
        ctx.update(b"/");
        ctx.update(policy.as_bytes());
        SecretBytes(ctx.sign().as_ref().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed() -> Keys {
        Keys {
            masking: [1; KEY_LEN],
            root: [2; KEY_LEN],
        }
    }

    #[test]
    fn fingerprint_keys_are_stable_and_distinct_per_policy() {
        let k = fixed();
        let a = k.fingerprint_key("ci", "nightly");
        assert_eq!(a.0.len(), 32);
        assert_eq!(a, fixed().fingerprint_key("ci", "nightly"), "stable");
        // Known answer: a change to the derivation would change every
        // fingerprint already handed out.
        let expected = {
            let key = hmac::Key::new(hmac::HMAC_SHA256, &[2; KEY_LEN]);
            hmac::sign(&key, b"fingerprint\0ci/nightly")
                .as_ref()
                .to_vec()
        };
        assert_eq!(a.0, expected);
        for (ns, p) in [("ci", "nightly2"), ("ci2", "nightly"), ("cin", "ightly")] {
            assert_ne!(a, k.fingerprint_key(ns, p), "{ns}/{p}");
        }
        assert_ne!(a.0, k.masking_key().0);
        let other_root = Keys {
            root: [3; KEY_LEN],
            ..fixed()
        };
        assert_ne!(a, other_root.fingerprint_key("ci", "nightly"));
    }

    #[test]
    fn secret_round_trip_and_malformed_secrets_fail_closed() {
        let k = Keys::generate().unwrap();
        let s = k.to_secret("pgwarden-keys");
        let back = Keys::from_secret(&s, "sys", "pgwarden-keys").unwrap();
        assert_eq!(back.masking_key(), k.masking_key());
        assert_eq!(back.fingerprint_key("a", "b"), k.fingerprint_key("a", "b"));
        assert_ne!(Keys::generate().unwrap().masking_key(), k.masking_key());

        let mut short = s.clone();
        short
            .data
            .as_mut()
            .unwrap()
            .insert(ROOT_KEY.into(), ByteString(vec![0; 31]));
        let err = Keys::from_secret(&short, "sys", "pgwarden-keys").unwrap_err();
        assert_eq!(
            err.to_string(),
            "Secret sys/pgwarden-keys: key \"root-key\" is not 32 bytes"
        );
        let mut missing = s;
        missing.data.as_mut().unwrap().remove(MASKING_KEY);
        let err = Keys::from_secret(&missing, "sys", "pgwarden-keys").unwrap_err();
        assert!(
            err.to_string().contains("\"masking-key\" is missing"),
            "{err}"
        );
    }

    #[test]
    fn debug_never_prints_key_bytes() {
        let k = fixed();
        assert_eq!(format!("{k:?}"), "Keys { <redacted> }");
        assert!(!format!("{:?}", k.fingerprint_key("a", "b")).contains('2'));
    }
}
