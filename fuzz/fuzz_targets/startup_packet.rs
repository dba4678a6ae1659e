//! The startup packet (the first bytes any client sends, before it is
//! authenticated): framing, decoding and the parameter filter. Never a
//! panic; a decoded StartupMessage re-encodes to the same parameters; the
//! filter passes only allowlisted settings, with pgwarden's pins last.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgwarden_sidecar::policy::catalog::STARTUP_SETTINGS;
use pgwarden_sidecar::session::filter_params;
use pgwarden_sidecar::wire::codec::{self, StartupPacket};
use pgwarden_sidecar::wire::frame;

fuzz_target!(|data: &[u8]| {
    let Ok(Some(len)) = frame::cut_startup(data) else {
        return;
    };
    assert!((8..=frame::STARTUP_MAX).contains(&len) && len <= data.len());
    let Ok(packet) = codec::startup_packet(&data[..len]) else {
        return;
    };
    if let StartupPacket::Startup { minor, params } = packet {
        let mut again = BytesMut::new();
        codec::put_startup(&params, &mut again);
        match codec::startup_packet(&again) {
            Ok(StartupPacket::Startup { params: p2, .. }) => assert_eq!(params, p2),
            other => panic!("re-encoded startup decodes as {other:?}"),
        }
        if let Ok(startup) = filter_params(minor, params) {
            // Only allowlisted settings pass, then the three pgwarden pins
            // (encoding, string syntax, search_path) last, so they win.
            let n = startup.upstream_params.len();
            assert!(n >= 3);
            for (k, _) in &startup.upstream_params[..n - 3] {
                let k = k.to_ascii_lowercase();
                assert!(
                    STARTUP_SETTINGS.contains(&k.as_str()),
                    "{k} passed upstream"
                );
            }
            let pins: Vec<&str> = startup.upstream_params[n - 3..]
                .iter()
                .map(|(k, _)| k.as_str())
                .collect();
            assert_eq!(
                pins,
                [
                    "client_encoding",
                    "standard_conforming_strings",
                    "search_path"
                ]
            );
        }
    }
});
