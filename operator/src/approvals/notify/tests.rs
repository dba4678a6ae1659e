use super::*;

/// A request as the stream opens it; built from JSON so the test follows
/// the CRD rather than the Rust struct's field list.
fn request(phase: &str, decision: Option<Value>) -> ApprovalRequest {
    let mut spec = json!({
        "policy": "shop",
        "requester": {"subject": "system:serviceaccount:ci:runner", "pod": "ci/agent-1", "serviceAccount": "runner"},
        "database": "app",
        "statement": "UPDATE customers SET email = $1 WHERE note = '<b>&'",
        "parameters": ["****", null],
        "fingerprint": "hmac-sha256:00",
        "reason": "approval required by rule \"pii-writes\": UPDATE on public.customers",
        "expiresAt": "2999-01-01T00:00:00Z",
    });
    if let Some(d) = decision {
        spec["decision"] = d;
    }
    serde_json::from_value(json!({
        "apiVersion": "pgwarden.io/v1alpha1",
        "kind": "ApprovalRequest",
        "metadata": {"name": "shop-5f2c9a", "namespace": "ci"},
        "spec": spec,
        "status": {"phase": phase},
    }))
    .expect("a valid ApprovalRequest")
}

fn approved_by_alice() -> Option<Value> {
    Some(json!({"action": "Approve", "reason": "reviewed", "decidedBy": "alice"}))
}

#[test]
fn a_new_request_tells_who_what_why_and_the_approve_command() {
    let p = payload(&request("Pending", None), Event::Requested);
    let text = p["text"].as_str().expect("text");
    for part in [
        "Approval requested: ci/shop-5f2c9a (policy shop)",
        "system:serviceaccount:ci:runner (pod ci/agent-1)",
        "UPDATE customers SET email = $1",
        "Parameters: $1=****, $2=NULL",
        "rule \"pii-writes\"",
        "kubectl patch apr -n ci shop-5f2c9a --type merge",
    ] {
        assert!(text.contains(part), "{part:?} missing from {text}");
    }
    assert_eq!(p["event"], "Requested");
    assert_eq!(p["phase"], "Pending");
    assert_eq!(p["policy"], "shop");
    assert_eq!(p["pod"], "ci/agent-1");
    assert_eq!(p["rule"], "pii-writes");
    assert_eq!(p["parameters"], json!(["****", null]));
    assert_eq!(
        p["approveCommand"],
        approve_command("ci", "shop-5f2c9a").as_str()
    );
}

#[test]
fn a_decision_names_the_reviewer_and_drops_the_approve_command() {
    let r = request("Pending", approved_by_alice());
    let p = payload(&r, Event::Approved);
    let text = p["text"].as_str().expect("text");
    assert!(
        text.starts_with("ci/shop-5f2c9a (policy shop) was approved by alice: reviewed."),
        "{text}"
    );
    assert_eq!(p["phase"], "Approved");
    assert_eq!(p["decidedBy"], "alice");
    assert_eq!(p["approveCommand"], Value::Null);
    assert!(!text.contains("kubectl patch"), "{text}");

    let expired = payload(&request("Pending", None), Event::Expired);
    assert!(
        expired["text"]
            .as_str()
            .expect("text")
            .contains("expired at 2999-01-01T00:00:00Z"),
        "{expired}"
    );
}

#[test]
fn statement_text_cannot_inject_slack_markup() {
    let p = payload(&request("Pending", None), Event::Requested);
    let text = p["text"].as_str().expect("text");
    assert!(text.contains("note = '&lt;b&gt;&amp;'"), "{text}");
    assert!(!text.contains("<b>"), "{text}");
    // The structured field keeps the statement as it is.
    assert_eq!(
        p["statement"],
        "UPDATE customers SET email = $1 WHERE note = '<b>&'"
    );
}

#[test]
fn long_statements_are_cut_in_the_message() {
    let mut r = request("Pending", None);
    r.spec.statement = format!("SELECT '{}'", "é".repeat(5000));
    let p = payload(&r, Event::Requested);
    let shown = p["statement"].as_str().expect("statement");
    assert_eq!(shown.chars().count(), MAX_STATEMENT_CHARS + 1);
    assert!(shown.ends_with('…'));
}

#[test]
fn only_the_write_that_leaves_pending_tells_of_the_decision() {
    let pending = request("Pending", approved_by_alice());
    assert_eq!(
        decided(&pending, ApprovalPhase::Approved),
        Some(Event::Approved)
    );
    // A sidecar's claim that beat the controller's write is the approval.
    assert_eq!(
        decided(&pending, ApprovalPhase::Executed),
        Some(Event::Approved)
    );
    assert_eq!(
        decided(&pending, ApprovalPhase::Denied),
        Some(Event::Denied)
    );
    assert_eq!(
        decided(&pending, ApprovalPhase::Expired),
        Some(Event::Expired)
    );
    // Later writes were already told of.
    let approved = request("Approved", approved_by_alice());
    assert_eq!(decided(&approved, ApprovalPhase::Executed), None);
    assert_eq!(decided(&approved, ApprovalPhase::Expired), None);
    assert_eq!(
        decided(&request("Executed", None), ApprovalPhase::Failed),
        None
    );
}

#[test]
fn the_rule_is_read_from_the_reason() {
    assert_eq!(
        rule_of("approval required by rule \"schema-changes\": DDL on public.t"),
        Some("schema-changes")
    );
    assert_eq!(rule_of("approval required by defaultAction"), None);
    assert_eq!(rule_of("rule \"unterminated"), None);
}

#[tokio::test]
async fn urls_that_would_leak_the_token_are_refused_without_naming_them() {
    let tls = tls_connector().expect("TLS client");
    let secret = "T0KEN-abc";
    for url in [
        format!("http://hooks.example.com/services/{secret}"),
        format!("ftp://127.0.0.1/{secret}"),
        format!("not a url {secret}"),
    ] {
        match post(&tls, &url, Bytes::new()).await {
            Err(TryError::Permanent(why)) => assert!(!why.contains(secret), "{why}"),
            other => panic!("{url}: {other:?}"),
        }
    }
}
