//! A throwaway CA and a serving certificate for `localhost`/127.0.0.1, made with the
//! openssl CLI like the rest of the e2e PKI (no certificate-generation crate needed;
//! openssl is already a test prerequisite). Two invocations, a few milliseconds.
//!
//! The chain is a real CA plus a leaf (not a self-signed leaf): rustls/webpki, which
//! kube-rs uses, refuses a CA certificate presented as the end entity.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> std::io::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

impl Pki {
    /// Writes `ca.crt`, `ca.key`, `apiserver.crt`, `apiserver.key` into `dir`.
    pub fn generate(dir: &Path) -> std::io::Result<Pki> {
        let p = |n: &str| dir.join(n);
        let pki = Pki {
            ca_cert: p("ca.crt"),
            ca_key: p("ca.key"),
            server_cert: p("apiserver.crt"),
            server_key: p("apiserver.key"),
        };
        let s = |p: &PathBuf| p.to_string_lossy().into_owned();
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
                "/CN=pgwarden testapi CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                &s(&pki.ca_key),
                "-out",
                &s(&pki.ca_cert),
            ],
        )?;
        // OpenSSL 3's `req -x509 -CA` signs the new key with the CA in one step.
        openssl(
            dir,
            &[
                "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-days", "30", "-subj", "/CN=kube-apiserver",
                "-CA", &s(&pki.ca_cert), "-CAkey", &s(&pki.ca_key),
                "-addext", "basicConstraints=critical,CA:FALSE",
                "-addext", "keyUsage=critical,digitalSignature,keyEncipherment",
                "-addext", "extendedKeyUsage=serverAuth",
                "-addext", "subjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default.svc,IP:127.0.0.1",
                "-keyout", &s(&pki.server_key), "-out", &s(&pki.server_cert),
            ],
        )?;
        Ok(pki)
    }
}

/// A serving certificate for `names` signed by the CA in `dir` (`ca.crt`, `ca.key`):
/// `(cert PEM, key PEM)`. Each call writes into its own temp dir under `dir`.
pub fn issue_serving_cert(dir: &Path, names: &[&str]) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let work = tempfile::Builder::new().prefix("cert-").tempdir_in(dir)?;
    let san: Vec<String> = names
        .iter()
        .map(|n| {
            if n.parse::<std::net::IpAddr>().is_ok() {
                format!("IP:{n}")
            } else {
                format!("DNS:{n}")
            }
        })
        .collect();
    let (ca, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let (cert, key) = (work.path().join("tls.crt"), work.path().join("tls.key"));
    let s = |p: &Path| p.to_string_lossy().into_owned();
    openssl(
        work.path(),
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
            &format!("/CN={}", names.first().unwrap_or(&"webhook")),
            "-CA",
            &s(&ca),
            "-CAkey",
            &s(&ca_key),
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            "-addext",
            "extendedKeyUsage=serverAuth",
            "-addext",
            &format!("subjectAltName={}", san.join(",")),
            "-keyout",
            &s(&key),
            "-out",
            &s(&cert),
        ],
    )?;
    Ok((std::fs::read(cert)?, std::fs::read(key)?))
}
