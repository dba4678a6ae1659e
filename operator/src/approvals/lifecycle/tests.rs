use super::*;
use pgwarden_api::{ApprovalRequestSpec, Decision, Requester};

const DAY: Duration = Duration::from_secs(86_400);

fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn request(phase: ApprovalPhase) -> ApprovalRequest {
    let mut r = ApprovalRequest::new(
        "p-1",
        ApprovalRequestSpec {
            policy: "p".into(),
            requester: Requester {
                subject: "agent".into(),
                ..Requester::default()
            },
            database: "shop".into(),
            statement: "ALTER TABLE t ADD c int".into(),
            parameters: vec![],
            fingerprint: "hmac-sha256:00".into(),
            reason: "rule ddl".into(),
            expires_at: "2026-12-03T11:00:00Z".into(),
            approvers: None,
            estimate: None,
            decision: None,
        },
    );
    r.status = Some(pgwarden_api::ApprovalRequestStatus {
        phase,
        ..Default::default()
    });
    r
}

fn decide(r: &mut ApprovalRequest, action: DecisionAction) {
    r.spec.decision = Some(Decision {
        action,
        reason: Some("looks fine".into()),
        decided_by: Some("alice".into()),
        decided_at: Some("2026-12-03T10:05:00Z".into()),
    });
}

#[test]
fn a_pending_request_sleeps_until_its_expiry_then_expires() {
    let r = request(ApprovalPhase::Pending);
    let p = plan(&r, at("2026-12-03T10:00:00Z"), DAY);
    assert_eq!(p.phase, None);
    assert_eq!(p.wake_at, Some(at("2026-12-03T11:00:00Z")));
    let p = plan(&r, at("2026-12-03T11:00:00Z"), DAY);
    let t = p.phase.unwrap();
    assert_eq!(t.phase, ApprovalPhase::Expired);
    assert_eq!(t.note, "not decided before 2026-12-03T11:00:00Z");
}

#[test]
fn a_decision_becomes_the_phase_with_who_and_why() {
    let mut r = request(ApprovalPhase::Pending);
    decide(&mut r, DecisionAction::Approve);
    let t = plan(&r, at("2026-12-03T10:06:00Z"), DAY).phase.unwrap();
    assert_eq!((t.phase, t.reason), (ApprovalPhase::Approved, "Approved"));
    assert_eq!(t.note, "approved by alice: looks fine");
    let mut r = request(ApprovalPhase::Pending);
    decide(&mut r, DecisionAction::Deny);
    // A denial stands even past expiry.
    let t = plan(&r, at("2026-12-03T12:00:00Z"), DAY).phase.unwrap();
    assert_eq!(t.phase, ApprovalPhase::Denied);
    assert_eq!(t.note, "denied by alice: looks fine");
}

#[test]
fn an_unused_approval_expires() {
    let mut r = request(ApprovalPhase::Approved);
    decide(&mut r, DecisionAction::Approve);
    assert_eq!(
        plan(&r, at("2026-12-03T10:30:00Z"), DAY).wake_at,
        Some(at("2026-12-03T11:00:00Z"))
    );
    let t = plan(&r, at("2026-12-03T11:00:01Z"), DAY).phase.unwrap();
    assert_eq!(t.phase, ApprovalPhase::Expired);
    assert!(t.note.contains("approval was not used"), "{}", t.note);
}

#[test]
fn a_finished_request_is_deleted_after_the_retention_counted_from_its_end() {
    let mut r = request(ApprovalPhase::Pending);
    decide(&mut r, DecisionAction::Approve);
    set_phase(&mut r, ApprovalPhase::Executed, at("2026-12-03T10:10:00Z"));
    assert_eq!(finished_at(&r), Some(at("2026-12-03T10:10:00Z")));
    let p = plan(&r, at("2026-12-05T00:00:00Z"), DAY * 7);
    assert_eq!((p.phase, p.delete), (None, false));
    assert_eq!(p.wake_at, Some(at("2026-12-10T10:10:00Z")));
    let p = plan(&r, at("2026-12-10T10:10:00Z"), DAY * 7);
    assert!(p.delete);
    // The condition is set once: a later write keeps the first end.
    set_phase(&mut r, ApprovalPhase::Executed, at("2026-12-04T00:00:00Z"));
    assert_eq!(r.status.as_ref().unwrap().conditions.len(), 1);
    assert_eq!(finished_at(&r), Some(at("2026-12-03T10:10:00Z")));
    // Without the condition (written by an older operator): from expiry.
    let r = request(ApprovalPhase::Expired);
    assert_eq!(
        plan(&r, at("2026-12-03T12:00:00Z"), DAY).wake_at,
        Some(at("2026-12-04T11:00:00Z"))
    );
}

#[test]
fn an_unreadable_expiry_is_already_past() {
    let mut r = request(ApprovalPhase::Pending);
    r.spec.expires_at = "tomorrow".into();
    assert_eq!(
        effective_phase(&r, at("2026-12-03T10:00:00Z")),
        ApprovalPhase::Expired
    );
}
