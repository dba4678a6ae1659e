use super::*;
use crate::{
    ApprovalSettings, DatabaseAccessPolicy, DatabaseTls, KubernetesIdentity, LocalTrustIdentity,
    MaskingRule, OidcIdentity, PodIdentity, Rule,
};

type Mutate = fn(&mut DatabaseAccessPolicySpec);

/// The DESIGN.md example: every check passes on it.
fn good_spec() -> DatabaseAccessPolicySpec {
    let yaml = include_str!("../../tests/fixtures/database-access-policy.yaml");
    serde_yaml_ng::from_str::<DatabaseAccessPolicy>(yaml)
        .expect("fixture parses")
        .spec
}

fn oidc(spec: &mut DatabaseAccessPolicySpec) -> &mut OidcIdentity {
    spec.identity.oidc.as_mut().expect("fixture uses oidc")
}

fn kubernetes_only(spec: &mut DatabaseAccessPolicySpec, audience: &str) {
    spec.identity.oidc = None;
    spec.identity.kubernetes = Some(KubernetesIdentity {
        audience: audience.into(),
    });
}

fn tls(mode: TlsMode, ca_secret: Option<&str>, ca_file: Option<&str>) -> Option<DatabaseTls> {
    Some(DatabaseTls {
        mode,
        ca_secret: ca_secret.map(Into::into),
        ca_file: ca_file.map(Into::into),
    })
}

fn masking(spec: &mut DatabaseAccessPolicySpec, i: usize) -> &mut MaskingRule {
    &mut spec.masking[i]
}

fn rule(spec: &mut DatabaseAccessPolicySpec, i: usize) -> &mut Rule {
    &mut spec.rules[i]
}

fn with_notify(name: &str, key: &str) -> ApprovalSettings {
    ApprovalSettings {
        notify: Some(crate::ApprovalNotify {
            url_secret_ref: crate::SecretKeyRef {
                name: name.into(),
                key: key.into(),
            },
        }),
        ..ApprovalSettings::default()
    }
}

#[test]
fn design_example_is_valid() {
    assert_eq!(good_spec().validate(), vec![]);
}

#[test]
fn accepted_variations() {
    let cases: &[(&str, Mutate)] = &[
        ("approval notifications to a Secret's URL", |s| {
            s.approval = Some(with_notify("slack-webhook", "webhook.url"))
        }),
        ("http issuer on 127.0.0.1", |s| {
            oidc(s).issuer = "http://127.0.0.1:8080/issuer".into()
        }),
        ("http issuer on localhost", |s| {
            oidc(s).issuer = "http://localhost:9000".into()
        }),
        ("http issuer on [::1]", |s| {
            oidc(s).issuer = "http://[::1]:9000/".into()
        }),
        ("jwksFile instead of jwksUri", |s| {
            let o = oidc(s);
            o.jwks_uri = None;
            o.jwks_file = Some("/etc/pgwarden/jwks.json".into());
        }),
        ("kubernetes identity", |s| kubernetes_only(s, "pgwarden")),
        ("localTrust identity", |s| {
            s.identity.oidc = None;
            s.identity.local_trust = Some(LocalTrustIdentity {
                subject: "dev".into(),
            });
        }),
        ("pod identity", |s| {
            s.identity.oidc = None;
            s.identity.pod = Some(PodIdentity::default());
        }),
        ("pod identity limited to service accounts", |s| {
            s.identity.oidc = None;
            s.identity.pod = Some(PodIdentity {
                service_accounts: vec!["ci-*".into()],
            });
        }),
        ("tls require without a CA", |s| {
            s.database.tls = tls(TlsMode::Require, None, None)
        }),
        ("tls verify-full with caFile", |s| {
            s.database.tls = tls(TlsMode::VerifyFull, None, Some("/ca.pem"))
        }),
        ("no tls", |s| s.database.tls = None),
        ("unfiltered DELETE only", |s| {
            rule(s, 2).statements = vec![StatementClass::Delete]
        }),
        ("rule naming only tables", |s| rule(s, 3).statements.clear()),
        ("Partial with keepFirst", |s| {
            let m = masking(s, 0);
            m.keep_last = None;
            m.keep_first = Some(2);
        }),
        ("all-glob column", |s| {
            masking(s, 2).columns = vec!["*.*.*".into()]
        }),
        ("no rules, no masking", |s| {
            s.rules.clear();
            s.masking.clear();
        }),
    ];
    for (name, mutate) in cases {
        let mut spec = good_spec();
        mutate(&mut spec);
        assert_eq!(spec.validate(), vec![], "{name}");
    }
}

#[test]
fn each_check_reports_its_path() {
    // (case, mutation, the one expected error's path, a word its message contains)
    let cases: &[(&str, Mutate, &str, &str)] = &[
        (
            "no identity",
            |s| s.identity.oidc = None,
            "spec.identity",
            "none",
        ),
        (
            "two identities",
            |s| {
                s.identity.local_trust = Some(LocalTrustIdentity {
                    subject: "dev".into(),
                })
            },
            "spec.identity",
            "oidc, localTrust",
        ),
        (
            "http issuer",
            |s| oidc(s).issuer = "http://issuer.example.com".into(),
            "spec.identity.oidc.issuer",
            "loopback",
        ),
        (
            "issuer without scheme",
            |s| oidc(s).issuer = "token.actions.githubusercontent.com".into(),
            "spec.identity.oidc.issuer",
            "URL",
        ),
        (
            "issuer without host",
            |s| oidc(s).issuer = "https:///x".into(),
            "spec.identity.oidc.issuer",
            "URL",
        ),
        (
            "ftp issuer",
            |s| oidc(s).issuer = "ftp://example.com".into(),
            "spec.identity.oidc.issuer",
            "https",
        ),
        (
            "http issuer with loopback userinfo",
            |s| oidc(s).issuer = "http://127.0.0.1@evil.example.com".into(),
            "spec.identity.oidc.issuer",
            "loopback",
        ),
        (
            "no audiences",
            |s| oidc(s).audiences.clear(),
            "spec.identity.oidc.audiences",
            "at least one",
        ),
        (
            "empty audience",
            |s| oidc(s).audiences.push(String::new()),
            "spec.identity.oidc.audiences[1]",
            "empty",
        ),
        (
            "empty subject glob",
            |s| oidc(s).subjects = vec![String::new()],
            "spec.identity.oidc.subjects[0]",
            "empty",
        ),
        (
            "http jwksUri",
            |s| oidc(s).jwks_uri = Some("http://keys.example.com/jwks".into()),
            "spec.identity.oidc.jwksUri",
            "https",
        ),
        (
            "jwksUri and jwksFile",
            |s| oidc(s).jwks_file = Some("/jwks.json".into()),
            "spec.identity.oidc",
            "at most one",
        ),
        (
            "empty kubernetes audience",
            |s| kubernetes_only(s, ""),
            "spec.identity.kubernetes.audience",
            "empty",
        ),
        (
            "kubernetes audience of the sidecar's own token",
            |s| kubernetes_only(s, "pgwarden.io/sidecar"),
            "spec.identity.kubernetes.audience",
            "reserved",
        ),
        (
            "oidc audience of the sidecar's own token",
            |s| oidc(s).audiences.push("pgwarden.io/sidecar".into()),
            "spec.identity.oidc.audiences[1]",
            "reserved",
        ),
        (
            "empty pod service account glob",
            |s| {
                s.identity.oidc = None;
                s.identity.pod = Some(PodIdentity {
                    service_accounts: vec!["".into()],
                });
            },
            "spec.identity.pod.serviceAccounts[0]",
            "empty",
        ),
        (
            "oidc and pod",
            |s| s.identity.pod = Some(PodIdentity::default()),
            "spec.identity",
            "oidc, pod",
        ),
        (
            "empty localTrust subject",
            |s| {
                s.identity.oidc = None;
                s.identity.local_trust = Some(LocalTrustIdentity::default());
            },
            "spec.identity.localTrust.subject",
            "empty",
        ),
        (
            "empty host",
            |s| s.database.host.clear(),
            "spec.database.host",
            "empty",
        ),
        (
            "port 0",
            |s| s.database.port = 0,
            "spec.database.port",
            "65535",
        ),
        (
            "empty database name",
            |s| s.database.name.clear(),
            "spec.database.name",
            "empty",
        ),
        (
            "empty credentialsSecret",
            |s| s.database.credentials_secret.clear(),
            "spec.database.credentialsSecret",
            "empty",
        ),
        (
            "verify-full without CA",
            |s| s.database.tls = tls(TlsMode::VerifyFull, None, None),
            "spec.database.tls",
            "caSecret or caFile",
        ),
        (
            "empty rule name",
            |s| rule(s, 1).name.clear(),
            "spec.rules[1].name",
            "empty",
        ),
        (
            "duplicate rule name",
            |s| rule(s, 3).name = "no-file-access".into(),
            "spec.rules[3].name",
            "spec.rules[0]",
        ),
        (
            "rule names nothing",
            |s| rule(s, 0).functions.clear(),
            "spec.rules[0]",
            "at least one of statements, tables, functions",
        ),
        (
            "empty table glob",
            |s| rule(s, 3).tables[1].clear(),
            "spec.rules[3].tables[1]",
            "empty",
        ),
        (
            "empty function glob",
            |s| rule(s, 0).functions.push(String::new()),
            "spec.rules[0].functions[2]",
            "empty",
        ),
        (
            "unfiltered SELECT",
            |s| rule(s, 2).statements.push(StatementClass::Select),
            "spec.rules[2].unfiltered",
            "UPDATE and DELETE",
        ),
        (
            "unfiltered without statements",
            |s| {
                let r = rule(s, 2);
                r.statements.clear();
                r.tables = vec!["public.orders".into()];
            },
            "spec.rules[2].unfiltered",
            "UPDATE and DELETE",
        ),
        (
            "Partial without keeps",
            |s| masking(s, 0).keep_last = None,
            "spec.masking[0]",
            "keepFirst or keepLast",
        ),
        (
            "keepLast on Hash",
            |s| masking(s, 1).keep_last = Some(4),
            "spec.masking[1]",
            "only to strategy Partial",
        ),
        (
            "no columns",
            |s| masking(s, 2).columns.clear(),
            "spec.masking[2].columns",
            "at least one",
        ),
        (
            "columns and detect",
            |s| masking(s, 2).detect = vec![crate::Detector::CreditCard],
            "spec.masking[2]",
            "either columns or detect",
        ),
        (
            "inPredicates on detect",
            |s| {
                let m = masking(s, 2);
                m.columns.clear();
                m.detect = vec![crate::Detector::Email];
                m.in_predicates = Some(crate::PredicateUse::Deny);
            },
            "spec.masking[2].inPredicates",
            "columns entries",
        ),
        (
            "two-part column",
            |s| masking(s, 1).columns = vec!["customers.email".into()],
            "spec.masking[1].columns[0]",
            "schema.table.column",
        ),
        (
            "four-part column",
            |s| {
                masking(s, 1)
                    .columns
                    .push("db.public.customers.email".into())
            },
            "spec.masking[1].columns[1]",
            "schema.table.column",
        ),
        (
            "empty column part",
            |s| masking(s, 2).columns = vec!["*..ssn".into()],
            "spec.masking[2].columns[0]",
            "schema.table.column",
        ),
        (
            "wait longer than the request lives",
            |s| {
                s.approval = Some(ApprovalSettings {
                    wait: Some(Duration::from_millis(3_600_000)),
                    expires_after: Some(Duration::from_millis(600_000)),
                    ..ApprovalSettings::default()
                })
            },
            "spec.approval.wait",
            "expiresAfter (10m)",
        ),
        (
            "notify without a Secret name",
            |s| s.approval = Some(with_notify("", "url")),
            "spec.approval.notify.urlSecretRef.name",
            "must not be empty",
        ),
        (
            "notify with a key no Secret can hold",
            |s| s.approval = Some(with_notify("slack", "url/token")),
            "spec.approval.notify.urlSecretRef.key",
            "is not a Secret key",
        ),
        (
            "default wait exceeds a short expiry",
            |s| {
                s.approval = Some(ApprovalSettings {
                    expires_after: Some(Duration::from_millis(60_000)),
                    ..ApprovalSettings::default()
                })
            },
            "spec.approval.wait",
            "5m is longer",
        ),
        (
            "store table that is not a plain name",
            |s| {
                s.recording = Some(crate::RecordingSettings {
                    store: Some(crate::RecordingStore {
                        postgres: Some(crate::PostgresRecordingStore {
                            dsn_secret: "audit".into(),
                            table: Some("records; DROP TABLE x".into()),
                        }),
                    }),
                    ..Default::default()
                })
            },
            "spec.recording.store.postgres.table",
            "plain table name",
        ),
    ];
    for (name, mutate, path, word) in cases {
        let mut spec = good_spec();
        mutate(&mut spec);
        let errs = spec.validate();
        assert!(
            matches!(errs.as_slice(), [e] if e.path == *path && e.message.contains(word)),
            "{name}: expected one error at {path} mentioning {word:?}, got {errs:#?}"
        );
    }
}

#[test]
fn reports_every_problem_in_document_order() {
    let mut spec = good_spec();
    spec.masking[0].keep_last = None;
    spec.database.port = 0;
    spec.identity.oidc = None;
    let paths: Vec<String> = spec.validate().into_iter().map(|e| e.path).collect();
    assert_eq!(
        paths,
        ["spec.identity", "spec.database.port", "spec.masking[0]"]
    );
}

#[test]
fn field_error_displays_path_then_message() {
    let e = FieldError::new(
        "spec.rules[2].unfiltered",
        "applies only to UPDATE and DELETE",
    );
    assert_eq!(
        e.to_string(),
        "spec.rules[2].unfiltered: applies only to UPDATE and DELETE"
    );
}
