//! A fake operator: the config stream the real one serves (`GET /v1/config`,
//! newline-delimited JSON events, `POST /v1/ack`), over TLS with ALPN `h2` and
//! hyper's HTTP/2 server, so `pgwarden run --operator URL` follows it exactly as
//! it follows the operator in a cluster.
//!
//! Two ways to drive it: [`FakeOperator::start`] hands each stream's body to the
//! test, line by line (hostile-stream tests); [`FakeOperator::serving`] answers
//! every stream itself with one fixed snapshot and then heartbeats (the benchmark's
//! operator-fed gateway). Build the snapshot line with [`snapshot_line`].

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use pgwarden_api::stream::{encode_event, StreamEvent};
use pgwarden_api::{
    ConfigSnapshot, DatabaseAccessPolicySpec, SecretBytes, SecretString, SnapshotCredential,
    SnapshotPolicy,
};
use rustls_pki_types::pem::PemObject;
use tokio::sync::mpsc;

use crate::tls::ServerCert;

/// Between heartbeats in [`FakeOperator::serving`]: the real operator's default
/// (`DEFAULT_HEARTBEAT` in operator/src/stream.rs). The sidecar drops a stream
/// silent for 45 s (`IDLE_TIMEOUT` in sidecar/src/config/stream.rs).
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// Chunks buffered per stream: a sender waits for the sidecar to read, so a
/// huge line is never held whole.
const STREAM_BUFFER: usize = 4;

/// A running fake operator on 127.0.0.1; stops accepting connections when
/// dropped (streams already open end with the tokio runtime).
pub struct FakeOperator {
    port: u16,
    streams: mpsc::UnboundedReceiver<mpsc::Sender<Bytes>>,
    acks: Arc<Mutex<Vec<String>>>,
    accept: tokio::task::JoinHandle<()>,
}

/// What a new `GET /v1/config` gets.
#[derive(Clone)]
enum Feed {
    /// Its body's sender goes to the test ([`FakeOperator::next_stream`]).
    Test(mpsc::UnboundedSender<mpsc::Sender<Bytes>>),
    /// This line at once, then a heartbeat every [`HEARTBEAT`].
    Snapshot(Bytes),
}

type Body = BoxBody<Bytes, Infallible>;

// === impl FakeOperator ===

impl FakeOperator {
    /// Listens with `cert` (its CA is the `--operator-ca` for the sidecar). Each
    /// `GET /v1/config` hands the test a sender for that stream's body (see
    /// [`FakeOperator::next_stream`]); each `POST /v1/ack` is answered 200 and
    /// its body recorded ([`FakeOperator::acks`]).
    pub async fn start(cert: &ServerCert) -> FakeOperator {
        let (streams_tx, streams) = mpsc::unbounded_channel();
        Self::listen(cert, Feed::Test(streams_tx), streams).await
    }

    /// Listens as [`FakeOperator::start`], but answers every `GET /v1/config`
    /// itself: `line` (one encoded event, see [`snapshot_line`]) at once, then a
    /// heartbeat every [`HEARTBEAT`], the stream kept open until the sidecar
    /// drops it. [`FakeOperator::next_stream`] never yields here.
    pub async fn serving(cert: &ServerCert, line: Vec<u8>) -> FakeOperator {
        let (_, streams) = mpsc::unbounded_channel();
        Self::listen(cert, Feed::Snapshot(Bytes::from(line)), streams).await
    }

    async fn listen(
        cert: &ServerCert,
        feed: Feed,
        streams: mpsc::UnboundedReceiver<mpsc::Sender<Bytes>>,
    ) -> FakeOperator {
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(&cert.cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .unwrap_or_else(|e| panic!("fake operator cert {}: {e}", cert.cert.display()));
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&cert.key)
            .unwrap_or_else(|e| panic!("fake operator key {}: {e}", cert.key.display()));
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports the default TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("fake operator certificate and key");
        // The sidecar speaks HTTP/2 only, negotiated by ALPN.
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake operator");
        let port = listener.local_addr().expect("local addr").port();
        let acks = Arc::new(Mutex::new(Vec::new()));
        let recorded = acks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, feed, recorded) = (acceptor.clone(), feed.clone(), recorded.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (feed, recorded) = (feed.clone(), recorded.clone());
                            async move {
                                let body = if req.uri().path() == "/v1/ack" {
                                    let b = req.into_body().collect().await?.to_bytes();
                                    recorded
                                        .lock()
                                        .unwrap_or_else(|e| e.into_inner())
                                        .push(String::from_utf8_lossy(&b).into_owned());
                                    Full::new(Bytes::new()).boxed()
                                } else {
                                    config_stream(&feed)
                                };
                                Ok::<_, hyper::Error>(http::Response::new(body))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
                });
            }
        });
        FakeOperator {
            port,
            streams,
            acks,
            accept,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `--operator` for the sidecar.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The next `GET /v1/config` the sidecar opens (panics after 10 s without one).
    pub async fn next_stream(&mut self, what: &str) -> mpsc::Sender<Bytes> {
        tokio::time::timeout(Duration::from_secs(10), self.streams.recv())
            .await
            .unwrap_or_else(|_| panic!("{what}: the sidecar opened no config stream"))
            .expect("fake operator running")
    }

    /// The bodies of every `POST /v1/ack` so far.
    pub fn acks(&self) -> Vec<String> {
        self.acks.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for FakeOperator {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The body of one `GET /v1/config`.
fn config_stream(feed: &Feed) -> Body {
    let (tx, rx) = mpsc::channel::<Bytes>(STREAM_BUFFER);
    match feed {
        Feed::Test(streams) => {
            let _ = streams.send(tx);
        }
        Feed::Snapshot(line) => {
            let line = line.clone();
            tokio::spawn(async move {
                let heartbeat = Bytes::from(encode_event(&StreamEvent::Heartbeat));
                let mut next = line;
                // Ends when the sidecar drops the stream (the body, so `rx`, is gone).
                while tx.send(next).await.is_ok() {
                    tokio::time::sleep(HEARTBEAT).await;
                    next = heartbeat.clone();
                }
            });
        }
    }
    StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok(hyper::body::Frame::data(chunk)), rx))
    }))
    .boxed()
}

/// One `Snapshot` event line (with its `\n`), built as the operator builds it:
/// the `spec` of `policy_yaml` (a whole DatabaseAccessPolicy, as
/// [`crate::policy_yaml`] writes it; its `metadata` names the policy) with the
/// login of its credentials Secret, and a 32-byte approval fingerprint key (the
/// sidecar refuses a snapshot without one).
pub fn snapshot_line(version: u64, policy_yaml: &str, username: &str, password: &str) -> Vec<u8> {
    let policy: serde_yaml_ng::Value = serde_yaml_ng::from_str(policy_yaml)
        .unwrap_or_else(|e| panic!("policy YAML: {e}\n{policy_yaml}"));
    let metadata = |field: &str| policy["metadata"][field].as_str().map(str::to_owned);
    let spec: DatabaseAccessPolicySpec = serde_yaml_ng::from_value(policy["spec"].clone())
        .unwrap_or_else(|e| panic!("not a DatabaseAccessPolicy spec: {e}\n{policy_yaml}"));
    encode_event(&StreamEvent::Snapshot {
        snapshot: ConfigSnapshot {
            version,
            policies: vec![SnapshotPolicy {
                namespace: metadata("namespace").unwrap_or_else(|| "default".into()),
                name: metadata("name").expect("the policy has metadata.name"),
                spec,
                credential: SnapshotCredential {
                    username: username.into(),
                    password: SecretString(password.into()),
                },
                ca_pem: None,
                recording_dsn: None,
                fingerprint_key: Some(SecretBytes(vec![7; 32])),
                source: None,
            }],
            masking_key: None,
            pod: None,
        },
    })
}
