//! Structural OpenAPI v3 schemas of CustomResourceDefinitions, applied the way the
//! real apiextensions server does on every write, in its order:
//!
//! 1. **prune**: fields the schema does not declare are dropped (or, with
//!    `fieldValidation=Strict`, which kubectl sends by default, refused with 400
//!    "strict decoding error: unknown field ..."); `null` in a non-nullable field is
//!    dropped too;
//! 2. **default**: `default` values fill absent fields;
//! 3. **validate**: types, formats, enum, pattern, required, min/max, length and item
//!    counts, and the `self == oldSelf` transition rule (the only CEL rule understood;
//!    other `x-kubernetes-validations` are ignored — no CEL engine here). Errors carry
//!    the real messages and field paths so kubectl prints what it prints against a
//!    real cluster.
//!
//! `apiVersion`, `kind` and `metadata` at the root are the server's business (they are
//! never pruned or validated here).

use std::collections::BTreeMap;

use regex::Regex;
use serde_json::{Map, Value};

use crate::status::{go_repr, Cause};

#[derive(Debug, Clone, Default)]
pub struct Schema {
    pub type_: Option<String>,
    pub format: Option<String>,
    pub enum_: Option<Vec<Value>>,
    pub pattern: Option<(String, Regex)>,
    pub required: Vec<String>,
    pub properties: BTreeMap<String, Schema>,
    pub additional_properties: Option<Box<Schema>>,
    pub items: Option<Box<Schema>>,
    pub nullable: bool,
    pub default: Option<Value>,
    pub minimum: Option<f64>,
    pub maximum: Option<f64>,
    pub exclusive_minimum: bool,
    pub exclusive_maximum: bool,
    pub min_length: Option<u64>,
    pub max_length: Option<u64>,
    pub min_items: Option<u64>,
    pub max_items: Option<u64>,
    pub preserve_unknown_fields: bool,
    pub int_or_string: bool,
    pub embedded_resource: bool,
    /// Messages of `self == oldSelf` rules (immutability).
    pub immutable: Vec<String>,
}

impl Schema {
    /// Parses an `openAPIV3Schema`. Errors name what is unusable.
    pub fn parse(v: &Value) -> Result<Schema, String> {
        let o = v
            .as_object()
            .ok_or_else(|| "schema must be an object".to_string())?;
        let mut s = Schema {
            type_: o.get("type").and_then(Value::as_str).map(String::from),
            format: o.get("format").and_then(Value::as_str).map(String::from),
            enum_: o.get("enum").and_then(Value::as_array).cloned(),
            nullable: o.get("nullable").and_then(Value::as_bool).unwrap_or(false),
            default: o.get("default").cloned(),
            minimum: o.get("minimum").and_then(Value::as_f64),
            maximum: o.get("maximum").and_then(Value::as_f64),
            exclusive_minimum: o
                .get("exclusiveMinimum")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            exclusive_maximum: o
                .get("exclusiveMaximum")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            min_length: o.get("minLength").and_then(Value::as_u64),
            max_length: o.get("maxLength").and_then(Value::as_u64),
            min_items: o.get("minItems").and_then(Value::as_u64),
            max_items: o.get("maxItems").and_then(Value::as_u64),
            preserve_unknown_fields: o
                .get("x-kubernetes-preserve-unknown-fields")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            int_or_string: o
                .get("x-kubernetes-int-or-string")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            embedded_resource: o
                .get("x-kubernetes-embedded-resource")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            ..Schema::default()
        };
        if let Some(p) = o.get("pattern").and_then(Value::as_str) {
            // ECMA-262 patterns; the regex crate covers the common subset (no
            // look-around or backreferences, which structural schemas rarely use).
            let re = Regex::new(p).map_err(|e| format!("pattern {p:?}: {e}"))?;
            s.pattern = Some((p.to_string(), re));
        }
        if let Some(r) = o.get("required").and_then(Value::as_array) {
            s.required = r
                .iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect();
        }
        if let Some(props) = o.get("properties").and_then(Value::as_object) {
            for (k, pv) in props {
                s.properties.insert(k.clone(), Schema::parse(pv)?);
            }
        }
        match o.get("additionalProperties") {
            Some(Value::Bool(true)) => s.preserve_unknown_fields = true,
            Some(ap @ Value::Object(_)) => {
                s.additional_properties = Some(Box::new(Schema::parse(ap)?))
            }
            _ => {}
        }
        if let Some(items) = o.get("items") {
            s.items = Some(Box::new(Schema::parse(items)?));
        }
        if let Some(rules) = o.get("x-kubernetes-validations").and_then(Value::as_array) {
            for r in rules {
                let rule: String = r["rule"]
                    .as_str()
                    .unwrap_or_default()
                    .split_whitespace()
                    .collect();
                if rule == "self==oldSelf" {
                    s.immutable.push(
                        r["message"]
                            .as_str()
                            .unwrap_or("Invalid value: failed rule: self == oldSelf")
                            .to_string(),
                    );
                }
            }
        }
        Ok(s)
    }

    fn is_object_like(&self) -> bool {
        self.type_.as_deref() == Some("object") || !self.properties.is_empty()
    }

    /// Step 1, pruning: removes undeclared fields (recording their paths in
    /// `unknown`) and nulls of non-nullable fields. Applied to the whole object;
    /// skips the root's apiVersion/kind/metadata.
    pub fn prune_root(&self, obj: &mut Value, unknown: &mut Vec<String>) {
        if let Value::Object(m) = obj {
            let keys: Vec<String> = m.keys().cloned().collect();
            for k in keys {
                if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                match self.properties.get(&k) {
                    Some(sub) => {
                        if m[&k].is_null() && !sub.nullable {
                            m.remove(&k);
                        } else if let Some(v) = m.get_mut(&k) {
                            sub.prune(v, &k, unknown);
                        }
                    }
                    None if self.preserve_unknown_fields => {}
                    None => {
                        unknown.push(k.clone());
                        m.remove(&k);
                    }
                }
            }
        }
    }

    fn prune(&self, v: &mut Value, path: &str, unknown: &mut Vec<String>) {
        match v {
            Value::Object(m) if self.is_object_like() || self.additional_properties.is_some() => {
                let keys: Vec<String> = m.keys().cloned().collect();
                for k in keys {
                    let sub = self
                        .properties
                        .get(&k)
                        .or(self.additional_properties.as_deref());
                    let child = format!("{path}.{k}");
                    match sub {
                        Some(sub) => {
                            if m[&k].is_null() && !sub.nullable {
                                m.remove(&k);
                            } else if let Some(v) = m.get_mut(&k) {
                                sub.prune(v, &child, unknown);
                            }
                        }
                        None if self.preserve_unknown_fields || self.embedded_resource => {}
                        None => {
                            unknown.push(child);
                            m.remove(&k);
                        }
                    }
                }
            }
            Value::Array(items) => {
                if let Some(is) = &self.items {
                    for (i, item) in items.iter_mut().enumerate() {
                        is.prune(item, &format!("{path}[{i}]"), unknown);
                    }
                }
            }
            _ => {}
        }
    }

    /// Step 2, defaulting: fills absent properties that have a `default`, recursing
    /// into present objects and array items.
    pub fn apply_defaults(&self, v: &mut Value) {
        match v {
            Value::Object(m) => {
                for (k, sub) in &self.properties {
                    if !m.contains_key(k) {
                        if let Some(d) = &sub.default {
                            m.insert(k.clone(), d.clone());
                        }
                    }
                    if let Some(child) = m.get_mut(k) {
                        sub.apply_defaults(child);
                    }
                }
                if let Some(ap) = &self.additional_properties {
                    for (k, child) in m.iter_mut() {
                        if !self.properties.contains_key(k) {
                            ap.apply_defaults(child);
                        }
                    }
                }
            }
            Value::Array(items) => {
                if let Some(is) = &self.items {
                    for item in items {
                        is.apply_defaults(item);
                    }
                }
            }
            _ => {}
        }
    }

    /// Step 3 at the root: validates every property but apiVersion/kind/metadata.
    pub fn validate_root(&self, obj: &Value, old: Option<&Value>, causes: &mut Vec<Cause>) {
        let Some(m) = obj.as_object() else {
            causes.push(Cause::invalid("", &type_name(obj), "must be an object"));
            return;
        };
        for r in &self.required {
            if !m.contains_key(r) && !matches!(r.as_str(), "apiVersion" | "kind" | "metadata") {
                causes.push(Cause::required(r));
            }
        }
        for (k, sub) in &self.properties {
            if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            if let Some(v) = m.get(k) {
                sub.validate(v, old.and_then(|o| o.get(k)), k, causes);
            }
        }
    }

    fn validate(&self, v: &Value, old: Option<&Value>, path: &str, causes: &mut Vec<Cause>) {
        if v.is_null() {
            if !self.nullable {
                causes.push(type_error(
                    path,
                    v,
                    self.type_.as_deref().unwrap_or("object"),
                ));
            }
            return;
        }
        if let Some(old) = old {
            if old != v {
                for msg in &self.immutable {
                    causes.push(Cause::invalid(path, &type_name(v), msg));
                }
            }
        }
        if self.int_or_string {
            if !(v.is_string() || is_integer(v)) {
                causes.push(Cause::invalid(
                    path,
                    &type_name(v),
                    &format!("{path} in body must be of type integer-or-string"),
                ));
                return;
            }
        } else if let Some(t) = self.type_.as_deref() {
            let ok = match t {
                "object" => v.is_object(),
                "array" => v.is_array(),
                "string" => v.is_string(),
                "integer" => is_integer(v),
                "number" => v.is_number(),
                "boolean" => v.is_boolean(),
                _ => true,
            };
            if !ok {
                causes.push(type_error(path, v, t));
                return;
            }
        }
        if let Some(e) = &self.enum_ {
            if !e.contains(v) {
                causes.push(Cause::not_supported(path, v, e));
            }
        }
        match v {
            Value::String(s) => self.validate_string(s, v, path, causes),
            Value::Number(n) => self.validate_number(n.as_f64().unwrap_or(0.0), v, path, causes),
            Value::Array(items) => {
                let n = items.len() as u64;
                if let Some(max) = self.max_items {
                    if n > max {
                        causes.push(Cause {
                            reason: "FieldValueTooMany",
                            message: format!("Too many: {n}: must have at most {max} items"),
                            field: path.into(),
                        });
                    }
                }
                if let Some(min) = self.min_items {
                    if n < min {
                        causes.push(Cause::invalid(
                            path,
                            &n.to_string(),
                            &format!("{path} in body should have at least {min} items"),
                        ));
                    }
                }
                if let Some(is) = &self.items {
                    let old_items = old.and_then(Value::as_array);
                    for (i, item) in items.iter().enumerate() {
                        // Transition rules on list items compare by index only
                        // for atomic lists; good enough for immutability checks.
                        let o = old_items.and_then(|o| o.get(i));
                        is.validate(item, o, &format!("{path}[{i}]"), causes);
                    }
                }
            }
            Value::Object(m) => {
                for r in &self.required {
                    if !m.contains_key(r) {
                        causes.push(Cause::required(&format!("{path}.{r}")));
                    }
                }
                for (k, child) in m {
                    let sub = self
                        .properties
                        .get(k)
                        .or(self.additional_properties.as_deref());
                    if let Some(sub) = sub {
                        sub.validate(
                            child,
                            old.and_then(|o| o.get(k)),
                            &format!("{path}.{k}"),
                            causes,
                        );
                    }
                }
            }
            _ => {}
        }
    }

    fn validate_string(&self, s: &str, v: &Value, path: &str, causes: &mut Vec<Cause>) {
        let len = s.chars().count() as u64;
        if let Some(max) = self.max_length {
            if len > max {
                causes.push(Cause {
                    reason: "FieldValueTooLong",
                    message: format!("Too long: may not be more than {max} bytes"),
                    field: path.into(),
                });
            }
        }
        if let Some(min) = self.min_length {
            if len < min {
                causes.push(Cause::invalid(
                    path,
                    &go_repr(v),
                    &format!("{path} in body should be at least {min} chars long"),
                ));
            }
        }
        if let Some((src, re)) = &self.pattern {
            if !re.is_match(s) {
                causes.push(Cause::invalid(
                    path,
                    &go_repr(v),
                    &format!("{path} in body should match '{src}'"),
                ));
            }
        }
        if let Some(f) = self.format.as_deref() {
            let ok = match f {
                "date-time" => s.parse::<jiff::Timestamp>().is_ok(),
                "date" => s.parse::<jiff::civil::Date>().is_ok(),
                "byte" => {
                    use base64::Engine;
                    base64::engine::general_purpose::STANDARD.decode(s).is_ok()
                }
                _ => true,
            };
            if !ok {
                causes.push(Cause::invalid(
                    path,
                    &go_repr(v),
                    &format!("{path} in body must be of type {f}: {}", go_repr(v)),
                ));
            }
        }
    }

    fn validate_number(&self, n: f64, v: &Value, path: &str, causes: &mut Vec<Cause>) {
        let shown = go_repr(v);
        if let Some(min) = self.minimum {
            if (self.exclusive_minimum && n <= min) || n < min {
                let rel = if self.exclusive_minimum {
                    "greater than"
                } else {
                    "greater than or equal to"
                };
                causes.push(Cause::invalid(
                    path,
                    &shown,
                    &format!("{path} in body should be {rel} {}", num(min)),
                ));
            }
        }
        if let Some(max) = self.maximum {
            if (self.exclusive_maximum && n >= max) || n > max {
                let rel = if self.exclusive_maximum {
                    "less than"
                } else {
                    "less than or equal to"
                };
                causes.push(Cause::invalid(
                    path,
                    &shown,
                    &format!("{path} in body should be {rel} {}", num(max)),
                ));
            }
        }
    }
}

fn num(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e15 {
        format!("{}", f as i64)
    } else {
        f.to_string()
    }
}

fn is_integer(v: &Value) -> bool {
    v.as_i64().is_some() || v.as_u64().is_some()
}

/// The JSON type of a value, quoted, as the validator shows it.
pub fn type_name(v: &Value) -> String {
    let t = match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) if is_integer(v) => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    format!("\"{t}\"")
}

fn type_error(path: &str, v: &Value, want: &str) -> Cause {
    let got = type_name(v);
    Cause::invalid(
        path,
        &got,
        &format!("{path} in body must be of type {want}: {got}"),
    )
}

/// Keeps only known keys of `m` (helper for callers that build objects).
pub fn retain_keys(m: &mut Map<String, Value>, keys: &[&str]) {
    m.retain(|k, _| keys.contains(&k.as_str()));
}
