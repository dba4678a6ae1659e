//! A minimal OpenAPI v3 surface: the index (`/openapi/v3`) and one document per
//! group/version listing each resource's paths with the `x-kubernetes-group-version-kind`
//! of its PATCH operation and the `fieldValidation` query parameter.
//!
//! That is what kubectl reads to decide that the server validates fields itself
//! (it then sends `fieldValidation=Strict` instead of validating client-side; with no
//! OpenAPI at all, `kubectl apply` refuses to run). Custom resources' schemas are
//! published (their CRD's openAPIV3Schema, tagged with the GVK), which is what
//! `kubectl explain` reads; built-in kinds have none. Strategic-merge patch content types are
//! advertised for built-in kinds, which makes kubectl use them as it does on a real
//! server.

use serde_json::{json, Map, Value};

use crate::registry::Registry;
use crate::storage::Store;

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

pub fn index(reg: &Registry) -> Value {
    let mut paths = Map::new();
    for (g, vs) in reg.groups() {
        for v in vs {
            let p = gv_path(&g, &v);
            paths.insert(
                p.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{p}")}),
            );
        }
    }
    json!({ "paths": paths })
}

/// `io.pgwarden.v1alpha1.DatabaseAccessPolicy`: the real server's definition name.
fn definition_name(group: &str, version: &str, kind: &str) -> String {
    let mut g: Vec<&str> = group.split('.').collect();
    g.reverse();
    format!("{}.{version}.{kind}", g.join("."))
}

/// A custom resource's published schema: the CRD's, with the fields every object
/// has and the GVK that `kubectl explain` looks for.
fn crd_schema(store: &Store, crd: &str, group: &str, version: &str, kind: &str) -> Option<Value> {
    let obj = store.get("apiextensions.k8s.io/customresourcedefinitions", "", crd)?;
    let v = obj["spec"]["versions"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == version)?;
    let mut schema = v["schema"]["openAPIV3Schema"].clone();
    let props = schema
        .as_object_mut()?
        .entry("properties")
        .or_insert(json!({}));
    let props = props.as_object_mut()?;
    props.entry("apiVersion").or_insert(json!({"type": "string",
        "description": "APIVersion defines the versioned schema of this representation of an object. Servers should convert recognized schemas to the latest internal value, and may reject unrecognized values. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#resources"}));
    props.entry("kind").or_insert(json!({"type": "string",
        "description": "Kind is a string value representing the REST resource this object represents. Servers may infer this from the endpoint the client submits requests to. Cannot be updated. In CamelCase. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds"}));
    props.insert("metadata".into(), json!({"type": "object",
        "description": "Standard object's metadata. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata"}));
    schema["x-kubernetes-group-version-kind"] =
        json!([{"group": group, "version": version, "kind": kind}]);
    Some(schema)
}

/// The document of `api/v1` or `apis/<group>/<version>`.
pub fn group_version(store: &Store, gv: &str) -> Option<Value> {
    let reg = &store.registry;
    let mut paths = Map::new();
    let mut schemas = Map::new();
    for t in reg.all() {
        if gv_path(&t.group, &t.version) != gv {
            continue;
        }
        let gvk = json!({"group": t.group, "version": t.version, "kind": t.kind});
        if let Some(crd) = &t.crd_name {
            if let Some(sc) = crd_schema(store, crd, &t.group, &t.version, &t.kind) {
                schemas.insert(definition_name(&t.group, &t.version, &t.kind), sc);
            }
        }
        let prefix = if t.namespaced {
            format!("/{gv}/namespaces/{{namespace}}/{}", t.plural)
        } else {
            format!("/{gv}/{}", t.plural)
        };
        let params = json!([
            {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
        ]);
        if t.virtual_create {
            // Reviews: create only (`kubectl create -f` of a TokenReview needs the
            // group's document, with fieldValidation, or it validates client-side).
            paths.insert(
                prefix,
                json!({"parameters": params, "post": {"x-kubernetes-action": "post",
                    "x-kubernetes-group-version-kind": gvk, "parameters": params, "responses": {}}}),
            );
            continue;
        }
        let mut content = Map::new();
        content.insert("application/json-patch+json".into(), json!({}));
        content.insert("application/merge-patch+json".into(), json!({}));
        if t.crd_name.is_none() {
            content.insert("application/strategic-merge-patch+json".into(), json!({}));
        }
        paths.insert(
            format!("{prefix}/{{name}}"),
            json!({
                "parameters": params,
                "get": {"x-kubernetes-action": "get", "x-kubernetes-group-version-kind": gvk, "responses": {}},
                "put": {"x-kubernetes-action": "put", "x-kubernetes-group-version-kind": gvk, "parameters": params, "responses": {}},
                "patch": {"x-kubernetes-action": "patch", "x-kubernetes-group-version-kind": gvk,
                          "parameters": params,
                          "requestBody": {"content": content}, "responses": {}},
                "delete": {"x-kubernetes-action": "delete", "x-kubernetes-group-version-kind": gvk, "responses": {}},
            }),
        );
        paths.insert(
            prefix,
            json!({
                "parameters": params,
                "get": {"x-kubernetes-action": "list", "x-kubernetes-group-version-kind": gvk, "responses": {}},
                "post": {"x-kubernetes-action": "post", "x-kubernetes-group-version-kind": gvk, "parameters": params, "responses": {}},
            }),
        );
    }
    if paths.is_empty() {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": format!("v{}.{}.0", crate::discovery::MAJOR, crate::discovery::MINOR)},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}
