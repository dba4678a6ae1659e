//! A parsed JSON Web Key Set: the issuer's public signing keys by `kid`.
//!
//! Keys this gateway must never verify with are dropped while parsing:
//! symmetric (`oct`) keys, encryption keys, keys whose `key_ops` exclude
//! `verify`. A key's declared `alg`, when present, is binding.

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

/// At most this many keys are kept from one JWKS (real issuers publish 2-4).
const MAX_KEYS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl Family {
    fn verifies(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            Family::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            Family::P256 => alg == ES256,
            Family::P384 => alg == ES384,
            Family::Ed25519 => alg == EdDSA,
        }
    }
}

struct PublicKey {
    kid: Option<String>,
    family: Family,
    /// The JWK's own `alg`, if it declares one.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

impl PublicKey {
    fn verifies(&self, alg: Algorithm) -> bool {
        self.family.verifies(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

/// Why no key of the set fits a token's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyChoice {
    /// No key with this id (the caller may refresh the set once).
    UnknownKid(String),
    /// No kid and more than one candidate key.
    AmbiguousKey,
    /// The named key exists but is not for this algorithm.
    KeyMismatch { kid: String, alg: String },
}

pub struct KeySet {
    keys: Vec<PublicKey>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.kids())
            .finish()
    }
}

impl KeySet {
    /// Parse a JWKS document. Unusable keys are skipped; a set with no usable
    /// signing key is an error (it could verify nothing).
    pub fn from_json(bytes: &[u8]) -> Result<KeySet, String> {
        let doc: Value =
            serde_json::from_slice(bytes).map_err(|e| format!("the JWKS is not JSON: {e}"))?;
        let list = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("the JWKS has no \"keys\" array")?;
        let keys: Vec<PublicKey> = list
            .iter()
            .take(MAX_KEYS)
            .filter_map(|k| serde_json::from_value::<Jwk>(k.clone()).ok())
            .filter_map(|jwk| public_key(&jwk))
            .collect();
        if keys.is_empty() {
            return Err(format!(
                "the JWKS holds no usable signing key ({} keys listed)",
                list.len()
            ));
        }
        Ok(KeySet { keys })
    }

    pub fn kids(&self) -> Vec<&str> {
        self.keys
            .iter()
            .map(|k| k.kid.as_deref().unwrap_or("(no kid)"))
            .collect()
    }

    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    /// The key that must verify a token with this header.
    pub fn select(&self, kid: Option<&str>, alg: Algorithm) -> Result<&DecodingKey, KeyChoice> {
        let alg_name = || format!("{alg:?}");
        match kid {
            Some(kid) => {
                let mut named = self
                    .keys
                    .iter()
                    .filter(|k| k.kid.as_deref() == Some(kid))
                    .peekable();
                if named.peek().is_none() {
                    return Err(KeyChoice::UnknownKid(kid.to_string()));
                }
                named
                    .find(|k| k.verifies(alg))
                    .map(|k| &k.key)
                    .ok_or_else(|| KeyChoice::KeyMismatch {
                        kid: kid.to_string(),
                        alg: alg_name(),
                    })
            }
            None => {
                let mut fitting = self.keys.iter().filter(|k| k.verifies(alg));
                match (fitting.next(), fitting.next()) {
                    (Some(k), None) => Ok(&k.key),
                    (Some(_), Some(_)) => Err(KeyChoice::AmbiguousKey),
                    (None, _) => Err(KeyChoice::KeyMismatch {
                        kid: "(none)".into(),
                        alg: alg_name(),
                    }),
                }
            }
        }
    }
}

fn public_key(jwk: &Jwk) -> Option<PublicKey> {
    let common = &jwk.common;
    if matches!(common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
        return None;
    }
    if let Some(ops) = &common.key_operations {
        if !ops.contains(&KeyOperations::Verify) {
            return None;
        }
    }
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Family::Rsa,
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Family::P256,
            EllipticCurve::P384 => Family::P384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => Family::Ed25519,
            _ => return None,
        },
        // Symmetric keys have no place in a public key set.
        AlgorithmParameters::OctetKey(_) => return None,
    };
    let alg = match common.key_algorithm {
        None => None,
        Some(ka) => Some(signing_algorithm(ka)?),
    };
    if alg.is_some_and(|a| !family.verifies(a)) {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(PublicKey {
        kid: common.key_id.clone(),
        family,
        alg,
        key,
    })
}

/// A JWK `alg` that names a signature algorithm; None for anything else
/// (encryption algorithms, HMAC).
fn signing_algorithm(ka: KeyAlgorithm) -> Option<Algorithm> {
    use KeyAlgorithm as K;
    Some(match ka {
        K::RS256 => Algorithm::RS256,
        K::RS384 => Algorithm::RS384,
        K::RS512 => Algorithm::RS512,
        K::PS256 => Algorithm::PS256,
        K::PS384 => Algorithm::PS384,
        K::PS512 => Algorithm::PS512,
        K::ES256 => Algorithm::ES256,
        K::ES384 => Algorithm::ES384,
        K::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}
