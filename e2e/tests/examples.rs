//! Every file under manifests/examples/ applies with the real kubectl to an
//! API server that validates custom resources against the CRD schemas
//! (crds/*.yaml): an example a user copies is accepted as written.

use std::path::PathBuf;

use pgwarden_testapi::TestApiServer;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

#[test]
fn examples_apply_against_the_crd_schemas() {
    let api = TestApiServer::start().expect("start test API server");
    let run = |args: &[&str]| {
        let o = api.kubectl("admin", args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "kubectl {args:?}:\n{text}");
        text
    };
    run(&[
        "apply",
        "-f",
        repo("crds/databaseaccesspolicies.yaml").to_str().unwrap(),
        "-f",
        repo("crds/approvalrequests.yaml").to_str().unwrap(),
    ]);
    run(&["create", "namespace", "ci"]);
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo("manifests/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    for f in &files {
        let out = run(&["apply", "-f", f.to_str().unwrap()]);
        assert!(out.contains("created"), "{}: {out}", f.display());
    }
    let listed = run(&["get", "dap", "-A", "-o", "name"]);
    assert!(
        listed.contains("nightly-agent") && listed.contains("migrations-with-review"),
        "{listed}"
    );
}
