//! Reading the log back: every line with its place, and sessions grouped.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::chain::{Broken, Summary, Verifier};
use super::record::{Event, Record};
use super::spool::{self, SpoolError};

/// Where a line is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub file: PathBuf,
    pub line: usize,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// Walk every line of the log in order. `f` gets the place and the line
/// (without newline) and whether it ended with a newline.
pub fn walk(
    dir: &Path,
    mut f: impl FnMut(Place, &str, bool) -> Result<(), (Place, Broken)>,
) -> Result<(), LogError> {
    let segs = spool::segments(dir).map_err(|e| LogError::Io(dir.to_owned(), e))?;
    for path in segs {
        let file = File::open(&path).map_err(|e| LogError::Io(path.clone(), e))?;
        let mut reader = BufReader::new(file);
        let mut buf = String::new();
        let mut n = 0;
        loop {
            buf.clear();
            let read = reader
                .read_line(&mut buf)
                .map_err(|e| LogError::Io(path.clone(), e))?;
            if read == 0 {
                break;
            }
            n += 1;
            let complete = buf.ends_with('\n');
            let place = Place {
                file: path.clone(),
                line: n,
            };
            f(place, buf.trim_end_matches('\n'), complete)
                .map_err(|(p, b)| LogError::Broken(p, b))?;
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Broken(Place, Broken),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("no recordings in {0}")]
    Empty(PathBuf),
}

/// Verify the whole log against its head.
pub fn verify(state_dir: &Path) -> Result<Summary, LogError> {
    let dir = spool::dir(state_dir);
    if !dir.exists() {
        return Err(LogError::Empty(dir));
    }
    let head = spool::read_head(&dir)?;
    let mut v = Verifier::new(head);
    let mut last_place = None;
    walk(&dir, |place, line, complete| {
        if !complete {
            return Err((place, Broken::TornLine));
        }
        v.feed(line).map_err(|b| (place.clone(), b))?;
        last_place = Some(place);
        Ok(())
    })?;
    v.finish().map_err(|b| {
        LogError::Broken(
            last_place.unwrap_or(Place {
                file: dir.clone(),
                line: 0,
            }),
            b,
        )
    })
}

/// Every complete line with its record (each line's own seal checked; a
/// torn tail is skipped here, `verify` reports it).
fn sealed_lines(state_dir: &Path, mut f: impl FnMut(Record, &str)) -> Result<(), LogError> {
    let dir = spool::dir(state_dir);
    if !dir.exists() {
        return Ok(());
    }
    walk(&dir, |place, line, complete| {
        if complete {
            let (r, _) =
                super::record::open(line).map_err(|e| (place, Broken::Edited(e.to_string())))?;
            f(r, line);
        }
        Ok(())
    })
}

/// Every record, in order.
pub fn records(
    state_dir: &Path,
    mut keep: impl FnMut(&Record) -> bool,
) -> Result<Vec<Record>, LogError> {
    let mut out = Vec::new();
    sealed_lines(state_dir, |r, _| {
        if keep(&r) {
            out.push(r);
        }
    })?;
    Ok(out)
}

/// One session's lines exactly as stored (for `replay`, which verifies the
/// session's own chain over the original bytes).
pub fn session_lines(state_dir: &Path, session: &str) -> Result<Vec<String>, LogError> {
    let mut out = Vec::new();
    sealed_lines(state_dir, |r, line| {
        if r.session == session {
            out.push(line.to_owned());
        }
    })?;
    Ok(out)
}

/// A session as `pgwarden sessions list` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    pub id: String,
    pub subject: String,
    pub started: String,
    pub ended: Option<String>,
    pub statements: u64,
    pub denied: u64,
    pub policy: String,
    pub database: String,
    pub client: String,
    pub application_name: String,
}

pub fn sessions(state_dir: &Path) -> Result<Vec<SessionInfo>, LogError> {
    Ok(summarize(records(state_dir, |_| true)?))
}

/// Records from lines of any store (each line's own seal checked).
pub fn parse_lines(lines: &[String]) -> Result<Vec<Record>, (usize, Broken)> {
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            super::record::open(l)
                .map(|(r, _)| r)
                .map_err(|e| (i, Broken::Edited(e.to_string())))
        })
        .collect()
}

/// Verify one chain's lines (from a store: no head to compare with).
pub fn verify_lines(lines: &[String]) -> Result<Summary, (usize, Broken)> {
    let mut v = Verifier::new(None);
    for (i, l) in lines.iter().enumerate() {
        v.feed(l).map_err(|b| (i, b))?;
    }
    v.finish().map_err(|b| (lines.len(), b))
}

/// Sessions in log order, from their records.
pub fn summarize(records: Vec<Record>) -> Vec<SessionInfo> {
    let mut out: Vec<SessionInfo> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for r in records {
        match &r.event {
            Event::SessionStart {
                subject,
                client,
                application_name,
                policy,
                database,
                ..
            } => {
                index.insert(r.session.clone(), out.len());
                out.push(SessionInfo {
                    id: r.session.clone(),
                    subject: subject.clone(),
                    started: r.at.clone(),
                    ended: None,
                    statements: 0,
                    denied: 0,
                    policy: policy.clone(),
                    database: database.clone(),
                    client: client.clone(),
                    application_name: application_name.clone(),
                });
            }
            Event::Statement { verdict, .. } => {
                if let Some(s) = index.get(&r.session).map(|&i| &mut out[i]) {
                    s.statements += 1;
                    if verdict == "deny" {
                        s.denied += 1;
                    }
                }
            }
            Event::SessionEnd { .. } => {
                if let Some(s) = index.get(&r.session).map(|&i| &mut out[i]) {
                    s.ended = Some(r.at.clone());
                }
            }
            Event::Result { .. } => {}
        }
    }
    out
}
