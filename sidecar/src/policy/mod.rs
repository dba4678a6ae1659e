//! Stage 3: the statement gate. Every Query and Parse passes `Gate::judge`
//! before any byte of it reaches the server.
//!
//! This build enforces `defaultAction` only; configurations with rules are
//! refused at load time (config::load), so a policy is never half-applied.
//! The statement analyser (pg_query) slots in behind `judge`.

use pgwarden_api::{Action, DatabaseAccessPolicySpec};

use crate::wire::PgError;

/// Outcome for one statement text. A refusal carries the error the client
/// gets; the session itself goes on.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Refuse(PgError),
}

#[derive(Debug)]
pub struct Gate {
    policy: String,
    default_action: Action,
}

impl Gate {
    pub fn new(policy_id: &str, spec: &DatabaseAccessPolicySpec) -> Self {
        Gate {
            policy: policy_id.to_owned(),
            default_action: spec.default_action,
        }
    }

    pub fn judge(&self, _sql: &str) -> Verdict {
        match self.default_action {
            Action::Allow => Verdict::Allow,
            // Unreachable with configurations this build accepts; fail closed
            // all the same.
            Action::Deny | Action::RequireApproval => Verdict::Refuse(PgError::denied(format!(
                "denied by the default action of policy {}",
                self.policy
            ))),
        }
    }
}
