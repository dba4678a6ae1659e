//! Policy rules compiled for matching. Globs: `*` any characters (dots too),
//! `?` exactly one; everything else literal and case-sensitive, because
//! PostgreSQL names are case-sensitive after folding.

use pgwarden_api::{Action, Rule, StatementClass};

use super::analyze::{Access, Target};

pub use crate::glob::glob_match;

#[derive(Debug, Clone)]
pub struct CompiledRule {
    pub name: String,
    pub action: Action,
    classes: Vec<StatementClass>,
    tables: Vec<String>,
    functions: Vec<String>,
    unfiltered: bool,
}

impl CompiledRule {
    pub fn new(rule: &Rule) -> Self {
        CompiledRule {
            name: rule.name.clone(),
            action: rule.action,
            classes: rule.statements.clone(),
            tables: rule.tables.clone(),
            functions: rule.functions.clone(),
            unfiltered: rule.unfiltered,
        }
    }

    /// DESIGN §2: a rule matches an access when every selector it has matches.
    /// Rules naming functions decide function calls only; other rules decide
    /// relation and statement accesses.
    pub fn matches(&self, access: &Access, statement_class: StatementClass) -> bool {
        match &access.target {
            Target::Function { schema, name } | Target::Operator { schema, name } => {
                if self.functions.is_empty() {
                    return false;
                }
                // For a call, `statements` filters on the enclosing statement.
                if !self.classes.is_empty() && !self.classes.contains(&statement_class) {
                    return false;
                }
                let qualified = schema.as_ref().map(|s| format!("{s}.{name}"));
                self.functions.iter().any(|g| {
                    glob_match(g, name) || qualified.as_deref().is_some_and(|q| glob_match(g, q))
                })
            }
            Target::Relation(q) => {
                if !self.functions.is_empty() || !self.class_matches(access) {
                    return false;
                }
                if self.unfiltered && !access.unfiltered {
                    return false;
                }
                let name = q.to_string();
                self.tables.is_empty() || self.tables.iter().any(|g| glob_match(g, &name))
            }
            Target::Statement => {
                self.functions.is_empty()
                    && self.tables.is_empty()
                    && !self.unfiltered
                    && self.class_matches(access)
            }
        }
    }

    fn class_matches(&self, access: &Access) -> bool {
        self.classes.is_empty() || access.class.is_some_and(|c| self.classes.contains(&c))
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        let cases = [
            ("public.*", "public.orders", true),
            ("public.*", "private.orders", false),
            ("*.orders", "sales.orders", true),
            ("*", "anything.at_all", true),
            ("pg_read_*", "pg_read_file", true),
            ("pg_read_*", "pg_read", false),
            ("*_to_xml*", "query_to_xmlschema", true),
            ("*_to_xml*", "to_xml", false),
            ("public.order?", "public.orders", true),
            ("public.order?", "public.order", false),
            ("public.Orders", "public.orders", false),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("", "", true),
            ("", "x", false),
        ];
        for (p, t, want) in cases {
            assert_eq!(glob_match(p, t), want, "{p} ~ {t}");
        }
    }

    #[test]
    fn pathological_globs_stay_fast() {
        let text = "a".repeat(10_000);
        let start = std::time::Instant::now();
        assert!(!glob_match("*a*a*a*a*a*a*a*b", &text));
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
    }
}
