use crate::{DatabaseAccessPolicy, DatabaseAccessPolicySpec};

/// A valid spec with these rules (YAML flow list) and masking.
fn spec(rules: &str, masking: &str) -> DatabaseAccessPolicySpec {
    let yaml = format!(
        "apiVersion: pgwarden.io/v1alpha1\nkind: DatabaseAccessPolicy\nmetadata: {{name: p}}\nspec:\n  identity: {{localTrust: {{subject: dev}}}}\n  database: {{host: h, name: shop, credentialsSecret: s}}\n  rules: {rules}\n  masking: {masking}\n"
    );
    let spec = serde_yaml_ng::from_str::<DatabaseAccessPolicy>(&yaml)
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"))
        .spec;
    assert_eq!(spec.validate(), vec![], "lint cases are valid policies");
    spec
}

fn lint(rules: &str) -> Vec<(String, String)> {
    spec(rules, "[]")
        .lint()
        .into_iter()
        .map(|w| (w.path, w.message))
        .collect()
}

#[test]
fn the_design_example_and_the_shipped_examples_are_clean() {
    for yaml in [
        include_str!("../../tests/fixtures/database-access-policy.yaml"),
        include_str!("../../../manifests/examples/standalone-policy.yaml"),
        include_str!("../../../manifests/examples/github-actions-policy.yaml"),
    ] {
        let dap = serde_yaml_ng::from_str::<DatabaseAccessPolicy>(yaml).expect("parses");
        assert_eq!(dap.spec.lint(), vec![], "{yaml}");
    }
}

#[test]
fn clean_rules_give_no_warning() {
    let clean = [
        r#"[{name: a, action: Allow, tables: ["public.orders", "*.orders", "sales.*", "*"]}]"#,
        r#"[{name: a, action: Allow, tables: ["*orders"]}]"#,
        r#"[{name: a, action: Deny, functions: ["pg_read_*", "lower", "public.f"]}]"#,
        // Narrower first, wider after: both decide something.
        r#"[{name: a, action: Deny, tables: ["public.secrets"]}, {name: b, action: Allow, tables: ["public.*"]}]"#,
        // Different domains: calls vs relations, class-only vs relations.
        r#"[{name: a, action: Allow, functions: ["*"]}, {name: b, action: Deny, statements: [SELECT]}]"#,
        r#"[{name: a, action: Allow, tables: ["*"]}, {name: b, action: Deny, statements: [DDL]}]"#,
        // An unfiltered rule does not cover a filtered one.
        r#"[{name: a, action: RequireApproval, statements: [DELETE], unfiltered: true}, {name: b, action: Allow, statements: [DELETE]}]"#,
        r#"[{name: a, action: Allow, statements: [SESSION]}, {name: b, action: Allow, statements: [CODE]}]"#,
    ];
    for rules in clean {
        assert_eq!(lint(rules), vec![], "{rules}");
    }
}

#[test]
fn each_warning_names_its_field() {
    // (rules, the one warning's path, words its message contains)
    let cases: &[(&str, &str, &[&str])] = &[
        (
            r#"[{name: a, action: Allow, tables: ["public.orders", "orders"]}]"#,
            "spec.rules[0].tables[1]",
            &[r#""orders" has no schema: it never matches; write "public.orders" or "*.orders""#],
        ),
        (
            r#"[{name: a, action: Allow, tables: ["orders_*"]}]"#,
            "spec.rules[0].tables[0]",
            &["no schema", "only schemas named like it"],
        ),
        (
            r#"[{name: a, action: Allow, tables: ["public.Orders"]}]"#,
            "spec.rules[0].tables[0]",
            &["upper-case", r#""public.orders""#],
        ),
        (
            r#"[{name: a, action: Allow, tables: ['public."Orders"']}]"#,
            "spec.rules[0].tables[0]",
            &["double quotes", r#""public.Orders""#],
        ),
        (
            r#"[{name: a, action: Allow, tables: ["shop.public.orders"]}]"#,
            "spec.rules[0].tables[0]",
            &["3 parts", "schema.table"],
        ),
        (
            r#"[{name: a, action: Allow, tables: ["public."]}]"#,
            "spec.rules[0].tables[0]",
            &["empty part"],
        ),
        (
            r#"[{name: a, action: Allow, tables: ["public.orders "]}]"#,
            "spec.rules[0].tables[0]",
            &["white space"],
        ),
        (
            r#"[{name: a, action: Deny, functions: ["upper(text)"]}]"#,
            "spec.rules[0].functions[0]",
            &["argument list", r#""upper""#],
        ),
        (
            r#"[{name: a, action: Deny, functions: ["Dump_Cards"]}]"#,
            "spec.rules[0].functions[0]",
            &["upper-case", r#""dump_cards""#],
        ),
        (
            r#"[{name: a, action: Allow, statements: [SELECT, SESSION], tables: ["public.*"]}]"#,
            "spec.rules[0].statements[1]",
            &["SESSION statements name no table"],
        ),
        (
            r#"[{name: a, action: Deny, statements: [TRANSACTION]}]"#,
            "spec.rules[0].statements[0]",
            &["always allowed"],
        ),
        (
            r#"[{name: a, action: Deny, functions: ["f"], tables: ["public.t"]}]"#,
            "spec.rules[0].tables",
            &["ignored", "whatever table"],
        ),
        (
            r#"[{name: a, action: Deny, functions: ["f"], statements: [DELETE], unfiltered: true}]"#,
            "spec.rules[0].unfiltered",
            &["ignored"],
        ),
        // Same selectors, another action: the second never decides.
        (
            r#"[{name: a, action: Allow, statements: [DELETE], tables: ["public.orders"]}, {name: b, action: Deny, statements: [DELETE], tables: ["public.orders"]}]"#,
            "spec.rules[1]",
            &[
                "never decides",
                r#"spec.rules[0] ("a", Allow)"#,
                "Deny never applies",
            ],
        ),
        // After an allow-everything rule (every class, no tables), no rule
        // without functions decides anything.
        (
            r#"[{name: all, action: Allow, statements: [SELECT, INSERT, UPDATE, DELETE, MERGE, TRUNCATE, COPY_FROM, COPY_TO, DDL, PRIVILEGE, TRANSACTION, SESSION, EXPLAIN, MAINTENANCE, CODE]}, {name: no-ddl, action: Deny, statements: [DDL]}]"#,
            "spec.rules[1]",
            &["never decides", "all"],
        ),
        (
            r#"[{name: all, action: Allow, tables: ["*"]}, {name: no-secrets, action: Deny, statements: [SELECT], tables: ["public.secrets"]}]"#,
            "spec.rules[1]",
            &["never decides"],
        ),
        (
            r#"[{name: pub, action: Allow, statements: [SELECT], tables: ["public.*"]}, {name: o, action: Deny, statements: [SELECT], tables: ["public.o*", "public.orders"]}]"#,
            "spec.rules[1]",
            &["never decides"],
        ),
        (
            r#"[{name: files, action: Deny, functions: ["pg_*"]}, {name: read, action: Deny, functions: ["pg_read_*"]}]"#,
            "spec.rules[1]",
            &["redundant", "same action Deny"],
        ),
    ];
    for (rules, path, words) in cases {
        let warnings = lint(rules);
        let [(p, message)] = warnings.as_slice() else {
            panic!("{rules}: expected one warning, got {warnings:#?}");
        };
        assert_eq!(p, path, "{rules}: {message}");
        for w in *words {
            assert!(message.contains(w), "{rules}: {w:?} not in {message:?}");
        }
    }
}

#[test]
fn unquoted_lookalikes_give_two_warnings() {
    // "Orders": no schema, and capitals a folded name never has.
    let w = lint(r#"[{name: a, action: Allow, tables: ["Orders"]}]"#);
    assert_eq!(w.len(), 2, "{w:#?}");
    assert!(w.iter().all(|(p, _)| p == "spec.rules[0].tables[0]"));
    assert!(w[0].1.contains("no schema") && w[1].1.contains("upper-case"));
}

#[test]
fn masking_columns_are_folded_too() {
    let w = spec(
        "[]",
        r#"[{columns: ["public.customers.Email"], strategy: Redact}]"#,
    )
    .lint();
    assert_eq!(w.len(), 1, "{w:#?}");
    assert_eq!(w[0].path, "spec.masking[0].columns[0]");
    assert!(w[0].message.contains("\"public.customers.email\""));
}

#[test]
fn display_is_path_then_message() {
    let w = spec(r#"[{name: a, action: Allow, tables: ["orders"]}]"#, "[]").lint();
    assert!(w[0]
        .to_string()
        .starts_with("spec.rules[0].tables[0]: \"orders\" has no schema"));
}
