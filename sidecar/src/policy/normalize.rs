//! Cache keys that ignore numeric literals, sans-IO.
//!
//! `SELECT abalance FROM pgbench_accounts WHERE aid = 48213` and `... = 7`
//! touch the same things: the analyser never looks at a numeric constant's
//! value (it walks names, classes and structure). So their verdicts are one
//! cache entry, keyed by the text with every numeric literal replaced —
//! and a simple-protocol workload with inlined numbers is judged from the
//! cache instead of parsed per statement.
//!
//! The key must never merge texts that differ in anything else: an
//! identifier (`t1`/`t2`), a quoted name, a string, a comment or a
//! parameter number. So this is a lexer of PostgreSQL's lexical rules that
//! replaces a digit run only where it is certainly a numeric literal, and
//! gives up (None: the raw text is the key) on anything it is not sure of:
//! an unterminated string or comment, a prefixed string other than E/N/B/X,
//! a number run into letters (`0x1F`, `1_000`, `1e`), an integer too long
//! for int4 (the server lexes it as numeric). Replacements keep the token
//! class — an integer becomes `0` or `1`, a decimal `0.0` or `1.0` — so the key's text
//! parses wherever the original does — and zero stays apart from non-zero,
//! since a number can be a boolean option (`EXPLAIN (ANALYZE 1)`) and that
//! the analyser does read. A test runs the whole adversarial corpus through
//! both forms and requires identical analyses.

/// The key, or None when the text has no numeric literal or the lexer is
/// not certain of every token.
pub fn numeric_key(sql: &str) -> Option<String> {
    let b = sql.as_bytes();
    if !b.iter().any(u8::is_ascii_digit) {
        return None;
    }
    // Built lazily: the text up to `copied` is in `out` (allocated at the
    // first replacement; most texts without literals never allocate).
    let mut out = String::new();
    let mut copied = 0;
    let mut i = 0;
    // The identifier just before (for E'...' and friends).
    let mut prev_ident: Option<(usize, usize)> = None;
    while i < b.len() {
        let c = b[i];
        let start = i;
        let mut ident = None;
        match c {
            b'\'' => {
                let prefix = prev_ident
                    .filter(|(_, end)| *end == i)
                    .map(|(s, e)| &sql[s..e]);
                let escapes = match prefix {
                    None => false,
                    Some(p) if p.eq_ignore_ascii_case("e") => true,
                    Some(p) if ["n", "b", "x"].iter().any(|q| p.eq_ignore_ascii_case(q)) => false,
                    // U&'...' comes as ident `U`, then `&`: not this arm.
                    Some(_) => return None,
                };
                i = skip_quoted(b, i, b'\'', escapes)?;
            }
            b'"' => i = skip_quoted(b, i, b'"', false)?,
            b'$' => {
                let next = b.get(i + 1).copied();
                if next.is_some_and(|n| n.is_ascii_digit()) {
                    // $1: a parameter number, kept.
                    i += 1;
                    while i < b.len() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                } else {
                    i = skip_dollar_quoted(sql, i)?;
                }
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => i = skip_block_comment(b, i)?,
            c if is_ident_start(c) => {
                while i < b.len() && is_ident_char(b[i]) {
                    i += 1;
                }
                ident = Some((start, i));
            }
            c if c.is_ascii_digit()
                || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) =>
            {
                let (end, decimal) = numeric(b, i)?;
                // Zero and non-zero stay apart: a number can be a boolean
                // option (`EXPLAIN (ANALYZE 1)`), and that the analyser reads.
                let zero = sql[i..end]
                    .bytes()
                    .take_while(|c| *c != b'e' && *c != b'E')
                    .all(|c| c == b'0' || c == b'.');
                if out.capacity() == 0 {
                    out.reserve(sql.len());
                }
                out.push_str(&sql[copied..start]);
                out.push_str(match (decimal, zero) {
                    (false, true) => "0",
                    (false, false) => "1",
                    (true, true) => "0.0",
                    (true, false) => "1.0",
                });
                copied = end;
                i = end;
                prev_ident = None;
                continue;
            }
            _ => i += 1,
        }
        prev_ident = ident;
    }
    if out.capacity() == 0 {
        return None;
    }
    out.push_str(&sql[copied..]);
    Some(out)
}

const IDENT_START: u8 = 1;
const IDENT_CHAR: u8 = 2;

/// Byte classes by table: the lexer looks at every byte of every statement
/// text, so this is on the per-statement path (issue #21).
static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            t[i] = IDENT_START | IDENT_CHAR;
        } else if c.is_ascii_digit() || c == b'$' {
            t[i] = IDENT_CHAR;
        }
        i += 1;
    }
    t
};

/// A letter, `_`, or any byte of a multi-byte UTF-8 character.
pub(super) fn is_ident_start(c: u8) -> bool {
    CLASS[usize::from(c)] & IDENT_START != 0
}

/// An identifier start, a digit or `$`.
pub(super) fn is_ident_char(c: u8) -> bool {
    CLASS[usize::from(c)] & IDENT_CHAR != 0
}

/// Past the closing quote; `''` (or `""`) is an escaped quote, and in
/// E-strings a backslash escapes the next byte.
pub(super) fn skip_quoted(b: &[u8], mut i: usize, q: u8, escapes: bool) -> Option<usize> {
    i += 1;
    while i < b.len() {
        if escapes && b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == q {
            if b.get(i + 1) == Some(&q) {
                i += 2;
                continue;
            }
            return Some(i + 1);
        }
        i += 1;
    }
    None
}

/// `$tag$ ... $tag$` (tag empty or an identifier without `$`).
pub(super) fn skip_dollar_quoted(sql: &str, i: usize) -> Option<usize> {
    let b = sql.as_bytes();
    let mut j = i + 1;
    if b.get(j).is_some_and(|&c| is_ident_start(c)) {
        while j < b.len() && (is_ident_start(b[j]) || b[j].is_ascii_digit()) {
            j += 1;
        }
    }
    if b.get(j) != Some(&b'$') {
        // A lone `$`: not valid SQL outside these forms; let the parser say.
        return None;
    }
    let tag = &sql[i..=j];
    let body = j + 1;
    let close = sql.get(body..)?.find(tag)?;
    Some(body + close + tag.len())
}

/// Nested `/* ... */`.
pub(super) fn skip_block_comment(b: &[u8], mut i: usize) -> Option<usize> {
    let mut depth = 0usize;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return Some(i);
            }
        } else {
            i += 1;
        }
    }
    None
}

/// A numeric literal at `i`: (end, is it a decimal). None unless it is
/// certainly one complete literal.
fn numeric(b: &[u8], mut i: usize) -> Option<(usize, bool)> {
    let digits = |b: &[u8], mut i: usize| {
        let s = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        (i, i - s)
    };
    let (after_int, int_len) = digits(b, i);
    i = after_int;
    let mut decimal = false;
    if b.get(i) == Some(&b'.') {
        // `1..2` and `1.x` are for the parser to judge.
        if b.get(i + 1)
            .is_some_and(|&c| c == b'.' || is_ident_start(c))
        {
            return None;
        }
        decimal = true;
        i = digits(b, i + 1).0;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let mut j = i + 1;
        if matches!(b.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        let (end, n) = digits(b, j);
        if n == 0 {
            return None;
        }
        decimal = true;
        i = end;
    }
    // Run into letters, `_`, `$` or another `.`: not one literal.
    if b.get(i).is_some_and(|&c| is_ident_char(c) || c == b'.') {
        return None;
    }
    // Past int4, the server lexes an integer as numeric.
    if !decimal && int_len > 9 {
        return None;
    }
    Some((i, decimal))
}

#[cfg(test)]
mod tests;
