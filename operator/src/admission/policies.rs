//! Validating webhook for DatabaseAccessPolicies: the same `validate()` the
//! policy's status and `pgwarden run` use, so `kubectl apply` of a policy
//! that can never serve fails at once with every field path, instead of
//! being stored and then reported `Invalid`. Sans-IO: a request in, a
//! response out.

use std::sync::Arc;

use pgwarden_api::DatabaseAccessPolicySpec;
use serde_json::Value;

use super::{allow, deny, BoxFuture, Webhook};

pub const POLICIES_VALIDATE_PATH: &str = "/policies/validate";

/// The AdmissionReview `response` for a policy write.
pub fn review_policy(request: &Value) -> Value {
    if request["operation"] == "DELETE" {
        return allow();
    }
    // The API server checked the CRD schema before calling: a spec that does
    // not deserialize is a schema this build does not know (an older
    // operator); refuse rather than admit what it cannot check.
    let spec: DatabaseAccessPolicySpec =
        match serde_json::from_value(request["object"]["spec"].clone()) {
            Ok(s) => s,
            Err(e) => {
                return deny(format!(
                    "spec does not match this operator's DatabaseAccessPolicy: {e}"
                ))
            }
        };
    let errors = spec.validate();
    if errors.is_empty() {
        return allow();
    }
    let problems: Vec<String> = errors.iter().map(ToString::to_string).collect();
    deny(format!(
        "invalid DatabaseAccessPolicy: {}",
        problems.join("; ")
    ))
}

pub struct Policies;

impl Webhook for Policies {
    fn review<'a>(&'a self, request: &'a Value) -> BoxFuture<'a, Value> {
        Box::pin(async move { review_policy(request) })
    }
}

pub fn route() -> (&'static str, Arc<dyn Webhook>) {
    (POLICIES_VALIDATE_PATH, Arc::new(Policies))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(spec: Value) -> Value {
        json!({"uid": "1", "operation": "CREATE",
            "object": {"apiVersion": "pgwarden.io/v1alpha1", "kind": "DatabaseAccessPolicy",
                "metadata": {"name": "p", "namespace": "ci"}, "spec": spec}})
    }

    fn good() -> Value {
        json!({"identity": {"pod": {}},
            "database": {"host": "db", "name": "shop", "credentialsSecret": "s"},
            "defaultAction": "Deny"})
    }

    #[test]
    fn a_valid_policy_is_admitted() {
        assert_eq!(review_policy(&request(good()))["allowed"], true);
    }

    #[test]
    fn every_problem_is_named_by_its_field_path() {
        let mut spec = good();
        spec["identity"]["kubernetes"] = json!({"audience": "pgwarden.io/sidecar"});
        spec["database"]["host"] = json!("");
        let r = review_policy(&request(spec));
        assert_eq!(r["allowed"], false);
        let msg = r["status"]["message"].as_str().unwrap();
        assert!(msg.contains("spec.identity:"), "{msg}");
        assert!(msg.contains("spec.identity.kubernetes.audience:"), "{msg}");
        assert!(msg.contains("spec.database.host:"), "{msg}");
    }

    #[test]
    fn deletes_pass_and_unknown_shapes_are_refused() {
        let mut del = request(json!({}));
        del["operation"] = json!("DELETE");
        assert_eq!(review_policy(&del)["allowed"], true);
        let r = review_policy(&request(json!({"identity": {}, "surprise": 1})));
        assert_eq!(r["allowed"], false);
    }
}
