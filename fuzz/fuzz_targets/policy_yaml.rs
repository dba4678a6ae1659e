//! The YAML policy loader: what `pgwarden run -f` and `pgwarden check` do
//! with a file (parse, validate, resolve Secrets, build the running
//! configuration). Never a panic; a snapshot built from a file survives the
//! JSON the operator sends it as, unchanged.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pgwarden_api::stream::{decode_event, encode_event, StreamEvent};
use pgwarden_sidecar::config::{build, load_policies, snapshot_files, LoadOptions};

/// One scratch file per fuzzing process.
fn policy_file() -> &'static Path {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        // scripts/fuzz points TMPDIR at a directory it removes afterwards.
        let dir = std::env::temp_dir().join(format!("pgwarden-fuzz-yaml-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        dir.join("policy.yaml")
    })
}

fuzz_target!(|data: &[u8]| {
    let file = policy_file();
    std::fs::write(file, data).expect("policy written");
    let files = [file.to_path_buf()];
    let Ok(policies) = load_policies(&files) else {
        return;
    };
    // Files a policy names (a CA, a JWKS) are the admin's choice and read
    // whole: not this target's business (it could name /dev/zero).
    let names_files = policies.iter().any(|(_, spec)| {
        spec.database
            .tls
            .as_ref()
            .is_some_and(|t| t.ca_file.is_some())
            || spec
                .identity
                .oidc
                .as_ref()
                .is_some_and(|o| o.jwks_file.is_some())
    });
    if names_files {
        return;
    }
    let Ok(snapshot) = snapshot_files(&files, Some(&[7u8; 32]), 1) else {
        return;
    };
    let event = StreamEvent::Snapshot {
        snapshot: snapshot.clone(),
    };
    let line = encode_event(&event);
    let again = decode_event(&line[..line.len() - 1]).expect("an encoded snapshot decodes");
    assert_eq!(again, event, "the snapshot changed on its way through JSON");
    let _ = build(&snapshot, &LoadOptions::default());
});
