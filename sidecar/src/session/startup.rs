//! The startup phase, before any authentication: SSLRequest / direct TLS,
//! GSSENCRequest, CancelRequest, and the StartupMessage with its parameters.
//!
//! Startup parameters are server settings chosen by the client, so they are
//! filtered against an allowlist: a superuser credential behind the proxy
//! would otherwise honour `options=-c ...`, `role=...` or `replication`.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

use crate::transport::{Accepted, ClientStream, MaybeTls};
use crate::wire::codec::{self, StartupPacket};
use crate::wire::frame;
use crate::wire::PgError;

/// First byte of a TLS ClientHello record: a PostgreSQL 17 client using
/// `sslnegotiation=direct` starts with TLS instead of SSLRequest.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// The outcome of the startup phase.
pub enum Negotiated {
    /// A StartupMessage: go on to authentication.
    Startup {
        stream: ClientStream,
        startup: ClientStartup,
    },
    /// A CancelRequest (the connection is done after it).
    Cancel { pid: i32, secret: Vec<u8> },
}

/// What the client asked for, filtered.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ClientStartup {
    pub user: Option<String>,
    pub database: Option<String>,
    pub application_name: Option<String>,
    /// Parameters to pass upstream (client_encoding pinned to UTF8).
    pub upstream_params: Vec<(String, String)>,
    /// Protocol options (`_pq_.*`) and a minor version above 0 that we decline.
    pub declined_options: Vec<String>,
    pub requested_minor: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("{}", .0.message)]
    Client(PgError),
    #[error("client closed the connection during startup")]
    Closed,
    #[error("TLS handshake with the client failed: {0}")]
    Tls(std::io::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl From<PgError> for StartupError {
    fn from(e: PgError) -> Self {
        StartupError::Client(e)
    }
}

/// Read one startup-phase packet, never more bytes than it holds: data a
/// client sends after SSLRequest must not survive into the TLS session.
async fn read_packet<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Result<BytesMut, StartupError> {
    let mut head = [0u8; 4];
    match s.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(StartupError::Closed)
        }
        Err(e) => return Err(e.into()),
    }
    let len = match frame::cut_startup(&head) {
        Ok(_) => i32::from_be_bytes(head) as usize,
        Err(e) => return Err(PgError::protocol_violation(e.to_string()).into()),
    };
    let mut packet = BytesMut::zeroed(len);
    packet[..4].copy_from_slice(&head);
    s.read_exact(&mut packet[4..]).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            StartupError::Closed
        } else {
            e.into()
        }
    })?;
    Ok(packet)
}

pub async fn negotiate(
    conn: Accepted,
    tls: Option<&TlsAcceptor>,
) -> Result<Negotiated, StartupError> {
    let tcp = match conn {
        Accepted::Tcp(tcp) => tcp,
        // Local: no TLS (libpq never asks for it on a Unix socket).
        Accepted::Unix(unix) => return startup(MaybeTls::Unix(unix), tls).await,
    };
    let mut first = [0u8; 1];
    let n = tcp.peek(&mut first).await?;
    if n == 0 {
        return Err(StartupError::Closed);
    }
    let stream: ClientStream = if first[0] == TLS_HANDSHAKE_RECORD {
        let Some(acceptor) = tls else {
            // No certificate: nothing sensible to answer a ClientHello with.
            return Err(StartupError::Closed);
        };
        let s = acceptor.accept(tcp).await.map_err(StartupError::Tls)?;
        // Direct TLS must be meant for PostgreSQL (protects against
        // cross-protocol attacks), as the PostgreSQL server requires.
        if s.get_ref().1.alpn_protocol() != Some(ALPN_POSTGRESQL) {
            return Err(StartupError::Tls(std::io::Error::other(
                "direct TLS without ALPN \"postgresql\"",
            )));
        }
        MaybeTls::Tls(Box::new(s))
    } else {
        MaybeTls::Plain(tcp)
    };
    startup(stream, tls).await
}

/// SSLRequest, GSSENCRequest and CancelRequest until the startup packet.
async fn startup(
    mut stream: ClientStream,
    tls: Option<&TlsAcceptor>,
) -> Result<Negotiated, StartupError> {
    loop {
        let packet = match read_packet(&mut stream).await {
            Ok(p) => p,
            Err(StartupError::Client(e)) => return fail(stream, e).await,
            Err(e) => return Err(e),
        };
        let decoded = match codec::startup_packet(&packet) {
            Ok(d) => d,
            Err(e) => {
                let e = PgError::protocol_violation(format!("invalid startup packet: {e}"));
                return fail(stream, e).await;
            }
        };
        match decoded {
            StartupPacket::Ssl => {
                stream = match (stream, tls) {
                    (MaybeTls::Plain(mut tcp), Some(acceptor)) => {
                        tcp.write_all(b"S").await?;
                        let s = acceptor.accept(tcp).await.map_err(StartupError::Tls)?;
                        MaybeTls::Tls(Box::new(s))
                    }
                    (MaybeTls::Plain(mut tcp), None) => {
                        tcp.write_all(b"N").await?;
                        MaybeTls::Plain(tcp)
                    }
                    (MaybeTls::Unix(mut unix), _) => {
                        unix.write_all(b"N").await?;
                        MaybeTls::Unix(unix)
                    }
                    (s @ MaybeTls::Tls(_), _) => {
                        let e = PgError::protocol_violation(
                            "SSLRequest on an already encrypted connection",
                        );
                        return fail(s, e).await;
                    }
                };
            }
            StartupPacket::GssEnc => {
                stream.write_all(b"N").await?;
            }
            StartupPacket::Cancel { pid, secret } => return Ok(Negotiated::Cancel { pid, secret }),
            StartupPacket::UnsupportedVersion(v) => {
                let e = PgError::unsupported_fatal(format!(
                    "unsupported frontend protocol {}.{}: pgwarden speaks 3.0",
                    v >> 16,
                    v & 0xffff
                ));
                return fail(stream, e).await;
            }
            StartupPacket::Startup { minor, params } => {
                return match filter_params(minor, params) {
                    Ok(startup) => Ok(Negotiated::Startup { stream, startup }),
                    Err(e) => fail(stream, e).await,
                };
            }
        }
    }
}

/// Tell the client why, then give up on the connection.
async fn fail(mut stream: ClientStream, err: PgError) -> Result<Negotiated, StartupError> {
    let mut out = BytesMut::new();
    codec::put_error(&err, &mut out);
    let _ = stream.write_all(&out).await;
    let _ = stream.flush().await;
    Err(StartupError::Client(err))
}

/// Apply the parameter policy. Refusals are FATAL: the client asked for
/// something the gateway will not do, and silently dropping it could change
/// what its statements mean.
pub fn filter_params(minor: u16, params: Vec<(String, String)>) -> Result<ClientStartup, PgError> {
    let mut out = ClientStartup {
        requested_minor: minor,
        ..Default::default()
    };
    for (key, value) in params {
        let lower = key.to_ascii_lowercase();
        match lower.as_str() {
            "user" => out.user = Some(value),
            "database" => out.database = Some(value),
            // Pinned: an encoding such as SJIS or GBK would let the server read
            // bytes differently from the proxy.
            "client_encoding" => {}
            "replication" => {
                return Err(PgError::unsupported_fatal(
                    "replication connections are not allowed through pgwarden",
                ))
            }
            "options" => {
                return Err(PgError::not_authorized(
                    "the startup parameter \"options\" is not allowed through pgwarden (it can change any server setting)",
                )
                .with_hint("unset PGOPTIONS; settings a policy allows can be changed with SET"))
            }
            _ if lower.starts_with("_pq_.") => out.declined_options.push(key),
            _ if crate::policy::catalog::STARTUP_SETTINGS.contains(&lower.as_str()) => {
                if lower == "application_name" {
                    out.application_name = Some(value.clone());
                }
                out.upstream_params.push((key, value));
            }
            _ => {
                return Err(PgError::not_authorized(format!(
                    "the startup parameter \"{key}\" is not allowed through pgwarden"
                )))
            }
        }
    }
    out.upstream_params
        .push(("client_encoding".into(), "UTF8".into()));
    // A database or role default of `off` would make the server read
    // backslashes in '...' differently from the analyser.
    out.upstream_params
        .push(("standard_conforming_strings".into(), "on".into()));
    // Unqualified names are judged against this schema; pin it so the server
    // resolves them the same way (changing it later is built-in denied).
    out.upstream_params.push((
        "search_path".into(),
        crate::policy::analyze::PINNED_SCHEMA.into(),
    ));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn typical_driver_parameters_pass_and_encoding_is_pinned() {
        let s = filter_params(
            0,
            p(&[
                ("user", "agent"),
                ("database", "shop"),
                ("client_encoding", "SJIS"),
                ("DateStyle", "ISO"),
                ("TimeZone", "UTC"),
                ("extra_float_digits", "3"),
                ("application_name", "pgbench"),
            ]),
        )
        .unwrap();
        assert_eq!(s.database.as_deref(), Some("shop"));
        assert_eq!(s.user.as_deref(), Some("agent"));
        assert_eq!(s.application_name.as_deref(), Some("pgbench"));
        let names: Vec<_> = s.upstream_params.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "DateStyle",
                "TimeZone",
                "extra_float_digits",
                "application_name",
                "client_encoding",
                "standard_conforming_strings",
                "search_path"
            ]
        );
        assert!(s
            .upstream_params
            .contains(&("client_encoding".into(), "UTF8".into())));
        assert!(!s
            .upstream_params
            .iter()
            .any(|(k, _)| k == "user" || k == "database"));
    }

    #[test]
    fn dangerous_parameters_are_refused() {
        for key in [
            "options",
            "replication",
            "search_path",
            "role",
            "session_authorization",
            "Options",
        ] {
            let err = filter_params(0, p(&[(key, "x")])).unwrap_err();
            assert!(err.is_fatal(), "{key}");
            let shown = err.message.to_ascii_lowercase();
            assert!(
                shown.contains(&key.to_ascii_lowercase()),
                "{key}: {}",
                err.message
            );
        }
    }

    #[test]
    fn protocol_options_are_declined_not_forwarded() {
        let s = filter_params(2, p(&[("_pq_.test", "1"), ("user", "u")])).unwrap();
        assert_eq!(s.declined_options, vec!["_pq_.test".to_string()]);
        assert_eq!(s.requested_minor, 2);
        // Only what pgwarden pins itself.
        assert!(!s.upstream_params.iter().any(|(k, _)| k.starts_with("_pq_")));
        assert_eq!(s.upstream_params.len(), 3);
    }
}
