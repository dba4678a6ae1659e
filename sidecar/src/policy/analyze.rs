//! Statement analysis, sans-IO: SQL text in, accesses out.
//!
//! PostgreSQL's own grammar (libpg_query) parses the text; the parse tree is
//! walked *generically* (through its serde form), so no field of any node can
//! be skipped by omission. Node kinds are an allowlist: a kind the analyser
//! does not know makes the whole statement not understood, and therefore
//! denied. Statement kinds get specific handling that says which class each
//! relation they touch is accessed with.

use std::fmt;

use super::tree::{Map, Value};
use pgwarden_api::StatementClass as Class;

use super::catalog;

/// `schema.name` after PostgreSQL's case folding and pgwarden's search_path.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QualifiedName {
    pub schema: String,
    pub name: String,
}

impl fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// The schema pgwarden pins as search_path at session start.
pub const PINNED_SCHEMA: &str = "public";

/// What one access touches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Relation(QualifiedName),
    /// A function call; `schema` is None when unqualified.
    Function {
        schema: Option<String>,
        name: String,
    },
    /// An operator; user-defined operators run user functions.
    Operator {
        schema: Option<String>,
        name: String,
    },
    /// A statement with no relation (DO, CREATE SCHEMA, LISTEN ...).
    Statement,
}

/// Why an access is decided before any rule is consulted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fixed {
    /// Built-in deny: never allowed. The text says what was found.
    Deny(String),
    /// Always allowed (transaction control, harmless SET/SHOW, cursors...).
    Allow,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// None for function accesses.
    pub class: Option<Class>,
    pub target: Target,
    /// UPDATE/DELETE without a WHERE clause.
    pub unfiltered: bool,
    pub fixed: Option<Fixed>,
}

/// What a statement does to the session's prepared-statement namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    Prepare(String),
    Execute(String),
    Deallocate(Option<String>),
    /// CREATE FUNCTION/PROCEDURE of this (unqualified) name.
    DefinesFunction(String),
    /// CREATE OPERATOR of this name.
    DefinesOperator(String),
    /// FETCH or MOVE from a cursor or portal of this name: rows of a query
    /// judged at DECLARE, or of a protocol portal (the session checks it).
    Fetch(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement {
    /// The class of the top-level statement (for logs and `check`).
    pub class: Class,
    pub accesses: Vec<Access>,
    pub effect: Option<Effect>,
    /// Names after a dot in column references (`o.f`, `(o).f`): attribute
    /// notation calls a function `f(o)` when no column `f` exists, so these
    /// are checked against the database's user functions.
    pub attribute_refs: Vec<String>,
    /// How the statement names columns and rows, for masking: what it
    /// computes from (everything but RETURNING) ...
    pub columns: ColumnFacts,
    /// ... and what its RETURNING lists hand back.
    pub returning: ColumnFacts,
}

/// The ways a statement can reach a column's value by name. Masking decides
/// from these whether a computed result could derive from a masked column.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ColumnFacts {
    /// The last name of every column reference (`c.card_number` →
    /// `card_number`; a bare `c` may be a column or a whole row), field names
    /// of `(x).f`, and COPY column lists.
    pub names: Vec<String>,
    /// Qualifiers of `x.*` references (whole rows of `x`).
    pub star_qualifiers: Vec<String>,
    /// A bare `*` (`SELECT *`, `RETURNING *`, COPY of a whole table).
    pub bare_star: bool,
    /// Relations as named, with their alias and whether the alias renames
    /// columns (`customers AS c(a, b)`): (`schema.table`, alias, renames).
    pub aliases: Vec<(String, String, bool)>,
    /// Names used to filter, join, sort or group (WHERE, ON, USING, HAVING,
    /// ORDER BY, GROUP BY, DISTINCT ON, window PARTITION/ORDER BY).
    pub predicate_names: Vec<String>,
    /// Names used anywhere but as a bare output column (`SELECT c` or
    /// `SELECT t.c AS x` of a top-level or FROM-subquery select list):
    /// inside an expression, a predicate, a function argument, a sublink.
    /// Any such use can turn a value into an oracle (`CASE WHEN c LIKE '4%'
    /// THEN 1/0 END`), so `inPredicates: Deny` refuses them all.
    pub expression_names: Vec<String>,
    /// Output aliases and the names their expression reads (`card_number AS
    /// x` → (x, [card_number])): a later `WHERE x ...` filters on the source.
    pub output_aliases: Vec<(String, Vec<String>)>,
    /// Names that denote a row source: relations, their aliases, subquery,
    /// function and CTE aliases (a bare one in an expression is a whole row).
    pub row_names: Vec<String>,
    /// Column names given by alias lists (`s(a, x)`, `WITH w(a, x)`): they may
    /// rename any column of what they alias.
    pub renamed_columns: Vec<String>,
    /// Compares output values wholesale: positional ORDER BY / GROUP BY,
    /// DISTINCT, UNION/INTERSECT/EXCEPT (not UNION ALL), NATURAL JOIN.
    pub compares_outputs: bool,
}

impl ColumnFacts {
    fn merge(&mut self, other: ColumnFacts) {
        self.names.extend(other.names);
        self.star_qualifiers.extend(other.star_qualifiers);
        self.bare_star |= other.bare_star;
        self.aliases.extend(other.aliases);
        self.predicate_names.extend(other.predicate_names);
        self.expression_names.extend(other.expression_names);
        self.output_aliases.extend(other.output_aliases);
        self.row_names.extend(other.row_names);
        self.renamed_columns.extend(other.renamed_columns);
        self.compares_outputs |= other.compares_outputs;
    }

    fn tidy(&mut self) {
        self.names.sort();
        self.names.dedup();
        self.star_qualifiers.sort();
        self.star_qualifiers.dedup();
        self.aliases.sort();
        self.aliases.dedup();
        self.predicate_names.sort();
        self.predicate_names.dedup();
        for v in [
            &mut self.expression_names,
            &mut self.row_names,
            &mut self.renamed_columns,
        ] {
            v.sort();
            v.dedup();
        }
        self.output_aliases.sort();
        self.output_aliases.dedup();
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AnalyzeError {
    #[error("cannot parse statement: {0}")]
    Parse(String),
    #[error("pgwarden does not understand {0}")]
    NotUnderstood(String),
    /// Over the analysis limits (`budget`): refused before parsing.
    #[error("statement too large to analyse: {0}")]
    TooLarge(String),
}

/// Session facts that change what a statement means.
#[derive(Clone, Copy, Debug, Default)]
pub struct Settings {
    /// `limits.statementTimeout` is set: statement_timeout is pinned too.
    pub pin_statement_timeout: bool,
}

/// Analyse a query string (possibly several statements).
pub fn analyze(sql: &str, settings: Settings) -> Result<Vec<Statement>, AnalyzeError> {
    super::budget::check(sql).map_err(AnalyzeError::TooLarge)?;
    let parsed = pg_query::parse(sql, 0).map_err(|e| AnalyzeError::Parse(e.to_string()))?;
    let tree = super::tree::to_tree(&parsed.protobuf)
        .map_err(|e| AnalyzeError::NotUnderstood(format!("the parse tree ({e})")))?;
    // Only the walked tree is needed from here: halve the peak.
    drop(parsed);
    let root = tree
        .as_object()
        .ok_or_else(|| AnalyzeError::NotUnderstood("the parse tree's shape".into()))?;
    // An empty text has no statements (and so no `stmts` field).
    let stmts = list(root, "stmts");
    stmts
        .iter()
        .map(|raw| {
            let stmt = raw.as_object().and_then(|r| r.get("stmt"));
            let (kind, body) = node_of(stmt.unwrap_or(&Value::Null))
                .ok_or_else(|| AnalyzeError::NotUnderstood("an empty statement node".into()))?;
            let mut w = Walker::new(settings);
            w.node(kind, body)?;
            let mut attribute_refs = w.attribute_refs;
            attribute_refs.sort();
            attribute_refs.dedup();
            let (mut columns, mut returning) = (w.columns, w.returning);
            columns.tidy();
            returning.tidy();
            Ok(Statement {
                class: w.top_class.unwrap_or(Class::Select),
                accesses: w.accesses,
                effect: w.effect,
                attribute_refs,
                columns,
                returning,
            })
        })
        .collect()
}

/// `{"node": {"Kind": {...}}}` → ("Kind", {...}).
fn node_of(v: &Value) -> Option<(&str, &Map)> {
    let inner = v.as_object()?.get("node")?.as_object()?;
    if inner.len() != 1 {
        return None;
    }
    let (k, body) = inner.iter().next()?;
    Some((k, body.as_object()?))
}

fn str_field<'a>(m: &'a Map, key: &str) -> &'a str {
    m.get(key).and_then(Value::as_str).unwrap_or("")
}

fn list<'a>(m: &'a Map, key: &str) -> &'a [Value] {
    m.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// The strings of a name list such as FuncCall.funcname.
fn name_list(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .filter_map(|n| match node_of(n) {
            Some(("String", s)) => Some(str_field(s, "sval").to_owned()),
            _ => None,
        })
        .collect()
}

/// Clauses whose column references filter, join, sort or group rows.
const PREDICATE_KEYS: &[&str] = &[
    "where_clause",
    "having_clause",
    "group_clause",
    "sort_clause",
    "quals",
    "distinct_clause",
    "partition_clause",
    "order_clause",
];

const RET_CLAUSE: &str = "returning_clause";
const RET_LIST: &str = "returning_list";

struct Walker {
    settings: Settings,
    accesses: Vec<Access>,
    effect: Option<Effect>,
    top_class: Option<Class>,
    /// Class given to a relation reached without a more specific role.
    read_class: Class,
    /// CTE names visible at this point, innermost last.
    ctes: Vec<Vec<String>>,
    attribute_refs: Vec<String>,
    columns: ColumnFacts,
    returning: ColumnFacts,
    /// Depth of predicate clauses being walked.
    in_predicate: usize,
    /// Walking the value of a select-list entry that is a bare column.
    bare_output: bool,
    /// Depth of sublinks (`(SELECT ...)` inside an expression): their
    /// outputs are used by the enclosing expression, never bare.
    in_sublink: usize,
}

impl Walker {
    fn new(settings: Settings) -> Self {
        Walker {
            settings,
            accesses: Vec::new(),
            effect: None,
            top_class: None,
            read_class: Class::Select,
            ctes: Vec::new(),
            attribute_refs: Vec::new(),
            columns: ColumnFacts::default(),
            returning: ColumnFacts::default(),
            in_predicate: 0,
            bare_output: false,
            in_sublink: 0,
        }
    }

    fn push(&mut self, class: Class, target: Target, unfiltered: bool, fixed: Option<Fixed>) {
        self.accesses.push(Access {
            class: Some(class),
            target,
            unfiltered,
            fixed,
        });
    }

    fn class_only(&mut self, class: Class) {
        self.push(class, Target::Statement, false, None);
    }

    fn always(&mut self, class: Class) {
        self.push(class, Target::Statement, false, Some(Fixed::Allow));
    }

    fn forbid(&mut self, class: Class, what: impl Into<String>) {
        self.push(
            class,
            Target::Statement,
            false,
            Some(Fixed::Deny(what.into())),
        );
    }

    fn set_top(&mut self, class: Class) {
        if self.top_class.is_none() {
            self.top_class = Some(class);
        }
    }

    /// Walk a statement whose relations all get `class`; a statement that
    /// names no relation (CREATE SCHEMA, VACUUM of everything) becomes one
    /// class-only access, so rules with `tables` can still scope the rest.
    fn targets_or_statement(
        &mut self,
        class: Class,
        f: impl FnOnce(&mut Self) -> Result<(), AnalyzeError>,
    ) -> Result<(), AnalyzeError> {
        let start = self.accesses.len();
        self.with_class(class, f)?;
        let named = self.accesses[start..]
            .iter()
            .any(|a| a.class == Some(class) && matches!(a.target, Target::Relation(_)));
        if !named {
            self.class_only(class);
        }
        Ok(())
    }

    /// Walk with a different default class for relations, then restore.
    fn with_class<T>(&mut self, class: Class, f: impl FnOnce(&mut Self) -> T) -> T {
        let saved = std::mem::replace(&mut self.read_class, class);
        let r = f(self);
        self.read_class = saved;
        r
    }

    // === generic walking ===

    fn value(&mut self, v: &Value) -> Result<(), AnalyzeError> {
        match v {
            Value::Object(m) => {
                if let Some((kind, body)) = node_of(v) {
                    return self.node(kind, body);
                }
                if m.name() == "Node" && m.is_empty() {
                    return Ok(()); // an absent node
                }
                self.message(m)
            }
            Value::Array(items) => items.iter().try_for_each(|i| self.value(i)),
            _ => Ok(()),
        }
    }

    /// A message embedded without a Node wrapper (a typed field). Some carry
    /// meaning by shape: a RangeVar has `relname`, a statement with a WITH
    /// clause has `with_clause`.
    fn message(&mut self, m: &Map) -> Result<(), AnalyzeError> {
        match m.name() {
            "RangeVar" => return self.range_var(m),
            "FuncCall" => return self.func_call(m),
            "Alias" => self.alias(m),
            _ => {}
        }
        if m.get("with_clause").is_some() {
            return self.with_scope(m, |w| w.fields(m, &["with_clause"]));
        }
        self.fields(m, &[])
    }

    /// An alias (`AS s(a, b)`) names a row source and may rename columns.
    fn alias(&mut self, m: &Map) {
        let name = str_field(m, "aliasname");
        if !name.is_empty() {
            self.columns.row_names.push(name.to_owned());
        }
        let renamed = name_list(list(m, "colnames"));
        self.columns.renamed_columns.extend(renamed);
    }

    fn fields(&mut self, m: &Map, skip: &[&str]) -> Result<(), AnalyzeError> {
        for (k, v) in m.iter() {
            if skip.contains(&k) {
                continue;
            }
            if k == "using_clause" {
                // JOIN ... USING (col): the columns compared, as plain names.
                if let Value::Array(items) = v {
                    let names = name_list(items);
                    self.columns.expression_names.extend(names.iter().cloned());
                    self.columns.predicate_names.extend(names);
                }
            }
            if k == "group_clause" || k == "distinct_clause" {
                // GROUP BY 2 groups by an output column whatever it is;
                // DISTINCT compares every output value.
                let compares = match v {
                    Value::Array(items) => {
                        k == "distinct_clause" && !items.is_empty()
                            || items
                                .iter()
                                .any(|i| matches!(node_of(i), Some(("AConst", _))))
                    }
                    _ => false,
                };
                self.columns.compares_outputs |= compares;
            }
            let predicate = PREDICATE_KEYS.contains(&k);
            self.in_predicate += usize::from(predicate);
            let r = self.value(v);
            self.in_predicate -= usize::from(predicate);
            r?;
        }
        Ok(())
    }

    fn field(&mut self, m: &Map, key: &str) -> Result<(), AnalyzeError> {
        match m.get(key) {
            Some(v) => self.value(v),
            None => Ok(()),
        }
    }

    // === names ===

    fn is_cte(&self, name: &str) -> bool {
        self.ctes
            .iter()
            .any(|scope| scope.iter().any(|n| n == name))
    }

    fn resolve(&self, schema: &str, name: &str) -> QualifiedName {
        let schema = if !schema.is_empty() {
            schema.to_owned()
        } else if catalog::is_catalog_relation(name) {
            // pg_catalog is searched before the pinned search_path.
            "pg_catalog".to_owned()
        } else {
            PINNED_SCHEMA.to_owned()
        };
        QualifiedName {
            schema,
            name: name.to_owned(),
        }
    }

    fn range_var(&mut self, m: &Map) -> Result<(), AnalyzeError> {
        let schema = str_field(m, "schemaname");
        let name = str_field(m, "relname");
        if schema.is_empty() && self.is_cte(name) {
            return Ok(());
        }
        let q = self.resolve(schema, name);
        self.note_alias(&q.to_string(), m);
        self.columns.row_names.push(name.to_owned());
        self.push(self.read_class, Target::Relation(q), false, None);
        Ok(())
    }

    /// A relation's alias, as masking needs it: `c` in `customers c` names
    /// the whole row, and `c(a, b)` renames its columns.
    fn note_alias(&mut self, qualified: &str, m: &Map) {
        let Some(alias) = m.get("alias").and_then(Value::as_object) else {
            return;
        };
        self.alias(alias);
        let name = str_field(alias, "aliasname");
        if !name.is_empty() {
            let renames = !list(alias, "colnames").is_empty();
            self.columns
                .aliases
                .push((qualified.to_owned(), name.to_owned(), renames));
        }
    }

    /// The relation a statement targets, with that statement's class.
    fn target(
        &mut self,
        m: &Map,
        key: &str,
        class: Class,
        unfiltered: bool,
    ) -> Result<(), AnalyzeError> {
        let Some(rv) = m.get(key).and_then(Value::as_object) else {
            return Ok(());
        };
        let q = self.resolve(str_field(rv, "schemaname"), str_field(rv, "relname"));
        self.note_alias(&q.to_string(), rv);
        self.push(class, Target::Relation(q), unfiltered, None);
        Ok(())
    }

    fn func_call(&mut self, m: &Map) -> Result<(), AnalyzeError> {
        let mut parts = name_list(list(m, "funcname"));
        let name = parts.pop().unwrap_or_default();
        let schema = parts.pop();
        let in_catalog = schema.as_deref().is_none_or(|s| s == "pg_catalog");
        if name == "set_config" && in_catalog {
            // set_config('name', ...) with a constant name is `SET name`
            // (drivers such as asyncpg use it for jit); any other form stays
            // a call of a built-in-denied function.
            if let Some(setting) = list(m, "args").first().and_then(string_constant) {
                self.setting_change(&setting.to_ascii_lowercase());
                return self.fields(m, &["funcname"]);
            }
        }
        if in_catalog && catalog::SEQUENCE_WRITES.contains(&name.as_str()) {
            self.sequence_write(&name, list(m, "args").first());
            return self.fields(m, &["funcname"]);
        }
        if in_catalog && name == "pg_notify" {
            // NOTIFY by function: the rules for SESSION decide it, as for
            // the NOTIFY statement (masking still sees the call).
            self.class_only(Class::Session);
            self.accesses.push(Access {
                class: None,
                target: Target::Function { schema, name },
                unfiltered: false,
                fixed: Some(Fixed::Allow),
            });
            return self.fields(m, &["funcname"]);
        }
        self.accesses.push(Access {
            class: None,
            target: Target::Function { schema, name },
            unfiltered: false,
            fixed: None,
        });
        self.fields(m, &["funcname"])
    }

    /// `nextval('s')`, `setval('s'::regclass, n)`, `('s'::regclass).nextval`:
    /// an UPDATE of sequence `s`, for the rules on that relation. A sequence
    /// not named by a constant cannot be judged.
    fn sequence_write(&mut self, function: &str, arg: Option<&Value>) {
        let named = arg
            .and_then(regclass_constant)
            .and_then(|text| parse_relation_name(&text));
        match named {
            Some((schema, name)) => {
                let q = self.resolve(&schema, &name);
                self.push(Class::Update, Target::Relation(q), false, None);
            }
            None => self.forbid(
                Class::Update,
                format!("{function} of a sequence not named by a constant"),
            ),
        }
    }

    /// `x.f` / `(x).f` where `f` names a built-in function: PostgreSQL reads
    /// it as the call `f(x)` when `x` has no column `f`. Judged exactly as
    /// the call (the deny list, the structural defaults, the rules); and `x`
    /// is used whole (`c.row_to_json` hands out every column of `c`).
    fn attribute_call(&mut self, function: &str, arg: Option<&Value>, qualifiers: &[String]) {
        if !catalog::is_builtin_function(function) {
            // A user function of that name is checked by the gate, which
            // knows the database's functions (`attribute_refs`).
            return;
        }
        if catalog::SEQUENCE_WRITES.contains(&function) {
            self.sequence_write(function, arg);
        } else {
            self.accesses.push(Access {
                class: None,
                target: Target::Function {
                    schema: None,
                    name: function.to_owned(),
                },
                unfiltered: false,
                fixed: None,
            });
        }
        // `c.row_to_json` hands out the whole row `c`; `c.name` with one
        // qualifier is the column `name` unless `name()` takes a row. With
        // more (`t.col.f`), the value before `f` is its argument.
        let used = match qualifiers {
            [row] if catalog::takes_a_row(function) => std::slice::from_ref(row),
            [_] => &[],
            more => more,
        };
        for q in used {
            self.columns.names.push(q.clone());
            self.columns.expression_names.push(q.clone());
        }
    }

    /// An operator named by an expression (`a === b`, `OPERATOR(s.===)`).
    fn operator(&mut self, name: &[Value]) {
        let mut parts = name_list(name);
        let Some(name) = parts.pop() else {
            return;
        };
        let schema = parts.pop();
        self.accesses.push(Access {
            class: None,
            target: Target::Operator { schema, name },
            unfiltered: false,
            fixed: None,
        });
    }

    /// Make a statement's CTE names visible while `f` walks the statement.
    /// CTE bodies see earlier CTEs of the list (all of them when RECURSIVE).
    fn with_scope<T>(
        &mut self,
        m: &Map,
        f: impl FnOnce(&mut Self) -> Result<T, AnalyzeError>,
    ) -> Result<T, AnalyzeError> {
        let Some(with) = m.get("with_clause").and_then(Value::as_object) else {
            return f(self);
        };
        let recursive = with
            .get("recursive")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let ctes: Vec<(&str, &Map)> = list(with, "ctes")
            .iter()
            .filter_map(|c| match node_of(c) {
                Some(("CommonTableExpr", body)) => Some((str_field(body, "ctename"), body)),
                _ => None,
            })
            .collect();
        if ctes.len() != list(with, "ctes").len() {
            return Err(AnalyzeError::NotUnderstood("a WITH clause entry".into()));
        }
        let names: Vec<String> = ctes.iter().map(|(n, _)| (*n).to_owned()).collect();
        for (name, body) in &ctes {
            self.columns.row_names.push((*name).to_owned());
            let renamed = name_list(list(body, "aliascolnames"));
            self.columns.renamed_columns.extend(renamed);
        }
        for (i, (_, body)) in ctes.iter().enumerate() {
            let visible = if recursive {
                names.clone()
            } else {
                names[..i].to_vec()
            };
            self.ctes.push(visible);
            let r = self.with_class(Class::Select, |w| w.fields(body, &["ctename"]));
            self.ctes.pop();
            r?;
        }
        self.ctes.push(names);
        let r = f(self);
        self.ctes.pop();
        r
    }

    // === node kinds ===

    fn node(&mut self, kind: &str, b: &Map) -> Result<(), AnalyzeError> {
        use Class::*;
        match kind {
            "RangeVar" => self.range_var(b),
            "FuncCall" => self.func_call(b),
            "AExpr" => {
                self.operator(list(b, "name"));
                self.fields(b, &["name"])
            }
            "SubLink" => {
                self.operator(list(b, "oper_name"));
                self.in_sublink += 1;
                let r = self.fields(b, &["oper_name"]);
                self.in_sublink -= 1;
                r
            }
            "SortBy" => {
                self.operator(list(b, "use_op"));
                if matches!(b.get("node").and_then(node_of), Some(("AConst", _))) {
                    // ORDER BY 2: sorts by an output column, whatever it is.
                    self.columns.compares_outputs = true;
                }
                self.fields(b, &["use_op"])
            }
            "ResTarget" => {
                let bare = self.in_sublink == 0
                    && matches!(b.get("val").and_then(node_of), Some(("ColumnRef", _)));
                let start = self.columns.names.len();
                self.bare_output = bare;
                let r = self.field(b, "val");
                self.bare_output = false;
                r?;
                let alias = str_field(b, "name");
                if !alias.is_empty() {
                    let sources = self.columns.names[start..].to_vec();
                    self.columns
                        .output_aliases
                        .push((alias.to_owned(), sources));
                }
                self.fields(b, &["val"])
            }
            "Alias" => {
                self.alias(b);
                self.fields(b, &[])
            }
            "JoinExpr" => {
                if b.get("is_natural").and_then(Value::as_bool) == Some(true) {
                    self.columns.compares_outputs = true;
                }
                self.fields(b, &[])
            }
            "ColumnRef" => {
                let raw = list(b, "fields");
                let star = raw
                    .last()
                    .is_some_and(|f| matches!(node_of(f), Some(("AStar", _))));
                let fields = name_list(raw);
                if star {
                    match fields.last() {
                        Some(q) => self.columns.star_qualifiers.push(q.clone()),
                        None => self.columns.bare_star = true,
                    }
                } else if let Some(last) = fields.last() {
                    self.columns.names.push(last.clone());
                    if self.in_predicate > 0 {
                        self.columns.predicate_names.push(last.clone());
                    }
                    if !std::mem::take(&mut self.bare_output) {
                        self.columns.expression_names.push(last.clone());
                    }
                }
                // `a.b.f`: every name after the first may be a function
                // applied to what precedes it.
                for i in 1..fields.len() {
                    self.attribute_call(&fields[i], None, &fields[..i]);
                }
                self.attribute_refs.extend(fields.into_iter().skip(1));
                Ok(())
            }
            "AIndirection" => {
                for i in list(b, "indirection") {
                    match node_of(i) {
                        Some(("String", s)) => {
                            let f = str_field(s, "sval").to_owned();
                            self.attribute_call(&f, b.get("arg"), &[]);
                            self.columns.names.push(f.clone());
                            self.columns.expression_names.push(f.clone());
                            self.attribute_refs.push(f);
                        }
                        // `(x).*`: every field of a row value.
                        Some(("AStar", _)) => self.columns.bare_star = true,
                        _ => {}
                    }
                }
                self.fields(b, &[])
            }

            // --- reads and writes ---
            "SelectStmt" => {
                self.set_top(Select);
                // SetOperation: 1 none, 2 union, 3 intersect, 4 except. All
                // but UNION ALL compare whole output rows.
                let op = b.get("op").and_then(Value::as_i64).unwrap_or(1);
                let all = b.get("all").and_then(Value::as_bool).unwrap_or(false);
                if op > 1 && !(op == 2 && all) {
                    self.columns.compares_outputs = true;
                }
                self.with_scope(b, |w| {
                    if let Some(into) = b.get("into_clause").and_then(Value::as_object) {
                        // SELECT INTO creates a table.
                        w.target(into, "rel", Ddl, false)?;
                    }
                    w.with_class(Select, |w| w.fields(b, &["with_clause", "into_clause"]))
                })
            }
            "InsertStmt" => {
                self.set_top(Insert);
                self.with_scope(b, |w| {
                    w.target(b, "relation", Insert, false)?;
                    if b.get("on_conflict_clause").is_some_and(|c| !c.is_null()) {
                        // ON CONFLICT DO UPDATE updates existing rows.
                        w.target(b, "relation", Update, false)?;
                    }
                    w.returning(b)?;
                    w.with_class(Select, |w| {
                        w.fields(b, &["with_clause", "relation", RET_CLAUSE, RET_LIST])
                    })
                })
            }
            "UpdateStmt" => {
                self.set_top(Update);
                self.with_scope(b, |w| {
                    let unfiltered = b.get("where_clause").is_none_or(Value::is_null);
                    w.target(b, "relation", Update, unfiltered)?;
                    w.returning(b)?;
                    w.with_class(Select, |w| {
                        w.fields(b, &["with_clause", "relation", RET_CLAUSE, RET_LIST])
                    })
                })
            }
            "DeleteStmt" => {
                self.set_top(Delete);
                self.with_scope(b, |w| {
                    let unfiltered = b.get("where_clause").is_none_or(Value::is_null);
                    w.target(b, "relation", Delete, unfiltered)?;
                    w.returning(b)?;
                    w.with_class(Select, |w| {
                        w.fields(b, &["with_clause", "relation", RET_CLAUSE, RET_LIST])
                    })
                })
            }
            "MergeStmt" => {
                self.set_top(Merge);
                self.with_scope(b, |w| {
                    w.target(b, "relation", Merge, false)?;
                    w.returning(b)?;
                    w.with_class(Select, |w| {
                        w.fields(b, &["with_clause", "relation", RET_CLAUSE, RET_LIST])
                    })
                })
            }
            "CopyStmt" => self.copy(b),
            "ExplainStmt" => self.explain(b),
            "DeclareCursorStmt" => {
                self.set_top(Select);
                self.with_class(Select, |w| w.field(b, "query"))
            }
            "FetchStmt" | "ClosePortalStmt" => {
                // The cursor's query was judged at DECLARE.
                self.set_top(Select);
                self.always(Select);
                if kind == "FetchStmt" {
                    self.effect = Some(Effect::Fetch(str_field(b, "portalname").to_owned()));
                }
                Ok(())
            }
            "PrepareStmt" => {
                let body = b.get("query").and_then(node_of);
                let class = body.map(|(k, _)| top_class_of(k)).unwrap_or(Select);
                self.set_top(class);
                self.effect = Some(Effect::Prepare(str_field(b, "name").to_owned()));
                self.field(b, "query")
            }
            "ExecuteStmt" => {
                self.set_top(Select);
                self.effect = Some(Effect::Execute(str_field(b, "name").to_owned()));
                self.with_class(Select, |w| w.field(b, "params"))
            }
            "DeallocateStmt" => {
                self.set_top(Session);
                let name = str_field(b, "name");
                self.effect = Some(Effect::Deallocate(
                    (!name.is_empty()).then(|| name.to_owned()),
                ));
                self.always(Session);
                Ok(())
            }
            "CreateTableAsStmt" => {
                self.set_top(Ddl);
                if let Some(into) = b.get("into").and_then(Value::as_object) {
                    self.target(into, "rel", Ddl, false)?;
                }
                self.with_class(Select, |w| w.field(b, "query"))
            }
            "ViewStmt" => {
                self.set_top(Ddl);
                self.target(b, "view", Ddl, false)?;
                // What the view reads is judged now: a view must not become a
                // window onto something its creator may not read.
                self.with_class(Select, |w| w.field(b, "query"))
            }

            // --- session and transaction ---
            "TransactionStmt" | "ConstraintsSetStmt" => {
                self.set_top(Transaction);
                self.always(Transaction);
                Ok(())
            }
            "VariableSetStmt" => self.set(b),
            "VariableShowStmt" => {
                self.set_top(Session);
                self.always(Session);
                Ok(())
            }
            "DiscardStmt" => {
                self.set_top(Session);
                // DISCARD ALL deallocates prepared statements; forgetting them
                // for the other forms only makes a later EXECUTE stricter.
                self.effect = Some(Effect::Deallocate(None));
                self.always(Session);
                Ok(())
            }
            "ListenStmt" | "UnlistenStmt" | "NotifyStmt" => {
                self.set_top(Session);
                self.class_only(Session);
                Ok(())
            }
            "AlterSystemStmt" => {
                self.set_top(Session);
                self.forbid(Session, "ALTER SYSTEM");
                Ok(())
            }
            "LoadStmt" => {
                self.set_top(Code);
                self.forbid(Code, "LOAD");
                Ok(())
            }
            "CreateSubscriptionStmt" | "AlterSubscriptionStmt" => {
                self.set_top(Ddl);
                self.forbid(Ddl, "subscriptions (they connect to other servers)");
                Ok(())
            }

            // --- code ---
            "DoStmt" => {
                self.set_top(Code);
                self.class_only(Code);
                Ok(())
            }
            "CallStmt" => {
                self.set_top(Code);
                self.class_only(Code);
                self.with_class(Select, |w| w.fields(b, &[]))
            }
            "CreateFunctionStmt" => {
                self.set_top(Ddl);
                self.class_only(Ddl);
                if let Some(name) = name_list(list(b, "funcname")).pop() {
                    self.effect = Some(Effect::DefinesFunction(name));
                }
                let language = list(b, "options").iter().find_map(|o| match node_of(o) {
                    Some(("DefElem", d)) if str_field(d, "defname") == "language" => d
                        .get("arg")
                        .and_then(node_of)
                        .map(|(_, s)| str_field(s, "sval").to_owned()),
                    _ => None,
                });
                match language.as_deref() {
                    None | Some("sql") | Some("plpgsql") => {}
                    Some(other) => self.forbid(
                        Ddl,
                        format!(
                            "functions in language {other} (untrusted code runs inside the server)"
                        ),
                    ),
                }
                // A BEGIN ATOMIC body is parsed: judge what it would do.
                self.with_class(Select, |w| w.fields(b, &["options"]))
            }

            // --- privileges ---
            "GrantStmt"
            | "GrantRoleStmt"
            | "AlterDefaultPrivilegesStmt"
            | "CreateRoleStmt"
            | "AlterRoleStmt"
            | "AlterRoleSetStmt"
            | "DropRoleStmt"
            | "ReassignOwnedStmt"
            | "DropOwnedStmt" => {
                self.set_top(Privilege);
                self.targets_or_statement(Privilege, |w| w.fields(b, &[]))
            }

            // --- maintenance ---
            "TruncateStmt" => {
                self.set_top(Truncate);
                self.targets_or_statement(Truncate, |w| w.fields(b, &[]))
            }
            "VacuumStmt" | "ClusterStmt" | "ReindexStmt" | "CheckPointStmt" | "LockStmt" => {
                self.set_top(Maintenance);
                self.targets_or_statement(Maintenance, |w| w.fields(b, &[]))
            }

            // DROP names its objects as name lists, not RangeVars.
            "DropStmt" => {
                self.set_top(Ddl);
                self.targets_or_statement(Ddl, |w| {
                    for o in list(b, "objects") {
                        if let Some(("List", l)) = node_of(o) {
                            let mut parts = name_list(list(l, "items"));
                            let name = parts.pop().unwrap_or_default();
                            let schema = parts.pop().unwrap_or_default();
                            let q = w.resolve(&schema, &name);
                            w.push(Ddl, Target::Relation(q), false, None);
                        }
                    }
                    w.fields(b, &["objects"])
                })
            }

            "DefineStmt" => {
                self.set_top(Ddl);
                if b.get("kind").and_then(Value::as_i64) == Some(OBJECT_OPERATOR) {
                    if let Some(name) = name_list(list(b, "defnames")).pop() {
                        self.effect = Some(Effect::DefinesOperator(name));
                    }
                }
                self.targets_or_statement(Ddl, |w| w.fields(b, &[]))
            }

            // COMMENT/SECURITY LABEL name their object as a name list too.
            "CommentStmt" | "SecLabelStmt" => {
                self.set_top(Ddl);
                let objtype = b.get("objtype").and_then(Value::as_i64).unwrap_or(0);
                self.targets_or_statement(Ddl, |w| {
                    if let Some(("List", l)) = b.get("object").and_then(node_of) {
                        let mut parts = name_list(list(l, "items"));
                        if objtype == OBJECT_COLUMN {
                            parts.pop();
                        }
                        if RELATION_OBJECT_TYPES.contains(&objtype) {
                            let name = parts.pop().unwrap_or_default();
                            let schema = parts.pop().unwrap_or_default();
                            let q = w.resolve(&schema, &name);
                            w.push(Ddl, Target::Relation(q), false, None);
                        }
                    }
                    w.fields(b, &["object"])
                })
            }

            // --- schema changes: every relation named is a DDL target ---
            k if DDL_STATEMENTS.contains(&k) => {
                self.set_top(Ddl);
                self.targets_or_statement(Ddl, |w| w.fields(b, &[]))
            }

            // --- expressions and clauses: walk their fields ---
            k if EXPRESSION_NODES.contains(&k) => self.fields(b, &[]),

            other => Err(AnalyzeError::NotUnderstood(format!("{other} nodes"))),
        }
    }

    /// RETURNING reads the target's rows: an UPDATE allowed on a table must
    /// not become a way to read columns a SELECT rule would refuse.
    /// Walks a write's RETURNING clause (pg_query has used both field names).
    fn returning(&mut self, b: &Map) -> Result<(), AnalyzeError> {
        let has_returning = match b.get("returning_clause") {
            Some(Value::Object(r)) => !list(r, "exprs").is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            _ => false,
        } || !list(b, "returning_list").is_empty();
        if has_returning {
            self.target(b, "relation", Class::Select, false)?;
        }
        // What RETURNING hands back is kept apart from what the statement
        // writes: masking treats the two differently.
        let outer = std::mem::take(&mut self.columns);
        let r = self.with_class(Class::Select, |w| {
            w.field(b, RET_CLAUSE)?;
            w.field(b, RET_LIST)
        });
        let returned = std::mem::replace(&mut self.columns, outer);
        self.returning.merge(returned);
        r
    }

    fn copy(&mut self, b: &Map) -> Result<(), AnalyzeError> {
        let is_from = b.get("is_from").and_then(Value::as_bool).unwrap_or(false);
        let class = if is_from {
            Class::CopyFrom
        } else {
            Class::CopyTo
        };
        self.set_top(class);
        let program = b
            .get("is_program")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if program || !str_field(b, "filename").is_empty() {
            self.forbid(class, "COPY to or from a program or server file");
        }
        self.target(b, "relation", class, false)?;
        if b.get("relation").is_some_and(|r| !r.is_null()) {
            let cols = name_list(list(b, "attlist"));
            if cols.is_empty() {
                self.columns.bare_star = true;
            }
            self.columns.names.extend(cols);
        }
        if let Some(q) = b.get("query").filter(|q| !q.is_null()) {
            // COPY (query) TO: the query's reads, plus COPY_TO on each.
            let start = self.accesses.len();
            self.with_class(Class::Select, |w| w.value(q))?;
            let copies: Vec<Access> = self.accesses[start..]
                .iter()
                .filter(|a| matches!(a.target, Target::Relation(_)))
                .map(|a| Access {
                    class: Some(Class::CopyTo),
                    ..a.clone()
                })
                .collect();
            self.accesses.extend(copies);
        }
        self.with_class(Class::Select, |w| w.fields(b, &["relation", "query"]))
    }

    fn explain(&mut self, b: &Map) -> Result<(), AnalyzeError> {
        self.set_top(Class::Explain);
        let analyze = list(b, "options").iter().any(|o| match node_of(o) {
            Some(("DefElem", d)) if str_field(d, "defname") == "analyze" => !is_false(d.get("arg")),
            _ => false,
        });
        let start = self.accesses.len();
        let top = self.top_class;
        self.field(b, "query")?;
        self.top_class = top;
        let inner: Vec<Access> = self.accesses.drain(start..).collect();
        for a in &inner {
            if let Target::Relation(_) = a.target {
                self.accesses.push(Access {
                    class: Some(Class::Explain),
                    unfiltered: false,
                    fixed: None,
                    ..a.clone()
                });
            }
        }
        // ANALYZE executes the statement: it needs everything the statement
        // itself needs. Without it nothing runs, but functions may still be
        // evaluated while planning, and built-in denials stay.
        for a in inner {
            if analyze || a.class.is_none() || matches!(a.fixed, Some(Fixed::Deny(_))) {
                self.accesses.push(a);
            }
        }
        Ok(())
    }

    fn set(&mut self, b: &Map) -> Result<(), AnalyzeError> {
        self.set_top(Class::Session);
        // VariableSetKind: 5 = RESET, 6 = RESET ALL. RESET returns a setting
        // to its session start value — which pgwarden pinned.
        let kind = b.get("kind").and_then(Value::as_i64).unwrap_or(0);
        let name = str_field(b, "name").to_ascii_lowercase();
        if kind == 5 || kind == 6 {
            self.always(Class::Session);
            return Ok(());
        }
        self.setting_change(&name);
        self.with_class(Class::Select, |w| w.fields(b, &[]))
    }

    /// A change of a server setting, by SET or set_config.
    fn setting_change(&mut self, name: &str) {
        let protected = catalog::PROTECTED_SETTINGS.contains(&name)
            || (self.settings.pin_statement_timeout && name == "statement_timeout");
        if protected {
            let what = match name {
                "role" => "SET ROLE".to_owned(),
                "statement_timeout" => "changing statement_timeout (pinned by the policy's limits.statementTimeout; change that limit instead)".to_owned(),
                "session_authorization" => "SET SESSION AUTHORIZATION".to_owned(),
                other => format!("changing {other}"),
            };
            self.forbid(Class::Session, what);
        } else if catalog::HARMLESS_SETTINGS
            .iter()
            .any(|g| crate::glob::glob_match(g, name))
        {
            self.always(Class::Session);
        } else {
            self.class_only(Class::Session);
        }
    }
}

/// The text of a string constant node (`'jit'`).
fn string_constant(v: &Value) -> Option<String> {
    match node_of(v) {
        Some(("AConst", c)) => {
            let sval = c.get("val")?.as_object()?.get("Sval")?.as_object()?;
            Some(str_field(sval, "sval").to_owned())
        }
        _ => None,
    }
}

/// The text of `'name'` or `'name'::regclass` (how sequences are named).
fn regclass_constant(v: &Value) -> Option<String> {
    if let Some(text) = string_constant(v) {
        return Some(text);
    }
    match node_of(v) {
        Some(("TypeCast", c)) => {
            let ty = c.get("type_name").and_then(Value::as_object)?;
            let names = name_list(list(ty, "names"));
            if names.last().map(String::as_str) != Some("regclass") {
                return None;
            }
            string_constant(c.get("arg")?)
        }
        _ => None,
    }
}

/// A relation name as regclass input reads it: `s.t`, `"S"."T"`, `t`;
/// unquoted parts fold to lower case. None when it is not one or two names.
pub(crate) fn parse_relation_name(text: &str) -> Option<(String, String)> {
    let mut parts = Vec::new();
    let mut chars = text.trim().chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    '"' => break,
                    c => part.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                if !(c.is_alphanumeric() || c == '_' || c == '$') {
                    return None;
                }
                part.push(c.to_ascii_lowercase());
                chars.next();
            }
        }
        if part.is_empty() {
            return None;
        }
        parts.push(part);
        match chars.next() {
            None => break,
            Some('.') => {}
            Some(_) => return None,
        }
    }
    match parts.len() {
        1 => Some((String::new(), parts.pop()?)),
        2 => {
            let name = parts.pop()?;
            Some((parts.pop()?, name))
        }
        _ => None,
    }
}

/// `EXPLAIN (ANALYZE false)` and friends.
fn is_false(arg: Option<&Value>) -> bool {
    match arg.and_then(node_of) {
        Some(("String", s)) => matches!(str_field(s, "sval"), "false" | "off" | "0" | "no"),
        Some(("Boolean", s)) => !s.get("boolval").and_then(Value::as_bool).unwrap_or(false),
        Some(("Integer", s)) => s.get("ival").and_then(Value::as_i64).unwrap_or(0) == 0,
        _ => false,
    }
}

fn top_class_of(kind: &str) -> Class {
    match kind {
        "InsertStmt" => Class::Insert,
        "UpdateStmt" => Class::Update,
        "DeleteStmt" => Class::Delete,
        "MergeStmt" => Class::Merge,
        _ => Class::Select,
    }
}

/// pg_query's ObjectType values for objects that are relations (or a column
/// of one).
const OBJECT_COLUMN: i64 = 7;
const OBJECT_OPERATOR: i64 = 26;
const RELATION_OBJECT_TYPES: &[i64] = &[OBJECT_COLUMN, 19, 21, 24, 38, 42, 52];

const DDL_STATEMENTS: &[&str] = &[
    "CreateStmt",
    "AlterTableStmt",
    "IndexStmt",
    "RenameStmt",
    "CreateSeqStmt",
    "AlterSeqStmt",
    "CreateSchemaStmt",
    "CreateTrigStmt",
    "RuleStmt",
    "CreateExtensionStmt",
    "AlterExtensionStmt",
    "AlterExtensionContentsStmt",
    "CreateDomainStmt",
    "AlterDomainStmt",
    "CompositeTypeStmt",
    "CreateEnumStmt",
    "AlterEnumStmt",
    "CreateRangeStmt",
    "CreatePolicyStmt",
    "AlterPolicyStmt",
    "AlterObjectSchemaStmt",
    "AlterObjectDependsStmt",
    "AlterOwnerStmt",
    "CreateCastStmt",
    "CreateOpClassStmt",
    "CreateOpFamilyStmt",
    "AlterOpFamilyStmt",
    "AlterFunctionStmt",
    "CreateStatsStmt",
    "AlterStatsStmt",
    "CreateEventTrigStmt",
    "AlterEventTrigStmt",
    "CreateFdwStmt",
    "AlterFdwStmt",
    "CreateForeignServerStmt",
    "AlterForeignServerStmt",
    "CreateUserMappingStmt",
    "AlterUserMappingStmt",
    "DropUserMappingStmt",
    "CreateForeignTableStmt",
    "ImportForeignSchemaStmt",
    "CreatePublicationStmt",
    "AlterPublicationStmt",
    "DropSubscriptionStmt",
    "CreateConversionStmt",
    "CreateTransformStmt",
    "CreatePlangStmt",
    "CreatedbStmt",
    "DropdbStmt",
    "AlterDatabaseStmt",
    "AlterDatabaseSetStmt",
    "AlterDatabaseRefreshCollStmt",
    "CreateTableSpaceStmt",
    "DropTableSpaceStmt",
    "AlterTableSpaceOptionsStmt",
    "AlterTableMoveAllStmt",
    "AlterTsdictionaryStmt",
    "AlterTsconfigurationStmt",
    "CreateAmStmt",
    "AlterCollationStmt",
    "AlterTypeStmt",
    "AlterOperatorStmt",
    "RefreshMatViewStmt",
    "ReplicaIdentityStmt",
];

/// Raw-parse-tree nodes below statement level. Walking their fields finds
/// every relation, function and sub-statement inside them.
const EXPRESSION_NODES: &[&str] = &[
    "Alias",
    "IntoClause",
    "ParamRef",
    "AExpr",
    "ColumnRef",
    "AConst",
    "TypeCast",
    "CollateClause",
    "RoleSpec",
    "AStar",
    "AIndices",
    "AIndirection",
    "AArrayExpr",
    "ResTarget",
    "MultiAssignRef",
    "SortBy",
    "WindowDef",
    "RangeSubselect",
    "RangeFunction",
    "RangeTableSample",
    "RangeTableFunc",
    "RangeTableFuncCol",
    "TypeName",
    "ColumnDef",
    "IndexElem",
    "StatsElem",
    "Constraint",
    "DefElem",
    "LockingClause",
    "XmlSerialize",
    "PartitionElem",
    "PartitionSpec",
    "PartitionBoundSpec",
    "PartitionRangeDatum",
    "PartitionCmd",
    "TableLikeClause",
    "FunctionParameter",
    "ObjectWithArgs",
    "AccessPriv",
    "CreateOpClassItem",
    "TriggerTransition",
    "JsonFormat",
    "JsonReturning",
    "JsonValueExpr",
    "JsonBehavior",
    "JsonOutput",
    "JsonArgument",
    "JsonFuncExpr",
    "JsonTablePathSpec",
    "JsonTable",
    "JsonTableColumn",
    "JsonKeyValue",
    "JsonParseExpr",
    "JsonScalarExpr",
    "JsonSerializeExpr",
    "JsonObjectConstructor",
    "JsonArrayConstructor",
    "JsonArrayQueryConstructor",
    "JsonAggConstructor",
    "JsonObjectAgg",
    "JsonArrayAgg",
    "JsonIsPredicate",
    "SubLink",
    "BoolExpr",
    "NullTest",
    "BooleanTest",
    "CaseExpr",
    "CaseWhen",
    "CoalesceExpr",
    "MinMaxExpr",
    "SqlvalueFunction",
    "XmlExpr",
    "RowExpr",
    "GroupingSet",
    "GroupingFunc",
    "SetToDefault",
    "CurrentOfExpr",
    "NamedArgExpr",
    "CommonTableExpr",
    "CtesearchClause",
    "CtecycleClause",
    "WithClause",
    "OnConflictClause",
    "InferClause",
    "MergeWhenClause",
    "ReturningClause",
    "ReturningOption",
    "String",
    "Integer",
    "Float",
    "Boolean",
    "BitString",
    "List",
    "IntList",
    "OidList",
    "VacuumRelation",
    "PublicationObjSpec",
    "PublicationTable",
    "RangeTblFunction",
    "JoinExpr",
    "ReplicaIdentityStmt",
    "ReturnStmt",
    "AlterTableCmd",
];

#[cfg(test)]
mod tests;
