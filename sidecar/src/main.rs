#![forbid(unsafe_code)]

use std::io::IsTerminal;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // One TLS provider, installed before anything builds a rustls config.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // Parsed first: the log format is a flag (clap prints its own errors).
    // As `kubectl-pgwarden` (a kubectl plugin) the arguments are those of
    // `pgwarden kubectl`.
    use pgwarden_sidecar::cli::{kubectl, Cli, Command};
    let cli = if kubectl::invoked_as_plugin(std::env::args_os().next().as_deref()) {
        Cli {
            command: Command::Kubectl(kubectl::Plugin::parse().args),
        }
    } else {
        Cli::parse()
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match cli.log_format() {
        // For log shippers: message and fields at the top level, with the
        // current span's fields (session.id, ...) under "span".
        pgwarden_sidecar::cli::OutputFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        pgwarden_sidecar::cli::OutputFormat::Text => {
            logs.with_ansi(std::io::stderr().is_terminal()).init()
        }
    }
    match pgwarden_sidecar::cli::main_with(cli) {
        Ok(code) => code,
        Err(e) => {
            pgwarden_sidecar::cli::output::errln(&format!("pgwarden: {e:#}"));
            std::process::ExitCode::FAILURE
        }
    }
}
