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

fn row(values: &[Option<&str>]) -> (u8, Vec<u8>) {
    msg(b'D', |b| {
        b.extend_from_slice(&(values.len() as i16).to_be_bytes());
        for v in values {
            match v {
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(s) => {
                    b.extend_from_slice(&(s.len() as i32).to_be_bytes());
                    b.extend_from_slice(s.as_bytes());
                }
            }
        }
    })
}

fn ready() -> (u8, Vec<u8>) {
    (b'Z', vec![b'I'])
}

fn run(t: &mut Tracker, msgs: &[(u8, Vec<u8>)]) -> Vec<(Option<String>, Outcome)> {
    let mut out = Vec::new();
    for (ty, body) in msgs {
        if matches!(ty, b'T' | b'D') {
            t.on_result(*ty, body);
        } else {
            out.extend(
                t.on_message(*ty, body, false)
                    .into_iter()
                    .map(|f| (f.approval, f.outcome)),
            );
        }
    }
    out
}

fn watch(window: u64, kind: WatchKind, id: &str) -> Watch {
    Watch {
        window,
        kind,
        approval: Some(id.into()),
        record: None,
        started: Instant::now(),
        columns: None,
    }
}

fn done(id: &str, o: Outcome) -> Vec<(Option<String>, Outcome)> {
    vec![(Some(id.into()), o)]
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
    assert_eq!(out, done("r1", Outcome::Done("DELETE 3".into())));
}

#[test]
fn a_failed_query_records_the_server_error_unless_scrubbed() {
    let mut t = Tracker::default();
    t.watch(watch(0, WatchKind::Query, "r1"));
    let e = error("42P01", "relation \"nope\" does not exist");
    assert_eq!(
        run(&mut t, &[e.clone(), ready()]),
        done(
            "r1",
            Outcome::Failed("ERROR 42P01: relation \"nope\" does not exist".into())
        )
    );
    t.watch(watch(1, WatchKind::Query, "r2"));
    let f = t.on_message(b'E', &e.1, true);
    assert_eq!(f[0].outcome, Outcome::Failed("ERROR 42P01".into()));
}

#[test]
fn the_kth_execute_takes_the_kth_completion_and_its_rows() {
    let mut t = Tracker::new(1);
    t.watch(watch(0, WatchKind::Execute(1), "r1"));
    let mut finished = Vec::new();
    for (ty, body) in [
        (b'1', vec![]),
        (b'2', vec![]),
        row(&[Some("not ours")]),
        complete("SELECT 1"),
        row(&[Some("a"), None]),
        row(&[Some("b"), Some("x")]),
        complete("SELECT 2"),
        ready(),
    ] {
        if ty == b'D' {
            t.on_result(ty, &body);
        } else {
            finished.extend(t.on_message(ty, &body, false));
        }
    }
    assert_eq!(finished.len(), 1);
    let f = &finished[0];
    assert_eq!(f.outcome, Outcome::Done("SELECT 2".into()));
    assert_eq!(f.rows, 2);
    assert_eq!(f.sample, vec![vec![Some("a".to_owned()), None]]);
    assert!(f.sample_cut);
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
        done(
            "r2",
            Outcome::Failed("ERROR 40001: serialization failure".into())
        )
    );
}

#[test]
fn binary_rows_of_a_described_statement_read_as_text() {
    let mut t = Tracker::new(5);
    let cols = vec![
        codec::Column {
            name: "id".into(),
            type_oid: 23,
            binary: true,
        },
        codec::Column {
            name: "note".into(),
            type_oid: 25,
            binary: true,
        },
    ];
    t.watch(Watch {
        columns: Some(Arc::new(cols)),
        ..watch(0, WatchKind::Execute(0), "r")
    });
    let r = msg(b'D', |b| {
        b.extend_from_slice(&2i16.to_be_bytes());
        b.extend_from_slice(&4i32.to_be_bytes());
        b.extend_from_slice(&[0, 0, 0, 2]);
        b.extend_from_slice(&2i32.to_be_bytes());
        b.extend_from_slice(b"hi");
    });
    t.on_result(b'D', &r.1);
    let f = t.on_message(b'C', &complete("SELECT 1").1, false);
    assert_eq!(f[0].columns, vec!["id".to_owned(), "note".to_owned()]);
    assert_eq!(
        f[0].sample,
        vec![vec![Some("2".to_owned()), Some("hi".to_owned())]]
    );
}
