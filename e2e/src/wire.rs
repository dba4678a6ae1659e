//! A hand-written PostgreSQL frontend for tests that must choose every message:
//! extended-protocol pipelines, portals without Execute, half-sent startup packets,
//! binary result formats. It logs in as `app` to `shop` without a password, so it
//! works against the gateway (localTrust) and against a cluster started with
//! [`UpstreamAuth::Trust`](crate::UpstreamAuth::Trust) (control runs).
//!
//! Messages are `(type byte, body)` pairs; the helpers below build frontend messages
//! and read backend ones (ErrorResponse fields, DataRow columns, ReadyForQuery status).

use std::collections::BTreeMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// How long a read may wait before the test fails as a hang.
pub const READ_TIMEOUT: Duration = Duration::from_secs(15);
const MAX_REPLY_LEN: usize = 1 << 24;
const PROTOCOL_3_0: i32 = 196_608;

/// One backend message: type byte and body (without the length word).
pub type Message = (u8, Vec<u8>);

/// A frontend connection over TCP to 127.0.0.1.
pub struct Wire {
    stream: TcpStream,
    what: String,
}

// === building frontend messages ===

/// A typed message: `kind`, length, `body`.
pub fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// StartupMessage (protocol 3.0) for user `app`, database `shop`, plus `params`.
pub fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
    for (k, v) in [("user", "app"), ("database", "shop")].iter().chain(params) {
        cstr(&mut body, k);
        cstr(&mut body, v);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

/// Simple Query.
pub fn query(sql: &str) -> Vec<u8> {
    query_bytes(sql.as_bytes())
}

/// Simple Query with raw bytes (not necessarily UTF-8).
pub fn query_bytes(sql: &[u8]) -> Vec<u8> {
    let mut b = sql.to_vec();
    b.push(0);
    message(b'Q', &b)
}

/// Parse with no parameter types.
pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.extend_from_slice(&0i16.to_be_bytes());
    message(b'P', &b)
}

/// Bind with no parameters and text results.
pub fn bind(portal: &str, statement: &str) -> Vec<u8> {
    bind_params(portal, statement, &[], 0)
}

/// Bind with one text parameter.
pub fn bind_int(portal: &str, statement: &str, value: i32) -> Vec<u8> {
    bind_params(portal, statement, &[Some(&value.to_string())], 0)
}

/// Bind with text-format parameters (`None` is NULL) and every result column in
/// `result_format` (0 text, 1 binary).
pub fn bind_params(
    portal: &str,
    statement: &str,
    params: &[Option<&str>],
    result_format: i16,
) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    cstr(&mut b, statement);
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        match p {
            Some(v) => {
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v.as_bytes());
            }
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    b.extend_from_slice(&1i16.to_be_bytes());
    b.extend_from_slice(&result_format.to_be_bytes());
    message(b'B', &b)
}

pub fn describe_portal(portal: &str) -> Vec<u8> {
    let mut b = vec![b'P'];
    cstr(&mut b, portal);
    message(b'D', &b)
}

/// Execute with no row limit.
pub fn execute(portal: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    b.extend_from_slice(&0i32.to_be_bytes());
    message(b'E', &b)
}

pub fn close_statement(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    cstr(&mut b, name);
    message(b'C', &b)
}

pub fn sync() -> Vec<u8> {
    message(b'S', &[])
}

/// FunctionCall for `oid` with no arguments and a text result.
pub fn function_call(oid: i32) -> Vec<u8> {
    let mut b = oid.to_be_bytes().to_vec();
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&0i16.to_be_bytes());
    message(b'F', &b)
}

pub fn concat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

// === reading backend messages ===

/// The fields of an ErrorResponse / NoticeResponse body by code ('S', 'C', 'M', ...).
pub fn error_fields(body: &[u8]) -> BTreeMap<char, String> {
    let mut fields = BTreeMap::new();
    let mut rest = body;
    while let Some((&code, tail)) = rest.split_first() {
        if code == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        fields.insert(
            code as char,
            String::from_utf8_lossy(&tail[..end]).into_owned(),
        );
        rest = tail.get(end + 1..).unwrap_or_default();
    }
    fields
}

/// The columns of a DataRow body (`None` for NULL).
pub fn columns(body: &[u8]) -> Vec<Option<Vec<u8>>> {
    let n = i16::from_be_bytes([body[0], body[1]]);
    let mut at = 2;
    let mut out = Vec::new();
    for _ in 0..n {
        let len = i32::from_be_bytes(body[at..at + 4].try_into().unwrap());
        at += 4;
        if len < 0 {
            out.push(None);
        } else {
            out.push(Some(body[at..at + len as usize].to_vec()));
            at += len as usize;
        }
    }
    out
}

/// First column of a DataRow as text (NULL as "NULL").
pub fn first_column(body: &[u8]) -> String {
    match columns(body).into_iter().next().flatten() {
        Some(v) => String::from_utf8_lossy(&v).into_owned(),
        None => "NULL".into(),
    }
}

/// A one-line summary for failure messages.
pub fn describe(msgs: &[Message]) -> String {
    msgs.iter()
        .map(|(t, body)| match t {
            b'E' | b'N' => format!("{}{:?}", *t as char, error_fields(body)),
            b'D' => format!("D({})", first_column(body)),
            b'Z' => format!("Z({})", body.first().map_or('?', |&b| b as char)),
            b'C' => format!(
                "C({})",
                String::from_utf8_lossy(body).trim_end_matches('\0')
            ),
            _ => format!("{}", *t as char),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The message types in order, as a string ("12DCZ").
pub fn kinds(msgs: &[Message]) -> String {
    msgs.iter().map(|(t, _)| *t as char).collect()
}

/// The fields of every ErrorResponse.
pub fn errors(msgs: &[Message]) -> Vec<BTreeMap<char, String>> {
    msgs.iter()
        .filter(|(t, _)| *t == b'E')
        .map(|(_, b)| error_fields(b))
        .collect()
}

/// The SQLSTATE of every ErrorResponse.
pub fn sqlstates(msgs: &[Message]) -> Vec<String> {
    errors(msgs)
        .iter()
        .map(|e| e.get(&'C').cloned().unwrap_or_default())
        .collect()
}

/// The first column of every DataRow.
pub fn rows(msgs: &[Message]) -> Vec<String> {
    msgs.iter()
        .filter(|(t, _)| *t == b'D')
        .map(|(_, b)| first_column(b))
        .collect()
}

/// The command tags of every CommandComplete.
pub fn tags(msgs: &[Message]) -> Vec<String> {
    msgs.iter()
        .filter(|(t, _)| *t == b'C')
        .map(|(_, b)| {
            String::from_utf8_lossy(b)
                .trim_end_matches('\0')
                .to_string()
        })
        .collect()
}

/// Transaction status of the last ReadyForQuery.
pub fn status(msgs: &[Message]) -> char {
    msgs.iter()
        .rev()
        .find(|(t, _)| *t == b'Z')
        .and_then(|(_, b)| b.first())
        .map_or('?', |&b| b as char)
}

/// The value of the last ParameterStatus for `name`.
pub fn parameter_status(msgs: &[Message], name: &str) -> Option<String> {
    msgs.iter()
        .rev()
        .filter(|(t, _)| *t == b'S')
        .find_map(|(_, b)| {
            let mut parts = b.split(|&c| c == 0);
            let key = parts.next()?;
            let value = parts.next()?;
            (key == name.as_bytes()).then(|| String::from_utf8_lossy(value).into_owned())
        })
}

/// Asserts exactly one ErrorResponse, a pgwarden refusal (SQLSTATE 42501, ERROR).
pub fn assert_refused(what: &str, msgs: &[Message]) {
    let errs = errors(msgs);
    assert_eq!(
        errs.len(),
        1,
        "{what}: expected one error: {}",
        describe(msgs)
    );
    let e = &errs[0];
    assert_eq!(
        e.get(&'S').map(String::as_str),
        Some("ERROR"),
        "{what}: {e:?}"
    );
    assert_eq!(
        e.get(&'C').map(String::as_str),
        Some("42501"),
        "{what}: {e:?}"
    );
    assert!(
        e.get(&'M').is_some_and(|m| m.starts_with("pgwarden: ")),
        "{what}: {e:?}"
    );
}

// === impl Wire ===

impl Wire {
    /// A TCP connection with nothing sent yet.
    pub fn connect(port: u16, what: &str) -> Wire {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("{what}: connect to 127.0.0.1:{port}: {e}"));
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Wire {
            stream,
            what: what.to_string(),
        }
    }

    /// Connects and logs in as `app` to database shop (trust / localTrust: no password).
    pub fn login(port: u16, what: &str) -> Wire {
        let (w, msgs, closed) = Wire::try_login(port, what, &[]);
        assert!(
            !closed
                && msgs
                    .iter()
                    .any(|(t, b)| *t == b'R' && b[..] == [0, 0, 0, 0]),
            "{what}: no AuthenticationOk: {}",
            describe(&msgs)
        );
        assert!(errors(&msgs).is_empty(), "{what}: {}", describe(&msgs));
        w
    }

    /// Sends a StartupMessage with `params` and reads until ReadyForQuery or until the
    /// other side closes; returns the connection, what came back and whether it closed.
    pub fn try_login(port: u16, what: &str, params: &[(&str, &str)]) -> (Wire, Vec<Message>, bool) {
        let mut w = Wire::connect(port, what);
        w.send(&startup_packet(params));
        let (msgs, closed) = w.until_ready_or_closed();
        (w, msgs, closed)
    }

    pub fn set_read_timeout(&mut self, timeout: Duration) {
        self.stream.set_read_timeout(Some(timeout)).unwrap();
    }

    /// Writes `bytes`; panics if the write fails.
    pub fn send(&mut self, bytes: &[u8]) {
        if let Err(e) = self.try_send(bytes) {
            panic!("{}: write: {e}", self.what);
        }
    }

    pub fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// The next message; `Ok(None)` when the other side closed (EOF or reset).
    /// A timeout is `Err` with kind WouldBlock or TimedOut.
    pub fn try_read(&mut self) -> io::Result<Option<Message>> {
        let mut header = [0u8; 5];
        match self.stream.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if is_closed(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = i32::from_be_bytes(header[1..5].try_into().unwrap());
        if !(4..=MAX_REPLY_LEN as i32).contains(&len) {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                format!("bad length {len} for {:?}", header[0] as char),
            ));
        }
        let mut body = vec![0u8; len as usize - 4];
        match self.stream.read_exact(&mut body) {
            Ok(()) => Ok(Some((header[0], body))),
            Err(e) if is_closed(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn read(&mut self, so_far: &[Message]) -> Message {
        match self.try_read() {
            Ok(Some(m)) => m,
            Ok(None) => panic!(
                "{}: the connection closed; got so far: {}",
                self.what,
                describe(so_far)
            ),
            Err(e) => {
                let why = if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                    "HANG: no answer within the read timeout".to_string()
                } else {
                    format!("read: {e}")
                };
                panic!("{}: {why}; got so far: {}", self.what, describe(so_far));
            }
        }
    }

    /// Every message up to and including the next ReadyForQuery.
    pub fn until_ready(&mut self) -> Vec<Message> {
        let mut msgs = Vec::new();
        loop {
            let m = self.read(&msgs);
            let done = m.0 == b'Z';
            msgs.push(m);
            if done {
                return msgs;
            }
        }
    }

    /// Every message up to and including the next ReadyForQuery, or up to the end of
    /// the connection (then `true`). Panics on a read timeout.
    pub fn until_ready_or_closed(&mut self) -> (Vec<Message>, bool) {
        let mut msgs = Vec::new();
        loop {
            match self.try_read() {
                Ok(Some(m)) => {
                    let done = m.0 == b'Z';
                    msgs.push(m);
                    if done {
                        return (msgs, false);
                    }
                }
                Ok(None) => return (msgs, true),
                Err(e) => panic!(
                    "{}: read: {e} (HANG?); got so far: {}",
                    self.what,
                    describe(&msgs)
                ),
            }
        }
    }

    /// Sends `bytes`, then reads `n` ReadyForQuery-terminated answers.
    pub fn roundtrip(&mut self, bytes: &[u8], n: usize) -> Vec<Message> {
        self.send(bytes);
        (0..n).flat_map(|_| self.until_ready()).collect()
    }

    /// A simple query that must succeed; returns the first column of each row.
    pub fn ok(&mut self, sql: &str) -> Vec<String> {
        let msgs = self.roundtrip(&query(sql), 1);
        assert!(
            errors(&msgs).is_empty(),
            "{}: {sql:?} failed: {}",
            self.what,
            describe(&msgs)
        );
        rows(&msgs)
    }
}

fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
    )
}
