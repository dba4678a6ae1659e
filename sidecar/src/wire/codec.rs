//! Decoders for the messages the proxy reads, and encoders for the ones it writes.
//!
//! Reading is done here with a strict cursor, never with pgwire's decoders: those
//! panic on some malformed bodies (an ErrorResponse without its terminator,
//! a 'p' of length 3) and decode text lossily. Every decoder takes exactly one
//! framed body and fails on missing terminators, invalid UTF-8 or leftover bytes.
//! Writing uses pgwire's message types (DESIGN §7) so encodings stay standard.

use bytes::{BufMut, Bytes, BytesMut};
use pgwire::messages::{
    extendedquery::Parse as ParseMessage,
    response::{ErrorResponse, NoticeResponse, ReadyForQuery, TransactionStatus},
    simplequery::Query,
    startup::{
        Authentication, BackendKeyData, NegotiateProtocolVersion, ParameterStatus, Password,
        SASLInitialResponse, SASLResponse, SecretKey,
    },
    terminate::Terminate,
    Message,
};

use super::pg_error::PgError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message truncated")]
    Truncated,
    #[error("string is not NUL-terminated")]
    MissingNul,
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    #[error("{0} unexpected trailing bytes")]
    Trailing(usize),
    #[error("{0}")]
    Invalid(&'static str),
}

/// A bounds-checked cursor over one message body.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.bytes(1)?[0])
    }

    pub fn i16(&mut self) -> Result<i16, DecodeError> {
        let b = self.bytes(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub fn i32(&mut self) -> Result<i32, DecodeError> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A NUL-terminated byte string (without the NUL).
    pub fn cstr_bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::MissingNul)?;
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    pub fn cstr(&mut self) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.cstr_bytes()?).map_err(|_| DecodeError::InvalidUtf8)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// Every decoder ends here: bytes after the last field are an error, not
    /// something to ignore (they could be a second message smuggled in one frame).
    pub fn finish(self) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

// === frontend messages ===

/// Body of a Query ('Q'): exactly one NUL-terminated UTF-8 string.
pub fn query_text(body: &[u8]) -> Result<&str, DecodeError> {
    let mut r = Reader::new(body);
    let sql = r.cstr()?;
    r.finish()?;
    Ok(sql)
}

/// The parts of a Parse ('P') the proxy needs.
#[derive(PartialEq, Eq)]
pub struct Parse<'a> {
    pub statement: &'a str,
    pub query: &'a str,
    pub param_types: Vec<u32>,
}

pub fn parse(body: &[u8]) -> Result<Parse<'_>, DecodeError> {
    let mut r = Reader::new(body);
    let statement = r.cstr()?;
    let query = r.cstr()?;
    let n = r.i16()?;
    let n = usize::try_from(n).map_err(|_| DecodeError::Invalid("negative parameter count"))?;
    // Each type OID is 4 bytes: check before allocating for a peer-supplied count.
    let raw = r.bytes(n.checked_mul(4).ok_or(DecodeError::Truncated)?)?;
    r.finish()?;
    let param_types = raw
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(Parse {
        statement,
        query,
        param_types,
    })
}

/// Close ('C'): 'S' (statement) or 'P' (portal), and the name.
pub fn close(body: &[u8]) -> Result<(u8, &str), DecodeError> {
    let mut r = Reader::new(body);
    let kind = r.u8()?;
    if kind != b'S' && kind != b'P' {
        return Err(DecodeError::Invalid("Close kind must be 'S' or 'P'"));
    }
    let name = r.cstr()?;
    r.finish()?;
    Ok((kind, name))
}

/// Describe ('D'): 'S' (statement) or 'P' (portal), and the name. Same
/// shape as Close.
pub fn describe(body: &[u8]) -> Result<(u8, &str), DecodeError> {
    close(body)
}

/// The names a Bind ('B') connects: (portal, statement). The rest (parameter
/// formats and values, result formats) is checked for shape only: the
/// server reads it, and the proxy learns result formats from Describe.
pub fn bind_names(body: &[u8]) -> Result<(&str, &str), DecodeError> {
    let mut r = Reader::new(body);
    let portal = r.cstr()?;
    let statement = r.cstr()?;
    Ok((portal, statement))
}

/// A Bind's parameters, for a statement held for approval: each value
/// with its format code (0 text, 1 binary; None is SQL NULL).
pub type BindParam<'a> = (i16, Option<&'a [u8]>);

/// Bind ('B') in full.
pub struct Bind<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    pub params: Vec<BindParam<'a>>,
    /// Result format codes: none (all text), one for all, or one per column.
    pub result_formats: Vec<i16>,
}

pub fn bind_params(body: &[u8]) -> Result<Bind<'_>, DecodeError> {
    let mut r = Reader::new(body);
    let portal = r.cstr()?;
    let statement = r.cstr()?;
    let nfmt = usize::try_from(r.i16()?)
        .map_err(|_| DecodeError::Invalid("negative parameter format count"))?;
    let mut formats = Vec::with_capacity(nfmt.min(64));
    for _ in 0..nfmt {
        formats.push(r.i16()?);
    }
    let n =
        usize::try_from(r.i16()?).map_err(|_| DecodeError::Invalid("negative parameter count"))?;
    if nfmt > 1 && nfmt != n {
        return Err(DecodeError::Invalid(
            "parameter format count matches neither 0, 1 nor the parameter count",
        ));
    }
    let mut params = Vec::with_capacity(n.min(1024));
    for i in 0..n {
        let format = match nfmt {
            0 => 0,
            1 => formats[0],
            _ => formats[i],
        };
        let len = r.i32()?;
        let value = match len {
            -1 => None,
            l if l < 0 => return Err(DecodeError::Invalid("negative parameter length")),
            l => Some(r.bytes(l as usize)?),
        };
        params.push((format, value));
    }
    let nres = usize::try_from(r.i16()?)
        .map_err(|_| DecodeError::Invalid("negative result format count"))?;
    let raw = r.bytes(nres.checked_mul(2).ok_or(DecodeError::Truncated)?)?;
    r.finish()?;
    let result_formats = raw
        .chunks_exact(2)
        .map(|c| i16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok(Bind {
        portal,
        statement,
        params,
        result_formats,
    })
}

/// Execute ('E'): the portal name (and a row limit the proxy does not need).
pub fn execute_portal(body: &[u8]) -> Result<&str, DecodeError> {
    let mut r = Reader::new(body);
    let portal = r.cstr()?;
    r.i32()?;
    r.finish()?;
    Ok(portal)
}

/// A PasswordMessage carrying a cleartext password (or token).
pub fn password(body: &[u8]) -> Result<&str, DecodeError> {
    let mut r = Reader::new(body);
    let p = r.cstr()?;
    r.finish()?;
    Ok(p)
}

// === backend messages ===

/// Authentication request from the upstream server ('R').
#[derive(Debug, PartialEq, Eq)]
pub enum AuthRequest<'a> {
    Ok,
    Cleartext,
    Md5 { salt: [u8; 4] },
    Sasl { mechanisms: Vec<&'a str> },
    SaslContinue(&'a [u8]),
    SaslFinal(&'a [u8]),
    Unsupported(i32),
}

pub fn auth_request(body: &[u8]) -> Result<AuthRequest<'_>, DecodeError> {
    let mut r = Reader::new(body);
    let req = match r.i32()? {
        0 => AuthRequest::Ok,
        3 => AuthRequest::Cleartext,
        5 => {
            let s = r.bytes(4)?;
            AuthRequest::Md5 {
                salt: [s[0], s[1], s[2], s[3]],
            }
        }
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                let m = r.cstr()?;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(m);
            }
            AuthRequest::Sasl { mechanisms }
        }
        11 => AuthRequest::SaslContinue(r.rest()),
        12 => AuthRequest::SaslFinal(r.rest()),
        other => {
            r.rest();
            AuthRequest::Unsupported(other)
        }
    };
    r.finish()?;
    Ok(req)
}

/// DataRow ('D'): the column values, None for SQL NULL.
pub fn data_row(body: &[u8]) -> Result<Vec<Option<&[u8]>>, DecodeError> {
    let mut r = Reader::new(body);
    let n = r.i16()?;
    let n = usize::try_from(n).map_err(|_| DecodeError::Invalid("negative column count"))?;
    // Each column needs at least its 4-byte length: bound the allocation.
    if n > body.len() / 4 {
        return Err(DecodeError::Truncated);
    }
    let mut cols = Vec::with_capacity(n);
    for _ in 0..n {
        let len = r.i32()?;
        cols.push(match len {
            -1 => None,
            l if l >= 0 => Some(r.bytes(l as usize)?),
            _ => return Err(DecodeError::Invalid("negative column length")),
        });
    }
    r.finish()?;
    Ok(cols)
}

/// Where a result column comes from and how it travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldInfo {
    /// The table it is a plain reference to, or 0.
    pub table_oid: u32,
    /// Its attribute number there (0 for a whole row or no table).
    pub attnum: i16,
    pub type_oid: u32,
    /// Format code 1: binary.
    pub binary: bool,
}

/// RowDescription ('T'): per field its name (skipped), origin, type and format.
pub fn row_description(body: &[u8]) -> Result<Vec<FieldInfo>, DecodeError> {
    row_fields(body, |_, info| info)
}

/// Walk a RowDescription's fields: `f` gets each field's name bytes and its
/// origin, type and format. The one reader of the message: its counts and
/// format codes are checked here for every caller.
fn row_fields<T>(
    body: &[u8],
    mut f: impl FnMut(&[u8], FieldInfo) -> T,
) -> Result<Vec<T>, DecodeError> {
    let mut r = Reader::new(body);
    let n = usize::try_from(r.i16()?).map_err(|_| DecodeError::Invalid("negative field count"))?;
    // Each field is at least 19 bytes: bound the allocation.
    if n > body.len() / 19 {
        return Err(DecodeError::Truncated);
    }
    let mut fields = Vec::with_capacity(n);
    for _ in 0..n {
        let name = r.cstr_bytes()?;
        let table_oid = r.i32()? as u32;
        let attnum = r.i16()?;
        let type_oid = r.i32()? as u32;
        r.i16()?; // typlen
        r.i32()?; // typmod
        let binary = match r.i16()? {
            0 => false,
            1 => true,
            _ => return Err(DecodeError::Invalid("unknown format code")),
        };
        fields.push(f(
            name,
            FieldInfo {
                table_oid,
                attnum,
                type_oid,
                binary,
            },
        ));
    }
    r.finish()?;
    Ok(fields)
}

/// ParameterDescription ('t'): the parameter type OIDs.
pub fn parameter_description(body: &[u8]) -> Result<Vec<u32>, DecodeError> {
    let mut r = Reader::new(body);
    let n = usize::try_from(r.i16()?).map_err(|_| DecodeError::Invalid("negative count"))?;
    let raw = r.bytes(n.checked_mul(4).ok_or(DecodeError::Truncated)?)?;
    r.finish()?;
    Ok(raw
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// A result column as a person reads it: name, type, binary or text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    pub binary: bool,
}

/// RowDescription ('T') with the names (for recordings).
pub fn row_columns(body: &[u8]) -> Result<Vec<Column>, DecodeError> {
    row_fields(body, |name, info| Column {
        name: String::from_utf8_lossy(name).into_owned(),
        type_oid: info.type_oid,
        binary: info.binary,
    })
}

pub fn parameter_status(body: &[u8]) -> Result<(&str, &str), DecodeError> {
    let mut r = Reader::new(body);
    let name = r.cstr()?;
    let value = r.cstr()?;
    r.finish()?;
    Ok((name, value))
}

/// BackendKeyData: pid and the secret (4 bytes in protocol 3.0).
pub fn backend_key_data(body: &[u8]) -> Result<(i32, Vec<u8>), DecodeError> {
    let mut r = Reader::new(body);
    let pid = r.i32()?;
    let secret = r.rest().to_vec();
    if secret.len() < 4 {
        return Err(DecodeError::Invalid("cancel key shorter than 4 bytes"));
    }
    Ok((pid, secret))
}

pub fn ready_for_query(body: &[u8]) -> Result<TxStatus, DecodeError> {
    let mut r = Reader::new(body);
    let s = TxStatus::from_byte(r.u8()?).ok_or(DecodeError::Invalid("bad transaction status"))?;
    r.finish()?;
    Ok(s)
}

/// Fields of an ErrorResponse/NoticeResponse as (code, text). Text is decoded
/// lossily: it is only ever shown to a human, never used for a decision.
/// CommandComplete ('C'): the command tag (`DELETE 3`).
pub fn command_tag(body: &[u8]) -> Result<&str, DecodeError> {
    let mut r = Reader::new(body);
    let tag = r.cstr()?;
    r.finish()?;
    Ok(tag)
}

pub fn notice_fields(body: &[u8]) -> Result<Vec<(u8, String)>, DecodeError> {
    let mut r = Reader::new(body);
    let mut fields = Vec::new();
    loop {
        let code = r.u8()?;
        if code == 0 {
            break;
        }
        let v = r.cstr_bytes()?;
        fields.push((code, String::from_utf8_lossy(v).into_owned()));
    }
    r.finish()?;
    Ok(fields)
}

/// Transaction status carried by ReadyForQuery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TxStatus {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InTransaction),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }

    fn to_pgwire(self) -> TransactionStatus {
        match self {
            TxStatus::Idle => TransactionStatus::Idle,
            TxStatus::InTransaction => TransactionStatus::Transaction,
            TxStatus::Failed => TransactionStatus::Error,
        }
    }
}

// === encoders ===
//
// pgwire only fails to encode when a message exceeds its own size limit; the
// messages built here are small and bounded, so a failure is a bug of ours.

fn put<M: Message>(m: &M, out: &mut BytesMut) {
    if let Err(e) = m.encode(out) {
        tracing::error!(error = %e, "encoding a proxy-built message failed");
    }
}

pub fn put_error(err: &PgError, out: &mut BytesMut) {
    put(&ErrorResponse::new(err.fields()), out);
}

/// An ErrorResponse or NoticeResponse from raw fields (a rewritten server
/// message whose SQLSTATE is the server's own).
pub fn put_error_fields(notice: bool, fields: Vec<(u8, String)>, out: &mut BytesMut) {
    if notice {
        put(&NoticeResponse::new(fields), out);
    } else {
        put(&ErrorResponse::new(fields), out);
    }
}

/// Describe of a portal, as the proxy injects it to learn result formats.
pub fn put_describe_portal(portal: &str, out: &mut BytesMut) {
    out.put_u8(b'D');
    out.put_i32((4 + 1 + portal.len() + 1) as i32);
    out.put_u8(b'P');
    out.put_slice(portal.as_bytes());
    out.put_u8(0);
}

/// A DataRow from column values (None = NULL).
pub fn put_data_row<'a>(
    cols: impl ExactSizeIterator<Item = Option<&'a [u8]>> + Clone,
    out: &mut BytesMut,
) {
    let len: usize = 4
        + 2
        + cols
            .clone()
            .map(|c| 4 + c.map_or(0, <[u8]>::len))
            .sum::<usize>();
    out.put_u8(b'D');
    out.put_i32(len as i32);
    out.put_i16(cols.len() as i16);
    for c in cols {
        match c {
            None => out.put_i32(-1),
            Some(v) => {
                out.put_i32(v.len() as i32);
                out.put_slice(v);
            }
        }
    }
}

pub fn put_notice(err: &PgError, out: &mut BytesMut) {
    put(&NoticeResponse::new(err.fields()), out);
}

pub fn put_auth_ok(out: &mut BytesMut) {
    put(&Authentication::Ok, out);
}

pub fn put_auth_cleartext_request(out: &mut BytesMut) {
    put(&Authentication::CleartextPassword, out);
}

pub fn put_parameter_status(name: &str, value: &str, out: &mut BytesMut) {
    put(&ParameterStatus::new(name.into(), value.into()), out);
}

pub fn put_backend_key_data(pid: i32, secret: i32, out: &mut BytesMut) {
    put(&BackendKeyData::new(pid, SecretKey::I32(secret)), out);
}

pub fn put_ready_for_query(status: TxStatus, out: &mut BytesMut) {
    put(&ReadyForQuery::new(status.to_pgwire()), out);
}

pub fn put_negotiate_protocol_version(minor: i32, unsupported: Vec<String>, out: &mut BytesMut) {
    put(&NegotiateProtocolVersion::new(minor, unsupported), out);
}

pub fn put_query(sql: &str, out: &mut BytesMut) {
    put(&Query::new(sql.into()), out);
}

/// Parse of `query` under `statement`, declaring no parameter types (the
/// refusal sentinel: a refused Parse keeps the client's statement name, so a
/// later Bind to it fails as it should).
pub fn put_parse(statement: &str, query: &str, out: &mut BytesMut) {
    put(
        &ParseMessage::new(Some(statement.into()), query.into(), Vec::new()),
        out,
    );
}

/// Terminate: the proxy's goodbye to the server, so it logs no unexpected EOF.
pub fn put_terminate(out: &mut BytesMut) {
    put(&Terminate::new(), out);
}

pub fn put_password(password: &str, out: &mut BytesMut) {
    put(&Password::new(password.into()), out);
}

pub fn put_sasl_initial(mechanism: &str, data: &[u8], out: &mut BytesMut) {
    put(
        &SASLInitialResponse::new(mechanism.into(), Some(Bytes::copy_from_slice(data))),
        out,
    );
}

pub fn put_sasl_response(data: &[u8], out: &mut BytesMut) {
    put(&SASLResponse::new(Bytes::copy_from_slice(data)), out);
}

/// Protocol codes carried in the first word of a startup-phase packet.
pub const PROTOCOL_3_0: i32 = 196_608;
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;

/// StartupMessage for protocol 3.0 with the given parameters, in order.
pub fn put_startup(params: &[(String, String)], out: &mut BytesMut) {
    let body_len: usize = 4
        + params
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2)
            .sum::<usize>()
        + 1;
    out.put_i32((4 + body_len) as i32);
    out.put_i32(PROTOCOL_3_0);
    for (k, v) in params {
        out.put_slice(k.as_bytes());
        out.put_u8(0);
        out.put_slice(v.as_bytes());
        out.put_u8(0);
    }
    out.put_u8(0);
}

pub fn put_ssl_request(out: &mut BytesMut) {
    out.put_i32(8);
    out.put_i32(SSL_REQUEST);
}

pub fn put_cancel_request(pid: i32, secret: &[u8], out: &mut BytesMut) {
    out.put_i32((12 + secret.len()) as i32);
    out.put_i32(CANCEL_REQUEST);
    out.put_i32(pid);
    out.put_slice(secret);
}

/// A startup-phase packet from a client, decoded.
#[derive(PartialEq, Eq)]
pub enum StartupPacket {
    Ssl,
    GssEnc,
    Cancel {
        pid: i32,
        secret: Vec<u8>,
    },
    Startup {
        minor: u16,
        params: Vec<(String, String)>,
    },
    UnsupportedVersion(i32),
}

// Debug must not print parameter values (they could include a password via
// `options`); the names are enough to diagnose.
impl std::fmt::Debug for StartupPacket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartupPacket::Ssl => f.write_str("SSLRequest"),
            StartupPacket::GssEnc => f.write_str("GSSENCRequest"),
            StartupPacket::Cancel { .. } => f.write_str("CancelRequest"),
            StartupPacket::Startup { minor, params } => f
                .debug_struct("Startup")
                .field("minor", minor)
                .field("params", &params.iter().map(|(k, _)| k).collect::<Vec<_>>())
                .finish(),
            StartupPacket::UnsupportedVersion(v) => write!(f, "UnsupportedVersion({v})"),
        }
    }
}

/// Decode a whole startup-phase packet (length word included).
pub fn startup_packet(packet: &[u8]) -> Result<StartupPacket, DecodeError> {
    let mut r = Reader::new(packet);
    r.i32()?; // length, already checked by framing
    let code = r.i32()?;
    let pkt = match code {
        SSL_REQUEST => StartupPacket::Ssl,
        GSSENC_REQUEST => StartupPacket::GssEnc,
        CANCEL_REQUEST => {
            let pid = r.i32()?;
            let secret = r.rest().to_vec();
            if !(4..=256).contains(&secret.len()) {
                return Err(DecodeError::Invalid("bad cancel key length"));
            }
            StartupPacket::Cancel { pid, secret }
        }
        v if v >> 16 == 3 => {
            let mut params: Vec<(String, String)> = Vec::new();
            loop {
                let k = r.cstr()?;
                if k.is_empty() {
                    break;
                }
                let v = r.cstr()?;
                if params.iter().any(|(pk, _)| pk == k) {
                    return Err(DecodeError::Invalid("duplicate startup parameter"));
                }
                params.push((k.to_owned(), v.to_owned()));
            }
            StartupPacket::Startup {
                minor: (v & 0xffff) as u16,
                params,
            }
        }
        other => {
            r.rest();
            StartupPacket::UnsupportedVersion(other)
        }
    };
    r.finish()?;
    Ok(pkt)
}

#[cfg(test)]
mod tests;
