//! The serving certificate of the admission webhooks (and, for the config
//! stream, see [`ServingCert`]): a CA the operator makes itself (10 years)
//! and a serving certificate for `SERVICE.NAMESPACE.svc` signed by it (1
//! year), kept in a Secret in the operator's namespace. Every replica checks
//! the Secret periodically: it is created when missing (deleted: a new CA;
//! racing replicas adopt the winner's on 409), the serving certificate is
//! reissued under the same CA when fewer than [`RENEW_BEFORE`] remain, and
//! `caBundle` is patched into the webhook configurations the operator owns.
//! New certificates reach the TLS servers through a `watch` channel: no
//! restart. With `--tls-cert-file` (cert-manager) the files are used as they
//! are and re-read at each check.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use tokio::sync::watch;
use tracing::{info, warn};

/// Reissue a certificate when fewer than this many days remain.
pub const RENEW_BEFORE: SignedDuration = SignedDuration::from_hours(30 * 24);
const CA_LIFETIME: SignedDuration = SignedDuration::from_hours(3650 * 24);
const SERVING_LIFETIME: SignedDuration = SignedDuration::from_hours(365 * 24);
const CA_NAME: &str = "pgwarden-operator-ca";

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const TLS_CERT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
const CA_NOT_AFTER: &str = "pgwarden.io/ca-not-after";
const SERVING_NOT_AFTER: &str = "pgwarden.io/serving-not-after";
const SERVING_SANS: &str = "pgwarden.io/serving-sans";

/// What a TLS server of the operator serves: its certificate (chain), key,
/// and the CA clients verify it with (the webhook configurations' caBundle,
/// the CA injection gives sidecars).
///
/// For the config stream (H6 / `stream`): subscribe to the same
/// `watch::Receiver<Arc<ServingCert>>` the admission server gets from
/// [`Certs::subscribe`] and build the rustls config from `cert_pem` and
/// `key_pem` (or use [`ServerCertResolver`], which follows renewals); its
/// SANs include `SERVICE.NAMESPACE.svc`, the URL injection gives sidecars.
#[derive(Clone, PartialEq, Eq)]
pub struct ServingCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("cert_pem", &self.cert_pem.len())
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        source: Box<kube::Error>,
    },
    #[error("reading {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
}

/// Where the certificate comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// The operator's own CA in `namespace/secret`.
    Bootstrap {
        namespace: String,
        secret: String,
        /// DNS names or IP addresses of the serving certificate.
        sans: Vec<String>,
    },
    /// Files someone else renews (cert-manager).
    Files {
        cert: std::path::PathBuf,
        key: std::path::PathBuf,
        ca: std::path::PathBuf,
    },
}

/// The CA and serving certificate as the Secret keeps them.
#[derive(Clone, PartialEq, Eq)]
struct Bundle {
    ca_key_pem: String,
    serving: ServingCert,
    ca_not_after: Timestamp,
    serving_not_after: Timestamp,
    sans: Vec<String>,
}

/// What a check decides about a stored bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Renewal {
    Keep,
    /// Same CA, new serving certificate (expiring, or other SANs).
    Serving,
    /// The CA itself expires.
    All,
}

fn renewal(b: &Bundle, sans: &[String], now: Timestamp) -> Renewal {
    if b.ca_not_after.duration_since(now) < RENEW_BEFORE {
        Renewal::All
    } else if b.serving_not_after.duration_since(now) < RENEW_BEFORE || b.sans != sans {
        Renewal::Serving
    } else {
        Renewal::Keep
    }
}

/// Validity with day precision (rcgen takes calendar dates), starting a day
/// early for clocks a little behind.
fn set_validity(params: &mut CertificateParams, now: Timestamp, until: Timestamp) {
    let ymd = |t: Timestamp| {
        let d = t.to_zoned(jiff::tz::TimeZone::UTC).date();
        rcgen::date_time_ymd(
            i32::from(d.year()),
            u8::try_from(d.month()).unwrap_or(1),
            u8::try_from(d.day()).unwrap_or(1),
        )
    };
    params.not_before = ymd(now - SignedDuration::from_hours(24));
    params.not_after = ymd(until);
}

/// The CA's parameters: the same every time, so a stored CA key rebuilds
/// the issuer that signed the stored certificate.
fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

/// A new bundle: a new CA unless `ca` (its certificate, key, expiry) is given.
fn issue(
    ca: Option<(&str, &str, Timestamp)>,
    sans: &[String],
    now: Timestamp,
) -> Result<Bundle, CertError> {
    let (ca_pem, ca_key, ca_not_after) = match ca {
        Some((cert, key, not_after)) => (cert.to_owned(), KeyPair::from_pem(key)?, not_after),
        None => {
            let key = KeyPair::generate()?;
            let mut p = ca_params();
            let until = now + CA_LIFETIME;
            set_validity(&mut p, now, until);
            (p.self_signed(&key)?.pem(), key, until)
        }
    };
    let issuer = Issuer::new(ca_params(), &ca_key);
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(sans.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        sans.first()
            .map(String::as_str)
            .unwrap_or("pgwarden-operator"),
    );
    p.distinguished_name = dn;
    p.use_authority_key_identifier_extension = true;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let until = (now + SERVING_LIFETIME).min(ca_not_after);
    set_validity(&mut p, now, until);
    let cert = p.signed_by(&key, &issuer)?;
    Ok(Bundle {
        ca_key_pem: ca_key.serialize_pem(),
        serving: ServingCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem,
        },
        ca_not_after,
        serving_not_after: until,
        sans: sans.to_vec(),
    })
}

/// A stored bundle, or None when anything is missing or unreadable (then a
/// new CA replaces it: a damaged Secret must not keep the webhooks down).
fn from_secret(s: &Secret) -> Option<Bundle> {
    let data = s.data.as_ref()?;
    let text = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .filter(|t| !t.is_empty())
    };
    let ann = s.metadata.annotations.as_ref()?;
    let time = |k: &str| ann.get(k)?.parse::<Timestamp>().ok();
    let sans = ann
        .get(SERVING_SANS)?
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    // The key must parse, or reissuing under this CA would fail later.
    let ca_key_pem = text(CA_KEY)?;
    KeyPair::from_pem(&ca_key_pem).ok()?;
    Some(Bundle {
        ca_key_pem,
        serving: ServingCert {
            cert_pem: text(TLS_CERT)?,
            key_pem: text(TLS_KEY)?,
            ca_pem: text(CA_CERT)?,
        },
        ca_not_after: time(CA_NOT_AFTER)?,
        serving_not_after: time(SERVING_NOT_AFTER)?,
        sans,
    })
}

fn to_secret(b: &Bundle, name: &str, resource_version: Option<String>) -> Secret {
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            resource_version,
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "pgwarden-operator".to_owned(),
            )])),
            annotations: Some(BTreeMap::from([
                (CA_NOT_AFTER.to_owned(), b.ca_not_after.to_string()),
                (
                    SERVING_NOT_AFTER.to_owned(),
                    b.serving_not_after.to_string(),
                ),
                (SERVING_SANS.to_owned(), b.sans.join(",")),
            ])),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(BTreeMap::from([
            (CA_CERT.to_owned(), bytes(&b.serving.ca_pem)),
            (CA_KEY.to_owned(), bytes(&b.ca_key_pem)),
            (TLS_CERT.to_owned(), bytes(&b.serving.cert_pem)),
            (TLS_KEY.to_owned(), bytes(&b.serving.key_pem)),
        ])),
        ..Secret::default()
    }
}

/// The certificate in force, kept current by [`Certs::run`].
pub struct Certs {
    client: Client,
    source: Source,
    /// Webhook configurations (Mutating and Validating, same name) whose
    /// caBundle this keeps; empty: none.
    webhook_configs: Vec<String>,
    tx: watch::Sender<Arc<ServingCert>>,
}

impl Certs {
    /// Loads (or creates) the certificate once; fails when it cannot.
    pub async fn start(
        client: Client,
        source: Source,
        webhook_configs: Vec<String>,
    ) -> Result<Certs, CertError> {
        let first = current(&client, &source, Timestamp::now()).await?;
        let (tx, _) = watch::channel(Arc::new(first));
        let certs = Certs {
            client,
            source,
            webhook_configs,
            tx,
        };
        certs.patch_ca_bundles().await;
        Ok(certs)
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<ServingCert>> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Arc<ServingCert> {
        self.tx.borrow().clone()
    }

    /// Checks every `interval` until `shutdown`.
    pub async fn run(self, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            match current(&self.client, &self.source, Timestamp::now()).await {
                Ok(c) => {
                    let changed = **self.tx.borrow() != c;
                    if changed {
                        info!("serving certificate changed; serving the new one");
                        self.tx.send_replace(Arc::new(c));
                    }
                    self.patch_ca_bundles().await;
                }
                Err(e) => warn!(error = %e, "checking the serving certificate"),
            }
        }
    }

    /// Puts the CA in force into every webhook of the configurations this
    /// operator owns (only where it differs; a missing configuration is
    /// logged, not fatal: the chart may install them later).
    async fn patch_ca_bundles(&self) {
        let ca = self.current().ca_pem.clone();
        for name in &self.webhook_configs {
            let mutating: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
            let validating: Api<ValidatingWebhookConfiguration> = Api::all(self.client.clone());
            let m = mutating.get_opt(name).await.map(|c| {
                c.map(|c| {
                    c.webhooks
                        .unwrap_or_default()
                        .into_iter()
                        .map(|w| (w.name, w.client_config.ca_bundle))
                        .collect::<Vec<_>>()
                })
            });
            let v = validating.get_opt(name).await.map(|c| {
                c.map(|c| {
                    c.webhooks
                        .unwrap_or_default()
                        .into_iter()
                        .map(|w| (w.name, w.client_config.ca_bundle))
                        .collect::<Vec<_>>()
                })
            });
            for (kind, hooks) in [("Mutating", m), ("Validating", v)] {
                let hooks = match hooks {
                    Ok(Some(h)) => h,
                    Ok(None) => {
                        tracing::debug!(config = %name, kind, "no such webhook configuration");
                        continue;
                    }
                    Err(e) => {
                        warn!(error = %e, config = %name, kind, "reading a webhook configuration");
                        continue;
                    }
                };
                let Some(patch) = ca_bundle_patch(&hooks, ca.as_bytes()) else {
                    continue;
                };
                let params = PatchParams::default();
                let r = match kind {
                    "Mutating" => mutating.patch(name, &params, &patch).await.map(|_| ()),
                    _ => validating.patch(name, &params, &patch).await.map(|_| ()),
                };
                match r {
                    Ok(()) => info!(config = %name, kind, "patched caBundle"),
                    // Another replica patched first, or the list changed:
                    // the next check sees the new state.
                    Err(e) => warn!(error = %e, config = %name, kind, "patching caBundle"),
                }
            }
        }
    }
}

/// The JSON Patch that sets `ca` in every webhook lacking it; each `add` is
/// guarded by a `test` of the webhook's name, so a list changed meanwhile
/// fails the patch instead of writing into the wrong webhook.
fn ca_bundle_patch(hooks: &[(String, Option<ByteString>)], ca: &[u8]) -> Option<Patch<()>> {
    let mut ops = Vec::new();
    for (i, (name, bundle)) in hooks.iter().enumerate() {
        if bundle.as_ref().is_some_and(|b| b.0 == ca) {
            continue;
        }
        ops.push(
            serde_json::json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": name}),
        );
        ops.push(
            serde_json::json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"),
            "value": base64::engine::general_purpose::STANDARD.encode(ca)}),
        );
    }
    if ops.is_empty() {
        return None;
    }
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops)).ok()?;
    Some(Patch::Json(patch))
}

/// The certificate as the source has it now, creating or renewing the
/// bootstrap Secret as needed.
async fn current(
    client: &Client,
    source: &Source,
    now: Timestamp,
) -> Result<ServingCert, CertError> {
    match source {
        Source::Files { cert, key, ca } => {
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p).map_err(|source| CertError::File {
                    path: p.display().to_string(),
                    source,
                })
            };
            Ok(ServingCert {
                cert_pem: read(cert)?,
                key_pem: read(key)?,
                ca_pem: read(ca)?,
            })
        }
        Source::Bootstrap {
            namespace,
            secret,
            sans,
        } => bootstrap(client, namespace, secret, sans, now)
            .await
            .map(|b| b.serving),
    }
}

async fn bootstrap(
    client: &Client,
    namespace: &str,
    name: &str,
    sans: &[String],
    now: Timestamp,
) -> Result<Bundle, CertError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let api_err = |source| CertError::Api {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source: Box::new(source),
    };
    // Two rounds: a lost race (409) re-reads the winner's Secret.
    for _ in 0..2 {
        let existing = api.get_opt(name).await.map_err(api_err)?;
        let stored = existing.as_ref().and_then(from_secret);
        let bundle = match &stored {
            Some(b) => match renewal(b, sans, now) {
                Renewal::Keep => return Ok(b.clone()),
                Renewal::Serving => issue(
                    Some((&b.serving.ca_pem, &b.ca_key_pem, b.ca_not_after)),
                    sans,
                    now,
                )?,
                Renewal::All => issue(None, sans, now)?,
            },
            None => issue(None, sans, now)?,
        };
        let written = match &existing {
            None => api
                .create(&PostParams::default(), &to_secret(&bundle, name, None))
                .await
                .map(|_| ()),
            Some(s) => {
                if stored.is_none() {
                    warn!(
                        secret.namespace = namespace,
                        secret.name = name,
                        "the webhook TLS Secret is incomplete; replacing it with a new CA"
                    );
                }
                let rv = s.metadata.resource_version.clone();
                api.replace(name, &PostParams::default(), &to_secret(&bundle, name, rv))
                    .await
                    .map(|_| ())
            }
        };
        match written {
            Ok(()) => {
                info!(secret.namespace = namespace, secret.name = name, not_after = %bundle.serving_not_after, "issued the webhook serving certificate");
                return Ok(bundle);
            }
            Err(kube::Error::Api(s)) if s.is_already_exists() || s.code == 409 => continue,
            Err(e) => return Err(api_err(e)),
        }
    }
    let s = api.get(name).await.map_err(api_err)?;
    from_secret(&s).ok_or_else(|| {
        api_err(kube::Error::Service(
            "the Secret changed under us twice and is still incomplete".into(),
        ))
    })
}

/// A rustls certificate resolver that follows renewals: each handshake
/// takes the certificate in force.
#[derive(Debug)]
pub struct ServerCertResolver {
    current: std::sync::RwLock<(Arc<ServingCert>, Arc<rustls::sign::CertifiedKey>)>,
    rx: watch::Receiver<Arc<ServingCert>>,
}

impl ServerCertResolver {
    pub fn new(rx: watch::Receiver<Arc<ServingCert>>) -> anyhow::Result<ServerCertResolver> {
        let first = rx.borrow().clone();
        let key = certified_key(&first)?;
        Ok(ServerCertResolver {
            current: std::sync::RwLock::new((first, key)),
            rx,
        })
    }

    fn key(&self) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let latest = self.rx.borrow().clone();
        {
            let cur = self.current.read().unwrap_or_else(|e| e.into_inner());
            if Arc::ptr_eq(&cur.0, &latest) {
                return Some(cur.1.clone());
            }
        }
        match certified_key(&latest) {
            Ok(key) => {
                let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
                *cur = (latest, key.clone());
                Some(key)
            }
            Err(e) => {
                // Keep serving the previous certificate.
                warn!(error = %e, "the new serving certificate does not load");
                let cur = self.current.read().unwrap_or_else(|e| e.into_inner());
                Some(cur.1.clone())
            }
        }
    }
}

impl rustls::server::ResolvesServerCert for ServerCertResolver {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.key()
    }
}

fn certified_key(c: &ServingCert) -> anyhow::Result<Arc<rustls::sign::CertifiedKey>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs =
        CertificateDer::pem_slice_iter(c.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in the PEM");
    let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes())
        .map_err(|_| anyhow::anyhow!("the serving key does not parse"))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|_| anyhow::anyhow!("the serving key is not usable"))?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(certs, key)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier as _;

    fn sans() -> Vec<String> {
        vec![
            "pgwarden-operator.pgwarden-system.svc".into(),
            "127.0.0.1".into(),
        ]
    }

    /// The serving certificate verifies against the CA for its names, with
    /// rustls' own verifier (what kube-apiserver-like clients do).
    fn verifies(b: &Bundle, name: &str) -> bool {
        verifies_at(b, name, Timestamp::now())
    }

    fn verifies_at(b: &Bundle, name: &str, at: Timestamp) -> bool {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(b.serving.ca_pem.as_bytes()).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let v =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        let leaf = CertificateDer::from_pem_slice(b.serving.cert_pem.as_bytes()).unwrap();
        v.verify_server_cert(
            &leaf,
            &[],
            &ServerName::try_from(name.to_owned()).unwrap(),
            &[],
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                u64::try_from(at.as_second()).unwrap(),
            )),
        )
        .is_ok()
    }

    #[test]
    fn issued_certificate_verifies_and_round_trips_through_the_secret() {
        let now = Timestamp::now();
        let b = issue(None, &sans(), now).unwrap();
        assert!(verifies(&b, "pgwarden-operator.pgwarden-system.svc"));
        assert!(verifies(&b, "127.0.0.1"));
        assert!(!verifies(&b, "other.pgwarden-system.svc"));
        let s = to_secret(&b, "pgwarden-webhook-tls", None);
        let back = from_secret(&s).unwrap();
        assert!(back == b);
        assert_eq!(renewal(&back, &sans(), now), Renewal::Keep);
        certified_key(&back.serving).unwrap();
        assert!(!format!("{:?}", b.serving).contains("PRIVATE"));
    }

    #[test]
    fn renewal_keeps_the_ca_until_it_expires() {
        let now = Timestamp::now();
        let b = issue(None, &sans(), now).unwrap();
        let later = now + SignedDuration::from_hours(340 * 24);
        assert_eq!(renewal(&b, &sans(), later), Renewal::Serving);
        let renewed = issue(
            Some((&b.serving.ca_pem, &b.ca_key_pem, b.ca_not_after)),
            &sans(),
            later,
        )
        .unwrap();
        assert_eq!(renewed.serving.ca_pem, b.serving.ca_pem);
        assert_ne!(renewed.serving.cert_pem, b.serving.cert_pem);
        // Signed by the same CA: verifies against the old caBundle.
        let at = later + SignedDuration::from_hours(1);
        assert!(verifies_at(&renewed, "127.0.0.1", at));
        assert!(!verifies_at(
            &b,
            "127.0.0.1",
            at + SignedDuration::from_hours(30 * 24)
        ));
        // Other names: reissued at once.
        assert_eq!(renewal(&b, &["x.y.svc".to_owned()], now), Renewal::Serving);
        let ca_end = now + CA_LIFETIME - SignedDuration::from_hours(24);
        assert_eq!(renewal(&b, &sans(), ca_end), Renewal::All);
    }

    #[test]
    fn a_damaged_secret_is_replaced() {
        let b = issue(None, &sans(), Timestamp::now()).unwrap();
        let mut s = to_secret(&b, "t", None);
        s.data.as_mut().unwrap().remove(CA_KEY);
        assert!(from_secret(&s).is_none());
        let mut s = to_secret(&b, "t", None);
        s.data
            .as_mut()
            .unwrap()
            .insert(CA_KEY.into(), ByteString(b"garbage".to_vec()));
        assert!(from_secret(&s).is_none());
    }

    #[test]
    fn ca_bundle_patch_only_where_missing() {
        let ca = b"CA";
        assert!(ca_bundle_patch(&[("a".into(), Some(ByteString(ca.to_vec())))], ca).is_none());
        let Some(Patch::Json(p)) = ca_bundle_patch(
            &[
                ("a".into(), Some(ByteString(ca.to_vec()))),
                ("b".into(), None),
            ],
            ca,
        ) else {
            panic!()
        };
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(
            v,
            serde_json::json!([
                {"op": "test", "path": "/webhooks/1/name", "value": "b"},
                {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": "Q0E="},
            ])
        );
    }
}
