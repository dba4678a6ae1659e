//! A file of statements (a migration) cut into the statement texts a client
//! such as `psql -f` sends one Query each, sans-IO.
//!
//! PostgreSQL's own parser cuts a file that parses. A file that does not is
//! cut lexically at semicolons outside quotes, comments, dollar quotes and
//! parentheses (as psql does), so every byte of it lands in some piece and
//! the piece that does not parse is judged (and refused) on its own: nothing
//! is silently skipped.

use super::normalize::{skip_block_comment, skip_dollar_quoted, skip_quoted};

/// One statement text and where it starts in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece<'a> {
    /// Byte offset of `text` in the file.
    pub offset: usize,
    pub text: &'a str,
}

impl Piece<'_> {
    /// 1-based line of the piece's first token in `file`.
    pub fn line(&self, file: &str) -> usize {
        let lead = self.text.len() - self.text.trim_start().len();
        let end = (self.offset + lead).min(file.len());
        file.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }
}

/// The statements of `file`, in order. Pieces with no token (white space,
/// comments) are left out.
pub fn statements(file: &str) -> Vec<Piece<'_>> {
    let pieces = match pg_query::split_with_parser(file) {
        Ok(parts) => parts
            .into_iter()
            .map(|text| Piece {
                // The parser's pieces are slices of `file`.
                offset: (text.as_ptr() as usize).saturating_sub(file.as_ptr() as usize),
                text,
            })
            .collect(),
        Err(_) => lexical(file),
    };
    pieces
        .into_iter()
        .filter(|p| super::budget::count_tokens(p.text, 1) > 0)
        .collect()
}

/// Cut at every `;` outside quotes, comments, dollar quotes and parentheses.
fn lexical(file: &str) -> Vec<Piece<'_>> {
    let b = file.as_bytes();
    let (mut pieces, mut start, mut depth, mut i) = (Vec::new(), 0, 0usize, 0);
    while i < b.len() {
        i = match b[i] {
            b'-' if b.get(i + 1) == Some(&b'-') => b[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |n| i + n),
            b'/' if b.get(i + 1) == Some(&b'*') => skip_block_comment(b, i).unwrap_or(b.len()),
            b'\'' => {
                let escapes = i > 0 && matches!(b[i - 1], b'e' | b'E');
                skip_quoted(b, i, b'\'', escapes).unwrap_or(b.len())
            }
            b'"' => skip_quoted(b, i, b'"', false).unwrap_or(b.len()),
            // Not after an identifier character: `a$1` is one name.
            b'$' if i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_') => {
                skip_dollar_quoted(file, i).unwrap_or(i + 1)
            }
            b'(' => {
                depth += 1;
                i + 1
            }
            b')' => {
                depth = depth.saturating_sub(1);
                i + 1
            }
            b';' if depth == 0 => {
                pieces.push(Piece {
                    offset: start,
                    text: &file[start..i],
                });
                start = i + 1;
                i + 1
            }
            _ => i + 1,
        };
    }
    if start < b.len() {
        pieces.push(Piece {
            offset: start,
            text: &file[start..],
        });
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(file: &str) -> Vec<&str> {
        statements(file).iter().map(|p| p.text.trim()).collect()
    }

    #[test]
    fn a_file_that_parses_is_cut_by_the_parser() {
        let file = "-- migration 42\nCREATE TABLE t (a text DEFAULT ';');\n\nINSERT INTO t VALUES ($$;$$);\n/* done; */\n";
        assert_eq!(
            texts(file),
            [
                "CREATE TABLE t (a text DEFAULT ';')",
                "INSERT INTO t VALUES ($$;$$)"
            ]
        );
        let lines: Vec<_> = statements(file).iter().map(|p| p.line(file)).collect();
        assert_eq!(lines, [2, 4]);
    }

    #[test]
    fn a_file_that_does_not_parse_loses_no_text() {
        let file = "SELECT 1;\nthis is not sql;\nDELETE FROM t WHERE a = 'x;y';\nSELECT (1;2)";
        assert_eq!(
            texts(file),
            [
                "SELECT 1",
                "this is not sql",
                "DELETE FROM t WHERE a = 'x;y'",
                "SELECT (1;2)"
            ]
        );
        let lines: Vec<_> = statements(file).iter().map(|p| p.line(file)).collect();
        assert_eq!(lines, [1, 2, 3, 4]);
    }

    #[test]
    fn empty_and_comment_only_files_have_no_statements() {
        assert!(statements("").is_empty());
        assert!(statements("  \n-- nothing\n/* here */ ;\n").is_empty());
    }
}
