use super::*;
use pgwarden_api::{DecisionAction, Requester};
use serde_json::json;

const OPERATOR: &str = "system:serviceaccount:pgwarden-system:pgwarden-operator";

fn now() -> Timestamp {
    "2026-12-03T10:00:00Z".parse().unwrap()
}

fn request() -> ApprovalRequest {
    let mut r = ApprovalRequest::new(
        "nightly-5f2c9a",
        ApprovalRequestSpec {
            policy: "nightly".into(),
            requester: Requester {
                subject: "repo:acme/shop".into(),
                pod: Some("ci/runner-1".into()),
                service_account: Some("ci-runner".into()),
                os_user: None,
            },
            database: "shop".into(),
            statement: "ALTER TABLE orders ADD COLUMN note text".into(),
            parameters: vec![Some("1".into())],
            fingerprint: "hmac-sha256:00".into(),
            reason: "rule schema-changes: DDL".into(),
            expires_at: "2026-12-03T11:00:00Z".into(),
            approvers: None,
            estimate: None,
            decision: None,
        },
    );
    r.metadata.namespace = Some("ci".into());
    r.status = Some(Default::default());
    r
}

fn user(name: &str, groups: &[&str]) -> UserInfo {
    UserInfo {
        username: Some(name.into()),
        groups: Some(groups.iter().map(|g| g.to_string()).collect()),
        ..UserInfo::default()
    }
}

fn review(
    op: &str,
    who: UserInfo,
    old: Option<&ApprovalRequest>,
    new: &ApprovalRequest,
) -> AdmissionRequest {
    AdmissionRequest {
        uid: "u-1".into(),
        operation: op.into(),
        sub_resource: None,
        user_info: who,
        object: Some(serde_json::to_value(new).unwrap()),
        old_object: old.map(|o| serde_json::to_value(o).unwrap()),
    }
}

fn decided(by: Option<&str>, action: DecisionAction) -> ApprovalRequest {
    let mut r = request();
    r.spec.decision = Some(Decision {
        action,
        reason: Some("reviewed".into()),
        decided_by: by.map(str::to_owned),
        decided_at: by.map(|_| "2026-12-03T10:00:00Z".to_owned()),
    });
    r
}

fn oncall() -> Approvers {
    Approvers {
        users: vec!["carol".into()],
        groups: vec!["dba-oncall".into()],
    }
}

fn check(r: &AdmissionRequest, approvers: PolicyApprovers) -> Verdict {
    let lookup = move |ns: &str, p: &str| {
        assert_eq!((ns, p), ("ci", "nightly"));
        approvers.clone()
    };
    validate(
        r,
        &Checks {
            operator: OPERATOR,
            approvers: &lookup,
            now: now(),
        },
    )
}

fn denied(v: &Verdict, words: &str) {
    assert!(!v.allowed, "allowed, expected a refusal naming {words:?}");
    let m = v.message.as_deref().unwrap_or("");
    assert!(m.contains(words), "{m:?} does not say {words:?}");
}

/// The full path through both webhooks: mutate, apply the patch, validate.
fn admit(who: UserInfo, new: &ApprovalRequest, approvers: PolicyApprovers) -> (Verdict, Value) {
    let old = request();
    let r = review("UPDATE", who, Some(&old), new);
    let m = mutate(&r, now());
    assert!(m.allowed);
    let mut obj = r.object.clone().unwrap();
    let patch: json_patch_ops::Ops = m.patch.clone();
    json_patch_ops::apply(&mut obj, &patch);
    let r = AdmissionRequest {
        object: Some(obj.clone()),
        ..r
    };
    (check(&r, approvers), obj)
}

/// Enough of RFC 6902 `add` for the mutation's patch (object members only).
mod json_patch_ops {
    use serde_json::Value;
    pub type Ops = Vec<Value>;
    pub fn apply(doc: &mut Value, ops: &Ops) {
        for op in ops {
            assert_eq!(op["op"], "add");
            let path = op["path"].as_str().unwrap();
            let (parent, key) = path.rsplit_once('/').unwrap();
            doc.pointer_mut(parent).unwrap()[key] = op["value"].clone();
        }
    }
}

#[test]
fn an_approver_decides_and_the_webhook_stamps_who_and_when() {
    let new = decided(None, DecisionAction::Approve);
    let (v, obj) = admit(
        user("alice", &["dba-oncall"]),
        &new,
        PolicyApprovers::Found(oncall()),
    );
    assert_eq!(v, Verdict::allow());
    assert_eq!(obj["spec"]["decision"]["decidedBy"], "alice");
    assert_eq!(obj["spec"]["decision"]["decidedAt"], "2026-12-03T10:00:00Z");
    // By name, too.
    let (v, _) = admit(user("carol", &[]), &new, PolicyApprovers::Found(oncall()));
    assert!(v.allowed, "{v:?}");
}

#[test]
fn a_forged_decided_by_is_overwritten() {
    let new = decided(Some("carol"), DecisionAction::Approve);
    let (v, obj) = admit(
        user("alice", &["dba-oncall"]),
        &new,
        PolicyApprovers::Found(oncall()),
    );
    assert!(v.allowed, "{v:?}");
    assert_eq!(obj["spec"]["decision"]["decidedBy"], "alice");
    // Without the mutation (webhook missing), the forged name is refused.
    let r = review(
        "UPDATE",
        user("alice", &["dba-oncall"]),
        Some(&request()),
        &new,
    );
    denied(&check(&r, PolicyApprovers::Found(oncall())), "not stamped");
}

#[test]
fn a_reviewer_outside_the_approvers_is_refused_by_name() {
    let new = decided(None, DecisionAction::Approve);
    let (v, _) = admit(
        user("bob", &["developers"]),
        &new,
        PolicyApprovers::Found(oncall()),
    );
    denied(&v, "bob may not decide ApprovalRequest ci/nightly-5f2c9a");
    denied(&v, "user carol, group dba-oncall");
    // Denying is a decision too.
    let (v, _) = admit(
        user("bob", &[]),
        &decided(None, DecisionAction::Deny),
        PolicyApprovers::Found(oncall()),
    );
    denied(&v, "may not decide");
    // The policy is gone: nobody.
    let (v, _) = admit(
        user("alice", &["dba-oncall"]),
        &new,
        PolicyApprovers::Missing,
    );
    denied(&v, "policy ci/nightly no longer exists");
    // No approvers named: RBAC decides, the requester still may not.
    let (v, _) = admit(
        user("bob", &[]),
        &new,
        PolicyApprovers::Found(Approvers::default()),
    );
    assert!(v.allowed, "{v:?}");
}

#[test]
fn the_requester_and_the_pods_service_account_never_decide() {
    let new = decided(None, DecisionAction::Approve);
    // Even when listed as approvers.
    let listed = Approvers {
        users: vec![
            "repo:acme/shop".into(),
            "system:serviceaccount:ci:ci-runner".into(),
        ],
        groups: vec!["system:serviceaccounts".into()],
    };
    for who in ["repo:acme/shop", "system:serviceaccount:ci:ci-runner"] {
        let (v, _) = admit(
            user(who, &["system:serviceaccounts"]),
            &new,
            PolicyApprovers::Found(listed.clone()),
        );
        denied(&v, "cannot decide it");
    }
    // Another service account of the namespace is not the requester.
    let (v, _) = admit(
        user(
            "system:serviceaccount:ci:other",
            &["system:serviceaccounts"],
        ),
        &new,
        PolicyApprovers::Found(listed),
    );
    assert!(v.allowed, "{v:?}");
}

#[test]
fn a_decision_is_final() {
    let old = decided(Some("alice"), DecisionAction::Approve);
    let mut new = old.clone();
    new.spec.decision.as_mut().unwrap().action = DecisionAction::Deny;
    let r = review("UPDATE", user("carol", &[]), Some(&old), &new);
    denied(
        &check(&r, PolicyApprovers::Found(oncall())),
        "already decided (Approve by alice at 2026-12-03T10:00:00Z)",
    );
    // The mutating webhook leaves a second decision alone (nothing to stamp).
    assert!(mutate(&r, now()).patch.is_empty());
    let mut withdrawn = old.clone();
    withdrawn.spec.decision = None;
    let r = review("UPDATE", user("carol", &[]), Some(&old), &withdrawn);
    denied(
        &check(&r, PolicyApprovers::Found(oncall())),
        "cannot be changed or withdrawn",
    );
    // A label on a decided request is fine.
    let mut labelled = old.clone();
    labelled.metadata.labels = Some([("team".to_owned(), "db".to_owned())].into());
    let r = review("UPDATE", user("carol", &[]), Some(&old), &labelled);
    assert!(check(&r, PolicyApprovers::Found(oncall())).allowed);
}

#[test]
fn what_was_requested_cannot_be_edited() {
    let old = request();
    type Edit = Box<dyn Fn(&mut ApprovalRequestSpec)>;
    let edits: Vec<(&str, Edit)> = vec![
        (
            "statement",
            Box::new(|s| s.statement = "DROP TABLE orders".into()),
        ),
        (
            "parameters",
            Box::new(|s| s.parameters = vec![Some("2".into())]),
        ),
        (
            "requester",
            Box::new(|s| s.requester.subject = "someone".into()),
        ),
        (
            "fingerprint",
            Box::new(|s| s.fingerprint = "hmac-sha256:11".into()),
        ),
        (
            "expiresAt",
            Box::new(|s| s.expires_at = "2030-01-01T00:00:00Z".into()),
        ),
        ("policy", Box::new(|s| s.policy = "other".into())),
        // A smaller estimate must not be slipped in front of the reviewer.
        (
            "estimate",
            Box::new(|s| s.estimate = Some(pgwarden_api::Estimate::unknown("edited"))),
        ),
    ];
    for (field, edit) in edits {
        let mut new = old.clone();
        edit(&mut new.spec);
        // Even together with a valid decision by an approver.
        new.spec.decision = Some(Decision {
            action: DecisionAction::Approve,
            reason: None,
            decided_by: Some("alice".into()),
            decided_at: Some("2026-12-03T10:00:00Z".into()),
        });
        let r = review("UPDATE", user("alice", &["dba-oncall"]), Some(&old), &new);
        denied(
            &check(&r, PolicyApprovers::Found(oncall())),
            &format!("spec.{field} of ApprovalRequest ci/nightly-5f2c9a cannot be changed"),
        );
    }
}

#[test]
fn only_the_operator_creates_requests_and_writes_status() {
    let r = review(
        "CREATE",
        user("admin", &["system:masters"]),
        None,
        &request(),
    );
    denied(
        &check(&r, PolicyApprovers::Found(oncall())),
        "admin may not create ApprovalRequests",
    );
    let r = review("CREATE", user(OPERATOR, &[]), None, &request());
    assert!(check(&r, PolicyApprovers::Found(oncall())).allowed);
    let r = review(
        "CREATE",
        user(OPERATOR, &[]),
        None,
        &decided(Some("x"), DecisionAction::Approve),
    );
    denied(
        &check(&r, PolicyApprovers::Found(oncall())),
        "cannot carry a decision",
    );

    let mut status = review(
        "UPDATE",
        user("alice", &["dba-oncall"]),
        Some(&request()),
        &request(),
    );
    status.sub_resource = Some("status".into());
    denied(
        &check(&status, PolicyApprovers::Found(oncall())),
        "may not write the status",
    );
    status.user_info = user(OPERATOR, &[]);
    assert!(check(&status, PolicyApprovers::Found(oncall())).allowed);
}

#[test]
fn an_expired_or_finished_request_cannot_be_decided() {
    let mut old = request();
    old.spec.expires_at = "2026-12-03T09:59:59Z".into();
    let mut new = old.clone();
    new.spec.decision = decided(Some("alice"), DecisionAction::Approve)
        .spec
        .decision;
    let r = review("UPDATE", user("alice", &["dba-oncall"]), Some(&old), &new);
    denied(
        &check(&r, PolicyApprovers::Found(oncall())),
        "expired at 2026-12-03T09:59:59Z",
    );
    let mut old = request();
    old.status.as_mut().unwrap().phase = ApprovalPhase::Expired;
    let mut new = old.clone();
    new.spec.decision = decided(Some("alice"), DecisionAction::Approve)
        .spec
        .decision;
    let r = review("UPDATE", user("alice", &["dba-oncall"]), Some(&old), &new);
    denied(
        &check(&r, PolicyApprovers::Found(oncall())),
        "can no longer be decided",
    );
}

#[test]
fn unreadable_objects_are_refused_and_responses_are_admission_reviews() {
    let mut r = review("UPDATE", user("alice", &[]), Some(&request()), &request());
    r.object = Some(json!({"spec": {"statement": 5}}));
    denied(
        &check(&r, PolicyApprovers::Found(oncall())),
        "not a valid ApprovalRequest",
    );

    let v = Verdict::deny("no".into());
    let out = to_review(&r, &v);
    assert_eq!(out["response"]["uid"], "u-1");
    assert_eq!(out["response"]["allowed"], false);
    assert_eq!(out["response"]["status"]["message"], "no");
    let new = decided(None, DecisionAction::Approve);
    let r = review("UPDATE", user("alice", &[]), Some(&request()), &new);
    let out = to_review(&r, &mutate(&r, now()));
    assert_eq!(out["response"]["patchType"], "JSONPatch");
    assert!(out["response"]["patch"]
        .as_str()
        .is_some_and(|p| !p.is_empty()));
}
