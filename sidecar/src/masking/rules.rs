//! A policy's `masking:` entries, compiled: which `schema.table.column`
//! globs get which strategy (first matching entry wins).

use pgwarden_api::{MaskingRule, PredicateUse};

use super::detect::DetectRule;
use super::strategy::Strategy;
use crate::glob::glob_match;

#[derive(Debug, Clone)]
struct ColumnGlob {
    schema: String,
    table: String,
    column: String,
}

#[derive(Debug, Clone)]
struct Entry {
    globs: Vec<ColumnGlob>,
    strategy: Strategy,
    /// `inPredicates: Deny`.
    deny_predicates: bool,
}

#[derive(Debug, Clone)]
pub struct MaskRules {
    entries: Vec<Entry>,
    detectors: Vec<DetectRule>,
}

impl MaskRules {
    pub fn new(rules: &[MaskingRule]) -> Self {
        let detectors = rules
            .iter()
            .filter(|r| !r.detect.is_empty())
            .map(|r| {
                (
                    r.detect.clone(),
                    Strategy::from_rule(r.strategy, r.keep_first, r.keep_last),
                )
            })
            .collect();
        let entries = rules
            .iter()
            .filter(|r| !r.columns.is_empty())
            .map(|r| {
                let globs = r
                    .columns
                    .iter()
                    .filter_map(|g| {
                        // validate() already refused anything but three parts.
                        let mut parts = g.splitn(3, '.');
                        Some(ColumnGlob {
                            schema: parts.next()?.to_owned(),
                            table: parts.next()?.to_owned(),
                            column: parts.next()?.to_owned(),
                        })
                    })
                    .collect();
                Entry {
                    globs,
                    strategy: Strategy::from_rule(r.strategy, r.keep_first, r.keep_last),
                    deny_predicates: r.in_predicates == Some(PredicateUse::Deny),
                }
            })
            .collect();
        MaskRules { entries, detectors }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.detectors.is_empty()
    }

    pub fn uses_hash(&self) -> bool {
        self.entries
            .iter()
            .map(|e| &e.strategy)
            .chain(self.detectors.iter().map(|(_, s)| s))
            .any(|s| *s == Strategy::Hash)
    }

    /// Content detectors (`detect:` entries), empty when there are none.
    pub fn detectors(&self) -> &[DetectRule] {
        &self.detectors
    }

    /// Whether some entry says `inPredicates: Deny`.
    pub fn denies_predicates(&self) -> bool {
        self.entries.iter().any(|e| e.deny_predicates)
    }

    /// Whether an `inPredicates: Deny` entry could mask a column of this name.
    pub fn denies_predicates_on(&self, column: &str) -> bool {
        self.entries
            .iter()
            .filter(|e| e.deny_predicates)
            .flat_map(|e| &e.globs)
            .any(|g| glob_match(&g.column, column))
    }

    fn globs(&self) -> impl Iterator<Item = &ColumnGlob> {
        self.entries.iter().flat_map(|e| &e.globs)
    }

    /// The strategy for a table column, if any entry masks it.
    pub fn strategy_for(&self, schema: &str, table: &str, column: &str) -> Option<&Strategy> {
        self.entries.iter().find_map(
            |Entry {
                 globs, strategy, ..
             }| {
                globs
                    .iter()
                    .any(|g| {
                        glob_match(&g.schema, schema)
                            && glob_match(&g.table, table)
                            && glob_match(&g.column, column)
                    })
                    .then_some(strategy)
            },
        )
    }

    /// Whether some entry could mask a column of this name in some table:
    /// a statement naming it may compute from a masked value.
    pub fn may_mask_column(&self, column: &str) -> bool {
        self.globs().any(|g| glob_match(&g.column, column))
    }

    /// Whether some entry could mask a column of this relation
    /// (`schema.table`, as the analyser qualifies it).
    pub fn may_mask_relation(&self, qualified: &str) -> bool {
        let Some((schema, table)) = qualified.split_once('.') else {
            return false;
        };
        self.globs()
            .any(|g| glob_match(&g.schema, schema) && glob_match(&g.table, table))
    }

    /// A POSIX regex (for `attname ~ ...`) matching every column name some
    /// entry could mask: the catalog query fetches only those.
    pub fn column_name_regex(&self) -> String {
        let alternatives: Vec<String> = self.globs().map(|g| glob_to_regex(&g.column)).collect();
        format!("^({})$", alternatives.join("|"))
    }
}

fn glob_to_regex(glob: &str) -> String {
    let mut out = String::with_capacity(glob.len() + 8);
    for c in glob.chars() {
        match c {
            '*' => out.push_str(".*"),
            '?' => out.push('.'),
            c if c.is_ascii_alphanumeric() || c == '_' => out.push(c),
            // Everything else as a code-point escape (PostgreSQL's ARE
            // syntax): no quote or bracket ever reaches the SQL text.
            c if (c as u32) <= 0xFFFF => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwarden_api::MaskStrategy;

    fn rule(cols: &[&str], strategy: MaskStrategy) -> MaskingRule {
        MaskingRule {
            columns: cols.iter().map(|c| c.to_string()).collect(),
            strategy,
            keep_first: None,
            keep_last: (strategy == MaskStrategy::Partial).then_some(4),
            detect: vec![],
            in_predicates: None,
        }
    }

    #[test]
    fn first_matching_entry_decides() {
        let r = MaskRules::new(&[
            rule(&["public.customers.card_number"], MaskStrategy::Partial),
            rule(&["*.*.card_number", "*.*.ssn"], MaskStrategy::Redact),
        ]);
        assert_eq!(
            r.strategy_for("public", "customers", "card_number"),
            Some(&Strategy::Partial { first: 0, last: 4 })
        );
        assert_eq!(
            r.strategy_for("billing", "cards", "card_number"),
            Some(&Strategy::Redact)
        );
        assert_eq!(r.strategy_for("public", "customers", "name"), None);
        assert!(r.may_mask_column("ssn"));
        assert!(!r.may_mask_column("name"));
        assert!(r.may_mask_relation("billing.cards"));
        assert_eq!(r.column_name_regex(), "^(card_number|card_number|ssn)$");
    }

    #[test]
    fn regex_escapes_everything_but_globs() {
        assert_eq!(glob_to_regex("a.b*c?$'"), "a\\u002eb.*c.\\u0024\\u0027");
    }
}
