//! The upstream side: open a connection to the real server and log in with the
//! credential the client never sees.

mod auth;
pub mod tls;

use std::time::Duration;

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::transport::{MaybeTls, UpstreamStream};
use crate::wire::codec::{self, TxStatus};
use crate::wire::conn::{FrameBuf, ReadError};
use crate::wire::{Direction, Limits, PgError};
use pgwarden_api::SecretString;

pub use auth::AuthError;
use auth::{Login, Step};
use tls::UpstreamTls;

/// Connecting and logging in must not hang a client forever.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub password: SecretString,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Where and how to reach the real server.
#[derive(Debug, Clone)]
pub struct UpstreamTarget {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub credential: Credential,
    pub tls: UpstreamTls,
}

/// The server's cancel key for a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendKey {
    pub pid: i32,
    pub secret: Vec<u8>,
}

/// A logged-in upstream session, ready for queries.
pub struct Upstream {
    pub stream: UpstreamStream,
    /// ParameterStatus messages as sent, to forward to the client verbatim.
    pub parameter_status: Vec<BytesMut>,
    /// NoticeResponses sent during login.
    pub notices: Vec<BytesMut>,
    pub key: Option<BackendKey>,
    pub status: TxStatus,
    /// Bytes the server sent after ReadyForQuery (asynchronous messages).
    pub leftover: BytesMut,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot reach the upstream server {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to the upstream server {0}")]
    Timeout(String),
    #[error("the upstream server does not accept TLS, but database.tls requires it")]
    TlsRefused,
    #[error("TLS handshake with the upstream server failed: {0}")]
    Tls(std::io::Error),
    #[error("invalid upstream host name for TLS: {0}")]
    ServerName(String),
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The server answered the login with an ErrorResponse.
    #[error("the upstream server refused the connection: {code} {message}")]
    Refused { code: String, message: String },
    #[error("the upstream server broke the protocol: {0}")]
    Protocol(String),
    /// A query of pgwarden's own (catalog, audit store) got an ErrorResponse.
    #[error("the server refused the query: {code} {message}")]
    Query { code: String, message: String },
    #[error("upstream I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl From<ReadError> for UpstreamError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Io(e) => UpstreamError::Io(e),
            other => UpstreamError::Protocol(other.to_string()),
        }
    }
}

impl UpstreamError {
    /// Short label for metrics (bounded set, no values).
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. } | UpstreamError::Timeout(_) => "connect",
            UpstreamError::TlsRefused | UpstreamError::Tls(_) | UpstreamError::ServerName(_) => {
                "tls"
            }
            UpstreamError::Auth(_) => "auth",
            UpstreamError::Refused { .. } => "refused",
            UpstreamError::Protocol(_) => "protocol",
            UpstreamError::Query { .. } => "query",
            UpstreamError::Io(_) => "io",
        }
    }

    /// What the client is told. The server's words are passed on except for
    /// authentication failures, which only say the gateway's credential was
    /// refused: the client has no business learning about that credential.
    pub fn to_client_error(&self) -> PgError {
        match self {
            UpstreamError::Connect { .. } | UpstreamError::Timeout(_) => {
                PgError::upstream_unreachable(self.to_string())
            }
            UpstreamError::Refused { code, .. } if code.starts_with("28") => {
                PgError::upstream_failed(format!(
                    "the upstream server refused the gateway's credential (SQLSTATE {code})"
                ))
                .with_hint("an administrator must check the credentialsSecret of this policy")
            }
            UpstreamError::Auth(_) => {
                PgError::upstream_failed(format!("login to the upstream server failed: {self}"))
            }
            _ => PgError::upstream_failed(self.to_string()),
        }
    }
}

/// Open a TCP connection, with TLS when configured.
async fn open(target: &UpstreamTarget) -> Result<(UpstreamStream, Option<Vec<u8>>), UpstreamError> {
    let addr = format!("{}:{}", target.host, target.port);
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        TcpStream::connect((target.host.as_str(), target.port)),
    )
    .await
    .map_err(|_| UpstreamError::Timeout(addr.clone()))?
    .map_err(|source| UpstreamError::Connect { addr, source })?;
    // Small request/response messages: never wait for Nagle.
    tcp.set_nodelay(true)?;
    let UpstreamTls::Enabled(config) = &target.tls else {
        return Ok((MaybeTls::Plain(tcp), None));
    };
    let mut tcp = tcp;
    let mut req = BytesMut::new();
    codec::put_ssl_request(&mut req);
    tcp.write_all(&req).await?;
    let answer = tcp.read_u8().await?;
    if answer != b'S' {
        return Err(UpstreamError::TlsRefused);
    }
    let name = ServerName::try_from(target.host.clone())
        .map_err(|_| UpstreamError::ServerName(target.host.clone()))?;
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(UpstreamError::Tls)?;
    let binding = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| tls::server_end_point_hash(c.as_ref()));
    Ok((MaybeTls::Tls(Box::new(tls)), binding))
}

/// Connect and log in. `params` are the startup parameters to send (already
/// filtered; user and database are added here from the policy).
pub async fn connect(
    target: &UpstreamTarget,
    params: &[(String, String)],
    limits: Limits,
) -> Result<Upstream, UpstreamError> {
    tokio::time::timeout(LOGIN_TIMEOUT, connect_inner(target, params, limits))
        .await
        .map_err(|_| UpstreamError::Timeout(format!("{}:{}", target.host, target.port)))?
}

async fn connect_inner(
    target: &UpstreamTarget,
    params: &[(String, String)],
    limits: Limits,
) -> Result<Upstream, UpstreamError> {
    let (mut stream, binding) = open(target).await?;
    let mut all = vec![
        ("user".to_owned(), target.credential.username.clone()),
        ("database".to_owned(), target.database.clone()),
    ];
    all.extend(params.iter().cloned());
    let mut out = BytesMut::new();
    codec::put_startup(&all, &mut out);
    stream.write_all(&out).await?;
    stream.flush().await?;

    let mut login = Some(Login::new(target.credential.clone(), binding));
    let mut frames = FrameBuf::new(Direction::Backend, limits);
    let mut up = Upstream {
        stream,
        parameter_status: Vec::new(),
        notices: Vec::new(),
        key: None,
        status: TxStatus::Idle,
        leftover: BytesMut::new(),
    };
    let mut authenticated = false;
    loop {
        let Some((frame, bytes)) = frames.next(&mut up.stream).await? else {
            return Err(UpstreamError::Protocol(
                "connection closed during login".into(),
            ));
        };
        let body = frame.body(&bytes);
        let bad = |e: codec::DecodeError| UpstreamError::Protocol(e.to_string());
        match frame.ty {
            b'R' if !authenticated => {
                match login_step(&mut login, codec::auth_request(body).map_err(bad)?).await? {
                    Step::Send(msg) => {
                        up.stream.write_all(&msg).await?;
                        up.stream.flush().await?;
                    }
                    Step::Wait => {}
                    Step::Authenticated => authenticated = true,
                }
            }
            b'E' => {
                let fields = codec::notice_fields(body).map_err(bad)?;
                let get = |c: u8| {
                    fields
                        .iter()
                        .find(|(k, _)| *k == c)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                return Err(UpstreamError::Refused {
                    code: get(b'C'),
                    message: get(b'M'),
                });
            }
            b'N' => up.notices.push(bytes),
            b'S' if authenticated => {
                codec::parameter_status(body).map_err(bad)?;
                up.parameter_status.push(bytes);
            }
            b'K' if authenticated => {
                let (pid, secret) = codec::backend_key_data(body).map_err(bad)?;
                up.key = Some(BackendKey { pid, secret });
            }
            b'Z' if authenticated => {
                up.status = codec::ready_for_query(body).map_err(bad)?;
                up.leftover = frames.into_bytes();
                return Ok(up);
            }
            // We asked for 3.0 with no protocol options; tolerate the answer.
            b'v' => {}
            other => {
                return Err(UpstreamError::Protocol(format!(
                    "unexpected message '{}' during login",
                    char::from(other)
                )))
            }
        }
    }
}

/// Forward a cancel request to the server, over TLS when the policy uses TLS
/// (a server that only accepts hostssl would drop a plain one).
/// One step of the login. SCRAM's answer to the server's first message
/// derives the key (PBKDF2: thousands of HMACs, milliseconds of CPU even in
/// a release build): that runs on a blocking thread, so a login — a new
/// session's, or the readiness re-check's — never stalls the sessions that
/// share this event loop.
async fn login_step(
    login: &mut Option<Login>,
    req: codec::AuthRequest<'_>,
) -> Result<Step, UpstreamError> {
    let mut l = login
        .take()
        .ok_or_else(|| UpstreamError::Protocol("the login ended already".into()))?;
    let step = match req {
        codec::AuthRequest::SaslContinue(data) => {
            let data = data.to_vec();
            let (back, step) = tokio::task::spawn_blocking(move || {
                let step = l.step(codec::AuthRequest::SaslContinue(&data));
                (l, step)
            })
            .await
            .map_err(|e| UpstreamError::Protocol(format!("the SCRAM step failed: {e}")))?;
            l = back;
            step
        }
        req => l.step(req),
    };
    *login = Some(l);
    Ok(step?)
}

pub async fn cancel(target: &UpstreamTarget, key: &BackendKey) -> Result<(), UpstreamError> {
    let (mut stream, _) = open(target).await?;
    let mut out = BytesMut::new();
    codec::put_cancel_request(key.pid, &key.secret, &mut out);
    stream.write_all(&out).await?;
    stream.flush().await?;
    // The server closes without answering; wait briefly so the packet is read.
    let mut sink = [0u8; 1];
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut sink)).await;
    Ok(())
}

/// Names of functions and operators outside pg_catalog and
/// information_schema: calls by these names may reach user code.
const USER_CODE_QUERY: &str = "SELECT 'f', proname FROM pg_catalog.pg_proc \
     WHERE pronamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace) \
     UNION SELECT 'o', oprname FROM pg_catalog.pg_operator \
     WHERE oprnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)";

/// Ask the freshly logged-in server which user functions and operators
/// exist, before the client's session starts. Returns (functions, operators).
pub async fn user_code(
    up: &mut Upstream,
    limits: Limits,
) -> Result<(Vec<String>, Vec<String>), UpstreamError> {
    let (mut functions, mut operators) = (Vec::new(), Vec::new());
    for row in query_rows(up, limits, USER_CODE_QUERY).await? {
        match (
            row.first().cloned().flatten().as_deref(),
            row.get(1).cloned().flatten(),
        ) {
            (Some("f"), Some(name)) => functions.push(name),
            (Some("o"), Some(name)) => operators.push(name),
            _ => return Err(UpstreamError::Protocol("unexpected catalog row".into())),
        }
    }
    Ok((functions, operators))
}

/// Say goodbye on a proxy-owned connection, so the server does not log an
/// unexpected EOF.
pub async fn terminate(up: &mut Upstream) {
    let _ = up.stream.write_all(&[b'X', 0, 0, 0, 4]).await;
    let _ = up.stream.flush().await;
    let _ = up.stream.shutdown().await;
}

/// Run one proxy-owned simple query and return its rows as text (NULL as
/// None). For pgwarden's own catalog reads, never for client SQL.
pub async fn query_rows(
    up: &mut Upstream,
    limits: Limits,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, UpstreamError> {
    let mut out = BytesMut::new();
    codec::put_query(sql, &mut out);
    request_rows(up, limits, &out).await
}

/// Send proxy-built messages that end in ReadyForQuery (a Query, or an
/// extended-protocol batch ending in Sync) and return the rows as text.
pub async fn request_rows(
    up: &mut Upstream,
    limits: Limits,
    request: &[u8],
) -> Result<Vec<Vec<Option<String>>>, UpstreamError> {
    up.stream.write_all(request).await?;
    up.stream.flush().await?;
    let mut frames =
        FrameBuf::with_bytes(Direction::Backend, limits, std::mem::take(&mut up.leftover));
    let mut rows = Vec::new();
    let mut failed = None;
    let bad = |e: codec::DecodeError| UpstreamError::Protocol(e.to_string());
    loop {
        let Some((frame, bytes)) = frames.next(&mut up.stream).await? else {
            return Err(UpstreamError::Protocol(
                "connection closed during the catalog query".into(),
            ));
        };
        let body = frame.body(&bytes);
        match frame.ty {
            b'D' => {
                let cols = codec::data_row(body).map_err(bad)?;
                rows.push(
                    cols.into_iter()
                        .map(|c| c.map(|v| String::from_utf8_lossy(v).into_owned()))
                        .collect(),
                );
            }
            b'E' => {
                let fields = codec::notice_fields(body).map_err(bad)?;
                let field = |want: u8| {
                    fields
                        .iter()
                        .find(|(k, _)| *k == want)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                // A refusal (no privilege, no such table) is the server's
                // answer, not a protocol failure: keep its SQLSTATE.
                failed = Some((field(b'C'), field(b'M')));
            }
            b'Z' => {
                up.status = codec::ready_for_query(body).map_err(bad)?;
                up.leftover = frames.into_bytes();
                return match failed {
                    Some((code, message)) => Err(UpstreamError::Query { code, message }),
                    None => Ok(rows),
                };
            }
            // RowDescription, CommandComplete, notices, parameter changes.
            _ => {}
        }
    }
}
