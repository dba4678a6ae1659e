//! The admission HTTPS server: HTTP/1.1 over rustls, POST only, bodies
//! bounded by [`MAX_REVIEW_BYTES`](super::MAX_REVIEW_BYTES); the certificate
//! follows renewals ([`ServerCertResolver`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::{Dispatcher, MAX_REVIEW_BYTES};
use crate::certs::{ServerCertResolver, ServingCert};

/// TLS that serves whatever certificate `cert` holds at each handshake.
pub fn tls_config(
    cert: watch::Receiver<Arc<ServingCert>>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(ServerCertResolver::new(cert)?));
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Serves `dispatcher` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    dispatcher: Arc<Dispatcher>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "admission: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, dispatcher) = (acceptor.clone(), dispatcher.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return debug!(%peer, error = %e, "admission: TLS handshake failed"),
                Err(_) => return debug!(%peer, "admission: TLS handshake timed out"),
            };
            let service = hyper::service::service_fn(move |req| {
                let dispatcher = dispatcher.clone();
                async move { Ok::<_, Infallible>(handle(&dispatcher, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}

async fn handle(dispatcher: &Dispatcher, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            b"POST an AdmissionReview\n".to_vec(),
        );
    }
    let path = req.uri().path().to_owned();
    let body = match Limited::new(req.into_body(), MAX_REVIEW_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                b"review too large\n".to_vec(),
            )
        }
        Err(_) => {
            return reply(
                StatusCode::BAD_REQUEST,
                b"reading the body failed\n".to_vec(),
            )
        }
    };
    let (status, value) = dispatcher.handle(&path, &body).await;
    if status != StatusCode::OK {
        debug!(path, %status, "admission: bad request");
    }
    reply(status, serde_json::to_vec(&value).unwrap_or_default())
}

fn reply(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}
