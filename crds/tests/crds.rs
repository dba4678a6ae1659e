//! The committed `crds/*.yaml` match the code, and their schemas are structural
//! (https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#specifying-a-structural-schema).

use std::path::Path;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use pgwarden_api::{crd_yaml, CRDGEN_COMMAND};
use serde_json::{Map, Value};

fn crds() -> Vec<(&'static str, CustomResourceDefinition)> {
    crd_yaml()
        .expect("CRDs serialize")
        .into_iter()
        .map(|(file, yaml)| {
            (
                file,
                serde_yaml_ng::from_str(&yaml).expect("generated YAML parses"),
            )
        })
        .collect()
}

#[test]
fn committed_crd_files_are_up_to_date() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let chart_dir = crate_dir.join("../charts/pgwarden/crds");
    for (file, generated) in crd_yaml().unwrap() {
        for path in [crate_dir.join(file), chart_dir.join(file)] {
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
            committed == generated,
            "{} is missing or out of date with the Rust types; run `{CRDGEN_COMMAND}` and commit the result",
            path.display()
        );
        }
    }
}

#[test]
fn crds_have_the_expected_names() {
    let names: Vec<(&str, String, String, Vec<String>)> = crds()
        .iter()
        .map(|(file, crd)| {
            let n = &crd.spec.names;
            (
                *file,
                crd.spec.scope.clone(),
                n.kind.clone(),
                n.short_names.clone().unwrap_or_default(),
            )
        })
        .collect();
    let expected = [
        (
            "databaseaccesspolicies.yaml",
            "Namespaced",
            "DatabaseAccessPolicy",
            "dap",
        ),
        (
            "approvalrequests.yaml",
            "Namespaced",
            "ApprovalRequest",
            "apr",
        ),
    ];
    assert_eq!(names.len(), expected.len());
    for ((file, scope, kind, short), (e_file, e_scope, e_kind, e_short)) in
        names.iter().zip(expected)
    {
        assert_eq!(
            (*file, scope.as_str(), kind.as_str(), short.as_slice()),
            (e_file, e_scope, e_kind, &[e_short.to_owned()][..])
        );
    }
    for (file, crd) in crds() {
        assert_eq!(crd.spec.group, "pgwarden.io", "{file}");
        let [version] = crd.spec.versions.as_slice() else {
            panic!("{file}: expected exactly one version");
        };
        assert_eq!(version.name, "v1alpha1", "{file}");
        assert!(version.served && version.storage, "{file}");
        let status = version
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref());
        assert!(status.is_some(), "{file}: status subresource");
    }
}

/// Formats the apiserver recognises; anything else draws an "unrecognized format" warning.
const KNOWN_FORMATS: &[&str] = &[
    "int32",
    "int64",
    "float",
    "double",
    "byte",
    "binary",
    "date",
    "date-time",
    "duration",
    "password",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
];

/// Walks a schema and collects every structural-schema violation, by JSON path.
/// Stricter than the apiserver in one respect: no `anyOf`/`oneOf`/`allOf`/`not` at
/// all (the apiserver allows them as pure value validations); these types need none.
fn structural_errors(schema: &Value, path: &str, errs: &mut Vec<String>) {
    let Some(node) = schema.as_object() else {
        errs.push(format!("{path}: not an object"));
        return;
    };
    let mut err = |what: &str| errs.push(format!("{path}: {what}"));

    for forbidden in [
        "anyOf",
        "oneOf",
        "allOf",
        "not",
        "$ref",
        "definitions",
        "$defs",
        "$schema",
    ] {
        if node.contains_key(forbidden) {
            err(&format!("has {forbidden}"));
        }
    }
    let open = node.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
        || node.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    let ty = node.get("type").and_then(Value::as_str);
    if ty.is_none() && !open {
        err("has no single string `type`");
    }
    if let Some(format) = node.get("format").and_then(Value::as_str) {
        if !KNOWN_FORMATS.contains(&format) {
            err(&format!("format {format:?} is not one Kubernetes knows"));
        }
    }
    if let Some(nullable) = node.get("nullable") {
        if !nullable.is_boolean() {
            err("nullable is not a boolean");
        }
    }
    if let Some(rules) = node
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        for rule in rules {
            if rule
                .get("rule")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                err("x-kubernetes-validations entry without a rule");
            }
        }
    }

    let props = node.get("properties").and_then(Value::as_object);
    match node.get("additionalProperties") {
        Some(_) if props.is_some() => err("has both properties and additionalProperties"),
        Some(Value::Bool(false)) => err("has additionalProperties: false"),
        Some(extra @ Value::Object(_)) => {
            structural_errors(extra, &format!("{path}.additionalProperties"), errs)
        }
        _ => {}
    }
    if let Some(required) = node.get("required").and_then(Value::as_array) {
        for name in required.iter().filter_map(Value::as_str) {
            if !props.is_some_and(|p| p.contains_key(name)) {
                errs.push(format!("{path}: required {name:?} is not a property"));
            }
        }
    }
    match (ty, props, node.get("items")) {
        (Some("object"), Some(props), _) => {
            for (name, prop) in props {
                structural_errors(prop, &format!("{path}.{name}"), errs);
            }
        }
        (Some("array"), _, Some(items)) => structural_errors(items, &format!("{path}[*]"), errs),
        (Some("array"), _, None) => errs.push(format!("{path}: array without items")),
        (Some(other), Some(_), _) => errs.push(format!("{path}: properties on a {other}")),
        _ => {}
    }
}

fn open_api_schema(crd: &CustomResourceDefinition) -> Value {
    let version = &crd.spec.versions[0];
    let schema = version
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref());
    serde_json::to_value(schema.expect("CRD has a schema")).unwrap()
}

#[test]
fn schemas_are_structural() {
    for (file, crd) in crds() {
        let schema = open_api_schema(&crd);
        let mut errs = Vec::new();
        structural_errors(&schema, "", &mut errs);
        assert!(
            errs.is_empty(),
            "{file}: schema is not structural:\n{}",
            errs.join("\n")
        );
    }
}

#[test]
fn structural_checker_catches_violations() {
    let cases = [
        (
            r#"{"type":"object","properties":{"a":{"description":"no type"}}}"#,
            ".a: has no single string `type`",
        ),
        (
            r#"{"type":"object","properties":{"a":{"type":"string","anyOf":[{"type":"string"}]}}}"#,
            ".a: has anyOf",
        ),
        (r#"{"type":"array"}"#, ": array without items"),
        (
            r#"{"type":"array","items":{"type":["string","null"]}}"#,
            "[*]: has no single string `type`",
        ),
        (
            r#"{"type":"object","properties":{},"additionalProperties":{"type":"string"}}"#,
            ": has both properties and additionalProperties",
        ),
        (
            r#"{"type":"object","additionalProperties":false}"#,
            ": has additionalProperties: false",
        ),
        (
            r#"{"type":"integer","format":"uint32"}"#,
            r#": format "uint32" is not one Kubernetes knows"#,
        ),
        (
            r#"{"type":"object","properties":{},"required":["x"]}"#,
            r#": required "x" is not a property"#,
        ),
    ];
    for (schema, expected) in cases {
        let mut errs = Vec::new();
        structural_errors(&serde_json::from_str(schema).unwrap(), "", &mut errs);
        assert_eq!(errs, [expected], "{schema}");
    }
}

/// The schema node a printer column's `.a.b.c` path points at, if any.
fn lookup<'a>(schema: &'a Value, json_path: &str) -> Option<&'a Map<String, Value>> {
    json_path
        .trim_start_matches('.')
        .split('.')
        .try_fold(schema, |node, key| node.get("properties")?.get(key))?
        .as_object()
}

#[test]
fn printer_columns_point_at_schema_fields() {
    for (file, crd) in crds() {
        let version = &crd.spec.versions[0];
        let schema = open_api_schema(&crd);
        for col in version.additional_printer_columns.iter().flatten() {
            if col.json_path.starts_with(".metadata.") {
                continue;
            }
            let field = lookup(&schema, &col.json_path).unwrap_or_else(|| {
                panic!(
                    "{file}: column {} -> {} is not in the schema",
                    col.name, col.json_path
                )
            });
            let field_type = field.get("type").and_then(Value::as_str);
            let expected = match col.type_.as_str() {
                "date" => "string",
                other => other,
            };
            assert_eq!(field_type, Some(expected), "{file}: column {}", col.name);
        }
    }
}
