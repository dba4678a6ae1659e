//! docs/api-reference.md names every field of both CRDs' schemas, and no
//! field they do not have: the page cannot drift from the types.

use std::collections::BTreeSet;

use kube::CustomResourceExt;
use pgwarden_api::{ApprovalRequest, DatabaseAccessPolicy};
use serde_json::Value;

const PAGE: &str = include_str!("../../docs/api-reference.md");

/// Every property path of a CRD's schema: `spec.rules[].name`.
fn schema_paths(crd: &impl serde::Serialize) -> BTreeSet<String> {
    let crd = serde_json::to_value(crd).expect("CRD serializes");
    let root = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut out = BTreeSet::new();
    walk(root, "", &mut out);
    // The object's own envelope is Kubernetes', not ours.
    out.retain(|p| p.starts_with("spec") || p.starts_with("status"));
    out
}

fn walk(node: &Value, path: &str, out: &mut BTreeSet<String>) {
    let Some(props) = node.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (name, child) in props {
        let p = if path.is_empty() {
            name.clone()
        } else {
            format!("{path}.{name}")
        };
        out.insert(p.clone());
        match child.get("items") {
            Some(items) => walk(items, &format!("{p}[]"), out),
            None => walk(child, &p, out),
        }
    }
}

/// Every `spec.…` or `status.…` path the page writes in backticks.
fn page_paths() -> BTreeSet<String> {
    PAGE.split('`')
        .skip(1)
        .step_by(2)
        .filter(|t| t.starts_with("spec.") || t.starts_with("status."))
        .filter(|t| {
            t.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '[' | ']'))
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_page_names_every_field_and_only_real_ones() {
    let mut schema = schema_paths(&DatabaseAccessPolicy::crd());
    schema.extend(schema_paths(&ApprovalRequest::crd()));
    schema.remove("spec");
    schema.remove("status");
    let page = page_paths();
    let missing: Vec<_> = schema.difference(&page).collect();
    assert!(
        missing.is_empty(),
        "docs/api-reference.md does not describe: {missing:#?}"
    );
    let unknown: Vec<_> = page.difference(&schema).collect();
    assert!(
        unknown.is_empty(),
        "docs/api-reference.md names fields the CRDs do not have: {unknown:#?}"
    );
}
