//! `meta.k8s.io/v1` `Table` output: what `kubectl get` asks for (`Accept:
//! application/json;as=Table;v=v1;g=meta.k8s.io`). Columns are `Name` plus the type's
//! columns (a CRD's `additionalPrinterColumns`); rows carry the object as
//! `PartialObjectMetadata` (or whole with `includeObject=Object`), which kubectl uses
//! for `-A`'s namespace column and `--show-labels`.

use serde_json::{json, Value};

use crate::registry::{ColumnSource, ResourceType};

/// Evaluates the simple JSONPath subset printer columns use: `.a.b`, `.a[0].b`,
/// `.a['x.y']`. Anything else yields no value (the cell shows `<none>`).
pub fn jsonpath<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    let p = path.trim().trim_start_matches('{').trim_end_matches('}');
    let mut cur = obj;
    let mut rest = p.strip_prefix('.').unwrap_or(p);
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            let inner = &r[..end];
            cur = if let Ok(i) = inner.parse::<usize>() {
                cur.get(i)?
            } else {
                cur.get(inner.trim_matches(|c| c == '\'' || c == '"'))?
            };
            rest = r[end + 1..].strip_prefix('.').unwrap_or(&r[end + 1..]);
        } else {
            let end = rest.find(['.', '[']).unwrap_or(rest.len());
            cur = cur.get(&rest[..end])?;
            rest = rest[end..].strip_prefix('.').unwrap_or(&rest[end..]);
        }
    }
    Some(cur)
}

/// Go's `duration.HumanDuration`, the `Age` text of real tables.
pub fn human_duration(secs: i64) -> String {
    if secs < 0 {
        return "<invalid>".into();
    }
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86400);
    if secs < 120 {
        format!("{secs}s")
    } else if m < 10 {
        match secs % 60 {
            0 => format!("{m}m"),
            s => format!("{m}m{s}s"),
        }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        match m % 60 {
            0 => format!("{h}h"),
            mm => format!("{h}h{mm}m"),
        }
    } else if h < 48 {
        format!("{h}h")
    } else if d < 8 {
        match h % 24 {
            0 => format!("{d}d"),
            hh => format!("{d}d{hh}h"),
        }
    } else if d < 365 * 2 {
        format!("{d}d")
    } else {
        format!("{}y", d / 365)
    }
}

fn cell(t: &ResourceType, obj: &Value, c: &crate::registry::Column) -> Value {
    let v = match &c.source {
        ColumnSource::JsonPath(p) => jsonpath(obj, p).cloned(),
        ColumnSource::CountKeys(path) => {
            let mut cur = obj;
            for seg in path {
                cur = &cur[*seg];
            }
            Some(json!(
                cur.as_object().map_or(0, |m| m.len())
                    + if t.kind == "Secret" {
                        obj["stringData"].as_object().map_or(0, |m| m.len())
                    } else {
                        0
                    }
            ))
        }
    };
    match (c.type_.as_str(), v) {
        (_, None) | (_, Some(Value::Null)) => Value::Null,
        ("date", Some(Value::String(s))) => match s.parse::<jiff::Timestamp>() {
            Ok(ts) => json!(human_duration(
                jiff::Timestamp::now().duration_since(ts).as_secs()
            )),
            Err(_) => json!(s),
        },
        // Composite values print as compact JSON, like the real converter.
        (_, Some(v @ (Value::Object(_) | Value::Array(_)))) => json!(v.to_string()),
        (_, Some(v)) => v,
    }
}

pub fn column_definitions(t: &ResourceType) -> Vec<Value> {
    let mut cols = vec![json!({
        "name": "Name", "type": "string", "format": "name", "priority": 0,
        "description": "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names",
    })];
    for c in &t.columns {
        cols.push(json!({
            "name": c.name, "type": c.type_, "format": c.format,
            "description": c.description, "priority": c.priority,
        }));
    }
    cols
}

pub fn row(t: &ResourceType, obj: &Value, include_object: &str) -> Value {
    let mut cells = vec![obj["metadata"]["name"].clone()];
    cells.extend(t.columns.iter().map(|c| cell(t, obj, c)));
    let object = match include_object {
        "None" => Value::Null,
        "Object" => obj.clone(),
        _ => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj["metadata"],
        }),
    };
    json!({ "cells": cells, "object": object })
}

/// A Table of `objs` at list resourceVersion `rv`.
pub fn table(
    t: &ResourceType,
    objs: &[Value],
    rv: u64,
    include_object: &str,
    headers: bool,
) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": { "resourceVersion": rv.to_string() },
        "columnDefinitions": if headers { column_definitions(t) } else { vec![] },
        "rows": objs.iter().map(|o| row(t, o, include_object)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_durations() {
        let o = json!({"spec": {"a": [{"b": 1}], "m": {"x.y": "z"}}});
        assert_eq!(jsonpath(&o, ".spec.a[0].b"), Some(&json!(1)));
        assert_eq!(jsonpath(&o, ".spec.m['x.y']"), Some(&json!("z")));
        assert_eq!(jsonpath(&o, ".spec.none"), None);
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(150), "2m30s");
        assert_eq!(human_duration(3 * 86400), "3d");
    }
}
