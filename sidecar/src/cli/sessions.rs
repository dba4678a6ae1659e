//! `pgwarden sessions list|replay|verify`: reading the recording log, from
//! the state directory or from the audit PostgreSQL (`--store-dsn`).
//!
//! Exit codes: 0 done (verify: the log is intact), 1 verify found a broken
//! link or the session is unknown, 2 usage or I/O errors.

use std::process::ExitCode;

use super::{OutputFormat, SessionsArgs, SessionsCommand};
use crate::recording::chain::Summary;
use crate::recording::log::{self, LogError, SessionInfo};
use crate::recording::record::Record;
use crate::recording::{replay, ship};
use crate::wire::Limits;

const EXIT_BROKEN: u8 = 1;
const EXIT_ERROR: u8 = 2;

/// Where the records come from.
enum Source {
    Dir(std::path::PathBuf),
    /// Chains (id, lines) read from the audit store.
    Store(Vec<(String, Vec<String>)>),
}

pub fn sessions(args: SessionsArgs) -> anyhow::Result<ExitCode> {
    let source = match &args.store_dsn {
        None => Source::Dir(args.state_dir.clone()),
        Some(dsn) => match fetch(dsn, &args.store_table) {
            Ok(chains) => Source::Store(chains),
            Err(e) => {
                eprintln!("pgwarden sessions: the recording store: {e}");
                return Ok(ExitCode::from(EXIT_ERROR));
            }
        },
    };
    match args.command {
        SessionsCommand::List => {
            let all = match &source {
                Source::Dir(d) => log::sessions(d).map_err(|e| e.to_string()),
                Source::Store(chains) => store_records(chains, |_| true).map(log::summarize),
            };
            match all {
                Ok(all) => {
                    print_list(&all, args.output)?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Ok(fail(EXIT_ERROR, &e)),
            }
        }
        SessionsCommand::Replay { id } => {
            // The session's own lines, byte for byte: its chain is checked
            // over what was stored, not over a re-serialisation.
            let lines: Result<Vec<String>, String> = match &source {
                Source::Dir(d) => log::session_lines(d, &id).map_err(|e| e.to_string()),
                Source::Store(chains) => Ok(chains
                    .iter()
                    .flat_map(|(_, lines)| lines.iter())
                    .filter(|l| {
                        crate::recording::record::open(l).is_ok_and(|(r, _)| r.session == id)
                    })
                    .cloned()
                    .collect()),
            };
            let lines = match lines {
                Ok(l) => l,
                Err(e) => return Ok(fail(EXIT_ERROR, &e)),
            };
            if lines.is_empty() {
                return Ok(fail(EXIT_BROKEN, &format!("no session {id}")));
            }
            let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
            let records = match crate::recording::chain::verify_session(&refs) {
                Ok(r) => r,
                Err((i, b)) => {
                    return Ok(fail(
                        EXIT_BROKEN,
                        &format!("session {id} is broken at its record {}: {b}", i + 1),
                    ))
                }
            };
            match args.output {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&records)?),
                OutputFormat::Text => print!("{}", replay::transcript(&records)),
            }
            Ok(ExitCode::SUCCESS)
        }
        SessionsCommand::Verify => {
            let result: Result<Vec<(String, Summary)>, String> = match &source {
                Source::Dir(d) => match log::verify(d) {
                    Ok(s) => Ok(vec![(d.display().to_string(), s)]),
                    Err(e @ LogError::Broken(..)) => Err(e.to_string()),
                    Err(e) => return Ok(fail(EXIT_ERROR, &e.to_string())),
                },
                Source::Store(chains) => chains
                    .iter()
                    .map(|(chain, lines)| {
                        log::verify_lines(lines)
                            .map(|s| (format!("chain {chain}"), s))
                            .map_err(|(i, b)| {
                                format!("chain {chain}, its record at position {}: {b}", i + 1)
                            })
                    })
                    .collect(),
            };
            match result {
                Ok(summaries) => {
                    for (what, s) in &summaries {
                        match args.output {
                            OutputFormat::Json => println!(
                                "{}",
                                serde_json::json!({"intact": true, "log": what, "records": s.records,
                                                   "sessions": s.sessions, "lastSeq": s.last_seq,
                                                   "lastHash": s.last_hash})
                            ),
                            OutputFormat::Text => println!(
                                "intact: {what}: {} records, {} sessions; last record {} hash {}",
                                s.records, s.sessions, s.last_seq, s.last_hash
                            ),
                        }
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    match args.output {
                        OutputFormat::Json => {
                            println!("{}", serde_json::json!({"intact": false, "error": e}))
                        }
                        OutputFormat::Text => println!("BROKEN: {e}"),
                    }
                    Ok(ExitCode::from(EXIT_BROKEN))
                }
            }
        }
    }
}

fn fetch(dsn: &str, table: &str) -> Result<Vec<(String, Vec<String>)>, String> {
    if !table
        .split('.')
        .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
    {
        return Err(format!("invalid table name {table:?}"));
    }
    let target = ship::parse_dsn(dsn)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(ship::fetch_lines(&target, table, Limits::default()))
}

fn store_records(
    chains: &[(String, Vec<String>)],
    mut keep: impl FnMut(&Record) -> bool,
) -> Result<Vec<Record>, String> {
    let mut out = Vec::new();
    for (chain, lines) in chains {
        let records = log::parse_lines(lines)
            .map_err(|(i, b)| format!("chain {chain}, record at position {}: {b}", i + 1))?;
        out.extend(records.into_iter().filter(|r| keep(r)));
    }
    Ok(out)
}

fn print_list(all: &[SessionInfo], output: OutputFormat) -> anyhow::Result<()> {
    match output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(all)?),
        OutputFormat::Text => {
            println!(
                "{:<16} {:<27} {:<24} {:>10} {:>6} {:<5}",
                "ID", "STARTED", "SUBJECT", "STATEMENTS", "DENIED", "ENDED"
            );
            for s in all {
                println!(
                    "{:<16} {:<27} {:<24} {:>10} {:>6} {:<5}",
                    s.id,
                    s.started,
                    s.subject,
                    s.statements,
                    s.denied,
                    if s.ended.is_some() { "yes" } else { "no" }
                );
            }
        }
    }
    Ok(())
}

fn fail(code: u8, e: &str) -> ExitCode {
    eprintln!("pgwarden sessions: {e}");
    ExitCode::from(code)
}
