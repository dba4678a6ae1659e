//! A real OpenID Provider for the token-identity tests: panva's certified
//! `oidc-provider` (npm), started on loopback by `e2e/oidc/provider.mjs`, issuing
//! JWT access tokens by the client-credentials grant. Also a local signer for
//! tokens no provider would issue (expired, wrong issuer, Kubernetes-shaped).
//!
//! Needs node and `npm ci` in `e2e/oidc` (scripts/test does it).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use crate::client::run_command;
use crate::net::http_post;

/// Clients the provider knows (see provider.mjs): `ci-acme` tokens carry
/// `repository_owner: acme`, `ci-evil` tokens `repository_owner: evil`.
pub const ACME: (&str, &str) = ("ci-acme", "acme-secret");
pub const EVIL: (&str, &str) = ("ci-evil", "evil-secret");
/// The resource (audience) the gateway's policy accepts, and one it does not.
pub const AUDIENCE: &str = "urn:pgwarden";
pub const OTHER_AUDIENCE: &str = "urn:other";

fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc")
}

/// The test signing keys shared with the sidecar's unit tests.
pub fn fixture_key(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../sidecar/tests/fixtures/jwt")
        .join(name)
}

fn node_ready() {
    assert!(
        oidc_dir().join("node_modules/oidc-provider").is_dir(),
        "the OpenID Provider fixture is not installed: run `npm ci` in {} (scripts/test does)",
        oidc_dir().display()
    );
}

pub struct OidcProvider {
    child: Child,
    issuer: String,
    port: u16,
    kid: String,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl OidcProvider {
    /// Start on an ephemeral port; access tokens live `ttl_secs`.
    pub fn start(ttl_secs: u64) -> OidcProvider {
        node_ready();
        let dir = tempfile::Builder::new()
            .prefix("pgwarden-e2e-oidc-")
            .tempdir()
            .expect("temp dir");
        let stderr = dir.path().join("provider.log");
        let mut child = Command::new("node")
            .arg(oidc_dir().join("provider.mjs"))
            .args(["--ttl", &ttl_secs.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("provider log"))
            .spawn()
            .expect("start node (is Node.js installed?)");
        let stdout = child.stdout.take().expect("stdout");
        let line = match first_line(stdout, Duration::from_secs(30)) {
            Some(l) => l,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the OpenID Provider did not start:\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
        };
        let ready: serde_json::Value = serde_json::from_str(&line).expect("ready line is JSON");
        OidcProvider {
            child,
            issuer: ready["issuer"].as_str().expect("issuer").to_string(),
            port: u16::try_from(ready["port"].as_u64().expect("port")).expect("port"),
            kid: ready["kid"].as_str().expect("kid").to_string(),
            stderr,
            _dir: dir,
        }
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The kid tokens are signed with right now.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// A fresh access token for `client` with audience `resource`.
    pub fn token(&self, client: (&str, &str), resource: &str) -> String {
        node_script("token.mjs", &[&self.issuer, client.0, client.1, resource])
    }

    /// Rotate the signing key (`drop`: also unpublish the old ones); returns
    /// the new kid.
    pub fn rotate(&mut self, drop: bool) -> String {
        let path = if drop {
            "/__admin/rotate?drop=1"
        } else {
            "/__admin/rotate"
        };
        let (status, body) = http_post(self.port, path).expect("rotate");
        assert_eq!(status, 200, "rotate: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("rotate answer");
        self.kid = v["kid"].as_str().expect("kid").to_string();
        self.kid.clone()
    }

    /// Kill the provider: an issuer outage.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        self.stop();
    }
}

fn first_line(stdout: ChildStdout, timeout: Duration) -> Option<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let ok = reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false);
        let _ = tx.send(ok.then_some(line));
        // Keep draining so the provider never blocks on a full pipe.
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    rx.recv_timeout(timeout).ok().flatten()
}

/// A token signed here with a fixture key (`rsa-1`, `rsa-2`, `ec-1`), from a
/// JSON claims object; `"$now+N"` / `"$now-N"` strings become times.
pub fn sign_token(key: &str, kid: &str, claims: &str) -> String {
    let key = fixture_key(&format!("{key}.key.pem"));
    node_script("sign.mjs", &[&key.to_string_lossy(), kid, claims])
}

/// Run one of the fixture's node scripts; its trimmed stdout (a token).
fn node_script(script: &str, args: &[&str]) -> String {
    node_ready();
    let mut cmd = Command::new("node");
    cmd.arg(oidc_dir().join(script)).args(args);
    let out = run_command(&mut cmd, None, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("token is text")
        .trim()
        .to_string()
}
