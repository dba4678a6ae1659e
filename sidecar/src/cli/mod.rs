//! The `pgwarden` command line (DESIGN §5).

mod approvals;
mod check;
mod completions;
pub mod kubectl;
pub mod output;
mod run;
mod sessions;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use k8s_openapi::jiff::{self, Timestamp};

/// `--state-dir` when neither the flag nor [`STATE_DIR_ENV`] is given.
pub const DEFAULT_STATE_DIR: &str = "./pgwarden-state";
/// The environment variable `--state-dir` falls back to (`run`,
/// `approvals`, `sessions`).
pub const STATE_DIR_ENV: &str = "PGWARDEN_STATE_DIR";

/// The reviewer's commands read a gateway's state directory and never create
/// one: a wrong path must be an error naming it, not an empty answer.
pub(crate) fn existing_state_dir(dir: &Path) -> Result<(), String> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("state directory {}: not a directory", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "no state directory at {}: pass the gateway's --state-dir DIR (or set {STATE_DIR_ENV}); this command never creates one",
            dir.display()
        )),
        Err(e) => Err(format!("state directory {}: {e}", dir.display())),
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "pgwarden",
    version,
    about = "A PostgreSQL guard for AI agents and CI jobs"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway in standalone mode from policy and Secret YAML files.
    // Boxed: many flags, and the enum should not be as large as its largest arm.
    Run(Box<RunArgs>),
    /// Judge SQL against a policy, without a database (exit code: 0 allow,
    /// 1 deny, 3 require approval, 2 usage or configuration error); without
    /// --sql or --sql-file, lint the policy (exit code: 0 clean, 1 warnings).
    Check(CheckArgs),
    /// List and decide statements waiting for approval (standalone mode).
    Approvals(ApprovalsArgs),
    /// List, replay and verify recorded sessions.
    Sessions(SessionsArgs),
    /// Print the shell's completion script (bash, zsh or fish).
    Completions(completions::CompletionsArgs),
    /// Decide a cluster's ApprovalRequests with kubectl underneath (this
    /// binary installed as kubectl-pgwarden is `kubectl pgwarden`).
    Kubectl(kubectl::KubectlArgs),
}

#[derive(Debug, clap::Args)]
pub struct SessionsArgs {
    #[command(subcommand)]
    pub command: SessionsCommand,
    /// The gateway's --state-dir (never created here: a missing one is an error).
    #[arg(long, global = true, env = STATE_DIR_ENV, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Read the audit PostgreSQL instead (a role that can SELECT the table).
    #[arg(long, global = true, env = "PGWARDEN_STORE_DSN")]
    pub store_dsn: Option<String>,
    /// The table in the audit store.
    #[arg(long, global = true, default_value = crate::recording::ship::DEFAULT_TABLE)]
    pub store_table: String,
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// Recorded sessions, oldest first (with --limit: the newest N, newest first).
    List {
        #[command(flatten)]
        filter: ListFilter,
    },
    /// One session as a transcript (its own chain is checked first). ID may
    /// be a unique prefix.
    Replay { id: String },
    /// Check the whole log's hash chain; exit 1 at the first broken link.
    Verify,
}

#[derive(Debug, clap::Args)]
pub struct ApprovalsArgs {
    #[command(subcommand)]
    pub command: ApprovalsCommand,
    /// The gateway's --state-dir (never created here: a missing one is an error).
    #[arg(long, global = true, env = STATE_DIR_ENV, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Why (approve and deny); the requester reads it.
    #[arg(long, global = true)]
    pub reason: Option<String>,
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// Requests, oldest first (with --limit: the newest N, newest first).
    List {
        /// Only requests in this phase (pending, approved, denied, expired,
        /// executed, failed).
        #[arg(long, value_parser = parse_phase)]
        phase: Option<pgwarden_api::ApprovalPhase>,
        #[command(flatten)]
        filter: ListFilter,
    },
    /// One request in full. ID (here and below) may be a unique prefix.
    Show { id: String },
    /// Release the statement (once, for exactly its parameters and requester).
    Approve { id: String },
    /// Refuse it; the requester gets the reason.
    Deny { id: String },
}

/// What `approvals list` and `sessions list` narrow their listing to.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ListFilter {
    /// Only these subjects (a glob: `*` any run, `?` one character).
    #[arg(long)]
    pub subject: Option<String>,
    /// Only those created or started since: a duration back from now (`1h`,
    /// `30m`) or an RFC 3339 time.
    #[arg(long, value_parser = parse_since)]
    pub since: Option<Timestamp>,
    /// At most N: the newest, newest first.
    #[arg(long)]
    pub limit: Option<usize>,
}

impl ListFilter {
    /// Keep the items this filter admits, given each one's subject and time
    /// (an item without a time is kept only without --since), in the order
    /// the listing shows them.
    pub fn apply<T>(&self, items: Vec<T>, key: impl Fn(&T) -> (&str, Option<Timestamp>)) -> Vec<T> {
        let mut kept: Vec<(Option<Timestamp>, T)> = items
            .into_iter()
            .filter_map(|item| {
                let (subject, at) = key(&item);
                let subject_ok = self
                    .subject
                    .as_deref()
                    .is_none_or(|g| crate::glob::glob_match(g, subject));
                let since_ok = self.since.is_none_or(|s| at.is_some_and(|t| t >= s));
                (subject_ok && since_ok).then_some((at, item))
            })
            .collect();
        if let Some(n) = self.limit {
            // Stable: items of the same time keep their listing order.
            kept.sort_by_key(|k| std::cmp::Reverse(k.0));
            kept.truncate(n);
        }
        kept.into_iter().map(|(_, item)| item).collect()
    }
}

fn parse_since(s: &str) -> Result<Timestamp, String> {
    if let Ok(t) = s.parse::<Timestamp>() {
        return Ok(t);
    }
    let back = parse_duration(s)
        .map_err(|_| format!("{s:?} is neither a duration (1h, 30m) nor an RFC 3339 time"))?;
    jiff::SignedDuration::try_from(back)
        .ok()
        .and_then(|d| Timestamp::now().checked_sub(d).ok())
        .ok_or_else(|| format!("{s:?} reaches back too far"))
}

fn parse_phase(s: &str) -> Result<pgwarden_api::ApprovalPhase, String> {
    use pgwarden_api::ApprovalPhase as P;
    [
        P::Pending,
        P::Approved,
        P::Denied,
        P::Expired,
        P::Executed,
        P::Failed,
    ]
    .into_iter()
    .find(|p| format!("{p:?}").eq_ignore_ascii_case(s))
    .ok_or_else(|| {
        format!("unknown phase {s:?}: pending, approved, denied, expired, executed or failed")
    })
}

/// An ID as given on the command line: the one known ID it is, or starts.
#[derive(Debug, PartialEq, Eq)]
pub enum IdMatch {
    /// Exactly one known ID is, or starts with, what was given.
    One(String),
    /// None does: the caller reports it as not found (under the given ID).
    None,
    /// Several do: these, sorted.
    Ambiguous(Vec<String>),
}

/// Resolve `given` against the known IDs: an exact match wins, else a
/// unique prefix.
pub fn resolve_id<'a>(given: &str, known: impl IntoIterator<Item = &'a str>) -> IdMatch {
    let mut found: Vec<String> = Vec::new();
    for id in known {
        if id == given {
            return IdMatch::One(id.to_owned());
        }
        if !given.is_empty() && id.starts_with(given) && !found.iter().any(|f| f == id) {
            found.push(id.to_owned());
        }
    }
    match found.len() {
        0 => IdMatch::None,
        1 => IdMatch::One(found.remove(0)),
        _ => {
            found.sort();
            IdMatch::Ambiguous(found)
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// YAML file(s) with the DatabaseAccessPolicy (Secrets are not needed).
    #[arg(short = 'f', long = "file", required = true)]
    pub files: Vec<PathBuf>,
    /// The SQL to judge as one Query message (several statements allowed);
    /// `-` reads a file of statements from standard input, as --sql-file.
    #[arg(long, conflicts_with = "sql_file")]
    pub sql: Option<String>,
    /// A file of statements (a migration): each is judged in order as the
    /// Query `psql -f` sends for it, in one session.
    #[arg(long)]
    pub sql_file: Option<PathBuf>,
    /// Which policy, when the files hold several (name or namespace/name).
    #[arg(long)]
    pub policy: Option<String>,
    /// Names the session has already prepared (for judging EXECUTE).
    #[arg(long = "prepared")]
    pub prepared: Vec<String>,
    /// Functions that exist outside pg_catalog in the database (a live
    /// gateway reads them at login): calls by these names are user code.
    #[arg(long = "user-function")]
    pub user_functions: Vec<String>,
    /// Operators that exist outside pg_catalog in the database.
    #[arg(long = "user-operator")]
    pub user_operators: Vec<String>,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// YAML file(s) with DatabaseAccessPolicy and v1 Secret objects (multi-document allowed).
    #[arg(short = 'f', long = "file", required_unless_present = "operator")]
    pub files: Vec<PathBuf>,
    /// Log lines on stderr: text, or json (one object a line: timestamp,
    /// level, target, message, the event's fields and its span's).
    #[arg(long, value_enum, env = "PGWARDEN_LOG_FORMAT", default_value_t = OutputFormat::Text)]
    pub log_format: OutputFormat,
    /// Operator mode (set by injection): follow the operator's config stream
    /// at this URL (https://HOST:PORT) instead of reading -f files. Clients
    /// get 57P03 until the first configuration arrives.
    #[arg(
        long,
        env = "PGWARDEN_OPERATOR",
        conflicts_with = "files",
        requires = "operator_ca"
    )]
    pub operator: Option<String>,
    /// PEM CA that verifies the operator (the only CA trusted for it).
    #[arg(long, env = "PGWARDEN_OPERATOR_CA")]
    pub operator_ca: Option<PathBuf>,
    /// The sidecar's projected service-account token (audience
    /// pgwarden.io/sidecar); read again at every connect.
    #[arg(long, env = "PGWARDEN_OPERATOR_TOKEN_FILE", default_value = crate::config::stream::DEFAULT_TOKEN_FILE)]
    pub operator_token_file: PathBuf,
    /// How long the stream may be down before the configuration is stale:
    /// statements are then refused (57P03) until the operator is back.
    #[arg(long, env = "PGWARDEN_OPERATOR_STALE_AFTER", default_value = "10m", value_parser = parse_duration)]
    pub operator_stale_after: std::time::Duration,
    /// Address clients connect to.
    #[arg(long, default_value = "127.0.0.1:6432")]
    pub listen: SocketAddr,
    /// Also listen on a Unix-domain socket in DIR, named as PostgreSQL
    /// names it (DIR/.s.PGSQL.PORT, PORT from --listen), so `psql -h DIR -p
    /// PORT` connects. The kernel tells the OS user of its clients: it is
    /// recorded on their approval requests and may not decide them.
    #[arg(long, value_name = "DIR")]
    pub listen_unix: Option<PathBuf>,
    /// For a TCP client on this host, find the OS user owning its socket
    /// (Linux: /proc/net/tcp): recorded on its approval requests, and it may
    /// not decide them. `off` records it as unknown, so the agent's own OS
    /// user may approve (one user for agent and reviewer).
    #[arg(long, value_enum, env = "PGWARDEN_LOOPBACK_OWNER", default_value_t = Switch::On)]
    pub loopback_owner: Switch,
    /// Where approvals and recordings are kept (created if missing).
    #[arg(long, env = STATE_DIR_ENV, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Serve /metrics, /healthz and /readyz here.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// PEM certificate chain for client TLS (SSLRequest and direct TLS).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Client connections served at once; more are refused with SQLSTATE 53300.
    #[arg(long, default_value_t = 1000)]
    pub max_connections: usize,
    /// Largest single protocol message accepted (queries, bind parameters,
    /// COPY chunks, rows), in bytes.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Tokio worker threads; 0 runs everything on one thread (lowest overhead
    /// for a sidecar with few connections).
    #[arg(long, default_value_t = 0)]
    pub worker_threads: usize,
    /// Distinct statement texts whose verdicts are cached per policy (0 turns
    /// the cache off: every statement is parsed and judged again).
    #[arg(long, default_value_t = crate::policy::DEFAULT_CACHE_ENTRIES)]
    pub verdict_cache_entries: usize,
    /// Seconds to let open sessions finish after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 10)]
    pub shutdown_grace_seconds: u64,
    /// Seconds a client has to log in (PostgreSQL's authentication_timeout).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub startup_timeout_seconds: u64,
    /// Connections from one address that may be logging in at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_unauthenticated_per_source: u64,
    /// PEM CA bundle trusted (besides the Mozilla roots) when fetching a
    /// token issuer's discovery document and keys; repeatable.
    #[arg(long = "issuer-ca-file")]
    pub issuer_ca_files: Vec<PathBuf>,
    /// The cluster's service-account token issuer, for `identity.kubernetes`.
    #[arg(long, env = "PGWARDEN_KUBERNETES_ISSUER")]
    pub kubernetes_issuer: Option<String>,
    /// The cluster issuer's JWKS as a file, instead of fetching it.
    #[arg(long, env = "PGWARDEN_KUBERNETES_JWKS_FILE")]
    pub kubernetes_jwks_file: Option<PathBuf>,
    /// Namespace of the pod this sidecar serves (downward API); Kubernetes
    /// tokens from other namespaces are refused.
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
    /// Name of the pod this sidecar serves; tokens bound to other pods are refused.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Service account of that pod; tokens of other service accounts are refused.
    #[arg(long, env = "POD_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,
    /// File holding the key of the `Hash` masking strategy (keyed HMAC-SHA256;
    /// at least 32 bytes). Equal values give equal pseudonyms under one key.
    #[arg(long, env = "PGWARDEN_MASKING_KEY_FILE")]
    pub masking_key_file: Option<PathBuf>,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    s.parse::<pgwarden_api::Duration>()
        .map(|d| d.as_std())
        .map_err(|e| e.to_string())
}

impl Cli {
    /// The log format asked for (`run --log-format`); other commands log text.
    pub fn log_format(&self) -> OutputFormat {
        match &self.command {
            Command::Run(args) => args.log_format,
            _ => OutputFormat::Text,
        }
    }
}

pub fn main_with(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Check(args) => check::check(args),
        Command::Approvals(args) => approvals::approvals(args),
        Command::Sessions(args) => sessions::sessions(args),
        Command::Completions(args) => completions::completions(args),
        Command::Kubectl(args) => kubectl::kubectl(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_resolve_exactly_or_by_a_unique_prefix() {
        let known = ["abc123", "abd456", "abc"];
        assert_eq!(resolve_id("abc", known), IdMatch::One("abc".into()));
        assert_eq!(resolve_id("abd", known), IdMatch::One("abd456".into()));
        assert_eq!(
            resolve_id("ab", known),
            IdMatch::Ambiguous(vec!["abc".into(), "abc123".into(), "abd456".into()])
        );
        assert_eq!(resolve_id("x", known), IdMatch::None);
        assert_eq!(resolve_id("", known), IdMatch::None);
    }

    #[test]
    fn list_filters_by_subject_time_and_keep_the_newest() {
        let items = vec![
            ("dev", "2026-01-01T00:00:00Z"),
            ("ci:main", "2026-01-03T00:00:00Z"),
            ("ci:pr", "2026-01-02T00:00:00Z"),
        ];
        let f = ListFilter {
            subject: Some("ci:*".into()),
            ..Default::default()
        };
        assert_eq!(
            f.apply(items.clone(), |i| (i.0, i.1.parse().ok())),
            vec![items[1], items[2]]
        );
        let f = ListFilter {
            since: Some(parse_since("2026-01-02T00:00:00Z").unwrap()),
            ..Default::default()
        };
        assert_eq!(
            f.apply(items.clone(), |i| (i.0, i.1.parse().ok())),
            vec![items[1], items[2]]
        );
        let f = ListFilter {
            limit: Some(2),
            ..Default::default()
        };
        assert_eq!(
            f.apply(items.clone(), |i| (i.0, i.1.parse().ok())),
            vec![items[1], items[2]]
        );
        assert!(parse_since("1h").unwrap() < Timestamp::now());
        assert!(parse_since("yesterday").is_err());
        assert_eq!(
            parse_phase("PENDING"),
            Ok(pgwarden_api::ApprovalPhase::Pending)
        );
        assert!(parse_phase("maybe").is_err());
    }
}
