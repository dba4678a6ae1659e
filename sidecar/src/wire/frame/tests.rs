use super::*;
use proptest::prelude::*;

fn msg(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn with_len(ty: u8, len: i32) -> Vec<u8> {
    let mut m = vec![ty];
    m.extend_from_slice(&len.to_be_bytes());
    m
}

const L: Limits = Limits { large: 1 << 20 };

/// A realistic client pipeline: Parse/Bind/Describe/Execute/Sync then a Query.
fn pipeline() -> Vec<u8> {
    [
        msg(b'P', b"s1\0SELECT $1\0\0\0"),
        msg(b'B', b"\0s1\0\0\0\0\x01\0\0\0\x011\0\0"),
        msg(b'D', b"P\0"),
        msg(b'E', b"\0\0\0\0\0"),
        msg(b'S', b""),
        msg(b'Q', b"SELECT 1\0"),
    ]
    .concat()
}

#[test]
fn every_prefix_is_incomplete_until_the_message_is_whole() {
    let buf = pipeline();
    let first_len = msg(b'P', b"s1\0SELECT $1\0\0\0").len();
    for i in 0..first_len {
        assert_eq!(
            cut(&buf[..i], Direction::Frontend, &L),
            Ok(None),
            "prefix {i}"
        );
    }
    let f = cut(&buf[..first_len], Direction::Frontend, &L)
        .unwrap()
        .unwrap();
    assert_eq!((f.ty, f.wire_len), (b'P', first_len));
}

#[test]
fn a_pipeline_cuts_into_exactly_its_messages() {
    let buf = pipeline();
    let mut at = 0;
    let mut types = Vec::new();
    while let Some(f) = cut(&buf[at..], Direction::Frontend, &L).unwrap() {
        types.push(f.ty);
        at += f.wire_len;
    }
    assert_eq!(at, buf.len());
    assert_eq!(types, b"PBDESQ");
}

#[test]
fn hostile_lengths_are_refused_from_the_header_alone() {
    let cases: &[(Direction, Vec<u8>)] = &[
        // length below the length word itself
        (Direction::Frontend, with_len(b'Q', 3)),
        (Direction::Frontend, with_len(b'Q', 0)),
        (Direction::Frontend, with_len(b'Q', -1)),
        (Direction::Frontend, with_len(b'Q', i32::MIN)),
        // bigger than the cap: refused before we wait for 2 GiB
        (Direction::Frontend, with_len(b'Q', i32::MAX)),
        (Direction::Frontend, with_len(b'B', (1 << 20) + 5)),
        // fixed-size messages with a body
        (Direction::Frontend, with_len(b'S', 5)),
        (Direction::Frontend, with_len(b'X', 8)),
        // a password message of length 3 panics pgwire's decoder
        (Direction::Frontend, with_len(b'p', 3)),
        // a DataRow with no column count panics pgwire's decoder
        (Direction::Backend, with_len(b'D', 4)),
        (Direction::Backend, with_len(b'Z', 4)),
        (Direction::Backend, with_len(b'1', 5)),
    ];
    for (dir, buf) in cases {
        assert!(
            matches!(cut(buf, *dir, &L), Err(FrameError::BadLength { .. })),
            "{dir:?} {buf:?}"
        );
    }
}

#[test]
fn unknown_and_wrong_direction_types_are_refused() {
    // 'T' (RowDescription) is a server message; 'p' is a client message.
    assert_eq!(
        cut(b"T", Direction::Frontend, &L),
        Err(FrameError::UnknownType(b'T'))
    );
    assert_eq!(
        cut(b"p", Direction::Backend, &L),
        Err(FrameError::UnknownType(b'p'))
    );
    assert_eq!(
        cut(&[0], Direction::Frontend, &L),
        Err(FrameError::UnknownType(0))
    );
}

#[test]
fn startup_packets_are_capped_like_postgres() {
    assert_eq!(cut_startup(&[0, 0, 0]), Ok(None));
    assert_eq!(cut_startup(&8i32.to_be_bytes()), Ok(None));
    assert!(cut_startup(&7i32.to_be_bytes()).is_err());
    assert!(cut_startup(&10_001i32.to_be_bytes()).is_err());
    assert!(cut_startup(&(-8i32).to_be_bytes()).is_err());
    let mut ssl = 8i32.to_be_bytes().to_vec();
    ssl.extend_from_slice(&80_877_103i32.to_be_bytes());
    assert_eq!(cut_startup(&ssl), Ok(Some(8)));
}

#[test]
fn debug_never_prints_the_body() {
    let buf = msg(b'Q', b"SELECT secret_value\0");
    let f = cut(&buf, Direction::Frontend, &L).unwrap().unwrap();
    let shown = format!("{f:?}");
    assert!(!shown.contains("secret"), "{shown}");
    assert!(shown.contains('Q'));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    /// Arbitrary bytes: cutting never panics, and a frame it returns lies
    /// within the buffer and within the cap.
    #[test]
    fn cutting_arbitrary_bytes_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..64),
                                            backend in any::<bool>()) {
        let dir = if backend { Direction::Backend } else { Direction::Frontend };
        if let Ok(Some(f)) = cut(&buf, dir, &L) {
            prop_assert!(f.wire_len <= buf.len());
            prop_assert!(f.wire_len >= 5);
            prop_assert!(f.wire_len <= L.large + 1);
        }
        let _ = cut_startup(&buf);
        let _ = missing(&buf);
    }

    /// A valid pipeline with one byte flipped still never panics and never
    /// yields a frame past the end of the buffer.
    #[test]
    fn mutated_pipelines_never_escape_the_buffer(pos in 0usize..64, val in any::<u8>()) {
        let mut buf = pipeline();
        let i = pos % buf.len();
        buf[i] = val;
        let mut at = 0;
        while let Ok(Some(f)) = cut(&buf[at..], Direction::Frontend, &L) {
            prop_assert!(at + f.wire_len <= buf.len());
            at += f.wire_len;
        }
    }
}
