//! The operator's admission webhooks (DESIGN §4 "Admission"): one HTTPS
//! server on every replica, AdmissionReview v1 in and out, a webhook per
//! path. Pods: `/inject` (mutating, [`inject`]) and `/guard` (validating,
//! [`guard`]); ApprovalRequests register theirs under `/approvals/...`
//! through [`Dispatcher::route`].

pub mod guard;
pub mod inject;
pub mod pods;
pub mod policies;
pub mod server;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use http::StatusCode;
use serde_json::{json, Value};

use crate::certs;

#[cfg(test)]
mod tests;

/// Largest AdmissionReview accepted: a pod and its old version (each at most
/// etcd's 1.5 MiB) with room to spare; more is refused with 413 unread.
pub const MAX_REVIEW_BYTES: usize = 7 * 1024 * 1024;

pub const INJECT_PATH: &str = "/inject";
pub const GUARD_PATH: &str = "/guard";
pub const APPROVALS_MUTATE_PATH: &str = "/approvals/mutate";
pub const APPROVALS_VALIDATE_PATH: &str = "/approvals/validate";

/// The admission server's and injection's flags (flattened into the operator's).
#[derive(Debug, Clone, clap::Args)]
pub struct AdmissionArgs {
    /// Where the API server calls the webhooks (HTTPS), e.g. 0.0.0.0:9443.
    /// Without it no webhook is served (and no certificate made): pods that
    /// the webhook configurations cover are then refused (failurePolicy Fail).
    #[arg(long, env = "PGWARDEN_ADMISSION_ADDR")]
    pub admission_addr: Option<SocketAddr>,
    /// The operator's Service (in --namespace): the serving certificate's
    /// name and the default --operator-url.
    #[arg(
        long,
        env = "PGWARDEN_SERVICE_NAME",
        default_value = "pgwarden-operator"
    )]
    pub service_name: String,
    /// The config stream's URL as injected sidecars reach it (default:
    /// https://SERVICE.NAMESPACE.svc:8443).
    #[arg(long, env = "PGWARDEN_OPERATOR_URL")]
    pub operator_url: Option<String>,
    /// Name of the Mutating- and ValidatingWebhookConfiguration whose
    /// caBundle the operator keeps (empty: none).
    #[arg(long, env = "PGWARDEN_WEBHOOK_CONFIG_NAME", default_value = "pgwarden")]
    pub webhook_config_name: String,
    /// Secret (in --namespace) with the operator's CA and serving certificate.
    #[arg(
        long,
        env = "PGWARDEN_WEBHOOK_TLS_SECRET",
        default_value = "pgwarden-webhook-tls"
    )]
    pub webhook_tls_secret: String,
    /// More names (DNS or IP) for the serving certificate; repeatable.
    #[arg(long = "serving-cert-san", value_name = "NAME")]
    pub serving_cert_sans: Vec<String>,
    /// Serve this certificate instead of the operator's own CA (cert-manager);
    /// needs --tls-key-file and --ca-file. Re-read at every check.
    #[arg(
        long,
        env = "PGWARDEN_TLS_CERT_FILE",
        requires_all = ["tls_key_file", "ca_file"]
    )]
    pub tls_cert_file: Option<PathBuf>,
    #[arg(long, env = "PGWARDEN_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// The CA of --tls-cert-file (what sidecars and caBundle get).
    #[arg(long, env = "PGWARDEN_CA_FILE", requires = "tls_cert_file")]
    pub ca_file: Option<PathBuf>,
    /// How often the certificate is checked (renewal, a deleted Secret, caBundle).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub cert_check_interval: std::time::Duration,

    /// The sidecar's image.
    #[arg(long, env = "PGWARDEN_SIDECAR_IMAGE", default_value = concat!("ghcr.io/pgwarden/pgwarden:", env!("CARGO_PKG_VERSION")))]
    pub sidecar_image: String,
    #[arg(long, env = "PGWARDEN_SIDECAR_IMAGE_PULL_POLICY")]
    pub sidecar_image_pull_policy: Option<String>,
    /// The gateway's port on each pod's loopback (the apps' PGPORT).
    #[arg(long, env = "PGWARDEN_SIDECAR_PORT", default_value_t = 5432)]
    pub sidecar_port: u16,
    /// The sidecar's /healthz and /readyz (probed by the kubelet on the pod IP).
    #[arg(long, env = "PGWARDEN_SIDECAR_METRICS_PORT", default_value_t = 9102)]
    pub sidecar_metrics_port: u16,
    #[arg(long, default_value = "50m", value_parser = parse_quantity)]
    pub sidecar_cpu_request: String,
    #[arg(long, default_value = "32Mi", value_parser = parse_quantity)]
    pub sidecar_memory_request: String,
    #[arg(long, value_parser = parse_quantity)]
    pub sidecar_cpu_limit: Option<String>,
    #[arg(long, default_value = "128Mi", value_parser = parse_quantity)]
    pub sidecar_memory_limit: Option<String>,
    /// Lifetime of the sidecar's projected token (Kubernetes' minimum is 600).
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(i64).range(600..=86400))]
    pub sidecar_token_expiration_seconds: i64,
    /// The sidecars' --operator-stale-after (their default when unset).
    #[arg(long, env = "PGWARDEN_SIDECAR_STALE_AFTER", value_parser = parse_stale)]
    pub sidecar_stale_after: Option<String>,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = s
        .parse::<pgwarden_api::Duration>()
        .map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d.as_std())
}

fn parse_stale(s: &str) -> Result<String, String> {
    parse_duration(s).map(|_| s.to_owned())
}

fn parse_quantity(s: &str) -> Result<String, String> {
    match inject::is_quantity(s) {
        true => Ok(s.to_owned()),
        false => Err("not a positive Kubernetes quantity (e.g. 50m, 0.5, 64Mi)".into()),
    }
}

impl AdmissionArgs {
    /// Where the certificate comes from, with the Service's names.
    pub fn cert_source(&self, namespace: &str) -> certs::Source {
        match (&self.tls_cert_file, &self.tls_key_file, &self.ca_file) {
            (Some(cert), Some(key), Some(ca)) => certs::Source::Files {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            },
            _ => {
                let svc = format!("{}.{namespace}.svc", self.service_name);
                let mut sans = vec![svc.clone(), format!("{svc}.cluster.local")];
                sans.extend(self.serving_cert_sans.iter().cloned());
                certs::Source::Bootstrap {
                    namespace: namespace.to_owned(),
                    secret: self.webhook_tls_secret.clone(),
                    sans,
                }
            }
        }
    }

    /// What injection puts into pods (the CA is filled per request from
    /// the certificate in force).
    pub fn inject_settings(&self, namespace: &str) -> inject::InjectSettings {
        inject::InjectSettings {
            image: self.sidecar_image.clone(),
            image_pull_policy: self.sidecar_image_pull_policy.clone(),
            operator_url: self
                .operator_url
                .clone()
                .unwrap_or_else(|| format!("https://{}.{namespace}.svc:8443", self.service_name)),
            ca_pem: String::new(),
            port: self.sidecar_port,
            metrics_port: self.sidecar_metrics_port,
            resources: inject::SidecarResources {
                cpu_request: self.sidecar_cpu_request.clone(),
                memory_request: self.sidecar_memory_request.clone(),
                cpu_limit: self.sidecar_cpu_limit.clone(),
                memory_limit: self.sidecar_memory_limit.clone(),
            },
            token_expiration_seconds: self.sidecar_token_expiration_seconds,
            stale_after: self.sidecar_stale_after.clone(),
        }
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One webhook: the AdmissionReview's `request` in (its `uid` is there),
/// the review's `response` out (the dispatcher sets `uid`).
pub trait Webhook: Send + Sync {
    fn review<'a>(&'a self, request: &'a Value) -> BoxFuture<'a, Value>;
}

/// `response` admitting unchanged.
pub fn allow() -> Value {
    json!({"allowed": true})
}

/// `response` refusing; kubectl prints `admission webhook "…" denied the
/// request: MESSAGE`.
pub fn deny(message: impl Into<String>) -> Value {
    json!({"allowed": false, "status": {"code": 403, "reason": "Forbidden", "message": message.into()}})
}

/// `response` admitting with a JSON Patch (none when `ops` is empty).
pub fn allow_patched(ops: &[inject::PatchOp]) -> Value {
    use base64::Engine as _;
    if ops.is_empty() {
        return allow();
    }
    match serde_json::to_vec(ops) {
        Ok(bytes) => json!({"allowed": true, "patchType": "JSONPatch",
            "patch": base64::engine::general_purpose::STANDARD.encode(bytes)}),
        Err(_) => deny("internal error encoding the patch"),
    }
}

/// Webhooks by path.
#[derive(Default, Clone)]
pub struct Dispatcher {
    routes: BTreeMap<&'static str, Arc<dyn Webhook>>,
}

impl Dispatcher {
    pub fn route(mut self, path: &'static str, hook: Arc<dyn Webhook>) -> Dispatcher {
        self.routes.insert(path, hook);
        self
    }

    /// A whole AdmissionReview body in, the status and body to answer out.
    /// A body that is no AdmissionReview v1 with a request and uid is 400
    /// (the API server treats it as the webhook failing: failurePolicy).
    pub async fn handle(&self, path: &str, body: &[u8]) -> (StatusCode, Value) {
        let Some(hook) = self.routes.get(path) else {
            return (StatusCode::NOT_FOUND, json!({"error": "no webhook here"}));
        };
        let review = match parse_review(body) {
            Ok(r) => r,
            Err(msg) => return (StatusCode::BAD_REQUEST, json!({"error": msg})),
        };
        let uid = review["request"]["uid"].clone();
        let mut response = hook.review(&review["request"]).await;
        response["uid"] = uid;
        (
            StatusCode::OK,
            json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}),
        )
    }
}

fn parse_review(body: &[u8]) -> Result<Value, &'static str> {
    let v: Value = serde_json::from_slice(body).map_err(|_| "the body is not JSON")?;
    if v["apiVersion"] != "admission.k8s.io/v1" || v["kind"] != "AdmissionReview" {
        return Err("not an admission.k8s.io/v1 AdmissionReview");
    }
    match v["request"]["uid"].as_str() {
        Some(uid) if !uid.is_empty() => Ok(v),
        _ => Err("the AdmissionReview has no request.uid"),
    }
}

/// With --admission-addr: loads (or creates) the serving certificate, keeps
/// it current, binds and serves the pod webhooks plus `extra` routes until
/// `shutdown`. Returns the certificate's channel (other TLS servers of the
/// operator can serve the same certificate); None without --admission-addr.
pub async fn start(
    args: &AdmissionArgs,
    namespace: &str,
    client: kube::Client,
    extra: Vec<(&'static str, Arc<dyn Webhook>)>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Option<tokio::sync::watch::Receiver<Arc<certs::ServingCert>>>> {
    use anyhow::Context as _;
    let Some(addr) = args.admission_addr else {
        tracing::warn!("no --admission-addr: admission webhooks are not served by this replica");
        return Ok(None);
    };
    let configs = match args.webhook_config_name.as_str() {
        "" => vec![],
        name => vec![name.to_owned()],
    };
    let certs = certs::Certs::start(client.clone(), args.cert_source(namespace), configs)
        .await
        .context("the webhooks' serving certificate")?;
    let cert = certs.subscribe();
    tokio::spawn(certs.run(args.cert_check_interval, shutdown.clone()));
    let pods = pods::Pods::new(
        client,
        args.inject_settings(namespace),
        namespace.to_owned(),
        args.webhook_tls_secret.clone(),
        cert.clone(),
    );
    let dispatcher = Dispatcher::default()
        .route(INJECT_PATH, Arc::new(pods::Inject(pods.clone())))
        .route(GUARD_PATH, Arc::new(pods::Guard(pods)));
    let (path, hook) = policies::route();
    let mut dispatcher = dispatcher.route(path, hook);
    for (path, hook) in extra {
        dispatcher = dispatcher.route(path, hook);
    }
    let tls = server::tls_config(cert.clone()).context("the webhooks' TLS")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on --admission-addr {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "serving admission webhooks");
    tokio::spawn(server::serve(listener, tls, Arc::new(dispatcher), shutdown));
    Ok(Some(cert))
}
