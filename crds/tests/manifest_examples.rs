//! Every policy under manifests/examples/ parses strictly (unknown keys are
//! errors) and passes `validate()`: an example a user copies must apply.
//! (e2e/tests/examples.rs applies them to an API server with the CRD schemas.)

use std::path::Path;

use pgwarden_api::DatabaseAccessPolicy;
use serde::Deserialize;

#[test]
fn example_policies_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples");
    let mut policies = 0;
    for entry in std::fs::read_dir(&dir).expect("manifests/examples exists") {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = serde_yaml_ng::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if value.get("kind").and_then(|k| k.as_str()) != Some("DatabaseAccessPolicy") {
                continue;
            }
            let dap: DatabaseAccessPolicy = serde_yaml_ng::from_value(value)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let errors = dap.spec.validate();
            assert!(errors.is_empty(), "{}: {errors:?}", path.display());
            policies += 1;
        }
    }
    assert!(
        policies >= 4,
        "expected the example policies, found {policies}"
    );
}
