//! The sidecar's configuration snapshot: every policy a sidecar serves, with
//! the Secrets it references already resolved. One type, two producers: the
//! sidecar builds it from `-f` files in standalone mode, the operator streams
//! it to injected sidecars (DESIGN §4). It carries credentials: never log it,
//! never write it to disk.

use serde::{Deserialize, Serialize};

use crate::DatabaseAccessPolicySpec;

/// A versioned, complete configuration: a new snapshot replaces the old one
/// whole.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigSnapshot {
    /// Increases with every change the producer makes; ACK/NACK name it.
    pub version: u64,
    pub policies: Vec<SnapshotPolicy>,
    /// Key of the `Hash` masking strategy (base64 of at least 32 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masking_key: Option<SecretBytes>,
    /// The pod this snapshot is for, as the operator verified it (the
    /// sidecar token's binding and the pod object). `identity.pod` takes its
    /// subject from here. None in standalone mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<SnapshotPod>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
}

/// One DatabaseAccessPolicy with what its Secrets hold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotPolicy {
    pub namespace: String,
    pub name: String,
    pub spec: DatabaseAccessPolicySpec,
    /// `spec.database.credentialsSecret`'s `username` and `password`.
    pub credential: SnapshotCredential,
    /// The PEM CA for `spec.database.tls` (`caSecret`'s `ca.crt`, or `caFile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// `spec.recording.store.postgres.dsnSecret`'s `dsn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording_dsn: Option<SecretString>,
    /// Key of the approval fingerprints (HMAC), per policy, held by the
    /// operator. Standalone: the state directory's own key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint_key: Option<SecretBytes>,
    /// Where the policy came from, for error messages (`policy.yaml`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotCredential {
    pub username: String,
    pub password: SecretString,
}

/// A string that Debug never prints.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretString(pub String);

impl SecretString {
    pub fn new(s: String) -> Self {
        SecretString(s)
    }

    /// The value, for the one place that needs it (a login, a fingerprint).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Bytes that Debug never prints; base64 on the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(pub Vec<u8>);

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for SecretBytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine as _;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for SecretBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine as _;
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(SecretBytes)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_as_json_and_never_prints_secrets() {
        let spec: DatabaseAccessPolicySpec = serde_yaml_ng::from_str(
            "identity: {localTrust: {subject: dev}}\n\
             database: {host: db, name: shop, credentialsSecret: s}\n\
             defaultAction: Deny\n",
        )
        .unwrap();
        let snap = ConfigSnapshot {
            version: 7,
            policies: vec![SnapshotPolicy {
                namespace: "ci".into(),
                name: "nightly".into(),
                spec,
                credential: SnapshotCredential {
                    username: "app".into(),
                    password: SecretString("hunter2-very-secret".into()),
                },
                ca_pem: None,
                recording_dsn: None,
                fingerprint_key: None,
                source: None,
            }],
            masking_key: Some(SecretBytes(vec![7; 32])),
            pod: Some(SnapshotPod {
                namespace: "ci".into(),
                name: "runner-1".into(),
                uid: "0b6c".into(),
                service_account: "ci-runner".into(),
            }),
        };
        let json = serde_json::to_string(&snap).unwrap();
        assert!(json.contains("\"maskingKey\":\"BwcH"), "{json}");
        let back: ConfigSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);
        let debug = format!("{snap:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(!debug.contains("7, 7"), "{debug}");
        let bad = json.replace("BwcH", "!!!!");
        assert!(serde_json::from_str::<ConfigSnapshot>(&bad).is_err());
    }
}
