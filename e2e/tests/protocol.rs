//! Protocol negotiation through the gateway with a hand-written client: a
//! client asking for protocol 3.2 and `_pq_` options gets NegotiateProtocolVersion
//! (3.0, the options declined) and a working session.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use pgwarden_e2e::{Gateway, PgCluster};

fn read_message(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).unwrap();
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).unwrap();
    (head[0], body)
}

fn startup(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    msg
}

#[test]
fn protocol_3_2_is_negotiated_down_to_3_0() {
    let pg = PgCluster::start();
    let gw = Gateway::start(&pg);
    let mut s = TcpStream::connect(("127.0.0.1", gw.port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&startup(
        0x0003_0002,
        &[("user", "app"), ("database", "shop"), ("_pq_.fancy", "1")],
    ))
    .unwrap();
    let (ty, body) = read_message(&mut s);
    assert_eq!(ty, b'v', "first message should be NegotiateProtocolVersion");
    assert_eq!(
        i32::from_be_bytes([body[0], body[1], body[2], body[3]]),
        0,
        "minor version"
    );
    assert_eq!(
        i32::from_be_bytes([body[4], body[5], body[6], body[7]]),
        1,
        "one option declined"
    );
    assert_eq!(&body[8..], b"_pq_.fancy\0");
    // Then an ordinary 3.0 login: AuthenticationOk ... BackendKeyData (4-byte key) ... ReadyForQuery.
    let mut seen = Vec::new();
    loop {
        let (ty, body) = read_message(&mut s);
        if ty == b'K' {
            assert_eq!(body.len(), 8, "a 3.0 cancel key is 4 bytes");
        }
        seen.push(ty);
        if ty == b'Z' {
            break;
        }
    }
    assert_eq!(seen.first(), Some(&b'R'));
    assert!(seen.contains(&b'K'));
    // The session works.
    let sql = b"SELECT 42\0";
    let mut query = vec![b'Q'];
    query.extend_from_slice(&((sql.len() + 4) as i32).to_be_bytes());
    query.extend_from_slice(sql);
    s.write_all(&query).unwrap();
    let mut row = None;
    loop {
        let (ty, body) = read_message(&mut s);
        if ty == b'D' {
            row = Some(body);
        }
        if ty == b'Z' {
            break;
        }
        assert_ne!(ty, b'E', "the query failed");
    }
    assert_eq!(&row.expect("a row")[6..], b"42");
}
