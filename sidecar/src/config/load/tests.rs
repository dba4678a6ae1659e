use super::*;
use std::io::Write;

const POLICY: &str = r#"
apiVersion: pgwarden.io/v1alpha1
kind: DatabaseAccessPolicy
metadata: {name: p1, namespace: ci}
spec:
  identity: {localTrust: {subject: dev}}
  database: {host: 127.0.0.1, port: 5432, name: shop, credentialsSecret: cred}
  defaultAction: Allow
"#;

const SECRET: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: cred, namespace: ci}
stringData: {username: app, password: s3cret-pw}
"#;

fn files(docs: &[&str]) -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let paths = docs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let p = dir.path().join(format!("f{i}.yaml"));
            std::fs::File::create(&p)
                .unwrap()
                .write_all(d.as_bytes())
                .unwrap();
            p
        })
        .collect();
    (dir, paths)
}

fn errors(docs: &[&str]) -> Vec<ConfigError> {
    let (_d, paths) = files(docs);
    load_files(&paths, &LoadOptions::default())
        .expect_err("configuration should be refused")
        .0
}

#[test]
fn policy_and_secret_in_one_multi_document_file() {
    let (_d, paths) = files(&[&format!("{POLICY}---\n{SECRET}\n---\n")]);
    let cfg = load_files(&paths, &LoadOptions::default()).unwrap();
    let p = cfg.select(Some("shop")).unwrap();
    assert_eq!(p.id, "ci/p1");
    assert_eq!(p.upstream.credential.username, "app");
    assert_eq!(p.upstream.credential.password.expose(), "s3cret-pw");
    // A single policy also serves a client that names no database.
    assert!(cfg.select(None).is_some());
    assert!(cfg.select(Some("other")).is_none());
    // Debug output never shows the password.
    assert!(!format!("{cfg:?}").contains("s3cret-pw"));
}

#[test]
fn secret_data_is_base64_decoded() {
    // "app" and "pw-from-data"
    let secret = r#"
apiVersion: v1
kind: Secret
metadata: {name: cred, namespace: ci}
data: {username: YXBw, password: cHctZnJvbS1kYXRh}
"#;
    let (_d, paths) = files(&[POLICY, secret]);
    let cfg = load_files(&paths, &LoadOptions::default()).unwrap();
    assert_eq!(
        cfg.policies[0].upstream.credential.password.expose(),
        "pw-from-data"
    );
}

#[test]
fn yaml_syntax_errors_name_the_file_and_line() {
    let errs = errors(&["apiVersion: v1\nkind: [Secret\nmetadata: {}\n"]);
    let shown = errs[0].to_string();
    assert!(shown.contains("f0.yaml"), "{shown}");
    assert!(shown.contains("line"), "{shown}");
}

#[test]
fn unknown_fields_name_the_object_and_path() {
    let bad = POLICY.replace(
        "defaultAction: Allow",
        "defaultAction: Allow\n  defaultActon: Deny",
    );
    let errs = errors(&[&bad, SECRET]);
    let shown = errs[0].to_string();
    assert!(shown.contains("DatabaseAccessPolicy ci/p1"), "{shown}");
    assert!(shown.contains("defaultActon"), "{shown}");
    let bad = POLICY.replace("port: 5432", "port: many");
    let e = &errors(&[&bad, SECRET])[0];
    assert_eq!(e.path.as_deref(), Some("spec.database.port"), "{e}");
}

#[test]
fn missing_secret_or_keys_are_named() {
    let e = &errors(&[POLICY])[0];
    assert_eq!(e.path.as_deref(), Some("spec.database.credentialsSecret"));
    assert!(e.message.contains("ci/cred"), "{e}");
    let no_pw = SECRET.replace(", password: s3cret-pw", "");
    let e = &errors(&[POLICY, &no_pw])[0];
    assert!(e.message.contains("\"password\""), "{e}");
    // A Secret in another namespace does not count.
    let other_ns = SECRET.replace("namespace: ci", "namespace: prod");
    assert!(!errors(&[POLICY, &other_ns]).is_empty());
}

#[test]
fn hash_masking_needs_a_key_from_the_gateway() {
    let p = format!("{POLICY}  masking:\n    - {{columns: [public.c.card], strategy: Redact}}\n    - {{columns: [public.c.email], strategy: Hash}}\n");
    let errs = errors(&[&p, SECRET]);
    let e = errs
        .iter()
        .find(|e| e.path.as_deref() == Some("spec.masking[1].strategy"))
        .unwrap_or_else(|| panic!("{errs:?}"));
    assert!(e.message.contains("--masking-key-file"), "{e}");
    let (_d, paths) = files(&[&p, SECRET]);
    let opts = LoadOptions {
        masking_key: Some(vec![7; 32]),
        ..LoadOptions::default()
    };
    let cfg = load_files(&paths, &opts).unwrap();
    assert!(cfg.policies[0].masking.is_some());
}

fn with_identity(identity: &str) -> String {
    POLICY.replace("identity: {localTrust: {subject: dev}}", identity)
}

#[test]
fn token_identities_load_or_say_what_is_missing() {
    // Discovery needs no I/O at load time: an issuer that is down must not
    // stop the gateway from starting.
    let oidc = with_identity(
        "identity: {oidc: {issuer: \"https://issuer.example\", audiences: [pgwarden]}}",
    );
    let (_d, paths) = files(&[&oidc, SECRET]);
    let cfg = load_files(&paths, &LoadOptions::default()).unwrap();
    assert!(cfg.policies[0].authenticator.wants_password());

    let missing = with_identity(
        "identity: {oidc: {issuer: \"https://issuer.example\", audiences: [pgwarden], jwksFile: nope.json}}",
    );
    let errs = errors(&[&missing, SECRET]);
    let e = errs
        .iter()
        .find(|e| e.path.as_deref() == Some("spec.identity.oidc.jwksFile"))
        .unwrap_or_else(|| panic!("{errs:?}"));
    assert!(e.message.contains("nope.json"), "{e}");

    let k8s = with_identity("identity: {kubernetes: {audience: pgwarden}}");
    let errs = errors(&[&k8s, SECRET]);
    assert!(
        errs.iter()
            .any(|e| e.path.as_deref() == Some("spec.identity.kubernetes")
                && e.message.contains("--kubernetes-issuer")),
        "{errs:?}"
    );
}

#[test]
fn no_policy_means_no_traffic() {
    let e = &errors(&[SECRET])[0];
    assert!(e.message.contains("no DatabaseAccessPolicy"), "{e}");
    let e = &errors(&[])[0];
    assert!(e.message.contains("no configuration file"), "{e}");
}

#[test]
fn two_policies_for_one_database_are_ambiguous() {
    let second = POLICY.replace("name: p1", "name: p2");
    let errs = errors(&[POLICY, &second, SECRET]);
    assert!(errs[0].message.contains("already served"), "{errs:?}");
}

#[test]
fn unsupported_kinds_and_unreadable_files_are_errors() {
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n";
    let e = &errors(&[POLICY, SECRET, cm])[0];
    assert!(e.message.contains("unsupported object v1/ConfigMap"), "{e}");
    let e = load_files(
        &[PathBuf::from("/nonexistent/policy.yaml")],
        &LoadOptions::default(),
    )
    .unwrap_err()
    .0;
    assert!(e[0].to_string().contains("/nonexistent/policy.yaml"));
}

#[test]
fn verify_full_needs_a_readable_ca() {
    let p = POLICY.replace(
        "credentialsSecret: cred}",
        "credentialsSecret: cred, tls: {mode: verify-full, caFile: missing-ca.pem}}",
    );
    let e = &errors(&[&p, SECRET])[0];
    assert_eq!(e.path.as_deref(), Some("spec.database.tls.caFile"), "{e}");
    let p = POLICY.replace(
        "credentialsSecret: cred}",
        "credentialsSecret: cred, tls: {mode: verify-full, caSecret: ca}}",
    );
    let ca = "apiVersion: v1\nkind: Secret\nmetadata: {name: ca, namespace: ci}\nstringData: {ca.crt: not-a-pem}\n";
    let e = &errors(&[&p, SECRET, ca])[0];
    assert_eq!(e.path.as_deref(), Some("spec.database.tls"), "{e}");
}

/// The example policies in manifests/examples are what newcomers copy: they
/// must load as they are (with a Secret of the name they reference).
#[test]
fn example_policies_load() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        if !std::fs::read_to_string(&path)
            .unwrap()
            .contains("kind: DatabaseAccessPolicy")
        {
            continue; // the credentials Secret example
        }
        // The credential, in the namespaces the examples use.
        let secret = SECRET.replace("name: cred", "name: shop-credentials");
        let default_ns = secret.replace("namespace: ci", "namespace: default");
        let (_d, mut paths) = files(&[&secret, &default_ns]);
        paths.push(path.clone());
        let state = tempfile::tempdir().unwrap();
        let mut opts = LoadOptions {
            state_dir: Some(state.path().to_owned()),
            ..LoadOptions::default()
        };
        // identity.pod examples: the pod as the operator would send it.
        opts.identity.pod_namespace = Some("ci".into());
        opts.identity.service_account = Some("ci-runner".into());
        // Hash masking: the key the operator (or --masking-key-file) provides.
        opts.masking_key = Some(vec![7; 32]);
        if let Err(e) = load_files(&paths, &opts) {
            panic!("{}: {e}", path.display());
        }
        seen += 1;
    }
    assert!(seen >= 4, "example policies missing in {}", dir.display());
}

#[test]
fn approvals_open_their_store_in_the_state_dir() {
    let p = format!("{POLICY}  approval: {{wait: 30s, expiresAfter: 10m}}\n");
    let (_d, paths) = files(&[&p, SECRET]);
    let state = tempfile::tempdir().unwrap();
    let opts = LoadOptions {
        state_dir: Some(state.path().to_owned()),
        ..LoadOptions::default()
    };
    let cfg = load_files(&paths, &opts).unwrap();
    let a = cfg.policies[0].approvals.as_ref().expect("approvals");
    assert_eq!(a.wait, std::time::Duration::from_secs(30));
    assert!(state.path().join("approvals/.fingerprint-key").exists());
    // Without a state dir (pgwarden check) there is no store.
    let cfg = load_files(&paths, &LoadOptions::default()).unwrap();
    assert!(cfg.policies[0].approvals.is_none());
    // A wait longer than the request lives is refused with its path.
    let errs = errors(&[&format!("{POLICY}  approval: {{wait: 2h}}\n"), SECRET]);
    assert!(
        errs.iter()
            .any(|e| e.path.as_deref() == Some("spec.approval.wait")
                && e.message.contains("expiresAfter")),
        "{errs:?}"
    );
}

#[test]
fn recording_needs_a_state_dir_and_its_store_a_valid_dsn() {
    let p = format!("{POLICY}  recording: {{resultRows: 3}}\n");
    let errs = errors(&[&p, SECRET]);
    assert!(
        errs.iter()
            .any(|e| e.path.as_deref() == Some("spec.recording")
                && e.message.contains("--state-dir")),
        "{errs:?}"
    );
    let with_store =
        format!("{POLICY}  recording: {{store: {{postgres: {{dsnSecret: audit}}}}}}\n");
    let state = tempfile::tempdir().unwrap();
    let opts = LoadOptions {
        state_dir: Some(state.path().to_owned()),
        ..LoadOptions::default()
    };
    let load = |docs: &[&str]| {
        let (_d, paths) = files(docs);
        load_files(&paths, &opts)
    };
    let e = load(&[&with_store, SECRET]).unwrap_err().0;
    assert!(
        e.iter().any(
            |e| e.path.as_deref() == Some("spec.recording.store.postgres.dsnSecret")
                && e.message.contains("not found")
        ),
        "{e:?}"
    );
    let bad_dsn = "apiVersion: v1\nkind: Secret\nmetadata: {name: audit, namespace: ci}\nstringData: {dsn: 'mysql://x@h/db'}\n";
    let e = load(&[&with_store, SECRET, bad_dsn]).unwrap_err().0;
    assert!(e.iter().any(|e| e.message.contains("postgres://")), "{e:?}");
    let good = "apiVersion: v1\nkind: Secret\nmetadata: {name: audit, namespace: ci}\nstringData: {dsn: 'postgres://w:pw@127.0.0.1:5999/audit?sslmode=disable'}\n";
    let cfg = load(&[&with_store, SECRET, good]).unwrap();
    let rec = cfg.policies[0].recording.as_ref().expect("recording");
    let (target, table) = rec.store.as_ref().expect("store");
    assert_eq!((target.port, table.as_str()), (5999, "pgwarden_records"));
    assert!(state.path().join("recordings/chain").exists());
}

#[tokio::test]
async fn pod_identity_takes_the_pod_the_operator_verified() {
    use crate::identity::ClientTransport;
    let pod = with_identity("identity: {pod: {}}");
    let (_d, paths) = files(&[&pod, SECRET]);
    // Standalone without the pod's facts: a config error that says what to pass.
    let errs = errors(&[&pod, SECRET]);
    assert!(
        errs.iter()
            .any(|e| e.path.as_deref() == Some("spec.identity.pod")),
        "{errs:?}"
    );
    // The snapshot's pod wins over the command line's.
    let mut snapshot = snapshot_files(&paths, None, 1).unwrap();
    snapshot.pod = Some(pgwarden_api::SnapshotPod {
        namespace: "ci".into(),
        name: "nightly-x7k2p".into(),
        uid: "3f1c".into(),
        service_account: "ci-runner".into(),
    });
    let mut opts = LoadOptions::default();
    opts.identity.pod_namespace = Some("spoofed".into());
    opts.identity.service_account = Some("admin".into());
    let cfg = crate::config::build(&snapshot, &opts).unwrap();
    let id = cfg.policies[0]
        .authenticator
        .authenticate(
            ClientTransport {
                peer: "127.0.0.1:4000".parse().unwrap(),
                tls: false,
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(id.subject, "system:serviceaccount:ci:ci-runner");
}
