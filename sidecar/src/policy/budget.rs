//! What analysing one statement text may cost, sans-IO.
//!
//! PostgreSQL's parser (libpg_query) and the tree pgwarden walks cost memory
//! per *token*, not per byte: `SELECT 1,1,1,...` of 600 KB took ~2 GiB
//! before the walked tree was made compact (`tree.rs`), ~1 KB per token
//! after. So a
//! text is refused before parsing when it is longer than `MAX_BYTES` or has
//! more than `MAX_TOKENS` tokens, counted by a single allocation-free pass
//! over PostgreSQL's lexical rules (strings, quoted names, dollar quotes and
//! comments are one token or none; an operator may count once per
//! character, so the count errs high).

use super::normalize::{
    is_ident_char, is_ident_start, skip_block_comment, skip_dollar_quoted, skip_quoted,
};

/// Longest statement text analysed.
pub const MAX_BYTES: usize = 1024 * 1024;
/// Most tokens in a statement text analysed: a multi-row INSERT of about
/// five thousand rows of four columns. Larger batches: split them, or COPY
/// FROM STDIN. At the cap the densest text (`SELECT 1,1,...`) costs ~45 MiB
/// to analyse (measured: `pgwarden check` peak RSS).
pub const MAX_TOKENS: usize = 50_000;

/// Why a text is too costly to analyse, for the client's error.
pub fn check(sql: &str) -> Result<(), String> {
    if sql.len() > MAX_BYTES {
        return Err(format!(
            "the statement has {} bytes; pgwarden analyses statements of at most {MAX_BYTES} bytes",
            sql.len()
        ));
    }
    let tokens = count_tokens(sql, MAX_TOKENS + 1);
    if tokens > MAX_TOKENS {
        return Err(format!(
            "the statement has more than {MAX_TOKENS} tokens, the most pgwarden analyses; split it into smaller statements or load bulk data with COPY FROM STDIN"
        ));
    }
    Ok(())
}

/// Tokens in `sql`, counting stops after `stop`. Never less than the
/// lexer's count.
pub fn count_tokens(sql: &str, stop: usize) -> usize {
    let b = sql.as_bytes();
    let mut n = 0;
    let mut i = 0;
    while i < b.len() && n < stop {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'-' && b.get(i + 1) == Some(&b'-') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i = skip_block_comment(b, i).unwrap_or(b.len());
            continue;
        }
        n += 1;
        i = match c {
            // E'...' is lexed with its prefix as one token: the prefix was
            // counted as an identifier, the string is counted here too.
            b'\'' => {
                let escapes = i > 0 && matches!(b[i - 1], b'e' | b'E');
                skip_quoted(b, i, b'\'', escapes).unwrap_or(b.len())
            }
            b'"' => skip_quoted(b, i, b'"', false).unwrap_or(b.len()),
            b'$' => skip_dollar_quoted(sql, i).unwrap_or(i + 1),
            c if is_ident_start(c) || c.is_ascii_digit() => {
                let mut j = i + 1;
                while j < b.len()
                    && (is_ident_char(b[j]) || b[j] == b'.' && b[j - 1].is_ascii_digit())
                {
                    j += 1;
                }
                j
            }
            _ => i + 1,
        };
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_never_undershoot_the_lexer() {
        for (sql, at_least) in [
            ("SELECT 1", 2),
            ("SELECT 1,1,1", 6),
            ("SELECT 'a,b,c,d', \"x,y\" FROM t -- , , ,", 6),
            ("SELECT $$ , , , $$ /* , /* , */ , */ , 2", 4),
            ("SELECT E'\\', ,' , 3.14", 5),
        ] {
            let n = count_tokens(sql, usize::MAX);
            assert!(n >= at_least, "{sql}: {n}");
            // Strings, quoted names, dollar quotes and comments stay one
            // token (or none) whatever they hold.
            assert!(n <= at_least + 2, "{sql}: {n}");
        }
    }

    #[test]
    fn dense_texts_are_refused_and_long_strings_are_not() {
        let mut dense = String::from("SELECT 1");
        while dense.len() < 2 * MAX_TOKENS + 100 {
            dense.push_str(",1");
        }
        assert!(check(&dense).unwrap_err().contains("tokens"));
        let long = format!("SELECT '{}'", "x".repeat(900_000));
        assert!(check(&long).is_ok());
        let huge = format!("SELECT '{}'", "x".repeat(MAX_BYTES));
        assert!(check(&huge).unwrap_err().contains("bytes"));
        // An unterminated string counts as one token to the end.
        assert_eq!(count_tokens("SELECT 'abc , , ,", usize::MAX), 2);
    }
}
