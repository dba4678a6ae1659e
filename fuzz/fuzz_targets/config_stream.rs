//! The config stream from the operator, as the sidecar reads it: the line
//! decoder over arbitrarily cut reads, then each line's event, and a
//! snapshot's build. Never a panic; the lines are those of a plain split
//! (blank lines skipped, CR stripped) until a line passes the bound; an
//! event survives re-encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgwarden_api::stream::{decode_event, encode_event, LineDecoder, StreamEvent};
use pgwarden_sidecar::config::stream::build_streamed;
use pgwarden_sidecar::config::LoadOptions;

/// Small, so the bound is reachable.
const MAX: usize = 512;

fuzz_target!(|data: &[u8]| {
    let Some((&step, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut dec = LineDecoder::new(MAX);
    let mut lines = Vec::new();
    let mut too_long = false;
    'read: for chunk in stream.chunks(step) {
        dec.push(chunk);
        loop {
            match dec.next_line() {
                Ok(Some(line)) => lines.push(line),
                Ok(None) => break,
                Err(_) => {
                    too_long = true;
                    break 'read;
                }
            }
        }
        assert!(dec.pending() <= MAX, "buffered past the bound");
    }
    // The same stream split in one go.
    let mut expected = Vec::new();
    let mut parts: Vec<&[u8]> = stream.split(|&b| b == b'\n').collect();
    let tail = parts.pop().unwrap_or_default();
    let mut expect_too_long = tail.len() > MAX;
    for p in parts {
        if p.len() > MAX {
            expect_too_long = true;
            break;
        }
        let p = p.strip_suffix(b"\r").unwrap_or(p);
        if !p.iter().all(u8::is_ascii_whitespace) {
            expected.push(p.to_vec());
        }
    }
    if too_long {
        assert!(expect_too_long, "a line within the bound was refused");
        assert!(expected.starts_with(&lines));
    } else {
        assert!(!expect_too_long, "a line past the bound was taken");
        assert_eq!(lines, expected);
    }

    for line in lines.iter().take(8) {
        let Ok(event) = decode_event(line) else {
            continue;
        };
        let again = encode_event(&event);
        assert_eq!(again.last(), Some(&b'\n'));
        assert_eq!(
            decode_event(&again[..again.len() - 1]).as_ref(),
            Ok(&event),
            "an event changed on re-encoding"
        );
        if let StreamEvent::Snapshot { snapshot } = &event {
            // A jwksFile is read whole from the sidecar's disk (it could
            // name /dev/zero): the operator never sends one, skip it here.
            let names_files = snapshot.policies.iter().any(|p| {
                p.spec
                    .identity
                    .oidc
                    .as_ref()
                    .is_some_and(|o| o.jwks_file.is_some())
            });
            if !names_files {
                let _ = build_streamed(snapshot, &LoadOptions::default());
            }
        }
    }
});
