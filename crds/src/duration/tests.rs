use super::*;

const SEC: u64 = 1_000;
const MIN: u64 = 60 * SEC;
const HOUR: u64 = 60 * MIN;

#[test]
fn parses_go_style_durations() {
    let cases: &[(&str, u64)] = &[
        ("0s", 0),
        ("0", 0),
        ("0ms", 0),
        ("30s", 30 * SEC),
        ("15m", 15 * MIN),
        ("1h", HOUR),
        ("1h30m", HOUR + 30 * MIN),
        ("250ms", 250),
        ("1s500ms", 1_500),
        ("90m", 90 * MIN),
        // Go accepts any order and repeats; so do we.
        ("30m1h", HOUR + 30 * MIN),
        ("1m1m", 2 * MIN),
        ("007s", 7 * SEC),
    ];
    for &(input, millis) in cases {
        let d: Duration = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(d.as_millis(), millis, "{input}");
        assert_eq!(d.as_std(), StdDuration::from_millis(millis), "{input}");
    }
}

#[test]
fn displays_canonically_and_round_trips() {
    let canonical = [
        "0s",
        "30s",
        "15m",
        "1h",
        "1h30m",
        "250ms",
        "1s500ms",
        "36h",
        "1h1m1s1ms",
    ];
    for input in canonical {
        let d: Duration = input.parse().unwrap();
        assert_eq!(d.to_string(), input);
        assert_eq!(d.to_string().parse::<Duration>().unwrap(), d);
    }
    let normalised = [
        ("0", "0s"),
        ("90m", "1h30m"),
        ("1500ms", "1s500ms"),
        ("30m1h", "1h30m"),
    ];
    for (input, shown) in normalised {
        assert_eq!(
            input.parse::<Duration>().unwrap().to_string(),
            shown,
            "{input}"
        );
    }
    assert_eq!(
        Duration::from_millis(u64::MAX)
            .to_string()
            .parse::<Duration>()
            .unwrap()
            .as_millis(),
        u64::MAX
    );
}

#[test]
fn rejects_garbage_with_a_clear_message() {
    let cases: &[(&str, &str)] = &[
        ("", "empty"),
        ("-5s", "negative"),
        ("-0s", "negative"),
        ("5", "missing unit"),
        ("5 s", "missing unit"),
        ("1h30", "missing unit"),
        ("s", "expected a number"),
        (" 5s", "expected a number"),
        ("+5s", "expected a number"),
        ("1h-5m", "expected a number"),
        ("5x", "unknown unit"),
        ("5S", "unknown unit"),
        ("5sec", "unknown unit"),
        ("5us", "unknown unit"),
        ("1.5h", "fractions are not supported"),
        ("99999999999999999999s", "too large"),
        ("18446744073709551615h", "too large"),
        ("18446744073709551615ms1ms", "too large"),
    ];
    for &(input, expected) in cases {
        let err = input.parse::<Duration>().expect_err(input).to_string();
        assert!(
            err.contains(expected),
            "{input:?}: {err:?} lacks {expected:?}"
        );
        if !input.is_empty() {
            assert!(
                err.contains(&format!("{input:?}")),
                "{input:?}: {err:?} lacks the input"
            );
        }
    }
}

#[test]
fn serde_uses_the_string_form() {
    let d: Duration = serde_json::from_str(r#""1h30m""#).unwrap();
    assert_eq!(d.as_millis(), HOUR + 30 * MIN);
    assert_eq!(serde_json::to_string(&d).unwrap(), r#""1h30m""#);

    let d: Duration = serde_yaml_ng::from_str("250ms").unwrap();
    assert_eq!(d, Duration::from_millis(250));

    for bad in ["30", "-1s", "true", "{}"] {
        let err = serde_yaml_ng::from_str::<Duration>(bad).expect_err(bad);
        assert!(!err.to_string().is_empty());
    }
    let err = serde_yaml_ng::from_str::<Duration>("-1s")
        .unwrap_err()
        .to_string();
    assert!(err.contains("negative"), "{err}");
}

#[test]
fn schema_is_a_patterned_string() {
    let schema = serde_json::to_value(schemars::schema_for!(Duration)).unwrap();
    assert_eq!(schema["type"], "string");
    assert_eq!(schema["pattern"], DURATION_PATTERN);
}

#[test]
fn constructors() {
    assert!(Duration::ZERO.is_zero());
    assert_eq!(Duration::from_secs(90).unwrap().to_string(), "1m30s");
    assert_eq!(Duration::from_secs(u64::MAX), None);
    assert_eq!(
        StdDuration::from(Duration::from_millis(5)),
        StdDuration::from_millis(5)
    );
}
