//! Stage 3: the statement gate. Every Query and Parse passes `Gate::judge`
//! before any byte of it reaches the server.
//!
//! `analyze` (PostgreSQL's parser → accesses) and `decide` (rules → verdict)
//! are pure; this module adds the verdict cache and the per-session state a
//! verdict depends on (which prepared statements the session created through
//! pgwarden, so `EXECUTE name` is judged by what `name` really is).

pub mod analyze;
pub mod budget;
mod cache;
pub mod catalog;
pub mod decide;
pub mod normalize;
pub mod rules;
pub mod split;
mod tree;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use pgwarden_api::{Action, DatabaseAccessPolicySpec, StatementClass};

use crate::wire::PgError;
use analyze::{Access, AnalyzeError, Effect, Settings, Statement, Target};
use cache::VerdictCache;
use decide::{AccessDecision, DecidedBy, Decision, Policy};
use rules::CompiledRule;

/// Outcome for one statement text. A refusal carries the error the client
/// gets; the session itself goes on.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Refuse(PgError),
    /// A rule (or the default action) asks a human first; the text is why
    /// (`approval required by rule "x": DDL on public.t`).
    RequireApproval(String),
}

/// The analysis and decision for one query text: what the cache holds.
#[derive(Debug)]
pub struct Judgement {
    pub statements: Vec<Statement>,
    pub outcome: Result<Decision, AnalyzeError>,
    /// What a later stage derived from it (masking's plan), kept with the
    /// cached judgement so it is computed once per text, not per statement
    /// (`masking::plan::statement_mask` per statement was a tenth of the
    /// proxy's instructions). Typed by that stage: the policy does not know it.
    pub derived: Derived,
}

/// A slot for one value a later stage derives from a judgement.
#[derive(Default)]
pub struct Derived(Mutex<Option<Box<dyn std::any::Any + Send + Sync>>>);

impl std::fmt::Debug for Derived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Derived")
    }
}

impl Derived {
    /// The slot's value if it is a `T` that `keep` accepts, else `compute`'s
    /// (which then replaces it).
    pub fn get_or<T: Clone + Send + Sync + 'static>(
        &self,
        keep: impl FnOnce(&T) -> bool,
        compute: impl FnOnce() -> T,
    ) -> T {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = slot.as_ref().and_then(|b| b.downcast_ref::<T>()) {
            if keep(v) {
                return v.clone();
            }
        }
        let v = compute();
        *slot = Some(Box::new(v.clone()));
        v
    }
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
/// and named protocol-level Parse share one namespace in PostgreSQL), and how
/// often SQL `EXECUTE` may run each.
#[derive(Debug, Default)]
pub struct SessionState {
    prepared: HashMap<String, Runs>,
}

/// How often SQL `EXECUTE` may run a prepared statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runs {
    /// Its text was allowed: as often as the client likes.
    Any,
    /// Its text needed approval and a reviewer approved the PREPARE: one
    /// execution is released, as for any other approved statement.
    Once,
    /// That one execution has run.
    Spent,
}

impl SessionState {
    /// A named statement the client prepared with the protocol's Parse.
    pub fn prepared(&mut self, name: &str) {
        if !name.is_empty() {
            self.prepared.insert(name.to_owned(), Runs::Any);
        }
    }

    /// Closed, deallocated, or in an unknown state after a change the
    /// server refused: SQL `EXECUTE` of it is refused until it is prepared
    /// again.
    pub fn closed(&mut self, name: &str) {
        self.prepared.remove(name);
    }

    pub fn closed_all(&mut self) {
        self.prepared.clear();
    }
}

/// Names of functions and operators that exist outside pg_catalog in the
/// database. A call by such a name may resolve to user code (PostgreSQL picks
/// an overload by argument types across the search path, and `o.f` calls
/// `f(o)`), so it is never treated as built-in.
#[derive(Debug, Default)]
pub struct UserCode {
    pub functions: HashSet<String>,
    pub operators: HashSet<String>,
}

/// One policy's compiled rules and verdict cache, shared by its sessions.
pub struct Gate {
    policy: Policy,
    settings: Settings,
    cache: VerdictCache,
    /// Learnt from the database at each login and from CREATE FUNCTION /
    /// CREATE OPERATOR that pass; it only grows (a dropped name stays, which
    /// is merely stricter).
    user_code: Mutex<UserCode>,
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
            user_code: Mutex::new(UserCode::default()),
        }
    }

    fn user_code(&self) -> MutexGuard<'_, UserCode> {
        self.user_code.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The user-code names learnt so far (functions, operators).
    pub fn user_code_names(&self) -> (Vec<String>, Vec<String>) {
        let uc = self.user_code();
        (
            uc.functions.iter().cloned().collect(),
            uc.operators.iter().cloned().collect(),
        )
    }

    /// Add names of functions and operators found outside pg_catalog.
    pub fn learn_user_code(
        &self,
        functions: impl IntoIterator<Item = String>,
        operators: impl IntoIterator<Item = String>,
    ) {
        let mut uc = self.user_code();
        uc.functions.extend(functions);
        uc.operators.extend(operators);
    }

    /// Analyse and decide, from the cache when this text — or one that
    /// differs only in numeric literals (`normalize`) — was seen before.
    pub fn evaluate(&self, sql: &str) -> Arc<Judgement> {
        let key = match normalize::numeric_key(sql) {
            // NUL never occurs in a query text: the two kinds of keys
            // cannot collide.
            Some(mut key) => {
                // In place: the key usually has room to spare (a literal
                // became one digit).
                key.insert(0, '\0');
                Cow::Owned(key)
            }
            None => Cow::Borrowed(sql),
        };
        if let Some(j) = self.cache.get(&key) {
            // A parse error's message may quote the text: not shared.
            if !matches!(j.outcome, Err(AnalyzeError::Parse(_))) || key == sql {
                return j;
            }
            return Arc::new(self.judge_text(sql));
        }
        let j = Arc::new(self.judge_text(sql));
        self.cache.insert(&key, j.clone());
        j
    }

    /// What `analyze` needs besides the text (to analyse off the event loop).
    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// A judgement from an analysis made elsewhere (a large text analysed
    /// on a blocking thread), cached as `evaluate` would.
    pub fn judgement_from(&self, analysis: Result<Vec<Statement>, AnalyzeError>) -> Arc<Judgement> {
        Arc::new(self.judgement_of(analysis))
    }

    /// `judge_with` for a judgement already made by `judgement_from`.
    pub fn judge_judged(
        &self,
        j: Arc<Judgement>,
        session: &mut SessionState,
    ) -> (Verdict, Arc<Judgement>) {
        let (v, _) = self.verdict(&j, session, false);
        self.learn_definitions(&j);
        (v, j)
    }

    /// `judge_judged`, with the deciding rule's name when `rule` is asked
    /// for (the recording), from the same decision in this session: decided
    /// once.
    pub fn judge_judged_with_rule(
        &self,
        j: &Judgement,
        session: &SessionState,
        rule: bool,
    ) -> (Verdict, Option<String>) {
        let v = self.verdict(j, session, rule);
        self.learn_definitions(j);
        v
    }

    /// Names a text defines as user code are learnt whatever its verdict:
    /// knowing one too many only makes later verdicts stricter.
    pub fn learn_definitions(&self, j: &Judgement) {
        let (mut functions, mut operators) = (Vec::new(), Vec::new());
        for s in &j.statements {
            match &s.effect {
                Some(Effect::DefinesFunction(n)) => functions.push(n.clone()),
                Some(Effect::DefinesOperator(n)) => operators.push(n.clone()),
                _ => {}
            }
        }
        if !functions.is_empty() || !operators.is_empty() {
            self.learn_user_code(functions, operators);
        }
    }

    fn judge_text(&self, sql: &str) -> Judgement {
        self.judgement_of(analyze::analyze(sql, self.settings))
    }

    fn judgement_of(&self, analysis: Result<Vec<Statement>, AnalyzeError>) -> Judgement {
        match analysis {
            Ok(statements) => {
                let outcome = Ok(self.policy.decide(&statements));
                Judgement {
                    statements,
                    outcome,
                    derived: Default::default(),
                }
            }
            Err(e) => Judgement {
                statements: Vec::new(),
                outcome: Err(e),
                derived: Default::default(),
            },
        }
    }

    /// The verdict for a query text in this session; applies the text's
    /// effects on the session's prepared statements when it is allowed (as
    /// the relay does when it forwards the text).
    pub fn judge(&self, sql: &str, session: &mut SessionState) -> Verdict {
        let (v, j) = self.judge_with(sql, session);
        if v == Verdict::Allow {
            self.apply(&j, session, false);
        }
        v
    }

    /// `judge`, with the judgement behind the verdict (masking reads it).
    pub fn judge_with(&self, sql: &str, session: &mut SessionState) -> (Verdict, Arc<Judgement>) {
        let j = self.evaluate(sql);
        self.judge_judged(j, session)
    }

    /// Whether a judged text calls functions or operators that are not
    /// built in (their results and side effects are invisible to the proxy).
    pub fn calls_user_code(&self, j: &Judgement) -> bool {
        let Ok(decision) = &j.outcome else {
            return true;
        };
        let uc = self.user_code();
        decision.accesses.iter().any(|d| match &d.access.target {
            Target::Function { schema, name } => {
                d.by != DecidedBy::Always
                    || schema.as_deref().is_some_and(|s| s != "pg_catalog")
                    || uc.functions.contains(name)
            }
            Target::Operator { schema, name } => {
                d.by != DecidedBy::Always
                    || schema.as_deref().is_some_and(|s| s != "pg_catalog")
                    || uc.operators.contains(name)
            }
            _ => false,
        }) || j
            .statements
            .iter()
            .any(|s| s.attribute_refs.iter().any(|n| uc.functions.contains(n)))
    }

    /// The verdict, and the deciding rule's name when `rule` is asked for.
    fn verdict(
        &self,
        j: &Judgement,
        session: &SessionState,
        rule: bool,
    ) -> (Verdict, Option<String>) {
        match &j.outcome {
            Ok(_) => {}
            Err(AnalyzeError::Parse(_)) => {
                return (Verdict::Refuse(PgError::syntax_error(j.reason())), None)
            }
            Err(AnalyzeError::TooLarge(_)) => {
                return (Verdict::Refuse(PgError::limit_exceeded(j.reason())), None)
            }
            Err(_) => return (Verdict::Refuse(PgError::denied(j.reason())), None),
        }
        // Refined even when a human must approve: a text the session state
        // denies outright (EXECUTE of an unknown name, user code) is never
        // put in front of a reviewer.
        let Some(d) = self.decide_in_session(j, session) else {
            return (Verdict::Refuse(PgError::denied(j.reason())), None);
        };
        // Refusals and holds are counted per rule even when nothing records.
        let name = (rule || !matches!(d.action, Action::Allow))
            .then(|| d.rule_name().map(str::to_owned))
            .flatten();
        let v = match d.action {
            Action::Allow => Verdict::Allow,
            Action::RequireApproval => Verdict::RequireApproval(d.reason()),
            Action::Deny => Verdict::Refuse(PgError::denied(d.reason())),
        };
        (v, name)
    }

    /// The decision on a judged text in this session: the cached, text-only
    /// decision with the session- and database-dependent part applied. The
    /// verdict on the wire, its reason and `pgwarden check`'s access list all
    /// come from it, so they cannot disagree. `None` when the text was not
    /// analysed (`Judgement::reason` says why).
    /// - calls and operators judged built-in by name are decided again as
    ///   user code when the database has user code of that name
    ///   ([`DecidedBy::UserCode`]);
    /// - attribute notation (`o.f`) naming a user function is a call of it;
    /// - EXECUTE runs only names this session prepared through pgwarden,
    ///   simulating the text's statements in order (`PREPARE p ...; EXECUTE p`),
    ///   and an approved PREPARE only once ([`DecidedBy::Session`]).
    ///
    /// The cached decision is borrowed when the session changes nothing (the
    /// common case: no copy per statement). Nothing in the session is
    /// changed: `apply` does that when the text is sent upstream.
    pub fn decide_in_session<'j>(
        &self,
        j: &'j Judgement,
        session: &SessionState,
    ) -> Option<Cow<'j, Decision>> {
        let decision = j.outcome.as_ref().ok()?;
        // Filled (with the cached decisions before it) at the first change.
        let mut changed: Option<Vec<AccessDecision>> = None;
        let mut next = 0;
        let mut prepared: Option<HashMap<String, Runs>> = None;
        let uc = self.user_code();
        for s in &j.statements {
            // `decide` lists each statement's accesses in order.
            let end = (next + s.accesses.len()).min(decision.accesses.len());
            for (k, d) in decision.accesses[..end].iter().enumerate().skip(next) {
                let is_user = d.by == DecidedBy::Always
                    && match &d.access.target {
                        Target::Function { schema: None, name } => uc.functions.contains(name),
                        Target::Operator { schema: None, name } => uc.operators.contains(name),
                        _ => false,
                    };
                if is_user {
                    let re = self.user_code_decision(&d.access, s.class);
                    changes(&mut changed, decision, k).push(re);
                } else if let Some(list) = &mut changed {
                    list.push(d.clone());
                }
            }
            next = end;
            for name in s
                .attribute_refs
                .iter()
                .filter(|n| uc.functions.contains(*n))
            {
                let call = Access {
                    class: None,
                    target: Target::Function {
                        schema: None,
                        name: name.clone(),
                    },
                    unfiltered: false,
                    fixed: None,
                };
                let re = self.user_code_decision(&call, s.class);
                changes(&mut changed, decision, next).push(re);
            }
            let Some(effect) = &s.effect else { continue };
            if !matches!(
                effect,
                Effect::Prepare(_) | Effect::Deallocate(_) | Effect::Execute(_)
            ) {
                continue;
            }
            let names = prepared.get_or_insert_with(|| session.prepared.clone());
            let refused = match effect {
                Effect::Prepare(n) => {
                    names.insert(n.clone(), Runs::Any);
                    None
                }
                Effect::Deallocate(Some(n)) => {
                    names.remove(n);
                    None
                }
                Effect::Deallocate(None) => {
                    names.clear();
                    None
                }
                Effect::Execute(n) => match names.get(n) {
                    Some(Runs::Any) => None,
                    Some(Runs::Once) => {
                        names.insert(n.clone(), Runs::Spent);
                        None
                    }
                    Some(Runs::Spent) => Some((n, format!(
                        "the approval of PREPARE \"{n}\" released one execution, which has run; DEALLOCATE {n} and PREPARE it again to ask for another"
                    ))),
                    None => Some((n, "it was not prepared through pgwarden in this session".to_owned())),
                },
                _ => None,
            };
            if let Some((n, why)) = refused {
                let session_refusal = AccessDecision {
                    access: Access {
                        class: Some(s.class),
                        target: Target::Statement,
                        unfiltered: false,
                        fixed: None,
                    },
                    action: Action::Deny,
                    by: DecidedBy::Session {
                        what: format!("EXECUTE \"{n}\""),
                        why,
                    },
                };
                changes(&mut changed, decision, next).push(session_refusal);
            }
        }
        Some(match changed {
            None => Cow::Borrowed(decision),
            Some(accesses) => Cow::Owned(Decision::from_accesses(accesses)),
        })
    }

    /// Apply a text's effects once it goes upstream: the names it prepares
    /// (once only when `approved`: a reviewer released it), the executions
    /// it spends. A change the server then refuses
    /// is undone by the session (`SessionState::closed`).
    pub fn apply(&self, j: &Judgement, session: &mut SessionState, approved: bool) {
        for s in &j.statements {
            match &s.effect {
                Some(Effect::Prepare(n)) => {
                    let runs = if approved { Runs::Once } else { Runs::Any };
                    session.prepared.insert(n.clone(), runs);
                }
                Some(Effect::Deallocate(Some(n))) => session.closed(n),
                Some(Effect::Deallocate(None)) => session.closed_all(),
                Some(Effect::Execute(n)) => {
                    if let Some(r) = session.prepared.get_mut(n) {
                        if *r == Runs::Once {
                            *r = Runs::Spent;
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// A call by this name decided as user code, in a statement of `class`.
    fn user_code_decision(&self, access: &Access, class: StatementClass) -> AccessDecision {
        let d = self.policy.decide_user_code(access, class);
        AccessDecision {
            by: DecidedBy::UserCode(Box::new(d.by)),
            ..d
        }
    }
}

/// The changed access list, started at the first change with copies of the
/// cached decisions before index `at`.
fn changes<'a>(
    changed: &'a mut Option<Vec<AccessDecision>>,
    decision: &Decision,
    at: usize,
) -> &'a mut Vec<AccessDecision> {
    changed.get_or_insert_with(|| decision.accesses[..at].to_vec())
}

#[cfg(test)]
mod tests;
