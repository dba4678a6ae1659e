//! Stage 2: one client connection from accept to close.
//!
//! startup (TLS, parameters) → policy selection → client identity → upstream
//! login → greeting → relay. Each step either hands the next one a typed
//! result or ends the connection with a FATAL the client can act on.

mod approve;
mod cancel;
mod limits;
mod login_slots;
mod mask;
mod names;
mod outcome;
mod relay;
mod server_settings;
mod startup;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument};

pub use cancel::CancelRegistry;
pub use login_slots::{LoginSlot, LoginSlots};
pub use relay::End;
/// The startup-parameter filter, for the fuzz targets (fuzz/).
#[doc(hidden)]
pub use startup::filter_params;

use crate::config::{LiveConfig, PolicyConfig};
use crate::identity::{ClientTransport, Identity};
use crate::observe::Metrics;
use crate::transport::{Accepted, ClientStream};
use crate::upstream;
use crate::wire::codec;
use crate::wire::conn::FrameBuf;
use crate::wire::{Direction, Limits, PgError};
use startup::{Negotiated, StartupError};

/// State shared by every session of the gateway.
pub struct Shared {
    pub config: LiveConfig,
    pub tls: Option<TlsAcceptor>,
    pub cancels: CancelRegistry,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Becomes true when the gateway starts shutting down.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// How long a client has to log in (PostgreSQL's authentication_timeout).
    pub startup_timeout: std::time::Duration,
}

/// Serve one accepted client connection to its end. Never panics on input;
/// every failure is logged at the level its cause deserves.
pub async fn serve(conn: Accepted, peer: Peer, shared: Arc<Shared>, slot: LoginSlot) {
    let id = format!("{:016x}", rand::random::<u64>());
    let span = tracing::info_span!("session", session.id = %id, client.addr = %peer.label, subject = tracing::field::Empty);
    if let Accepted::Tcp(tcp) = &conn {
        // Small request/response messages: never wait for Nagle.
        let _ = tcp.set_nodelay(true);
    }
    shared.metrics.connections_total.inc();
    shared.metrics.connections_active.inc();
    let admitted = admit(conn, peer, &shared, &id, slot)
        .instrument(span.clone())
        .await;
    if let Some(admitted) = admitted {
        run(admitted, &shared, span).await;
    }
    shared.metrics.connections_active.dec();
}

/// Who connected, as the listener and the kernel tell it.
#[derive(Debug, Clone)]
pub struct Peer {
    /// For identity and per-source limits: a Unix-socket client is local
    /// (127.0.0.1 port 0), as PostgreSQL's `local` lines treat it.
    pub addr: SocketAddr,
    /// What the logs and the recording call the client.
    pub label: String,
    /// The client's OS user, where the kernel tells (Unix-socket peer
    /// credentials, or the owner of a local TCP client's socket; else
    /// `unknown`): recorded on approval requests, and it never decides.
    pub os_user: Option<String>,
}

impl Peer {
    pub fn tcp(addr: SocketAddr) -> Self {
        Peer {
            addr,
            label: addr.to_string(),
            os_user: None,
        }
    }
}

/// Everything up to the relay: the startup packet (or a cancel request),
/// the policy, the client's login, the upstream's, and the recording's start.
/// None: the client was refused (and told why) or left.
async fn admit<'s>(
    conn: Accepted,
    peer: Peer,
    shared: &'s Shared,
    session_id: &str,
    slot: LoginSlot,
) -> Option<Admitted<'s>> {
    let login_deadline = tokio::time::Instant::now() + shared.startup_timeout;
    let negotiated = match tokio::time::timeout_at(
        login_deadline,
        startup::negotiate(conn, shared.tls.as_ref()),
    )
    .await
    {
        Ok(n) => n,
        Err(_) => {
            debug!("no startup packet before the startup timeout");
            shared
                .metrics
                .startup_aborted
                .with_label_values(&["timeout"])
                .inc();
            return None;
        }
    };
    let negotiated = match negotiated {
        Ok(n) => n,
        Err(e) => {
            // Peer-caused: not our fault, so not a warning.
            debug!(error = %e, "startup failed");
            let reason = match e {
                StartupError::Client(_) => "startup_refused",
                StartupError::Tls(_) => "tls",
                StartupError::Closed | StartupError::Io(_) => "closed",
            };
            shared
                .metrics
                .connections_rejected
                .with_label_values(&[reason])
                .inc();
            return None;
        }
    };
    let (mut stream, startup) = match negotiated {
        Negotiated::Startup { stream, startup } => (stream, startup),
        Negotiated::Cancel { pid, secret } => {
            // Unknown keys are ignored silently, as PostgreSQL does.
            if let Some((target, key, interrupt)) = shared.cancels.lookup(pid, &secret) {
                // A statement waiting for approval stops waiting.
                interrupt.notify_waiters();
                if let Err(e) = upstream::cancel(&target, &key).await {
                    warn!(error = %e, "forwarding a cancel request failed");
                }
            }
            return None;
        }
    };
    let Some(config) = shared.config.current() else {
        // A sidecar waiting for its first configuration: never an open door.
        return refuse(&mut stream, PgError::not_ready()).await;
    };
    if shared.config.is_stale() {
        return refuse(&mut stream, PgError::config_stale()).await;
    }
    let generation = shared.config.generation();
    let Some(policy) = config.select(startup.database.as_deref()).cloned() else {
        let asked = startup.database.as_deref().unwrap_or("(none)");
        let err = PgError::unknown_database(format!(
            "no policy serves database \"{asked}\" on this gateway (it serves: {})",
            config.databases().join(", ")
        ));
        shared
            .metrics
            .connections_rejected
            .with_label_values(&["unknown_database"])
            .inc();
        return refuse(&mut stream, err).await;
    };
    let mut greeting = BytesMut::new();
    if startup.requested_minor > 0 || !startup.declined_options.is_empty() {
        // We speak 3.0 and none of the requested protocol options.
        codec::put_negotiate_protocol_version(0, startup.declined_options.clone(), &mut greeting);
    }
    let authenticated = tokio::time::timeout_at(
        login_deadline,
        authenticate(&mut stream, peer.addr, &policy, shared.limits),
    )
    .await;
    let login = match authenticated {
        Ok(Ok(login)) => Login {
            os_user: peer.os_user.clone(),
            ..login
        },
        Err(_) => {
            debug!("client did not log in before the startup timeout");
            shared
                .metrics
                .startup_aborted
                .with_label_values(&["timeout"])
                .inc();
            return refuse(&mut stream, PgError::startup_timeout()).await;
        }
        Ok(Err(err)) => {
            info!(reason = %err.message, "client authentication failed");
            shared
                .metrics
                .connections_rejected
                .with_label_values(&["auth"])
                .inc();
            return refuse(&mut stream, err).await;
        }
    };
    let identity = login.identity.clone();
    tracing::Span::current().record("subject", identity.subject.as_str());
    // Logged in: no longer counted against its source's pre-login cap.
    drop(slot);

    let policy_limits = policy.spec.limits.clone().unwrap_or_default();
    let statement_timeout = policy_limits.statement_timeout.map(|d| d.as_std());
    let mut upstream_params = startup.upstream_params.clone();
    if let Some(t) = statement_timeout {
        // The server enforces it; SET statement_timeout is then built-in denied.
        upstream_params.push(("statement_timeout".into(), format!("{}ms", t.as_millis())));
    }
    let up = match open_upstream(&policy, &upstream_params, shared.limits).await {
        Ok(up) => up,
        Err(e) => {
            // The upstream being down or refusing us is an operator problem.
            warn!(error = %e, upstream.kind = e.kind(), "upstream login failed");
            shared
                .metrics
                .upstream_errors
                .with_label_values(&[e.kind()])
                .inc();
            return refuse(&mut stream, e.to_client_error()).await;
        }
    };
    let server_settings = match server_settings::ServerSettings::at_login(
        up.parameter_status
            .iter()
            .filter_map(|ps| codec::parameter_status(&ps[5..]).ok()),
    ) {
        Ok(s) => s,
        Err(err) => {
            warn!(reason = %err.message, "upstream server settings refused");
            shared
                .metrics
                .upstream_errors
                .with_label_values(&["server_settings"])
                .inc();
            return refuse(&mut stream, err).await;
        }
    };
    if let Some(masking) = &policy.masking {
        // No column map, no session: results would otherwise pass unmasked.
        if let Err(why) = masking.map_for_session(shared.limits).await {
            shared
                .metrics
                .upstream_errors
                .with_label_values(&["masking_catalog"])
                .inc();
            return refuse(&mut stream, PgError::upstream_failed(why)).await;
        }
    }
    let interrupt = Arc::new(tokio::sync::Notify::new());
    let registration = up.key.clone().map(|key| {
        shared
            .cancels
            .register(policy.upstream.clone(), key, interrupt.clone())
    });

    // Recorded before the client can send anything: a session that cannot
    // be recorded does not start.
    let log = policy
        .recording
        .as_ref()
        .map(|rec| crate::recording::SessionLog::new(rec.clone(), session_id.to_owned()));
    if let Some(log) = &log {
        let ack = log.start(
            &identity.subject,
            identity.method,
            &identity.attributes,
            &peer.label,
            startup.application_name.as_deref().unwrap_or(""),
            &policy.id,
            &policy.upstream.database,
        );
        if let Some(ack) = ack {
            if ack.await.is_err() {
                return refuse(&mut stream, PgError::recording_failed()).await;
            }
        }
    }

    // What a server sends after a successful login, with our cancel key.
    codec::put_auth_ok(&mut greeting);
    for ps in &up.parameter_status {
        greeting.extend_from_slice(ps);
    }
    for n in &up.notices {
        greeting.extend_from_slice(n);
    }
    if let Some(r) = &registration {
        codec::put_backend_key_data(r.pid, r.secret, &mut greeting);
    }
    codec::put_ready_for_query(up.status, &mut greeting);
    if stream.write_all(&greeting).await.is_err() || stream.flush().await.is_err() {
        return None;
    }
    info!(
        policy.name = %policy.id,
        identity.method = identity.method,
        identity.claims = %DisplayAttributes(&identity.attributes),
        application_name = startup.application_name.as_deref().unwrap_or(""),
        "session started"
    );
    Some(Admitted {
        client: stream,
        upstream: up,
        policy,
        generation,
        login,
        statement_timeout,
        max_rows: policy_limits.max_rows,
        server_settings,
        interrupt,
        log,
        registration,
    })
}

/// A client that logged in, with its upstream session: what the relay needs.
struct Admitted<'s> {
    client: ClientStream,
    upstream: upstream::Upstream,
    policy: Arc<PolicyConfig>,
    generation: u64,
    login: Login,
    statement_timeout: Option<std::time::Duration>,
    max_rows: Option<u64>,
    server_settings: server_settings::ServerSettings,
    interrupt: Arc<tokio::sync::Notify>,
    log: Option<crate::recording::SessionLog>,
    /// Where CancelRequests for this session are found, until it ends.
    registration: Option<cancel::Registration<'s>>,
}

/// The relay, then the end logged and recorded.
///
/// The relay runs outside the session's span: entering and leaving it on
/// every poll was about 5% of a statement's CPU (issue #21). The relay's few
/// log lines enter it themselves.
async fn run(a: Admitted<'_>, shared: &Shared, span: tracing::Span) {
    let Admitted {
        client,
        upstream: up,
        policy,
        generation,
        login,
        statement_timeout,
        max_rows,
        server_settings,
        interrupt,
        log,
        registration,
    } = a;
    let subject = login.identity.subject.clone();
    let expires = login.identity.expires_at.map(expiry_instant);

    let relay = relay::Relay {
        policy: policy.clone(),
        live: &shared.config,
        generation,
        login,
        metrics: &shared.metrics,
        nonce: format!("{:016x}", rand::random::<u64>()),
        status: up.status,
        max_rows,
        statement_timeout,
        cancel: up.key.clone().map(|k| (policy.upstream.clone(), k)),
        shutdown: shared.shutdown.clone(),
        expires,
        masking: policy.masking.clone(),
        approvals: policy.approvals.clone(),
        subject,
        interrupt,
        log: log.as_ref(),
        limits: shared.limits,
        server_settings,
        span: span.clone(),
    };
    let end = relay
        .run(
            client,
            FrameBuf::new(Direction::Frontend, shared.limits),
            up.stream,
            FrameBuf::with_bytes(Direction::Backend, shared.limits, up.leftover),
        )
        .await;
    ended(&end, log.as_ref(), shared).instrument(span).await;
    drop(registration);
}

/// The session's end, in the log, the metrics and its recording.
async fn ended(end: &End, log: Option<&crate::recording::SessionLog>, shared: &Shared) {
    match end {
        End::ClientTerminated
        | End::ClientClosed
        | End::UpstreamClosed
        | End::Shutdown
        | End::CredentialExpired => {
            info!(end = ?end, "session ended")
        }
        End::ClientViolation(e) => {
            info!(error = %e.message, "session ended: client protocol violation")
        }
        End::ClientIo(e) => info!(error = %e, "session ended: client connection failed"),
        End::UpstreamFailed(why) => warn!(error = %why, "session ended: upstream failed"),
        End::Reconfigured(e) => {
            let reason = if e.code == crate::wire::SqlState::InvalidAuthorization {
                "revoked"
            } else {
                "reconnect"
            };
            shared
                .metrics
                .sessions_reconfigured
                .with_label_values(&[reason])
                .inc();
            info!(reason = %e.message, "session ended by a new configuration")
        }
        End::ServerSettingChanged(e) => {
            shared.metrics.server_setting_changes.inc();
            warn!(error = %e.message, "session ended: a server setting changed behind the gateway")
        }
        End::RecordingFailed => {
            tracing::error!("session ended: its recording could not be written")
        }
    }
    if let Some(log) = log {
        let reason = match end {
            End::ClientTerminated => "client terminated",
            End::ClientClosed => "client closed the connection",
            End::UpstreamClosed => "server closed the connection",
            End::ClientViolation(_) => "client protocol violation",
            End::UpstreamFailed(_) => "server connection failed",
            End::ClientIo(_) => "client connection failed",
            End::Shutdown => "gateway shutdown",
            End::CredentialExpired => "credential expired",
            End::RecordingFailed => "recording failed",
            End::ServerSettingChanged(_) => "server setting changed behind the gateway",
            End::Reconfigured(_) => "ended by a new configuration",
        };
        if let Some(ack) = log.end(reason) {
            let _ = ack.await;
        }
    }
}

/// Establish who the client is: for token identities, ask for the token as a
/// cleartext password (only over TLS or loopback) and verify it.
/// Who logged in, and what proves it: kept (in memory only) so that a new
/// configuration can decide again whether it admits this session.
pub struct Login {
    pub identity: Identity,
    pub transport: ClientTransport,
    pub token: Option<pgwarden_api::SecretString>,
    /// See [`Peer::os_user`].
    pub os_user: Option<String>,
}

impl Login {
    /// Whether `policy` admits this login: the same subject, by its rules.
    pub async fn admitted_by(&self, policy: &PolicyConfig) -> Result<(), String> {
        let token = self.token.as_ref().map(|t| t.expose());
        match policy
            .authenticator
            .authenticate(self.transport, token)
            .await
        {
            Ok(id) if id.subject == self.identity.subject => Ok(()),
            Ok(id) => Err(format!(
                "the policy now identifies this client as {:?}, not {:?}",
                id.subject, self.identity.subject
            )),
            Err(e) => Err(e
                .message
                .strip_prefix("pgwarden: ")
                .unwrap_or(&e.message)
                .to_owned()),
        }
    }
}

async fn authenticate(
    stream: &mut ClientStream,
    peer: SocketAddr,
    policy: &PolicyConfig,
    limits: Limits,
) -> Result<Login, PgError> {
    let auth = &policy.authenticator;
    let transport = ClientTransport {
        peer,
        tls: stream.is_tls(),
    };
    auth.check_transport(transport)?;
    if !auth.wants_password() {
        let identity = auth.authenticate(transport, None).await?;
        return Ok(Login {
            identity,
            transport,
            token: None,
            os_user: None,
        });
    }
    let mut ask = BytesMut::new();
    codec::put_auth_cleartext_request(&mut ask);
    stream
        .write_all(&ask)
        .await
        .map_err(|e| PgError::protocol_violation(format!("client connection failed: {e}")))?;
    stream
        .flush()
        .await
        .map_err(|e| PgError::protocol_violation(format!("client connection failed: {e}")))?;
    let mut frames = FrameBuf::new(Direction::Frontend, limits);
    let frame = tokio::time::timeout(PASSWORD_TIMEOUT, frames.next(stream))
        .await
        .map_err(|_| PgError::protocol_violation("no password message within 30s"))?;
    let (frame, bytes) = match frame {
        Ok(Some(f)) => f,
        Ok(None) => {
            return Err(PgError::protocol_violation(
                "client closed during authentication",
            ))
        }
        Err(e) => return Err(PgError::protocol_violation(e.to_string())),
    };
    if frame.ty != b'p' {
        return Err(PgError::protocol_violation(
            "expected a password message (the token)",
        ));
    }
    let token = codec::password(frame.body(&bytes))
        .map_err(|e| PgError::protocol_violation(format!("invalid password message: {e}")))?;
    let identity = auth.authenticate(transport, Some(token)).await?;
    Ok(Login {
        identity,
        transport,
        token: Some(pgwarden_api::SecretString::new(token.to_owned())),
        os_user: None,
    })
}

/// The monotonic instant a token's `exp` (with the accepted clock skew)
/// corresponds to.
fn expiry_instant(exp: u64) -> std::time::Instant {
    let left = (exp + crate::identity::LEEWAY_SECS).saturating_sub(crate::identity::unix_now());
    std::time::Instant::now() + std::time::Duration::from_secs(left)
}

/// How long a client may take to send its token once asked.
const PASSWORD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `key=value` pairs for the session log line.
struct DisplayAttributes<'a>(&'a [(String, String)]);

impl std::fmt::Display for DisplayAttributes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{k}={v:?}")?;
        }
        Ok(())
    }
}

/// Log in upstream and read which user code the database has: whether a call
/// by a built-in's name is built-in depends on it (policy::Gate::refine), so
/// without it there is no session.
async fn open_upstream(
    policy: &PolicyConfig,
    params: &[(String, String)],
    limits: Limits,
) -> Result<upstream::Upstream, upstream::UpstreamError> {
    let mut up = upstream::connect(&policy.upstream, params, limits).await?;
    let (functions, operators) = upstream::user_code(&mut up, limits).await?;
    policy.gate.learn_user_code(functions, operators);
    Ok(up)
}

/// Tell a client why it is refused and close; None, for `admit` to return.
async fn refuse<T>(stream: &mut ClientStream, err: PgError) -> Option<T> {
    let mut out = BytesMut::new();
    codec::put_error(&err, &mut out);
    let _ = stream.write_all(&out).await;
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
    None
}
