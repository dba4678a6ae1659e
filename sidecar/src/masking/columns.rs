//! The column map: which (relation OID, attribute number) pairs are masked
//! and how, built from catalog rows (`catalog.rs` fetches them). Sans-IO:
//! rows in, map out, so view lineage is tested without a server.
//!
//! Views: a view column that is a plain reference to a masked column gets
//! that column's strategy; one computed from a masked column (or from a
//! whole row) is masked whole; views over such views follow, to a fixpoint.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use serde_json::Value;

use super::rules::MaskRules;
use super::strategy::Strategy;

/// `(relation OID, attnum)`, as RowDescription reports a column's origin.
pub type ColumnId = (u32, i16);

/// How deep views over views are followed.
const MAX_VIEW_DEPTH: usize = 8;

#[derive(Debug)]
pub struct MaskMap {
    columns: HashMap<ColumnId, Strategy>,
    /// Relations (tables and views) with at least one masked column.
    masked_oids: HashSet<u32>,
    /// Their `schema.table` names.
    masked_names: HashSet<String>,
    /// Names of masked view columns: naming one computes from a masked value.
    derived_column_names: HashSet<String>,
    /// Every user relation that existed at load time, by OID and name.
    known_oids: HashSet<u32>,
    known_names: HashSet<String>,
    pub loaded_at: Instant,
}

impl MaskMap {
    pub fn strategy(&self, col: ColumnId) -> Option<&Strategy> {
        self.columns.get(&col)
    }

    pub fn is_masked_relation(&self, oid: u32) -> bool {
        self.masked_oids.contains(&oid)
    }

    pub fn is_masked_relation_name(&self, qualified: &str) -> bool {
        self.masked_names.contains(qualified)
    }

    pub fn is_known(&self, oid: u32) -> bool {
        self.known_oids.contains(&oid)
    }

    pub fn is_known_name(&self, qualified: &str) -> bool {
        self.known_names.contains(qualified)
    }

    pub fn is_derived_column_name(&self, name: &str) -> bool {
        self.derived_column_names.contains(name)
    }

    pub fn masked_column_count(&self) -> usize {
        self.columns.len()
    }
}

/// Builds a [`MaskMap`] from catalog rows, asking for view definitions as
/// lineage reaches them.
pub struct MapBuilder {
    relations: HashMap<u32, String>,
    columns: HashMap<ColumnId, Strategy>,
    names: HashMap<ColumnId, String>,
    /// view OID → the (relation, attnum) its rules read.
    deps: HashMap<u32, Vec<ColumnId>>,
    classified: HashSet<u32>,
    derived_names: HashSet<String>,
    rounds: usize,
}

/// A catalog row: text columns, NULL as None.
pub type Row = Vec<Option<String>>;

fn cell<T: std::str::FromStr>(row: &Row, i: usize) -> Option<T> {
    row.get(i)?.as_deref()?.parse().ok()
}

fn text(row: &Row, i: usize) -> Option<&str> {
    row.get(i)?.as_deref()
}

impl MapBuilder {
    /// `relations`: (oid, schema, name) of every user relation.
    /// `columns`: (relation oid, attnum, attname) of candidate columns.
    /// `deps`: (view oid, referenced relation oid, referenced attnum).
    /// `inherits`: (child oid, parent oid): partitions and inheritance
    /// children hold their parent's rows, so they get its masks by column
    /// name, whatever they are called.
    pub fn new(
        rules: &MaskRules,
        relations: &[Row],
        columns: &[Row],
        deps: &[Row],
        inherits: &[Row],
    ) -> Self {
        let relations: HashMap<u32, String> = relations
            .iter()
            .filter_map(|r| Some((cell(r, 0)?, format!("{}.{}", text(r, 1)?, text(r, 2)?))))
            .collect();
        let mut b = MapBuilder {
            relations,
            columns: HashMap::new(),
            names: HashMap::new(),
            deps: HashMap::new(),
            classified: HashSet::new(),
            derived_names: HashSet::new(),
            rounds: 0,
        };
        for r in columns {
            let (Some(oid), Some(attnum), Some(name)) =
                (cell::<u32>(r, 0), cell::<i16>(r, 1), text(r, 2))
            else {
                continue;
            };
            let Some(rel) = b.relations.get(&oid) else {
                continue;
            };
            let (schema, table) = rel.split_once('.').unwrap_or(("", rel));
            if let Some(s) = rules.strategy_for(schema, table, name) {
                b.columns.insert((oid, attnum), s.clone());
                b.names.insert((oid, attnum), name.to_owned());
            }
        }
        b.inherit(columns, inherits);
        for r in deps {
            if let (Some(view), Some(rel), Some(att)) =
                (cell::<u32>(r, 0), cell::<u32>(r, 1), cell::<i16>(r, 2))
            {
                b.deps.entry(view).or_default().push((rel, att));
            }
        }
        b
    }

    /// Copy masks from parents to children (partitions of partitions too).
    fn inherit(&mut self, columns: &[Row], inherits: &[Row]) {
        let edges: Vec<(u32, u32)> = inherits
            .iter()
            .filter_map(|r| Some((cell(r, 0)?, cell(r, 1)?)))
            .collect();
        let by_name: HashMap<(u32, &str), i16> = columns
            .iter()
            .filter_map(|r| Some(((cell(r, 0)?, text(r, 2)?), cell(r, 1)?)))
            .collect();
        for _ in 0..MAX_VIEW_DEPTH {
            let mut added = Vec::new();
            for &(child, parent) in &edges {
                for (&(oid, att), name) in &self.names {
                    if oid != parent {
                        continue;
                    }
                    let Some(&child_att) = by_name.get(&(child, name.as_str())) else {
                        continue;
                    };
                    if !self.columns.contains_key(&(child, child_att)) {
                        added.push((
                            (child, child_att),
                            self.columns[&(oid, att)].clone(),
                            name.clone(),
                        ));
                    }
                }
            }
            if added.is_empty() {
                break;
            }
            for (id, s, name) in added {
                self.columns.insert(id, s);
                self.names.insert(id, name);
            }
        }
    }

    /// Views not yet classified that read a masked column: their
    /// definitions are needed next. Empty when lineage is complete.
    pub fn views_to_classify(&mut self) -> Vec<u32> {
        if self.rounds >= MAX_VIEW_DEPTH {
            return Vec::new();
        }
        self.rounds += 1;
        let mut out: Vec<u32> = self
            .deps
            .iter()
            .filter(|(v, refs)| {
                !self.classified.contains(v) && refs.iter().any(|c| self.columns.contains_key(c))
            })
            .map(|(v, _)| *v)
            .collect();
        out.sort_unstable();
        out
    }

    /// Classify views from `columns` rows (view oid, attnum, attname) and
    /// `defs` rows (view oid, pg_get_viewdef text).
    pub fn add_views(&mut self, columns: &[Row], defs: &[Row]) {
        let defs: HashMap<u32, &str> = defs
            .iter()
            .filter_map(|r| Some((cell(r, 0)?, text(r, 1)?)))
            .collect();
        let mut view_cols: HashMap<u32, Vec<(i16, String)>> = HashMap::new();
        for r in columns {
            if let (Some(v), Some(att), Some(name)) =
                (cell::<u32>(r, 0), cell::<i16>(r, 1), text(r, 2))
            {
                view_cols.entry(v).or_default().push((att, name.to_owned()));
            }
        }
        let mut ids: Vec<u32> = view_cols.keys().copied().collect();
        ids.sort_unstable();
        for view in ids {
            let mut cols = view_cols.remove(&view).unwrap_or_default();
            cols.sort();
            self.classified.insert(view);
            // The masked columns this view reads, by name.
            let mut read: HashMap<&str, &Strategy> = HashMap::new();
            for c in self.deps.get(&view).into_iter().flatten() {
                if let (Some(s), Some(n)) = (self.columns.get(c), self.names.get(c)) {
                    read.entry(n.as_str()).or_insert(s);
                }
            }
            let lineage = defs
                .get(&view)
                .and_then(|d| classify_view(d, &read))
                .filter(|l| l.len() == cols.len());
            let mut found = Vec::new();
            for (i, (att, name)) in cols.iter().enumerate() {
                // No usable definition: every column is withheld.
                let s = match &lineage {
                    Some(l) => l[i].clone(),
                    None => Some(Strategy::Whole),
                };
                if let Some(s) = s {
                    found.push(((view, *att), s, name.clone()));
                }
            }
            for (id, s, name) in found {
                self.derived_names.insert(name.clone());
                self.columns.insert(id, s);
                self.names.insert(id, name);
            }
        }
    }

    pub fn finish(self) -> MaskMap {
        let masked_oids: HashSet<u32> = self.columns.keys().map(|(oid, _)| *oid).collect();
        let masked_names = masked_oids
            .iter()
            .filter_map(|o| self.relations.get(o).cloned())
            .collect();
        MaskMap {
            columns: self.columns,
            masked_oids,
            masked_names,
            derived_column_names: self.derived_names,
            known_oids: self.relations.keys().copied().collect(),
            known_names: self.relations.into_values().collect(),
            loaded_at: Instant::now(),
        }
    }
}

/// Per output column of a view definition: the strategy of the masked
/// column it passes through, `Whole` if it computes from one (or from a
/// whole row, or anything this cannot see through), None if it reads no
/// masked column. None overall when the definition is not a plain SELECT.
fn classify_view(def: &str, read: &HashMap<&str, &Strategy>) -> Option<Vec<Option<Strategy>>> {
    let parsed = pg_query::parse(def, 0).ok()?;
    let tree = serde_json::to_value(&parsed.protobuf).ok()?;
    let select = tree
        .pointer("/stmts/0/stmt/node/SelectStmt")
        .and_then(Value::as_object)?;
    let targets = select.get("target_list").and_then(Value::as_array)?;
    // Names that denote a whole row in this definition: its relations and aliases.
    let mut row_names = HashSet::new();
    collect_relation_names(&tree, &mut row_names);
    let mut out = Vec::with_capacity(targets.len());
    for t in targets {
        let val = t.pointer("/node/ResTarget/val")?;
        if let Some(name) = plain_column(val) {
            if let Some(s) = read.get(name.as_str()) {
                out.push(Some((*s).clone()));
                continue;
            }
        }
        let mut refs = Refs::default();
        scan_refs(val, &mut refs);
        let tainted = refs.star
            || refs
                .names
                .iter()
                .any(|n| read.contains_key(n.as_str()) || row_names.contains(n));
        out.push(tainted.then_some(Strategy::Whole));
    }
    Some(out)
}

/// `col` or `t.col`: the column name.
fn plain_column(val: &Value) -> Option<String> {
    let fields = val.pointer("/node/ColumnRef/fields")?.as_array()?;
    let last = fields.last()?.pointer("/node/String/sval")?.as_str()?;
    Some(last.to_owned())
}

#[derive(Default)]
struct Refs {
    names: Vec<String>,
    star: bool,
}

fn scan_refs(v: &Value, refs: &mut Refs) {
    match v {
        Value::Object(m) => {
            if let Some(cr) = m.get("ColumnRef") {
                let fields: Vec<&Value> = cr
                    .get("fields")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .collect();
                let names: Vec<&str> = fields
                    .iter()
                    .filter_map(|f| f.pointer("/node/String/sval").and_then(Value::as_str))
                    .collect();
                if fields
                    .last()
                    .is_some_and(|f| f.pointer("/node/AStar").is_some())
                {
                    // `x.*` is a whole row of x; a bare `*` is every column.
                    match names.last() {
                        Some(q) => refs.names.push((*q).to_owned()),
                        None => refs.star = true,
                    }
                } else if let Some(last) = names.last() {
                    // `t.col` names col; a bare `c` may be a whole row.
                    refs.names.push((*last).to_owned());
                }
            }
            if let Some(ind) = m.get("AIndirection") {
                for i in ind
                    .get("indirection")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(s) = i.pointer("/node/String/sval").and_then(Value::as_str) {
                        refs.names.push(s.to_owned());
                    }
                }
            }
            for child in m.values() {
                scan_refs(child, refs);
            }
        }
        Value::Array(a) => a.iter().for_each(|c| scan_refs(c, refs)),
        _ => {}
    }
}

fn collect_relation_names(v: &Value, out: &mut HashSet<String>) {
    match v {
        Value::Object(m) => {
            if let Some(rel) = m.get("relname").and_then(Value::as_str) {
                out.insert(rel.to_owned());
            }
            if let Some(alias) = m.get("aliasname").and_then(Value::as_str) {
                out.insert(alias.to_owned());
            }
            for child in m.values() {
                collect_relation_names(child, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|c| collect_relation_names(c, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwarden_api::{MaskStrategy, MaskingRule};

    fn row(cells: &[&str]) -> Row {
        cells.iter().map(|c| Some(c.to_string())).collect()
    }

    fn rules() -> MaskRules {
        MaskRules::new(&[MaskingRule {
            columns: vec!["public.customers.card_number".into()],
            strategy: MaskStrategy::Partial,
            keep_first: None,
            keep_last: Some(4),
            detect: vec![],
            in_predicates: None,
        }])
    }

    #[test]
    fn base_columns_and_views_over_them() {
        let rules = rules();
        let rels = [
            row(&["100", "public", "customers"]),
            row(&["200", "public", "v_cards"]),
            row(&["300", "public", "v_over_v"]),
            row(&["400", "public", "orders"]),
        ];
        let cols = [
            row(&["100", "3", "card_number"]),
            row(&["400", "3", "card_number"]),
        ];
        let deps = [
            row(&["200", "100", "1"]),
            row(&["200", "100", "3"]),
            row(&["300", "200", "2"]),
        ];
        let mut b = MapBuilder::new(&rules, &rels, &cols, &deps, &[]);
        // orders.card_number is not public.customers.card_number.
        assert_eq!(b.views_to_classify(), vec![200]);
        b.add_views(
            &[row(&["200", "1", "id"]), row(&["200", "2", "cc"]), row(&["200", "3", "shout"])],
            &[row(&[
                "200",
                " SELECT c.id, c.card_number AS cc, upper(c.card_number) AS shout FROM customers c;",
            ])],
        );
        assert_eq!(b.views_to_classify(), vec![300]);
        b.add_views(
            &[row(&["300", "1", "x"]), row(&["300", "2", "j"])],
            &[row(&[
                "300",
                " SELECT v.cc AS x, to_jsonb(v.*) AS j FROM v_cards v;",
            ])],
        );
        assert!(b.views_to_classify().is_empty());
        let m = b.finish();
        let partial = Strategy::Partial { first: 0, last: 4 };
        assert_eq!(m.strategy((100, 3)), Some(&partial));
        assert_eq!(m.strategy((400, 3)), None);
        assert_eq!(m.strategy((200, 1)), None);
        assert_eq!(m.strategy((200, 2)), Some(&partial));
        assert_eq!(m.strategy((200, 3)), Some(&Strategy::Whole));
        // Through a second view: `cc` passes through, a whole row is withheld.
        assert_eq!(m.strategy((300, 1)), Some(&partial));
        assert_eq!(m.strategy((300, 2)), Some(&Strategy::Whole));
        assert!(m.is_masked_relation_name("public.v_over_v"));
        assert!(m.is_derived_column_name("shout"));
        assert!(m.is_known(400) && !m.is_known(999));
    }

    #[test]
    fn partitions_and_children_inherit_their_parents_masks() {
        let rules = rules();
        let rels = [
            row(&["100", "public", "customers"]),
            row(&["110", "public", "customers_2024"]),
            row(&["111", "archive", "customers_2024_q1"]),
        ];
        // Column numbers differ in children (dropped columns, other order).
        let cols = [
            row(&["100", "3", "card_number"]),
            row(&["110", "5", "card_number"]),
            row(&["111", "2", "card_number"]),
        ];
        let inherits = [row(&["110", "100"]), row(&["111", "110"])];
        let m = MapBuilder::new(&rules, &rels, &cols, &[], &inherits).finish();
        let partial = Strategy::Partial { first: 0, last: 4 };
        assert_eq!(m.strategy((110, 5)), Some(&partial));
        assert_eq!(m.strategy((111, 2)), Some(&partial));
        assert!(m.is_masked_relation_name("archive.customers_2024_q1"));
    }

    #[test]
    fn views_that_cannot_be_read_are_withheld_whole() {
        let rules = rules();
        let rels = [
            row(&["100", "public", "customers"]),
            row(&["200", "public", "u"]),
        ];
        let cols = [row(&["100", "3", "card_number"])];
        let deps = [row(&["200", "100", "3"])];
        let mut b = MapBuilder::new(&rules, &rels, &cols, &deps, &[]);
        assert_eq!(b.views_to_classify(), vec![200]);
        // A set operation: lineage per column is not attempted.
        b.add_views(
            &[row(&["200", "1", "n"])],
            &[row(&[
                "200",
                " SELECT card_number FROM customers UNION SELECT 'x'",
            ])],
        );
        let m = b.finish();
        assert_eq!(m.strategy((200, 1)), Some(&Strategy::Whole));
    }
}
