//! The proxy's side of the upstream login, sans-IO: given the server's
//! authentication request, produce the response to send. Supports what a
//! PostgreSQL server asks for with a password: SCRAM-SHA-256 (with
//! tls-server-end-point channel binding over TLS), md5 and cleartext.

use bytes::BytesMut;
use postgres_protocol::authentication::{
    md5_hash,
    sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS},
};

use super::Credential;
use crate::wire::codec::{self, AuthRequest};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("the upstream server asked for an authentication method pgwarden does not support (code {0})")]
    Unsupported(i32),
    #[error("the upstream server offered no SASL mechanism pgwarden supports ({0})")]
    NoMechanism(String),
    #[error("SCRAM exchange failed: {0}")]
    Scram(String),
    #[error("the upstream server sent an authentication message out of order")]
    OutOfOrder,
    #[error("the upstream server did not prove it knows the password (SCRAM verification failed)")]
    ServerNotVerified,
}

enum State {
    Start,
    Scram(Box<ScramSha256>),
    ScramFinal(Box<ScramSha256>),
    Done,
}

pub struct Login {
    credential: Credential,
    /// tls-server-end-point hash when the connection is TLS.
    channel_binding: Option<Vec<u8>>,
    state: State,
}

/// What to do after a server request.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Send(BytesMut),
    /// AuthenticationOk: wait for ParameterStatus/BackendKeyData/ReadyForQuery.
    Authenticated,
    /// SASLFinal verified; AuthenticationOk follows.
    Wait,
}

impl Login {
    pub fn new(credential: Credential, channel_binding: Option<Vec<u8>>) -> Self {
        Login {
            credential,
            channel_binding,
            state: State::Start,
        }
    }

    pub fn step(&mut self, req: AuthRequest<'_>) -> Result<Step, AuthError> {
        let pw = self.credential.password.expose().as_bytes();
        let mut out = BytesMut::new();
        let state = std::mem::replace(&mut self.state, State::Done);
        match (state, req) {
            (State::Start | State::Done, AuthRequest::Ok) => {
                return Ok(Step::Authenticated);
            }
            (State::Start, AuthRequest::Cleartext) => {
                codec::put_password(self.credential.password.expose(), &mut out);
            }
            (State::Start, AuthRequest::Md5 { salt }) => {
                let hash = md5_hash(self.credential.username.as_bytes(), pw, salt);
                codec::put_password(&hash, &mut out);
            }
            (State::Start, AuthRequest::Sasl { mechanisms }) => {
                let plus = mechanisms.contains(&SCRAM_SHA_256_PLUS);
                let (mechanism, binding) = match (&self.channel_binding, plus) {
                    (Some(hash), true) => (
                        SCRAM_SHA_256_PLUS,
                        ChannelBinding::tls_server_end_point(hash.clone()),
                    ),
                    // Over TLS but the server offers no -PLUS: say we could
                    // have bound ('y'), so a downgrade by a middlebox shows.
                    (Some(_), false) => (SCRAM_SHA_256, ChannelBinding::unrequested()),
                    (None, _) => (SCRAM_SHA_256, ChannelBinding::unsupported()),
                };
                if !mechanisms.contains(&mechanism) {
                    return Err(AuthError::NoMechanism(mechanisms.join(", ")));
                }
                let scram = ScramSha256::new(pw, binding);
                codec::put_sasl_initial(mechanism, scram.message(), &mut out);
                self.state = State::Scram(Box::new(scram));
            }
            (State::Scram(mut scram), AuthRequest::SaslContinue(data)) => {
                scram
                    .update(data)
                    .map_err(|e| AuthError::Scram(e.to_string()))?;
                codec::put_sasl_response(scram.message(), &mut out);
                self.state = State::ScramFinal(scram);
            }
            (State::ScramFinal(mut scram), AuthRequest::SaslFinal(data)) => {
                scram
                    .finish(data)
                    .map_err(|_| AuthError::ServerNotVerified)?;
                return Ok(Step::Wait);
            }
            (_, AuthRequest::Unsupported(code)) => return Err(AuthError::Unsupported(code)),
            _ => return Err(AuthError::OutOfOrder),
        }
        Ok(Step::Send(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwarden_api::SecretString;

    fn credential() -> Credential {
        Credential {
            username: "app".into(),
            password: SecretString::new("pw".into()),
        }
    }

    /// The SASLInitialResponse body: mechanism, then the client-first message.
    fn initial(step: Step) -> (String, String) {
        let Step::Send(msg) = step else {
            panic!("expected a message to send, got {step:?}");
        };
        let body = &msg[5..];
        let nul = body.iter().position(|&b| b == 0).unwrap();
        let mechanism = String::from_utf8(body[..nul].to_vec()).unwrap();
        let data = String::from_utf8_lossy(&body[nul + 5..]).into_owned();
        (mechanism, data)
    }

    #[test]
    fn over_tls_scram_binds_to_the_server_certificate_when_offered() {
        let cred = credential();
        let mut login = Login::new(cred.clone(), Some(vec![7; 32]));
        let (mech, first) = initial(
            login
                .step(AuthRequest::Sasl {
                    mechanisms: vec![SCRAM_SHA_256_PLUS, SCRAM_SHA_256],
                })
                .unwrap(),
        );
        assert_eq!(mech, "SCRAM-SHA-256-PLUS");
        assert!(first.starts_with("p=tls-server-end-point,,"), "{first}");
    }

    #[test]
    fn without_plus_or_tls_the_gs2_flag_says_so() {
        let cred = credential();
        // TLS, but the server offers no -PLUS: 'y' reveals a downgrade.
        let mut login = Login::new(cred.clone(), Some(vec![7; 32]));
        let (mech, first) = initial(
            login
                .step(AuthRequest::Sasl {
                    mechanisms: vec![SCRAM_SHA_256],
                })
                .unwrap(),
        );
        assert_eq!((mech.as_str(), &first[..3]), ("SCRAM-SHA-256", "y,,"));
        // Plain TCP: 'n'.
        let mut login = Login::new(cred.clone(), None);
        let (_, first) = initial(
            login
                .step(AuthRequest::Sasl {
                    mechanisms: vec![SCRAM_SHA_256_PLUS, SCRAM_SHA_256],
                })
                .unwrap(),
        );
        assert!(first.starts_with("n,,"), "{first}");
    }

    #[test]
    fn a_server_that_skips_the_scram_proof_is_refused() {
        let cred = credential();
        let mut login = Login::new(cred.clone(), None);
        login
            .step(AuthRequest::Sasl {
                mechanisms: vec![SCRAM_SHA_256],
            })
            .unwrap();
        // AuthenticationOk without SASLContinue/SASLFinal: an impostor.
        assert_eq!(login.step(AuthRequest::Ok), Err(AuthError::OutOfOrder));
        // md5 answers with the salted hash, never the password.
        let mut login = Login::new(cred.clone(), None);
        let Step::Send(msg) = login.step(AuthRequest::Md5 { salt: [1, 2, 3, 4] }).unwrap() else {
            panic!("md5 should answer");
        };
        assert!(!String::from_utf8_lossy(&msg).contains("pw\0"));
        assert!(String::from_utf8_lossy(&msg).contains("md5"));
    }
}
