use super::*;
use crate::policy::analyze::{analyze, Settings};

#[test]
fn the_byte_class_table_is_the_lexer_rule() {
    for c in 0..=255u8 {
        let start = c.is_ascii_alphabetic() || c == b'_' || c >= 0x80;
        assert_eq!(is_ident_start(c), start, "{c:#x}");
        assert_eq!(
            is_ident_char(c),
            start || c.is_ascii_digit() || c == b'$',
            "{c:#x}"
        );
    }
}

#[test]
fn numbers_are_replaced_and_nothing_else() {
    let cases = [
        (
            "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
            Some("SELECT abalance FROM pgbench_accounts WHERE aid = 1;"),
        ),
        (
            "SELECT 1.5, .5, 2e10, 3E-2, 0.0, 00",
            Some("SELECT 1.0, 1.0, 1.0, 1.0, 0.0, 0"),
        ),
        (
            "SELECT * FROM t1 WHERE c2 = $1 LIMIT 10",
            Some("SELECT * FROM t1 WHERE c2 = $1 LIMIT 1"),
        ),
        (
            "SELECT 'a1', \"b2\", $$c3$$, $x$d4$x$, 5",
            Some("SELECT 'a1', \"b2\", $$c3$$, $x$d4$x$, 1"),
        ),
        (
            "SELECT 1 -- 23\n, /* 4 /* 5 */ 6 */ 7",
            Some("SELECT 1 -- 23\n, /* 4 /* 5 */ 6 */ 1"),
        ),
        ("SELECT E'\\'9', 8", Some("SELECT E'\\'9', 1")),
        ("SELECT 'it''s 9', 8", Some("SELECT 'it''s 9', 1")),
        ("SELECT x FROM t", None),
        ("SELECT 0x1F", None),
        ("SELECT 1_000", None),
        ("SELECT 1e", None),
        ("SELECT 12345678901", None),
        ("SELECT 'unterminated 5", None),
        ("SELECT U&'d\\0061t' , 5", Some("SELECT U&'d\\0061t' , 1")),
        ("SELECT 1..2", None),
        ("SELECT 5 FROM t WHERE x = $", None),
        // Digits that belong to a name, next to every byte class the lexer
        // decides by table (`_`, `$`, a multi-byte character, a dot): never
        // numbers, or two tables that differ only there would share a
        // cached verdict.
        ("SELECT x_9, 7 FROM t", Some("SELECT x_9, 1 FROM t")),
        (
            "SELECT * FROM t$1 WHERE c = 5",
            Some("SELECT * FROM t$1 WHERE c = 1"),
        ),
        (
            "SELECT café2 FROM t WHERE a = 3",
            Some("SELECT café2 FROM t WHERE a = 1"),
        ),
        ("SELECT é9 FROM t", None),
        ("SELECT 5é", None),
        ("SELECT s1.t2.c3 FROM s1.t2", None),
        ("SELECT $12 FROM t", None),
    ];
    for (sql, want) in cases {
        assert_eq!(numeric_key(sql).as_deref(), want, "{sql}");
    }
}

/// The property the cache relies on: a text and its key analyse to the
/// same statements (same accesses, effects and column facts) or fail alike.
fn same_analysis(sql: &str) {
    let Some(key) = numeric_key(sql) else { return };
    let s = Settings::default();
    match (analyze(sql, s), analyze(&key, s)) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "{sql}\n=> {key}"),
        (Err(_), Err(_)) => {}
        (a, b) => panic!("{sql}\n=> {key}\n{a:?}\nvs\n{b:?}"),
    }
}

#[test]
fn the_adversarial_corpus_analyses_the_same_under_its_keys() {
    let corpus = include_str!("../../../../e2e/corpus/statements.yaml");
    let mut n = 0;
    // Each `sql: |-` block: the indented lines after it.
    let mut lines = corpus.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        let Some(rest) = trimmed
            .strip_prefix("sql:")
            .or_else(|| trimmed.strip_prefix("setup:"))
        else {
            continue;
        };
        let indent = line.len() - trimmed.len();
        let mut text = String::new();
        if rest.trim() == "|-" || rest.trim() == "|" {
            while let Some(next) = lines.peek() {
                let ni = next.len() - next.trim_start().len();
                if next.trim().is_empty() || ni > indent {
                    text.push_str(next.trim_start());
                    text.push('\n');
                    lines.next();
                } else {
                    break;
                }
            }
        } else {
            text = rest.trim().trim_matches('\'').to_owned();
        }
        for stmt in text.lines().filter(|l| !l.trim().is_empty()) {
            same_analysis(stmt);
        }
        same_analysis(text.trim_end());
        n += 1;
    }
    assert!(n > 300, "only {n} corpus statements found");
}

proptest::proptest! {
    #[test]
    fn keys_merge_only_texts_that_differ_in_numbers(
        parts in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::strategy::Just("SELECT ".to_owned()),
                proptest::strategy::Just(" FROM t".to_owned()),
                proptest::strategy::Just(" t1 ".to_owned()),
                proptest::strategy::Just("'s2'".to_owned()),
                proptest::strategy::Just("\"q3\"".to_owned()),
                proptest::strategy::Just("$1".to_owned()),
                proptest::strategy::Just(" -- c4\n".to_owned()),
                proptest::strategy::Just("/* 5 */".to_owned()),
                proptest::strategy::Just("E'\\\\6'".to_owned()),
                proptest::strategy::Just("$$7$$".to_owned()),
                "[1-9][0-9]{0,5}",
                "[1-9][0-9]{0,2}\\.[0-9]{1,3}",
                proptest::strategy::Just(", ".to_owned()),
                proptest::strategy::Just(" = ".to_owned()),
            ],
            1..12,
        ),
        other in 1u32..1_000_000,
    ) {
        let sql: String = parts.join(" ");
        // Replacing one (non-zero) number by another never changes the key ...
        let swapped = match parts.iter().position(|p| p.chars().all(|c| c.is_ascii_digit())) {
            Some(i) => {
                let mut q = parts.clone();
                q[i] = other.to_string();
                q.join(" ")
            }
            None => sql.clone(),
        };
        if let (Some(a), Some(b)) = (numeric_key(&sql), numeric_key(&swapped)) {
            proptest::prop_assert_eq!(a, b);
        }
        // ... and what is not a number survives in the key verbatim.
        if let Some(k) = numeric_key(&sql) {
            for keep in ["t1", "'s2'", "\"q3\"", "$1", "-- c4", "/* 5 */", "E'\\\\6'", "$$7$$"] {
                proptest::prop_assert_eq!(sql.matches(keep).count(), k.matches(keep).count(), "{} => {}", sql, k);
            }
        }
    }
}
