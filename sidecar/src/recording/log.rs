//! Reading the log back: every line with its place, and sessions grouped.
//!
//! A damaged line (its seal does not hold) does not make the rest of the log
//! unreadable: every session verifies on its own through its `sessionPrev`
//! chain, so listing and replaying go on around it. A damaged line is named
//! (where it is, and the session it claims to be of), the session it claims
//! is flagged, and `verify` reports the broken chain.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::chain::{Broken, ChainReport, LogVerifier};
use super::record::{self, Event, Record, RecordedVerdict};
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
/// (without newline) and whether it ended with a newline. A line that is not
/// UTF-8 (an edited byte can make it so) is passed lossily: its seal fails.
pub fn walk(dir: &Path, mut f: impl FnMut(Place, &str, bool)) -> Result<(), LogError> {
    let segs = spool::segments(dir).map_err(|e| LogError::Io(dir.to_owned(), e))?;
    for path in segs {
        let file = File::open(&path).map_err(|e| LogError::Io(path.clone(), e))?;
        let mut reader = BufReader::new(file);
        let mut buf = Vec::new();
        let mut n = 0;
        loop {
            buf.clear();
            let read = reader
                .read_until(b'\n', &mut buf)
                .map_err(|e| LogError::Io(path.clone(), e))?;
            if read == 0 {
                break;
            }
            n += 1;
            let complete = buf.ends_with(b"\n");
            if complete {
                buf.pop();
            }
            let place = Place {
                file: path.clone(),
                line: n,
            };
            f(place, &String::from_utf8_lossy(&buf), complete);
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("no recordings in {0}: the gateway records only with `recording:` in its policy")]
    Empty(PathBuf),
}

fn recordings(state_dir: &Path) -> Result<PathBuf, LogError> {
    let dir = spool::dir(state_dir);
    if !dir.is_dir() {
        return Err(LogError::Empty(dir));
    }
    Ok(dir)
}

/// Verify the whole log against its head, chain by chain (a gateway that
/// found the log broken at start began a new chain).
pub fn verify(state_dir: &Path) -> Result<Vec<ChainReport<Place>>, LogError> {
    let dir = recordings(state_dir)?;
    let head = spool::read_head(&dir)?;
    let mut v = LogVerifier::new(head);
    let mut last = Place {
        file: dir.clone(),
        line: 0,
    };
    walk(&dir, |place, line, complete| {
        if complete {
            v.feed(place.clone(), line);
        } else {
            v.torn(place.clone());
        }
        last = place;
    })?;
    Ok(v.finish(last))
}

/// Every complete line of the log with its place (a torn tail is left to
/// `verify`).
pub fn each_line(state_dir: &Path, mut f: impl FnMut(String, &str)) -> Result<(), LogError> {
    let dir = recordings(state_dir)?;
    walk(&dir, |place, line, complete| {
        if complete {
            f(place.to_string(), line);
        }
    })
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
    /// Damaged lines that claim to be this session's (where they are): its
    /// replay fails there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub damaged: Vec<String>,
}

/// What a listing found.
#[derive(Debug, Default)]
pub struct Listing {
    pub sessions: Vec<SessionInfo>,
    /// Every damaged line: "place: why", and the session it claims.
    pub damaged: Vec<(String, String, Option<String>)>,
}

/// Sessions in log order, from lines in log order (sans-IO).
#[derive(Debug, Default)]
pub struct Summarizer {
    out: Listing,
    index: std::collections::HashMap<String, usize>,
}

impl Summarizer {
    pub fn line(&mut self, place: String, line: &str) {
        match record::open(line) {
            Ok((r, _)) => self.record(&r),
            Err(e) => {
                let why = Broken::Edited(e.to_string()).to_string();
                let claimed = record::claimed(line).0;
                if let Some(id) = &claimed {
                    let i = self.session(id, None);
                    self.out.sessions[i].damaged.push(place.clone());
                }
                self.out.damaged.push((place, why, claimed));
            }
        }
    }

    /// The index of session `id`, listed from here on if it was not yet.
    fn session(&mut self, id: &str, start: Option<SessionInfo>) -> usize {
        if let Some(&i) = self.index.get(id) {
            if let Some(info) = start {
                // Its start came after a damaged line that claimed it.
                let s = &mut self.out.sessions[i];
                let damaged = std::mem::take(&mut s.damaged);
                *s = SessionInfo { damaged, ..info };
            }
            return i;
        }
        let info = start.unwrap_or_else(|| SessionInfo {
            id: id.to_owned(),
            subject: "?".into(),
            started: "?".into(),
            ended: None,
            statements: 0,
            denied: 0,
            policy: "?".into(),
            database: "?".into(),
            client: "?".into(),
            application_name: String::new(),
            damaged: Vec::new(),
        });
        self.index.insert(id.to_owned(), self.out.sessions.len());
        self.out.sessions.push(info);
        self.out.sessions.len() - 1
    }

    fn record(&mut self, r: &Record) {
        match &r.event {
            Event::SessionStart {
                subject,
                client,
                application_name,
                policy,
                database,
                ..
            } => {
                let info = SessionInfo {
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
                    damaged: Vec::new(),
                };
                self.session(&r.session, Some(info));
            }
            Event::Statement { verdict, .. } => {
                if let Some(s) = self
                    .index
                    .get(&r.session)
                    .map(|&i| &mut self.out.sessions[i])
                {
                    s.statements += 1;
                    if *verdict == RecordedVerdict::Deny {
                        s.denied += 1;
                    }
                }
            }
            Event::SessionEnd { .. } => {
                if let Some(s) = self
                    .index
                    .get(&r.session)
                    .map(|&i| &mut self.out.sessions[i])
                {
                    s.ended = Some(r.at.clone());
                }
            }
            Event::Result { .. } | Event::LogRestart { .. } => {}
        }
    }

    pub fn finish(self) -> Listing {
        self.out
    }
}

pub fn sessions(state_dir: &Path) -> Result<Listing, LogError> {
    let mut s = Summarizer::default();
    each_line(state_dir, |place, line| s.line(place, line))?;
    Ok(s.finish())
}

/// One session's lines exactly as stored, damaged ones that claim it
/// included (for `replay`, which verifies the session's own chain over the
/// original bytes), with their places.
#[derive(Debug, Default)]
pub struct SessionLines {
    pub lines: Vec<(String, String)>,
    /// The session has no intact end record, and damaged lines that claim
    /// no session come after its start: its last records may be among them
    /// ("place: why").
    pub maybe_lost: Vec<String>,
}

/// Picks one session's lines from lines in log order (sans-IO).
#[derive(Debug)]
pub struct SessionPicker<'a> {
    id: &'a str,
    out: SessionLines,
    started: bool,
    ended: bool,
    unclaimed_after_start: Vec<String>,
}

impl<'a> SessionPicker<'a> {
    pub fn new(id: &'a str) -> Self {
        SessionPicker {
            id,
            out: SessionLines::default(),
            started: false,
            ended: false,
            unclaimed_after_start: Vec::new(),
        }
    }

    pub fn line(&mut self, place: String, line: &str) {
        match record::open(line) {
            Ok((r, _)) => {
                if r.session == self.id {
                    self.started = true;
                    self.ended |= matches!(r.event, Event::SessionEnd { .. });
                    self.out.lines.push((place, line.to_owned()));
                }
            }
            Err(e) => match record::claimed(line).0 {
                Some(s) if s == self.id => {
                    self.started = true;
                    self.out.lines.push((place, line.to_owned()));
                }
                Some(_) => {}
                None if self.started => self
                    .unclaimed_after_start
                    .push(format!("{place}: {}", Broken::Edited(e.to_string()))),
                None => {}
            },
        }
    }

    pub fn finish(mut self) -> SessionLines {
        if !self.ended {
            self.out.maybe_lost = self.unclaimed_after_start;
        }
        self.out
    }
}

pub fn session_lines(state_dir: &Path, session: &str) -> Result<SessionLines, LogError> {
    let mut p = SessionPicker::new(session);
    each_line(state_dir, |place, line| p.line(place, line))?;
    Ok(p.finish())
}

/// Verify one chain's lines from a store (no head to compare with); places
/// are 1-based positions.
pub fn verify_lines(lines: &[String]) -> Vec<ChainReport<usize>> {
    let mut v = LogVerifier::new(None);
    for (i, l) in lines.iter().enumerate() {
        v.feed(i + 1, l);
    }
    v.finish(lines.len())
}

#[cfg(test)]
mod tests;
