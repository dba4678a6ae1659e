//! A read buffer that yields whole frames: the I/O half of framing.
//!
//! Like mini-redis's `Connection::read_frame`: try to cut a frame from what is
//! buffered, otherwise read more. "Not enough bytes yet" is the normal case, not
//! an error; EOF in the middle of a frame is.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::frame::{self, Direction, Frame, FrameError, Limits};

/// First read size. Idle sessions stay this small (hundreds of idle clients
/// must not cost hundreds of megabytes); a stream that keeps filling its reads
/// doubles the size up to `MAX_READ_CHUNK`, where big results flow through.
pub const READ_CHUNK: usize = 8 * 1024;
pub const MAX_READ_CHUNK: usize = 128 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("connection closed in the middle of a message")]
    TruncatedAtEof,
}

pub struct FrameBuf {
    buf: BytesMut,
    dir: Direction,
    limits: Limits,
    read_size: usize,
}

impl FrameBuf {
    pub fn new(dir: Direction, limits: Limits) -> Self {
        FrameBuf {
            buf: BytesMut::with_capacity(READ_CHUNK),
            dir,
            limits,
            read_size: READ_CHUNK,
        }
    }

    /// Start from bytes already read by an earlier phase.
    pub fn with_bytes(dir: Direction, limits: Limits, bytes: BytesMut) -> Self {
        let mut b = Self::new(dir, limits);
        b.buf.extend_from_slice(&bytes);
        b
    }

    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// A whole frame at the front of the buffer, if there is one.
    pub fn cut(&self) -> Result<Option<Frame>, FrameError> {
        frame::cut(&self.buf, self.dir, &self.limits)
    }

    /// Drop `n` bytes from the front (a frame that was handled).
    pub fn consume(&mut self, n: usize) {
        self.buf.advance(n);
    }

    /// Remove and return a frame's bytes.
    pub fn take(&mut self, frame: Frame) -> BytesMut {
        self.buf.split_to(frame.wire_len)
    }

    /// Read more bytes. Ok(false) on a clean EOF (nothing partial buffered).
    pub async fn fill<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<bool, ReadError> {
        // The header already passed `cut`, so the length is within the cap and
        // reserving for it is bounded.
        if self.buf.is_empty() && self.buf.capacity() > 4 * MAX_READ_CHUNK {
            // A huge message passed; do not keep its memory for the session.
            self.buf = BytesMut::with_capacity(self.read_size);
        }
        let want = frame::missing(&self.buf).max(self.read_size);
        self.buf.reserve(want);
        let room = self.buf.capacity() - self.buf.len();
        let n = r.read_buf(&mut self.buf).await?;
        if n == room && self.read_size < MAX_READ_CHUNK {
            self.read_size *= 2;
        }
        if n == 0 {
            return if self.buf.is_empty() {
                Ok(false)
            } else {
                Err(ReadError::TruncatedAtEof)
            };
        }
        Ok(true)
    }

    /// The next whole frame, reading as needed; None on clean EOF.
    pub async fn next<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
    ) -> Result<Option<(Frame, BytesMut)>, ReadError> {
        loop {
            if let Some(f) = self.cut()? {
                return Ok(Some((f, self.take(f))));
            }
            if !self.fill(r).await? {
                return Ok(None);
            }
        }
    }

    pub fn into_bytes(self) -> BytesMut {
        self.buf
    }
}
