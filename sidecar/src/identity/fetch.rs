//! Fetching an issuer's discovery document and key set: one bounded HTTP/1.1
//! GET per call (hyper's connection-level client; no pool, no redirects),
//! TLS by rustls against the Mozilla roots plus any CA files configured.
//!
//! Plain http is accepted only for a loopback host (a local test issuer); the
//! policy validator refuses anything else before it gets here.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, CACHE_CONTROL, HOST, USER_AGENT};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Discovery documents and key sets are a few KiB.
const MAX_BODY: usize = 1024 * 1024;
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0} is not a usable URL: {1}")]
    Url(String, &'static str),
    #[error("{url}: {why}")]
    Failed { url: String, why: String },
    #[error("{url}: timed out after {}s", TIMEOUT.as_secs())]
    Timeout { url: String },
}

/// A successful response: its body and how long it may be cached.
#[derive(Debug)]
pub struct Fetched {
    pub body: Bytes,
    pub max_age: Option<Duration>,
}

#[derive(Clone)]
pub struct Fetcher {
    tls: TlsConnector,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fetcher")
    }
}

impl Fetcher {
    /// `extra_ca_pem`: PEM bundles trusted in addition to the Mozilla roots
    /// (a cluster's own issuer, a private IdP).
    pub fn new(extra_ca_pem: &[Vec<u8>]) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for pem in extra_ca_pem {
            let mut any = false;
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("CA file: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("CA file holds an unusable certificate: {e}"))?;
                any = true;
            }
            if !any {
                return Err("CA file holds no certificate".into());
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Fetcher {
            tls: TlsConnector::from(Arc::new(config)),
        })
    }

    pub async fn get(&self, url: &str) -> Result<Fetched, FetchError> {
        tokio::time::timeout(TIMEOUT, self.get_inner(url))
            .await
            .map_err(|_| FetchError::Timeout { url: url.into() })?
    }

    async fn get_inner(&self, url: &str) -> Result<Fetched, FetchError> {
        let bad = |why| FetchError::Url(url.to_string(), why);
        let failed = |why: String| FetchError::Failed {
            url: url.to_string(),
            why,
        };
        let uri: Uri = url.parse().map_err(|_| bad("it does not parse"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad("only http(s) URLs are fetched")),
        };
        let host = uri.host().ok_or(bad("it has no host"))?;
        // `[::1]` in a URL is `::1` to the resolver and to TLS.
        let bare_host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        if !https && !is_loopback(bare_host) {
            return Err(bad("plain http is allowed only to a loopback host"));
        }
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .ok_or(bad("it has no host"))?;

        let tcp = TcpStream::connect((bare_host, port))
            .await
            .map_err(|e| failed(format!("connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let request = Request::get(path)
            .header(HOST, authority)
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, concat!("pgwarden/", env!("CARGO_PKG_VERSION")))
            .body(Empty::<Bytes>::new())
            .map_err(|e| failed(e.to_string()))?;
        if https {
            let name = ServerName::try_from(bare_host.to_string())
                .map_err(|_| bad("its host is not a valid TLS server name"))?;
            let tls = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| failed(format!("TLS: {e}")))?;
            exchange(tls, request).await.map_err(failed)
        } else {
            exchange(tcp, request).await.map_err(failed)
        }
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

async fn exchange<S>(stream: S, request: Request<Empty<Bytes>>) -> Result<Fetched, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    // The connection task ends when the response body is read or dropped.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    if status != StatusCode::OK {
        return Err(format!("HTTP status {status}"));
    }
    let max_age = response
        .headers()
        .get(CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .and_then(max_age);
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    Ok(Fetched { body, max_age })
}

/// `max-age` from a Cache-Control value; `no-cache`/`no-store` mean zero.
pub fn max_age(header: &str) -> Option<Duration> {
    let mut age = None;
    for directive in header.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-cache" || lower == "no-store" {
            return Some(Duration::ZERO);
        }
        if let Some(v) = lower.strip_prefix("max-age=") {
            age = v
                .trim_matches('"')
                .parse::<u64>()
                .ok()
                .map(Duration::from_secs);
        }
    }
    age
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_max_age() {
        assert_eq!(
            max_age("public, max-age=3600"),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(max_age("max-age=\"60\""), Some(Duration::from_secs(60)));
        assert_eq!(max_age("no-store, max-age=60"), Some(Duration::ZERO));
        assert_eq!(max_age("private"), None);
        assert_eq!(max_age("max-age=-1"), None);
    }

    #[tokio::test]
    async fn plain_http_only_to_loopback() {
        let f = Fetcher::new(&[]).unwrap();
        let err = f
            .get("http://example.com/.well-known/openid-configuration")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("loopback"), "{err}");
        let err = f.get("ftp://127.0.0.1/x").await.unwrap_err();
        assert!(err.to_string().contains("http(s)"), "{err}");
    }
}
