//! DataRow masking on arbitrary rows against arbitrary row descriptions:
//! never a panic; the client gets a well-formed DataRow with as many columns,
//! the row untouched (nothing in it to mask), or an error (the session
//! ends) and nothing written; NULL stays NULL; and a
//! masked column never carries its original value.
#![no_main]

use std::sync::{Arc, OnceLock};

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use pgwarden_api::{Detector, MaskStrategy, MaskingRule};
use pgwarden_sidecar::masking::columns::{MapBuilder, MaskMap, Row};
use pgwarden_sidecar::masking::strategy::oid;
use pgwarden_sidecar::masking::{HashKey, MaskRules, RowPlan, StatementMask};
use pgwarden_sidecar::wire::codec::{self, FieldInfo};
use pgwarden_sidecar::wire::frame::{self, Direction, Limits};

/// public.t (oid 100): c1 Partial (last 4), c2 Email, c3 Hash, c4 Redact,
/// c5 Null, c6 unmasked; public.u (oid 200) unmasked; detectors on.
const MASKED: u32 = 100;
const PLAIN: u32 = 200;
const UNKNOWN: u32 = 999;

struct Fixture {
    rules: MaskRules,
    map: Arc<MaskMap>,
    key: HashKey,
}

fn rule(column: &str, strategy: MaskStrategy) -> MaskingRule {
    MaskingRule {
        columns: vec![format!("public.t.{column}")],
        detect: vec![],
        strategy,
        keep_first: None,
        keep_last: (strategy == MaskStrategy::Partial).then_some(4),
        in_predicates: None,
    }
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let mut rules = vec![
            rule("c1", MaskStrategy::Partial),
            rule("c2", MaskStrategy::Email),
            rule("c3", MaskStrategy::Hash),
            rule("c4", MaskStrategy::Redact),
            rule("c5", MaskStrategy::Null),
        ];
        rules.push(MaskingRule {
            columns: vec![],
            detect: vec![Detector::CreditCard, Detector::Email, Detector::UsSsn],
            strategy: MaskStrategy::Partial,
            keep_first: None,
            keep_last: Some(4),
            in_predicates: None,
        });
        let rules = MaskRules::new(&rules);
        let row = |cells: &[&str]| -> Row { cells.iter().map(|c| Some(c.to_string())).collect() };
        let rels = [row(&["100", "public", "t"]), row(&["200", "public", "u"])];
        let cols: Vec<Row> = (1..=6)
            .map(|i| row(&["100", &i.to_string(), &format!("c{i}")]))
            .collect();
        let map = MapBuilder::new(&rules, &rels, &cols, &[], &[]).finish();
        Fixture {
            rules,
            map: Arc::new(map),
            key: HashKey::new(b"fuzz-masking-key-0123456789abcdef"),
        }
    })
}

const TYPES: [u32; 12] = [
    oid::TEXT,
    oid::VARCHAR,
    oid::BPCHAR,
    oid::NAME,
    oid::UNKNOWN,
    oid::JSON,
    oid::JSONB,
    oid::INT2,
    oid::INT4,
    oid::INT8,
    oid::UUID,
    17, // bytea
];

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(head & 7) + 1;
    let tainted = head & 8 != 0;
    let scan = head & 16 != 0;
    let Some(desc) = rest.get(..3 * n) else {
        return;
    };
    let body = &rest[3 * n..];
    let fields: Vec<FieldInfo> = desc
        .chunks_exact(3)
        .map(|c| FieldInfo {
            table_oid: [0, MASKED, PLAIN, UNKNOWN][usize::from(c[0] & 3)],
            attnum: i16::from(c[1] as i8 % 8),
            type_oid: TYPES[usize::from(c[2] & 15) % TYPES.len()],
            binary: c[2] & 16 != 0,
        })
        .collect();
    let mask = StatementMask {
        map: f.map.clone(),
        tainted,
    };
    let plan = RowPlan::new(&mask, &fields, scan);

    let mut msg = BytesMut::new();
    msg.put_u8(b'D');
    msg.put_i32(i32::try_from(body.len() + 4).expect("fuzz inputs are small"));
    msg.put_slice(body);
    let mut out = BytesMut::from(&b"before"[..]);
    let result = plan.mask_row(&f.rules, Some(&f.key), &msg, &mut out);
    let Ok(()) = result else {
        assert_eq!(&out[..], b"before", "a refused row left bytes behind");
        return;
    };
    let written = &out[6..];
    let Ok(before) = codec::data_row(body) else {
        // A row with nothing to mask passes as the server sent it; any
        // other malformed row is refused.
        assert_eq!(written, &msg[..], "a malformed row was rewritten");
        return;
    };
    let fr = frame::cut(written, Direction::Backend, &Limits::default())
        .expect("masking writes a valid frame")
        .expect("masking writes a whole frame");
    assert_eq!(fr.wire_len, written.len());
    let after = codec::data_row(fr.body(written)).expect("masking writes a valid DataRow");
    assert_eq!(after.len(), before.len());
    for ((field, old), new) in fields.iter().zip(&before).zip(&after) {
        let Some(old) = old else {
            assert!(new.is_none(), "NULL became a value");
            continue;
        };
        let masked = match field.table_oid {
            0 => tainted,
            MASKED => field.attnum <= 0 || (1..=5).contains(&field.attnum),
            UNKNOWN => true,
            _ => false,
        };
        // A masked value is replaced: never the original inside it (values
        // of stars are what masking itself writes, so they prove nothing).
        if masked && old.len() >= 16 && !old.contains(&b'*') {
            if let Some(new) = new {
                assert!(
                    !new.windows(old.len()).any(|w| w == *old),
                    "a masked column carries its original value"
                );
            }
        }
    }
});
