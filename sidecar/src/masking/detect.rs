//! Content detectors: find card numbers, email addresses and US social
//! security numbers inside free text, whatever column it came from. Hand-
//! written scanners (linear, no backtracking) over the value's characters.

use pgwarden_api::Detector;

use super::strategy::{mask_text, HashKey, Strategy};

/// A detector entry: what to look for and what a finding becomes.
pub type DetectRule = (Vec<Detector>, Strategy);

/// The value with every finding masked, or None when nothing was found.
pub fn scan(text: &str, rules: &[DetectRule], key: Option<&HashKey>) -> Option<String> {
    let mut spans: Vec<(usize, usize, &Strategy)> = Vec::new();
    for (detectors, strategy) in rules {
        for d in detectors {
            let found = match d {
                Detector::CreditCard => cards(text),
                Detector::Email => emails(text),
                Detector::UsSsn => ssns(text),
            };
            spans.extend(found.into_iter().map(|(a, b)| (a, b, strategy)));
        }
    }
    if spans.is_empty() {
        return None;
    }
    spans.sort_by_key(|(a, b, _)| (*a, std::cmp::Reverse(*b)));
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (a, b, strategy) in spans {
        if a < at {
            continue; // overlaps a finding already masked
        }
        out.push_str(&text[at..a]);
        out.push_str(&mask_text(strategy, key, &text[a..b]));
        at = b;
    }
    out.push_str(&text[at..]);
    Some(out)
}

/// 13-19 digits, single spaces or dashes between groups allowed, not part of
/// a longer digit run, passing the Luhn check. Byte ranges of the findings.
fn cards(text: &str) -> Vec<(usize, usize)> {
    let b = text.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_digit() || (i > 0 && b[i - 1].is_ascii_digit()) {
            i += 1;
            continue;
        }
        // Longest run of digits with single separators.
        let (start, mut end, mut digits) = (i, i, Vec::new());
        let mut j = i;
        while j < b.len() {
            if b[j].is_ascii_digit() {
                digits.push(b[j] - b'0');
                j += 1;
                end = j;
            } else if (b[j] == b' ' || b[j] == b'-')
                && j + 1 < b.len()
                && b[j + 1].is_ascii_digit()
                && j > start
            {
                j += 1;
            } else {
                break;
            }
            if digits.len() > 19 {
                break;
            }
        }
        if (13..=19).contains(&digits.len())
            && !(end < b.len() && b[end].is_ascii_digit())
            && luhn(&digits)
        {
            found.push((start, end));
        }
        i = end.max(i + 1);
    }
    found
}

fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(k, &d)| {
            let d = u32::from(d);
            if k % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// local@domain.tld around each '@'.
fn emails(text: &str) -> Vec<(usize, usize)> {
    let b = text.as_bytes();
    let local = |c: u8| c.is_ascii_alphanumeric() || b"._%+-".contains(&c);
    let domain = |c: u8| c.is_ascii_alphanumeric() || c == b'.' || c == b'-';
    let mut found = Vec::new();
    for (at, _) in text.match_indices('@') {
        let mut s = at;
        while s > 0 && local(b[s - 1]) {
            s -= 1;
        }
        let mut e = at + 1;
        while e < b.len() && domain(b[e]) {
            e += 1;
        }
        while e > at + 1 && b[e - 1] == b'.' {
            e -= 1; // a sentence's full stop
        }
        let dom = &text[at + 1..e];
        if s < at && dom.contains('.') && !dom.starts_with('.') {
            found.push((s, e));
        }
    }
    found
}

/// NNN-NN-NNNN not inside a longer run of digits.
fn ssns(text: &str) -> Vec<(usize, usize)> {
    let b = text.as_bytes();
    let shape = b"ddd-dd-dddd";
    let mut found = Vec::new();
    if b.len() < shape.len() {
        return found;
    }
    for i in 0..=b.len() - shape.len() {
        let fits = shape.iter().enumerate().all(|(k, &c)| match c {
            b'd' => b[i + k].is_ascii_digit(),
            _ => b[i + k] == b'-',
        });
        let before = i > 0 && b[i - 1].is_ascii_digit();
        let after = i + shape.len() < b.len() && b[i + shape.len()].is_ascii_digit();
        if fits && !before && !after {
            found.push((i, i + shape.len()));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(strategy: Strategy) -> Vec<DetectRule> {
        vec![(
            vec![Detector::CreditCard, Detector::Email, Detector::UsSsn],
            strategy,
        )]
    }

    #[test]
    fn finds_cards_emails_and_ssns_in_free_text() {
        let text = "call ann.secret@example.com re card 4929 1234 5678 1236 \
                    (ssn 078-05-1120). Order 12345678901234 is fine.";
        let out = scan(text, &all(Strategy::Redact), None).unwrap();
        assert_eq!(
            out,
            "call **** re card **** (ssn ****). Order 12345678901234 is fine."
        );
        let out = scan(
            "card 4929-1234-5678-1236.",
            &all(Strategy::Partial { first: 0, last: 4 }),
            None,
        )
        .unwrap();
        assert_eq!(out, "card ***************1236.");
    }

    #[test]
    fn leaves_non_matches_alone() {
        for text in [
            "",
            "no numbers here",
            "4929123456781235",     // fails Luhn
            "49291234567812340000", // too long a run
            "078-05-11200",
            "a@b",
            "@example.com",
        ] {
            assert_eq!(scan(text, &all(Strategy::Redact), None), None, "{text:?}");
        }
    }

    #[test]
    fn luhn_check() {
        let digits = |s: &str| s.bytes().map(|b| b - b'0').collect::<Vec<_>>();
        assert!(luhn(&digits("4929123456781236")));
        assert!(!luhn(&digits("4929123456781234")));
        assert!(luhn(&digits("4111111111111111")));
        assert!(!luhn(&digits("4111111111111112")));
    }
}
