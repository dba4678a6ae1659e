//! PATCH bodies: JSON Merge Patch (RFC 7386), JSON Patch (RFC 6902) and a strategic
//! merge patch approximation.
//!
//! Strategic merge is applied as a merge patch after resolving the `$patch`
//! directives (`replace`, `delete`) and dropping the bookkeeping keys kubectl adds
//! (`$setElementOrder/...`, `$retainKeys`, `$deleteFromPrimitiveList/...`). Lists
//! with a merge key in the built-in kinds' schemas (`containers` by `name`,
//! `volumeMounts` by `mountPath`, … — [`merge_key`]) are merged item by item as
//! the real server does; other lists are replaced whole (atomic lists, and every
//! list of a custom resource, whose schemas carry no merge keys).

use serde_json::{Map, Value};

use crate::status::{ApiError, ApiResult};

pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().expect("object just ensured");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

pub fn strategic_merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            match p.get("$patch").and_then(Value::as_str) {
                Some("replace") => {
                    let mut m = p.clone();
                    m.remove("$patch");
                    *target = Value::Object(m);
                    return;
                }
                Some("delete") => {
                    *target = Value::Null;
                    return;
                }
                _ => {}
            }
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().expect("object just ensured");
            for (k, v) in p {
                if k.starts_with('$') {
                    continue;
                }
                if v.is_null() {
                    t.remove(k);
                    continue;
                }
                let slot = t.entry(k.clone()).or_insert(Value::Null);
                if let (Some(key), Value::Array(items), Value::Array(_)) = (merge_key(k), v, &*slot)
                {
                    merge_list(slot, items, key);
                    continue;
                }
                strategic_merge_patch(slot, v);
                if slot.is_null() {
                    t.remove(k);
                }
            }
        }
        Value::Array(items) => {
            // `{"$patch": "delete", ...}` items are removals; the rest replace.
            *target = Value::Array(
                items
                    .iter()
                    .filter(|i| i.get("$patch").and_then(Value::as_str) != Some("delete"))
                    .cloned()
                    .collect(),
            );
        }
        other => *target = other.clone(),
    }
}

/// The `patchMergeKey` of a list field in the built-in kinds (core/v1 Pod and
/// its templates, Service, ServiceAccount), as their OpenAPI schemas declare it.
pub fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "secrets"
        | "resourceClaims" => "name",
        "hostAliases" => "ip",
        "readinessGates" => "conditionType",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ports" => "containerPort",
        _ => return None,
    })
}

/// Merges `patch` items into the list by `key`: an item whose key matches is
/// merged into it (`$patch: delete` removes it), a new key is appended.
fn merge_list(target: &mut Value, patch: &[Value], key: &str) {
    let Value::Array(list) = target else {
        return;
    };
    for item in patch {
        let Some(k) = item.get(key) else {
            // No merge key: the real server refuses; keep the item as given.
            list.push(item.clone());
            continue;
        };
        let pos = list.iter().position(|e| e.get(key) == Some(k));
        match (item.get("$patch").and_then(Value::as_str), pos) {
            (Some("delete"), Some(i)) => {
                list.remove(i);
            }
            (Some("delete"), None) => {}
            (_, Some(i)) => strategic_merge_patch(&mut list[i], item),
            (_, None) => {
                let mut new = Value::Null;
                strategic_merge_patch(&mut new, item);
                list.push(new);
            }
        }
    }
}

fn unescape(tok: &str) -> String {
    tok.replace("~1", "/").replace("~0", "~")
}

fn tokens(ptr: &str) -> ApiResult<Vec<String>> {
    if ptr.is_empty() {
        return Ok(Vec::new());
    }
    if !ptr.starts_with('/') {
        return Err(ApiError::new(
            422,
            "Invalid",
            format!("the server rejected our request due to an error in our request: invalid JSON pointer {ptr:?}"),
        ));
    }
    Ok(ptr[1..].split('/').map(unescape).collect())
}

fn patch_err(msg: String) -> ApiError {
    // The real server answers a JSON Patch that cannot be applied with 422.
    ApiError::new(422, "Invalid", msg)
}

fn parent<'a>(doc: &'a mut Value, toks: &[String], path: &str) -> ApiResult<&'a mut Value> {
    let mut cur = doc;
    for t in toks {
        cur = match cur {
            Value::Object(m) => m
                .get_mut(t)
                .ok_or_else(|| patch_err(format!("doc is missing path: {path:?}")))?,
            Value::Array(a) => {
                let i: usize = t
                    .parse()
                    .map_err(|_| patch_err(format!("invalid array index {t:?} in {path:?}")))?;
                a.get_mut(i)
                    .ok_or_else(|| patch_err(format!("doc is missing path: {path:?}")))?
            }
            _ => return Err(patch_err(format!("doc is missing path: {path:?}"))),
        };
    }
    Ok(cur)
}

fn get(doc: &Value, path: &str) -> ApiResult<Value> {
    let toks = tokens(path)?;
    let mut cur = doc;
    for t in &toks {
        cur = match cur {
            Value::Object(m) => m.get(t),
            Value::Array(a) => t.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        }
        .ok_or_else(|| patch_err(format!("doc is missing path: {path:?}")))?;
    }
    Ok(cur.clone())
}

fn add(doc: &mut Value, path: &str, value: Value) -> ApiResult<()> {
    let toks = tokens(path)?;
    let Some((last, init)) = toks.split_last() else {
        *doc = value;
        return Ok(());
    };
    match parent(doc, init, path)? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
        }
        Value::Array(a) => {
            let i = if last == "-" {
                a.len()
            } else {
                last.parse::<usize>()
                    .map_err(|_| patch_err(format!("invalid array index {last:?}")))?
            };
            if i > a.len() {
                return Err(patch_err(format!(
                    "add operation index out of bounds: {path:?}"
                )));
            }
            a.insert(i, value);
        }
        _ => return Err(patch_err(format!("doc is missing path: {path:?}"))),
    }
    Ok(())
}

fn remove(doc: &mut Value, path: &str) -> ApiResult<Value> {
    let toks = tokens(path)?;
    let Some((last, init)) = toks.split_last() else {
        return Err(patch_err("cannot remove the whole document".into()));
    };
    let missing = || {
        patch_err(format!(
            "unable to remove nonexistent key: {last}: missing value"
        ))
    };
    match parent(doc, init, path)? {
        Value::Object(m) => m.remove(last).ok_or_else(missing),
        Value::Array(a) => {
            let i: usize = last.parse().map_err(|_| missing())?;
            if i < a.len() {
                Ok(a.remove(i))
            } else {
                Err(missing())
            }
        }
        _ => Err(missing()),
    }
}

/// Applies an RFC 6902 patch; all or nothing.
pub fn json_patch(doc: &mut Value, patch: &Value) -> ApiResult<()> {
    let ops = patch.as_array().ok_or_else(|| {
        ApiError::bad_request(
            "json: cannot unmarshal object into Go value of type []handlers.jsonPatchOp",
        )
    })?;
    let mut work = doc.clone();
    for op in ops {
        let path = op["path"].as_str().unwrap_or_default();
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| patch_err(format!("missing value for {path:?}")))
        };
        match op["op"].as_str().unwrap_or_default() {
            "add" => add(&mut work, path, value()?)?,
            "remove" => {
                remove(&mut work, path)?;
            }
            "replace" => {
                remove(&mut work, path)
                    .map_err(|_| patch_err(format!("replace operation does not apply: doc is missing key: {path}: missing value")))?;
                add(&mut work, path, value()?)?;
            }
            "move" => {
                let from = op["from"].as_str().unwrap_or_default();
                let v = remove(&mut work, from)?;
                add(&mut work, path, v)?;
            }
            "copy" => {
                let from = op["from"].as_str().unwrap_or_default();
                let v = get(&work, from)?;
                add(&mut work, path, v)?;
            }
            "test" => {
                if get(&work, path)? != value()? {
                    return Err(patch_err(format!(
                        "testing value {path} failed: test failed"
                    )));
                }
            }
            other => return Err(patch_err(format!("Unexpected kind: {other}"))),
        }
    }
    *doc = work;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_removes_nulls_and_recurses() {
        let mut d = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge_patch(&mut d, &json!({"a": {"b": null, "d": 3}, "l": [3]}));
        assert_eq!(d, json!({"a": {"c": 2, "d": 3}, "l": [3]}));
    }

    #[test]
    fn json_patch_ops_and_atomicity() {
        let mut d = json!({"a": [1, 2], "b": {"x": 1}});
        json_patch(
            &mut d,
            &json!([{"op": "add", "path": "/a/-", "value": 3},
                    {"op": "replace", "path": "/b/x", "value": 2},
                    {"op": "copy", "from": "/b", "path": "/c"},
                    {"op": "remove", "path": "/a/0"}]),
        )
        .unwrap();
        assert_eq!(d, json!({"a": [2, 3], "b": {"x": 2}, "c": {"x": 2}}));
        let before = d.clone();
        let err = json_patch(
            &mut d,
            &json!([{"op": "remove", "path": "/b"}, {"op": "test", "path": "/a/0", "value": 9}]),
        )
        .unwrap_err();
        assert_eq!(err.code, 422);
        assert_eq!(d, before);
    }

    #[test]
    fn strategic_lists_merge_by_their_key() {
        let mut pod = json!({"spec": {"containers": [
            {"name": "app", "image": "a:1", "env": [{"name": "X", "value": "1"}]},
            {"name": "side", "image": "s:1"}]}});
        strategic_merge_patch(
            &mut pod,
            &json!({"spec": {"containers": [
                {"name": "app", "env": [{"name": "Y", "value": "2"}]},
                {"name": "side", "$patch": "delete"},
                {"name": "new", "image": "n:1"}]}}),
        );
        assert_eq!(
            pod,
            json!({"spec": {"containers": [
                {"name": "app", "image": "a:1",
                 "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]},
                {"name": "new", "image": "n:1"}]}})
        );
        // A list without a merge key is replaced whole.
        let mut d = json!({"spec": {"args": ["a", "b"]}});
        strategic_merge_patch(&mut d, &json!({"spec": {"args": ["c"]}}));
        assert_eq!(d, json!({"spec": {"args": ["c"]}}));
    }

    #[test]
    fn strategic_directives() {
        let mut d = json!({"data": {"a": "1"}, "spec": {"x": {"y": 1}}});
        strategic_merge_patch(
            &mut d,
            &json!({"$setElementOrder/containers": [], "data": {"b": "2"},
                    "spec": {"x": {"$patch": "replace", "z": 2}}}),
        );
        assert_eq!(
            d,
            json!({"data": {"a": "1", "b": "2"}, "spec": {"x": {"z": 2}}})
        );
    }
}
