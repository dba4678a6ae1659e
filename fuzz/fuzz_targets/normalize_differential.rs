//! The verdict cache keys a text by its numeric-literal-free form
//! (`normalize::numeric_key`): two texts with one key share one verdict.
//! Differential: a text and its key analyse to the same statements, or
//! both fail — else one text would get another's verdict.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgwarden_sidecar::policy::analyze::{analyze, Settings};
use pgwarden_sidecar::policy::normalize::numeric_key;

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let Some(key) = numeric_key(sql) else {
        return;
    };
    let s = Settings::default();
    match (analyze(sql, s), analyze(&key, s)) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "{sql:?} => {key:?}"),
        (Err(_), Err(_)) => {}
        (a, b) => panic!("{sql:?} => {key:?}: {a:?} vs {b:?}"),
    }
});
