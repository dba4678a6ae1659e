//! Every ErrorResponse and NoticeResponse the proxy itself sends is built here,
//! with typed severity and SQLSTATE, so clients see errors shaped like the
//! server's and callers cannot invent an ad-hoc code.

/// ERROR: the statement fails, the session goes on (discard until Sync).
/// FATAL: the connection is closed after the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
    Notice,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Notice => "NOTICE",
        }
    }
}

/// The SQLSTATEs the proxy uses (PostgreSQL appendix A).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SqlState {
    /// 08P01: the peer broke the protocol.
    ProtocolViolation,
    /// 08006: the upstream connection failed or dropped.
    ConnectionFailure,
    /// 08001: the upstream could not be reached at all.
    UnableToConnect,
    /// 28000: the client is not allowed in (transport or identity).
    InvalidAuthorization,
    /// 28P01: bad password / token.
    InvalidPassword,
    /// 3D000: no policy serves the requested database.
    InvalidCatalogName,
    /// 42501: refused by policy.
    InsufficientPrivilege,
    /// 42601: the statement does not parse (as the server would say).
    SyntaxError,
    /// 0A000: a protocol feature the proxy does not offer.
    FeatureNotSupported,
    /// 53300: connection limit reached.
    TooManyConnections,
    /// 57P01: the proxy is shutting down.
    AdminShutdown,
    /// 57P03: not ready (no configuration yet).
    CannotConnectNow,
    /// 57014: the client cancelled (a statement waiting for approval).
    QueryCanceled,
    /// 54000: a policy limit (maxRows) was exceeded.
    ProgramLimitExceeded,
    /// XX000: a fault of ours.
    InternalError,
    /// 00000: what PostgreSQL puts on plain notices.
    SuccessfulCompletion,
}

impl SqlState {
    pub fn code(self) -> &'static str {
        match self {
            SqlState::ProtocolViolation => "08P01",
            SqlState::ConnectionFailure => "08006",
            SqlState::UnableToConnect => "08001",
            SqlState::InvalidAuthorization => "28000",
            SqlState::InvalidPassword => "28P01",
            SqlState::InvalidCatalogName => "3D000",
            SqlState::InsufficientPrivilege => "42501",
            SqlState::SyntaxError => "42601",
            SqlState::FeatureNotSupported => "0A000",
            SqlState::TooManyConnections => "53300",
            SqlState::AdminShutdown => "57P01",
            SqlState::CannotConnectNow => "57P03",
            SqlState::QueryCanceled => "57014",
            SqlState::ProgramLimitExceeded => "54000",
            SqlState::InternalError => "XX000",
            SqlState::SuccessfulCompletion => "00000",
        }
    }
}

/// An error or notice to send to the client. Messages start with `pgwarden:` so
/// a user can tell the proxy's words from the server's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgError {
    pub severity: Severity,
    pub code: SqlState,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl PgError {
    fn new(severity: Severity, code: SqlState, message: impl Into<String>) -> Self {
        PgError {
            severity,
            code,
            message: format!("pgwarden: {}", message.into()),
            detail: None,
            hint: None,
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn is_fatal(&self) -> bool {
        self.severity == Severity::Fatal
    }

    /// A malformed or oversized message: FATAL, the connection closes.
    pub fn protocol_violation(what: impl Into<String>) -> Self {
        Self::new(Severity::Fatal, SqlState::ProtocolViolation, what)
    }

    /// A statement refused by policy: ERROR, the session stays usable.
    pub fn denied(message: impl Into<String>) -> Self {
        Self::new(Severity::Error, SqlState::InsufficientPrivilege, message)
    }

    /// Text the parser rejects: refused with the server's own SQLSTATE, so
    /// drivers that look for 42601 see a syntax error.
    pub fn syntax_error(message: impl Into<String>) -> Self {
        Self::new(Severity::Error, SqlState::SyntaxError, message)
    }

    /// A protocol feature the proxy refuses but the session survives.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(Severity::Error, SqlState::FeatureNotSupported, message)
    }

    pub fn unsupported_fatal(message: impl Into<String>) -> Self {
        Self::new(Severity::Fatal, SqlState::FeatureNotSupported, message)
    }

    pub fn not_authorized(message: impl Into<String>) -> Self {
        Self::new(Severity::Fatal, SqlState::InvalidAuthorization, message)
    }

    pub fn bad_password(message: impl Into<String>) -> Self {
        Self::new(Severity::Fatal, SqlState::InvalidPassword, message)
    }

    /// The session's token expired: FATAL, the client reconnects with a new one.
    pub fn credential_expired() -> Self {
        Self::new(
            Severity::Fatal,
            SqlState::InvalidPassword,
            "terminating connection: the token this session authenticated with has expired; reconnect with a fresh token",
        )
    }

    pub fn unknown_database(message: impl Into<String>) -> Self {
        Self::new(Severity::Fatal, SqlState::InvalidCatalogName, message)
    }

    pub fn upstream_unreachable(message: impl Into<String>) -> Self {
        Self::new(Severity::Fatal, SqlState::UnableToConnect, message)
    }

    pub fn upstream_failed(message: impl Into<String>) -> Self {
        Self::new(Severity::Fatal, SqlState::ConnectionFailure, message)
    }

    pub fn too_many_connections() -> Self {
        Self::new(
            Severity::Fatal,
            SqlState::TooManyConnections,
            "too many client connections",
        )
    }

    pub fn shutting_down() -> Self {
        Self::new(
            Severity::Fatal,
            SqlState::AdminShutdown,
            "terminating connection: the gateway is shutting down",
        )
    }

    /// A policy limit cut a result off: ERROR, the session stays usable.
    pub fn limit_exceeded(message: impl Into<String>) -> Self {
        Self::new(Severity::Error, SqlState::ProgramLimitExceeded, message)
    }

    /// Session recording is required and failed: the session ends.
    pub fn recording_failed() -> Self {
        Self::new(
            Severity::Fatal,
            SqlState::InternalError,
            "the session recording could not be written; the session ends rather than go on unrecorded",
        )
    }

    /// The client cancelled a statement the proxy was holding.
    pub fn canceled(message: impl Into<String>) -> Self {
        Self::new(Severity::Error, SqlState::QueryCanceled, message)
    }

    /// No configuration yet (a sidecar waiting for the operator).
    pub fn not_ready() -> Self {
        Self::new(
            Severity::Fatal,
            SqlState::CannotConnectNow,
            "the gateway has no configuration yet; try again shortly",
        )
    }

    /// Operator mode: the config stream has been down longer than allowed,
    /// so a policy change or revocation may have been missed.
    pub fn config_stale() -> Self {
        Self::new(
            Severity::Fatal,
            SqlState::CannotConnectNow,
            "the gateway's configuration is stale: the operator has been unreachable for longer than --operator-stale-after; statements are refused until it is back",
        )
    }

    /// A new configuration no longer admits this session.
    pub fn access_revoked(why: impl Into<String>) -> Self {
        Self::new(
            Severity::Fatal,
            SqlState::InvalidAuthorization,
            format!("access revoked: {}", why.into()),
        )
    }

    /// A new configuration changed what an open session cannot switch to
    /// (its upstream or masking): it must reconnect.
    pub fn reconnect(why: impl Into<String>) -> Self {
        Self::new(
            Severity::Fatal,
            SqlState::AdminShutdown,
            format!(
                "terminating connection: {}; reconnect to continue under the new policy",
                why.into()
            ),
        )
    }

    /// The client did not log in in time (PostgreSQL's authentication_timeout).
    pub fn startup_timeout() -> Self {
        Self::new(
            Severity::Fatal,
            SqlState::ProtocolViolation,
            "canceling authentication due to timeout",
        )
    }

    /// Too many connections from one address have not logged in yet.
    pub fn too_many_logins_from_source() -> Self {
        Self::new(
            Severity::Fatal,
            SqlState::TooManyConnections,
            "too many connections from this address that have not logged in yet",
        )
    }

    /// The server changed a setting the gateway's judgement relies on.
    pub fn server_setting_changed(message: impl Into<String>) -> Self {
        Self::new(Severity::Fatal, SqlState::InsufficientPrivilege, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Severity::Fatal, SqlState::InternalError, message)
    }

    pub fn notice(message: impl Into<String>) -> Self {
        Self::new(Severity::Notice, SqlState::SuccessfulCompletion, message)
    }

    /// Wire fields (code, value) in the order PostgreSQL sends them.
    pub fn fields(&self) -> Vec<(u8, String)> {
        let mut f = vec![
            (b'S', self.severity.as_str().to_owned()),
            (b'V', self.severity.as_str().to_owned()),
            (b'C', self.code.code().to_owned()),
            (b'M', self.message.clone()),
        ];
        if let Some(d) = &self.detail {
            f.push((b'D', d.clone()));
        }
        if let Some(h) = &self.hint {
            f.push((b'H', h.clone()));
        }
        f
    }
}
