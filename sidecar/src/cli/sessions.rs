//! `pgwarden sessions list|replay|verify`: reading the recording log.
//!
//! Exit codes: 0 done (verify: the log is intact), 1 verify found a broken
//! link or the session is unknown, 2 usage or I/O errors.

use std::process::ExitCode;

use super::{OutputFormat, SessionsArgs, SessionsCommand};
use crate::recording::log::{self, LogError};
use crate::recording::replay;

const EXIT_BROKEN: u8 = 1;
const EXIT_ERROR: u8 = 2;

pub fn sessions(args: SessionsArgs) -> anyhow::Result<ExitCode> {
    let dir = &args.state_dir;
    match args.command {
        SessionsCommand::List => match log::sessions(dir) {
            Ok(all) => {
                match args.output {
                    OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&all)?),
                    OutputFormat::Text => {
                        println!(
                            "{:<16} {:<27} {:<24} {:>10} {:>6} {:<8}",
                            "ID", "STARTED", "SUBJECT", "STATEMENTS", "DENIED", "ENDED"
                        );
                        for s in all {
                            println!(
                                "{:<16} {:<27} {:<24} {:>10} {:>6} {:<8}",
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
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => Ok(fail(EXIT_ERROR, &e)),
        },
        SessionsCommand::Replay { id } => {
            let records = match log::records(dir, |r| r.session == id) {
                Ok(r) => r,
                Err(e) => return Ok(fail(EXIT_ERROR, &e)),
            };
            if records.is_empty() {
                eprintln!("pgwarden sessions: no session {id}");
                return Ok(ExitCode::from(EXIT_BROKEN));
            }
            // A replay is only as good as the session's own chain.
            let lines: Vec<String> = records
                .iter()
                .map(|r| crate::recording::record::seal(r).0)
                .collect();
            let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
            if let Err((i, b)) = crate::recording::chain::verify_session(&refs) {
                eprintln!(
                    "pgwarden sessions: session {id} is broken at its record {}: {b}",
                    i + 1
                );
                return Ok(ExitCode::from(EXIT_BROKEN));
            }
            match args.output {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&records)?),
                OutputFormat::Text => print!("{}", replay::transcript(&records)),
            }
            Ok(ExitCode::SUCCESS)
        }
        SessionsCommand::Verify => match log::verify(dir) {
            Ok(s) => {
                match args.output {
                    OutputFormat::Json => println!(
                        "{}",
                        serde_json::json!({"intact": true, "records": s.records, "sessions": s.sessions,
                                           "lastSeq": s.last_seq, "lastHash": s.last_hash})
                    ),
                    OutputFormat::Text => println!(
                        "intact: {} records, {} sessions; last record {} hash {}",
                        s.records, s.sessions, s.last_seq, s.last_hash
                    ),
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(e @ LogError::Broken(..)) => {
                match args.output {
                    OutputFormat::Json => println!(
                        "{}",
                        serde_json::json!({"intact": false, "error": e.to_string()})
                    ),
                    OutputFormat::Text => println!("BROKEN: {e}"),
                }
                Ok(ExitCode::from(EXIT_BROKEN))
            }
            Err(e) => Ok(fail(EXIT_ERROR, &e)),
        },
    }
}

fn fail(code: u8, e: &LogError) -> ExitCode {
    eprintln!("pgwarden sessions: {e}");
    ExitCode::from(code)
}
