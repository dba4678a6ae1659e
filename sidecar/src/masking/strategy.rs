//! What a masked value becomes: one function per strategy, type-aware, on the
//! value's wire bytes (text or binary format). Pure: no I/O, no state.
//!
//! Text-like types (text, varchar, char, name) have the same bytes in both
//! formats and get masked text. json/jsonb get a JSON string, so the output
//! still parses (jsonb's binary form keeps its version byte). Integers and
//! uuids hashed with `Hash` stay integers and uuids, so pseudonyms still join.
//! Anything else becomes NULL: a value the proxy cannot rewrite validly is
//! withheld, never passed through.

use aws_lc_rs::hmac;
use pgwarden_api::MaskStrategy;

/// The fixed marker `Redact` (and whole-value masking) writes.
pub const REDACTED: &str = "****";

/// Well-known type OIDs (pg_type.dat; stable across PostgreSQL versions).
pub mod oid {
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const JSON: u32 = 114;
    pub const UNKNOWN: u32 = 705;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// A masking rule as the data path applies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Strategy {
    Redact,
    Partial {
        first: usize,
        last: usize,
    },
    Hash,
    Null,
    Email,
    /// The value cannot be attributed precisely: withhold all of it.
    Whole,
}

impl Strategy {
    pub fn from_rule(s: MaskStrategy, keep_first: Option<u32>, keep_last: Option<u32>) -> Self {
        match s {
            MaskStrategy::Redact => Strategy::Redact,
            MaskStrategy::Partial => Strategy::Partial {
                first: keep_first.unwrap_or(0) as usize,
                last: keep_last.unwrap_or(0) as usize,
            },
            MaskStrategy::Hash => Strategy::Hash,
            MaskStrategy::Null => Strategy::Null,
            MaskStrategy::Email => Strategy::Email,
        }
    }
}

/// The HMAC key for `Hash`; equal inputs under one key give equal outputs.
#[derive(Clone)]
pub struct HashKey(hmac::Key);

impl HashKey {
    pub fn new(secret: &[u8]) -> Self {
        HashKey(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    fn tag(&self, value: &[u8]) -> [u8; 32] {
        let tag = hmac::sign(&self.0, value);
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }
}

impl std::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashKey(<redacted>)")
    }
}

/// How a column's values travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Column {
    pub type_oid: u32,
    pub binary: bool,
}

pub fn text_like(type_oid: u32) -> bool {
    matches!(
        type_oid,
        oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::UNKNOWN
    )
}

/// Mask one non-NULL value. `None` means the client gets NULL.
pub fn mask(
    strategy: &Strategy,
    key: Option<&HashKey>,
    col: Column,
    value: &[u8],
) -> Option<Vec<u8>> {
    if *strategy == Strategy::Null {
        return None;
    }
    match col.type_oid {
        t if text_like(t) => {
            Some(mask_text(strategy, key, &String::from_utf8_lossy(value)).into_bytes())
        }
        oid::JSON => Some(json_string(&mask_text(
            strategy,
            key,
            &String::from_utf8_lossy(value),
        ))),
        oid::JSONB => {
            // Binary jsonb is a version byte (1) followed by the JSON text.
            let text = if col.binary {
                value.strip_prefix(&[1u8])?
            } else {
                value
            };
            let masked = json_string(&mask_text(strategy, key, &String::from_utf8_lossy(text)));
            Some(if col.binary {
                [&[1u8][..], &masked].concat()
            } else {
                masked
            })
        }
        oid::INT2 | oid::INT4 | oid::INT8 | oid::UUID if *strategy == Strategy::Hash => {
            hash_typed(key?, col, value)
        }
        _ => None,
    }
}

pub(super) fn mask_text(strategy: &Strategy, key: Option<&HashKey>, s: &str) -> String {
    match strategy {
        Strategy::Redact | Strategy::Whole | Strategy::Null => REDACTED.to_string(),
        Strategy::Partial { first, last } => partial(s, *first, *last),
        Strategy::Hash => match key {
            Some(k) => hex(&k.tag(s.as_bytes())),
            // The config loader refuses Hash without a key; never pass raw.
            None => REDACTED.to_string(),
        },
        Strategy::Email => match s.rsplit_once('@') {
            Some((_, domain)) if !domain.is_empty() => format!("{REDACTED}@{domain}"),
            _ => REDACTED.to_string(),
        },
    }
}

/// Keep `first` and `last` characters, star the rest. A value too short to
/// hide anything between them is starred whole: showing all of it would be
/// no mask at all.
fn partial(s: &str, first: usize, last: usize) -> String {
    if s.is_ascii() {
        // The common case (card numbers, phone numbers): no char vector.
        let n = s.len();
        if n <= first + last {
            return "*".repeat(n.max(1));
        }
        let mut out = String::with_capacity(n);
        out.push_str(&s[..first]);
        out.extend(std::iter::repeat_n('*', n - first - last));
        out.push_str(&s[n - last..]);
        return out;
    }
    let chars: Vec<char> = s.chars().collect();
    let n = chars.len();
    if n <= first + last {
        return "*".repeat(n.max(1));
    }
    let mut out = String::with_capacity(s.len());
    out.extend(&chars[..first]);
    out.extend(std::iter::repeat_n('*', n - first - last));
    out.extend(&chars[n - last..]);
    out
}

fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
    s
}

fn json_string(s: &str) -> Vec<u8> {
    serde_json::to_vec(s).unwrap_or_else(|_| b"null".to_vec())
}

/// `Hash` for integers and uuids keeps the type: a pseudonym of the same kind,
/// derived from the value's canonical text (so text and binary agree).
fn hash_typed(key: &HashKey, col: Column, value: &[u8]) -> Option<Vec<u8>> {
    let canonical = if col.binary {
        match (col.type_oid, value.len()) {
            (oid::INT2, 2) => i16::from_be_bytes(value.try_into().ok()?).to_string(),
            (oid::INT4, 4) => i32::from_be_bytes(value.try_into().ok()?).to_string(),
            (oid::INT8, 8) => i64::from_be_bytes(value.try_into().ok()?).to_string(),
            (oid::UUID, 16) => uuid_text(value),
            _ => return None,
        }
    } else {
        std::str::from_utf8(value).ok()?.trim().to_ascii_lowercase()
    };
    let tag = key.tag(canonical.as_bytes());
    let word = u64::from_be_bytes(tag[..8].try_into().ok()?);
    // Non-negative, within the type's range.
    let n: i64 = match col.type_oid {
        oid::INT2 => (word % (i16::MAX as u64 + 1)) as i64,
        oid::INT4 => (word % (i32::MAX as u64 + 1)) as i64,
        oid::INT8 => (word >> 1) as i64,
        _ => 0,
    };
    Some(match (col.type_oid, col.binary) {
        (oid::UUID, true) => tag[..16].to_vec(),
        (oid::UUID, false) => uuid_text(&tag[..16]).into_bytes(),
        (oid::INT2, true) => (n as i16).to_be_bytes().to_vec(),
        (oid::INT4, true) => (n as i32).to_be_bytes().to_vec(),
        (oid::INT8, true) => n.to_be_bytes().to_vec(),
        (_, false) => n.to_string().into_bytes(),
        _ => return None,
    })
}

fn uuid_text(b: &[u8]) -> String {
    let h = hex(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: Column = Column {
        type_oid: oid::TEXT,
        binary: false,
    };

    fn m(s: &Strategy, v: &str) -> Option<String> {
        mask(s, Some(&HashKey::new(b"k")), TEXT, v.as_bytes())
            .map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn partial_keeps_only_the_allowed_ends() {
        let s = Strategy::Partial { first: 0, last: 4 };
        assert_eq!(m(&s, "4929123456781234").unwrap(), "************1234");
        let s = Strategy::Partial { first: 2, last: 2 };
        assert_eq!(m(&s, "ünïcödé").unwrap(), "ün***dé");
        // Too short to hide anything: all starred.
        assert_eq!(m(&s, "abcd").unwrap(), "****");
        assert_eq!(m(&s, "").unwrap(), "*");
    }

    #[test]
    fn email_keeps_the_domain_and_hash_is_keyed_and_stable() {
        assert_eq!(
            m(&Strategy::Email, "ann@example.com").unwrap(),
            "****@example.com"
        );
        assert_eq!(m(&Strategy::Email, "no-at-sign").unwrap(), REDACTED);
        let a = m(&Strategy::Hash, "ann@example.com").unwrap();
        assert_eq!(a, m(&Strategy::Hash, "ann@example.com").unwrap());
        assert_ne!(a, m(&Strategy::Hash, "bob@example.com").unwrap());
        assert_eq!(a.len(), 64);
        let other_key = mask(
            &Strategy::Hash,
            Some(&HashKey::new(b"other")),
            TEXT,
            b"ann@example.com",
        )
        .unwrap();
        assert_ne!(a.as_bytes(), &other_key[..]);
        assert_eq!(m(&Strategy::Hash, "x").map(|_| ()), Some(()));
        // Without a key, never the raw value.
        assert_eq!(
            mask(&Strategy::Hash, None, TEXT, b"secret").unwrap(),
            REDACTED.as_bytes()
        );
    }

    #[test]
    fn types_stay_valid_or_become_null() {
        let key = HashKey::new(b"k");
        let int4 = |binary| Column {
            type_oid: oid::INT4,
            binary,
        };
        // Redact/Partial/Email have no valid integer form.
        assert_eq!(
            mask(&Strategy::Redact, Some(&key), int4(false), b"42"),
            None
        );
        assert_eq!(
            mask(
                &Strategy::Whole,
                Some(&key),
                int4(true),
                &42i32.to_be_bytes()
            ),
            None
        );
        // Hash keeps integers integers, equal in text and binary.
        let t = mask(&Strategy::Hash, Some(&key), int4(false), b"42").unwrap();
        let b = mask(
            &Strategy::Hash,
            Some(&key),
            int4(true),
            &42i32.to_be_bytes(),
        )
        .unwrap();
        let t: i32 = std::str::from_utf8(&t).unwrap().parse().unwrap();
        assert_eq!(t, i32::from_be_bytes(b.try_into().unwrap()));
        assert!(t >= 0 && t != 42);
        // jsonb: binary keeps its version byte and the result is a JSON string.
        let jb = Column {
            type_oid: oid::JSONB,
            binary: true,
        };
        let out = mask(&Strategy::Whole, None, jb, b"\x01{\"card\": \"4929\"}").unwrap();
        assert_eq!(out, b"\x01\"****\"");
        let uuid = Column {
            type_oid: oid::UUID,
            binary: false,
        };
        let out = mask(
            &Strategy::Hash,
            Some(&key),
            uuid,
            b"A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
        )
        .unwrap();
        assert_eq!(out.len(), 36);
        // bytea, numeric, dates...: NULL under every strategy.
        let bytea = Column {
            type_oid: 17,
            binary: false,
        };
        assert_eq!(
            mask(
                &Strategy::Partial { first: 1, last: 1 },
                None,
                bytea,
                b"\\x00"
            ),
            None
        );
    }
}
