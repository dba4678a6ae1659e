//! The DESIGN.md §2 examples (tests/fixtures) parse to the values they show, and
//! unknown keys anywhere in a spec are rejected.

use pgwarden_api::{
    Action, ApprovalPhase, ApprovalRequest, DatabaseAccessPolicy, DecisionAction, MaskStrategy,
    StatementClass, TlsMode, API_VERSION,
};
use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;

const POLICY: &str = include_str!("fixtures/database-access-policy.yaml");
const APPROVAL: &str = include_str!("fixtures/approval-request.yaml");

fn parse<T: DeserializeOwned>(yaml: &str) -> T {
    serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("fixture does not parse: {e}"))
}

#[test]
fn policy_example_has_the_values_shown() {
    let dap: DatabaseAccessPolicy = parse(POLICY);
    assert_eq!(dap.metadata.name.as_deref(), Some("nightly-migrations"));
    assert_eq!(dap.metadata.namespace.as_deref(), Some("ci"));
    let spec = &dap.spec;

    let labels = spec
        .pod_selector
        .as_ref()
        .and_then(|s| s.match_labels.as_ref());
    assert_eq!(
        labels.and_then(|l| l.get("app")).map(String::as_str),
        Some("copilot-nightly")
    );

    let oidc = spec.identity.oidc.as_ref().expect("oidc identity");
    assert_eq!(oidc.issuer, "https://token.actions.githubusercontent.com");
    assert_eq!(oidc.audiences, ["pgwarden"]);
    assert_eq!(oidc.subjects, ["repo:acme/shop:*"]);
    assert_eq!(
        oidc.claims.get("repository_owner").map(String::as_str),
        Some("acme")
    );
    assert!(spec.identity.kubernetes.is_none() && spec.identity.local_trust.is_none());

    let db = &spec.database;
    assert_eq!(
        (db.host.as_str(), db.port, db.name.as_str()),
        ("prod-pg.databases.svc", 5432, "shop")
    );
    assert_eq!(db.credentials_secret, "prod-pg-ai");
    let tls = db.tls.as_ref().expect("tls");
    assert_eq!(tls.mode, TlsMode::VerifyFull);
    assert_eq!(tls.ca_secret.as_deref(), Some("prod-pg-ca"));

    assert_eq!(spec.default_action, Action::Deny);
    let rules: Vec<(&str, Action)> = spec
        .rules
        .iter()
        .map(|r| (r.name.as_str(), r.action))
        .collect();
    assert_eq!(
        rules,
        [
            ("no-file-access", Action::Deny),
            ("schema-changes", Action::RequireApproval),
            ("bulk-writes", Action::RequireApproval),
            ("app-data", Action::Allow),
        ]
    );
    assert_eq!(spec.rules[0].functions, ["pg_read_*", "lo_*"]);
    assert_eq!(spec.rules[1].statements, [StatementClass::Ddl]);
    assert_eq!(
        spec.rules[2].statements,
        [StatementClass::Update, StatementClass::Delete]
    );
    assert!(spec.rules[2].unfiltered);
    assert!(!spec.rules[3].unfiltered);
    assert_eq!(spec.rules[3].tables.len(), 3);

    let masks: Vec<(&str, MaskStrategy, Option<u32>)> = spec
        .masking
        .iter()
        .map(|m| (m.columns[0].as_str(), m.strategy, m.keep_last))
        .collect();
    assert_eq!(
        masks,
        [
            (
                "public.customers.card_number",
                MaskStrategy::Partial,
                Some(4)
            ),
            ("public.customers.email", MaskStrategy::Hash, None),
            ("*.*.ssn", MaskStrategy::Redact, None),
        ]
    );

    let limits = spec.limits.as_ref().expect("limits");
    assert_eq!(limits.max_rows, Some(1000));
    assert_eq!(
        limits.statement_timeout.map(|d| d.as_std().as_secs()),
        Some(30)
    );

    let approval = spec.approval.as_ref().expect("approval");
    assert_eq!(approval.approvers.groups, ["dba-oncall"]);
    assert!(approval.approvers.users.is_empty());
    assert_eq!(approval.wait.map(|d| d.as_std().as_secs()), Some(900));
    assert_eq!(
        approval.expires_after.map(|d| d.as_std().as_secs()),
        Some(3600)
    );

    assert_eq!(
        spec.recording.as_ref().and_then(|r| r.result_rows),
        Some(100)
    );

    let status = dap.status.as_ref().expect("status");
    assert_eq!(status.observed_generation, Some(3));
    assert_eq!(
        (status.selected_pods, status.applied_sidecars),
        (Some(4), Some(4))
    );

    assert_eq!(spec.validate(), vec![]);
}

#[test]
fn approval_example_has_the_values_shown() {
    let apr: ApprovalRequest = parse(APPROVAL);
    let spec = &apr.spec;
    assert_eq!(spec.policy, "nightly-migrations");
    assert_eq!(spec.requester.subject, "repo:acme/shop:ref:refs/heads/main");
    assert_eq!(spec.requester.pod.as_deref(), Some("ci/copilot-x7k2p"));
    assert_eq!(spec.requester.service_account.as_deref(), Some("ci-runner"));
    assert_eq!(spec.database, "shop");
    assert_eq!(spec.statement, "ALTER TABLE orders ADD COLUMN note text");
    assert!(spec.parameters.is_empty());
    assert!(spec.fingerprint.starts_with("sha256:"));
    assert_eq!(spec.reason, "rule schema-changes: DDL");

    let decision = spec.decision.as_ref().expect("decision");
    assert_eq!(decision.action, DecisionAction::Approve);
    assert_eq!(decision.decided_by.as_deref(), Some("alice@example.com"));

    let status = apr.status.as_ref().expect("status");
    assert_eq!(status.phase, ApprovalPhase::Executed);
    assert_eq!(status.result.as_deref(), Some("ALTER TABLE"));
}

#[test]
fn parameters_keep_sql_null_apart_from_text() {
    let mut doc: Value = parse(APPROVAL);
    doc["spec"]["parameters"] = parse("[\"42\", null, \"\"]");
    let apr: ApprovalRequest = serde_yaml_ng::from_value(doc).unwrap();
    assert_eq!(
        apr.spec.parameters,
        [Some("42".into()), None, Some(String::new())]
    );
}

#[test]
fn examples_round_trip() {
    let dap: DatabaseAccessPolicy = parse(POLICY);
    let yaml = serde_yaml_ng::to_string(&dap).unwrap();
    assert_eq!(parse::<DatabaseAccessPolicy>(&yaml), dap);
    assert!(
        yaml.contains("credentialsSecret: prod-pg-ai"),
        "camelCase keys: {yaml}"
    );
    assert!(yaml.contains("mode: verify-full"), "{yaml}");

    let apr: ApprovalRequest = parse(APPROVAL);
    let yaml = serde_yaml_ng::to_string(&apr).unwrap();
    assert_eq!(parse::<ApprovalRequest>(&yaml), apr);
    assert!(
        yaml.starts_with(&format!("apiVersion: {API_VERSION}")),
        "{yaml}"
    );
}

#[test]
fn defaults_apply_when_fields_are_omitted() {
    let dap: DatabaseAccessPolicy = parse(
        "apiVersion: pgwarden.io/v1alpha1
kind: DatabaseAccessPolicy
metadata: {name: minimal}
spec:
  identity: {localTrust: {subject: dev}}
  database: {host: 127.0.0.1, name: shop, credentialsSecret: pg}
",
    );
    let spec = &dap.spec;
    assert_eq!(spec.database.port, pgwarden_api::DEFAULT_PORT);
    assert_eq!(spec.default_action, Action::Deny);
    assert!(spec.rules.is_empty() && spec.masking.is_empty());
    assert!(spec.limits.is_none() && spec.approval.is_none() && spec.recording.is_none());
    assert_eq!(spec.validate(), vec![]);
}

#[test]
fn statement_classes_use_policy_spelling() {
    for class in StatementClass::ALL {
        let yaml = serde_yaml_ng::to_string(&class).unwrap();
        assert_eq!(yaml.trim(), class.as_str());
        assert_eq!(parse::<StatementClass>(class.as_str()), class);
    }
    assert!(serde_yaml_ng::from_str::<StatementClass>("CopyFrom").is_err());
    assert!(serde_yaml_ng::from_str::<StatementClass>("select").is_err());
}

/// Inserts `typo: 1` into the mapping at `path` (keys, or indexes into sequences).
fn with_unknown_key(mut doc: Value, path: &[&str]) -> Value {
    let mut node = &mut doc;
    for key in path {
        node = match key.parse::<usize>() {
            Ok(i) => &mut node[i],
            Err(_) => &mut node[*key],
        };
    }
    let map = node
        .as_mapping_mut()
        .unwrap_or_else(|| panic!("{path:?} is not a mapping in the fixture"));
    map.insert("typo".into(), 1.into());
    doc
}

#[test]
fn unknown_spec_fields_are_rejected() {
    let policy_paths: &[&[&str]] = &[
        &["spec"],
        &["spec", "identity"],
        &["spec", "identity", "oidc"],
        &["spec", "database"],
        &["spec", "database", "tls"],
        &["spec", "rules", "2"],
        &["spec", "masking", "0"],
        &["spec", "limits"],
        &["spec", "approval"],
        &["spec", "approval", "approvers"],
        &["spec", "recording"],
    ];
    for path in policy_paths {
        let doc = with_unknown_key(parse(POLICY), path);
        let err = serde_yaml_ng::from_value::<DatabaseAccessPolicy>(doc)
            .expect_err(&format!("typo at {path:?} accepted"))
            .to_string();
        assert!(err.contains("unknown field `typo`"), "{path:?}: {err}");
    }

    let approval_paths: &[&[&str]] = &[&["spec"], &["spec", "requester"], &["spec", "decision"]];
    for path in approval_paths {
        let doc = with_unknown_key(parse(APPROVAL), path);
        let err = serde_yaml_ng::from_value::<ApprovalRequest>(doc)
            .expect_err(&format!("typo at {path:?} accepted"))
            .to_string();
        assert!(err.contains("unknown field `typo`"), "{path:?}: {err}");
    }
}

#[test]
fn a_misspelt_key_names_itself_and_its_place() {
    let yaml = POLICY.replace("defaultAction:", "defaultActon:");
    let err = serde_yaml_ng::from_str::<DatabaseAccessPolicy>(&yaml)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("spec: unknown field `defaultActon`"),
        "{err}"
    );
    assert!(err.contains("line"), "error should carry a location: {err}");
}

#[test]
fn bad_enum_and_duration_values_are_rejected() {
    let cases = [
        ("defaultAction: Deny", "defaultAction: Block"),
        ("mode: verify-full", "mode: verify_full"),
        ("statements: [DDL]", "statements: [ddl]"),
        ("strategy: Hash", "strategy: Sha256"),
        ("statementTimeout: 30s", "statementTimeout: 30"),
        ("wait: 15m", "wait: -15m"),
        ("expiresAfter: 1h", "expiresAfter: 1 hour"),
    ];
    for (good, bad) in cases {
        assert!(POLICY.contains(good), "fixture lacks {good:?}");
        let yaml = POLICY.replace(good, bad);
        assert!(
            serde_yaml_ng::from_str::<DatabaseAccessPolicy>(&yaml).is_err(),
            "{bad:?} accepted"
        );
    }
}
