//! Warnings about a policy that is valid but probably not what its author
//! meant: selectors that can never match, and rules that never decide
//! anything because an earlier rule matches everything they match.
//!
//! `validate()` says what makes a policy unusable (it is refused);
//! `lint()` says what makes it silently weaker or stricter than it reads
//! (it is accepted, and the warnings are shown by `pgwarden check` and
//! logged by `pgwarden run`; the operator can put them in a condition).
//! Pure: the same answer wherever it runs.

use crate::{DatabaseAccessPolicySpec, FieldError, Rule, StatementClass};

/// Statement classes whose statements never name a relation: a rule with
/// `tables` never matches them.
const CLASS_ONLY: [StatementClass; 3] = [
    StatementClass::Transaction,
    StatementClass::Session,
    StatementClass::Code,
];

impl DatabaseAccessPolicySpec {
    /// Every warning about this spec, in document order; empty when clean.
    /// Meant for a spec that `validate()` accepts.
    pub fn lint(&self) -> Vec<FieldError> {
        let mut out = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let p = format!("spec.rules[{i}]");
            lint_selectors(&p, rule, &mut out);
            if let Some(w) = shadowed(i, &self.rules) {
                out.push(FieldError::new(p, w));
            }
        }
        for (i, m) in self.masking.iter().enumerate() {
            for (j, column) in m.columns.iter().enumerate() {
                let p = format!("spec.masking[{i}].columns[{j}]");
                name_case(&p, column, &mut out);
            }
        }
        out
    }
}

fn lint_selectors(p: &str, rule: &Rule, out: &mut Vec<FieldError>) {
    for (k, class) in rule.statements.iter().enumerate() {
        let path = format!("{p}.statements[{k}]");
        if *class == StatementClass::Transaction && rule.statements.len() == 1 {
            out.push(FieldError::new(
                path,
                "TRANSACTION statements (BEGIN, COMMIT, SAVEPOINT ...) are always allowed: a rule for them alone never decides anything",
            ));
        } else if !rule.tables.is_empty() && CLASS_ONLY.contains(class) {
            out.push(FieldError::new(
                path,
                format!("{class} statements name no table: a rule with tables never matches them"),
            ));
        }
    }
    for (k, glob) in rule.tables.iter().enumerate() {
        let path = format!("{p}.tables[{k}]");
        table_glob(&path, glob, out);
        name_case(&path, glob, out);
    }
    for (k, glob) in rule.functions.iter().enumerate() {
        let path = format!("{p}.functions[{k}]");
        function_glob(&path, glob, out);
        name_case(&path, glob, out);
    }
    if !rule.functions.is_empty() && !rule.tables.is_empty() {
        out.push(FieldError::new(
            format!("{p}.tables"),
            "ignored: a rule with functions decides calls of those functions whatever table the statement names; put the tables in a rule of their own",
        ));
    }
    if !rule.functions.is_empty() && rule.unfiltered {
        out.push(FieldError::new(
            format!("{p}.unfiltered"),
            "ignored: a rule with functions decides function calls, which have no WHERE clause",
        ));
    }
}

fn has_wildcard(glob: &str) -> bool {
    glob.contains(['*', '?'])
}

/// `tables` globs match `schema.table` after folding.
fn table_glob(path: &str, glob: &str, out: &mut Vec<FieldError>) {
    let mut warn = |m: String| out.push(FieldError::new(path, m));
    if glob.trim() != glob {
        warn(format!(
            "{glob:?} starts or ends with white space, which is matched literally: it never matches"
        ));
        return;
    }
    if glob.contains('(') {
        warn(format!(
            "{glob:?} contains \"(\": tables match schema.table names only"
        ));
        return;
    }
    if !glob.contains('.') {
        if !has_wildcard(glob) {
            warn(format!(
                "{glob:?} has no schema: it never matches; write \"public.{glob}\" or \"*.{glob}\""
            ));
        } else if !glob.starts_with('*') {
            warn(format!(
                "{glob:?} has no schema: it is matched against schema.table, so only schemas named like it match; write \"public.{glob}\" or \"*.{glob}\""
            ));
        }
        return;
    }
    if has_wildcard(glob) {
        return;
    }
    let parts: Vec<&str> = glob.split('.').collect();
    if parts.iter().any(|s| s.is_empty()) {
        warn(format!(
            "{glob:?} has an empty part: it never matches; write schema.table"
        ));
    } else if parts.len() > 2 {
        warn(format!(
            "{glob:?} has {} parts: tables match schema.table (the database is spec.database.name; columns are masked with spec.masking), so it matches only a name that contains a dot",
            parts.len()
        ));
    }
}

/// `functions` globs match a function's name or `schema.name`.
fn function_glob(path: &str, glob: &str, out: &mut Vec<FieldError>) {
    let mut warn = |m: String| out.push(FieldError::new(path, m));
    if glob.trim() != glob {
        warn(format!(
            "{glob:?} starts or ends with white space, which is matched literally: it never matches"
        ));
    } else if let Some((name, _)) = glob.split_once('(') {
        warn(format!(
            "{glob:?} has an argument list: functions are matched by name only (every overload); write {name:?}"
        ));
    } else if !has_wildcard(glob) && glob.split('.').count() > 2 {
        warn(format!(
            "{glob:?} has more than two parts: functions match name or schema.name"
        ));
    }
}

/// Names are compared after PostgreSQL's folding: unquoted identifiers are
/// lower case, and quotes are not part of the name.
fn name_case(path: &str, glob: &str, out: &mut Vec<FieldError>) {
    if glob.contains('"') {
        let bare = glob.replace('"', "");
        out.push(FieldError::new(
            path,
            format!(
                "{glob:?} contains double quotes: names are matched as PostgreSQL folded them, without quotes; write {bare:?} for a quoted identifier, {:?} otherwise",
                bare.to_lowercase()
            ),
        ));
    } else if glob.chars().any(|c| c.is_uppercase()) {
        out.push(FieldError::new(
            path,
            format!(
                "{glob:?} has upper-case letters: PostgreSQL folds unquoted names to lower case, so it matches only a name created quoted with exactly these letters; write {:?} otherwise",
                glob.to_lowercase()
            ),
        ));
    }
}

/// Why rule `j` never decides anything: the first earlier rule that matches
/// every access rule `j` matches. Conservative: only provable cases.
fn shadowed(j: usize, rules: &[Rule]) -> Option<String> {
    let later = &rules[j];
    let (i, earlier) = rules[..j]
        .iter()
        .enumerate()
        .find(|(_, earlier)| covers(earlier, later))?;
    Some(if earlier.action == later.action {
        format!(
            "redundant: spec.rules[{i}] ({:?}) matches every access this rule matches, first, with the same action {}",
            earlier.name, earlier.action
        )
    } else {
        format!(
            "never decides: spec.rules[{i}] ({:?}, {}) matches every access this rule matches, first, so its action {} never applies; move it above spec.rules[{i}] or narrow spec.rules[{i}]",
            earlier.name, earlier.action, later.action
        )
    })
}

/// Whether every access `b` matches is matched by `a` (see the sidecar's
/// `CompiledRule::matches`): rules with functions decide calls only, rules
/// without decide relation and class-only accesses.
fn covers(a: &Rule, b: &Rule) -> bool {
    if a.functions.is_empty() != b.functions.is_empty() {
        return false;
    }
    let classes = a.statements.is_empty()
        || (!b.statements.is_empty() && b.statements.iter().all(|c| a.statements.contains(c)));
    if !classes {
        return false;
    }
    if !a.functions.is_empty() {
        // A call: `statements` filter the enclosing statement; tables and
        // unfiltered are not consulted.
        return globs_cover(&a.functions, &b.functions);
    }
    if a.unfiltered && !b.unfiltered {
        return false;
    }
    // Without tables a rule also matches class-only accesses, which no rule
    // with tables does.
    a.tables.is_empty() || (!b.tables.is_empty() && globs_cover(&a.tables, &b.tables))
}

/// Every glob of `b` matches only what some glob of `a` matches.
fn globs_cover(a: &[String], b: &[String]) -> bool {
    b.iter().all(|g| a.iter().any(|f| glob_covers(f, g)))
}

/// `a` matches everything `g` matches: equal, or `a` is a literal prefix
/// followed by one `*` and `g` starts with that prefix.
fn glob_covers(a: &str, g: &str) -> bool {
    if a == g {
        return true;
    }
    match a.strip_suffix('*') {
        Some(prefix) => !has_wildcard(prefix) && g.starts_with(prefix),
        None => false,
    }
}

#[cfg(test)]
mod tests;
