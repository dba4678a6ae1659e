//! Operator mode: the configuration arrives over the operator's config
//! stream (`pgwarden_api::stream`), not from files.
//!
//! One long-lived HTTPS request per sidecar, on an HTTP/2 connection that
//! also carries its ACKs: the token file is read again at
//! every connect (the kubelet rotates it), the server is verified with the
//! operator's CA only, each line is bounded. A snapshot is built and put in
//! force through the same path as a file reload (`Apply`), then ACKed; one
//! that fails to build is NACKed with its error and the last good
//! configuration stays. The stream reconnects with exponential backoff and
//! jitter; when it has been down longer than `stale_after`, the
//! configuration is marked stale (`LiveConfig::set_stale`) and statements
//! are refused until it is back. The credential is held in memory only.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pgwarden_api::stream::{
    decode_event, Ack, LineDecoder, StreamEvent, ACK_PATH, CONFIG_PATH, MAX_LINE_BYTES,
};
use pgwarden_api::ConfigSnapshot;
use rustls_pki_types::{pem::PemObject, CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{info, warn};

use super::{ConfigErrors, GatewayConfig, LoadOptions};
use crate::observe::Metrics;

/// Where the kubelet mounts the sidecar's projected token (audience
/// `pgwarden.io/sidecar`) in an injected pod.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/pgwarden.io/sidecar/token";

/// No byte for this long (the operator heartbeats every 15 s): the peer is
/// gone even if TCP has not noticed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(45);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_BASE: Duration = Duration::from_millis(500);
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// How the sidecar reaches its operator.
#[derive(Clone)]
pub struct StreamOptions {
    /// `https://host:port` of the operator's stream service.
    pub url: Uri,
    pub tls: TlsConnector,
    pub token_file: PathBuf,
    pub stale_after: Duration,
    /// Where approval decisions announced on the stream go (the cluster
    /// approval store), once the gateway made one.
    pub approvals: Option<Arc<crate::approval::cluster::ClusterClient>>,
}

impl std::fmt::Debug for StreamOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamOptions")
            .field("url", &self.url)
            .field("token_file", &self.token_file)
            .field("stale_after", &self.stale_after)
            .finish_non_exhaustive()
    }
}

impl StreamOptions {
    /// Checks the URL (https, a host) and builds a TLS client that trusts
    /// `ca_pem` alone: the operator's CA comes with injection, and no
    /// public CA may vouch for the party that hands out credentials.
    pub fn new(
        url: &str,
        ca_pem: &[u8],
        token_file: PathBuf,
        stale_after: Duration,
    ) -> Result<Self, String> {
        let uri: Uri = url
            .parse()
            .map_err(|_| format!("--operator {url:?}: not a URL"))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            return Err(format!("--operator {url:?}: must be https://HOST[:PORT]"));
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| format!("--operator-ca: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("--operator-ca holds an unusable certificate: {e}"))?;
        }
        if roots.is_empty() {
            return Err("--operator-ca holds no certificate".into());
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(StreamOptions {
            url: uri,
            tls: TlsConnector::from(Arc::new(config)),
            token_file,
            stale_after,
            approvals: None,
        })
    }
}

/// The gateway, as the stream drives it.
pub trait Apply: Send + Sync + 'static {
    /// Put a snapshot in force through the gateway's one reload path
    /// (build, start the new policies' background work, swap). `Err` is the
    /// reason to NACK; the previous configuration then stays.
    fn apply(&self, snapshot: ConfigSnapshot) -> impl Future<Output = Result<(), String>> + Send;
    /// `LiveConfig::set_stale`.
    fn set_stale(&self, stale: bool) -> bool;
}

/// A streamed snapshot → the running configuration. As for files, except
/// that no policy is a valid answer: the pod is selected by none (any more),
/// so every session ends and new ones find no database.
pub fn build_streamed(
    snapshot: &ConfigSnapshot,
    opts: &LoadOptions,
) -> Result<GatewayConfig, ConfigErrors> {
    if snapshot.policies.is_empty() {
        return Ok(GatewayConfig {
            policies: Vec::new(),
            version: snapshot.version,
        });
    }
    super::build(snapshot, opts)
}

/// The wait before reconnect attempt `attempt` (0 = the first retry):
/// exponential from 0.5 s, capped at [`BACKOFF_CAP`], with jitter taking it
/// down to half (`jitter` in `[0, 1)`), so sidecars restarted together do
/// not reconnect together.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let exp = BACKOFF_BASE
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(BACKOFF_CAP);
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    exp.mul_f64(0.5 + 0.5 * jitter)
}

/// Follows the operator's stream for the life of the gateway.
pub async fn follow<A: Apply>(opts: StreamOptions, apply: A, metrics: Arc<Metrics>) {
    let mut down_since = Instant::now();
    // What was last put in force, version aside: after a reconnect (or
    // another replica) the same content comes again under a new version.
    let mut in_force: Option<ConfigSnapshot> = None;
    let mut attempt = 0u32;
    loop {
        let opened = match Connection::open(&opts).await {
            Ok(conn) => conn
                .request(&opts, CONFIG_PATH, None)
                .await
                .map(|body| (conn, body)),
            Err(e) => Err(e),
        };
        match opened {
            Ok((conn, body)) => {
                metrics.config_stream_connected.set(1);
                info!(operator = %opts.url, "config stream connected");
                let mut healthy = false;
                let why = read_stream(
                    body,
                    &conn,
                    &opts,
                    &apply,
                    &metrics,
                    &mut in_force,
                    &mut healthy,
                )
                .await;
                // Backoff starts over only after a stream that said
                // something valid: an operator that answers with garbage
                // is retried ever more slowly, not twice a second.
                if healthy {
                    attempt = 0;
                }
                metrics.config_stream_connected.set(0);
                warn!(error = %why, "config stream lost; reconnecting");
                down_since = Instant::now();
            }
            Err(e) => warn!(error = %e, "config stream: cannot connect to the operator"),
        }
        let delay = backoff(attempt, rand::random::<f64>());
        attempt = attempt.saturating_add(1);
        // Wake at the staleness bound if it falls inside the wait.
        let stale_at = down_since + opts.stale_after;
        let now = Instant::now();
        if stale_at > now && stale_at < now + delay {
            tokio::time::sleep_until(stale_at.into()).await;
            mark_stale(&apply, &opts);
            tokio::time::sleep_until((now + delay).into()).await;
        } else {
            tokio::time::sleep(delay).await;
        }
        if down_since.elapsed() >= opts.stale_after {
            mark_stale(&apply, &opts);
        }
    }
}

fn mark_stale(apply: &impl Apply, opts: &StreamOptions) {
    if apply.set_stale(true) {
        warn!(
            stale_after = ?opts.stale_after,
            "config stream down too long: the configuration is stale, statements are refused until the operator is back"
        );
    }
}

/// Why a stream ended (for the log; never holds a line's content).
type Ended = String;

async fn read_stream<A: Apply>(
    mut body: hyper::body::Incoming,
    conn: &Connection,
    opts: &StreamOptions,
    apply: &A,
    metrics: &Metrics,
    in_force: &mut Option<ConfigSnapshot>,
    healthy: &mut bool,
) -> Ended {
    let mut lines = LineDecoder::new(MAX_LINE_BYTES);
    loop {
        let frame = match tokio::time::timeout(IDLE_TIMEOUT, body.frame()).await {
            Err(_) => return format!("nothing from the operator for {IDLE_TIMEOUT:?}"),
            Ok(None) => return "the operator ended the stream".into(),
            Ok(Some(Err(e))) => return format!("reading the stream: {e}"),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        lines.push(&data);
        loop {
            let line = match lines.next_line() {
                Ok(Some(l)) => l,
                Ok(None) => break,
                // The last good configuration stays; a new connection
                // starts framing afresh.
                Err(e) => return e.to_string(),
            };
            let event = decode_event(&line);
            if event.is_ok() && !*healthy {
                // The first valid event: the operator is back for real, and
                // a stale configuration is served again.
                *healthy = true;
                if apply.set_stale(false) {
                    info!("config stream is back: statements are served again");
                }
            }
            let snapshot = match event {
                Ok(StreamEvent::Snapshot { snapshot }) => snapshot,
                Ok(StreamEvent::ApprovalDecided { request }) => {
                    if let Some(a) = &opts.approvals {
                        a.announce(*request);
                    }
                    continue;
                }
                Ok(StreamEvent::Heartbeat | StreamEvent::Unknown) => continue,
                Err(e) => return e.to_string(),
            };
            let version = snapshot.version;
            let unchanged = in_force
                .as_ref()
                .is_some_and(|cur| same_content(cur, &snapshot));
            // The same content is ACKed without a rebuild: open sessions and
            // the policies' background work stay as they are.
            let result = if unchanged {
                Ok(())
            } else {
                let content = snapshot.clone();
                let r = apply.apply(snapshot).await;
                if r.is_ok() {
                    *in_force = Some(content);
                }
                r
            };
            let ack = match result {
                Ok(()) => {
                    metrics
                        .config_snapshots
                        .with_label_values(&["applied"])
                        .inc();
                    metrics
                        .config_version
                        .set(i64::try_from(version).unwrap_or(i64::MAX));
                    if unchanged {
                        info!(
                            version,
                            "configuration from the operator unchanged; ACKed without a rebuild"
                        );
                    } else {
                        info!(version, "configuration from the operator in force");
                    }
                    Ack {
                        version,
                        error: None,
                    }
                }
                Err(error) => {
                    metrics
                        .config_snapshots
                        .with_label_values(&["refused"])
                        .inc();
                    warn!(version, "configuration from the operator refused; the previous one stays in force: {error}");
                    Ack {
                        version,
                        error: Some(error),
                    }
                }
            };
            let body = serde_json::to_vec(&ack).unwrap_or_default();
            if let Err(e) = conn.request(opts, ACK_PATH, Some(Bytes::from(body))).await {
                // The operator sees no ACK and the sidecar keeps what it
                // applied; the next connect sends a snapshot again.
                warn!(version, error = %e, "sending the ACK failed");
            }
        }
    }
}

/// A POST to the operator (the approval calls), on a fresh connection.
pub(crate) async fn post(
    opts: &StreamOptions,
    path: &str,
    body: Bytes,
) -> Result<hyper::body::Incoming, String> {
    Connection::open(opts)
        .await?
        .request(opts, path, Some(body))
        .await
}

fn same_content(a: &ConfigSnapshot, b: &ConfigSnapshot) -> bool {
    ConfigSnapshot {
        version: b.version,
        ..a.clone()
    } == *b
}

/// An HTTP/2 connection to the operator. The stream and its ACKs share one,
/// so an ACK reaches the replica that sent the snapshot (a Service may
/// spread separate connections over several), and costs no TLS handshake.
struct Connection {
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    authority: String,
}

impl Connection {
    async fn open(opts: &StreamOptions) -> Result<Connection, String> {
        let host = opts.url.host().unwrap_or_default();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let port = opts.url.port_u16().unwrap_or(443);
        let authority = opts
            .url
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let name = ServerName::try_from(bare.to_owned())
            .map_err(|_| format!("{bare:?} is not a valid TLS server name"))?;
        let handshake = async {
            let tcp = TcpStream::connect((bare, port))
                .await
                .map_err(|e| format!("connect {authority}: {e}"))?;
            let _ = tcp.set_nodelay(true);
            let tls = opts.tls.connect(name, tcp).await.map_err(|e| {
                format!("TLS with {authority}: {e} (the operator must offer HTTP/2: is it the same pgwarden version?)")
            })?;
            hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                // Finds an operator that vanished without a FIN sooner than
                // the stream's idle timeout would.
                .keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(20))
                .handshake(TokioIo::new(tls))
                .await
                .map_err(|e| format!("HTTP/2 with {authority}: {e}"))
        };
        let (sender, conn) = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
            .await
            .map_err(|_| format!("connect {authority}: timed out"))??;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Connection { sender, authority })
    }

    /// One request: GET the stream, or POST an ACK or an approval call. The
    /// token file is read at every request (the kubelet rotates it).
    async fn request(
        &self,
        opts: &StreamOptions,
        path: &str,
        post: Option<Bytes>,
    ) -> Result<hyper::body::Incoming, String> {
        let token = std::fs::read_to_string(&opts.token_file)
            .map_err(|e| format!("reading the token {}: {e}", opts.token_file.display()))?;
        let token = token.trim();
        if token.is_empty() {
            return Err(format!(
                "the token file {} is empty",
                opts.token_file.display()
            ));
        }
        let authority = &self.authority;
        let uri = Uri::builder()
            .scheme("https")
            .authority(authority.as_str())
            .path_and_query(path)
            .build()
            .map_err(|e| e.to_string())?;
        let builder = Request::builder()
            .uri(uri)
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(
                http::header::USER_AGENT,
                concat!("pgwarden/", env!("CARGO_PKG_VERSION")),
            );
        let request = match post {
            None => builder.method("GET").body(Full::new(Bytes::new())),
            Some(b) => builder
                .method("POST")
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(b)),
        }
        .map_err(|e| e.to_string())?;
        let mut sender = self.sender.clone();
        let response = tokio::time::timeout(CONNECT_TIMEOUT, sender.send_request(request))
            .await
            .map_err(|_| format!("{path}: no answer from {authority}"))?
            .map_err(|e| format!("{path}: {e}"))?;
        let status = response.status();
        if status != StatusCode::OK {
            // The operator's one-line reason (it never holds the token).
            let reason = Limited::new(response.into_body(), 1024)
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
                .unwrap_or_default();
            return Err(format!("the operator answered {status}: {reason}"));
        }
        Ok(response.into_body())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_and_jitter_stays_within_half() {
        assert_eq!(backoff(0, 1.0), Duration::from_millis(500));
        assert_eq!(backoff(0, 0.0), Duration::from_millis(250));
        assert_eq!(backoff(1, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(3, 1.0), Duration::from_millis(4000));
        for attempt in [6, 7, 20, u32::MAX] {
            for jitter in [0.0, 0.3, 0.999, 5.0, -1.0, f64::NAN] {
                let d = backoff(attempt, jitter);
                assert!(
                    d >= BACKOFF_CAP / 2 && d <= BACKOFF_CAP,
                    "{attempt} {jitter}: {d:?}"
                );
            }
        }
        let mut last = Duration::ZERO;
        for attempt in 0..8 {
            let d = backoff(attempt, 0.5);
            assert!(d >= last, "non-decreasing at {attempt}");
            last = d;
        }
    }

    /// A throwaway self-signed CA certificate (its key was discarded).
    const CA_PEM: &str = "-----BEGIN CERTIFICATE-----\n\
MIIBjjCCATOgAwIBAgIUUNBGuSy6qlfna5ca/Y/AlhDMojcwCgYIKoZIzj0EAwIw\n\
GzEZMBcGA1UEAwwQcGd3YXJkZW4gdGVzdCBDQTAgFw0yNjEyMDMwNTIwMTVaGA8y\n\
MTI2MTEwOTA1MjAxNVowGzEZMBcGA1UEAwwQcGd3YXJkZW4gdGVzdCBDQTBZMBMG\n\
ByqGSM49AgEGCCqGSM49AwEHA0IABNtlL/3xGuvFFFpJUT+SbwwmBoDjmr6ljcar\n\
v072PgQprC222h04/8vrSxchPeCfVwX4ln8QlcdoaUWM851jaMijUzBRMB0GA1Ud\n\
DgQWBBQRtl+ATWX3jFeFyXIkXt3eCaLx4jAfBgNVHSMEGDAWgBQRtl+ATWX3jFeF\n\
yXIkXt3eCaLx4jAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0kAMEYCIQDK\n\
vlP/iCCjLDCFvbCi+RraTjSuXTLlrfuEheQIbiwN7QIhAOBPNKPTK8mKKbpfdZ2E\n\
up/Uk1eGRXWeTLSrLlWF1m39\n\
-----END CERTIFICATE-----";

    #[test]
    fn the_operator_url_and_ca_are_checked() {
        let ca = CA_PEM.as_bytes();
        let tf = PathBuf::from("/t");
        let d = Duration::from_secs(600);
        assert!(StreamOptions::new("https://op.pgwarden.svc:8443", ca, tf.clone(), d).is_ok());
        for bad in ["http://op:8443", "op:8443", "https://", "not a url"] {
            assert!(StreamOptions::new(bad, ca, tf.clone(), d).is_err(), "{bad}");
        }
        let err = StreamOptions::new("https://op", b"nothing", tf, d).unwrap_err();
        assert!(err.contains("no certificate"), "{err}");
    }

    #[test]
    fn snapshots_differing_only_in_version_have_the_same_content() {
        let a = ConfigSnapshot {
            version: 1,
            masking_key: Some(pgwarden_api::SecretBytes(vec![1; 32])),
            ..ConfigSnapshot::default()
        };
        let b = ConfigSnapshot {
            version: 2,
            ..a.clone()
        };
        assert!(same_content(&a, &b));
        let c = ConfigSnapshot {
            masking_key: None,
            ..b.clone()
        };
        assert!(!same_content(&a, &c));
    }

    #[test]
    fn an_empty_snapshot_is_a_configuration_with_no_policy() {
        let snap = ConfigSnapshot {
            version: 9,
            ..ConfigSnapshot::default()
        };
        let cfg = build_streamed(&snap, &LoadOptions::default()).unwrap();
        assert!(cfg.policies.is_empty());
        assert_eq!(cfg.version, 9);
        assert!(cfg.select(None).is_none());
        assert!(cfg.for_database("app").is_none());
    }
}
