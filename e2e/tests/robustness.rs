//! Hostile and broken clients, spoken by hand over raw TCP.
//!
//! For every malformed input the gateway must answer with a FATAL ErrorResponse or
//! close the connection, promptly (a read that times out is a hang and fails the
//! test), and stay up: afterwards psql still gets answers and the process still runs.
//! The FunctionCall message is the exception: it is well-formed but refused, so it
//! gets an ERROR and the session goes on.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use pgwarden_e2e::{psql_query, Gateway, PgCluster, UpstreamAuth};

/// Longest the gateway may take to answer or close after bad input.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Sanity cap for messages this test client accepts from the gateway.
const MAX_REPLY_LEN: usize = 1 << 20;
const PROTOCOL_3_0: i32 = 196_608;

// === a tiny hand-written frontend ===

type Message = (u8, Vec<u8>);

struct RawClient {
    stream: TcpStream,
    what: String,
}

enum Reply {
    Message(Message),
    Closed,
}

fn startup_packet() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
    for s in [
        "user",
        "app",
        "database",
        "shop",
        "application_name",
        "e2e-raw",
    ] {
        body.extend_from_slice(s.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    message(b'Q', &body)
}

/// FunctionCall for `oid` with no arguments and a text result.
fn function_call(oid: i32) -> Vec<u8> {
    let mut body = oid.to_be_bytes().to_vec();
    body.extend_from_slice(&0i16.to_be_bytes()); // argument format codes
    body.extend_from_slice(&0i16.to_be_bytes()); // arguments
    body.extend_from_slice(&0i16.to_be_bytes()); // result format: text
    message(b'F', &body)
}

/// ErrorResponse / NoticeResponse fields by their one-byte code.
fn error_fields(body: &[u8]) -> BTreeMap<char, String> {
    let mut fields = BTreeMap::new();
    let mut rest = body;
    while let Some((&code, tail)) = rest.split_first() {
        if code == 0 {
            break;
        }
        let end = tail
            .iter()
            .position(|&b| b == 0)
            .unwrap_or_else(|| panic!("unterminated field in ErrorResponse {body:?}"));
        fields.insert(
            code as char,
            String::from_utf8_lossy(&tail[..end]).into_owned(),
        );
        rest = &tail[end + 1..];
    }
    fields
}

fn severity(body: &[u8]) -> String {
    let f = error_fields(body);
    f.get(&'V')
        .or_else(|| f.get(&'S'))
        .cloned()
        .unwrap_or_default()
}

fn describe(msgs: &[Message]) -> String {
    msgs.iter()
        .map(|(t, body)| match t {
            b'E' | b'N' => format!("{}{:?}", *t as char, error_fields(body)),
            _ => format!("{}({} bytes)", *t as char, body.len()),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl RawClient {
    fn connect(port: u16, what: impl Into<String>) -> RawClient {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to gateway");
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        RawClient {
            stream,
            what: what.into(),
        }
    }

    /// Writes `bytes`; a peer that already closed is not an error here.
    fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    fn close_write(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// The next message, or `Closed` on EOF / reset. Panics if nothing arrives
    /// within the timeout: that is a hang.
    fn read(&mut self, so_far: &[Message]) -> Reply {
        let mut header = [0u8; 5];
        match self.read_exact_or_eof(&mut header, so_far) {
            Some(()) => {}
            None => return Reply::Closed,
        }
        let len = i32::from_be_bytes(header[1..5].try_into().unwrap());
        assert!(
            (4..=MAX_REPLY_LEN as i32).contains(&len),
            "{}: gateway sent message {:?} with bad length {len}",
            self.what,
            header[0] as char
        );
        let mut body = vec![0u8; len as usize - 4];
        match self.read_exact_or_eof(&mut body, so_far) {
            Some(()) => Reply::Message((header[0], body)),
            None => panic!(
                "{}: connection closed in the middle of a {:?} message",
                self.what, header[0] as char
            ),
        }
    }

    fn read_exact_or_eof(&mut self, buf: &mut [u8], so_far: &[Message]) -> Option<()> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.stream.read(&mut buf[filled..]) {
                Ok(0) if filled == 0 => return None,
                Ok(0) => panic!("{}: truncated message from the gateway", self.what),
                Ok(n) => filled += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!(
                        "{}: HANG: nothing from the gateway for {READ_TIMEOUT:?} (it neither answered nor closed); got so far: [{}]",
                        self.what,
                        describe(so_far)
                    )
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                    ) && filled == 0 =>
                {
                    return None
                }
                Err(e) => panic!("{}: read error: {e}", self.what),
            }
        }
        Some(())
    }

    /// Messages until ReadyForQuery (inclusive); panics on an error or close.
    fn read_until_ready(&mut self) -> Vec<Message> {
        let msgs = self.read_until_ready_allowing_errors();
        if let Some(err) = msgs.iter().find(|m| m.0 == b'E') {
            panic!(
                "{}: unexpected error: {:?}",
                self.what,
                error_fields(&err.1)
            );
        }
        msgs
    }

    /// Messages until ReadyForQuery (inclusive), errors included.
    fn read_until_ready_allowing_errors(&mut self) -> Vec<Message> {
        let mut msgs = Vec::new();
        loop {
            match self.read(&msgs) {
                Reply::Message(m) => {
                    let done = m.0 == b'Z';
                    msgs.push(m);
                    if done {
                        return msgs;
                    }
                }
                Reply::Closed => panic!(
                    "{}: closed before ReadyForQuery; got [{}]",
                    self.what,
                    describe(&msgs)
                ),
            }
        }
    }

    /// Every message until the gateway closes the connection.
    fn read_until_closed(&mut self) -> Vec<Message> {
        let mut msgs = Vec::new();
        loop {
            match self.read(&msgs) {
                Reply::Message(m) => msgs.push(m),
                Reply::Closed => return msgs,
            }
            assert!(
                msgs.len() < 10_000,
                "{}: endless stream of messages",
                self.what
            );
        }
    }

    /// A trusted login: startup packet, then everything up to ReadyForQuery.
    fn login(port: u16, what: impl Into<String>) -> RawClient {
        let mut c = RawClient::connect(port, what);
        c.send(&startup_packet());
        let msgs = c.read_until_ready();
        assert!(
            msgs.iter()
                .any(|(t, b)| *t == b'R' && b[..] == [0, 0, 0, 0]),
            "{}: no AuthenticationOk in [{}]",
            c.what,
            describe(&msgs)
        );
        c
    }

    /// Simple-protocol query; returns the text of every DataRow's first column.
    fn query_rows(&mut self, sql: &str) -> Vec<String> {
        self.send(&query(sql));
        self.read_until_ready()
            .iter()
            .filter(|(t, _)| *t == b'D')
            .map(|(_, body)| {
                let len = i32::from_be_bytes(body[2..6].try_into().unwrap());
                String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned()
            })
            .collect()
    }
}

/// After bad input: the gateway closed the connection, optionally after exactly
/// one FATAL ErrorResponse. Messages of types in `allowed_before` may come first
/// (startup replies when the bad bytes were pipelined behind a startup packet).
fn assert_fatal_or_closed(what: &str, msgs: &[Message], allowed_before: &[u8]) {
    eprintln!("{what}: [{}] then closed", describe(msgs));
    let rest: Vec<&Message> = msgs
        .iter()
        .skip_while(|(t, _)| allowed_before.contains(t))
        .filter(|(t, _)| *t != b'N')
        .collect();
    match rest.as_slice() {
        [] => {}
        [(b'E', body)] => {
            let sev = severity(body);
            assert!(
                sev == "FATAL" || sev == "PANIC",
                "{what}: ErrorResponse with severity {sev:?}, expected FATAL: {:?}",
                error_fields(body)
            );
        }
        _ => panic!("{what}: expected FATAL or close, got [{}]", describe(msgs)),
    }
}

fn start() -> (PgCluster, Gateway) {
    let pg = PgCluster::start();
    let gw = Gateway::start(&pg);
    (pg, gw)
}

/// The gateway survived: still running, psql and a raw login still work.
fn assert_still_serving(gw: &Gateway) {
    gw.assert_running();
    assert_eq!(psql_query(gw, "SELECT 'still serving'"), "still serving");
    let mut c = RawClient::login(gw.port(), "login after the abuse");
    assert_eq!(c.query_rows("SELECT 6 * 7"), ["42"]);
    gw.assert_running();
}

// === before startup ===

#[test]
fn garbage_before_startup() {
    let (_pg, gw) = start();
    // Speaking HTTP to the Postgres port: the "length" is 0x47455420.
    let mut c = RawClient::connect(gw.port(), "HTTP request as startup");
    c.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let msgs = c.read_until_closed();
    assert_fatal_or_closed(&c.what, &msgs, &[]);

    // A plausible small length with a nonsense protocol code.
    let mut c = RawClient::connect(gw.port(), "unknown protocol code");
    let mut bad = 16i32.to_be_bytes().to_vec();
    bad.extend_from_slice(&0x0bad_c0dei32.to_be_bytes());
    bad.extend_from_slice(b"whatever");
    c.send(&bad);
    let msgs = c.read_until_closed();
    assert_fatal_or_closed(&c.what, &msgs, &[]);

    // Startup packet shorter than its own header.
    let mut c = RawClient::connect(gw.port(), "startup length 4");
    c.send(&4i32.to_be_bytes());
    c.send(&PROTOCOL_3_0.to_be_bytes());
    let msgs = c.read_until_closed();
    assert_fatal_or_closed(&c.what, &msgs, &[]);

    // Protocol 3.0 but a parameter list that is not NUL-terminated pairs.
    let mut c = RawClient::connect(gw.port(), "unterminated startup parameters");
    let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0app\0database");
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    c.send(&packet);
    let msgs = c.read_until_closed();
    assert_fatal_or_closed(&c.what, &msgs, &[]);

    assert_still_serving(&gw);
}

#[test]
fn truncated_startup_then_close() {
    let (_pg, gw) = start();
    let packet = startup_packet();
    for cut in [1, 3, 4, 6, 8, packet.len() - 1] {
        let mut c = RawClient::connect(gw.port(), format!("startup cut at {cut} bytes"));
        c.send(&packet[..cut]);
        c.close_write();
        let msgs = c.read_until_closed();
        assert_fatal_or_closed(&c.what, &msgs, &[]);
    }
    assert_still_serving(&gw);
}

#[test]
fn absurd_startup_length() {
    let (_pg, gw) = start();
    for len in [0x7fff_ffffi32, 0x0100_0000, -1, i32::MIN] {
        // The write side stays open: the gateway must refuse on the length alone
        // instead of waiting for (or allocating) that many bytes.
        let mut c = RawClient::connect(gw.port(), format!("startup length {len:#x}"));
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
        bytes.extend_from_slice(b"user\0app\0");
        c.send(&bytes);
        let msgs = c.read_until_closed();
        assert_fatal_or_closed(&c.what, &msgs, &[]);
    }
    assert_still_serving(&gw);
}

#[test]
fn password_message_of_length_3() {
    let (_pg, gw) = start();
    // As the very first bytes of a connection.
    let mut c = RawClient::connect(gw.port(), "'p' len 3 as first bytes");
    c.send(&[b'p', 0, 0, 0, 3]);
    let msgs = c.read_until_closed();
    assert_fatal_or_closed(&c.what, &msgs, &[]);

    // Pipelined right behind a startup packet, before the login completes.
    let mut c = RawClient::connect(gw.port(), "'p' len 3 behind the startup packet");
    let mut bytes = startup_packet();
    bytes.extend_from_slice(&[b'p', 0, 0, 0, 3]);
    c.send(&bytes);
    let msgs = c.read_until_closed();
    assert_fatal_or_closed(&c.what, &msgs, b"RSKZ");

    // And after login, where no password message is expected at all.
    let mut c = RawClient::login(gw.port(), "'p' len 3 after login");
    c.send(&[b'p', 0, 0, 0, 3]);
    let msgs = c.read_until_closed();
    assert_fatal_or_closed(&c.what, &msgs, &[]);

    assert_still_serving(&gw);
}

// === after a trusted startup ===

#[test]
fn absurd_query_length_after_startup() {
    let (_pg, gw) = start();
    for len in [0x7fff_fff0i32, 0x4000_0001, 3, 0, -5] {
        let mut c = RawClient::login(gw.port(), format!("Query with length {len:#x}"));
        let mut bytes = vec![b'Q'];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(b"SELECT 1\0");
        c.send(&bytes);
        let msgs = c.read_until_closed();
        assert_fatal_or_closed(&c.what, &msgs, &[]);
    }
    assert_still_serving(&gw);
}

#[test]
fn query_with_embedded_nul_is_not_split() {
    let (_pg, gw) = start();
    let mut c = RawClient::login(gw.port(), "Query body with an embedded NUL");
    c.send(&message(b'Q', b"SELECT 'visible'\0SELECT 'smuggled'\0"));
    let msgs = c.read_until_closed();
    let smuggled = msgs
        .iter()
        .any(|(t, body)| *t == b'D' && String::from_utf8_lossy(body).contains("smuggled"));
    assert!(
        !smuggled,
        "the bytes after the NUL ran as a second statement: [{}]",
        describe(&msgs)
    );
    assert_fatal_or_closed(&c.what, &msgs, &[]);
    assert_still_serving(&gw);
}

#[test]
fn unknown_message_type() {
    let (_pg, gw) = start();
    for kind in [b'z', b'!', 0u8, 0xff] {
        let mut c = RawClient::login(gw.port(), format!("message type {kind:#04x}"));
        c.send(&message(kind, b"payload"));
        let msgs = c.read_until_closed();
        assert_fatal_or_closed(&c.what, &msgs, &[]);
    }
    assert_still_serving(&gw);
}

#[test]
fn function_call_gets_error_and_session_survives() {
    let (_pg, gw) = start();
    const PG_BACKEND_PID: i32 = 2026;
    let mut c = RawClient::login(gw.port(), "FunctionCall");
    c.send(&function_call(PG_BACKEND_PID));
    let msgs = c.read_until_ready_allowing_errors();
    let kinds: Vec<u8> = msgs.iter().map(|(t, _)| *t).collect();
    assert_eq!(kinds, b"EZ", "FunctionCall: got [{}]", describe(&msgs));
    let fields = error_fields(&msgs[0].1);
    assert_eq!(severity(&msgs[0].1), "ERROR", "{fields:?}");
    assert_eq!(
        fields.get(&'C').map(String::as_str),
        Some("42501"),
        "{fields:?}"
    );
    // ReadyForQuery says idle, and the session answers.
    assert_eq!(msgs[1].1, b"I");
    assert_eq!(c.query_rows("SELECT 'still here'"), ["still here"]);

    // Pipelined: FunctionCall and a Query in one write.
    let mut bytes = function_call(PG_BACKEND_PID);
    bytes.extend_from_slice(&query("SELECT 'pipelined'"));
    c.send(&bytes);
    // The FunctionCall's answer ends with its own ReadyForQuery.
    let mut all = c.read_until_ready_allowing_errors();
    all.extend(c.read_until_ready_allowing_errors());
    let kinds: Vec<u8> = all.iter().map(|(t, _)| *t).collect();
    assert_eq!(kinds, b"EZTDCZ", "pipelined: got [{}]", describe(&all));
    assert_still_serving(&gw);
}

// === seeded random input ===

/// splitmix64: a reproducible stream without a rand dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn seed() -> u64 {
    std::env::var("PGWARDEN_E2E_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_2026)
}

/// Random input shaped like frontend traffic: sometimes pure noise, sometimes a
/// real message type with a lying length, sometimes well-framed garbage bodies.
fn random_input(rng: &mut Rng) -> Vec<u8> {
    const TYPES: &[u8] = b"QPBEDCSHXdcfFpz";
    match rng.below(3) {
        0 => {
            let n = 1 + rng.below(128) as usize;
            rng.bytes(n)
        }
        1 => {
            let kind = TYPES[rng.below(TYPES.len() as u64) as usize];
            let n = rng.below(64) as usize;
            let body = rng.bytes(n);
            let len: i32 = match rng.below(4) {
                0 => rng.below(8) as i32,
                1 => body.len() as i32 + 4 + rng.below(16) as i32,
                2 => rng.next() as i32,
                _ => 0x7fff_0000 + rng.below(0xffff) as i32,
            };
            let mut m = vec![kind];
            m.extend_from_slice(&len.to_be_bytes());
            m.extend_from_slice(&body);
            m
        }
        _ => {
            let mut out = Vec::new();
            for _ in 0..1 + rng.below(3) {
                let kind = TYPES[rng.below(TYPES.len() as u64) as usize];
                let n = rng.below(48) as usize;
                let body = rng.bytes(n);
                out.extend_from_slice(&message(kind, &body));
            }
            out
        }
    }
}

/// `iterations` sessions that log in, send random bytes, and half-close.
fn random_sessions_after_startup(port: u16, seed: u64, iterations: usize) {
    let mut rng = Rng(seed);
    for i in 0..iterations {
        let input = random_input(&mut rng);
        let what = format!("seed {seed} iteration {i} input {input:02x?}");
        let mut c = RawClient::login(port, what);
        c.send(&input);
        // Half-close: whatever the server makes of the bytes, end of input must
        // end the session.
        c.close_write();
        let msgs = c.read_until_closed();
        for (t, body) in &msgs {
            if *t == b'E' {
                let sev = severity(body);
                assert!(
                    matches!(sev.as_str(), "ERROR" | "FATAL"),
                    "{}: bad ErrorResponse {:?}",
                    c.what,
                    error_fields(body)
                );
            }
        }
    }
}

/// `iterations` connections that send random bytes instead of a startup packet.
fn random_sessions_before_startup(port: u16, seed: u64, iterations: usize) {
    let mut rng = Rng(seed);
    for i in 0..iterations {
        let mut input = random_input(&mut rng);
        if rng.below(2) == 0 {
            // A startup-looking prefix with a random length.
            let mut prefix = (rng.below(512) as i32).to_be_bytes().to_vec();
            prefix.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
            prefix.append(&mut input);
            input = prefix;
        }
        let what = format!("seed {seed} iteration {i} input {input:02x?}");
        let mut c = RawClient::connect(port, what);
        c.send(&input);
        c.close_write();
        let msgs = c.read_until_closed();
        // Before login nothing but a FATAL may come back; mostly it just closes.
        for (t, body) in &msgs {
            if *t == b'E' {
                assert_eq!(severity(body), "FATAL", "{}", c.what);
            }
        }
    }
}

#[test]
fn random_bytes_after_startup() {
    let (_pg, gw) = start();
    let started = Instant::now();
    for chunk in 0..6 {
        random_sessions_after_startup(gw.port(), seed() + chunk, 50);
        gw.assert_running();
    }
    eprintln!("300 random sessions in {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(240),
        "random sessions took {:?}",
        started.elapsed()
    );
    assert_still_serving(&gw);
}

#[test]
fn random_bytes_before_startup() {
    let (_pg, gw) = start();
    random_sessions_before_startup(gw.port(), seed() ^ 0xdead_beef, 200);
    assert_still_serving(&gw);
}

// === control: the hand-written client against PostgreSQL itself ===

#[test]
fn raw_client_control_direct() {
    let pg = PgCluster::builder().auth(UpstreamAuth::Trust).start();
    let mut c = RawClient::login(pg.port(), "direct login");
    assert_eq!(c.query_rows("SELECT 6 * 7"), ["42"]);
    // PostgreSQL runs the FunctionCall: proves the message encoding is right.
    c.send(&function_call(2026));
    let msgs = c.read_until_ready();
    let kinds: Vec<u8> = msgs.iter().map(|(t, _)| *t).collect();
    assert_eq!(kinds, b"VZ", "[{}]", describe(&msgs));
    // PostgreSQL answers an unknown message type with FATAL and closes.
    c.send(&message(b'z', b"payload"));
    let msgs = c.read_until_closed();
    assert_fatal_or_closed("direct unknown type", &msgs, &[]);
    assert!(!msgs.is_empty());
    // And a garbage startup just closes.
    let mut c = RawClient::connect(pg.port(), "direct HTTP");
    c.send(b"GET / HTTP/1.1\r\n\r\n");
    let msgs = c.read_until_closed();
    assert_fatal_or_closed(&c.what, &msgs, &[]);
    // Absurd and truncated startup packets: PostgreSQL closes.
    for len in [0x7fff_ffffi32, -1] {
        let mut c = RawClient::connect(pg.port(), format!("direct startup length {len:#x}"));
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
        c.send(&bytes);
        let msgs = c.read_until_closed();
        assert_fatal_or_closed(&c.what, &msgs, &[]);
    }
    let mut c = RawClient::connect(pg.port(), "direct truncated startup");
    c.send(&startup_packet()[..6]);
    c.close_write();
    assert!(c.read_until_closed().is_empty());
    // The random-input loops themselves terminate against PostgreSQL.
    random_sessions_after_startup(pg.port(), seed(), 40);
    random_sessions_before_startup(pg.port(), seed(), 40);
    let mut c = RawClient::login(pg.port(), "direct login after the abuse");
    assert_eq!(c.query_rows("SELECT 1"), ["1"]);
}
