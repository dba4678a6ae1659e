use super::*;

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn draft(statement: &str, fingerprint: &str) -> Draft {
    Draft {
        database: "shop".into(),
        requester: Requester {
            subject: "repo:acme/shop:ref:refs/heads/main".into(),
            pod: Some("ci/agent-1".into()),
            service_account: Some("ci-runner".into()),
            os_user: Some("agent".into()),
        },
        statement: statement.into(),
        parameters: vec![],
        fingerprint: fingerprint.into(),
        reason: "approval required by rule \"schema-changes\": DDL".into(),
        approvers: None,
        estimate: None,
    }
}

fn pending(id: &str, created: &str, fp: &str) -> ApprovalRequest {
    new_request(
        draft("DROP TABLE t", fp),
        "nightly",
        "ci",
        id,
        ts(created),
        std::time::Duration::from_secs(3600),
    )
}

const T0: &str = "2026-12-01T10:00:00Z";

#[test]
fn a_new_request_is_pending_and_expires_after_the_policy_interval() {
    let r = pending("nightly-000001", T0, "fp");
    assert_eq!(stored_phase(&r), ApprovalPhase::Pending);
    assert_eq!(r.spec.expires_at, "2026-12-01T11:00:00Z");
    assert_eq!(
        phase(&r, ts("2026-12-01T10:59:59Z")),
        ApprovalPhase::Pending
    );
    assert_eq!(
        phase(&r, ts("2026-12-01T11:00:00Z")),
        ApprovalPhase::Expired
    );
    assert_eq!(r.metadata.namespace.as_deref(), Some("ci"));
}

#[test]
fn approve_then_claim_once() {
    let mut r = pending("nightly-000001", T0, "fp");
    let now = ts("2026-12-01T10:05:00Z");
    decide(
        &mut r,
        DecisionAction::Approve,
        "alice",
        Some("ok".into()),
        now,
    )
    .unwrap();
    assert_eq!(stored_phase(&r), ApprovalPhase::Approved);
    let d = r.spec.decision.as_ref().unwrap();
    assert_eq!(d.decided_by.as_deref(), Some("alice"));
    assert_eq!(d.decided_at.as_deref(), Some("2026-12-01T10:05:00Z"));
    assert_eq!(claim(&mut r, now), Ok(()));
    assert_eq!(claim(&mut r, now), Err(ApprovalPhase::Executed));
    finish(&mut r, &Outcome::Done("DROP TABLE".into()));
    assert_eq!(stored_phase(&r), ApprovalPhase::Executed);
    assert_eq!(
        r.status.as_ref().unwrap().result.as_deref(),
        Some("DROP TABLE")
    );
}

#[test]
fn a_decision_cannot_be_changed_and_an_expired_request_cannot_be_decided() {
    let mut r = pending("nightly-000001", T0, "fp");
    let now = ts("2026-12-01T10:05:00Z");
    decide(&mut r, DecisionAction::Deny, "alice", None, now).unwrap();
    let again = decide(&mut r, DecisionAction::Approve, "bob", None, now).unwrap_err();
    assert!(matches!(
        again,
        DecideError::AlreadyDecided {
            phase: ApprovalPhase::Denied,
            ..
        }
    ));
    assert!(again.to_string().contains("alice"), "{again}");

    let mut late = pending("nightly-000002", T0, "fp");
    let e = decide(
        &mut late,
        DecisionAction::Approve,
        "alice",
        None,
        ts("2026-12-01T11:00:01Z"),
    )
    .unwrap_err();
    assert!(e.to_string().contains("expired"), "{e}");
    assert_eq!(stored_phase(&late), ApprovalPhase::Expired);
    assert!(late.spec.decision.is_none());
}

#[test]
fn an_unused_approval_expires_too() {
    let mut r = pending("nightly-000001", T0, "fp");
    decide(&mut r, DecisionAction::Approve, "alice", None, ts(T0)).unwrap();
    assert_eq!(
        claim(&mut r, ts("2026-12-01T11:00:00Z")),
        Err(ApprovalPhase::Expired)
    );
    assert_eq!(stored_phase(&r), ApprovalPhase::Expired);
}

#[test]
fn requesters_cannot_approve_themselves() {
    let mut r = pending("nightly-000001", T0, "fp");
    for who in ["repo:acme/shop:ref:refs/heads/main", "ci-runner"] {
        let e = decide(&mut r, DecisionAction::Approve, who, None, ts(T0)).unwrap_err();
        assert!(matches!(e, DecideError::SelfApproval { .. }), "{e}");
    }
    assert_eq!(stored_phase(&r), ApprovalPhase::Pending);
}

#[test]
fn the_requesting_os_user_cannot_decide_either_way() {
    let mut r = pending("nightly-000001", T0, "fp");
    for action in [DecisionAction::Approve, DecisionAction::Deny] {
        let e = decide(&mut r, action, "agent", None, ts(T0)).unwrap_err();
        assert!(
            e.to_string().contains("you cannot decide your own request"),
            "{e}"
        );
    }
    assert_eq!(stored_phase(&r), ApprovalPhase::Pending);
}

#[test]
fn only_listed_approvers_decide_and_root_is_not_special() {
    let with = |approvers: Approvers| {
        let mut r = pending("nightly-000001", T0, "fp");
        r.spec.approvers = Some(approvers);
        r
    };
    let users = Approvers {
        users: vec!["alice".into()],
        groups: vec![],
    };
    for who in ["root", "bob"] {
        let mut r = with(users.clone());
        let e = decide(&mut r, DecisionAction::Approve, who, None, ts(T0)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{who} may not decide nightly-000001: the policy's approval.approvers allows user alice")
        );
        assert_eq!(stored_phase(&r), ApprovalPhase::Pending);
    }
    let mut r = with(users);
    decide(&mut r, DecisionAction::Approve, "alice", None, ts(T0)).unwrap();

    // A group member decides; the group name alone is no user.
    let dba = Approvers {
        users: vec![],
        groups: vec!["dba".into()],
    };
    let groups = ["staff".to_owned(), "dba".to_owned()];
    let mut r = with(dba.clone());
    let member = Decider {
        name: "carol",
        groups: &groups,
    };
    decide(&mut r, DecisionAction::Deny, member, None, ts(T0)).unwrap();
    let mut r = with(dba);
    assert!(decide(&mut r, DecisionAction::Approve, "dba", None, ts(T0)).is_err());

    // Listed, but the requester: still refused.
    let mut r = with(Approvers {
        users: vec!["agent".into()],
        groups: vec![],
    });
    let e = decide(&mut r, DecisionAction::Approve, "agent", None, ts(T0)).unwrap_err();
    assert!(matches!(e, DecideError::SelfApproval { .. }), "{e}");
}

#[test]
fn the_newest_request_with_the_fingerprint_decides_where_a_retry_stands() {
    let now = ts("2026-12-01T10:30:00Z");
    assert!(matches!(standing(&[], now), Standing::None));
    let old = {
        let mut r = pending("nightly-000001", T0, "fp");
        decide(&mut r, DecisionAction::Approve, "alice", None, ts(T0)).unwrap();
        claim(&mut r, ts(T0)).unwrap();
        r
    };
    // Used: a retry needs a new request.
    assert!(matches!(
        standing(std::slice::from_ref(&old), now),
        Standing::None
    ));
    let newer = pending("nightly-000002", "2026-12-01T10:10:00Z", "fp");
    assert!(matches!(
        standing(&[newer.clone(), old.clone()], now),
        Standing::Pending(r) if id(&r) == "nightly-000002"
    ));
    let mut denied = newer.clone();
    decide(&mut denied, DecisionAction::Deny, "alice", None, now).unwrap();
    assert!(matches!(
        standing(&[old.clone(), denied.clone()], now),
        Standing::Denied(_)
    ));
    // A denial lasts until the request would have expired.
    assert!(matches!(
        standing(&[old, denied], ts("2026-12-01T11:10:00Z")),
        Standing::None
    ));
}

#[test]
fn the_fingerprint_binds_statement_parameters_subject_and_policy() {
    let key = [7u8; 32];
    let p = |v: &'static [u8]| Param {
        format: 0,
        type_oid: 23,
        value: Some(v),
    };
    let sql = "DELETE FROM t WHERE id = $1";
    // (key, policy, database, subject, statement, parameters)
    let fp = |k: &[u8], pol: &str, db: &str, sub: &str, text: &str, params: &[Param<'_>]| {
        fingerprint(k, pol, db, sub, text, params)
    };
    let base = fp(&key, "ci/p", "shop", "alice", sql, &[p(b"1")]);
    assert!(base.starts_with("hmac-sha256:"), "{base}");
    assert_eq!(base, fp(&key, "ci/p", "shop", "alice", sql, &[p(b"1")]));
    let null = Param {
        format: 0,
        type_oid: 23,
        value: None,
    };
    let binary = Param {
        format: 1,
        type_oid: 23,
        value: Some(b"1"),
    };
    let variants = [
        fp(&key, "ci/p", "shop", "alice", sql, &[p(b"2")]),
        fp(&key, "ci/p", "shop", "bob", sql, &[p(b"1")]),
        fp(&key, "ci/q", "shop", "alice", sql, &[p(b"1")]),
        fp(&key, "ci/p", "shop2", "alice", sql, &[p(b"1")]),
        fp(
            &key,
            "ci/p",
            "shop",
            "alice",
            "DELETE FROM t WHERE id = $1 ",
            &[p(b"1")],
        ),
        fp(&key, "ci/p", "shop", "alice", sql, &[]),
        fp(&key, "ci/p", "shop", "alice", sql, &[null]),
        fp(&key, "ci/p", "shop", "alice", sql, &[binary]),
        fp(&[8u8; 32], "ci/p", "shop", "alice", sql, &[p(b"1")]),
    ];
    for v in &variants {
        assert_ne!(&base, v);
    }
}

#[test]
fn parameters_are_shown_unless_sensitive() {
    let text = |v: &'static [u8]| Param {
        format: 0,
        type_oid: 0,
        value: Some(v),
    };
    let shown = render_params(
        &[
            text(b"42"),
            Param {
                format: 0,
                type_oid: 0,
                value: None,
            },
            text(b"4111 1111 1111 1111"),
            text(b"123-45-6789"),
            text(b"mail me at a@example.com"),
            Param {
                format: 1,
                type_oid: 20,
                value: Some(&[0, 0, 0, 0, 0, 0, 1, 0]),
            },
            Param {
                format: 1,
                type_oid: 17,
                value: Some(&[0xde, 0xad]),
            },
        ],
        false,
    );
    assert_eq!(
        shown,
        vec![
            Some("42".to_owned()),
            None,
            Some(MASKED.into()),
            Some(MASKED.into()),
            Some(MASKED.into()),
            Some("256".into()),
            Some("\\xdead".into()),
        ]
    );
    // The statement touches masked columns: no value is shown at all.
    assert_eq!(
        render_params(
            &[
                text(b"42"),
                Param {
                    format: 0,
                    type_oid: 0,
                    value: None
                }
            ],
            true
        ),
        vec![Some(MASKED.into()), None]
    );
    let long = vec![b'a'; 5000];
    let cut = render_params(
        &[Param {
            format: 0,
            type_oid: 0,
            value: Some(&long),
        }],
        false,
    );
    let cut = cut[0].as_deref().unwrap();
    assert!(cut.ends_with("… (5000 bytes)") && cut.len() < 1100, "{cut}");
}

#[test]
fn the_json_view_has_the_fields_the_cli_promises() {
    let r = pending("nightly-000001", T0, "fp");
    let v = serde_json::to_value(view(&r, ts(T0))).unwrap();
    for k in [
        "id",
        "phase",
        "statement",
        "requester",
        "policy",
        "expiresAt",
        "fingerprint",
    ] {
        assert!(v.get(k).is_some(), "{k} missing in {v}");
    }
    assert_eq!(v["phase"], "Pending");
    assert_eq!(
        v["requester"]["subject"],
        "repo:acme/shop:ref:refs/heads/main"
    );
}
