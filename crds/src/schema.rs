//! Schema adjustments kube's own rewriter does not make.

use schemars::{transform::transform_subschemas, Schema};
use serde_json::Value;

/// Rewrites schemars' unsigned integer formats (`uint16`, `uint32`, `uint64`),
/// which the apiserver warns about ("unrecognized format"), to the `int32`/`int64`
/// that Kubernetes knows, keeping the range as `minimum`/`maximum` so values the
/// Rust type cannot hold are still rejected at admission. Applied recursively, so
/// one attribute on a spec covers every type inlined into it.
pub(crate) fn kube_int_formats(schema: &mut Schema) {
    transform_subschemas(&mut kube_int_formats, schema);
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    let (format, max) = match obj.get("format").and_then(Value::as_str) {
        Some("uint16") => ("int32", Some(u64::from(u16::MAX))),
        Some("uint32") => ("int64", Some(u64::from(u32::MAX))),
        // A Kubernetes integer is at most int64 anyway.
        Some("uint64" | "uint") => ("int64", None),
        _ => return,
    };
    obj.insert("format".into(), format.into());
    obj.entry("minimum").or_insert(0.into());
    if let Some(max) = max {
        obj.entry("maximum").or_insert(max.into());
    }
}
