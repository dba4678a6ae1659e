//! Test PKI made with the openssl CLI: a CA and server certificates for `localhost`
//! and 127.0.0.1, usable by PostgreSQL (upstream TLS) and by the gateway (client TLS).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::client::run_command;

const OPENSSL_TIMEOUT: Duration = Duration::from_secs(30);

/// A certificate authority: `<name>-ca.crt` / `<name>-ca.key` in some directory.
#[derive(Debug, Clone)]
pub struct TestCa {
    cert: PathBuf,
    key: PathBuf,
}

/// A server certificate (PEM) and its private key (PKCS#8 PEM).
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA plus one server certificate for `localhost`/127.0.0.1, in a temp dir that is
/// removed on drop.
#[derive(Debug)]
pub struct TestPki {
    pub ca: TestCa,
    pub server: ServerCert,
    dir: TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = run_command(
        Command::new("openssl").args(args).current_dir(dir),
        None,
        OPENSSL_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// === impl TestCa ===

impl TestCa {
    /// Generates a self-signed P-256 CA into `dir` as `<name>-ca.crt` and `<name>-ca.key`.
    pub fn generate(dir: &Path, name: &str) -> TestCa {
        let cert = dir.join(format!("{name}-ca.crt"));
        let key = dir.join(format!("{name}-ca.key"));
        let subject = format!("/CN=pgwarden e2e {name} CA");
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "30",
                "-subj",
                &subject,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                path_str(&key),
                "-out",
                path_str(&cert),
            ],
        );
        TestCa { cert, key }
    }

    /// The CA certificate (PEM): the trust anchor for clients.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    /// Issues a server certificate with CN `localhost` and SANs DNS:localhost,
    /// IP:127.0.0.1 into `dir` as `<name>.crt` / `<name>.key`.
    pub fn issue_server_cert(&self, dir: &Path, name: &str) -> ServerCert {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        let csr = dir.join(format!("{name}.csr"));
        let ext = dir.join(format!("{name}.ext"));
        fs::write(
            &ext,
            "basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\n\
             subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .expect("write openssl extension file");
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                "/CN=localhost",
                "-keyout",
                path_str(&key),
                "-out",
                path_str(&csr),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                path_str(&csr),
                "-CA",
                path_str(&self.cert),
                "-CAkey",
                path_str(&self.key),
                "-CAcreateserial",
                "-days",
                "30",
                "-extfile",
                path_str(&ext),
                "-out",
                path_str(&cert),
            ],
        );
        ServerCert { cert, key }
    }
}

// === impl TestPki ===

impl TestPki {
    /// A fresh CA and a `localhost` server certificate in a new temp dir.
    pub fn generate() -> TestPki {
        let dir = tempfile::Builder::new()
            .prefix("pgwarden-e2e-pki-")
            .tempdir()
            .expect("create pki temp dir");
        let ca = TestCa::generate(dir.path(), "test");
        let server = ca.issue_server_cert(dir.path(), "server");
        TestPki { ca, server, dir }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

pub(crate) fn path_str(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}
