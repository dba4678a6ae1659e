//! Framing: type byte + int32 length, checked against a cap for that type before
//! a single byte of the body is trusted or any memory is reserved for it.
//!
//! `cut` is sans-IO: it looks at a buffer and says "here is one whole message",
//! "need more bytes", or "this can never be a valid message".

use std::fmt;

/// Which peer produced the bytes. Type bytes mean different things in each
/// direction ('D' is Describe from a client and DataRow from a server).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client → proxy, after the startup packet.
    Frontend,
    /// Upstream server → proxy.
    Backend,
}

/// Size caps. `large` bounds messages that legitimately carry big payloads
/// (queries, bind parameters, COPY data, data rows); everything else is small.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub large: usize,
}

/// Messages with no body beyond the length word.
const EMPTY: usize = 4;
/// Control messages (Describe, Close, Execute, ParameterStatus...) carry a name
/// or two; PostgreSQL identifiers are 63 bytes, so 64 KiB is generous.
const SMALL: usize = 64 * 1024;
/// Startup packets: the same cap PostgreSQL applies (MAX_STARTUP_PACKET_LENGTH).
pub const STARTUP_MAX: usize = 10_000;

impl Default for Limits {
    fn default() -> Self {
        // 64 MiB keeps a sidecar's worst-case buffer bounded while allowing large
        // bind parameters and rows; PostgreSQL's own limit is 1 GiB.
        Limits {
            large: 64 * 1024 * 1024,
        }
    }
}

impl Limits {
    /// Allowed total length (including the length word) for a message type,
    /// as (min, max). `None` means the type is not valid in that direction.
    fn bounds(&self, dir: Direction, ty: u8) -> Option<(usize, usize)> {
        let large = self.large.max(SMALL);
        let b = match dir {
            Direction::Frontend => match ty {
                // Sync, Flush, Terminate, CopyDone
                b'S' | b'H' | b'X' | b'c' => (EMPTY, EMPTY),
                // Query, Parse, Bind, FunctionCall: SQL text and parameters
                b'Q' | b'P' | b'B' | b'F' => (EMPTY + 1, large),
                b'd' => (EMPTY, large),
                b'f' => (EMPTY + 1, SMALL),
                // Describe, Close: kind byte + name
                b'D' | b'C' => (EMPTY + 2, SMALL),
                // Execute: portal name + int32 row limit
                b'E' => (EMPTY + 5, SMALL),
                // PasswordMessage / SASL responses (a JWT is a few KiB)
                b'p' => (EMPTY + 1, SMALL),
                _ => return None,
            },
            Direction::Backend => match ty {
                // ParseComplete, BindComplete, CloseComplete, NoData,
                // PortalSuspended, EmptyQueryResponse, CopyDone
                b'1' | b'2' | b'3' | b'n' | b's' | b'I' | b'c' => (EMPTY, EMPTY),
                b'Z' => (EMPTY + 1, EMPTY + 1),
                b'K' => (EMPTY + 8, EMPTY + 256 + 4),
                b'R' => (EMPTY + 4, SMALL),
                b'S' | b'C' => (EMPTY + 2, SMALL),
                b'v' => (EMPTY + 8, SMALL),
                b'A' => (EMPTY + 6, large),
                b'E' | b'N' => (EMPTY + 1, large),
                b'T' | b't' => (EMPTY + 2, large),
                b'D' => (EMPTY + 2, large),
                b'd' | b'V' => (EMPTY, large),
                b'G' | b'H' | b'W' => (EMPTY + 3, SMALL),
                _ => return None,
            },
        };
        Some(b)
    }
}

/// A whole message found at the start of a buffer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub ty: u8,
    /// Bytes on the wire: type byte + length word + body.
    pub wire_len: usize,
}

impl Frame {
    /// The body of this frame within the buffer it was cut from.
    pub fn body<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[5..self.wire_len]
    }
}

// Debug prints type and size only: bodies hold SQL, parameters and row values.
impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Frame({:?}, {} bytes)",
            char::from(self.ty),
            self.wire_len
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unexpected message type 0x{0:02x}")]
    UnknownType(u8),
    #[error("message type '{ty}' has invalid length {len} (allowed {min}..={max})")]
    BadLength {
        ty: char,
        len: i64,
        min: usize,
        max: usize,
    },
    #[error("invalid startup packet length {0}")]
    BadStartupLength(i64),
}

/// Look at the start of `buf`: one whole valid-length message, `Ok(None)` when
/// more bytes are needed, or an error as soon as the header alone proves the
/// message invalid (so a hostile length is refused before we wait for its body).
pub fn cut(buf: &[u8], dir: Direction, limits: &Limits) -> Result<Option<Frame>, FrameError> {
    let Some(&ty) = buf.first() else {
        return Ok(None);
    };
    let (min, max) = limits.bounds(dir, ty).ok_or(FrameError::UnknownType(ty))?;
    let Some(len_bytes) = buf.get(1..5) else {
        return Ok(None);
    };
    let len = i32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
    let len_us = usize::try_from(len)
        .ok()
        .filter(|l| (min..=max).contains(l));
    let Some(len_us) = len_us else {
        return Err(FrameError::BadLength {
            ty: char::from(ty),
            len: i64::from(len),
            min,
            max,
        });
    };
    let wire_len = len_us + 1;
    if buf.len() < wire_len {
        return Ok(None);
    }
    Ok(Some(Frame { ty, wire_len }))
}

/// How many more bytes the message at the start of `buf` needs (0 if whole or
/// unknown yet). Used to reserve buffer space once the length passed `cut`.
pub fn missing(buf: &[u8]) -> usize {
    match buf.get(1..5) {
        Some(l) => {
            let len = i32::from_be_bytes([l[0], l[1], l[2], l[3]]);
            usize::try_from(len)
                .map(|l| (l + 1).saturating_sub(buf.len()))
                .unwrap_or(0)
        }
        None => 0,
    }
}

/// Startup-phase packets have no type byte: int32 length (including itself)
/// then the body. Returns the whole packet length when complete.
pub fn cut_startup(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    let Some(l) = buf.get(0..4) else {
        return Ok(None);
    };
    let len = i32::from_be_bytes([l[0], l[1], l[2], l[3]]);
    match usize::try_from(len) {
        Ok(n) if (8..=STARTUP_MAX).contains(&n) => Ok((buf.len() >= n).then_some(n)),
        _ => Err(FrameError::BadStartupLength(i64::from(len))),
    }
}

#[cfg(test)]
mod tests;
