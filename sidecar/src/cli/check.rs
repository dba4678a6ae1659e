//! `pgwarden check`: judge a statement against a policy without a database,
//! so admins can test a policy in their own CI before applying it.
//!
//! Exit codes: 0 allow, 1 deny, 3 require approval, 2 usage or configuration
//! error.

use std::process::ExitCode;

use pgwarden_api::Action;
use serde_json::json;

use super::output::errln;
use super::{CheckArgs, OutputFormat};
use crate::config;
use crate::policy::analyze::{Access, Target};
use crate::policy::decide::DecidedBy;
use crate::policy::{self, Gate};

const EXIT_DENY: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_APPROVAL: u8 = 3;

fn action_str(a: Action) -> &'static str {
    match a {
        Action::Allow => "allow",
        Action::Deny => "deny",
        Action::RequireApproval => "require-approval",
    }
}

fn by_str(by: &DecidedBy) -> &str {
    match by {
        DecidedBy::BuiltinDeny(_) => "builtin",
        DecidedBy::Always => "always",
        DecidedBy::Rule(n) => n,
        DecidedBy::Default => "default",
    }
}

fn access_json(a: &Access) -> serde_json::Value {
    let (kind, object) = match &a.target {
        Target::Relation(q) => ("relation", Some(q.to_string())),
        Target::Function {
            schema: Some(s),
            name,
        } => ("function", Some(format!("{s}.{name}"))),
        Target::Function { schema: None, name } => ("function", Some(name.clone())),
        Target::Operator {
            schema: Some(s),
            name,
        } => ("operator", Some(format!("{s}.{name}"))),
        Target::Operator { schema: None, name } => ("operator", Some(name.clone())),
        Target::Statement => ("statement", None),
    };
    json!({
        "kind": kind,
        "class": a.class.map(|c| c.to_string()),
        "object": object,
        "unfiltered": a.unfiltered,
    })
}

pub fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let policies = match config::load_policies(&args.files) {
        Ok(p) => p,
        Err(errors) => {
            errln(&format!("pgwarden: {}", errors.to_string().trim_end()));
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    let chosen = match (&args.policy, policies.len()) {
        (None, 1) => &policies[0],
        (None, _) => {
            let names: Vec<_> = policies.iter().map(|(id, _)| id.as_str()).collect();
            errln(&format!(
                "pgwarden: several policies loaded ({}); choose one with --policy",
                names.join(", ")
            ));
            return Ok(ExitCode::from(EXIT_USAGE));
        }
        (Some(want), _) => match policies
            .iter()
            .find(|(id, _)| id == want || id.rsplit('/').next() == Some(want.as_str()))
        {
            Some(p) => p,
            None => {
                errln(&format!("pgwarden: no policy named {want}"));
                return Ok(ExitCode::from(EXIT_USAGE));
            }
        },
    };
    let gate = Gate::new(&chosen.1, 0);
    // What a live session learns from the database at login.
    gate.learn_user_code(args.user_functions.clone(), args.user_operators.clone());
    let mut session = policy::SessionState::default();
    for name in &args.prepared {
        session.prepared(name);
    }
    let judgement = gate.evaluate(&args.sql);
    let decision = judgement.outcome.as_ref().ok();
    let (mut action, mut rule, mut reason) = (
        judgement.action(),
        decision.map_or(Some("parser"), |d| d.rule_name()),
        judgement.reason(),
    );
    // What depends on the session (EXECUTE of an unknown name) comes last,
    // exactly as on the wire.
    if action == Action::Allow {
        if let Err((refined, why)) = gate.refine(&judgement, &mut session) {
            (action, rule, reason) = (refined, Some("session"), why);
        }
    }
    let accesses: Vec<_> = decision
        .map(|d| d.accesses.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|d| (d, access_json(&d.access)))
        .collect();
    let text = match args.output {
        OutputFormat::Json => {
            let list: Vec<_> = accesses
                .iter()
                .map(|(d, j)| {
                    let mut j = j.clone();
                    j["action"] = json!(action_str(d.action));
                    j["rule"] = json!(by_str(&d.by));
                    j
                })
                .collect();
            let out = json!({
                "verdict": action_str(action),
                "rule": rule,
                "reason": reason,
                "accesses": list,
            });
            serde_json::to_string_pretty(&out)? + "\n"
        }
        OutputFormat::Text => {
            let mut text = format!(
                "verdict: {}\nrule: {}\nreason: {reason}\n",
                action_str(action),
                rule.unwrap_or("-")
            );
            if !accesses.is_empty() {
                text.push_str("accesses:\n");
                for (d, _) in &accesses {
                    text += &format!(
                        "  - {}: {} ({})\n",
                        d.access,
                        action_str(d.action),
                        by_str(&d.by)
                    );
                }
            }
            text
        }
    };
    // A closed pipe (`| head`) is not an error worth a panic.
    super::output::out(&text)?;
    Ok(match action {
        Action::Allow => ExitCode::SUCCESS,
        Action::Deny => ExitCode::from(EXIT_DENY),
        Action::RequireApproval => ExitCode::from(EXIT_APPROVAL),
    })
}
