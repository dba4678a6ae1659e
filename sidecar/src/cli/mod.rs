//! The `pgwarden` command line (DESIGN §5).

mod approvals;
mod check;
pub mod output;
mod run;
mod sessions;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

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
    /// Every recorded session, oldest first.
    List,
    /// One session as a transcript (its own chain is checked first).
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
    /// Every request, oldest first.
    List,
    /// One request in full.
    Show { id: String },
    /// Release the statement (once, for exactly its parameters and requester).
    Approve { id: String },
    /// Refuse it; the requester gets the reason.
    Deny { id: String },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
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

pub fn main_with(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Check(args) => check::check(args),
        Command::Approvals(args) => approvals::approvals(args),
        Command::Sessions(args) => sessions::sessions(args),
    }
}
