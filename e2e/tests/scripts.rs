//! The README's two commands on a fresh machine: `scripts/standalone` and
//! `scripts/test` share one package check (scripts/lib/packages.sh). On a
//! machine without libclang-dev (pg_query's build needs it) it installs the
//! package when it can (root with apt-get) and otherwise stops naming it.
//! Played here with stand-in `dpkg`, `apt-get` and `id` on the PATH.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn stub(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// Runs the package check as scripts/standalone does before building, as
/// user `uid`, on a machine whose dpkg knows no libclang-dev.
fn check_as(uid: u32) -> (std::process::Output, String) {
    let bin = tempfile::tempdir().unwrap();
    let log = bin.path().join("apt.log");
    stub(bin.path(), "dpkg", "exit 1");
    stub(bin.path(), "id", &format!("echo {uid}"));
    stub(
        bin.path(),
        "apt-get",
        &format!("echo \"$@\" >> {}", log.display()),
    );
    let cargo = Command::new("sh")
        .args(["-c", "command -v cargo"])
        .output()
        .unwrap();
    let cargo_dir = Path::new(String::from_utf8_lossy(&cargo.stdout).trim())
        .parent()
        .unwrap()
        .to_path_buf();
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/lib/packages.sh");
    let out = Command::new("bash")
        .args([
            "-c",
            &format!(
                ". {} && need_build_deps && install_missing standalone && echo checked",
                lib.display()
            ),
        ])
        .env(
            "PATH",
            format!(
                "{}:{}:/usr/bin:/bin",
                bin.path().display(),
                cargo_dir.display()
            ),
        )
        .output()
        .unwrap();
    let apt = fs::read_to_string(&log).unwrap_or_default();
    (out, apt)
}

#[test]
fn root_with_apt_installs_libclang() {
    let (out, apt) = check_as(0);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("checked"));
    assert!(apt.contains("update"), "{apt}");
    assert!(
        apt.contains("install") && apt.contains("libclang-dev"),
        "{apt}"
    );
}

#[test]
fn anyone_else_is_told_the_package_to_install() {
    let (out, apt) = check_as(1000);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("libclang-dev"), "{err}");
    assert!(err.contains("apt-get install"), "{err}");
    assert!(apt.is_empty(), "nothing installed: {apt}");
}

/// Both commands use the shared check rather than a copy of it.
#[test]
fn both_readme_commands_share_the_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for script in ["scripts/standalone", "scripts/test"] {
        let text = fs::read_to_string(root.join(script)).unwrap();
        assert!(text.contains("scripts/lib/packages.sh"), "{script}");
        assert!(text.contains("need_build_deps"), "{script}");
    }
}
