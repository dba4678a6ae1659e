//! docs/threat-model.md backs every "defended" line with a test: each
//! reference it makes (`FILE.rs::name` for e2e tests, `` `crate` unit
//! `module::tests::name` `` for unit tests) names a test function that
//! exists, so the page cannot point at a test that was renamed or removed.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().and_then(|e| e.to_str()) == Some("rs") {
            out.push(p);
        }
    }
}

fn defines_fn(text: &str, name: &str) -> bool {
    [format!("fn {name}("), format!("fn {name}<")]
        .iter()
        .any(|needle| text.contains(needle.as_str()))
}

#[test]
fn every_test_the_threat_model_names_exists() {
    let page = std::fs::read_to_string(repo().join("docs/threat-model.md")).unwrap();
    let mut checked = 0;
    let mut missing = Vec::new();
    for row in page.lines().filter(|l| l.starts_with('|')) {
        let Some(cell) = row.trim_end_matches('|').rsplit('|').next() else {
            continue;
        };
        // e2e references: `file.rs::test_name` (optionally without ::name = the whole file).
        for reference in cell.split('`').skip(1).step_by(2) {
            if let Some((file, name)) = reference.split_once(".rs::") {
                let path = repo().join("e2e/tests").join(format!("{file}.rs"));
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                if !defines_fn(&text, name) {
                    missing.push(reference.to_string());
                }
                checked += 1;
            } else if let Some(file) = reference.strip_suffix(".rs") {
                if !repo().join("e2e/tests").join(format!("{file}.rs")).exists() {
                    missing.push(reference.to_string());
                }
                checked += 1;
            }
        }
        // unit references: `crate` unit `a::b::name`
        let parts: Vec<&str> = cell.split('`').collect();
        for (i, piece) in parts.iter().enumerate() {
            if piece.trim() != "unit" || i == 0 || i + 1 >= parts.len() {
                continue;
            }
            let krate = parts[i - 1];
            let path = parts[i + 1];
            let dir = match krate {
                "sidecar" => "sidecar/src",
                "pgwarden-api" => "crds/src",
                "operator" => "operator/src",
                other => panic!("unknown crate {other} in {row}"),
            };
            let name = path.rsplit("::").next().unwrap();
            let mut files = Vec::new();
            rust_files(&repo().join(dir), &mut files);
            let found = files
                .iter()
                .any(|f| defines_fn(&std::fs::read_to_string(f).unwrap_or_default(), name));
            if !found {
                missing.push(format!("{krate} unit {path}"));
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 30,
        "only {checked} references found: is the table format still parsed?"
    );
    assert!(
        missing.is_empty(),
        "docs/threat-model.md names tests that do not exist: {missing:?}"
    );
}
