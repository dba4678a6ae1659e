use super::*;
use bytes::BytesMut;

fn msg(ty: u8, f: impl FnOnce(&mut BytesMut)) -> (u8, Vec<u8>) {
    let mut b = BytesMut::new();
    f(&mut b);
    (ty, b.to_vec())
}

fn complete(tag: &str) -> (u8, Vec<u8>) {
    msg(b'C', |b| {
        b.extend_from_slice(tag.as_bytes());
        b.extend_from_slice(&[0]);
    })
}

fn error(code: &str, m: &str) -> (u8, Vec<u8>) {
    msg(b'E', |b| {
        for (k, v) in [(b'S', "ERROR"), (b'C', code), (b'M', m)] {
            b.extend_from_slice(&[k]);
            b.extend_from_slice(v.as_bytes());
            b.extend_from_slice(&[0]);
        }
        b.extend_from_slice(&[0]);
    })
}

fn ready() -> (u8, Vec<u8>) {
    (b'Z', vec![b'I'])
}

fn run(t: &mut Tracker, msgs: &[(u8, Vec<u8>)]) -> Vec<(String, Outcome)> {
    msgs.iter()
        .filter_map(|(ty, body)| t.on_message(*ty, body, false))
        .collect()
}

fn watch(window: u64, kind: WatchKind, id: &str) -> Watch {
    Watch {
        window,
        kind,
        id: id.into(),
    }
}

#[test]
fn a_query_is_answered_by_its_window() {
    let mut t = Tracker::default();
    // Window 0 is an earlier request; ours is window 1 with two statements.
    t.watch(watch(1, WatchKind::Query, "r1"));
    let out = run(
        &mut t,
        &[
            complete("SELECT 1"),
            ready(),
            complete("BEGIN"),
            complete("DELETE 3"),
            ready(),
        ],
    );
    assert_eq!(out, vec![("r1".into(), Outcome::Done("DELETE 3".into()))]);
}

#[test]
fn a_failed_query_records_the_server_error_unless_scrubbed() {
    let mut t = Tracker::default();
    t.watch(watch(0, WatchKind::Query, "r1"));
    let e = error("42P01", "relation \"nope\" does not exist");
    assert_eq!(
        run(&mut t, &[e.clone(), ready()]),
        vec![(
            "r1".into(),
            Outcome::Failed("ERROR 42P01: relation \"nope\" does not exist".into())
        )]
    );
    t.watch(watch(1, WatchKind::Query, "r2"));
    assert_eq!(
        t.on_message(b'E', &e.1, true),
        Some(("r2".into(), Outcome::Failed("ERROR 42P01".into())))
    );
}

#[test]
fn the_kth_execute_takes_the_kth_completion() {
    let mut t = Tracker::default();
    t.watch(watch(0, WatchKind::Execute(1), "r1"));
    let out = run(
        &mut t,
        &[
            (b'1', vec![]),
            (b'2', vec![]),
            complete("INSERT 0 1"),
            complete("DELETE 7"),
            ready(),
        ],
    );
    assert_eq!(out, vec![("r1".into(), Outcome::Done("DELETE 7".into()))]);
}

#[test]
fn an_error_before_the_execute_means_it_never_ran() {
    let mut t = Tracker::default();
    t.watch(watch(0, WatchKind::Execute(1), "r1"));
    let out = run(&mut t, &[error("23505", "duplicate key"), ready()]);
    assert_eq!(out.len(), 1);
    assert!(
        matches!(&out[0].1, Outcome::Failed(m) if m.contains("did not run")),
        "{out:?}"
    );
    // Its own error is recorded as its failure.
    t.watch(watch(1, WatchKind::Execute(0), "r2"));
    let out = run(&mut t, &[error("40001", "serialization failure"), ready()]);
    assert_eq!(
        out,
        vec![(
            "r2".into(),
            Outcome::Failed("ERROR 40001: serialization failure".into())
        )]
    );
}
