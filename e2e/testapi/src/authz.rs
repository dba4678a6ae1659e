//! Authorization: RBAC, evaluated on every request from the Roles, ClusterRoles and
//! bindings in storage (no cache, so a binding works from the next request on), plus
//! the privileged `system:masters` group the real server short-circuits.
//!
//! Not implemented yet: aggregated ClusterRoles (`aggregationRule`) and the
//! escalate/bind checks on writing RBAC objects.

use serde_json::{json, Value};

use crate::auth::UserInfo;
use crate::status::ApiError;
use crate::storage::Store;

/// What a request asks to do (`authorizer.Attributes`).
#[derive(Debug, Clone, Default)]
pub struct Attributes {
    pub verb: String,
    pub resource_request: bool,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// Non-resource requests: the URL path.
    pub path: String,
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn has(list: &[&str], want: &str) -> bool {
    list.iter().any(|x| *x == "*" || *x == want)
}

/// Does one PolicyRule allow the request?
pub fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    if !has(&strs(&rule["verbs"]), &a.verb) {
        return false;
    }
    if !a.resource_request {
        return strs(&rule["nonResourceURLs"])
            .iter()
            .any(|u| *u == a.path || u.strip_suffix('*').is_some_and(|p| a.path.starts_with(p)));
    }
    if !has(&strs(&rule["apiGroups"]), &a.group) {
        return false;
    }
    let resources = strs(&rule["resources"]);
    let ok = if a.subresource.is_empty() {
        has(&resources, &a.resource)
    } else {
        let combined = format!("{}/{}", a.resource, a.subresource);
        let any = format!("*/{}", a.subresource);
        resources
            .iter()
            .any(|r| *r == "*" || *r == combined || *r == any)
    };
    if !ok {
        return false;
    }
    let names = strs(&rule["resourceNames"]);
    names.is_empty() || (!a.name.is_empty() && names.contains(&a.name.as_str()))
}

fn subject_matches(s: &Value, user: &UserInfo, binding_ns: &str) -> bool {
    let name = s["name"].as_str().unwrap_or_default();
    match s["kind"].as_str().unwrap_or_default() {
        "User" => user.username == name,
        "Group" => user.groups.iter().any(|g| g == name),
        "ServiceAccount" => {
            let ns = s["namespace"]
                .as_str()
                .filter(|n| !n.is_empty())
                .unwrap_or(binding_ns);
            user.username == format!("system:serviceaccount:{ns}:{name}")
        }
        _ => false,
    }
}

/// RBAC decision for `user` doing `a`.
pub fn authorize(store: &Store, user: &UserInfo, a: &Attributes) -> bool {
    if user.groups.iter().any(|g| g == "system:masters") {
        return true;
    }
    let rules_of = |kind: &str, ns: &str, name: &str| -> Vec<Value> {
        let (key, ns) = match kind {
            "ClusterRole" => ("rbac.authorization.k8s.io/clusterroles", ""),
            "Role" => ("rbac.authorization.k8s.io/roles", ns),
            _ => return Vec::new(),
        };
        store
            .get(key, ns, name)
            .and_then(|r| r["rules"].as_array().cloned())
            .unwrap_or_default()
    };
    let allowed_by = |binding: &Value, ns: &str| -> bool {
        let subjects = binding["subjects"].as_array().cloned().unwrap_or_default();
        if !subjects.iter().any(|s| subject_matches(s, user, ns)) {
            return false;
        }
        let r = &binding["roleRef"];
        rules_of(
            r["kind"].as_str().unwrap_or_default(),
            ns,
            r["name"].as_str().unwrap_or_default(),
        )
        .iter()
        .any(|rule| rule_allows(rule, a))
    };
    for b in store.list("rbac.authorization.k8s.io/clusterrolebindings", None) {
        if allowed_by(&b, "") {
            return true;
        }
    }
    if a.resource_request && !a.namespace.is_empty() {
        for b in store.list("rbac.authorization.k8s.io/rolebindings", Some(&a.namespace)) {
            if allowed_by(&b, &a.namespace) {
                return true;
            }
        }
    }
    false
}

/// The real 403: `pods "x" is forbidden: User "bob" cannot get resource "pods" in API
/// group "" in the namespace "default"`.
pub fn forbidden(user: &UserInfo, a: &Attributes) -> ApiError {
    if !a.resource_request {
        return ApiError::new(
            403,
            "Forbidden",
            format!(
                "forbidden: User \"{}\" cannot {} path \"{}\"",
                user.username, a.verb, a.path
            ),
        )
        .with_details(json!({}));
    }
    let qualified = if a.group.is_empty() {
        a.resource.clone()
    } else {
        format!("{}.{}", a.resource, a.group)
    };
    let subject = if a.name.is_empty() {
        qualified
    } else {
        format!("{qualified} \"{}\"", a.name)
    };
    let resource = if a.subresource.is_empty() {
        a.resource.clone()
    } else {
        format!("{}/{}", a.resource, a.subresource)
    };
    let scope = if a.namespace.is_empty() {
        "at the cluster scope".to_string()
    } else {
        format!("in the namespace \"{}\"", a.namespace)
    };
    let mut details = json!({ "kind": a.resource });
    if !a.name.is_empty() {
        details["name"] = json!(a.name);
    }
    if !a.group.is_empty() {
        details["group"] = json!(a.group);
    }
    ApiError::new(
        403,
        "Forbidden",
        format!(
            "{subject} is forbidden: User \"{}\" cannot {} resource \"{resource}\" in API group \"{}\" {scope}",
            user.username, a.verb, a.group
        ),
    )
    .with_details(details)
}

/// The ClusterRoles and ClusterRoleBindings every real cluster bootstraps that
/// matter here: superuser, discovery and self-review for everyone authenticated,
/// and `view`/`edit` for tests to bind (written out, not aggregated).
pub fn bootstrap_objects() -> Vec<(&'static str, Value)> {
    let cr = |name: &str, rules: Value| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
               "rules": rules})
    };
    let crb = |name: &str, role: &str, groups: &[&str]| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
               "subjects": groups.iter().map(|g| json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": g})).collect::<Vec<_>>()})
    };
    let read = json!(["get", "list", "watch"]);
    let write = json!([
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch"
    ]);
    let core_view = json!([
        "configmaps",
        "endpoints",
        "events",
        "pods",
        "pods/log",
        "pods/status",
        "serviceaccounts",
        "services",
        "services/status",
        "namespaces",
        "namespaces/status"
    ]);
    let (crs, crbs) = (
        "rbac.authorization.k8s.io/clusterroles",
        "rbac.authorization.k8s.io/clusterrolebindings",
    );
    vec![
        (
            crs,
            cr(
                "cluster-admin",
                json!([
            {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
            {"nonResourceURLs": ["*"], "verbs": ["*"]}]),
            ),
        ),
        (
            crs,
            cr(
                "system:discovery",
                json!([{"nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*",
            "/healthz", "/livez", "/openapi", "/openapi/*", "/readyz", "/version", "/version/"], "verbs": ["get"]}]),
            ),
        ),
        (
            crs,
            cr(
                "system:public-info-viewer",
                json!([{"nonResourceURLs": ["/healthz", "/livez", "/readyz",
            "/version", "/version/"], "verbs": ["get"]}]),
            ),
        ),
        (
            crs,
            cr(
                "system:basic-user",
                json!([{"apiGroups": ["authorization.k8s.io"],
            "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]},
            {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"], "verbs": ["create"]}]),
            ),
        ),
        (
            crs,
            cr(
                "view",
                json!([
            {"apiGroups": [""], "resources": core_view, "verbs": read},
            {"apiGroups": ["coordination.k8s.io", "batch", "events.k8s.io"], "resources": ["*"], "verbs": read},
            {"apiGroups": ["pgwarden.io"], "resources": ["*"], "verbs": read}]),
            ),
        ),
        (
            crs,
            cr(
                "edit",
                json!([
            {"apiGroups": [""], "resources": ["configmaps", "events", "pods", "secrets", "serviceaccounts", "services"], "verbs": write},
            {"apiGroups": ["coordination.k8s.io", "batch", "events.k8s.io"], "resources": ["*"], "verbs": write},
            {"apiGroups": ["pgwarden.io"], "resources": ["*"], "verbs": write}]),
            ),
        ),
        (
            crbs,
            crb("cluster-admin", "cluster-admin", &["system:masters"]),
        ),
        (
            crbs,
            crb(
                "system:discovery",
                "system:discovery",
                &["system:authenticated"],
            ),
        ),
        (
            crbs,
            crb(
                "system:basic-user",
                "system:basic-user",
                &["system:authenticated"],
            ),
        ),
        (
            crbs,
            crb(
                "system:public-info-viewer",
                "system:public-info-viewer",
                &["system:authenticated", "system:unauthenticated"],
            ),
        ),
        (
            crs,
            cr(
                "system:service-account-issuer-discovery",
                json!([{"nonResourceURLs": ["/.well-known/openid-configuration",
            "/.well-known/openid-configuration/", "/openid/v1/jwks", "/openid/v1/jwks/"], "verbs": ["get"]}]),
            ),
        ),
        (
            crs,
            cr(
                "system:auth-delegator",
                json!([{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
            {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]}]),
            ),
        ),
        (
            crbs,
            crb(
                "system:service-account-issuer-discovery",
                "system:service-account-issuer-discovery",
                &["system:serviceaccounts"],
            ),
        ),
        // Not a default binding: the one the Kubernetes docs give for letting relying
        // parties outside the cluster fetch the issuer's keys anonymously (what a
        // workload-identity setup adds; tests verify tokens with the JWKS this way).
        (
            crbs,
            crb(
                "service-account-issuer-discovery-public",
                "system:service-account-issuer-discovery",
                &["system:authenticated", "system:unauthenticated"],
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(verb: &str, resource: &str, sub: &str, name: &str) -> Attributes {
        Attributes {
            verb: verb.into(),
            resource_request: true,
            group: "pgwarden.io".into(),
            resource: resource.into(),
            subresource: sub.into(),
            namespace: "default".into(),
            name: name.into(),
            path: String::new(),
        }
    }

    #[test]
    fn rules() {
        let r = json!({"apiGroups": ["pgwarden.io"], "resources": ["approvalrequests", "*/status"],
                       "verbs": ["get", "patch"], "resourceNames": ["a"]});
        assert!(rule_allows(&r, &attrs("get", "approvalrequests", "", "a")));
        assert!(!rule_allows(&r, &attrs("get", "approvalrequests", "", "b")));
        assert!(!rule_allows(&r, &attrs("list", "approvalrequests", "", "")));
        assert!(rule_allows(
            &r,
            &attrs("patch", "databaseaccesspolicies", "status", "a")
        ));
        assert!(!rule_allows(
            &r,
            &attrs("patch", "databaseaccesspolicies", "", "a")
        ));
    }
}
