//! Stage 3: the statement gate. Every Query and Parse passes `Gate::judge`
//! before any byte of it reaches the server.
//!
//! `analyze` (PostgreSQL's parser → accesses) and `decide` (rules → verdict)
//! are pure; this module adds the verdict cache and the per-session state a
//! verdict depends on (which prepared statements the session created through
//! pgwarden, so `EXECUTE name` is judged by what `name` really is).

pub mod analyze;
mod cache;
pub mod catalog;
pub mod decide;
pub mod rules;

use std::collections::HashSet;
use std::sync::Arc;

use pgwarden_api::{Action, DatabaseAccessPolicySpec};

use crate::wire::PgError;
use analyze::{AnalyzeError, Effect, Settings, Statement};
use cache::VerdictCache;
use decide::{Decision, Policy};
use rules::CompiledRule;

/// Outcome for one statement text. A refusal carries the error the client
/// gets; the session itself goes on.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Refuse(PgError),
}

/// The analysis and decision for one query text: what the cache holds.
#[derive(Debug)]
pub struct Judgement {
    pub statements: Vec<Statement>,
    pub outcome: Result<Decision, AnalyzeError>,
}

impl Judgement {
    pub fn action(&self) -> Action {
        match &self.outcome {
            Ok(d) => d.action,
            Err(_) => Action::Deny,
        }
    }

    pub fn reason(&self) -> String {
        match &self.outcome {
            Ok(d) => d.reason(),
            Err(e) => format!("denied: {e}"),
        }
    }
}

/// Prepared statements this session created through pgwarden (SQL PREPARE
/// and named protocol-level Parse share one namespace in PostgreSQL).
#[derive(Debug, Default)]
pub struct SessionState {
    prepared: HashSet<String>,
}

impl SessionState {
    pub fn prepared(&mut self, name: &str) {
        if !name.is_empty() {
            self.prepared.insert(name.to_owned());
        }
    }

    pub fn closed(&mut self, name: &str) {
        self.prepared.remove(name);
    }
}

/// One policy's compiled rules and verdict cache, shared by its sessions.
pub struct Gate {
    policy: Policy,
    settings: Settings,
    cache: VerdictCache,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("rules", &self.policy.rules.len())
            .finish()
    }
}

/// Verdict cache entries per policy (distinct statement texts).
pub const DEFAULT_CACHE_ENTRIES: usize = 4096;

impl Gate {
    pub fn new(spec: &DatabaseAccessPolicySpec, cache_entries: usize) -> Self {
        Gate {
            policy: Policy {
                rules: spec.rules.iter().map(CompiledRule::new).collect(),
                default_action: spec.default_action,
            },
            settings: Settings {
                pin_statement_timeout: spec
                    .limits
                    .as_ref()
                    .is_some_and(|l| l.statement_timeout.is_some()),
            },
            cache: VerdictCache::new(cache_entries),
        }
    }

    /// Analyse and decide, from the cache when this text was seen before.
    pub fn evaluate(&self, sql: &str) -> Arc<Judgement> {
        if let Some(j) = self.cache.get(sql) {
            return j;
        }
        let j = Arc::new(match analyze::analyze(sql, self.settings) {
            Ok(statements) => {
                let outcome = Ok(self.policy.decide(&statements));
                Judgement {
                    statements,
                    outcome,
                }
            }
            Err(e) => Judgement {
                statements: Vec::new(),
                outcome: Err(e),
            },
        });
        self.cache.insert(sql, j.clone());
        j
    }

    /// The verdict for a query text in this session; applies the text's
    /// effects on the session's prepared statements when it is allowed.
    pub fn judge(&self, sql: &str, session: &mut SessionState) -> Verdict {
        let j = self.evaluate(sql);
        match j.action() {
            Action::Allow => {}
            Action::Deny if matches!(j.outcome, Err(AnalyzeError::Parse(_))) => {
                return Verdict::Refuse(PgError::syntax_error(j.reason()))
            }
            Action::Deny => return Verdict::Refuse(PgError::denied(j.reason())),
            Action::RequireApproval => {
                return Verdict::Refuse(
                    PgError::denied(j.reason()).with_hint(
                        "this version of pgwarden cannot hold statements for approval yet",
                    ),
                )
            }
        }
        match apply_effects(&j, session) {
            Ok(()) => Verdict::Allow,
            Err(why) => Verdict::Refuse(PgError::denied(why)),
        }
    }
}

/// Apply an allowed text's effects on the session's prepared statements.
/// EXECUTE runs what was prepared: allowed only for names this session
/// prepared through pgwarden (their text was judged then). Statements are
/// simulated in order so `PREPARE p ...; EXECUTE p` in one string works.
pub fn apply_effects(j: &Judgement, session: &mut SessionState) -> Result<(), String> {
    let mut prepared = session.prepared.clone();
    for s in &j.statements {
        match &s.effect {
            Some(Effect::Prepare(n)) => {
                prepared.insert(n.clone());
            }
            Some(Effect::Deallocate(Some(n))) => {
                prepared.remove(n);
            }
            Some(Effect::Deallocate(None)) => prepared.clear(),
            Some(Effect::Execute(n)) if !prepared.contains(n) => {
                return Err(format!(
                    "denied: EXECUTE of \"{n}\", which was not prepared through pgwarden in this session"
                ));
            }
            _ => {}
        }
    }
    session.prepared = prepared;
    Ok(())
}

#[cfg(test)]
mod tests;
