//! The test Kubernetes API server (issue 15) driven by the real `kubectl`: CRDs from
//! crds/, the example policy from manifests/examples/, printer columns, short names,
//! patches, schema errors with field paths, 409 on a stale update, RBAC 403s and
//! `auth can-i`, watches (incl. 410 Gone after compaction), and the audit log.
//!
//! Every test starts its own server (well under a second) with its own kubectl
//! discovery cache.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pgwarden_testapi::TestApiServer;
use serde_json::Value;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn text(o: &Output) -> String {
    pgwarden_testapi::output_text(o)
}

/// Runs kubectl and requires success; returns stdout.
fn ok(api: &TestApiServer, ctx: &str, args: &[&str]) -> String {
    let o = api.kubectl(ctx, args);
    assert!(
        o.status.success(),
        "kubectl {args:?} as {ctx} failed:\n{}",
        text(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs kubectl and requires failure; returns stdout+stderr.
fn fails(api: &TestApiServer, ctx: &str, args: &[&str]) -> String {
    let o = api.kubectl(ctx, args);
    assert!(
        !o.status.success(),
        "kubectl {args:?} as {ctx} succeeded:\n{}",
        text(&o)
    );
    text(&o)
}

/// Runs kubectl with `stdin` as its input (`-f -`).
fn with_stdin(api: &TestApiServer, ctx: &str, args: &[&str], stdin: &str) -> Output {
    api.kubectl_stdin(ctx, args, Some(stdin))
}

fn with_crds() -> TestApiServer {
    let api = TestApiServer::start().expect("start test API server");
    let out = ok(
        &api,
        "admin",
        &[
            "apply",
            "-f",
            repo("crds/databaseaccesspolicies.yaml").to_str().unwrap(),
            "-f",
            repo("crds/approvalrequests.yaml").to_str().unwrap(),
        ],
    );
    assert!(out.contains("customresourcedefinition.apiextensions.k8s.io/databaseaccesspolicies.pgwarden.io created"), "{out}");
    api
}

fn example_policy() -> String {
    repo("manifests/examples/github-actions-policy.yaml")
        .to_string_lossy()
        .into_owned()
}

fn json_of(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}):\n{s}"))
}

#[test]
fn starts_fast_and_serves_discovery() {
    let t = Instant::now();
    let api = TestApiServer::start().unwrap();
    let started = t.elapsed();
    assert!(
        started < Duration::from_millis(800),
        "startup took {started:?}"
    );
    let v = ok(&api, "admin", &["version", "-o", "json"]);
    assert_eq!(json_of(&v)["serverVersion"]["gitVersion"], "v1.32.0");
    let ns = ok(&api, "admin", &["get", "namespaces"]);
    for n in ["default", "kube-system"] {
        assert!(ns.contains(n), "{ns}");
    }
    let res = ok(&api, "admin", &["api-resources"]);
    assert!(
        res.lines()
            .any(|l| l.starts_with("configmaps") && l.contains("cm")),
        "{res}"
    );
    assert!(res.contains("customresourcedefinitions"), "{res}");
}

#[test]
fn crds_serve_the_policy_with_printer_columns_and_short_names() {
    let api = with_crds();
    let crds = ok(&api, "admin", &["get", "crd"]);
    assert!(crds.contains("approvalrequests.pgwarden.io"), "{crds}");

    let out = ok(&api, "admin", &["apply", "-f", &example_policy()]);
    assert_eq!(
        out.trim(),
        "databaseaccesspolicy.pgwarden.io/github-actions created"
    );
    let out = ok(&api, "admin", &["apply", "-f", &example_policy()]);
    assert_eq!(
        out.trim(),
        "databaseaccesspolicy.pgwarden.io/github-actions unchanged"
    );

    // Table output with the CRD's printer columns, by short name; -o wide adds
    // the priority-1 column.
    let table = ok(&api, "admin", &["get", "dap"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "DATABASE", "DEFAULT", "SELECTED", "APPLIED", "AGE"],
        "{table}"
    );
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..3], ["github-actions", "shop", "Deny"], "{table}");
    let wide = ok(
        &api,
        "admin",
        &["get", "databaseaccesspolicies", "-o", "wide"],
    );
    assert!(
        wide.contains("HOST") && wide.contains("prod-pg.internal"),
        "{wide}"
    );
    let all = ok(&api, "admin", &["get", "pgwarden", "-A"]);
    assert!(
        all.contains("default") && all.contains("github-actions"),
        "{all}"
    );
    let apr = api.kubectl("admin", &["get", "apr"]);
    assert!(
        apr.status.success() && text(&apr).contains("No resources found in default namespace."),
        "{}",
        text(&apr)
    );

    // Stored with server fields and schema defaults.
    let obj = json_of(&ok(
        &api,
        "admin",
        &["get", "dap", "github-actions", "-o", "json"],
    ));
    let meta = &obj["metadata"];
    assert_eq!(meta["generation"], 1);
    assert_eq!(meta["uid"].as_str().unwrap().len(), 36);
    assert!(meta["creationTimestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(obj["spec"]["database"]["port"], 5432);
    let yaml = ok(&api, "admin", &["get", "dap/github-actions", "-o", "yaml"]);
    assert!(
        yaml.contains("kind: DatabaseAccessPolicy")
            && yaml.contains("credentialsSecret: shop-credentials"),
        "{yaml}"
    );

    // merge patch: a spec change bumps generation
    let out = ok(
        &api,
        "admin",
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
    let obj = json_of(&ok(
        &api,
        "admin",
        &["get", "dap", "github-actions", "-o", "json"],
    ));
    assert_eq!(obj["spec"]["defaultAction"], "Allow");
    assert_eq!(obj["metadata"]["generation"], 2);

    // JSON patch
    ok(
        &api,
        "admin",
        &[
            "patch",
            "dap",
            "github-actions",
            "--type",
            "json",
            "-p",
            r#"[{"op":"replace","path":"/spec/database/name","value":"shop2"},{"op":"add","path":"/metadata/labels","value":{"team":"dba"}}]"#,
        ],
    );
    let obj = json_of(&ok(
        &api,
        "admin",
        &["get", "dap", "-l", "team=dba", "-o", "json"],
    ));
    assert_eq!(obj["items"][0]["spec"]["database"]["name"], "shop2");
    assert_eq!(obj["items"][0]["metadata"]["generation"], 3);

    // status subresource: status writes go through /status only, no generation bump
    ok(
        &api,
        "admin",
        &[
            "patch",
            "dap",
            "github-actions",
            "--subresource=status",
            "--type",
            "merge",
            "-p",
            r#"{"status":{"selectedPods":2,"appliedSidecars":1},"spec":{"defaultAction":"Deny"}}"#,
        ],
    );
    let obj = json_of(&ok(
        &api,
        "admin",
        &["get", "dap", "github-actions", "-o", "json"],
    ));
    assert_eq!(obj["status"]["selectedPods"], 2);
    assert_eq!(
        obj["spec"]["defaultAction"], "Allow",
        "spec ignored on /status"
    );
    assert_eq!(obj["metadata"]["generation"], 3);
    ok(
        &api,
        "admin",
        &[
            "patch",
            "dap",
            "github-actions",
            "--type",
            "merge",
            "-p",
            r#"{"status":{"selectedPods":9}}"#,
        ],
    );
    let obj = json_of(&ok(
        &api,
        "admin",
        &["get", "dap", "github-actions", "-o", "json"],
    ));
    assert_eq!(
        obj["status"]["selectedPods"], 2,
        "status ignored on the main resource"
    );
    let table = ok(&api, "admin", &["get", "dap"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..5],
        ["github-actions", "shop2", "Allow", "2", "1"],
        "{table}"
    );

    let out = ok(&api, "admin", &["delete", "dap", "github-actions"]);
    assert!(out.contains("\"github-actions\" deleted"), "{out}");
    let e = fails(&api, "admin", &["get", "dap", "github-actions"]);
    assert!(e.contains(r#"Error from server (NotFound): databaseaccesspolicies.pgwarden.io "github-actions" not found"#), "{e}");
}

const BAD_POLICY: &str = r#"
apiVersion: pgwarden.io/v1alpha1
kind: DatabaseAccessPolicy
metadata: {name: bad}
spec:
  database: {host: db, name: shop, port: 70000, credentialsSecret: s}
  defaultAction: Maybe
  approval: {wait: "5 minutes"}
"#;

#[test]
fn invalid_policies_are_refused_with_field_paths() {
    let api = with_crds();
    let o = with_stdin(&api, "admin", &["apply", "-f", "-"], BAD_POLICY);
    assert!(!o.status.success());
    let e = text(&o);
    assert!(
        e.contains(r#"The DatabaseAccessPolicy "bad" is invalid: "#),
        "{e}"
    );
    assert!(e.contains(r#"spec.defaultAction: Unsupported value: "Maybe": supported values: "Allow", "RequireApproval", "Deny""#), "{e}");
    assert!(e.contains("* spec.identity: Required value"), "{e}");
    assert!(e.contains("spec.database.port: Invalid value: 70000: spec.database.port in body should be less than or equal to 65535"), "{e}");
    assert!(e.contains(r#"spec.approval.wait: Invalid value: "5 minutes": spec.approval.wait in body should match"#), "{e}");

    // type errors and missing required fields
    let o = with_stdin(&api, "admin", &["create", "-f", "-"],
        "apiVersion: pgwarden.io/v1alpha1\nkind: DatabaseAccessPolicy\nmetadata: {name: bad2}\nspec:\n  identity: {localTrust: {subject: dev}}\n  database: {host: db, port: \"x\", credentialsSecret: s}\n");
    let e = text(&o);
    assert!(!o.status.success());
    assert!(e.contains(r#"spec.database.port: Invalid value: "string": spec.database.port in body must be of type integer: "string""#), "{e}");
    assert!(e.contains("spec.database.name: Required value"), "{e}");

    // kubectl's default --validate=strict: unknown fields are refused by the server...
    let unknown = "apiVersion: pgwarden.io/v1alpha1\nkind: DatabaseAccessPolicy\nmetadata: {name: extra}\nspec:\n  identity: {localTrust: {subject: dev}}\n  database: {host: db, name: shop, credentialsSecret: s}\n  bogus: 1\n";
    let o = with_stdin(&api, "admin", &["apply", "-f", "-"], unknown);
    let e = text(&o);
    assert!(!o.status.success());
    assert!(
        e.contains(r#"strict decoding error: unknown field "spec.bogus""#),
        "{e}"
    );
    // ... and pruned with --validate=false
    let o = with_stdin(
        &api,
        "admin",
        &["apply", "--validate=false", "-f", "-"],
        unknown,
    );
    assert!(o.status.success(), "{}", text(&o));
    let obj = json_of(&ok(&api, "admin", &["get", "dap", "extra", "-o", "json"]));
    assert!(obj["spec"].get("bogus").is_none());
    assert_eq!(
        obj["spec"]["defaultAction"], "Deny",
        "schema default applied"
    );

    // a JSON patch that makes the object invalid is refused too
    let e = fails(
        &api,
        "admin",
        &[
            "patch",
            "dap",
            "extra",
            "--type",
            "json",
            "-p",
            r#"[{"op":"replace","path":"/spec/defaultAction","value":"Sometimes"}]"#,
        ],
    );
    assert!(
        e.contains(r#"spec.defaultAction: Unsupported value: "Sometimes""#),
        "{e}"
    );
}

#[test]
fn stale_update_is_a_conflict() {
    let api = with_crds();
    ok(&api, "admin", &["apply", "-f", &example_policy()]);
    let old = ok(
        &api,
        "admin",
        &["get", "dap", "github-actions", "-o", "json"],
    );
    ok(
        &api,
        "admin",
        &["label", "dap", "github-actions", "touched=yes"],
    );
    let o = with_stdin(&api, "admin", &["replace", "-f", "-"], &old);
    assert!(!o.status.success());
    let e = text(&o);
    assert!(e.contains(r#"Error from server (Conflict): error when replacing "STDIN": Operation cannot be fulfilled on databaseaccesspolicies.pgwarden.io "github-actions": the object has been modified; please apply your changes to the latest version and try again"#), "{e}");
    // with the current version it goes through
    let cur = ok(
        &api,
        "admin",
        &["get", "dap", "github-actions", "-o", "json"],
    );
    let o = with_stdin(&api, "admin", &["replace", "-f", "-"], &cur);
    assert!(o.status.success(), "{}", text(&o));
    let e = fails(&api, "admin", &["create", "-f", &example_policy()]);
    assert!(e.contains("AlreadyExists"), "{e}");
}

const BOB_READS_POLICIES: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: policy-reader, namespace: default}
rules:
- {apiGroups: [pgwarden.io], resources: [databaseaccesspolicies], verbs: [get, list, watch]}
- {apiGroups: [pgwarden.io], resources: [approvalrequests], verbs: [patch], resourceNames: [only-this]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: bob-reads, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: policy-reader}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: bob}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: dba-oncall-edit}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: edit}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: Group, name: dba-oncall}
"#;

#[test]
fn rbac_forbids_and_auth_can_i_answers() {
    let api = with_crds();
    ok(&api, "admin", &["apply", "-f", &example_policy()]);
    let e = fails(&api, "bob", &["get", "dap"]);
    assert!(e.contains(r#"Error from server (Forbidden): databaseaccesspolicies.pgwarden.io is forbidden: User "bob" cannot list resource "databaseaccesspolicies" in API group "pgwarden.io" in the namespace "default""#), "{e}");
    let e = fails(&api, "bob", &["get", "dap", "github-actions"]);
    assert!(e.contains(r#"databaseaccesspolicies.pgwarden.io "github-actions" is forbidden: User "bob" cannot get resource"#), "{e}");
    let e = fails(&api, "bob", &["get", "namespaces"]);
    assert!(
        e.contains(
            r#"User "bob" cannot list resource "namespaces" in API group "" at the cluster scope"#
        ),
        "{e}"
    );
    let no = api.kubectl("bob", &["auth", "can-i", "list", "dap"]);
    assert_eq!(String::from_utf8_lossy(&no.stdout).trim(), "no");
    assert_eq!(no.status.code(), Some(1));
    assert_eq!(
        ok(&api, "admin", &["auth", "can-i", "delete", "crd"]).trim(),
        "yes"
    );
    assert_eq!(
        ok(&api, "admin", &["auth", "can-i", "*", "*"]).trim(),
        "yes"
    );

    let o = with_stdin(&api, "admin", &["apply", "-f", "-"], BOB_READS_POLICIES);
    assert!(o.status.success(), "{}", text(&o));
    assert!(ok(&api, "bob", &["get", "dap"]).contains("github-actions"));
    assert_eq!(
        ok(
            &api,
            "bob",
            &["auth", "can-i", "watch", "databaseaccesspolicies"]
        )
        .trim(),
        "yes"
    );
    let can = |user: &str, args: &[&str]| {
        let mut a = vec!["auth", "can-i"];
        a.extend_from_slice(args);
        String::from_utf8_lossy(&api.kubectl(user, &a).stdout)
            .trim()
            .to_string()
    };
    assert_eq!(can("bob", &["delete", "dap"]), "no");
    assert_eq!(
        can("bob", &["list", "dap", "-n", "kube-system"]),
        "no",
        "a RoleBinding is namespaced"
    );
    assert_eq!(can("bob", &["patch", "apr/only-this"]), "yes");
    assert_eq!(can("bob", &["patch", "apr/other"]), "no", "resourceNames");
    assert_eq!(
        can("bob", &["patch", "dap", "--subresource=status"]),
        "no",
        "subresources are separate"
    );
    assert_eq!(
        can("alice", &["create", "dap", "-n", "kube-system"]),
        "yes",
        "group binding"
    );
    assert_eq!(can("alice", &["delete", "crd"]), "no");
    let e = fails(&api, "bob", &["delete", "dap", "github-actions"]);
    assert!(
        e.contains("Forbidden") && e.contains(r#"cannot delete resource "databaseaccesspolicies""#),
        "{e}"
    );
    let me = ok(&api, "alice", &["auth", "whoami", "-o", "json"]);
    assert_eq!(
        json_of(&me)["status"]["userInfo"]["groups"],
        serde_json::json!(["dba-oncall", "system:authenticated"])
    );

    // Every request is audited with who, what and the answer.
    let audit = api.audit();
    assert!(
        audit.iter().any(|e| e.user == "bob"
            && e.verb == "list"
            && e.resource == "databaseaccesspolicies"
            && e.namespace == "default"
            && e.code == 403),
        "{audit:#?}"
    );
    assert!(audit
        .iter()
        .any(|e| e.user == "bob" && e.verb == "list" && e.code == 200));
    assert!(audit.iter().any(|e| e.user == "admin"
        && e.verb == "create"
        && e.resource == "rolebindings"
        && e.code == 201));
    let file = std::fs::read_to_string(api.dir().join("audit.log")).unwrap();
    assert_eq!(file.lines().count(), audit.len());
}

#[test]
fn watch_sees_changes_and_expired_versions_are_gone() {
    let api = with_crds();
    let mut child = api
        .kubectl_command("admin")
        .args(["get", "dap", "-w", "--output-watch-events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let expect = |want: &str, seen: &mut Vec<String>| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
                seen.push(l.clone());
                if l.contains(want) {
                    return;
                }
            }
        }
        panic!("watch never showed {want:?}; saw {seen:#?}");
    };
    // The header arrives with the (empty) list; then events.
    std::thread::sleep(Duration::from_millis(300));
    ok(&api, "admin", &["apply", "-f", &example_policy()]);
    expect("ADDED", &mut seen);
    ok(
        &api,
        "admin",
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
    expect("Allow", &mut seen);
    assert!(seen.last().unwrap().contains("MODIFIED"), "{seen:?}");
    ok(&api, "admin", &["delete", "dap", "github-actions"]);
    expect("DELETED", &mut seen);
    let _ = child.kill();
    let _ = child.wait();

    // A watch from a compacted resourceVersion gets the 410 ERROR event.
    let list = json_of(&ok(
        &api,
        "admin",
        &[
            "get",
            "--raw",
            "/apis/pgwarden.io/v1alpha1/namespaces/default/databaseaccesspolicies",
        ],
    ));
    let rv: u64 = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    ok(&api, "admin", &["apply", "-f", &example_policy()]);
    api.compact();
    let out = ok(&api, "admin", &["get", "--raw", &format!(
        "/apis/pgwarden.io/v1alpha1/namespaces/default/databaseaccesspolicies?watch=true&resourceVersion={rv}")]);
    let ev = json_of(out.lines().next().unwrap());
    assert_eq!(ev["type"], "ERROR");
    assert_eq!(ev["object"]["code"], 410);
    assert_eq!(ev["object"]["reason"], "Expired");
    // From the current version the watch works, with bookmarks when asked.
    let cur = rv + 1;
    let out = ok(&api, "admin", &["get", "--raw", &format!(
        "/apis/pgwarden.io/v1alpha1/namespaces/default/databaseaccesspolicies?watch=true&resourceVersion={cur}&allowWatchBookmarks=true&timeoutSeconds=2")]);
    assert!(
        out.lines().any(|l| json_of(l)["type"] == "BOOKMARK"),
        "{out}"
    );
}

#[test]
fn kubectl_patch_of_a_pod_merges_containers_by_name() {
    let api = TestApiServer::start().unwrap();
    let pod = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"two","namespace":"default"},
      "spec":{"containers":[{"name":"app","image":"app:1","env":[{"name":"A","value":"1"}]},
                            {"name":"side","image":"side:1"}]}}"#;
    let o = with_stdin(&api, "admin", &["apply", "-f", "-"], pod);
    assert!(o.status.success(), "{}", pgwarden_testapi::output_text(&o));
    // kubectl's default patch type for a Pod is a strategic merge.
    ok(
        &api,
        "admin",
        &[
            "patch",
            "pod",
            "two",
            "-p",
            r#"{"spec":{"containers":[{"name":"app","env":[{"name":"B","value":"2"}]}]}}"#,
        ],
    );
    let v = json_of(&ok(&api, "admin", &["get", "pod", "two", "-o", "json"]));
    let containers = v["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 2, "{v:#}");
    assert_eq!(containers[0]["image"], "app:1");
    assert_eq!(containers[0]["env"].as_array().unwrap().len(), 2, "{v:#}");
    assert_eq!(containers[1]["name"], "side");
}
