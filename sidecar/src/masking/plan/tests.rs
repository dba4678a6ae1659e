//! Statement-level masking decisions against a small column map:
//! `public.customers(id, name, card_number, email)` with card_number and
//! email masked, a view over it, and `public.orders` unmasked.

use super::*;
use crate::masking::columns::{MapBuilder, Row};
use crate::policy::analyze::{analyze, Settings};
use pgwarden_api::{MaskStrategy, MaskingRule};

const CUSTOMERS: u32 = 100;
const ORDERS: u32 = 200;
const VIEW: u32 = 300;

fn row(cells: &[&str]) -> Row {
    cells.iter().map(|c| Some(c.to_string())).collect()
}

fn rules() -> MaskRules {
    MaskRules::new(&[
        MaskingRule {
            columns: vec!["public.customers.card_number".into()],
            strategy: MaskStrategy::Partial,
            keep_first: None,
            keep_last: Some(4),
            detect: vec![],
            in_predicates: None,
        },
        MaskingRule {
            columns: vec!["public.customers.email".into()],
            strategy: MaskStrategy::Email,
            keep_first: None,
            keep_last: None,
            detect: vec![],
            in_predicates: None,
        },
    ])
}

fn map() -> Arc<MaskMap> {
    let rules = rules();
    let rels = [
        row(&["100", "public", "customers"]),
        row(&["200", "public", "orders"]),
        row(&["300", "public", "customer_cards"]),
    ];
    let cols = [
        row(&["100", "3", "card_number"]),
        row(&["100", "4", "email"]),
    ];
    let deps = [row(&["300", "100", "3"])];
    let mut b = MapBuilder::new(&rules, &rels, &cols, &deps, &[]);
    assert_eq!(b.views_to_classify(), vec![VIEW]);
    b.add_views(
        &[row(&["300", "1", "digits"])],
        &[row(&[
            "300",
            "SELECT c.card_number AS digits FROM customers c",
        ])],
    );
    Arc::new(b.finish())
}

fn decide(sql: &str) -> Result<MaskCtx, Refusal> {
    let stmts = analyze(sql, Settings::default()).unwrap();
    statement_mask(&rules(), &map(), &stmts, false)
}

fn tainted(sql: &str) -> bool {
    decide(sql)
        .unwrap_or_else(|r| panic!("{sql}: refused: {}", r.0))
        .is_some_and(|m| m.tainted)
}

fn active(sql: &str) -> bool {
    decide(sql).unwrap().is_some()
}

#[test]
fn plain_reads_are_masked_by_column_identity_not_tainted() {
    for sql in [
        "SELECT * FROM orders",
        "SELECT id, name FROM customers",
        "SELECT count(*) FROM customers",
        "SELECT upper(name) FROM customers c",
        "SELECT name AS card_number FROM customers",
    ] {
        assert!(!tainted(sql), "{sql}");
    }
    assert!(!active("SELECT * FROM orders"));
    assert!(!active("SELECT 1"));
    assert!(active("SELECT id FROM customers"));
    assert!(active("SELECT digits FROM customer_cards"));
    // Relations created after the map was read could hold anything.
    assert!(active("SELECT x FROM brand_new_table"));
}

#[test]
fn computations_over_masked_values_are_tainted() {
    for sql in [
        "SELECT upper(card_number) FROM customers",
        "SELECT card_number || '' FROM customers",
        "SELECT c.card_number::int FROM customers c",
        "SELECT to_jsonb(c) FROM customers c",
        "SELECT row_to_json(customers) FROM customers",
        "SELECT json_agg(c.*) FROM customers c",
        "SELECT (c).email FROM customers c",
        "SELECT x FROM customers AS c(a, b, x)",
        "SELECT upper(x) FROM (SELECT * FROM customers) s(a, b, x)",
        "WITH t AS (SELECT card_number FROM customers) SELECT lower(card_number) FROM t",
        "SELECT card_number FROM customers UNION SELECT 'x'",
        "SELECT string_agg(email, ',') FROM customers",
        "SELECT (SELECT max(card_number) FROM customers)",
        "SELECT upper(digits) FROM customer_cards",
        "SELECT *, 1 FROM customers",
        "EXECUTE p",
        "FETCH ALL FROM c",
    ] {
        assert!(tainted(sql), "{sql}");
    }
}

#[test]
fn returning_is_masked_not_refused() {
    assert!(tainted(
        "INSERT INTO customers (name, card_number) VALUES ('a', '4111') RETURNING *"
    ));
    assert!(!tainted(
        "UPDATE customers SET name = 'b' WHERE id = 1 RETURNING id, name"
    ));
}

#[test]
fn what_masking_cannot_make_safe_is_refused() {
    for sql in [
        "COPY customers TO STDOUT",
        "COPY customers (id, card_number) TO STDOUT",
        "COPY (SELECT upper(card_number) FROM customers) TO STDOUT",
        "INSERT INTO orders (note) SELECT card_number FROM customers",
        "UPDATE orders SET note = (SELECT email FROM customers LIMIT 1)",
        "CREATE TABLE leak AS SELECT * FROM customers",
        "SELECT * INTO leak FROM customers",
        "CREATE VIEW v AS SELECT card_number FROM customers",
        "WITH w AS (INSERT INTO orders (note) SELECT email FROM customers RETURNING 1) SELECT 1",
        "ALTER TABLE customers RENAME COLUMN card_number TO cc",
        "DROP TABLE customers",
        "DO $$ BEGIN PERFORM 1; END $$",
        "SELECT pg_notify('c', card_number) FROM customers",
    ] {
        assert!(decide(sql).is_err(), "{sql} should be refused");
    }
    // ... but what does not touch masked values is fine.
    for sql in [
        "COPY customers (id, name) TO STDOUT",
        "COPY orders TO STDOUT",
        "INSERT INTO orders (note) SELECT name FROM customers",
        "ALTER TABLE orders ADD COLUMN note2 text",
        "UPDATE customers SET card_number = '4111111111111111' WHERE id = 1",
    ] {
        assert!(decide(sql).is_ok(), "{sql} should be allowed");
    }
}

fn field(table_oid: u32, attnum: i16, type_oid: u32) -> FieldInfo {
    FieldInfo {
        table_oid,
        attnum,
        type_oid,
        binary: false,
    }
}

#[test]
fn row_plans_follow_column_origins() {
    let mask = StatementMask {
        map: map(),
        tainted: false,
    };
    let text = strategy::oid::TEXT;
    let plan = RowPlan::new(
        &mask,
        &[
            field(CUSTOMERS, 2, text),
            field(CUSTOMERS, 3, text),
            field(0, 0, 20),
            field(ORDERS, 3, text),
            field(VIEW, 1, text),
            field(CUSTOMERS, 0, 2249),
        ],
        false,
    );
    let mut bytes = BytesMut::new();
    let vals: Vec<Option<&[u8]>> = vec![
        Some(b"Ann"),
        Some(b"4929123456781234"),
        Some(b"7"),
        Some(b"note"),
        Some(b"4929123456781234"),
        Some(b"(1,Ann,4929123456781234,ann@example.com)"),
    ];
    codec::put_data_row(vals.iter().copied(), &mut bytes);
    let mut out = BytesMut::new();
    plan.mask_row(&rules(), None, &bytes, &mut out).unwrap();
    let got = codec::data_row(&out[5..]).unwrap();
    assert_eq!(got[0], Some(&b"Ann"[..]));
    assert_eq!(got[1], Some(&b"************1234"[..]));
    // Untainted: a computed column passes.
    assert_eq!(got[2], Some(&b"7"[..]));
    assert_eq!(got[3], Some(&b"note"[..]));
    assert_eq!(got[4], Some(&b"************1234"[..]));
    // A whole row of a masked table (type record) is withheld.
    assert_eq!(got[5], None);
    assert!(!plan.saw_unknown);

    let tainted = StatementMask {
        map: map(),
        tainted: true,
    };
    let plan = RowPlan::new(&tainted, &[field(0, 0, text), field(999, 1, text)], false);
    assert!(plan.saw_unknown);
    let mut bytes = BytesMut::new();
    codec::put_data_row(
        [Some(&b"4929"[..]), Some(&b"x"[..])].into_iter(),
        &mut bytes,
    );
    let mut out = BytesMut::new();
    plan.mask_row(&rules(), None, &bytes, &mut out).unwrap();
    let got = codec::data_row(&out[5..]).unwrap();
    assert_eq!(got, vec![Some(&b"****"[..]), Some(&b"****"[..])]);
    // A row that does not match its description is an error, not a guess.
    let mut short = BytesMut::new();
    codec::put_data_row([Some(&b"x"[..])].into_iter(), &mut short);
    assert!(plan
        .mask_row(&rules(), None, &short, &mut BytesMut::new())
        .is_err());
}

#[test]
fn scrubbed_errors_keep_the_sqlstate_and_drop_the_value() {
    let mut raw = BytesMut::new();
    codec::put_error_fields(
        false,
        vec![
            (b'S', "ERROR".into()),
            (b'V', "ERROR".into()),
            (b'C', "22P02".into()),
            (
                b'M',
                "invalid input syntax for type integer: \"4929123456781234\"".into(),
            ),
            (
                b'D',
                "Key (card_number)=(4929123456781234) already exists.".into(),
            ),
            (b'W', "SQL function \"f\" statement 1".into()),
        ],
        &mut raw,
    );
    let mut out = BytesMut::new();
    scrub(false, &raw[5..], &mut out).unwrap();
    let fields = codec::notice_fields(&out[5..]).unwrap();
    let text: String = fields.iter().map(|(_, v)| v.as_str()).collect();
    assert!(!text.contains("4929"), "{text}");
    assert!(fields.contains(&(b'C', "22P02".to_string())));
    assert!(fields.iter().all(|(k, _)| *k != b'D' && *k != b'W'));
}

#[test]
fn predicates_on_deny_columns_are_refused() {
    let rules = MaskRules::new(&[MaskingRule {
        columns: vec!["public.customers.card_number".into()],
        strategy: MaskStrategy::Redact,
        keep_first: None,
        keep_last: None,
        detect: vec![],
        in_predicates: Some(pgwarden_api::PredicateUse::Deny),
    }]);
    let decide = |sql: &str| {
        let stmts = analyze(sql, Settings::default()).unwrap();
        statement_mask(&rules, &map(), &stmts, false)
    };
    for sql in [
        "SELECT id FROM customers WHERE card_number LIKE '4929%'",
        "SELECT id FROM customers ORDER BY card_number",
        "SELECT count(*) FROM customers GROUP BY card_number",
        "SELECT o.id FROM orders o JOIN customers c ON c.card_number = o.note",
        "SELECT id FROM orders JOIN customers USING (card_number)",
        "SELECT DISTINCT ON (card_number) id FROM customers",
        "DELETE FROM customers WHERE card_number = '4111'",
        "SELECT id FROM customers WHERE id IN (SELECT id FROM customers WHERE card_number > '5')",
    ] {
        let r = decide(sql);
        assert!(
            r.as_ref().is_err_and(|e| e.0.contains("inPredicates")),
            "{sql}: {r:?}"
        );
    }
    for sql in [
        "SELECT card_number FROM customers WHERE id = 1",
        "SELECT id FROM customers ORDER BY name",
    ] {
        assert!(decide(sql).is_ok(), "{sql}");
    }
}

#[test]
fn detectors_make_every_result_scanned_and_refuse_copy_out() {
    let rules = MaskRules::new(&[MaskingRule {
        columns: vec![],
        strategy: MaskStrategy::Partial,
        keep_first: None,
        keep_last: Some(4),
        detect: vec![pgwarden_api::Detector::CreditCard],
        in_predicates: None,
    }]);
    let stmts = analyze("SELECT note FROM orders", Settings::default()).unwrap();
    let ctx = statement_mask(&rules, &map(), &stmts, false)
        .unwrap()
        .unwrap();
    let plan = RowPlan::new(&ctx, &[field(ORDERS, 3, strategy::oid::TEXT)], true);
    let mut bytes = BytesMut::new();
    codec::put_data_row(
        [Some(&b"paid with 4929 1234 5678 1236, thanks"[..])].into_iter(),
        &mut bytes,
    );
    let mut out = BytesMut::new();
    plan.mask_row(&rules, None, &bytes, &mut out).unwrap();
    let got = codec::data_row(&out[5..]).unwrap();
    assert_eq!(got[0], Some(&b"paid with ***************1236, thanks"[..]));
    let stmts = analyze("COPY orders TO STDOUT", Settings::default()).unwrap();
    assert!(statement_mask(&rules, &map(), &stmts, false).is_err());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
    /// A DataRow from the server is hostile too: any bytes give a masked row
    /// or an error, never a panic and never the input passed through.
    #[test]
    fn hostile_rows_never_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
        let mask = StatementMask { map: map(), tainted: true };
        let plan = RowPlan::new(
            &mask,
            &[field(CUSTOMERS, 3, strategy::oid::TEXT), field(0, 0, strategy::oid::JSONB)],
            true,
        );
        let mut bytes = BytesMut::new();
        bytes.put_u8(b'D');
        bytes.put_i32(4 + body.len() as i32);
        bytes.put_slice(&body);
        let mut out = BytesMut::new();
        if plan.mask_row(&rules(), None, &bytes, &mut out).is_ok() {
            let cols = codec::data_row(&out[5..]).unwrap();
            proptest::prop_assert_eq!(cols.len(), 2);
        } else {
            proptest::prop_assert!(out.is_empty());
        }
    }
}

#[test]
fn a_memo_answers_for_the_map_it_was_computed_with_only() {
    let j = crate::policy::Judgement {
        statements: Vec::new(),
        outcome: Err(crate::policy::analyze::AnalyzeError::NotUnderstood(
            "test".into(),
        )),
        derived: Default::default(),
    };
    let (a, b) = (map(), map());
    let calls = std::cell::Cell::new(0);
    let compute = || {
        calls.set(calls.get() + 1);
        Ok(None)
    };
    assert!(memoized(&j, &a, false, compute).is_ok());
    assert!(memoized(&j, &a, false, compute).is_ok());
    assert_eq!(calls.get(), 1, "same map and flag: remembered");
    memoized(&j, &a, true, compute).unwrap();
    assert_eq!(calls.get(), 2, "user code appeared: computed again");
    memoized(&j, &b, true, compute).unwrap();
    assert_eq!(calls.get(), 3, "a new column map: computed again");
}

/// inPredicates: Deny holds through every way of naming or comparing the value
/// (the ways PostgreSQL lets a query test a value it never outputs).
#[test]
fn predicate_denial_follows_aliases_positions_and_oracles() {
    let rules = MaskRules::new(&[MaskingRule {
        columns: vec!["public.customers.card_number".into()],
        strategy: MaskStrategy::Partial,
        keep_first: None,
        keep_last: Some(4),
        detect: vec![],
        in_predicates: Some(pgwarden_api::PredicateUse::Deny),
    }]);
    let decide = |sql: &str| {
        let stmts = analyze(sql, Settings::default()).unwrap();
        statement_mask(&rules, &map(), &stmts, false)
    };
    for sql in [
        // an alias of the value, filtered or sorted outside
        "SELECT s.id FROM (SELECT id, card_number AS x FROM customers) s WHERE x LIKE '4929%'",
        "SELECT id, card_number AS x FROM customers ORDER BY x",
        "SELECT s.id FROM customers c, LATERAL (SELECT c.card_number AS x) s WHERE s.x LIKE '4%'",
        "WITH w(a, b) AS (SELECT id, card_number FROM customers) SELECT a FROM w WHERE b LIKE '4%'",
        "SELECT a FROM (SELECT id, card_number FROM customers) s(a, b) WHERE b LIKE '4%'",
        // positions and wholesale comparisons
        "SELECT id, card_number FROM customers ORDER BY 2",
        "SELECT card_number, count(*) FROM customers GROUP BY 1",
        "SELECT * FROM customers ORDER BY 4",
        "SELECT DISTINCT card_number FROM customers",
        "SELECT card_number FROM customers INTERSECT SELECT '4929123456781234'",
        "SELECT card_number FROM customers EXCEPT SELECT '4929123456781234'",
        "SELECT * FROM customers NATURAL JOIN (SELECT '4929123456781234' AS card_number) t",
        // error and value oracles outside any WHERE
        "SELECT CASE WHEN card_number LIKE '4%' THEN 1/(id-id) ELSE 1 END FROM customers",
        "SELECT id FROM customers LIMIT CASE WHEN (SELECT card_number FROM customers WHERE id = 1) LIKE '4%' THEN 1 ELSE 0 END",
        "SELECT 1/(position('4' in card_number) - 1) FROM customers",
        "SELECT length(card_number) FROM customers",
        // whole rows and casts
        "SELECT id FROM customers c WHERE c::text LIKE '%4929%'",
        "SELECT id FROM customers WHERE customers::text LIKE '%4929%'",
        "SELECT id FROM customers c WHERE row_to_json(c)->>'card_number' LIKE '4%'",
        "SELECT s.id FROM (SELECT * FROM customers) s WHERE s::text LIKE '%4929%'",
    ] {
        let r = decide(sql);
        assert!(
            r.as_ref().is_err_and(|e| e.0.contains("inPredicates")),
            "{sql}: {r:?}"
        );
    }
    for sql in [
        "SELECT id, card_number FROM customers WHERE id = 1",
        "SELECT c.id, c.card_number AS card FROM customers c WHERE c.name = 'Ann' ORDER BY c.id",
        "SELECT x FROM (SELECT card_number AS x FROM customers) s",
        "SELECT * FROM customers WHERE id > 1",
        "SELECT card_number FROM customers UNION ALL SELECT card_number FROM customers",
        "SELECT id FROM orders ORDER BY 1",
    ] {
        assert!(decide(sql).is_ok(), "{sql}: {:?}", decide(sql));
    }
}

/// Found by the fuzz target `mask_data_row`: a column length below -1 was
/// read as NULL, where the decoder refuses it. No server sends one; a row
/// that has one is malformed and ends the session, as any other does.
#[test]
fn a_negative_column_length_other_than_null_is_refused() {
    let mask = StatementMask {
        map: map(),
        tainted: false,
    };
    let text = strategy::oid::TEXT;
    let plan = RowPlan::new(&mask, &[field(CUSTOMERS, 3, text), field(0, 0, text)], true);
    for len in [-2i32, -49409, i32::MIN] {
        let mut bytes = BytesMut::new();
        bytes.put_u8(b'D');
        bytes.put_i32(4 + 2 + 4 + 4 + 4);
        bytes.put_i16(2);
        bytes.put_i32(4);
        bytes.put_slice(b"4929");
        bytes.put_i32(len);
        let mut out = BytesMut::new();
        assert!(
            plan.mask_row(&rules(), None, &bytes, &mut out).is_err(),
            "length {len} taken"
        );
        assert!(out.is_empty());
    }
    // -1 is NULL.
    let mut bytes = BytesMut::new();
    codec::put_data_row([Some(&b"4929"[..]), None].into_iter(), &mut bytes);
    let mut out = BytesMut::new();
    plan.mask_row(&rules(), None, &bytes, &mut out).unwrap();
    assert_eq!(codec::data_row(&out[5..]).unwrap()[1], None);
}
