//! kubectl conformance that runs unchanged on the test API server and on a real
//! cluster (`PGWARDEN_E2E_KUBECONFIG`, see tests/testapi_cluster): what a user of
//! pgwarden's CRDs sees from the real `kubectl` — apply/get/describe/explain/
//! patch/edit/wait/delete of a policy, a schema refusal with its field path, a 409 on a stale replace, RBAC
//! 403s and `auth can-i` for people bound through a group. Tests that need the
//! test server's own hooks (audit, compaction) live in tests/testapi.rs.

mod testapi_cluster;

use serde_json::{json, Value};
use testapi_cluster::{text, Cluster, User};

fn example_policy() -> String {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/examples/github-actions-policy.yaml")
        .to_string_lossy()
        .into_owned()
}

fn json_of(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}):\n{s}"))
}

#[test]
fn policy_lifecycle_with_kubectl() {
    let c = Cluster::new("kubectl-lifecycle");
    let out = c.ok(User::Admin, &["apply", "-f", &example_policy()]);
    assert_eq!(
        out.trim(),
        "databaseaccesspolicy.pgwarden.io/github-actions created"
    );
    let out = c.ok(User::Admin, &["apply", "-f", &example_policy()]);
    assert_eq!(
        out.trim(),
        "databaseaccesspolicy.pgwarden.io/github-actions unchanged"
    );

    // The CRD's printer columns, by short name.
    let table = c.ok(User::Admin, &["get", "dap"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "DATABASE", "DEFAULT", "SELECTED", "APPLIED", "AGE"],
        "{table}"
    );
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..3], ["github-actions", "shop", "Deny"], "{table}");

    // describe, explain (the CRD's published schema)
    let d = c.ok(User::Admin, &["describe", "dap", "github-actions"]);
    assert!(
        d.contains("Name:         github-actions") && d.contains("Default Action:  Deny"),
        "{d}"
    );
    let e = c.ok(User::Admin, &["explain", "dap.spec.defaultAction"]);
    assert!(
        e.contains("FIELD: defaultAction <string>")
            && e.contains("RequireApproval")
            && e.contains("Decides any access that no rule matches."),
        "{e}"
    );

    let obj = json_of(&c.ok(User::Admin, &["get", "dap", "github-actions", "-o", "json"]));
    assert_eq!(obj["metadata"]["generation"], 1);
    assert_eq!(obj["metadata"]["namespace"], c.ns.as_str());
    assert_eq!(obj["spec"]["database"]["port"], 5432);

    // merge and JSON patches; a spec change bumps generation
    let out = c.ok(
        User::Admin,
        &[
            "patch",
            "dap",
            "github-actions",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"defaultAction":"Allow"}}"#,
        ],
    );
    assert_eq!(
        out.trim(),
        "databaseaccesspolicy.pgwarden.io/github-actions patched"
    );
    c.ok(
        User::Admin,
        &[
            "patch",
            "dap",
            "github-actions",
            "--type",
            "json",
            "-p",
            r#"[{"op":"replace","path":"/spec/database/name","value":"shop2"}]"#,
        ],
    );
    let obj = json_of(&c.ok(User::Admin, &["get", "dap", "github-actions", "-o", "json"]));
    assert_eq!(obj["metadata"]["generation"], 3);
    assert_eq!(obj["spec"]["database"]["name"], "shop2");
    c.ok(
        User::Admin,
        &[
            "wait",
            "dap/github-actions",
            "--for=jsonpath={.spec.defaultAction}=Allow",
            "--timeout=10s",
        ],
    );
    // A JSON patch that tests a value that is not there fails as a whole.
    let e = c.fails(
        User::Admin,
        &[
            "patch",
            "dap",
            "github-actions",
            "--type",
            "json",
            "-p",
            r#"[{"op":"test","path":"/spec/defaultAction","value":"Deny"}]"#,
        ],
    );
    assert!(e.contains("invalid"), "{e}");
    let action = c.ok(
        User::Admin,
        &[
            "get",
            "dap",
            "github-actions",
            "-o",
            "jsonpath={.spec.defaultAction}",
        ],
    );
    assert_eq!(action, "Allow");

    // kubectl edit through KUBE_EDITOR (a script that rewrites the file)
    let dir = tempfile::tempdir().unwrap();
    let editor = dir.path().join("editor.sh");
    std::fs::write(
        &editor,
        "#!/bin/sh\nsed -i 's/maxRows: 10000/maxRows: 500/' \"$1\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&editor, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = c
        .kubectl_command(User::Admin)
        .args(["edit", "dap", "github-actions"])
        .env("KUBE_EDITOR", &editor)
        .output()
        .expect("kubectl edit");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("edited"),
        "{}",
        text(&o)
    );
    let rows = c.ok(
        User::Admin,
        &[
            "get",
            "dap",
            "github-actions",
            "-o",
            "jsonpath={.spec.limits.maxRows}",
        ],
    );
    assert_eq!(rows, "500");

    let out = c.ok(User::Admin, &["delete", "dap", "github-actions"]);
    assert!(out.contains("deleted"), "{out}");
    let e = c.fails(User::Admin, &["get", "dap", "github-actions"]);
    assert!(
        e.contains("Error from server (NotFound): databaseaccesspolicies.pgwarden.io \"github-actions\" not found"),
        "{e}"
    );
}

#[test]
fn invalid_policy_and_stale_replace_are_refused() {
    let c = Cluster::new("kubectl-refusals");
    let mut bad = json!({"apiVersion": "pgwarden.io/v1alpha1", "kind": "DatabaseAccessPolicy",
        "metadata": {"name": "bad"},
        "spec": {"identity": {"localTrust": {"subject": "ci"}},
                 "database": {"host": "db", "name": "shop", "credentialsSecret": "s"},
                 "defaultAction": "Maybe"}});
    let o = c.kubectl(User::Admin, &["apply", "-f", "-"], Some(&bad.to_string()));
    let e = text(&o);
    assert!(!o.status.success(), "{e}");
    assert!(
        e.contains("The DatabaseAccessPolicy \"bad\" is invalid: spec.defaultAction: Unsupported value: \"Maybe\""),
        "{e}"
    );

    bad["spec"]["defaultAction"] = json!("Deny");
    let o = c.kubectl(
        User::Admin,
        &["create", "-f", "-", "-o", "json"],
        Some(&bad.to_string()),
    );
    assert!(o.status.success(), "{}", text(&o));
    let stale = json_of(&String::from_utf8_lossy(&o.stdout));
    c.ok(User::Admin, &["label", "dap", "bad", "touched=yes"]);
    let o = c.kubectl(
        User::Admin,
        &["replace", "-f", "-"],
        Some(&stale.to_string()),
    );
    let e = text(&o);
    assert!(!o.status.success(), "{e}");
    assert!(
        e.contains("Error from server (Conflict): error when replacing \"STDIN\": Operation cannot be fulfilled on databaseaccesspolicies.pgwarden.io \"bad\": the object has been modified; please apply your changes to the latest version and try again"),
        "{e}"
    );
}

#[test]
fn rbac_through_a_group_binding() {
    let c = Cluster::new("kubectl-rbac");
    c.ok(User::Admin, &["apply", "-f", &example_policy()]);
    let can = |u: User, args: &[&str]| {
        let mut a = vec!["auth", "can-i"];
        a.extend_from_slice(args);
        let o = c.kubectl(u, &a, None);
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(
        can(User::Alice, &["list", "databaseaccesspolicies.pgwarden.io"]),
        "no"
    );
    let e = c.fails(User::Bob, &["get", "dap", "github-actions"]);
    assert!(
        e.contains(&format!(
            "Error from server (Forbidden): databaseaccesspolicies.pgwarden.io \"github-actions\" is forbidden: User \"bob\" cannot get resource \"databaseaccesspolicies\" in API group \"pgwarden.io\" in the namespace \"{}\"",
            c.ns
        )),
        "{e}"
    );

    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "dap-editor"},
        "rules": [{"apiGroups": ["pgwarden.io"], "resources": ["databaseaccesspolicies"],
                   "verbs": ["get", "list", "watch", "patch"]}]});
    let o = c.kubectl(User::Admin, &["apply", "-f", "-"], Some(&role.to_string()));
    assert!(o.status.success(), "{}", text(&o));
    c.ok(
        User::Admin,
        &[
            "create",
            "rolebinding",
            "oncall",
            "--role=dap-editor",
            "--group=dba-oncall",
        ],
    );

    assert_eq!(
        can(User::Alice, &["list", "databaseaccesspolicies.pgwarden.io"]),
        "yes"
    );
    assert_eq!(
        can(
            User::Alice,
            &["delete", "databaseaccesspolicies.pgwarden.io"]
        ),
        "no"
    );
    assert_eq!(
        can(User::Bob, &["list", "databaseaccesspolicies.pgwarden.io"]),
        "no"
    );
    c.ok(User::Alice, &["get", "dap", "github-actions"]);
    c.ok(
        User::Alice,
        &["label", "dap", "github-actions", "reviewed=yes"],
    );
    let e = c.fails(User::Alice, &["delete", "dap", "github-actions"]);
    assert!(
        e.contains("User \"alice\" cannot delete resource \"databaseaccesspolicies\""),
        "{e}"
    );
}
