//! Binary-format values of common types as their text form, for what
//! people read (approval requests, recordings). Not a full type library:
//! anything else is shown as hex.

/// Text-like types: their binary form is their UTF-8 text.
pub fn is_text_type(type_oid: u32) -> bool {
    // text, varchar, name, bpchar, char, json, xml, unknown
    matches!(type_oid, 25 | 1043 | 19 | 1042 | 18 | 114 | 142 | 705)
}

/// The text of a binary value of a scalar type, when this module knows it.
pub fn scalar_text(type_oid: u32, v: &[u8]) -> Option<String> {
    Some(match (type_oid, v.len()) {
        (16, 1) => if v[0] != 0 { "t" } else { "f" }.to_owned(),
        (21, 2) => i16::from_be_bytes(v.try_into().ok()?).to_string(),
        (23 | 26, 4) => i32::from_be_bytes(v.try_into().ok()?).to_string(),
        (20, 8) => i64::from_be_bytes(v.try_into().ok()?).to_string(),
        (700, 4) => f32::from_be_bytes(v.try_into().ok()?).to_string(),
        (701, 8) => f64::from_be_bytes(v.try_into().ok()?).to_string(),
        (2950, 16) => {
            let h: String = v.iter().map(|b| format!("{b:02x}")).collect();
            format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            )
        }
        // jsonb: a version byte, then the text.
        (3802, n) if n > 0 && v[0] == 1 => std::str::from_utf8(&v[1..]).ok()?.to_owned(),
        (t, _) if is_text_type(t) => std::str::from_utf8(v).ok()?.to_owned(),
        _ => return None,
    })
}

/// `\x…` with at most `max` bytes shown.
pub fn hex(v: &[u8], max: usize) -> String {
    let shown: String = v.iter().take(max).map(|b| format!("{b:02x}")).collect();
    if v.len() > max {
        format!("\\x{shown}…[truncated: {} bytes]", v.len())
    } else {
        format!("\\x{shown}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_binary_values_read_as_text() {
        assert_eq!(scalar_text(23, &[0, 0, 0, 2]).as_deref(), Some("2"));
        assert_eq!(scalar_text(20, &[0xff; 8]).as_deref(), Some("-1"));
        assert_eq!(scalar_text(16, &[1]).as_deref(), Some("t"));
        assert_eq!(scalar_text(25, b"abc").as_deref(), Some("abc"));
        assert_eq!(scalar_text(3802, b"\x01{}").as_deref(), Some("{}"));
        assert_eq!(
            scalar_text(2950, &[0x12; 16]).as_deref(),
            Some("12121212-1212-1212-1212-121212121212")
        );
        // Wrong length for the type, or an unknown type: not guessed.
        assert_eq!(scalar_text(23, &[0, 2]), None);
        assert_eq!(scalar_text(1700, &[0, 1, 0, 0]), None);
        assert_eq!(hex(&[0xde, 0xad, 0xbe], 2), "\\xdead…[truncated: 3 bytes]");
    }
}
