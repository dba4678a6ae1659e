//! `pgwarden completions bash|zsh|fish`: the shell's completion script,
//! generated from the same definition the parser uses, so a new flag or
//! subcommand is never missing from it.

use std::process::ExitCode;

use clap::CommandFactory;

use super::output::out;
use super::Cli;

#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell: `source <(pgwarden completions bash)`, or save it where
    /// the shell looks (e.g. ~/.local/share/bash-completion/completions/pgwarden).
    #[arg(value_enum)]
    pub shell: Shell,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// The completion script for `shell`.
pub fn script(shell: Shell) -> String {
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "pgwarden", &mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

pub fn completions(args: CompletionsArgs) -> anyhow::Result<ExitCode> {
    out(&script(args.shell))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests;
