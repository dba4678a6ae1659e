//! PATCH bodies: JSON Merge Patch (RFC 7386), JSON Patch (RFC 6902) and a strategic
//! merge patch approximation.
//!
//! Strategic merge is applied as a merge patch after resolving the `$patch`
//! directives (`replace`, `delete`) and dropping the bookkeeping keys kubectl adds
//! (`$setElementOrder/...`, `$retainKeys`, `$deleteFromPrimitiveList/...`). Lists are
//! replaced whole: right for atomic lists, wrong for lists with a merge key
//! (`containers` by name): a later session should add the merge keys of the built-in
//! kinds pgwarden patches (Pod containers/volumes/env).

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
