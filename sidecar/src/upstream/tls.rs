//! TLS towards the upstream server, per `database.tls.mode`:
//! `disable` (plain TCP), `require` (encrypted, certificate not checked — like
//! libpq's sslmode=require), `verify-full` (chain to the configured CA and the
//! host name must match).

use std::sync::Arc;

use pgwarden_api::TlsMode;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

#[derive(Clone)]
pub enum UpstreamTls {
    Disable,
    Enabled(Arc<ClientConfig>),
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamTls::Disable => f.write_str("Disable"),
            UpstreamTls::Enabled(_) => f.write_str("Enabled"),
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl UpstreamTls {
    /// Build the client configuration once, at load time, so a bad CA is a
    /// start-up error and not a per-connection one.
    pub fn from_mode(mode: TlsMode, ca_pem: Option<&[u8]>) -> Result<Self, String> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?;
        let config = match mode {
            TlsMode::Disable => return Ok(UpstreamTls::Disable),
            TlsMode::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider())))
                .with_no_client_auth(),
            TlsMode::VerifyFull => {
                let pem = ca_pem.ok_or("verify-full needs caSecret or caFile")?;
                let mut roots = RootCertStore::empty();
                let mut n = 0;
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| format!("CA certificate is not valid PEM: {e}"))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("CA certificate rejected: {e}"))?;
                    n += 1;
                }
                if n == 0 {
                    return Err("CA bundle holds no certificate".into());
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
        };
        Ok(UpstreamTls::Enabled(Arc::new(config)))
    }
}

/// `require` mode: the session is encrypted but the server is not
/// authenticated. Handshake signatures are still verified, so the key exchange
/// is bound to the presented certificate, and SCRAM channel binding then
/// detects a man in the middle even here.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// SCRAM `tls-server-end-point` channel binding data (RFC 5929 §4.1): the
/// server certificate hashed with its signature's hash, where MD5 and SHA-1
/// are replaced by SHA-256.
pub fn server_end_point_hash(cert_der: &[u8]) -> Vec<u8> {
    use aws_lc_rs::digest;
    let alg = match signature_hash(cert_der) {
        Some(SigHash::Sha384) => &digest::SHA384,
        Some(SigHash::Sha512) => &digest::SHA512,
        _ => &digest::SHA256,
    };
    digest::digest(alg, cert_der).as_ref().to_vec()
}

#[derive(Debug, PartialEq, Eq)]
enum SigHash {
    Sha384,
    Sha512,
}

/// Read `Certificate.signatureAlgorithm`'s OID with a minimal DER walk:
/// SEQUENCE { tbsCertificate, SEQUENCE { OID, ... }, BIT STRING }.
fn signature_hash(der: &[u8]) -> Option<SigHash> {
    let (outer, _) = der_element(der, 0x30)?;
    let (_, rest) = der_any(outer)?; // tbsCertificate
    let (alg, _) = der_element(rest, 0x30)?;
    let (oid, _) = der_element(alg, 0x06)?;
    const SHA384_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c];
    const SHA512_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d];
    const ECDSA_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
    const ECDSA_SHA512: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04];
    match oid {
        SHA384_RSA | ECDSA_SHA384 => Some(SigHash::Sha384),
        SHA512_RSA | ECDSA_SHA512 => Some(SigHash::Sha512),
        _ => None,
    }
}

/// One DER element with the expected tag: (contents, rest).
fn der_element(buf: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *buf.first()? != tag {
        return None;
    }
    der_any(buf)
}

fn der_any(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let first_len = *buf.get(1)?;
    let (len, header) = if first_len < 0x80 {
        (usize::from(first_len), 2)
    } else {
        let n = usize::from(first_len & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let bytes = buf.get(2..2 + n)?;
        let len = bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    Some((buf.get(header..end)?, buf.get(end..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_walk_never_panics_on_truncation() {
        // A plausible certificate prefix cut at every length.
        let der: Vec<u8> = vec![
            0x30, 0x82, 0x01, 0x0a, 0x30, 0x03, 0x02, 0x01, 0x00, 0x30, 0x0b, 0x06, 0x09, 0x2a,
            0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c,
        ];
        for i in 0..der.len() {
            let _ = signature_hash(&der[..i]);
        }
    }

    #[test]
    fn sha384_rsa_certificate_selects_sha384() {
        let der: Vec<u8> = vec![
            0x30, 0x12, 0x30, 0x03, 0x02, 0x01, 0x00, 0x30, 0x0b, 0x06, 0x09, 0x2a, 0x86, 0x48,
            0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c, 0x03, 0x00,
        ];
        assert_eq!(signature_hash(&der), Some(SigHash::Sha384));
        assert_eq!(server_end_point_hash(&der).len(), 48);
    }

    #[test]
    fn sha256_and_unknown_algorithms_use_sha256() {
        let der: Vec<u8> = vec![
            0x30, 0x12, 0x30, 0x03, 0x02, 0x01, 0x00, 0x30, 0x0b, 0x06, 0x09, 0x2a, 0x86, 0x48,
            0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b, 0x03, 0x00,
        ];
        assert_eq!(signature_hash(&der), None);
        assert_eq!(server_end_point_hash(&der).len(), 32);
    }
}
