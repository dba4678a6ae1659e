//! Just enough Kubernetes protobuf to read the request bodies kubectl's typed
//! clients send that way (today: SelfSubjectAccessReview from `kubectl auth can-i`,
//! SelfSubjectReview from `kubectl auth whoami`). Responses are JSON, which those
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
    let (mut i, mut out) = (0, Vec::new());
    while i < b.len() {
        let tag = varint(b, &mut i)?;
        match tag & 7 {
            0 => {
                varint(b, &mut i)?;
            }
            1 => i += 8,
            5 => i += 4,
            2 => {
                let len = usize::try_from(varint(b, &mut i)?).ok()?;
                let end = i.checked_add(len).filter(|e| *e <= b.len())?;
                out.push((tag >> 3, &b[i..end]));
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
        _ => return None,
    }
    Some(obj)
}
