use super::*;
use proptest::prelude::*;

#[test]
fn query_text_is_exactly_one_terminated_string() {
    assert_eq!(query_text(b"SELECT 1\0"), Ok("SELECT 1"));
    // pgwire reads this as two messages; we refuse it.
    assert_eq!(
        query_text(b"SELECT 1\0DROP TABLE t\0"),
        Err(DecodeError::Trailing(13))
    );
    assert_eq!(query_text(b"SELECT 1"), Err(DecodeError::MissingNul));
    assert_eq!(
        query_text(b"SELECT '\xff'\0"),
        Err(DecodeError::InvalidUtf8)
    );
    assert_eq!(query_text(b"\0"), Ok(""));
}

#[test]
fn parse_checks_counts_before_allocating() {
    let mut ok = b"s1\0SELECT $1\0".to_vec();
    ok.extend_from_slice(&1i16.to_be_bytes());
    ok.extend_from_slice(&23u32.to_be_bytes());
    let p = parse(&ok).unwrap();
    assert_eq!(
        (p.statement, p.query, p.param_types),
        ("s1", "SELECT $1", vec![23])
    );

    // A claimed 32767 parameter types with none present: truncated, not a 128 KiB vector.
    let mut huge = b"\0SELECT 1\0".to_vec();
    huge.extend_from_slice(&i16::MAX.to_be_bytes());
    assert_eq!(parse(&huge).err(), Some(DecodeError::Truncated));

    let mut neg = b"\0SELECT 1\0".to_vec();
    neg.extend_from_slice(&(-1i16).to_be_bytes());
    assert!(parse(&neg).is_err());

    let mut trailing = b"\0SELECT 1\0\0\0".to_vec();
    trailing.push(b'x');
    assert_eq!(parse(&trailing).err(), Some(DecodeError::Trailing(1)));
}

fn startup_bytes(code: i32, rest: &[u8]) -> Vec<u8> {
    let mut b = ((rest.len() + 8) as i32).to_be_bytes().to_vec();
    b.extend_from_slice(&code.to_be_bytes());
    b.extend_from_slice(rest);
    b
}

#[test]
fn startup_packets_decode_strictly() {
    let s = startup_packet(&startup_bytes(PROTOCOL_3_0, b"user\0u\0database\0shop\0\0")).unwrap();
    assert_eq!(
        s,
        StartupPacket::Startup {
            minor: 0,
            params: vec![
                ("user".into(), "u".into()),
                ("database".into(), "shop".into())
            ]
        }
    );
    // 3.2 is recognised (we answer NegotiateProtocolVersion).
    assert!(matches!(
        startup_packet(&startup_bytes(196_610, b"user\0u\0\0")),
        Ok(StartupPacket::Startup { minor: 2, .. })
    ));
    assert_eq!(
        startup_packet(&startup_bytes(0x0002_0000, b"")),
        Ok(StartupPacket::UnsupportedVersion(0x0002_0000))
    );
    // Duplicate keys could mean different things to proxy and server.
    assert!(startup_packet(&startup_bytes(PROTOCOL_3_0, b"user\0a\0user\0b\0\0")).is_err());
    // Missing final terminator.
    assert!(startup_packet(&startup_bytes(PROTOCOL_3_0, b"user\0a\0")).is_err());
    // Bytes after the terminator.
    assert!(startup_packet(&startup_bytes(PROTOCOL_3_0, b"user\0a\0\0zz")).is_err());
    assert_eq!(
        startup_packet(&startup_bytes(SSL_REQUEST, b"")),
        Ok(StartupPacket::Ssl)
    );
    assert!(startup_packet(&startup_bytes(SSL_REQUEST, b"x")).is_err());
    let cancel = startup_packet(&startup_bytes(CANCEL_REQUEST, &[0, 0, 0, 7, 1, 2, 3, 4])).unwrap();
    assert_eq!(
        cancel,
        StartupPacket::Cancel {
            pid: 7,
            secret: vec![1, 2, 3, 4]
        }
    );
    assert!(startup_packet(&startup_bytes(CANCEL_REQUEST, &[0, 0, 0, 7, 1])).is_err());
}

#[test]
fn startup_debug_hides_values() {
    let s = startup_packet(&startup_bytes(
        PROTOCOL_3_0,
        b"user\0u\0options\0-c password=hunter2\0\0",
    ))
    .unwrap();
    let shown = format!("{s:?}");
    assert!(shown.contains("options"));
    assert!(!shown.contains("hunter2"), "{shown}");
}

#[test]
fn auth_requests_decode() {
    let mut md5 = 5i32.to_be_bytes().to_vec();
    md5.extend_from_slice(&[9, 8, 7, 6]);
    assert_eq!(
        auth_request(&md5),
        Ok(AuthRequest::Md5 { salt: [9, 8, 7, 6] })
    );
    let mut sasl = 10i32.to_be_bytes().to_vec();
    sasl.extend_from_slice(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
    assert_eq!(
        auth_request(&sasl),
        Ok(AuthRequest::Sasl {
            mechanisms: vec!["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
        })
    );
    assert_eq!(auth_request(&0i32.to_be_bytes()), Ok(AuthRequest::Ok));
    assert!(auth_request(&[0, 0, 0]).is_err());
    assert!(auth_request(&5i32.to_be_bytes()).is_err()); // md5 without salt
    let mut trailing = 0i32.to_be_bytes().to_vec();
    trailing.push(1);
    assert!(auth_request(&trailing).is_err());
}

#[test]
fn notice_fields_need_their_terminator() {
    // pgwire's ErrorResponse decoder panics on this; ours returns an error.
    assert!(notice_fields(b"SERROR\0").is_err());
    assert!(notice_fields(b"").is_err());
    assert!(notice_fields(b"SERROR").is_err());
    assert_eq!(notice_fields(b"\0"), Ok(vec![]));
}

#[test]
fn errors_we_build_decode_back_to_the_same_fields() {
    let err = PgError::denied("no").with_detail("d").with_hint("h");
    let mut out = BytesMut::new();
    put_error(&err, &mut out);
    assert_eq!(out[0], b'E');
    let len = i32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
    assert_eq!(len + 1, out.len());
    let fields = notice_fields(&out[5..]).unwrap();
    assert_eq!(fields, err.fields());
    assert!(fields.contains(&(b'C', "42501".into())));
    assert!(fields.contains(&(b'S', "ERROR".into())));
}

#[test]
fn startup_we_send_is_one_well_formed_packet() {
    let mut out = BytesMut::new();
    put_startup(
        &[
            ("user".into(), "app".into()),
            ("database".into(), "shop".into()),
        ],
        &mut out,
    );
    assert_eq!(crate::wire::frame::cut_startup(&out), Ok(Some(out.len())));
    assert!(matches!(
        startup_packet(&out),
        Ok(StartupPacket::Startup { minor: 0, .. })
    ));
}

#[test]
fn data_rows_decode_strictly() {
    let mut row = 3i16.to_be_bytes().to_vec();
    row.extend_from_slice(&2i32.to_be_bytes());
    row.extend_from_slice(b"ab");
    row.extend_from_slice(&(-1i32).to_be_bytes());
    row.extend_from_slice(&0i32.to_be_bytes());
    assert_eq!(
        data_row(&row),
        Ok(vec![Some(&b"ab"[..]), None, Some(&b""[..])])
    );
    // A huge column count with no columns: refused before allocating.
    assert_eq!(
        data_row(&i16::MAX.to_be_bytes()),
        Err(DecodeError::Truncated)
    );
    let mut short = 1i16.to_be_bytes().to_vec();
    short.extend_from_slice(&10i32.to_be_bytes());
    short.extend_from_slice(b"abc");
    assert_eq!(data_row(&short), Err(DecodeError::Truncated));
    let mut neg = 1i16.to_be_bytes().to_vec();
    neg.extend_from_slice(&(-2i32).to_be_bytes());
    assert!(data_row(&neg).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    /// No decoder panics on any body.
    #[test]
    fn decoders_never_panic(body in proptest::collection::vec(any::<u8>(), 0..48)) {
        let _ = query_text(&body);
        let _ = parse(&body);
        let _ = password(&body);
        let _ = auth_request(&body);
        let _ = parameter_status(&body);
        let _ = backend_key_data(&body);
        let _ = ready_for_query(&body);
        let _ = notice_fields(&body);
        let _ = data_row(&body);
        let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        let _ = startup_packet(&packet);
    }
}

#[test]
fn bind_params_reads_formats_and_values() {
    // portal "p", statement "s", formats [1], 3 params: NULL, "ab", 4 bytes
    let mut b = Vec::new();
    b.extend_from_slice(b"p\0s\0");
    b.extend_from_slice(&1i16.to_be_bytes());
    b.extend_from_slice(&1i16.to_be_bytes());
    b.extend_from_slice(&3i16.to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b.extend_from_slice(&2i32.to_be_bytes());
    b.extend_from_slice(b"ab");
    b.extend_from_slice(&4i32.to_be_bytes());
    b.extend_from_slice(&[0, 0, 0, 7]);
    b.extend_from_slice(&0i16.to_be_bytes());
    let bind = bind_params(&b).unwrap();
    assert_eq!((bind.portal, bind.statement), ("p", "s"));
    assert!(bind.result_formats.is_empty());
    assert_eq!(
        bind.params,
        vec![
            (1, None),
            (1, Some(&b"ab"[..])),
            (1, Some(&[0u8, 0, 0, 7][..]))
        ]
    );
    // Hostile lengths are errors, not panics or huge allocations.
    let mut bad = b[..b.len() - 2].to_vec();
    let at = 4 + 2 + 2 + 2 + 4 + 4 + 2;
    bad[at..at + 4].copy_from_slice(&i32::MAX.to_be_bytes());
    assert!(bind_params(&bad).is_err());
    for cut in 0..b.len() - 2 {
        let _ = bind_params(&b[..cut]);
    }
    let mut neg = b.clone();
    neg[4 + 2 + 2..4 + 2 + 2 + 2].copy_from_slice(&(-5i16).to_be_bytes());
    assert!(bind_params(&neg).is_err());
}

#[test]
fn proxy_built_parse_and_terminate_are_what_the_server_expects() {
    let mut out = BytesMut::new();
    put_parse("s1", "pgwarden_refused_ab_7", &mut out);
    assert_eq!(out[0], b'P');
    let len = i32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
    assert_eq!(len + 1, out.len());
    let p = parse(&out[5..]).unwrap();
    assert_eq!((p.statement, p.query), ("s1", "pgwarden_refused_ab_7"));
    assert!(p.param_types.is_empty());
    // The unnamed statement is an empty name, not a missing one.
    out.clear();
    put_parse("", "x", &mut out);
    assert_eq!(parse(&out[5..]).unwrap().statement, "");

    out.clear();
    put_terminate(&mut out);
    assert_eq!(&out[..], &[b'X', 0, 0, 0, 4]);
}
