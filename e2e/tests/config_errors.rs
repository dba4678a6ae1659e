//! `pgwarden run` refuses bad configuration: exit code 2 and a message that names the
//! file, the object and the field path. Assertions use stable substrings (names and
//! paths), not whole messages.

use pgwarden_e2e::{policy_with_rules, policy_yaml, GatewayBuilder, GatewayExit};

const UNCONNECTED_PORT: u16 = 1;

fn default_policy() -> String {
    policy_yaml(UNCONNECTED_PORT, None)
}

/// Starts with `builder` and expects a refusal with exit code 2.
fn refused(builder: GatewayBuilder) -> GatewayExit {
    match builder.try_start() {
        Ok(gw) => panic!(
            "pgwarden run accepted the bad config and became ready\n--- log ---\n{}",
            gw.logs()
        ),
        Err(exit) => {
            assert_eq!(exit.code, Some(2), "expected exit code 2: {exit}");
            exit
        }
    }
}

fn assert_mentions(exit: &GatewayExit, needles: &[&str]) {
    for needle in needles {
        assert!(
            exit.log.contains(needle),
            "{needle:?} missing from the error output:\n{}",
            exit.log
        );
    }
}

/// Replaces exactly one occurrence of `from` in the default policy.
fn policy_with(from: &str, to: &str) -> String {
    let policy = default_policy();
    assert_eq!(policy.matches(from).count(), 1, "{from:?} in:\n{policy}");
    policy.replacen(from, to, 1)
}

#[test]
fn control_default_config_starts() {
    let gw = GatewayBuilder::unconnected().start();
    // Listening with the configuration loaded; not ready only because
    // nothing listens at its upstream.
    let (code, body) = gw.http_get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.starts_with("not ready: upstream\n"), "{body}");
}

#[test]
fn yaml_syntax_error_names_file_and_line() {
    // "mapping values are not allowed here": a second `key:` on the host line.
    let broken = policy_with("    host: 127.0.0.1\n", "    host: 127.0.0.1: 5432\n");
    let line = broken
        .lines()
        .position(|l| l.contains("127.0.0.1: 5432"))
        .unwrap()
        + 1;
    let exit = refused(GatewayBuilder::unconnected().policy_yaml(broken));
    assert_mentions(&exit, &["policy.yaml"]);
    assert!(
        exit.log.contains(&format!("line {line}")) || exit.log.contains(&format!(":{line}:")),
        "line {line} not named:\n{}",
        exit.log
    );
}

#[test]
fn unknown_field_names_the_path() {
    let exit = refused(GatewayBuilder::unconnected().policy_yaml(policy_with(
        "    host: 127.0.0.1\n",
        "    hostname: 127.0.0.1\n",
    )));
    assert_mentions(&exit, &["policy.yaml", "spec.database", "hostname"]);

    let exit = refused(GatewayBuilder::unconnected().policy_yaml(policy_with(
        "  defaultAction: Deny\n",
        "  defaultActoin: Allow\n",
    )));
    assert_mentions(&exit, &["policy.yaml", "defaultActoin"]);
}

#[test]
fn bad_enum_value_names_the_path() {
    let exit = refused(GatewayBuilder::unconnected().policy_yaml(policy_with(
        "  defaultAction: Deny\n",
        "  defaultAction: Maybe\n",
    )));
    assert_mentions(&exit, &["policy.yaml", "defaultAction", "Maybe"]);
}

#[test]
fn missing_credentials_secret_names_it() {
    let exit = refused(GatewayBuilder::unconnected().without_secret());
    assert_mentions(&exit, &["shop-cred"]);

    // A Secret with another name does not satisfy the reference.
    let exit = refused(GatewayBuilder::unconnected().secret_yaml(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: other-cred, namespace: default}\n\
         stringData: {username: app, password: x}\n",
    ));
    assert_mentions(&exit, &["shop-cred"]);
}

#[test]
fn secret_without_password_key_names_the_key() {
    let exit = refused(GatewayBuilder::unconnected().secret_yaml(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: shop-cred, namespace: default}\n\
         stringData: {username: app}\n",
    ));
    assert_mentions(&exit, &["shop-cred", "password"]);
}

#[test]
fn bad_rules_name_their_index() {
    let policy = policy_with_rules(
        UNCONNECTED_PORT,
        None,
        "  defaultAction: Deny\n  rules:\n    - {name: no-ddl, action: Deny, statements: [DDL]}\n    \
         - {name: reads, action: Allow, statements: [SELEKT]}\n",
    );
    let exit = refused(GatewayBuilder::unconnected().policy_yaml(policy));
    assert_mentions(
        &exit,
        &["policy.yaml", "spec.rules[1].statements", "SELEKT"],
    );

    let policy = policy_with_rules(
        UNCONNECTED_PORT,
        None,
        "  defaultAction: Deny\n  rules:\n    - {name: no-ddl, action: Deny, statements: [DDL]}\n    \
         - {name: no-ddl, action: Allow, statements: [SELECT]}\n",
    );
    let exit = refused(GatewayBuilder::unconnected().policy_yaml(policy));
    assert_mentions(&exit, &["policy.yaml", "spec.rules[1]", "no-ddl"]);
}

#[test]
fn hash_masking_without_a_key_is_refused() {
    let mut policy = default_policy();
    policy.push_str("  masking:\n    - {columns: [\"public.customers.email\"], strategy: Hash}\n");
    let exit = refused(GatewayBuilder::unconnected().policy_yaml(policy));
    assert_mentions(&exit, &["spec.masking[0].strategy", "--masking-key-file"]);
}

#[test]
fn token_identity_without_its_keys_is_refused() {
    // Kubernetes identity needs the cluster's issuer from the command line.
    let policy = policy_with(
        "    localTrust: {subject: dev}\n",
        "    kubernetes: {audience: pgwarden}\n",
    );
    let exit = refused(GatewayBuilder::unconnected().policy_yaml(policy));
    assert_mentions(&exit, &["spec.identity.kubernetes", "--kubernetes-issuer"]);
    // An offline key file that is not there.
    let policy = policy_with(
        "    localTrust: {subject: dev}\n",
        "    oidc:\n      issuer: https://token.actions.githubusercontent.com\n      audiences: [pgwarden]\n      jwksFile: missing-keys.json\n",
    );
    let exit = refused(GatewayBuilder::unconnected().policy_yaml(policy));
    assert_mentions(&exit, &["spec.identity.oidc.jwksFile", "missing-keys.json"]);
}

#[test]
fn an_approval_wait_longer_than_the_request_lives_is_refused() {
    let mut policy = default_policy();
    policy.push_str("  approval:\n    approvers: {groups: [dba-oncall]}\n    wait: 2h\n");
    let exit = refused(GatewayBuilder::unconnected().policy_yaml(policy));
    assert_mentions(
        &exit,
        &["policy.yaml", "spec.approval.wait", "expiresAfter (1h)"],
    );
}

#[test]
fn missing_file_is_named() {
    let exit = refused(
        GatewayBuilder::unconnected()
            .arg("-f")
            .arg("/nonexistent/pgwarden-e2e/nope.yaml"),
    );
    assert_mentions(&exit, &["nope.yaml"]);
}
