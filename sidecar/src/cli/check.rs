//! `pgwarden check`: judge SQL against a policy without a database, so
//! admins can test a policy (and agents' migrations) in their own CI before
//! applying it; without SQL, lint the policy.
//!
//! Exit codes: 0 allow, 1 deny, 3 require approval, 2 usage or configuration
//! error; linting: 0 clean, 1 warnings.

use std::io::Read;
use std::process::ExitCode;

use pgwarden_api::{Action, DatabaseAccessPolicySpec, Enforcement, FieldError};
use serde_json::json;

use super::output::errln;
use super::{CheckArgs, OutputFormat};
use crate::config;
use crate::policy::analyze::{Access, Target};
use crate::policy::decide::AccessDecision;
use crate::policy::{self, split, Gate, SessionState};

const EXIT_DENY: u8 = 1;
const EXIT_WARNINGS: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_APPROVAL: u8 = 3;

fn action_str(a: Action) -> &'static str {
    match a {
        Action::Allow => "allow",
        Action::Deny => "deny",
        Action::RequireApproval => "require-approval",
    }
}

fn exit_code(a: Action) -> ExitCode {
    match a {
        Action::Allow => ExitCode::SUCCESS,
        Action::Deny => ExitCode::from(EXIT_DENY),
        Action::RequireApproval => ExitCode::from(EXIT_APPROVAL),
    }
}

/// How one access was decided, as `check` shows it: the deciding rule's
/// name (or builtin, always, default, session), and what else is worth
/// saying.
fn by_str(d: &AccessDecision) -> String {
    use policy::decide::DecidedBy;
    match &d.by {
        DecidedBy::UserCode(inner) => format!("{}, as user code", inner.name()),
        DecidedBy::Session { why, .. } => format!("session: {why}"),
        by => by.name().to_owned(),
    }
}

fn access_json(d: &AccessDecision) -> serde_json::Value {
    use policy::decide::DecidedBy;
    let a: &Access = &d.access;
    let (kind, object) = match (&a.target, &d.by) {
        (_, DecidedBy::Session { what, .. }) => ("session", Some(what.clone())),
        (Target::Relation(q), _) => ("relation", Some(q.to_string())),
        (
            Target::Function {
                schema: Some(s),
                name,
            },
            _,
        ) => ("function", Some(format!("{s}.{name}"))),
        (Target::Function { schema: None, name }, _) => ("function", Some(name.clone())),
        (
            Target::Operator {
                schema: Some(s),
                name,
            },
            _,
        ) => ("operator", Some(format!("{s}.{name}"))),
        (Target::Operator { schema: None, name }, _) => ("operator", Some(name.clone())),
        (Target::Statement, _) => ("statement", None),
    };
    json!({
        "kind": kind,
        "class": a.class.map(|c| c.to_string()),
        "object": object,
        "unfiltered": a.unfiltered,
        "action": action_str(d.action),
        "rule": d.by.name(),
        "userCode": matches!(d.by, DecidedBy::UserCode(_)),
    })
}

/// The access as one line of text output.
fn access_line(d: &AccessDecision) -> String {
    use policy::decide::DecidedBy;
    let what = match &d.by {
        DecidedBy::Session { what, .. } => what.clone(),
        _ => d.access.to_string(),
    };
    format!("  - {what}: {} ({})\n", action_str(d.action), by_str(d))
}

/// One text's final decision in the session: verdict, the name that
/// decided it, the reason and every access — all from the one decision the
/// gateway would act on (`Gate::decide_in_session`).
struct Judged {
    action: Action,
    /// Audit mode: what the rules would have done with a statement the
    /// gateway forwards (`action` is then Allow).
    would: Option<Action>,
    rule: Option<String>,
    reason: String,
    accesses: Vec<AccessDecision>,
}

impl Judged {
    fn json(&self) -> serde_json::Value {
        let mut v = json!({
            "verdict": action_str(self.action),
            "rule": self.rule,
            "reason": self.reason,
            "accesses": self.accesses.iter().map(access_json).collect::<Vec<_>>(),
        });
        if let Some(w) = self.would {
            v["wouldBe"] = json!(action_str(w));
            v["enforcement"] = json!("Audit");
        }
        v
    }

    /// The verdict as text: what the gateway does, or under an audit-mode
    /// policy what the rules would have done with a statement it forwards.
    fn verdict_text(&self) -> String {
        match self.would {
            Some(Action::Deny) => "would deny (audit mode)".into(),
            Some(Action::RequireApproval) => "would require approval (audit mode)".into(),
            _ => action_str(self.action).into(),
        }
    }

    fn text(&self) -> String {
        let mut text = format!(
            "verdict: {}\nrule: {}\nreason: {}\n",
            self.verdict_text(),
            self.rule.as_deref().unwrap_or("-"),
            self.reason
        );
        if !self.accesses.is_empty() {
            text.push_str("accesses:\n");
            for d in &self.accesses {
                text += &access_line(d);
            }
        }
        text
    }
}

/// Judge one Query text as a session of this gate would, then let its
/// effects reach the session (names it prepares or spends, user code it
/// defines) as when the gateway forwards it. A text that needs approval
/// counts as approved for the texts after it.
fn judge(gate: &Gate, session: &mut SessionState, sql: &str, audit: bool) -> Judged {
    let j = gate.evaluate(sql);
    let judged = match gate.decide_in_session(&j, session) {
        Some(d) => {
            // Audit mode: the gateway acts on what the rules cannot relax
            // (built-in refusals); the rules' own verdict is "would be".
            let enforced = audit.then(|| d.enforced_in_audit());
            match enforced {
                Some(e) if e.action == Action::Allow && d.action != Action::Allow => Judged {
                    action: Action::Allow,
                    would: Some(d.action),
                    rule: d.rule_name().map(str::to_owned),
                    reason: d.reason(),
                    accesses: d.accesses.clone(),
                },
                Some(e) => Judged {
                    action: e.action,
                    would: None,
                    rule: e.rule_name().map(str::to_owned),
                    reason: e.reason(),
                    accesses: d.accesses.clone(),
                },
                _ => Judged {
                    action: d.action,
                    would: None,
                    rule: d.rule_name().map(str::to_owned),
                    reason: d.reason(),
                    accesses: d.accesses.clone(),
                },
            }
        }
        None => Judged {
            action: Action::Deny,
            would: None,
            rule: Some("parser".into()),
            reason: j.reason(),
            accesses: Vec::new(),
        },
    };
    gate.learn_definitions(&j);
    match judged.action {
        Action::Allow => gate.apply(&j, session, false),
        Action::RequireApproval => gate.apply(&j, session, true),
        Action::Deny => {}
    }
    judged
}

/// Where the SQL comes from.
enum Source {
    /// `--sql TEXT`: one Query message.
    Query(String),
    /// `--sql-file FILE` or `--sql -`: a file of statements, one Query each.
    File { name: String, text: String },
}

fn source(args: &CheckArgs) -> Result<Option<Source>, String> {
    match (&args.sql, &args.sql_file) {
        (Some(s), _) if s == "-" => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| format!("reading the SQL from standard input: {e}"))?;
            Ok(Some(Source::File {
                name: "standard input".into(),
                text,
            }))
        }
        (Some(s), _) => Ok(Some(Source::Query(s.clone()))),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|text| {
                Some(Source::File {
                    name: path.display().to_string(),
                    text,
                })
            })
            .map_err(|e| format!("--sql-file {}: {e}", path.display())),
        (None, None) => Ok(None),
    }
}

pub fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let policies = match config::load_policies(&args.files) {
        Ok(p) => p,
        Err(errors) => {
            errln(&format!("pgwarden: {}", errors.to_string().trim_end()));
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    let by_name = |want: &str| {
        policies
            .iter()
            .find(|(id, _)| id == want || id.rsplit('/').next() == Some(want))
    };
    if let Some(want) = &args.policy {
        if by_name(want).is_none() {
            errln(&format!("pgwarden: no policy named {want}"));
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    }
    let sql = match source(&args) {
        Ok(s) => s,
        Err(e) => {
            errln(&format!("pgwarden: {e}"));
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    let Some(sql) = sql else {
        let chosen: Vec<_> = match &args.policy {
            Some(want) => by_name(want).into_iter().collect(),
            None => policies.iter().collect(),
        };
        return lint(&chosen, args.output);
    };
    let chosen = match (args.policy.as_deref().and_then(by_name), policies.len()) {
        (Some(p), _) => p,
        (None, 1) => &policies[0],
        (None, _) => {
            let names: Vec<_> = policies.iter().map(|(id, _)| id.as_str()).collect();
            errln(&format!(
                "pgwarden: several policies loaded ({}); choose one with --policy",
                names.join(", ")
            ));
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    // The verdict is the answer; the policy's warnings go to stderr.
    for w in chosen.1.lint() {
        errln(&format!("pgwarden: warning: {}: {w}", chosen.0));
    }
    let gate = Gate::new(&chosen.1, 0);
    // What a live session learns from the database at login.
    gate.learn_user_code(args.user_functions.clone(), args.user_operators.clone());
    let audit = chosen.1.enforcement == Enforcement::Audit;
    let mut session = SessionState::default();
    for name in &args.prepared {
        session.prepared(name);
    }
    let (text, verdict) = match sql {
        Source::Query(sql) => {
            let judged = judge(&gate, &mut session, &sql, audit);
            let text = match args.output {
                OutputFormat::Json => serde_json::to_string_pretty(&judged.json())? + "\n",
                OutputFormat::Text => judged.text(),
            };
            (text, judged.action)
        }
        Source::File { name, text: file } => {
            let pieces = split::statements(&file);
            let judged: Vec<_> = pieces
                .iter()
                .map(|p| (p, judge(&gate, &mut session, p.text, audit)))
                .collect();
            let verdict = judged
                .iter()
                .map(|(_, j)| j.action)
                .max()
                .unwrap_or(Action::Allow);
            let text = match args.output {
                OutputFormat::Json => {
                    let list: Vec<_> = judged
                        .iter()
                        .map(|(p, j)| {
                            let mut v = j.json();
                            v["line"] = json!(p.line(&file));
                            v["sql"] = json!(p.text.trim());
                            v
                        })
                        .collect();
                    let out = json!({"verdict": action_str(verdict), "statements": list});
                    serde_json::to_string_pretty(&out)? + "\n"
                }
                OutputFormat::Text => file_text(&name, &file, &judged, verdict),
            };
            (text, verdict)
        }
    };
    // A closed pipe (`| head`) is not an error worth a panic.
    super::output::out(&text)?;
    Ok(exit_code(verdict))
}

/// A file's statements, each with its verdict, then one summary line.
fn file_text(
    name: &str,
    file: &str,
    judged: &[(&split::Piece, Judged)],
    verdict: Action,
) -> String {
    let mut text = String::new();
    let mut counts = [0usize; 3];
    for (n, (p, j)) in judged.iter().enumerate() {
        let first = p.text.trim().lines().next().unwrap_or_default();
        let shown: String = first.chars().take(72).collect();
        let more = if shown.len() < p.text.trim().len() {
            " …"
        } else {
            ""
        };
        text += &format!(
            "-- statement {} (line {}): {shown}{more}\n{}\n",
            n + 1,
            p.line(file),
            j.text()
        );
        counts[match j.action {
            Action::Allow => 0,
            Action::RequireApproval => 1,
            Action::Deny => 2,
        }] += 1;
    }
    text += &format!(
        "{name}: {} statement(s): {} allow, {} require-approval, {} deny; verdict: {}\n",
        judged.len(),
        counts[0],
        counts[1],
        counts[2],
        action_str(verdict)
    );
    text
}

/// `pgwarden check -f FILE` alone: the policies' lint warnings.
fn lint(
    policies: &[&(String, DatabaseAccessPolicySpec)],
    output: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let found: Vec<(&str, Vec<FieldError>)> = policies
        .iter()
        .map(|(id, spec)| (id.as_str(), spec.lint()))
        .collect();
    let any = found.iter().any(|(_, w)| !w.is_empty());
    let text = match output {
        OutputFormat::Json => {
            let list: Vec<_> = found
                .iter()
                .flat_map(|(id, ws)| {
                    ws.iter()
                        .map(move |w| json!({"policy": id, "path": w.path, "message": w.message}))
                })
                .collect();
            serde_json::to_string_pretty(&json!({"warnings": list}))? + "\n"
        }
        OutputFormat::Text => {
            let mut text = String::new();
            for (id, ws) in &found {
                for w in ws {
                    text += &format!("{id}: {w}\n");
                }
                text += &match ws.len() {
                    0 => format!("{id}: no warnings\n"),
                    1 => format!("{id}: 1 warning\n"),
                    n => format!("{id}: {n} warnings\n"),
                };
            }
            text
        }
    };
    super::output::out(&text)?;
    Ok(if any {
        ExitCode::from(EXIT_WARNINGS)
    } else {
        ExitCode::SUCCESS
    })
}
