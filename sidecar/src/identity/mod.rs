//! Who is on the other end of a client connection. One `Authenticator` per
//! policy, chosen from `spec.identity`; it may talk to the client (ask for a
//! password or token) and yields an `Identity` or a FATAL for the client.

use std::net::SocketAddr;

use pgwarden_api::DatabaseAccessPolicySpec;

use crate::wire::PgError;

/// An authenticated caller. `subject` flows into logs, recordings, approvals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub subject: String,
    pub method: &'static str,
}

/// Transport facts the authenticator needs.
#[derive(Debug, Clone, Copy)]
pub struct ClientTransport {
    pub peer: SocketAddr,
    pub tls: bool,
}

#[derive(Debug)]
pub enum Authenticator {
    /// Standalone only: loopback clients are this subject, no credential asked.
    LocalTrust { subject: String },
}

impl Authenticator {
    /// None when the policy names no identity this build supports (the config
    /// loader refuses those policies before they get here).
    pub fn from_spec(spec: &DatabaseAccessPolicySpec) -> Option<Self> {
        spec.identity
            .local_trust
            .as_ref()
            .map(|lt| Authenticator::LocalTrust {
                subject: lt.subject.clone(),
            })
    }

    pub fn authenticate(&self, transport: ClientTransport) -> Result<Identity, PgError> {
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
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_trust_admits_loopback_only() {
        let a = Authenticator::LocalTrust {
            subject: "dev".into(),
        };
        for peer in ["127.0.0.1:5000", "[::1]:5000", "127.3.4.5:1"] {
            let id = a
                .authenticate(ClientTransport {
                    peer: peer.parse().unwrap(),
                    tls: false,
                })
                .unwrap();
            assert_eq!(id.subject, "dev");
        }
        for peer in ["10.0.0.7:5000", "[2001:db8::1]:5000", "192.168.1.2:1"] {
            let err = a
                .authenticate(ClientTransport {
                    peer: peer.parse().unwrap(),
                    tls: true,
                })
                .unwrap_err();
            assert!(err.is_fatal());
            assert!(err.message.contains("loopback"));
        }
    }
}
