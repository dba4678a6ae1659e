//! Sans-IO masking decisions:
//! - per statement (from the analyser's facts and the column map): does it
//!   read masked data, could a computed column derive from a masked value
//!   (*tainted*), or must it be refused;
//! - per RowDescription: what each result column gets;
//! - per DataRow: the rewritten row;
//! - per server error or notice: the scrubbed message.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use pgwarden_api::StatementClass as Class;

use super::columns::MaskMap;
use super::detect;
use super::rules::MaskRules;
use super::strategy::{self, Column, HashKey, Strategy};
use crate::policy::analyze::{ColumnFacts, Effect, Statement, Target};
use crate::wire::codec::{self, FieldInfo};

/// What masking does to one statement's results.
#[derive(Debug, Clone)]
pub struct StatementMask {
    pub map: Arc<MaskMap>,
    /// A computed result column could carry a masked value: such columns
    /// are masked whole.
    pub tainted: bool,
}

/// Masking context for a statement: None when it reads nothing masked.
pub type MaskCtx = Option<Arc<StatementMask>>;

/// A judged text's masking result, remembered (in the judgement's
/// `Derived` slot) for the column map it was computed with (held weakly: a
/// `Weak` keeps the map's allocation, so its address cannot be reused by a
/// newer map) and the user-code flag.
#[derive(Debug, Clone)]
struct Memo {
    map: std::sync::Weak<MaskMap>,
    user_code: bool,
    result: Result<MaskCtx, Refusal>,
}

/// The remembered result for this judgement, map and flag, or `compute`'s.
pub fn memoized(
    j: &crate::policy::Judgement,
    map: &Arc<MaskMap>,
    user_code: bool,
    compute: impl FnOnce() -> Result<MaskCtx, Refusal>,
) -> Result<MaskCtx, Refusal> {
    j.derived
        .get_or(
            |m: &Memo| m.user_code == user_code && std::ptr::eq(m.map.as_ptr(), Arc::as_ptr(map)),
            || Memo {
                map: Arc::downgrade(map),
                user_code,
                result: compute(),
            },
        )
        .result
}

/// A statement masking cannot make safe; the client gets this reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

fn is_catalog(q: &crate::policy::analyze::QualifiedName) -> bool {
    q.schema == "pg_catalog" || q.schema == "information_schema"
}

/// Decide for all statements of one query text. `user_code`: it calls
/// functions or operators that are not built in.
pub fn statement_mask(
    rules: &MaskRules,
    map: &Arc<MaskMap>,
    statements: &[Statement],
    user_code: bool,
) -> Result<MaskCtx, Refusal> {
    let mut reads = false;
    let mut tainted = user_code;
    for s in statements {
        // Relations whose rows could hold masked values: masked ones, and
        // ones created since the map was read.
        let mut risky: Vec<&crate::policy::analyze::QualifiedName> = Vec::new();
        for a in &s.accesses {
            if let Target::Relation(q) = &a.target {
                if is_catalog(q) {
                    continue;
                }
                let name = q.to_string();
                if map.is_masked_relation_name(&name) || !map.is_known_name(&name) {
                    risky.push(q);
                }
            }
        }
        reads |= !risky.is_empty();
        let source = computes_from_masked(rules, map, &s.columns, &risky);
        let returned = computes_from_masked(rules, map, &s.returning, &risky);
        let from_code = matches!(s.effect, Some(Effect::Execute(_) | Effect::Fetch(_)));
        tainted |= source || returned || from_code;

        for facts in [&s.columns, &s.returning] {
            if let Some(why) = predicate_leak(rules, facts, &risky) {
                return Err(Refusal(why));
            }
        }
        let has = |classes: &[Class]| {
            s.accesses
                .iter()
                .any(|a| a.class.is_some_and(|c| classes.contains(&c)))
        };
        if !rules.detectors().is_empty() && has(&[Class::CopyTo]) {
            return Err(Refusal(
                "COPY ... TO is refused while content detectors are on: its data is not scanned; SELECT instead".into(),
            ));
        }
        if source && has(&[Class::CopyTo]) {
            return Err(Refusal(
                "COPY ... TO would send masked columns unmasked; list only unmasked columns, or SELECT them (results are masked)".into(),
            ));
        }
        // Writes anywhere in the statement (writable CTEs, SELECT INTO too).
        if source && has(&[Class::Insert, Class::Update, Class::Merge, Class::Ddl]) {
            return Err(Refusal(
                "this statement writes while computing from masked columns, which could store their values unmasked".into(),
            ));
        }
        if let Some(q) = s.accesses.iter().find_map(|a| match &a.target {
            Target::Relation(q)
                if a.class == Some(Class::Ddl) && map.is_masked_relation_name(&q.to_string()) =>
            {
                Some(q)
            }
            _ => None,
        }) {
            return Err(Refusal(format!(
                "schema changes to {q}, which has masked columns, could unmask them; make them outside pgwarden"
            )));
        }
        if has(&[Class::Code]) && map.masked_column_count() > 0 {
            return Err(Refusal(
                "DO and CALL run code pgwarden cannot see into, which could read masked columns"
                    .into(),
            ));
        }
        if source || returned {
            let notify = s
                .accesses
                .iter()
                .any(|a| matches!(&a.target, Target::Function { name, .. } if name == "pg_notify"));
            if notify {
                return Err(Refusal(
                    "pg_notify with values computed from masked columns would send them unmasked"
                        .into(),
                ));
            }
        }
    }
    // Detectors scan every result, whatever it reads.
    let scan = !rules.detectors().is_empty();
    Ok((reads || tainted || scan).then(|| {
        Arc::new(StatementMask {
            map: map.clone(),
            tainted,
        })
    }))
}

/// `inPredicates: Deny`: a protected column's value may leave only as a
/// (masked) output column. Any other use — a filter, a sort, a join, an
/// expression, a function argument, an error that depends on it — lets a
/// client test the value without seeing it. Names are tainted through output
/// aliases, whole-row references and alias column lists; wholesale
/// comparisons of outputs (ORDER BY 2, DISTINCT, INTERSECT) count too.
fn predicate_leak(
    rules: &MaskRules,
    f: &ColumnFacts,
    risky: &[&crate::policy::analyze::QualifiedName],
) -> Option<String> {
    if !rules.denies_predicates() {
        return None;
    }
    let mut denied: HashSet<&str> = f
        .names
        .iter()
        .chain(&f.expression_names)
        .chain(&f.predicate_names)
        .map(String::as_str)
        .filter(|n| rules.denies_predicates_on(n))
        .collect();
    // Rows that hold a protected column: any risky relation, by name or alias.
    let mut rows: HashSet<&str> = risky.iter().map(|q| q.name.as_str()).collect();
    for (rel, alias, _) in &f.aliases {
        if risky.iter().any(|q| q.to_string() == *rel) {
            rows.insert(alias);
        }
    }
    let whole_rows = f
        .names
        .iter()
        .chain(&f.star_qualifiers)
        .any(|n| rows.contains(n.as_str()));
    let reads = !denied.is_empty() || whole_rows || (f.bare_star && !risky.is_empty());
    if !reads {
        return None;
    }
    if f.compares_outputs {
        return Some(
            "comparing output rows (ORDER BY or GROUP BY position, DISTINCT, UNION, INTERSECT, EXCEPT, NATURAL JOIN) of a statement that reads a column protected by inPredicates: Deny reveals its values".into(),
        );
    }
    // Whatever names a row source or renames columns may carry the value.
    denied.extend(rows.iter().copied());
    denied.extend(f.row_names.iter().map(String::as_str));
    denied.extend(f.renamed_columns.iter().map(String::as_str));
    loop {
        let before = denied.len();
        for (alias, sources) in &f.output_aliases {
            if sources.iter().any(|n| denied.contains(n.as_str())) {
                denied.insert(alias);
            }
        }
        if denied.len() == before {
            break;
        }
    }
    f.expression_names
        .iter()
        .chain(&f.predicate_names)
        .find(|n| denied.contains(n.as_str()))
        .map(|n| {
            format!(
                "using \"{n}\" in a filter, sort, join, grouping or expression reveals the values of a column protected by inPredicates: Deny (it may only be selected as a plain column)"
            )
        })
}

/// Whether these references could compute from a masked value.
fn computes_from_masked(
    rules: &MaskRules,
    map: &MaskMap,
    f: &ColumnFacts,
    risky: &[&crate::policy::analyze::QualifiedName],
) -> bool {
    if f.names
        .iter()
        .any(|n| rules.may_mask_column(n) || map.is_derived_column_name(n))
    {
        return true;
    }
    if risky.is_empty() {
        return false;
    }
    if f.bare_star {
        return true;
    }
    // Names that denote a whole row of a risky relation.
    let mut rows: HashSet<&str> = risky.iter().map(|q| q.name.as_str()).collect();
    for (rel, alias, renames) in &f.aliases {
        if risky.iter().any(|q| q.to_string() == *rel) {
            if *renames {
                return true; // `customers c(a, b, x)`: x may be a masked column
            }
            rows.insert(alias);
        }
    }
    f.names
        .iter()
        .chain(&f.star_qualifiers)
        .any(|n| rows.contains(n.as_str()))
}

/// What one result column gets.
#[derive(Debug, Clone)]
enum ColPlan {
    Pass,
    Mask(Strategy, Column),
    /// Content detectors run over its text.
    Scan,
}

/// Per result column: what to do with its values.
#[derive(Debug, Clone, Default)]
pub struct RowPlan {
    cols: Vec<ColPlan>,
    /// Some column is masked or scanned (else rows pass as their original bytes).
    any: bool,
    /// A column came from a relation the map does not know: refresh it.
    pub saw_unknown: bool,
}

impl RowPlan {
    /// `scan`: content detectors are on (text-like and json columns with no
    /// other mask are scanned).
    pub fn new(mask: &StatementMask, fields: &[FieldInfo], scan: bool) -> RowPlan {
        let map = &mask.map;
        let mut saw_unknown = false;
        let cols: Vec<ColPlan> = fields
            .iter()
            .map(|f| {
                let col = Column {
                    type_oid: f.type_oid,
                    binary: f.binary,
                };
                let s = if f.table_oid == 0 {
                    // Computed: withheld if it could derive from a masked value.
                    mask.tainted.then_some(Strategy::Whole)
                } else if !map.is_known(f.table_oid) {
                    saw_unknown = true;
                    Some(Strategy::Whole)
                } else if f.attnum <= 0 {
                    // A whole row (or system column) of a masked relation.
                    map.is_masked_relation(f.table_oid)
                        .then_some(Strategy::Whole)
                } else {
                    map.strategy((f.table_oid, f.attnum)).cloned()
                };
                match s {
                    Some(s) => ColPlan::Mask(s, col),
                    None if scan && scannable(col) => ColPlan::Scan,
                    None => ColPlan::Pass,
                }
            })
            .collect();
        RowPlan {
            any: cols.iter().any(|c| !matches!(c, ColPlan::Pass)),
            cols,
            saw_unknown,
        }
    }

    /// Write the client's version of a DataRow (the whole message).
    /// Err when the row does not match its description: the caller ends the
    /// session rather than guess.
    pub fn mask_row(
        &self,
        rules: &MaskRules,
        key: Option<&HashKey>,
        bytes: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), String> {
        let start = out.len();
        let result = self.write_row(rules, key, bytes, out);
        if result.is_err() {
            // Nothing of a row that failed half-way stays in the output.
            out.truncate(start);
        }
        result
    }

    fn write_row(
        &self,
        rules: &MaskRules,
        key: Option<&HashKey>,
        bytes: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), String> {
        if !self.any {
            out.extend_from_slice(bytes);
            return Ok(());
        }
        // Read the row once and write the client's version as we go: no
        // per-row allocation beyond the masked values themselves.
        let bad = |e: codec::DecodeError| format!("DataRow: {e}");
        let mut r = codec::Reader::new(&bytes[5..]);
        let n = r.i16().map_err(bad)?;
        if usize::try_from(n).ok() != Some(self.cols.len()) {
            return Err(format!(
                "DataRow has {n} columns, its RowDescription {}",
                self.cols.len()
            ));
        }
        let start = out.len();
        out.reserve(bytes.len() + 16);
        out.put_u8(b'D');
        out.put_i32(0); // length, patched below
        out.put_i16(n);
        for plan in &self.cols {
            let len = r.i32().map_err(bad)?;
            if len == -1 {
                out.put_i32(-1);
                continue;
            }
            // Any other negative length is malformed (as `codec::data_row`
            // says), not NULL.
            let n = usize::try_from(len)
                .map_err(|_| format!("DataRow: negative column length {len}"))?;
            let v = r.bytes(n).map_err(bad)?;
            let replaced = match plan {
                ColPlan::Pass => {
                    out.put_i32(len);
                    out.put_slice(v);
                    continue;
                }
                ColPlan::Mask(s, col) => strategy::mask(s, key, *col, v),
                ColPlan::Scan => scan_value(rules, key, v),
            };
            match replaced {
                Some(m) => {
                    out.put_i32(m.len() as i32);
                    out.put_slice(&m);
                }
                None => out.put_i32(-1),
            }
        }
        if let Err(e) = r.finish() {
            out.truncate(start);
            return Err(bad(e));
        }
        let total = (out.len() - start - 1) as i32;
        out[start + 1..start + 5].copy_from_slice(&total.to_be_bytes());
        Ok(())
    }
}

/// A scanned value: unchanged (as a copy) when nothing was found; NULL
/// when it cannot be read as text.
fn scan_value(rules: &MaskRules, key: Option<&HashKey>, v: &[u8]) -> Option<Vec<u8>> {
    match std::str::from_utf8(v) {
        Ok(text) => Some(match detect::scan(text, rules.detectors(), key) {
            Some(found) => found.into_bytes(),
            None => v.to_vec(),
        }),
        // Binary jsonb: a version byte, then the JSON text.
        Err(_) => match v.split_first() {
            Some((1, rest)) => {
                let text = std::str::from_utf8(rest).ok()?;
                Some(match detect::scan(text, rules.detectors(), key) {
                    Some(found) => [&[1u8][..], found.as_bytes()].concat(),
                    None => v.to_vec(),
                })
            }
            _ => None,
        },
    }
}

/// Values the detectors can read: text-like types and json/jsonb.
fn scannable(col: Column) -> bool {
    strategy::text_like(col.type_oid)
        || col.type_oid == strategy::oid::JSON
        || col.type_oid == strategy::oid::JSONB
}

/// A server error or notice raised while a statement that reads masked data
/// ran: it can quote a value (`invalid input syntax for type integer:
/// "4929..."`, a duplicate key's DETAIL, a RAISE). Keep severity, SQLSTATE
/// and position; replace the message; drop detail, hint, context, internal
/// query and the rest.
pub fn scrub(notice: bool, body: &[u8], out: &mut BytesMut) -> Result<(), String> {
    let fields = codec::notice_fields(body).map_err(|e| format!("ErrorResponse: {e}"))?;
    let get = |k: u8| fields.iter().find(|(c, _)| *c == k).map(|(_, v)| v.clone());
    let severity = get(b'V')
        .or_else(|| get(b'S'))
        .unwrap_or_else(|| "ERROR".into());
    let code = get(b'C').unwrap_or_else(|| "XX000".into());
    let mut kept = vec![
        (b'S', get(b'S').unwrap_or_else(|| severity.clone())),
        (b'V', severity),
        (b'C', code.clone()),
        (
            b'M',
            format!(
                "pgwarden: the server reported SQLSTATE {code}; its message is withheld because the statement reads masked columns"
            ),
        ),
    ];
    if let Some(p) = get(b'P') {
        kept.push((b'P', p));
    }
    codec::put_error_fields(notice, kept, out);
    Ok(())
}

#[cfg(test)]
mod tests;
