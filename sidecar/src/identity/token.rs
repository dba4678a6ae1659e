//! Sans-IO JWT verification: a token, a key set and the policy's rules in, a
//! verified caller or a reason a human can act on out. No clock or network is
//! read here except the time passed in, so every rejection is unit-tested.
//!
//! jsonwebtoken checks the signature and the registered claims (`exp`, `nbf`,
//! `iss`, `aud`); this module decides which key and algorithm may be used
//! before it gets there, and checks what jsonwebtoken does not (`iat`,
//! subjects, claim globs).

use std::collections::HashSet;
use std::fmt;

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::Value;

use super::jwks::KeySet;
use crate::glob::glob_match;

/// Tokens larger than this are refused before any decoding (a real OIDC
/// token is 1-3 KiB).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECS: u64 = 30;

/// Asymmetric algorithms only: a JWKS holds public keys, and accepting HMAC
/// would let anyone holding the public key mint tokens.
pub const ALLOWED_ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// What a policy demands of a token.
#[derive(Debug, Clone)]
pub struct TokenRules {
    pub issuer: String,
    /// The token's `aud` must contain at least one of these.
    pub audiences: Vec<String>,
    /// Globs on `sub`; empty admits any subject.
    pub subjects: Vec<String>,
    /// (claim path, glob): every one must match. A path may name a nested
    /// claim with dots (`kubernetes.io.namespace`).
    pub claims: Vec<(String, String)>,
}

/// A caller whose token passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub subject: String,
    /// Seconds since the epoch; the session ends its use here.
    pub expires_at: u64,
    /// Claims worth showing in logs, recordings and approvals.
    pub attributes: Vec<(String, String)>,
}

/// Why a token was refused. Display is the reason the client sees; it never
/// contains the token or key material, and claim values are shortened and
/// stripped of control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    Empty,
    Malformed(&'static str),
    Encrypted,
    AlgNone,
    Hmac(String),
    AlgNotAllowed(String),
    CriticalHeader,
    /// The key set has no key with this id (the caller may refresh once).
    UnknownKid(String),
    /// No kid and more than one candidate key.
    AmbiguousKey,
    /// The named key exists but is not for this algorithm.
    KeyMismatch {
        kid: String,
        alg: String,
    },
    BadSignature,
    Expired {
        exp: u64,
        now: u64,
    },
    NotYetValid {
        nbf: u64,
        now: u64,
    },
    IssuedInFuture {
        iat: u64,
        now: u64,
    },
    MissingClaim(String),
    WrongIssuer(String),
    WrongAudience(Vec<String>),
    SubjectNotAllowed(String),
    ClaimMismatch {
        claim: String,
        value: Option<String>,
    },
    /// No keys are available: the issuer could not be reached yet.
    NoKeys(String),
}

impl From<super::jwks::KeyChoice> for TokenError {
    fn from(e: super::jwks::KeyChoice) -> Self {
        use super::jwks::KeyChoice;
        match e {
            KeyChoice::UnknownKid(kid) => TokenError::UnknownKid(kid),
            KeyChoice::AmbiguousKey => TokenError::AmbiguousKey,
            KeyChoice::KeyMismatch { kid, alg } => TokenError::KeyMismatch { kid, alg },
        }
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use TokenError::*;
        match self {
            Empty => write!(f, "no token was sent: send the OIDC token as the password"),
            Malformed(why) => write!(f, "the password is not a valid JWT: {why}"),
            Encrypted => write!(f, "encrypted tokens (JWE) are not accepted; send a signed JWT"),
            AlgNone => write!(f, "unsigned tokens (alg \"none\") are not accepted"),
            Hmac(alg) => write!(
                f,
                "tokens signed with a shared secret ({}) are not accepted; the issuer must sign with an asymmetric key",
                shown(alg)
            ),
            AlgNotAllowed(alg) => write!(f, "signature algorithm {} is not accepted", shown(alg)),
            CriticalHeader => write!(f, "the token has critical header extensions (crit), which are not supported"),
            UnknownKid(kid) => write!(f, "the token is signed with key {}, which the issuer does not publish", shown(kid)),
            AmbiguousKey => write!(f, "the token names no key (kid) and the issuer publishes several"),
            KeyMismatch { kid, alg } => write!(
                f,
                "key {} cannot verify a {} signature",
                shown(kid),
                shown(alg)
            ),
            BadSignature => write!(f, "the token's signature is invalid"),
            Expired { exp, now } => write!(
                f,
                "the token expired {}s ago (exp {exp}); get a fresh token",
                now.saturating_sub(*exp)
            ),
            NotYetValid { nbf, now } => write!(
                f,
                "the token is not valid for another {}s (nbf {nbf})",
                nbf.saturating_sub(*now)
            ),
            IssuedInFuture { iat, now } => write!(
                f,
                "the token claims to be issued {}s in the future (iat {iat}); check the clocks",
                iat.saturating_sub(*now)
            ),
            MissingClaim(c) => write!(f, "the token has no {} claim", shown(c)),
            WrongIssuer(iss) => write!(f, "the token's issuer {} is not this policy's issuer", shown(iss)),
            WrongAudience(aud) => {
                let aud: Vec<String> = aud.iter().take(5).map(|a| shown(a)).collect();
                write!(f, "the token's audience [{}] includes none of this policy's audiences", aud.join(", "))
            }
            SubjectNotAllowed(sub) => write!(f, "subject {} is not allowed by this policy", shown(sub)),
            ClaimMismatch { claim, value: None } => {
                write!(f, "the token has no {} claim, which this policy requires", shown(claim))
            }
            ClaimMismatch { claim, value: Some(v) } => write!(
                f,
                "claim {} = {} does not match this policy",
                shown(claim),
                shown(v)
            ),
            NoKeys(why) => write!(f, "the token issuer's keys are not available yet ({why}); try again shortly"),
        }
    }
}

impl TokenError {
    /// A short stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        use TokenError::*;
        match self {
            Empty => "empty",
            Malformed(_) | Encrypted | CriticalHeader => "malformed",
            AlgNone | Hmac(_) | AlgNotAllowed(_) => "algorithm",
            UnknownKid(_) | AmbiguousKey | KeyMismatch { .. } => "key",
            BadSignature => "signature",
            Expired { .. } => "expired",
            NotYetValid { .. } | IssuedInFuture { .. } => "not_yet_valid",
            MissingClaim(_) => "missing_claim",
            WrongIssuer(_) => "issuer",
            WrongAudience(_) => "audience",
            SubjectNotAllowed(_) | ClaimMismatch { .. } => "subject",
            NoKeys(_) => "keys_unavailable",
        }
    }
}

/// Quote a token-supplied string for a message: at most 80 characters, no
/// control characters (it reaches logs and terminals).
fn shown(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(80)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().count() > 80 {
        out.push('…');
    }
    format!("\"{out}\"")
}

/// The parts of a JWS header this module decides on, read before any
/// signature check (so nothing here is trusted beyond choosing a key).
#[derive(Debug)]
struct Header {
    alg: Algorithm,
    kid: Option<String>,
}

fn b64(part: &str) -> Result<Vec<u8>, TokenError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed("a part is not base64url"))
}

fn read_header(token: &str) -> Result<Header, TokenError> {
    if token.is_empty() {
        return Err(TokenError::Empty);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed("it is too long"));
    }
    let parts: Vec<&str> = token.split('.').collect();
    match parts.len() {
        3 => {}
        5 => return Err(TokenError::Encrypted),
        _ => return Err(TokenError::Malformed("a JWT has three dot-separated parts")),
    }
    let raw = b64(parts[0])?;
    let header: Value = serde_json::from_slice(&raw)
        .map_err(|_| TokenError::Malformed("the header is not JSON"))?;
    let obj = header
        .as_object()
        .ok_or(TokenError::Malformed("the header is not a JSON object"))?;
    if obj.contains_key("crit") {
        return Err(TokenError::CriticalHeader);
    }
    let alg = obj
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(TokenError::Malformed("the header has no alg"))?;
    if alg.eq_ignore_ascii_case("none") {
        return Err(TokenError::AlgNone);
    }
    if alg.starts_with("HS") {
        return Err(TokenError::Hmac(alg.to_string()));
    }
    let parsed: Algorithm = alg
        .parse()
        .map_err(|_| TokenError::AlgNotAllowed(alg.to_string()))?;
    if !ALLOWED_ALGORITHMS.contains(&parsed) {
        return Err(TokenError::AlgNotAllowed(alg.to_string()));
    }
    let kid = match obj.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(TokenError::Malformed("the header's kid is not a string")),
    };
    Ok(Header { alg: parsed, kid })
}

/// Verify `token` against `keys` and `rules` at time `now` (seconds since the
/// epoch). The signature is checked before any claim is believed.
pub fn verify(
    token: &str,
    keys: &KeySet,
    rules: &TokenRules,
    now: u64,
) -> Result<VerifiedToken, TokenError> {
    let header = read_header(token)?;
    let key = keys.select(header.kid.as_deref(), header.alg)?;

    let mut v = Validation::new(header.alg);
    v.leeway = LEEWAY_SECS;
    v.validate_exp = true;
    v.validate_nbf = true;
    v.set_issuer(&[rules.issuer.as_str()]);
    v.set_audience(&rules.audiences);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let claims = match jsonwebtoken::decode::<Value>(token, key, &v) {
        Ok(data) => data.claims,
        Err(e) => return Err(map_error(e.kind(), token, now)),
    };

    // jsonwebtoken accepted exp/nbf against its own clock; hold them to ours
    // too, so a caller's notion of now (and these tests) is authoritative.
    let num = |name: &str| claims.get(name).and_then(Value::as_u64);
    let exp = num("exp").ok_or_else(|| TokenError::MissingClaim("exp".into()))?;
    if now > exp + LEEWAY_SECS {
        return Err(TokenError::Expired { exp, now });
    }
    if let Some(nbf) = num("nbf") {
        if nbf > now + LEEWAY_SECS {
            return Err(TokenError::NotYetValid { nbf, now });
        }
    }
    if let Some(iat) = num("iat") {
        if iat > now + LEEWAY_SECS {
            return Err(TokenError::IssuedInFuture { iat, now });
        }
    }

    let subject = claims
        .get("sub")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| TokenError::MissingClaim("sub".into()))?
        .to_string();
    if !rules.subjects.is_empty() && !rules.subjects.iter().any(|g| glob_match(g, &subject)) {
        return Err(TokenError::SubjectNotAllowed(subject));
    }
    for (path, glob) in &rules.claims {
        let found = claim_at(&claims, path);
        let ok = match found {
            Some(Value::Array(items)) => items.iter().any(|i| value_matches(i, glob)),
            Some(v) => value_matches(v, glob),
            None => false,
        };
        if !ok {
            return Err(TokenError::ClaimMismatch {
                claim: path.clone(),
                value: found.map(value_text),
            });
        }
    }
    Ok(VerifiedToken {
        subject,
        expires_at: exp,
        attributes: attributes(&claims),
    })
}

fn map_error(kind: &ErrorKind, token: &str, now: u64) -> TokenError {
    // After a signature check passed, the payload is authentic; reading it
    // again only serves a precise message.
    let payload = || -> Option<Value> {
        let part = token.split('.').nth(1)?;
        serde_json::from_slice(&b64(part).ok()?).ok()
    };
    let num = |name: &str| payload().and_then(|p| p.get(name).and_then(Value::as_u64));
    match kind {
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::ExpiredSignature => TokenError::Expired {
            exp: num("exp").unwrap_or(0),
            now,
        },
        ErrorKind::ImmatureSignature => TokenError::NotYetValid {
            nbf: num("nbf").unwrap_or(0),
            now,
        },
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer(
            payload()
                .and_then(|p| p.get("iss").map(value_text))
                .unwrap_or_default(),
        ),
        ErrorKind::InvalidAudience => {
            TokenError::WrongAudience(match payload().and_then(|p| p.get("aud").cloned()) {
                Some(Value::Array(a)) => a.iter().map(value_text).collect(),
                Some(v) => vec![value_text(&v)],
                None => vec![],
            })
        }
        ErrorKind::MissingRequiredClaim(c) => TokenError::MissingClaim(c.clone()),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            TokenError::AlgNotAllowed(String::from("(mismatched)"))
        }
        ErrorKind::Base64(_) => TokenError::Malformed("a part is not base64url"),
        ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
            TokenError::Malformed("the payload is not a JSON object of claims")
        }
        _ => TokenError::Malformed("it could not be decoded"),
    }
}

/// A claim by path: an exact top-level name first (claim names may contain
/// dots, e.g. `kubernetes.io`), else the longest key that prefixes the path.
fn claim_at<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    let obj = claims.as_object()?;
    if let Some(v) = obj.get(path) {
        return Some(v);
    }
    let mut best: Option<(&str, &Value)> = None;
    for (k, v) in obj {
        if path.len() > k.len() + 1
            && path.starts_with(k.as_str())
            && path.as_bytes()[k.len()] == b'.'
            && best.is_none_or(|(b, _)| k.len() > b.len())
        {
            best = Some((k.as_str(), v));
        }
    }
    let (k, v) = best?;
    claim_at(v, &path[k.len() + 1..])
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn value_matches(v: &Value, glob: &str) -> bool {
    match v {
        Value::String(s) => glob_match(glob, s),
        Value::Number(_) | Value::Bool(_) => glob_match(glob, &v.to_string()),
        _ => false,
    }
}

/// Claims that tell a reviewer who this is: GitHub Actions' repository and
/// workflow, Kubernetes' namespace, service account and pod.
fn attributes(claims: &Value) -> Vec<(String, String)> {
    const USEFUL: &[&str] = &[
        "repository",
        "repository_owner",
        "workflow",
        "ref",
        "run_id",
        "actor",
        "environment",
        "client_id",
        "kubernetes.io.namespace",
        "kubernetes.io.serviceaccount.name",
        "kubernetes.io.pod.name",
    ];
    let mut seen = HashSet::new();
    USEFUL
        .iter()
        .filter_map(|name| {
            let v = claim_at(claims, name)?;
            if matches!(v, Value::Object(_) | Value::Array(_)) || !seen.insert(*name) {
                return None;
            }
            let text: String = value_text(v).chars().take(200).collect();
            Some((name.to_string(), text))
        })
        .collect()
}

#[cfg(test)]
mod tests;
