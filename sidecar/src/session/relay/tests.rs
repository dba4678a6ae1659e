//! The relay against a scripted upstream over in-memory pipes: what a client
//! sees, byte-level decoded, and what the server never receives.

use pgwarden_api::DecisionAction;

use super::harness::{client, policy, types, Column, Msg, Script};
use super::End;
use crate::approval::{request, store::DirStore};
use crate::masking::columns::{MapBuilder, Row};

/// Reads of public tables run; DELETE waits for a reviewer (`wait` long);
/// everything else is refused.
fn rules(wait: &str) -> String {
    format!(
        "  defaultAction: Deny
  rules:
    - {{name: risky-deletes, action: RequireApproval, statements: [DELETE]}}
    - {{name: reads, action: Allow, statements: [SELECT], tables: [\"public.*\"]}}
  approval:
    approvers: {{users: [alice]}}
    wait: {wait}
    expiresAfter: 1h
"
    )
}

const READ: &str = "SELECT note FROM items WHERE id = 1";
const DENIED: &str = "UPDATE items SET note = 'gone'";
const DELETE: &str = "DELETE FROM items WHERE id <= 3";

fn note() -> Column {
    Column {
        name: "note",
        table: 0,
        attnum: 0,
    }
}

fn script() -> Script {
    Script::default()
        .rows(READ, vec![note()], vec![vec![Some("first")]])
        .command(DENIED, "UPDATE 10")
        .command(DELETE, "DELETE 3")
}

fn is_refusal(m: &Msg) -> bool {
    m.ty == b'E' && m.field(b'C').as_deref() == Some("42501")
}

fn never_received(received: &[Msg], text: &str) {
    assert!(
        !received.iter().any(|m| m.carries(text)),
        "the server received {text:?}"
    );
}

#[tokio::test]
async fn a_refusal_in_a_pipeline_keeps_its_place_and_skips_to_sync() {
    let p = policy(&rules("30s"));
    let mut s = p.session(script());
    s.send(&[
        client::parse("", READ),
        client::bind("", "", &[]),
        client::execute(""),
        client::parse("", DENIED),
        client::bind("", "", &[]),
        client::execute(""),
        client::sync(),
    ])
    .await;
    let got = s.until_ready().await;
    // The first statement's results, then one ERROR in the second's place;
    // its Bind and Execute are skipped as after any error, then ReadyForQuery.
    assert_eq!(types(&got), "12DCEZ", "{got:?}");
    assert_eq!(got[2].row(), vec![Some("first".to_owned())]);
    assert!(is_refusal(&got[4]), "{:?}", got[4].field(b'M'));
    let message = got[4].field(b'M').unwrap_or_default();
    assert!(message.contains("pgwarden"), "{message}");
    // The server's syntax error about the sentinel never reaches the client.
    assert!(!message.contains("pgwarden_refused_"), "{message}");
    let refused: f64 = (s.metrics.render().lines())
        .filter(|l| l.starts_with("pgwarden_statements_refused_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert_eq!(refused, 1.0);

    // The session goes on.
    s.send(&[client::query(READ)]).await;
    assert_eq!(types(&s.until_ready().await), "TDCZ");
    let (end, received) = s.terminate().await;
    assert!(matches!(end, End::ClientTerminated), "{end:?}");
    never_received(&received, DENIED);
    // The server got Terminate from the relay, not an unexpected EOF.
    assert_eq!(received.last().map(|m| m.ty), Some(b'X'));
}

#[tokio::test]
async fn a_simple_query_with_one_refused_statement_sends_none_of_it() {
    let p = policy(&rules("30s"));
    let mut s = p.session(script());
    let both = format!("{READ}; {DENIED}");
    s.send(&[client::query(&both)]).await;
    let got = s.until_ready().await;
    // Nothing ran: the allowed first statement's result does not come.
    assert_eq!(types(&got), "EZ", "{got:?}");
    assert!(is_refusal(&got[0]));
    let (_, received) = s.terminate().await;
    never_received(&received, READ);
    never_received(&received, DENIED);
}

#[tokio::test]
async fn a_statement_that_needs_approval_fails_fast_with_the_command_to_approve() {
    let p = policy(&rules("0s"));
    let mut s = p.session(script());
    s.send(&[client::query(DELETE)]).await;
    let got = s.until_ready().await;
    assert_eq!(types(&got), "EZ", "{got:?}");
    assert!(is_refusal(&got[0]));
    let message = got[0].field(b'M').unwrap_or_default();
    assert!(message.contains("waiting for a reviewer"), "{message}");
    let hint = got[0].field(b'H').unwrap_or_default();
    assert!(hint.contains("pgwarden approvals approve"), "{hint}");
    // The request is in the store, pending.
    let store = DirStore::open_existing(p.state_dir.path()).expect("the state directory");
    let pending = store.list().expect("requests listed");
    assert_eq!(pending.len(), 1);
    assert!(hint.contains(request::id(&pending[0])), "{hint}");
    let (_, received) = s.terminate().await;
    never_received(&received, DELETE);
}

#[tokio::test]
async fn a_held_statement_runs_once_a_reviewer_approves_it() {
    let p = policy(&rules("30s"));
    let mut s = p.session(script());
    s.send(&[client::query(DELETE)]).await;
    // The client is told it waits, and for which request.
    let notice = s.next().await;
    assert_eq!(notice.ty, b'N', "{notice:?}");
    let text = notice.field(b'M').unwrap_or_default();
    assert!(text.contains("waiting up to 30s"), "{text}");
    let store = DirStore::open_existing(p.state_dir.path()).expect("the state directory");
    let requests = store.list().expect("requests listed");
    let id = request::id(&requests[0]).to_owned();
    assert!(text.contains(&id), "{text}");
    // Held: the server has not seen it.
    never_received(&s.received_so_far(), DELETE);

    store
        .update(&id, |r| {
            let decided = request::decide(
                r,
                DecisionAction::Approve,
                "alice",
                None,
                k8s_openapi::jiff::Timestamp::now(),
            );
            (decided.is_ok(), decided)
        })
        .expect("store updated")
        .expect("alice may approve");
    let got = s.until_ready().await;
    assert_eq!(types(&got), "CZ", "{got:?}");
    let (_, received) = s.terminate().await;
    assert_eq!(
        received.iter().filter(|m| m.carries(DELETE)).count(),
        1,
        "released exactly once"
    );
}

/// `public.customers` (OID 100) has card_number as attribute 3.
fn card_map(p: &super::harness::Policy) {
    let row = |cells: &[&str]| -> Row { cells.iter().map(|c| Some((*c).to_owned())).collect() };
    let masking = p.config.masking.as_ref().expect("the policy masks");
    let b = MapBuilder::new(
        &masking.rules,
        &[row(&["100", "public", "customers"])],
        &[row(&["100", "3", "card_number"])],
        &[],
        &[],
    );
    masking.set_map(b.finish());
}

#[tokio::test]
async fn a_masked_column_leaves_the_proxy_masked() {
    let p = policy(
        "  defaultAction: Allow
  masking:
    - {columns: [\"public.customers.card_number\"], strategy: Partial, keepLast: 4}
",
    );
    card_map(&p);
    const CARDS: &str = "SELECT id, card_number FROM customers";
    let columns = vec![
        Column {
            name: "id",
            table: 100,
            attnum: 1,
        },
        Column {
            name: "card_number",
            table: 100,
            attnum: 3,
        },
    ];
    let rows = vec![
        vec![Some("1"), Some("4929123456781234")],
        vec![Some("2"), None],
    ];
    let mut s = p.session(Script::default().rows(CARDS, columns, rows));

    // Simple protocol.
    s.send(&[client::query(CARDS)]).await;
    let got = s.until_ready().await;
    assert_eq!(types(&got), "TDDCZ", "{got:?}");
    let masked = vec![Some("1".to_owned()), Some("************1234".to_owned())];
    assert_eq!(got[1].row(), masked);
    // NULL stays NULL.
    assert_eq!(got[2].row(), vec![Some("2".to_owned()), None]);
    assert!(!got.iter().any(|m| m.carries("4929123456781234")));

    // Extended protocol: the same.
    s.send(&[
        client::parse("cards", CARDS),
        client::bind("", "cards", &[]),
        client::describe_portal(""),
        client::execute(""),
        client::sync(),
    ])
    .await;
    let got = s.until_ready().await;
    assert_eq!(types(&got), "12TDDCZ", "{got:?}");
    assert_eq!(got[3].row(), masked);
    assert!(!got.iter().any(|m| m.carries("4929123456781234")));
    s.terminate().await;
}

#[tokio::test]
async fn a_result_over_max_rows_ends_in_an_error_and_the_session_goes_on() {
    let p = policy("  defaultAction: Allow\n  limits: {maxRows: 2}\n");
    const MANY: &str = "SELECT note FROM items";
    let rows = (0..5).map(|_| vec![Some("row")]).collect();
    let script = script().rows(MANY, vec![note()], rows);
    let mut s = p.session(script);
    s.send(&[client::query(MANY)]).await;
    let got = s.until_ready().await;
    // Two rows, then the limit's ERROR in place of the completion: a cut-off
    // result is never presented as complete.
    assert_eq!(types(&got), "TDDEZ", "{got:?}");
    assert_eq!(got[3].field(b'C').as_deref(), Some("54000"));
    let message = got[3].field(b'M').unwrap_or_default();
    assert!(message.contains("limits.maxRows"), "{message}");
    assert!(message.contains("not complete"), "{message}");
    // Within the limit: the whole result.
    s.send(&[client::query(READ)]).await;
    assert_eq!(types(&s.until_ready().await), "TDCZ");
    s.terminate().await;
}

#[tokio::test]
async fn a_held_execute_refused_in_a_pipeline_is_an_error_in_its_place() {
    let p = policy(&rules("0s"));
    let mut s = p.session(script());
    s.send(&[
        client::parse("del", DELETE),
        client::bind("", "del", &[]),
        client::execute(""),
        client::parse("", READ),
        client::bind("", "", &[]),
        client::execute(""),
        client::sync(),
    ])
    .await;
    let got = s.until_ready().await;
    // Preparing runs nothing, so Parse and Bind complete; the Execute is
    // refused, and what follows it is skipped to Sync.
    assert_eq!(types(&got), "12EZ", "{got:?}");
    assert!(is_refusal(&got[2]));
    let hint = got[2].field(b'H').unwrap_or_default();
    assert!(hint.contains("pgwarden approvals approve"), "{hint}");
    let (_, received) = s.terminate().await;
    // The server never got the Execute: a Parse of the sentinel, under a
    // name of the proxy's own, took its place.
    let after_bind: Vec<&Msg> = received.iter().skip_while(|m| m.ty != b'B').collect();
    assert_eq!(after_bind.get(1).map(|m| m.ty), Some(b'P'), "{received:?}");
    assert!(after_bind[1].carries("pgwarden_held_"));
    // Only the second statement's Execute went (the server skipped it).
    assert_eq!(received.iter().filter(|m| m.ty == b'E').count(), 1);
}

#[tokio::test]
async fn a_client_that_breaks_the_protocol_gets_a_fatal_and_the_server_a_goodbye() {
    let p = policy(&rules("30s"));
    let mut s = p.session(script());
    // A password message after login.
    s.send(&[vec![b'p', 0, 0, 0, 7, b'p', b'w', 0]]).await;
    let fatal = s.next().await;
    assert_eq!(fatal.ty, b'E');
    assert_eq!(fatal.field(b'S').as_deref(), Some("FATAL"));
    assert_eq!(fatal.field(b'C').as_deref(), Some("08P01"));
    let (end, received) = s.ended().await;
    assert!(matches!(end, End::ClientViolation(_)), "{end:?}");
    assert_eq!(types(&received), "X", "the server is told goodbye");
}
