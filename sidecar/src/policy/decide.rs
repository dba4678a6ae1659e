//! The decision, sans-IO: analysed statements + compiled policy → verdict.
//!
//! Per access: built-in decisions first (they cannot be overridden), then the
//! first matching rule, then `defaultAction`. A statement's verdict is its
//! most severe access; a query's is its most severe statement.

use std::fmt;

use pgwarden_api::{Action, StatementClass};

use super::analyze::{Access, Fixed, Statement, Target};
use super::catalog;
use super::rules::{glob_match, CompiledRule};

/// Who decided an access.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecidedBy {
    /// The built-in deny list; the text says what was found.
    BuiltinDeny(String),
    /// Always allowed (table-less, transaction control, harmless catalogs...).
    Always,
    Rule(String),
    Default,
    /// A call by a built-in's name that the database also has as user code,
    /// decided again as user code (by a rule with `functions`, else the
    /// default action): what decided it inside.
    UserCode(Box<DecidedBy>),
    /// What the session knows beyond the text: `what` (`EXECUTE "p"`) is
    /// refused because `why`.
    Session {
        what: String,
        why: String,
    },
}

impl DecidedBy {
    /// How much a decision says about a verdict, among equally severe ones:
    /// a rule's or the built-in list's says more than the default action's,
    /// which says more than "always allowed".
    fn weight(&self) -> u8 {
        match self {
            DecidedBy::Always => 0,
            DecidedBy::Default => 1,
            DecidedBy::Rule(_) | DecidedBy::BuiltinDeny(_) | DecidedBy::Session { .. } => 2,
            DecidedBy::UserCode(inner) => inner.weight(),
        }
    }

    /// The short name `check` and the recording show: the rule's name, or
    /// `builtin`, `always`, `default`, `session`.
    pub fn name(&self) -> &str {
        match self {
            DecidedBy::Rule(n) => n,
            DecidedBy::BuiltinDeny(_) => "builtin",
            DecidedBy::Always => "always",
            DecidedBy::Default => "default",
            DecidedBy::UserCode(inner) => inner.name(),
            DecidedBy::Session { .. } => "session",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessDecision {
    pub access: Access,
    pub action: Action,
    pub by: DecidedBy,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// The access that decided the verdict (the first most severe one).
    pub deciding: Option<AccessDecision>,
    pub accesses: Vec<AccessDecision>,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Relation(q) => write!(f, "{q}"),
            Target::Function {
                schema: Some(s),
                name,
            } => write!(f, "function {s}.{name}"),
            Target::Function { schema: None, name } => write!(f, "function {name}"),
            Target::Operator {
                schema: Some(s),
                name,
            } => write!(f, "operator {s}.{name}"),
            Target::Operator { schema: None, name } => write!(f, "operator {name}"),
            Target::Statement => f.write_str("statement"),
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.class, &self.target) {
            (_, t @ (Target::Function { .. } | Target::Operator { .. })) => write!(f, "{t}")?,
            (Some(c), Target::Statement) => write!(f, "{c}")?,
            (Some(c), Target::Relation(q)) => write!(f, "{c} on {q}")?,
            (None, t) => write!(f, "{t}")?,
        }
        if self.unfiltered {
            f.write_str(" without WHERE")?;
        }
        Ok(())
    }
}

impl Decision {
    /// The message a client gets for a refusal (DESIGN §3: names the rule
    /// and the access).
    pub fn reason(&self) -> String {
        let Some(d) = &self.deciding else {
            return "allowed: no access to decide".into();
        };
        let verb = match self.action {
            Action::Allow => "allowed",
            Action::Deny => "denied",
            Action::RequireApproval => "approval required",
        };
        explain(verb, &d.by, &d.access)
    }

    pub fn rule_name(&self) -> Option<&str> {
        Some(self.deciding.as_ref()?.by.name())
    }

    /// What a policy in audit mode enforces of this decision: accesses its
    /// rules or `defaultAction` refused or held are allowed (they become
    /// would-be verdicts); built-in and session refusals stand, since they
    /// close walk-arounds an audit switch must not reopen.
    pub fn enforced_in_audit(&self) -> Decision {
        fn authored(by: &DecidedBy) -> bool {
            match by {
                DecidedBy::Rule(_) | DecidedBy::Default => true,
                DecidedBy::UserCode(inner) => authored(inner),
                DecidedBy::BuiltinDeny(_) | DecidedBy::Always | DecidedBy::Session { .. } => false,
            }
        }
        Decision::from_accesses(
            self.accesses
                .iter()
                .map(|a| match a.action {
                    Action::Deny | Action::RequireApproval if authored(&a.by) => AccessDecision {
                        action: Action::Allow,
                        ..a.clone()
                    },
                    _ => a.clone(),
                })
                .collect(),
        )
    }

    /// The decision of a list of decided accesses: the most severe access
    /// decides; among equals, the first that says the most.
    pub fn from_accesses(accesses: Vec<AccessDecision>) -> Decision {
        let rank = |d: &AccessDecision| (severity(d.action), d.by.weight());
        let mut deciding: Option<&AccessDecision> = None;
        for d in &accesses {
            if deciding.is_none_or(|best| rank(d) > rank(best)) {
                deciding = Some(d);
            }
        }
        Decision {
            action: deciding.map(|d| d.action).unwrap_or(Action::Allow),
            deciding: deciding.cloned(),
            accesses,
        }
    }
}

/// `reason`'s words for one decided access.
fn explain(verb: &str, by: &DecidedBy, access: &Access) -> String {
    match by {
        DecidedBy::BuiltinDeny(what) => format!("{verb} by built-in rule: {what}"),
        DecidedBy::Always => format!("{verb}: {access}"),
        DecidedBy::Rule(name) => format!("{verb} by rule \"{name}\": {access}"),
        DecidedBy::Default => format!("{verb} by default action: {access}"),
        DecidedBy::Session { what, why } => format!("{verb}: {what}: {why}"),
        DecidedBy::UserCode(inner) => format!(
            "{} (user code of that name exists in the database)",
            explain(verb, inner, access)
        ),
    }
}

fn severity(a: Action) -> u8 {
    match a {
        Action::Allow => 0,
        Action::RequireApproval => 1,
        Action::Deny => 2,
    }
}

pub struct Policy {
    pub rules: Vec<CompiledRule>,
    pub default_action: Action,
}

impl Policy {
    pub fn decide(&self, statements: &[Statement]) -> Decision {
        let mut accesses = Vec::new();
        for s in statements {
            for a in &s.accesses {
                accesses.push(self.decide_access(a, s.class));
            }
        }
        // The most severe access decides; among equals, one a rule decided
        // says more than one that is always allowed.
        Decision::from_accesses(accesses)
    }

    fn decide_access(&self, access: &Access, statement_class: StatementClass) -> AccessDecision {
        self.decide_access_as(access, statement_class, false)
    }

    /// Decide a call of a function or operator known to exist outside
    /// pg_catalog under this name: it is user code, never "built-in".
    pub fn decide_user_code(
        &self,
        access: &Access,
        statement_class: StatementClass,
    ) -> AccessDecision {
        self.decide_access_as(access, statement_class, true)
    }

    fn decide_access_as(
        &self,
        access: &Access,
        statement_class: StatementClass,
        user_code: bool,
    ) -> AccessDecision {
        let decided = |action, by| AccessDecision {
            access: access.clone(),
            action,
            by,
        };
        match &access.fixed {
            Some(Fixed::Deny(what)) => {
                return decided(Action::Deny, DecidedBy::BuiltinDeny(what.clone()))
            }
            Some(Fixed::Allow) => return decided(Action::Allow, DecidedBy::Always),
            None => {}
        }
        match &access.target {
            Target::Relation(q) => {
                let name = q.to_string();
                if catalog::SENSITIVE_RELATIONS.contains(&name.as_str()) {
                    return decided(
                        Action::Deny,
                        DecidedBy::BuiltinDeny(format!("relation {name}")),
                    );
                }
                let harmless = catalog::HARMLESS_RELATIONS.contains(&name.as_str())
                    || catalog::HARMLESS_SCHEMAS.contains(&q.schema.as_str());
                if harmless && access.class == Some(StatementClass::Select) {
                    return decided(Action::Allow, DecidedBy::Always);
                }
            }
            Target::Operator { .. } => {}
            Target::Function { name, .. } => {
                if catalog::DENIED_FUNCTIONS
                    .iter()
                    .any(|g| glob_match(g, name))
                {
                    return decided(
                        Action::Deny,
                        DecidedBy::BuiltinDeny(format!("function {name}")),
                    );
                }
            }
            Target::Statement => {}
        }
        if let Some(rule) = self
            .rules
            .iter()
            .find(|r| r.matches(access, statement_class))
        {
            return decided(rule.action, DecidedBy::Rule(rule.name.clone()));
        }
        if user_code {
            return decided(self.default_action, DecidedBy::Default);
        }
        if let Target::Operator { schema, name } = &access.target {
            let in_catalog = schema.as_deref().is_none_or(|s| s == "pg_catalog");
            if in_catalog && catalog::is_builtin_operator(name) {
                return decided(Action::Allow, DecidedBy::Always);
            }
        }
        if let Target::Function { schema, name } = &access.target {
            // PostgreSQL's own functions (not in the deny list) are part of
            // the language: now(), count(), lower() ...
            let in_catalog = schema.as_deref().is_none_or(|s| s == "pg_catalog");
            // information_schema's helpers (JDBC's metadata calls
            // _pg_expandarray) ship with PostgreSQL too.
            let in_information_schema = schema.as_deref() == Some("information_schema");
            if in_catalog && catalog::is_restricted_builtin(name) {
                // Structural default: PostgreSQL keeps it from PUBLIC or marks
                // it volatile. A rule naming it (above) may allow it.
                return decided(
                    Action::Deny,
                    DecidedBy::BuiltinDeny(format!(
                        "function {name} (a built-in that is volatile or not executable by PUBLIC; a rule naming it may allow it)"
                    )),
                );
            }
            if (in_catalog && catalog::is_builtin_function(name)) || in_information_schema {
                return decided(Action::Allow, DecidedBy::Always);
            }
        }
        decided(self.default_action, DecidedBy::Default)
    }
}
