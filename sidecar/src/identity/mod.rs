//! Who is on the other end of a client connection. One `Authenticator` per
//! policy, chosen from `spec.identity`; it may talk to the client (ask for a
//! password or token) and yields an `Identity` or a FATAL for the client.

mod fetch;
mod jwks;
mod keys;
mod token;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pgwarden_api::DatabaseAccessPolicySpec;

pub use fetch::Fetcher;
pub use jwks::KeySet;
pub use keys::{KeySource, KeyStore};
pub use token::{TokenError, TokenRules, VerifiedToken, LEEWAY_SECS};

use crate::wire::PgError;

/// An authenticated caller. `subject` flows into logs, recordings, approvals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub subject: String,
    pub method: &'static str,
    /// Claims a reviewer cares about (repository, workflow, namespace, ...).
    pub attributes: Vec<(String, String)>,
    /// When the credential stops being valid (seconds since the epoch); the
    /// session runs no new statement after it.
    pub expires_at: Option<u64>,
}

/// Transport facts the authenticator needs.
#[derive(Debug, Clone, Copy)]
pub struct ClientTransport {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// Gateway-wide settings for token identities, from the command line (or,
/// in a cluster, the operator).
#[derive(Debug, Clone, Default)]
pub struct IdentityOptions {
    /// Extra PEM CA bundles for fetching issuer documents over https.
    pub ca_files: Vec<PathBuf>,
    /// The cluster's service-account token issuer (`--service-account-issuer`).
    pub kubernetes_issuer: Option<String>,
    /// Its JWKS as a file, for clusters whose issuer is not reachable.
    pub kubernetes_jwks_file: Option<PathBuf>,
    /// The pod this sidecar serves: a Kubernetes token must come from it.
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub service_account: Option<String>,
}

#[derive(Debug)]
pub enum Authenticator {
    /// Standalone only: loopback clients are this subject, no credential asked.
    LocalTrust { subject: String },
    /// A JWT sent as the cleartext password (OIDC or Kubernetes tokens).
    Token(Arc<TokenAuthenticator>),
    /// Injected sidecars (`identity.pod`): loopback clients are the pod.
    /// `Err` holds why this pod's service account is not admitted.
    Pod(Result<Identity, String>),
}

#[derive(Debug)]
pub struct TokenAuthenticator {
    method: &'static str,
    rules: TokenRules,
    keys: Arc<KeyStore>,
}

impl Authenticator {
    /// Build from a policy's `spec.identity`. `policy_dir` anchors a relative
    /// `jwksFile`. Errors are (field path, message) for the config loader.
    pub fn from_spec(
        spec: &DatabaseAccessPolicySpec,
        policy_dir: &Path,
        opts: &IdentityOptions,
    ) -> Result<Self, (&'static str, String)> {
        let id = &spec.identity;
        if let Some(lt) = &id.local_trust {
            return Ok(Authenticator::LocalTrust {
                subject: lt.subject.clone(),
            });
        }
        if let Some(pod) = &id.pod {
            return pod_authenticator(pod, opts);
        }
        let fetcher = || {
            let pems = opts
                .ca_files
                .iter()
                .map(|p| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display())))
                .collect::<Result<Vec<_>, _>>()?;
            Fetcher::new(&pems)
        };
        if let Some(oidc) = &id.oidc {
            const P: &str = "spec.identity.oidc";
            let source = match (&oidc.jwks_file, &oidc.jwks_uri) {
                (Some(file), _) => {
                    let path = policy_dir.join(file);
                    check_jwks_file(&path).map_err(|e| ("spec.identity.oidc.jwksFile", e))?;
                    KeySource::File(path)
                }
                (None, Some(uri)) => KeySource::Uri(uri.clone()),
                (None, None) => KeySource::Discovery {
                    issuer: oidc.issuer.clone(),
                },
            };
            let rules = TokenRules {
                issuer: oidc.issuer.clone(),
                audiences: oidc.audiences.clone(),
                subjects: oidc.subjects.clone(),
                claims: oidc
                    .claims
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            };
            let keys = KeyStore::new(source, fetcher().map_err(|e| (P, e))?);
            return Ok(Authenticator::Token(Arc::new(TokenAuthenticator {
                method: "oidc",
                rules,
                keys: Arc::new(keys),
            })));
        }
        if let Some(k8s) = &id.kubernetes {
            const P: &str = "spec.identity.kubernetes";
            let issuer = opts.kubernetes_issuer.clone().ok_or((
                P,
                "Kubernetes identity needs the cluster's service-account issuer: \
                 pass --kubernetes-issuer (env PGWARDEN_KUBERNETES_ISSUER)"
                    .to_string(),
            ))?;
            let source = match &opts.kubernetes_jwks_file {
                Some(path) => {
                    check_jwks_file(path).map_err(|e| (P, e))?;
                    KeySource::File(path.clone())
                }
                None => KeySource::Discovery {
                    issuer: issuer.clone(),
                },
            };
            // A projected token names its pod; only this pod's may be used.
            let mut claims = Vec::new();
            if let Some(ns) = &opts.pod_namespace {
                claims.push(("kubernetes.io.namespace".to_string(), ns.clone()));
            }
            if let Some(pod) = &opts.pod_name {
                claims.push(("kubernetes.io.pod.name".to_string(), pod.clone()));
            }
            if let Some(sa) = &opts.service_account {
                claims.push(("kubernetes.io.serviceaccount.name".to_string(), sa.clone()));
            }
            let rules = TokenRules {
                issuer,
                audiences: vec![k8s.audience.clone()],
                subjects: vec!["system:serviceaccount:*".into()],
                claims,
            };
            let keys = KeyStore::new(source, fetcher().map_err(|e| (P, e))?);
            return Ok(Authenticator::Token(Arc::new(TokenAuthenticator {
                method: "kubernetes",
                rules,
                keys: Arc::new(keys),
            })));
        }
        Err(("spec.identity", "no identity is configured".into()))
    }

    /// Start background work (key refresh). Needs a running tokio runtime.
    pub fn start(&self) {
        if let Authenticator::Token(t) = self {
            t.keys.clone().spawn_refresher();
        }
    }

    /// Whether the client must send a password (the token).
    pub fn wants_password(&self) -> bool {
        matches!(self, Authenticator::Token(_))
    }

    /// Decide who the client is. `password` is what it sent when
    /// `wants_password`.
    pub async fn authenticate(
        &self,
        transport: ClientTransport,
        password: Option<&str>,
    ) -> Result<Identity, PgError> {
        match self {
            Authenticator::LocalTrust { subject } => {
                if !transport.peer.ip().is_loopback() {
                    return Err(PgError::not_authorized(
                        "this policy trusts local clients only (identity.localTrust), and the connection is not from loopback",
                    ));
                }
                Ok(Identity {
                    subject: subject.clone(),
                    method: "localTrust",
                    attributes: Vec::new(),
                    expires_at: None,
                })
            }
            Authenticator::Pod(admitted) => {
                // The pod's loopback is reachable only from inside the pod
                // (the pod guard refuses hostNetwork).
                if !transport.peer.ip().is_loopback() {
                    return Err(PgError::not_authorized(
                        "this policy admits the pod's own containers only (identity.pod), and the connection is not from the pod's loopback",
                    ));
                }
                admitted.clone().map_err(PgError::not_authorized)
            }
            Authenticator::Token(t) => {
                let token = password.unwrap_or("");
                let verified = t
                    .verify(token)
                    .await
                    .map_err(|e| PgError::bad_password(format!("token rejected: {e}")))?;
                Ok(Identity {
                    subject: verified.subject,
                    method: t.method,
                    attributes: verified.attributes,
                    expires_at: Some(verified.expires_at),
                })
            }
        }
    }

    /// Transport rule checked before a token is asked for: it travels as a
    /// cleartext password, so only over TLS or within the host.
    pub fn check_transport(&self, transport: ClientTransport) -> Result<(), PgError> {
        if self.wants_password() && !transport.tls && !transport.peer.ip().is_loopback() {
            return Err(PgError::not_authorized(
                "tokens are accepted only over TLS or from loopback; connect with sslmode=require",
            ));
        }
        Ok(())
    }
}

impl TokenAuthenticator {
    pub async fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        let keys = match self.keys.current() {
            Ok(k) => k,
            Err(_) => {
                // Perhaps the issuer is back: one rate-limited try.
                self.keys.refresh_for_kid("").await;
                self.keys.current().map_err(TokenError::NoKeys)?
            }
        };
        match token::verify(token, &keys, &self.rules, unix_now()) {
            Err(TokenError::UnknownKid(kid)) => {
                // Rotated keys: refresh once (rate-limited), then decide.
                self.keys.refresh_for_kid(&kid).await;
                let keys = self.keys.current().map_err(TokenError::NoKeys)?;
                token::verify(token, &keys, &self.rules, unix_now())
            }
            other => other,
        }
    }
}

/// `identity.pod`: the pod's service account, as the operator sent it (or,
/// standalone, as `--pod-namespace`/`--service-account` say).
fn pod_authenticator(
    pod: &pgwarden_api::PodIdentity,
    opts: &IdentityOptions,
) -> Result<Authenticator, (&'static str, String)> {
    let (Some(ns), Some(sa)) = (&opts.pod_namespace, &opts.service_account) else {
        return Err((
            "spec.identity.pod",
            "identity.pod needs the pod's namespace and service account: it is for sidecars the operator injected (the operator sends them), or pass --pod-namespace and --service-account".into(),
        ));
    };
    if !pod.service_accounts.is_empty()
        && !pod
            .service_accounts
            .iter()
            .any(|g| crate::glob::glob_match(g, sa))
    {
        // The policy is fine; this pod is not admitted by it. Refuse its
        // clients with the reason rather than refusing the whole config.
        return Ok(Authenticator::Pod(Err(format!(
            "the pod's service account {sa} is not in identity.pod.serviceAccounts"
        ))));
    }
    let mut attributes = vec![
        ("namespace".to_string(), ns.clone()),
        ("serviceAccount".to_string(), sa.clone()),
    ];
    if let Some(name) = &opts.pod_name {
        attributes.push(("pod".to_string(), name.clone()));
    }
    Ok(Authenticator::Pod(Ok(Identity {
        subject: format!("system:serviceaccount:{ns}:{sa}"),
        method: "pod",
        attributes,
        expires_at: None,
    })))
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// A jwksFile must be readable and hold a usable key when the gateway starts.
fn check_jwks_file(path: &Path) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    KeySet::from_json(&bytes)
        .map(|_| ())
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_trust_admits_loopback_only() {
        let a = Authenticator::LocalTrust {
            subject: "dev".into(),
        };
        for peer in ["127.0.0.1:5000", "[::1]:5000", "127.3.4.5:1"] {
            let id = a
                .authenticate(
                    ClientTransport {
                        peer: peer.parse().unwrap(),
                        tls: false,
                    },
                    None,
                )
                .await
                .unwrap();
            assert_eq!(id.subject, "dev");
        }
        for peer in ["10.0.0.7:5000", "[2001:db8::1]:5000", "192.168.1.2:1"] {
            let err = a
                .authenticate(
                    ClientTransport {
                        peer: peer.parse().unwrap(),
                        tls: true,
                    },
                    None,
                )
                .await
                .unwrap_err();
            assert!(err.is_fatal());
            assert!(err.message.contains("loopback"));
        }
    }

    fn pod_spec(accounts: &str) -> DatabaseAccessPolicySpec {
        serde_yaml_ng::from_str(&format!(
            "identity: {{pod: {{serviceAccounts: [{accounts}]}}}}\n\
             database: {{host: db, name: shop, credentialsSecret: s}}\n\
             defaultAction: Deny\n"
        ))
        .unwrap()
    }

    fn pod_opts() -> IdentityOptions {
        IdentityOptions {
            pod_namespace: Some("ci".into()),
            pod_name: Some("nightly-x7k2p".into()),
            service_account: Some("ci-runner".into()),
            ..IdentityOptions::default()
        }
    }

    #[tokio::test]
    async fn pod_identity_is_the_pods_service_account_on_loopback_only() {
        let auth = Authenticator::from_spec(&pod_spec(""), Path::new("."), &pod_opts()).unwrap();
        assert!(!auth.wants_password(), "no password, no token");
        let local = ClientTransport {
            peer: "127.0.0.1:4000".parse().unwrap(),
            tls: false,
        };
        let id = auth.authenticate(local, None).await.unwrap();
        assert_eq!(id.subject, "system:serviceaccount:ci:ci-runner");
        assert_eq!(id.method, "pod");
        assert!(id
            .attributes
            .contains(&("pod".to_string(), "nightly-x7k2p".to_string())));
        let remote = ClientTransport {
            peer: "10.0.0.9:4000".parse().unwrap(),
            tls: true,
        };
        let err = auth.authenticate(remote, None).await.unwrap_err();
        assert!(
            err.is_fatal() && err.message.contains("loopback"),
            "{}",
            err.message
        );
    }

    #[tokio::test]
    async fn pod_identity_admits_only_the_listed_service_accounts() {
        let local = ClientTransport {
            peer: "127.0.0.1:4000".parse().unwrap(),
            tls: false,
        };
        let ok =
            Authenticator::from_spec(&pod_spec("\"ci-*\""), Path::new("."), &pod_opts()).unwrap();
        assert!(ok.authenticate(local, None).await.is_ok());
        let other =
            Authenticator::from_spec(&pod_spec("deployer"), Path::new("."), &pod_opts()).unwrap();
        let err = other.authenticate(local, None).await.unwrap_err();
        assert!(err.is_fatal());
        assert!(err.message.contains("ci-runner"), "{}", err.message);
    }

    #[test]
    fn pod_identity_without_a_pod_is_a_config_error() {
        let (path, message) =
            Authenticator::from_spec(&pod_spec(""), Path::new("."), &IdentityOptions::default())
                .unwrap_err();
        assert_eq!(path, "spec.identity.pod");
        assert!(message.contains("--service-account"), "{message}");
    }

    #[test]
    fn tokens_travel_only_over_tls_or_loopback() {
        let spec: DatabaseAccessPolicySpec = serde_yaml_ng::from_str(
            "identity: {oidc: {issuer: \"https://issuer.example\", audiences: [pgwarden]}}\n\
             database: {host: db, name: shop, credentialsSecret: s}\n\
             defaultAction: Deny\n",
        )
        .unwrap();
        let auth =
            Authenticator::from_spec(&spec, Path::new("."), &IdentityOptions::default()).unwrap();
        assert!(auth.wants_password());
        let at = |peer: &str, tls: bool| {
            auth.check_transport(ClientTransport {
                peer: peer.parse().unwrap(),
                tls,
            })
        };
        assert!(at("127.0.0.1:1", false).is_ok());
        assert!(at("[::1]:1", false).is_ok());
        assert!(at("10.1.2.3:1", true).is_ok());
        let err = at("10.1.2.3:1", false).unwrap_err();
        assert!(err.is_fatal());
        assert!(err.message.contains("TLS"), "{}", err.message);
    }
}
