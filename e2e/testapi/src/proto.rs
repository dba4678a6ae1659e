//! Just enough Kubernetes protobuf to read the request bodies kubectl's typed
//! clients send that way: SelfSubjectAccessReview (`kubectl auth can-i`),
//! SelfSubjectReview (`auth whoami`), TokenRequest (`create token`), and the
//! `kubectl create <kind>` generators of ServiceAccount, Namespace, Secret,
//! ConfigMap, RoleBinding and ClusterRoleBinding. Responses are JSON, which those
//! clients accept (`Accept: application/vnd.kubernetes.protobuf, */*`). Other
//! protobuf bodies get 415 until a message mapping is added here.
//!
//! Wire format: the `k8s\0` magic, then a `runtime.Unknown` message (1: TypeMeta
//! {1: apiVersion, 2: kind}, 2: raw bytes of the object).

use serde_json::{json, Map, Value};

fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i)?;
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Length-delimited fields of a message by number (others skipped).
fn fields(b: &[u8]) -> Option<Vec<(u64, &[u8])>> {
    Some(
        all_fields(b)?
            .into_iter()
            .filter_map(|(n, v)| match v {
                Wire::Bytes(b) => Some((n, b)),
                Wire::Varint(_) => None,
            })
            .collect(),
    )
}

/// A field's value: a varint (ints, bools) or length-delimited bytes.
#[derive(Clone, Copy)]
enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn all_fields(b: &[u8]) -> Option<Vec<(u64, Wire<'_>)>> {
    let (mut i, mut out) = (0, Vec::new());
    while i < b.len() {
        let tag = varint(b, &mut i)?;
        match tag & 7 {
            0 => out.push((tag >> 3, Wire::Varint(varint(b, &mut i)?))),
            1 => i += 8,
            5 => i += 4,
            2 => {
                let len = usize::try_from(varint(b, &mut i)?).ok()?;
                let end = i.checked_add(len).filter(|e| *e <= b.len())?;
                out.push((tag >> 3, Wire::Bytes(&b[i..end])));
                i = end;
            }
            _ => return None,
        }
    }
    Some(out)
}

fn strings(b: &[u8], names: &[(u64, &str)]) -> Option<Value> {
    let mut m = Map::new();
    for (n, v) in fields(b)? {
        if let Some((_, name)) = names.iter().find(|(k, _)| *k == n) {
            m.insert((*name).into(), json!(String::from_utf8_lossy(v)));
        }
    }
    Some(Value::Object(m))
}

/// Decodes a protobuf body to the JSON object it stands for, when known.
pub fn decode(body: &[u8]) -> Option<Value> {
    let rest = body.strip_prefix(b"k8s\0")?;
    let unknown = fields(rest)?;
    let tm = unknown.iter().find(|(n, _)| *n == 1)?.1;
    let tm = strings(tm, &[(1, "apiVersion"), (2, "kind")])?;
    let raw = unknown
        .iter()
        .find(|(n, _)| *n == 2)
        .map(|f| f.1)
        .unwrap_or_default();
    let mut obj = json!({"apiVersion": tm["apiVersion"], "kind": tm["kind"], "metadata": {}});
    match tm["kind"].as_str()? {
        "SelfSubjectAccessReview" => {
            let spec = fields(raw)?
                .into_iter()
                .find(|(n, _)| *n == 2)
                .map(|f| f.1)
                .unwrap_or_default();
            let mut s = Map::new();
            for (n, v) in fields(spec)? {
                match n {
                    1 => {
                        s.insert(
                            "resourceAttributes".into(),
                            strings(
                                v,
                                &[
                                    (1, "namespace"),
                                    (2, "verb"),
                                    (3, "group"),
                                    (4, "version"),
                                    (5, "resource"),
                                    (6, "subresource"),
                                    (7, "name"),
                                ],
                            )?,
                        );
                    }
                    2 => {
                        s.insert(
                            "nonResourceAttributes".into(),
                            strings(v, &[(1, "path"), (2, "verb")])?,
                        );
                    }
                    _ => {}
                }
            }
            obj["spec"] = Value::Object(s);
        }
        "SelfSubjectReview" => {}
        "TokenRequest" => {
            let mut spec = Map::new();
            for (n, v) in all_fields(sub(raw, 2)?)? {
                match (n, v) {
                    (1, Wire::Bytes(a)) => {
                        let auds = spec.entry("audiences").or_insert_with(|| json!([]));
                        if let Some(list) = auds.as_array_mut() {
                            list.push(json!(String::from_utf8_lossy(a)));
                        }
                    }
                    (3, Wire::Bytes(r)) => {
                        spec.insert(
                            "boundObjectRef".into(),
                            strings(
                                r,
                                &[(1, "kind"), (2, "apiVersion"), (3, "name"), (4, "uid")],
                            )?,
                        );
                    }
                    // int64: two's complement in a varint.
                    (4, Wire::Varint(x)) => {
                        spec.insert("expirationSeconds".into(), json!(x as i64));
                    }
                    _ => {}
                }
            }
            obj["spec"] = Value::Object(spec);
        }
        "ServiceAccount" | "Namespace" => {}
        "Job" => obj["spec"] = job_spec(sub(raw, 2).unwrap_or_default())?,
        "ConfigMap" | "Secret" => {
            let binary = tm["kind"] == "Secret";
            for (n, v) in fields(raw)? {
                let field = match (n, binary) {
                    (2, _) => "data",
                    (4, true) => "stringData",
                    (3, true) => {
                        obj["type"] = json!(String::from_utf8_lossy(v));
                        continue;
                    }
                    (3, false) => "binaryData",
                    _ => continue,
                };
                let (k, val) = map_entry(v)?;
                // Secret data and ConfigMap binaryData are bytes: JSON carries base64.
                obj[field][k] = if (binary && field == "data") || field == "binaryData" {
                    use base64::Engine;
                    json!(base64::engine::general_purpose::STANDARD.encode(val))
                } else {
                    json!(String::from_utf8_lossy(val))
                };
            }
        }
        "RoleBinding" | "ClusterRoleBinding" => {
            let mut subjects = Vec::new();
            for (n, v) in fields(raw)? {
                match n {
                    2 => subjects.push(strings(
                        v,
                        &[(1, "kind"), (2, "apiGroup"), (3, "name"), (4, "namespace")],
                    )?),
                    3 => obj["roleRef"] = strings(v, &[(1, "apiGroup"), (2, "kind"), (3, "name")])?,
                    _ => {}
                }
            }
            obj["subjects"] = json!(subjects);
        }
        _ => return None,
    }
    if let Some(meta) = sub(raw, 1) {
        obj["metadata"] = object_meta(meta)?;
    }
    Some(obj)
}

/// The first length-delimited field `n` of a message.
fn sub(b: &[u8], n: u64) -> Option<&[u8]> {
    Some(fields(b)?.into_iter().find(|(k, _)| *k == n)?.1)
}

/// A `map<string, V>` entry: key (1) and value (2).
fn map_entry(b: &[u8]) -> Option<(String, &[u8])> {
    let f = fields(b)?;
    let get = |n| {
        f.iter()
            .find(|(k, _)| *k == n)
            .map(|x| x.1)
            .unwrap_or_default()
    };
    Some((String::from_utf8_lossy(get(1)).into_owned(), get(2)))
}

/// The parts of ObjectMeta a client sets on create: name, generateName,
/// namespace, labels, annotations, finalizers.
fn object_meta(b: &[u8]) -> Option<Value> {
    let mut m = strings(b, &[(1, "name"), (2, "generateName"), (3, "namespace")])?;
    for (n, v) in fields(b)? {
        let field = match n {
            11 => "labels",
            12 => "annotations",
            14 => {
                let f = m
                    .as_object_mut()?
                    .entry("finalizers")
                    .or_insert_with(|| json!([]));
                if let Some(list) = f.as_array_mut() {
                    list.push(json!(String::from_utf8_lossy(v)));
                }
                continue;
            }
            _ => continue,
        };
        let (k, val) = map_entry(v)?;
        m[field][k] = json!(String::from_utf8_lossy(val));
    }
    Some(m)
}

// `kubectl create job` (a batch/v1 Job with one container). Go's generated
// marshalling writes every non-pointer field, so unknown fields holding the zero
// value are skipped and empty strings dropped; an unknown field with a value makes
// the whole body undecodable (415) rather than silently lost.

fn zero(v: Wire<'_>) -> bool {
    matches!(v, Wire::Varint(0) | Wire::Bytes([]))
}

fn without_empty_strings(mut m: Map<String, Value>) -> Value {
    m.retain(|_, v| v != "");
    Value::Object(m)
}

fn int(v: Wire<'_>) -> Option<Value> {
    match v {
        // int32/int64: two's complement in a varint.
        Wire::Varint(x) => Some(json!(x as i64)),
        Wire::Bytes(_) => None,
    }
}

fn boolean(v: Wire<'_>) -> Option<Value> {
    match v {
        Wire::Varint(x) => Some(json!(x != 0)),
        Wire::Bytes(_) => None,
    }
}

fn text(v: Wire<'_>) -> Option<Value> {
    match v {
        Wire::Bytes(b) => Some(json!(String::from_utf8_lossy(b))),
        Wire::Varint(_) => None,
    }
}

fn push(m: &mut Map<String, Value>, k: &str, v: Value) {
    if let Some(list) = m.entry(k).or_insert_with(|| json!([])).as_array_mut() {
        list.push(v);
    }
}

fn job_spec(b: &[u8]) -> Option<Value> {
    let mut m = Map::new();
    for (n, v) in all_fields(b)? {
        let (k, val) = match n {
            1 => ("parallelism", int(v)?),
            2 => ("completions", int(v)?),
            3 => ("activeDeadlineSeconds", int(v)?),
            5 => ("manualSelector", boolean(v)?),
            6 => {
                let Wire::Bytes(t) = v else { return None };
                let mut tmpl = json!({"metadata": {}, "spec": {}});
                if let Some(meta) = sub(t, 1) {
                    tmpl["metadata"] = object_meta(meta)?;
                }
                tmpl["spec"] = pod_spec(sub(t, 2).unwrap_or_default())?;
                ("template", tmpl)
            }
            7 => ("backoffLimit", int(v)?),
            8 => ("ttlSecondsAfterFinished", int(v)?),
            9 => ("completionMode", text(v)?),
            10 => ("suspend", boolean(v)?),
            _ if zero(v) => continue,
            _ => return None,
        };
        m.insert(k.into(), val);
    }
    Some(Value::Object(m))
}

fn pod_spec(b: &[u8]) -> Option<Value> {
    let mut m = Map::new();
    for (n, v) in all_fields(b)? {
        let (k, val) = match (n, v) {
            (2, Wire::Bytes(c)) => {
                push(&mut m, "containers", container(c)?);
                continue;
            }
            (20, Wire::Bytes(c)) => {
                push(&mut m, "initContainers", container(c)?);
                continue;
            }
            (3, _) => ("restartPolicy", text(v)?),
            (4, _) => ("terminationGracePeriodSeconds", int(v)?),
            (5, _) => ("activeDeadlineSeconds", int(v)?),
            (6, _) => ("dnsPolicy", text(v)?),
            (8, _) => ("serviceAccountName", text(v)?),
            (9, _) => ("serviceAccount", text(v)?),
            (10, _) => ("nodeName", text(v)?),
            (11, _) => ("hostNetwork", boolean(v)?),
            (19, _) => ("schedulerName", text(v)?),
            _ if zero(v) => continue,
            _ => return None,
        };
        m.insert(k.into(), val);
    }
    Some(without_empty_strings(m))
}

fn container(b: &[u8]) -> Option<Value> {
    let mut m = Map::new();
    for (n, v) in all_fields(b)? {
        match (n, v) {
            (1, _) => m.insert("name".into(), text(v)?),
            (2, _) => m.insert("image".into(), text(v)?),
            (3, _) => {
                push(&mut m, "command", text(v)?);
                None
            }
            (4, _) => {
                push(&mut m, "args", text(v)?);
                None
            }
            (5, _) => m.insert("workingDir".into(), text(v)?),
            (7, Wire::Bytes(e)) => {
                let env = strings(e, &[(1, "name"), (2, "value")])?;
                if fields(e)?.iter().any(|(k, _)| *k > 2) {
                    return None;
                }
                push(&mut m, "env", env);
                None
            }
            // `resources: {}` (the generator's), nothing else.
            (8, Wire::Bytes([])) => m.insert("resources".into(), json!({})),
            (13, _) => m.insert("terminationMessagePath".into(), text(v)?),
            (14, _) => m.insert("imagePullPolicy".into(), text(v)?),
            (20, _) => m.insert("terminationMessagePolicy".into(), text(v)?),
            _ if zero(v) => None,
            _ => return None,
        };
    }
    Some(without_empty_strings(m))
}
