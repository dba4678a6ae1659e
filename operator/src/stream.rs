//! The config stream sidecars connect to (DESIGN §4, wire in
//! `pgwarden_api::stream`): HTTPS, one long-lived NDJSON response per
//! sidecar (`GET /v1/config`), ACK/NACK as `POST /v1/ack`.
//!
//! Sidecars speak HTTP/2 (ALPN `h2`) and send their ACKs on the stream's own
//! connection: behind a Service with several replicas, a separate connection
//! could reach a replica that never sent that version. HTTP/1.1 stays for
//! curl and older sidecars.
//!
//! Each request is authenticated by TokenReview (`auth`), except an ACK on
//! the connection of an open stream with the same token: that stream's
//! review vouches for it, so an ACK costs one API call (the pod's
//! annotation), not three. A stream holds no
//! copy of the cluster: it waits on its namespace's wakeup from the `index`,
//! recomputes its pod's snapshot and sends it only when the content changed,
//! with a heartbeat in between. ACK/NACK go to `sidecars` and to the pod's
//! annotations, which every replica's sidecars count by.

pub mod annotate;
pub mod approvals;
pub mod auth;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};
use pgwarden_api::stream::{
    encode_event, Ack, AppliedAnnotation, ErrorAnnotation, StreamEvent, ACK_PATH,
    CONFIG_APPLIED_ANNOTATION, CONFIG_ERROR_ANNOTATION, CONFIG_PATH, CONTENT_TYPE, MAX_ACK_BYTES,
};
use pgwarden_api::{
    ConfigSnapshot, SecretBytes, SnapshotPod, INJECTED_ANNOTATION, SIDECAR_AUDIENCE,
};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{info, warn};

use crate::index::{compose, Index, KeySource, Resolved};
use crate::sidecars::{PodKey, PolicyAt, Sidecars};
use auth::{BoundToken, Refusal};

/// How often an idle stream carries a heartbeat.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);

/// The stream's flags (flattened into the operator's).
#[derive(Debug, Clone, clap::Args)]
pub struct StreamArgs {
    /// Where sidecars connect (HTTPS).
    #[arg(long, env = "PGWARDEN_STREAM_ADDR", default_value = "0.0.0.0:8443")]
    pub stream_addr: std::net::SocketAddr,
    /// PEM certificate chain the stream serves; sidecars verify it with the
    /// CA that injection gives them. Default: the admission webhooks'
    /// certificate (the operator's own CA, which injection hands to sidecars).
    #[arg(long, env = "PGWARDEN_STREAM_CERT", requires = "stream_key")]
    pub stream_cert: Option<std::path::PathBuf>,
    /// PEM private key of --stream-cert.
    #[arg(long, env = "PGWARDEN_STREAM_KEY", requires = "stream_cert")]
    pub stream_key: Option<std::path::PathBuf>,
    /// Heartbeat interval of an idle stream (sidecars give up after 45 s of
    /// silence, so keep it well below).
    #[arg(long, env = "PGWARDEN_STREAM_HEARTBEAT", default_value = "15s", value_parser = parse_duration)]
    pub stream_heartbeat: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = s
        .parse::<pgwarden_api::Duration>()
        .map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d.as_std())
}

/// Starts the index (over `namespaces`, all when empty) and serves the
/// stream until `shutdown`, with --stream-cert/--stream-key or else the
/// admission webhooks' certificate (`serving_cert`, renewals followed); the
/// listener is bound before this returns.
pub async fn start(
    args: &StreamArgs,
    namespaces: &[String],
    client: Client,
    keys: Arc<dyn KeySource>,
    sidecars: Arc<Sidecars>,
    serving_cert: Option<watch::Receiver<Arc<crate::certs::ServingCert>>>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let tls = match (&args.stream_cert, &args.stream_key, serving_cert) {
        (Some(cert), Some(key), _) => {
            let read = |p: &std::path::Path| {
                std::fs::read(p).with_context(|| format!("reading {}", p.display()))
            };
            tls_config(&read(cert)?, &read(key)?).context("the stream's TLS")?
        }
        (_, _, Some(rx)) => {
            let admission = crate::admission::server::tls_config(rx).context("the stream's TLS")?;
            let mut cfg = (*admission).clone();
            cfg.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
            Arc::new(cfg)
        }
        _ => {
            warn!("no --stream-cert/--stream-key and no admission certificate (--admission-addr): the config stream is not served; sidecars get no configuration from this replica");
            return Ok(());
        }
    };
    let listener = TcpListener::bind(args.stream_addr)
        .await
        .with_context(|| format!("listening on --stream-addr {}", args.stream_addr))?;
    info!(addr = %listener.local_addr()?, "serving the config stream");
    let index = Index::start(client.clone(), namespaces);
    let server = StreamServer::new(
        client,
        index,
        keys,
        sidecars,
        args.stream_heartbeat,
        shutdown.clone(),
    );
    tokio::spawn(serve(listener, tls, server, shutdown));
    Ok(())
}

type Body = BoxBody<Bytes, Infallible>;

/// Snapshot versions. A sidecar must see versions grow across reconnects,
/// replicas and operator restarts, with no shared state: each replica counts
/// from the wall clock in milliseconds and never goes below it
/// (`max(last + 1, now_ms)`). resourceVersions cannot serve: they are
/// opaque, and a Secret's and a policy's are not comparable.
#[derive(Debug)]
pub struct VersionClock(AtomicU64);

impl Default for VersionClock {
    fn default() -> Self {
        VersionClock(AtomicU64::new(now_ms()))
    }
}

impl VersionClock {
    pub fn next(&self) -> u64 {
        let now = now_ms();
        let prev = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_add(1).max(now))
            })
            .unwrap_or_else(|v| v);
        prev.saturating_add(1).max(now)
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// What every stream of this replica shares.
pub struct StreamServer {
    client: Client,
    index: Arc<Index>,
    keys: Arc<dyn KeySource>,
    sidecars: Arc<Sidecars>,
    heartbeat: Duration,
    versions: VersionClock,
    shutdown: watch::Receiver<bool>,
    /// Decided ApprovalRequests, for the streams of the pods that opened them.
    approvals: Arc<approvals::Feed>,
    /// ACK results on their way to the pods' annotations.
    annotator: Arc<annotate::Annotator>,
}

impl std::fmt::Debug for StreamServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamServer")
            .field("heartbeat", &self.heartbeat)
            .finish_non_exhaustive()
    }
}

impl StreamServer {
    /// `shutdown` turning true ends every stream (the sidecars reconnect to
    /// another replica).
    pub fn new(
        client: Client,
        index: Arc<Index>,
        keys: Arc<dyn KeySource>,
        sidecars: Arc<Sidecars>,
        heartbeat: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<StreamServer> {
        Arc::new(StreamServer {
            client: client.clone(),
            index,
            keys,
            sidecars,
            heartbeat,
            versions: VersionClock::default(),
            shutdown,
            approvals: approvals::Feed::start(client.clone()),
            annotator: annotate::Annotator::start(client.clone()),
        })
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: Arc<Connection>,
    ) -> Response<Body> {
        let route = (req.method().clone(), req.uri().path().to_owned());
        let result = match (&route.0, route.1.as_str()) {
            (&Method::GET, CONFIG_PATH) => self.open_stream(&req, &conn).await,
            (&Method::POST, ACK_PATH) => self.ack(req, &conn).await,
            (&Method::POST, approvals::OPEN_PATH) => self.open_approval(req).await,
            (&Method::POST, approvals::CLAIM_PATH) => self.claim_approval(req).await,
            (&Method::POST, approvals::FINISH_PATH) => self.finish_approval(req).await,
            (_, CONFIG_PATH | ACK_PATH) => Err(Refusal {
                status: 405,
                reason: "method not allowed".into(),
            }),
            _ => Err(Refusal {
                status: 404,
                reason: "not found".into(),
            }),
        };
        result.unwrap_or_else(|r| text(r.status, &r.reason))
    }

    /// TokenReview, then the bound pod as the API server has it now.
    async fn authenticate(&self, req: &Request<impl Sized>) -> Result<(BoundToken, Pod), Refusal> {
        let token = auth::bearer(req.headers().get(http::header::AUTHORIZATION))?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![SIDECAR_AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| unavailable(format!("token review failed: {e}")))?;
        let bound = auth::check_review(reviewed.status.as_ref())?;
        let pod = Api::<Pod>::namespaced(self.client.clone(), &bound.pod.namespace)
            .get_opt(&bound.pod.name)
            .await
            .map_err(|e| unavailable(format!("reading the pod failed: {e}")))?;
        auth::check_pod(&bound, pod.as_ref())?;
        Ok((bound, pod.unwrap_or_default()))
    }

    async fn open_stream(
        self: &Arc<Self>,
        req: &Request<Incoming>,
        conn: &Connection,
    ) -> Result<Response<Body>, Refusal> {
        let (bound, pod) = self.authenticate(req).await.inspect_err(|r| {
            warn!(status = r.status, reason = %r.reason, "config stream refused");
        })?;
        info!(pod = %format!("{}/{}", bound.pod.namespace, bound.pod.name), "config stream opened");
        let open = conn.vouch(req, &bound);
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        tokio::spawn(self.clone().pump(bound, pod, tx, open));
        let body = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        Ok(Response::builder()
            .status(StatusCode::OK)
            .header(http::header::CONTENT_TYPE, CONTENT_TYPE)
            .header(http::header::CACHE_CONTROL, "no-store")
            .body(StreamBody::new(body).boxed())
            .unwrap_or_else(|_| text(500, "response")))
    }

    /// One sidecar's stream: a snapshot whenever its content changes, a
    /// heartbeat when idle; ends when the sidecar goes, its pod goes or stops
    /// qualifying, or the operator shuts down.
    async fn pump(
        self: Arc<Self>,
        bound: BoundToken,
        mut pod: Pod,
        tx: mpsc::Sender<Bytes>,
        open: StreamOpen,
    ) {
        // The stream's review vouches for ACKs on its connection only while
        // it lives (it ends when the pod goes or stops qualifying).
        let _open = open;
        let key = bound.pod.clone();
        let _registered = Registered::new(&self.sidecars, &key);
        let mut wake = self.index.subscribe(&key.namespace);
        let mut wake_pod = self
            .index
            .subscribe(&crate::index::pod_key(&key.namespace, &key.name));
        let mut decided = self.approvals.subscribe(&key.namespace);
        let mut shutdown = self.shutdown.clone();
        self.index.ready().await;
        // Decisions made while this sidecar was away (or before an operator
        // restart) reach it now.
        for r in self.approvals.decided_for(&bound).await {
            let line = encode_event(&StreamEvent::ApprovalDecided {
                request: Box::new((*r).clone()),
            });
            if tx.send(Bytes::from(line)).await.is_err() {
                return;
            }
        }
        let mut last: Option<(BTreeMap<String, Resolved>, Option<SecretBytes>)> = None;
        let mut problems: BTreeMap<String, String> = BTreeMap::new();
        let mut seen_in_store = false;
        loop {
            // The watch's copy of the pod (labels change); until the watch
            // has it, the one read at connect.
            match self.index.pod(&key.namespace, &key.name) {
                Some(p) if p.metadata.uid.as_deref() == Some(bound.pod_uid.as_str()) => {
                    seen_in_store = true;
                    pod = (*p).clone();
                }
                Some(_) => {
                    return info!(pod = %pod_name(&key), "config stream closed: the pod was replaced")
                }
                None if seen_in_store => {
                    return info!(pod = %pod_name(&key), "config stream closed: the pod was deleted")
                }
                None => {}
            }
            let still_injected = pod
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(INJECTED_ANNOTATION));
            if !still_injected {
                return info!(pod = %pod_name(&key), "config stream closed: the pod is no longer injected");
            }
            let resolved = self.index.resolve(&pod, self.keys.as_ref());
            let now: BTreeMap<String, String> = resolved
                .iter()
                .filter_map(|(n, r)| r.as_ref().err().map(|e| (n.clone(), e.clone())))
                .collect();
            if now != problems {
                for (policy, why) in &now {
                    warn!(pod = %pod_name(&key), policy.name = %policy, "policy left out of the snapshot (or kept at its last good version): {why}");
                }
                problems = now;
            }
            let last_sent = last.as_ref().map(|(m, _)| m.clone()).unwrap_or_default();
            let policies = compose(resolved, &last_sent);
            let masking_key = self.keys.masking_key();
            let content = (policies, masking_key);
            if last.as_ref() != Some(&content) {
                let version = self.versions.next();
                let snapshot = ConfigSnapshot {
                    version,
                    policies: content.0.values().map(|r| r.policy.clone()).collect(),
                    masking_key: content.1.clone(),
                    // What the token's review and the pod object proved
                    // (`identity.pod` takes its subject from it).
                    pod: Some(SnapshotPod {
                        namespace: key.namespace.clone(),
                        name: key.name.clone(),
                        uid: bound.pod_uid.clone(),
                        service_account: bound.service_account.clone(),
                    }),
                };
                let line = encode_event(&StreamEvent::Snapshot { snapshot });
                if tx.send(Bytes::from(line)).await.is_err() {
                    return;
                }
                let at = content
                    .0
                    .iter()
                    .map(|(name, r)| PolicyAt {
                        name: name.clone(),
                        generation: r.generation,
                    })
                    .collect();
                self.sidecars.sent(&key, version, at);
                info!(pod = %pod_name(&key), version, policies = content.0.len(), "snapshot sent");
                last = Some(content);
            }
            loop {
                tokio::select! {
                    changed = wake.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        break;
                    }
                    changed = wake_pod.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        break;
                    }
                    _ = tokio::time::sleep(self.heartbeat) => {
                        let line = encode_event(&StreamEvent::Heartbeat);
                        if tx.send(Bytes::from(line)).await.is_err() {
                            return;
                        }
                    }
                    _ = tx.closed() => return,
                    _ = shutdown.changed() => return,
                    r = decided.recv() => {
                        let requests = match r {
                            Ok(r) if approvals::Feed::is_for(&r, &bound) => vec![r],
                            Ok(_) => continue,
                            // Missed some: send this pod's decided ones again.
                            Err(broadcast::error::RecvError::Lagged(_)) => self.approvals.decided_for(&bound).await,
                            Err(broadcast::error::RecvError::Closed) => return,
                        };
                        for r in requests {
                            let line = encode_event(&StreamEvent::ApprovalDecided { request: Box::new((*r).clone()) });
                            if tx.send(Bytes::from(line)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        }
    }

    async fn ack(
        &self,
        req: Request<Incoming>,
        conn: &Connection,
    ) -> Result<Response<Body>, Refusal> {
        let bound = match conn.vouched(&req) {
            Some(b) => b,
            None => {
                self.authenticate(&req)
                    .await
                    .inspect_err(|r| {
                        warn!(status = r.status, reason = %r.reason, "config ACK refused");
                    })?
                    .0
            }
        };
        let body = Limited::new(req.into_body(), MAX_ACK_BYTES)
            .collect()
            .await
            .map_err(|_| Refusal {
                status: 400,
                reason: format!("the body must be an ACK of at most {MAX_ACK_BYTES} bytes"),
            })?
            .to_bytes();
        let ack: Ack = serde_json::from_slice(&body).map_err(|e| Refusal {
            status: 400,
            reason: format!("not an ACK: {e}"),
        })?;
        let key = bound.pod;
        let annotations = match &ack.error {
            None => {
                self.sidecars.acked(&key, ack.version);
                // The generations of what was sent under that version; an ACK
                // of a version this replica did not send records no policies.
                let policies = match self.sidecars.get(&key).and_then(|s| s.sent) {
                    Some((v, at)) if v == ack.version => {
                        at.into_iter().map(|p| (p.name, p.generation)).collect()
                    }
                    _ => return Ok(text(409, "not the version last sent to this pod")),
                };
                info!(pod = %pod_name(&key), version = ack.version, "snapshot applied");
                let applied = AppliedAnnotation {
                    version: ack.version,
                    policies,
                };
                serde_json::json!({
                    CONFIG_APPLIED_ANNOTATION: serde_json::to_string(&applied).unwrap_or_default(),
                    CONFIG_ERROR_ANNOTATION: null,
                })
            }
            Some(error) => {
                warn!(pod = %pod_name(&key), version = ack.version, error = %error, "snapshot refused by the sidecar");
                self.sidecars.nacked(&key, ack.version, error.clone());
                let e = ErrorAnnotation {
                    version: ack.version,
                    error: error.clone(),
                };
                serde_json::json!({ CONFIG_ERROR_ANNOTATION: serde_json::to_string(&e).unwrap_or_default() })
            }
        };
        self.annotator.record(key, annotations);
        Ok(text(200, "ok"))
    }
}

fn pod_name(k: &PodKey) -> String {
    format!("{}/{}", k.namespace, k.name)
}

fn unavailable(reason: String) -> Refusal {
    Refusal {
        status: 503,
        reason,
    }
}

fn text(status: u16, body: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{body}\n"))).boxed());
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// One client connection (TLS session). Remembers the open stream's
/// review so that ACKs on the same connection, with the same token, need no
/// second one.
#[derive(Default)]
pub struct Connection {
    stream: Mutex<Option<Vouched>>,
}

struct Vouched {
    /// SHA-256 of the bearer token: the token itself is not kept.
    token: [u8; 32],
    bound: BoundToken,
    open: Arc<AtomicBool>,
}

/// Held by a stream's pump; dropping it withdraws the stream's vouching.
pub struct StreamOpen(Arc<AtomicBool>);

impl Drop for StreamOpen {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

fn token_digest(req: &Request<impl Sized>) -> Option<[u8; 32]> {
    let token = auth::bearer(req.headers().get(http::header::AUTHORIZATION)).ok()?;
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    d.as_ref().try_into().ok()
}

impl Connection {
    /// Records that `req`'s token was reviewed as `bound` for a stream on
    /// this connection.
    fn vouch(&self, req: &Request<impl Sized>, bound: &BoundToken) -> StreamOpen {
        let open = Arc::new(AtomicBool::new(true));
        if let Some(token) = token_digest(req) {
            let mut s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
            *s = Some(Vouched {
                token,
                bound: bound.clone(),
                open: open.clone(),
            });
        }
        StreamOpen(open)
    }

    /// The pod an open stream on this connection proved `req`'s token is
    /// bound to, if it carries the same token.
    fn vouched(&self, req: &Request<impl Sized>) -> Option<BoundToken> {
        let token = token_digest(req)?;
        let s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        let v = s.as_ref()?;
        // Digests of secrets: a timing difference reveals nothing useful.
        (v.open.load(Ordering::Acquire) && v.token == token).then(|| v.bound.clone())
    }
}

/// Connected in `sidecars` for as long as it lives.
struct Registered<'a> {
    sidecars: &'a Sidecars,
    pod: &'a PodKey,
}

impl<'a> Registered<'a> {
    fn new(sidecars: &'a Sidecars, pod: &'a PodKey) -> Self {
        sidecars.connected(pod);
        Registered { sidecars, pod }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.sidecars.disconnected(self.pod);
    }
}

/// The protocols the stream speaks: HTTP/2 for sidecars, HTTP/1.1 for curl.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The server's TLS from PEM: its certificate chain and key.
pub fn tls_config(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem).collect::<Result<Vec<_>, _>>()?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in the PEM");
    let key = PrivateKeyDer::from_pem_slice(key_pem)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// Accepts sidecars until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    server: Arc<StreamServer>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "config stream: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, server) = (acceptor.clone(), server.clone());
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        return warn!(%peer, error = %e, "config stream: TLS handshake failed")
                    }
                    Err(_) => return warn!(%peer, "config stream: TLS handshake timed out"),
                };
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
            let conn = Arc::new(Connection::default());
            let service = hyper::service::service_fn(move |req| {
                let (server, conn) = (server.clone(), conn.clone());
                async move { Ok::<_, Infallible>(server.handle(req, conn).await) }
            });
            let io = hyper_util::rt::TokioIo::new(tls);
            if h2 {
                // A sidecar needs a handful of streams (config, ACKs,
                // approval calls); pings find a peer that vanished.
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .timer(hyper_util::rt::TokioTimer::new())
                        .max_concurrent_streams(32)
                        .keep_alive_interval(Some(Duration::from_secs(30)))
                        .keep_alive_timeout(Duration::from_secs(20))
                        .serve_connection(io, service)
                        .await;
            } else {
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(io, service)
                    .await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_only_grow_and_start_at_the_wall_clock() {
        let before = now_ms();
        let clock = VersionClock::default();
        let a = clock.next();
        let b = clock.next();
        assert!(a >= before && b > a, "{before} {a} {b}");
        // A replica started later begins above what an earlier one issued
        // (as long as it issued fewer than one per millisecond).
        std::thread::sleep(Duration::from_millis(3));
        let later = VersionClock::default();
        assert!(later.next() > b);
    }
}
