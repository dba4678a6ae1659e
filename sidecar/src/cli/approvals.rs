//! `pgwarden approvals list|show|approve|deny`: the reviewer's side in
//! standalone mode. The decider is the OS user running the command (its
//! uid's name): never the requester's OS user, and one of the request's
//! `approvers` when it names any (root is not special).
//!
//! Exit codes: 0 done, 1 refused (unknown id, already decided, expired,
//! self-approval, not an approver), 2 usage or store errors (a state directory that does not
//! exist or holds no store: nothing is ever created here).

use std::fmt::Write as _;
use std::process::ExitCode;

use k8s_openapi::jiff::Timestamp;
use pgwarden_api::{ApprovalRequest, DecisionAction};

use super::output::{errln, out, outln};
use super::{ApprovalsArgs, ApprovalsCommand, IdMatch, OutputFormat};
use crate::approval::request::{self, DecideError, Decider};
use crate::approval::store::{DirStore, StoreError};
use crate::approval::{estimate, os_user};

const EXIT_REFUSED: u8 = 1;
const EXIT_ERROR: u8 = 2;

pub fn approvals(args: ApprovalsArgs) -> anyhow::Result<ExitCode> {
    // Never created here (approve and deny included): a wrong path is an
    // error naming it, not an empty list.
    if let Err(e) = super::existing_state_dir(&args.state_dir) {
        return Ok(fail(EXIT_ERROR, &e));
    }
    let store = match DirStore::open_existing(&args.state_dir) {
        Ok(s) => s,
        Err(e) => return Ok(fail(EXIT_ERROR, &e.to_string())),
    };
    let now = Timestamp::now();
    // An ID may be a unique prefix of one in the store.
    let resolve = |given: String| -> Result<String, ExitCode> {
        let all = store.list().map_err(|e| fail(EXIT_ERROR, &e.to_string()))?;
        match super::resolve_id(&given, all.iter().map(request::id)) {
            IdMatch::One(id) => Ok(id),
            // Not found, said by the store as for any unknown ID.
            IdMatch::None => Ok(given),
            IdMatch::Ambiguous(ids) => Err(fail(
                EXIT_REFUSED,
                &format!(
                    "{given:?} is the start of several requests: {}",
                    ids.join(", ")
                ),
            )),
        }
    };
    let command = match args.command {
        ApprovalsCommand::Show { id } => match resolve(id) {
            Ok(id) => ApprovalsCommand::Show { id },
            Err(code) => return Ok(code),
        },
        ApprovalsCommand::Approve { id } => match resolve(id) {
            Ok(id) => ApprovalsCommand::Approve { id },
            Err(code) => return Ok(code),
        },
        ApprovalsCommand::Deny { id } => match resolve(id) {
            Ok(id) => ApprovalsCommand::Deny { id },
            Err(code) => return Ok(code),
        },
        list => list,
    };
    match command {
        ApprovalsCommand::List { phase, filter } => match store.list() {
            Ok(all) => {
                let all: Vec<_> = all
                    .into_iter()
                    .filter(|r| phase.is_none_or(|p| request::phase(r, now) == p))
                    .collect();
                let all = filter.apply(all, |r| {
                    (
                        r.spec.requester.subject.as_str(),
                        r.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    )
                });
                out(&match args.output {
                    OutputFormat::Json => json(
                        &all.iter()
                            .map(|r| request::view(r, now))
                            .collect::<Vec<_>>(),
                    )?,
                    OutputFormat::Text => table(&all, now),
                })?;
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => Ok(fail(EXIT_ERROR, &e.to_string())),
        },
        ApprovalsCommand::Show { id } => match store.get(&id) {
            Ok(r) => {
                out(&match args.output {
                    OutputFormat::Json => json(&request::view(&r, now))?,
                    OutputFormat::Text => one(&r, now),
                })?;
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => Ok(store_failure(e)),
        },
        ApprovalsCommand::Approve { id } => {
            decide(&store, &id, DecisionAction::Approve, args.reason)
        }
        ApprovalsCommand::Deny { id } => decide(&store, &id, DecisionAction::Deny, args.reason),
    }
}

fn decide(
    store: &DirStore,
    id: &str,
    action: DecisionAction,
    reason: Option<String>,
) -> anyhow::Result<ExitCode> {
    // Fail closed: a decider this machine cannot name decides nothing.
    let Some((by, groups)) = os_user::current() else {
        return Ok(fail(
            EXIT_ERROR,
            "cannot tell which OS user runs this command (/proc/self)",
        ));
    };
    let decider = Decider {
        name: &by,
        groups: &groups,
    };
    let result = store.update(id, |r| {
        let outcome = request::decide(r, action, decider, reason, Timestamp::now());
        // An expiry noticed here is written down too.
        let changed = outcome.is_ok() || matches!(outcome, Err(DecideError::Expired { .. }));
        (changed, outcome)
    });
    match result {
        Ok(Ok(())) => {
            let verb = match action {
                DecisionAction::Approve => "approved",
                DecisionAction::Deny => "denied",
            };
            outln(&format!("{verb} {id} (decided by {by})"))?;
            Ok(ExitCode::SUCCESS)
        }
        Ok(Err(e)) => Ok(fail(EXIT_REFUSED, &e.to_string())),
        Err(e) => Ok(store_failure(e)),
    }
}

fn store_failure(e: StoreError) -> ExitCode {
    match e {
        StoreError::NotFound(_) => fail(EXIT_REFUSED, &e.to_string()),
        _ => fail(EXIT_ERROR, &e.to_string()),
    }
}

fn fail(code: u8, message: &str) -> ExitCode {
    errln(&format!("pgwarden approvals: {message}"));
    ExitCode::from(code)
}

fn json(v: &impl serde::Serialize) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(v)? + "\n")
}

/// One line per request, statement last (it is the long part).
fn table(all: &[ApprovalRequest], now: Timestamp) -> String {
    let mut t = format!(
        "{:<32} {:<9} {:<24} {:<21} STATEMENT\n",
        "ID", "PHASE", "REQUESTER", "EXPIRES"
    );
    for r in all {
        let statement: String = r
            .spec
            .statement
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let statement = if statement.chars().count() > 80 {
            format!("{}…", statement.chars().take(79).collect::<String>())
        } else {
            statement
        };
        let _ = writeln!(
            t,
            "{:<32} {:<9} {:<24} {:<21} {statement}",
            request::id(r),
            format!("{:?}", request::phase(r, now)),
            r.spec.requester.subject,
            r.spec.expires_at,
        );
    }
    t
}

/// One request in full (also `kubectl pgwarden show`).
pub(super) fn one(r: &ApprovalRequest, now: Timestamp) -> String {
    let v = request::view(r, now);
    let mut t = String::new();
    let _ = writeln!(t, "id:          {}", v.id);
    let _ = writeln!(t, "phase:       {:?}", v.phase);
    let _ = writeln!(t, "policy:      {}/{}", v.namespace, v.policy);
    let _ = writeln!(t, "database:    {}", v.database);
    let _ = writeln!(t, "requester:   {}", v.requester.subject);
    if let Some(u) = &v.requester.os_user {
        let _ = writeln!(t, "os user:     {u}");
    }
    if let Some(a) = v.approvers {
        let who: Vec<String> = (a.users.iter().map(|u| format!("user {u}")))
            .chain(a.groups.iter().map(|g| format!("group {g}")))
            .collect();
        let _ = writeln!(t, "approvers:   {}", who.join(", "));
    }
    if let Some(p) = &v.requester.pod {
        let _ = writeln!(t, "pod:         {p}");
    }
    let _ = writeln!(t, "reason:      {}", v.reason);
    let _ = writeln!(t, "created:     {}", v.created_at.as_deref().unwrap_or("?"));
    let _ = writeln!(t, "expires:     {}", v.expires_at);
    let _ = writeln!(t, "statement:   {}", v.statement);
    for (i, p) in v.parameters.iter().enumerate() {
        let _ = writeln!(t, "  ${}:        {}", i + 1, p.as_deref().unwrap_or("NULL"));
    }
    if let Some(e) = v.estimate {
        let _ = writeln!(t, "estimate:    {}", estimate::describe(e));
    }
    if let Some(d) = v.decision {
        let _ = writeln!(
            t,
            "decision:    {:?} by {} at {}: {}",
            d.action,
            d.decided_by.as_deref().unwrap_or("?"),
            d.decided_at.as_deref().unwrap_or("?"),
            d.reason.as_deref().unwrap_or("no reason given")
        );
    }
    if let Some(res) = v.result {
        let _ = writeln!(t, "result:      {res}");
    }
    t
}
