//! `pgwarden sessions list|replay|verify`: reading the recording log, from
//! the state directory or from the audit PostgreSQL (`--store-dsn`).
//!
//! A damaged line does not make the log unreadable: `list` lists every
//! session and warns about the line (naming the session it claims),
//! `replay` of any session it does not belong to works, `replay` of the one
//! it claims fails naming the line, and `verify` reports the broken chain.
//!
//! Exit codes: 0 done (verify: the log is intact), 1 verify found a broken
//! link, the session is broken or unknown, 2 usage or I/O errors (a state
//! directory that does not exist: nothing is ever created here).

use std::fmt::Write as _;
use std::process::ExitCode;

use super::output::{errln, out};
use super::{IdMatch, ListFilter, OutputFormat, SessionsArgs, SessionsCommand};
use crate::recording::chain::{ChainReport, Summary};
use crate::recording::log::{self, SessionInfo, SessionLines, SessionPicker, Summarizer};
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

/// Where a line of a store's chain is.
fn store_place(chain: &str, position: usize) -> String {
    format!("chain {chain}, position {position}")
}

pub fn sessions(args: SessionsArgs) -> anyhow::Result<ExitCode> {
    let source = match &args.store_dsn {
        None => {
            if let Err(e) = super::existing_state_dir(&args.state_dir) {
                return Ok(fail(EXIT_ERROR, &e));
            }
            Source::Dir(args.state_dir.clone())
        }
        Some(dsn) => match fetch(dsn, &args.store_table) {
            Ok(chains) => Source::Store(chains),
            Err(e) => return Ok(fail(EXIT_ERROR, &format!("the recording store: {e}"))),
        },
    };
    match args.command {
        SessionsCommand::List { filter } => list(&source, &filter, args.output),
        SessionsCommand::Replay { id } => {
            // A unique prefix of a listed session's ID is that session; a
            // session the listing misses is still replayed by its full ID.
            let listed = match read_listing(&source) {
                Ok(l) => l,
                Err(e) => return Ok(fail(EXIT_ERROR, &e)),
            };
            let id = match super::resolve_id(&id, listed.sessions.iter().map(|s| s.id.as_str())) {
                IdMatch::One(full) => full,
                IdMatch::None => id,
                IdMatch::Ambiguous(ids) => {
                    return Ok(fail(
                        EXIT_BROKEN,
                        &format!(
                            "{id:?} is the start of several sessions: {}",
                            ids.join(", ")
                        ),
                    ))
                }
            };
            replay_one(&source, &id, args.output)
        }
        SessionsCommand::Verify => verify(&source, args.output),
    }
}

fn read_listing(source: &Source) -> Result<log::Listing, String> {
    Ok(match source {
        Source::Dir(d) => log::sessions(d).map_err(|e| e.to_string())?,
        Source::Store(chains) => {
            let mut s = Summarizer::default();
            for (chain, lines) in chains {
                for (i, l) in lines.iter().enumerate() {
                    s.line(store_place(chain, i + 1), l);
                }
            }
            s.finish()
        }
    })
}

fn list(source: &Source, filter: &ListFilter, output: OutputFormat) -> anyhow::Result<ExitCode> {
    let mut listing = match read_listing(source) {
        Ok(l) => l,
        Err(e) => return Ok(fail(EXIT_ERROR, &e)),
    };
    let sessions = std::mem::take(&mut listing.sessions);
    listing.sessions = filter.apply(sessions, |s| (s.subject.as_str(), s.started.parse().ok()));
    for (place, why, claimed) in &listing.damaged {
        let whose = match claimed {
            Some(id) => format!("it claims session {id}, whose replay fails there"),
            None => "it claims no session".into(),
        };
        errln(&format!(
            "pgwarden sessions: warning: {place}: {why}; {whose}. The other sessions verify on their own; `pgwarden sessions verify` reports the log"
        ));
    }
    out(&render_list(&listing.sessions, output)?)?;
    Ok(ExitCode::SUCCESS)
}

fn replay_one(source: &Source, id: &str, output: OutputFormat) -> anyhow::Result<ExitCode> {
    // The session's own lines, byte for byte: its chain is checked over
    // what was stored, not over a re-serialisation.
    let picked: SessionLines = match source {
        Source::Dir(d) => match log::session_lines(d, id) {
            Ok(l) => l,
            Err(e) => return Ok(fail(EXIT_ERROR, &e.to_string())),
        },
        Source::Store(chains) => {
            let mut p = SessionPicker::new(id);
            for (chain, lines) in chains {
                for (i, l) in lines.iter().enumerate() {
                    p.line(store_place(chain, i + 1), l);
                }
            }
            p.finish()
        }
    };
    if picked.lines.is_empty() {
        return Ok(fail(EXIT_BROKEN, &format!("no session {id}")));
    }
    let refs: Vec<&str> = picked.lines.iter().map(|(_, l)| l.as_str()).collect();
    let records = match crate::recording::chain::verify_session(&refs) {
        Ok(r) => r,
        Err((i, b)) => {
            return Ok(fail(
                EXIT_BROKEN,
                &format!(
                    "session {id} is broken at its record {} ({}): {b}. Its records cannot be trusted; `pgwarden sessions verify` reports the whole log",
                    i + 1,
                    picked.lines[i].0
                ),
            ))
        }
    };
    for lost in &picked.maybe_lost {
        errln(&format!(
            "pgwarden sessions: warning: session {id} has no end record, and a damaged line after its start claims no session ({lost}): its last records may be lost there"
        ));
    }
    out(&match output {
        OutputFormat::Json => serde_json::to_string_pretty(&records)? + "\n",
        OutputFormat::Text => replay::transcript(&records),
    })?;
    Ok(ExitCode::SUCCESS)
}

fn verify(source: &Source, output: OutputFormat) -> anyhow::Result<ExitCode> {
    // (what was checked, where each line is) per chain.
    let reports: Vec<(String, Result<Summary, String>)> = match source {
        Source::Dir(d) => match log::verify(d) {
            Ok(reports) => label(reports, &d.display().to_string(), |p| p.to_string()),
            Err(e) => return Ok(fail(EXIT_ERROR, &e.to_string())),
        },
        Source::Store(chains) => chains
            .iter()
            .flat_map(|(chain, lines)| {
                label(log::verify_lines(lines), &format!("chain {chain}"), |&i| {
                    store_place(chain, i)
                })
            })
            .collect(),
    };
    let mut text = String::new();
    let mut intact = true;
    for (what, outcome) in &reports {
        match (outcome, output) {
            (Ok(s), OutputFormat::Json) => {
                let _ = writeln!(
                    text,
                    "{}",
                    serde_json::json!({"intact": true, "log": what, "records": s.records,
                                       "sessions": s.sessions, "lastSeq": s.last_seq,
                                       "lastHash": s.last_hash})
                );
            }
            (Ok(s), OutputFormat::Text) => {
                let _ = writeln!(
                    text,
                    "intact: {what}: {} records, {} sessions; last record {} hash {}",
                    s.records, s.sessions, s.last_seq, s.last_hash
                );
            }
            (Err(e), OutputFormat::Json) => {
                intact = false;
                let _ = writeln!(
                    text,
                    "{}",
                    serde_json::json!({"intact": false, "log": what, "error": e})
                );
            }
            (Err(e), OutputFormat::Text) => {
                intact = false;
                let _ = writeln!(text, "BROKEN: {e}");
            }
        }
    }
    out(&text)?;
    Ok(if intact {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_BROKEN)
    })
}

/// Reports as (what, outcome) lines: the first chain is the log itself,
/// later ones (started after a break) say where they start.
fn label<P>(
    reports: Vec<ChainReport<P>>,
    log: &str,
    place: impl Fn(&P) -> String,
) -> Vec<(String, Result<Summary, String>)> {
    reports
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let what = match (&r.from, i) {
                (Some(from), i) if i > 0 => format!("{log} (chain from {})", place(from)),
                _ => log.to_owned(),
            };
            let outcome = r.outcome.map_err(|(p, b)| format!("{}: {b}", place(&p)));
            (what, outcome)
        })
        .collect()
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

fn render_list(all: &[SessionInfo], output: OutputFormat) -> anyhow::Result<String> {
    Ok(match output {
        OutputFormat::Json => serde_json::to_string_pretty(all)? + "\n",
        OutputFormat::Text => {
            let mut t = format!(
                "{:<16} {:<27} {:<24} {:>10} {:>6} {:<5}\n",
                "ID", "STARTED", "SUBJECT", "STATEMENTS", "DENIED", "ENDED"
            );
            for s in all {
                let _ = write!(
                    t,
                    "{:<16} {:<27} {:<24} {:>10} {:>6} {:<5}",
                    s.id,
                    s.started,
                    s.subject,
                    s.statements,
                    s.denied,
                    if s.ended.is_some() { "yes" } else { "no" }
                );
                if !s.damaged.is_empty() {
                    let _ = write!(t, " DAMAGED at {}", s.damaged.join(", "));
                }
                t.push('\n');
            }
            t
        }
    })
}

fn fail(code: u8, e: &str) -> ExitCode {
    errln(&format!("pgwarden sessions: {e}"));
    ExitCode::from(code)
}
