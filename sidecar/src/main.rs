#![forbid(unsafe_code)]

use std::io::IsTerminal;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // One TLS provider, installed before anything builds a rustls config.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = pgwarden_sidecar::cli::Cli::parse();
    match pgwarden_sidecar::cli::main_with(cli) {
        Ok(code) => code,
        Err(e) => {
            pgwarden_sidecar::cli::output::errln(&format!("pgwarden: {e:#}"));
            std::process::ExitCode::FAILURE
        }
    }
}
