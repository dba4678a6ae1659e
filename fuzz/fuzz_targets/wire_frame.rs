//! Framing and every message decoder on arbitrary peer bytes, in both
//! directions: never a panic, frames never longer than the buffer, and a
//! stream cut in one go yields the same frames as one fed in pieces.
#![no_main]

use std::future::Future;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgwarden_sidecar::masking::plan::scrub;
use pgwarden_sidecar::wire::codec;
use pgwarden_sidecar::wire::conn::FrameBuf;
use pgwarden_sidecar::wire::frame::{self, Direction, Frame, Limits};

// Small caps so lengths near the bound are reachable with short inputs.
const LIMITS: Limits = Limits { large: 4096 };

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let dir = if mode & 1 == 0 {
        Direction::Frontend
    } else {
        Direction::Backend
    };
    let whole = cut_all(rest, dir);
    // The same bytes arriving in pieces (sizes from the mode byte).
    let step = usize::from(mode >> 1).max(1);
    let mut fb = FrameBuf::new(dir, LIMITS);
    let mut pieces = Vec::new();
    let mut error = false;
    for chunk in rest.chunks(step) {
        let mut src = chunk;
        while !src.is_empty() {
            fill_now(&mut fb, &mut src);
        }
        loop {
            match fb.cut() {
                Ok(Some(f)) => {
                    let bytes = fb.take(f);
                    assert_eq!(bytes.len(), f.wire_len);
                    pieces.push(bytes.to_vec());
                }
                Ok(None) => break,
                Err(_) => {
                    error = true;
                    break;
                }
            }
        }
        if error {
            break;
        }
    }
    assert_eq!(whole.0, pieces, "frames differ when fed in pieces");
    assert_eq!(whole.1, error, "an error in one way only");
});

/// `FrameBuf::fill` from a slice: a slice is always ready, so one poll
/// with a no-op waker completes it.
fn fill_now(fb: &mut FrameBuf, src: &mut &[u8]) {
    let mut fut = std::pin::pin!(fb.fill(src));
    let mut cx = Context::from_waker(Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(r) => {
            r.expect("reading from a slice");
        }
        Poll::Pending => panic!("a slice read is never pending"),
    }
}

/// Every frame at the front of `buf` (decoding each), and whether the first
/// non-frame was an error.
fn cut_all(mut buf: &[u8], dir: Direction) -> (Vec<Vec<u8>>, bool) {
    let mut out = Vec::new();
    loop {
        match frame::cut(buf, dir, &LIMITS) {
            Ok(Some(f)) => {
                assert!(f.wire_len >= 5 && f.wire_len <= buf.len());
                assert_eq!(frame::missing(&buf[..f.wire_len]), 0);
                decode(dir, f, buf);
                out.push(buf[..f.wire_len].to_vec());
                buf = &buf[f.wire_len..];
            }
            Ok(None) => return (out, false),
            Err(_) => return (out, true),
        }
    }
}

fn decode(dir: Direction, f: Frame, buf: &[u8]) {
    let body = f.body(buf);
    match (dir, f.ty) {
        (Direction::Frontend, b'Q') => {
            let _ = codec::query_text(body);
        }
        (Direction::Frontend, b'P') => {
            let _ = codec::parse(body);
        }
        (Direction::Frontend, b'B') => {
            let names = codec::bind_names(body);
            if let Ok(b) = codec::bind_params(body) {
                assert_eq!(names, Ok((b.portal, b.statement)));
            }
        }
        (Direction::Frontend, b'D' | b'C') => {
            let _ = codec::describe(body);
        }
        (Direction::Frontend, b'E') => {
            let _ = codec::execute_portal(body);
        }
        (Direction::Frontend, b'p') => {
            let _ = codec::password(body);
        }
        (Direction::Backend, b'R') => {
            let _ = codec::auth_request(body);
        }
        (Direction::Backend, b'D') => {
            if let Ok(cols) = codec::data_row(body) {
                // Re-encoding a decoded row gives back the same message.
                let mut again = BytesMut::new();
                codec::put_data_row(cols.iter().copied(), &mut again);
                assert_eq!(&again[..], &buf[..f.wire_len]);
            }
        }
        (Direction::Backend, b'T') => {
            let fields = codec::row_description(body);
            let columns = codec::row_columns(body);
            assert_eq!(fields.is_ok(), columns.is_ok());
        }
        (Direction::Backend, b't') => {
            let _ = codec::parameter_description(body);
        }
        (Direction::Backend, b'S') => {
            let _ = codec::parameter_status(body);
        }
        (Direction::Backend, b'K') => {
            let _ = codec::backend_key_data(body);
        }
        (Direction::Backend, b'Z') => {
            let _ = codec::ready_for_query(body);
        }
        (Direction::Backend, b'C') => {
            let _ = codec::command_tag(body);
        }
        (Direction::Backend, b'E' | b'N') => {
            let _ = codec::notice_fields(body);
            // What masking sends instead: always a well-formed message.
            let mut out = BytesMut::new();
            if scrub(f.ty == b'N', body, &mut out).is_ok() {
                let g = frame::cut(&out, Direction::Backend, &Limits::default())
                    .expect("scrub writes a valid frame")
                    .expect("scrub writes a whole frame");
                assert_eq!(g.wire_len, out.len());
                codec::notice_fields(g.body(&out)).expect("scrub's fields decode");
            }
        }
        _ => {}
    }
}
