//! A statement text's decision in this session: the policy's verdict, how
//! masking treats its results, whether it waits for approval — and the
//! configuration that decides it.

use std::sync::Arc;

use pgwarden_api::{Action, Enforcement};

use super::Frontend;
use crate::approval::messages;
use crate::masking::plan;
use crate::policy::analyze::{self, AnalyzeError, Effect};
use crate::policy::decide;
use crate::policy::{Gate, Judgement, Verdict};
use crate::recording::RecordedVerdict;
use crate::session::approve::Would;
use crate::wire::{codec, PgError};

/// Texts above this size are analysed on a blocking thread.
pub(super) const OFFLOAD_ABOVE: usize = 16 * 1024;

/// Longest text `LastJudged` keeps: a session holds at most this much more.
const LAST_JUDGED_MAX: usize = 4 * 1024;

/// The session's last judged text and its judgement. Drivers send one text
/// again and again (an extended-protocol client's Parse of `... = $1`): an
/// exact match skips the verdict cache's key and lookup, about 1.6k
/// instructions per statement (issue #21). The policy's cache would return
/// the very same judgement for the same text; a new policy forgets it.
#[derive(Default)]
pub(in crate::session::relay) struct LastJudged {
    text: String,
    judgement: Option<Arc<Judgement>>,
}

impl LastJudged {
    fn get(&self, sql: &str) -> Option<Arc<Judgement>> {
        self.judgement
            .as_ref()
            .filter(|_| self.text == sql)
            .cloned()
    }

    fn set(&mut self, sql: &str, j: &Arc<Judgement>) {
        self.judgement = None;
        if sql.len() <= LAST_JUDGED_MAX {
            // The buffer is reused: no allocation per statement.
            self.text.clear();
            self.text.push_str(sql);
            self.judgement = Some(j.clone());
        }
    }

    pub(in crate::session::relay) fn forget(&mut self) {
        self.judgement = None;
    }
}

/// Analyses of large texts at once, gateway-wide: each may take tens of MiB
/// at the budget's cap, so memory stays bounded however many clients send
/// them.
static LARGE_ANALYSES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// A large text analysed off the event loop, for the message that carries it.
pub(in crate::session::relay) struct Preanalyzed {
    text: String,
    judgement: Arc<Judgement>,
}

/// A judged statement text.
pub(super) enum Judged {
    Allow(plan::MaskCtx),
    /// Needs approval (the reason), with its masking context.
    Hold(String, plan::MaskCtx),
    Refuse(PgError),
}

/// What judging a text decided, with the rule that decided it (for the
/// recording) and the analysis it rests on.
pub(super) struct Decision {
    pub judged: Judged,
    pub rule: Option<String>,
    pub judgement: Arc<Judgement>,
    /// Allowed only because the policy is in audit mode.
    pub would: Option<Would>,
}

/// The decision, or the request to wait for before judging again.
pub(super) enum Judging {
    Done(Decision),
    Wait(u64),
}

impl Judging {
    fn refuse(err: PgError, rule: Option<String>, judgement: Arc<Judgement>) -> Self {
        Judging::Done(Decision {
            judged: Judged::Refuse(err),
            rule,
            judgement,
            would: None,
        })
    }
}

async fn analyze_off_loop(gate: &Gate, text: &str) -> Arc<Judgement> {
    let settings = gate.settings();
    let owned = text.to_owned();
    let analysis = match LARGE_ANALYSES.acquire().await {
        Ok(_permit) => tokio::task::spawn_blocking(move || analyze::analyze(&owned, settings))
            .await
            .unwrap_or_else(|e| {
                Err(AnalyzeError::NotUnderstood(format!(
                    "the statement (its analysis failed: {e})"
                )))
            }),
        // Never closed; judged on the spot if it were.
        Err(_) => analyze::analyze(text, settings),
    };
    gate.judgement_from(analysis)
}

impl Frontend<'_> {
    /// A large text is parsed on a blocking thread: one heavy statement must
    /// not stall every other session. `judge` picks the result up.
    pub(super) async fn preanalyze(&mut self, ty: u8, body: &[u8]) {
        let text = match ty {
            b'Q' => codec::query_text(body).ok(),
            _ => codec::parse(body).ok().map(|p| p.query),
        };
        if let Some(text) = text.map(str::to_owned) {
            let judgement = analyze_off_loop(&self.policy.gate, &text).await;
            self.preanalyzed = Some(Preanalyzed { text, judgement });
        }
    }

    /// Judge a query text and, under a masking policy, decide how its
    /// results are masked (or refuse what masking cannot make safe). Waits
    /// first when it executes a name whose last change is not yet confirmed.
    pub(super) fn judge(&mut self, sql: &str) -> Judging {
        let j = match self.preanalyzed.take() {
            Some(p) if p.text == sql => p.judgement,
            _ => match self.last_judged.get(sql) {
                Some(j) => j,
                None => {
                    let j = self.policy.gate.evaluate(sql);
                    self.last_judged.set(sql, &j);
                    j
                }
            },
        };
        if matches!(j.outcome, Err(AnalyzeError::TooLarge(_))) {
            self.metrics.statements_too_large.inc();
        }
        if self.unsettled() && reads_differently_under_other_settings(sql) {
            let err = PgError::denied(
                "denied: this text contains a backslash or a non-ASCII character, which the server could read differently if user code run earlier in this pipeline changed standard_conforming_strings or client_encoding; send it after that request's result",
            );
            return Judging::refuse(err, None, j);
        }
        let calls_code = self.policy.gate.calls_user_code(&j)
            || j.statements
                .iter()
                .any(|s| s.class == pgwarden_api::StatementClass::Code);
        for s in &j.statements {
            match &s.effect {
                Some(Effect::Execute(n)) => {
                    if let Some(request) = self.ledger.wait_for(n) {
                        // Judged again after the wait: keep a large text's analysis.
                        self.preanalyzed = Some(Preanalyzed {
                            text: sql.to_owned(),
                            judgement: j.clone(),
                        });
                        return Judging::Wait(request);
                    }
                }
                // Protocol portals and SQL cursors share one namespace: a
                // FETCH of a portal bound to a held statement would run it
                // around the hold.
                Some(Effect::Fetch(n))
                    if self.portals.get(n).is_some_and(|p| p.need.reason.is_some()) =>
                {
                    let err = PgError::denied(format!(
                        "denied: FETCH or MOVE on portal \"{n}\" would run a statement that needs approval; Execute the portal to ask for it"
                    ));
                    return Judging::refuse(err, None, j);
                }
                _ => {}
            }
        }
        // The deciding rule is for the recording only; it comes from the
        // same decision in this session (user code, EXECUTE) as the verdict.
        let (mut verdict, mut rule) =
            self.policy
                .gate
                .judge_judged_with_rule(&j, &self.session, self.log.is_some());
        // The one place a policy in audit mode differs: what its rules
        // decided is recorded and counted instead of acted on.
        let mut would = None;
        if self.policy.spec.enforcement == Enforcement::Audit && verdict != Verdict::Allow {
            if let Some(d) = self.policy.gate.decide_in_session(&j, &self.session) {
                match audit(&d) {
                    Audit::Enforced(v, r) => (verdict, rule) = (v, r),
                    Audit::Would(w, r) => {
                        self.metrics
                            .statements_audited
                            .with_label_values(&[
                                self.policy.id.as_str(),
                                w.verdict.as_str(),
                                r.as_deref().unwrap_or("default"),
                            ])
                            .inc();
                        let _in = self.span.enter();
                        tracing::info!(
                            policy.name = %self.policy.id,
                            rule.name = r.as_deref().unwrap_or("default"),
                            verdict = w.verdict.as_str(),
                            "audit mode: forwarded a statement the rules would refuse"
                        );
                        verdict = Verdict::Allow;
                        rule = r;
                        would = Some(w);
                    }
                }
            }
        }
        let hold = match verdict {
            Verdict::Refuse(err) => return Judging::refuse(err, rule, j),
            Verdict::Allow => None,
            Verdict::RequireApproval(reason) => Some(reason),
        };
        let ctx = match &self.mask {
            None => None,
            Some(m) => match m.context(&self.policy.gate, &j) {
                Ok(ctx) => ctx,
                // Refused outright: never put in front of a reviewer.
                Err(r) => {
                    let err = PgError::denied(format!("masking: {}", r.0));
                    return Judging::refuse(err, rule, j);
                }
            },
        };
        let judged = match hold {
            None => Judged::Allow(ctx),
            Some(reason) if self.approvals.is_none() => Judged::Refuse(messages::no_store(&reason)),
            Some(reason) => Judged::Hold(reason, ctx),
        };
        if calls_code && !matches!(judged, Judged::Refuse(_)) {
            // Settled by this request's ReadyForQuery (and the
            // ParameterStatus messages the server sends before it).
            self.unsettled_until = Some(self.requests_sent);
        }
        if !matches!(judged, Judged::Refuse(_)) && (calls_code || changes_resolution(&j)) {
            self.names_may_differ = true;
        }
        Judging::Done(Decision {
            judged,
            rule,
            judgement: j,
            would,
        })
    }

    /// Whether user code forwarded earlier may still be changing settings.
    fn unsettled(&mut self) -> bool {
        match self.unsettled_until {
            Some(request) if self.done.get() > request => {
                self.unsettled_until = None;
                false
            }
            Some(_) => true,
            None => false,
        }
    }

    /// Move to the configuration now in force, before the next statement:
    /// the same database's policy, if it still admits this login. Rules,
    /// approvals and user-code knowledge carry over; a changed upstream or
    /// masking cannot be switched under an open connection.
    pub(super) async fn reconfigure(&mut self) -> Result<(), PgError> {
        // Judged under the old configuration.
        self.last_judged.forget();
        // Operator mode, stream down too long: changes may have been missed.
        if self.live.is_stale() {
            return Err(PgError::config_stale());
        }
        let generation = self.live.generation();
        let Some(config) = self.live.current() else {
            return Err(PgError::access_revoked("the gateway has no configuration"));
        };
        let database = self.policy.upstream.database.clone();
        let Some(next) = config.for_database(&database).cloned() else {
            return Err(PgError::access_revoked(format!(
                "no policy serves database \"{database}\" any more"
            )));
        };
        if !Arc::ptr_eq(&next, &self.policy) {
            if let Err(why) = self.login.admitted_by(&next).await {
                return Err(PgError::access_revoked(format!(
                    "policy {} no longer admits {}: {why}",
                    next.id, self.login.identity.subject
                )));
            }
            if next.session_terms != self.policy.session_terms {
                return Err(PgError::reconnect(format!(
                    "policy {} changed its database connection or masking",
                    next.id
                )));
            }
            // What this session's database taught the old policy about user
            // code holds for the new one.
            let (functions, operators) = self.policy.gate.user_code_names();
            next.gate.learn_user_code(functions, operators);
            self.span.in_scope(
                || tracing::info!(policy.name = %next.id, "session moved to the new configuration"),
            );
            self.approvals = next.approvals.clone();
            self.policy = next;
        }
        self.generation = generation;
        Ok(())
    }
}

/// A decision under an audit-mode policy.
enum Audit {
    /// Refused all the same (built-in or session refusal): the verdict and
    /// what decided it.
    Enforced(Verdict, Option<String>),
    /// Only the rules refused it: forwarded, with what they would have done
    /// and the deciding rule.
    Would(Would, Option<String>),
}

/// Audit mode relaxes only what the policy's author wrote
/// (`Decision::enforced_in_audit`).
fn audit(d: &decide::Decision) -> Audit {
    let enforced = d.enforced_in_audit();
    let rule = |d: &decide::Decision| d.rule_name().map(str::to_owned);
    match enforced.action {
        Action::Deny => Audit::Enforced(
            Verdict::Refuse(PgError::denied(enforced.reason())),
            rule(&enforced),
        ),
        // Only rules ask for approval; kept should that ever change.
        Action::RequireApproval => {
            Audit::Enforced(Verdict::RequireApproval(enforced.reason()), rule(&enforced))
        }
        Action::Allow => Audit::Would(
            Would {
                verdict: match d.action {
                    Action::RequireApproval => RecordedVerdict::WouldHold,
                    _ => RecordedVerdict::WouldDeny,
                },
                reason: d.reason(),
            },
            rule(d),
        ),
    }
}

/// Texts PostgreSQL could lex differently with standard_conforming_strings
/// off (a backslash in '...') or another client_encoding (bytes beyond
/// ASCII): the only texts a setting changed by user code can change.
fn reads_differently_under_other_settings(sql: &str) -> bool {
    sql.bytes().any(|b| b == b'\\' || b >= 0x80)
}

/// Text sent with the protocol's Parse must not itself prepare or execute
/// SQL-level prepared statements: their effect would come at Execute, where
/// the proxy could not tie the server's answer to it.
pub(super) fn protocol_text(judged: Judged, j: &Judgement) -> Judged {
    let nested = j
        .statements
        .iter()
        .any(|s| matches!(s.effect, Some(Effect::Prepare(_) | Effect::Execute(_))));
    if nested && !matches!(judged, Judged::Refuse(_)) {
        return Judged::Refuse(PgError::denied(
            "denied: PREPARE and EXECUTE must be sent as a simple Query through pgwarden (use the protocol's own Parse and Bind instead)",
        ));
    }
    judged
}

/// Whether a statement can make a name resolve to something else in this
/// session than on a fresh connection: a setting (search_path, by SET or
/// set_config), a schema object (a temporary table that shadows one), or
/// code that can do either. The estimate's own connection would then plan
/// another statement than the one held. What is always allowed (harmless
/// settings such as application_name, SHOW, transaction control) does not
/// count.
fn changes_resolution(j: &Judgement) -> bool {
    use pgwarden_api::StatementClass::{Code, Ddl, Session};
    let moves = |c: pgwarden_api::StatementClass| matches!(c, Session | Ddl | Code);
    j.statements.iter().any(|s| {
        s.accesses
            .iter()
            .any(|a| a.class.is_some_and(moves) && a.fixed != Some(analyze::Fixed::Allow))
            || (moves(s.class) && s.accesses.is_empty())
    })
}
