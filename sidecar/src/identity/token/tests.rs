//! Every rejection the issue names, each with its reason, against tokens
//! signed here with test keys (sidecar/tests/fixtures/jwt).

use super::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{EncodingKey, Header as JwtHeader};
use serde_json::json;

const RSA1: &[u8] = include_bytes!("../../../tests/fixtures/jwt/rsa-1.key.pem");
const RSA1_PUB: &[u8] = include_bytes!("../../../tests/fixtures/jwt/rsa-1.pub.pem");
const RSA2: &[u8] = include_bytes!("../../../tests/fixtures/jwt/rsa-2.key.pem");
const EC1: &[u8] = include_bytes!("../../../tests/fixtures/jwt/ec-1.key.pem");
const JWKS: &[u8] = include_bytes!("../../../tests/fixtures/jwt/jwks.json");
const ISS: &str = "https://token.actions.githubusercontent.com";

fn now() -> u64 {
    crate::identity::unix_now()
}

fn keys() -> KeySet {
    KeySet::from_json(JWKS).unwrap()
}

fn rules() -> TokenRules {
    TokenRules {
        issuer: ISS.into(),
        audiences: vec!["pgwarden".into()],
        subjects: vec!["repo:acme/shop:*".into()],
        claims: vec![("repository_owner".into(), "acme".into())],
    }
}

fn claims() -> Value {
    json!({
        "iss": ISS,
        "aud": "pgwarden",
        "sub": "repo:acme/shop:ref:refs/heads/main",
        "repository": "acme/shop",
        "repository_owner": "acme",
        "workflow": "nightly",
        "iat": now() - 5,
        "nbf": now() - 5,
        "exp": now() + 300,
    })
}

fn sign_with(kid: Option<&str>, alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    let mut h = JwtHeader::new(alg);
    h.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

fn rsa1() -> EncodingKey {
    EncodingKey::from_rsa_pem(RSA1).unwrap()
}

fn sign(claims: &Value) -> String {
    sign_with(Some("rsa-1"), Algorithm::RS256, &rsa1(), claims)
}

fn with(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    let mut c = claims();
    edit(c.as_object_mut().unwrap());
    c
}

/// Verify, and check the reason never carries the token back.
fn check(token: &str) -> Result<VerifiedToken, TokenError> {
    let r = verify(token, &keys(), &rules(), now());
    if let Err(e) = &r {
        let msg = e.to_string();
        if let Some(sig) = token.rsplit('.').next().filter(|s| s.len() > 16) {
            assert!(!msg.contains(sig), "reason echoes the signature: {msg}");
        }
        assert!(!msg.contains(token) || token.len() < 16, "{msg}");
    }
    r
}

#[test]
fn accepts_a_valid_token_and_reports_who() {
    let v = check(&sign(&claims())).unwrap();
    assert_eq!(v.subject, "repo:acme/shop:ref:refs/heads/main");
    assert!(v.expires_at > now());
    assert!(v
        .attributes
        .contains(&("repository".into(), "acme/shop".into())));
    assert!(v
        .attributes
        .contains(&("workflow".into(), "nightly".into())));
}

#[test]
fn accepts_es256_and_tokens_without_kid_when_one_key_fits() {
    let ec = EncodingKey::from_ec_pem(EC1).unwrap();
    check(&sign_with(Some("ec-1"), Algorithm::ES256, &ec, &claims())).unwrap();
    // No kid: the only P-256 key in the set is chosen.
    check(&sign_with(None, Algorithm::ES256, &ec, &claims())).unwrap();
    // No kid, RS256: two RSA keys could verify it.
    assert_eq!(
        check(&sign_with(None, Algorithm::RS256, &rsa1(), &claims())),
        Err(TokenError::AmbiguousKey)
    );
}

#[test]
fn accepts_multi_audience_tokens() {
    let t = sign(&with(|c| {
        c.insert("aud".into(), json!(["sts.amazonaws.com", "pgwarden"]));
    }));
    check(&t).unwrap();
}

#[test]
fn accepts_tokens_within_the_leeway() {
    let t = sign(&with(|c| {
        c.insert("exp".into(), json!(now() - 10));
        c.insert("nbf".into(), json!(now() + 10));
        c.insert("iat".into(), json!(now() + 10));
    }));
    check(&t).unwrap();
}

#[test]
fn rejects_expired_and_not_yet_valid() {
    let t = sign(&with(|c| {
        c.insert("exp".into(), json!(now() - 120));
    }));
    let e = check(&t).unwrap_err();
    assert!(matches!(e, TokenError::Expired { .. }), "{e:?}");
    assert!(e.to_string().contains("expired"), "{e}");

    let t = sign(&with(|c| {
        c.insert("nbf".into(), json!(now() + 120));
    }));
    let e = check(&t).unwrap_err();
    assert!(matches!(e, TokenError::NotYetValid { .. }), "{e:?}");
    assert!(e.to_string().contains("not valid for another"), "{e}");

    let t = sign(&with(|c| {
        c.insert("iat".into(), json!(now() + 3600));
    }));
    let e = check(&t).unwrap_err();
    assert!(matches!(e, TokenError::IssuedInFuture { .. }), "{e:?}");
}

#[test]
fn rejects_wrong_audience_and_issuer() {
    let t = sign(&with(|c| {
        c.insert("aud".into(), json!(["other", "sts.amazonaws.com"]));
    }));
    let e = check(&t).unwrap_err();
    assert!(matches!(e, TokenError::WrongAudience(_)), "{e:?}");
    assert!(e.to_string().contains("\"other\""), "{e}");

    let t = sign(&with(|c| {
        c.insert("iss".into(), json!("https://evil.example"));
    }));
    let e = check(&t).unwrap_err();
    assert_eq!(e, TokenError::WrongIssuer("https://evil.example".into()));
}

#[test]
fn rejects_unsigned_tokens() {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims().to_string());
    for t in [
        format!("{header}.{payload}."),
        format!("{header}.{payload}"),
    ] {
        let e = check(&t).unwrap_err();
        assert!(
            matches!(e, TokenError::AlgNone | TokenError::Malformed(_)),
            "{e:?}"
        );
    }
    assert_eq!(
        check(&format!("{header}.{payload}.")).unwrap_err(),
        TokenError::AlgNone
    );
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"None"}"#);
    assert_eq!(
        check(&format!("{header}.{payload}.")).unwrap_err(),
        TokenError::AlgNone
    );
}

#[test]
fn rejects_hmac_signed_with_the_public_key() {
    // The classic confusion attack: HS256 keyed with the RSA public key the
    // issuer publishes.
    let key = EncodingKey::from_secret(RSA1_PUB);
    let t = sign_with(Some("rsa-1"), Algorithm::HS256, &key, &claims());
    let e = check(&t).unwrap_err();
    assert_eq!(e, TokenError::Hmac("HS256".into()));
    assert!(e.to_string().contains("shared secret"), "{e}");
}

#[test]
fn rejects_a_tampered_payload() {
    let t = sign(&claims());
    let mut parts: Vec<String> = t.split('.').map(str::to_string).collect();
    let forged = with(|c| {
        c.insert("sub".into(), json!("repo:acme/shop:ref:refs/heads/prod"));
    });
    parts[1] = URL_SAFE_NO_PAD.encode(forged.to_string());
    assert_eq!(check(&parts.join(".")), Err(TokenError::BadSignature));
    // A flipped signature bit, too.
    let mut sig = URL_SAFE_NO_PAD.decode(&parts[2]).unwrap();
    sig[10] ^= 1;
    let t = format!(
        "{}.{}",
        t.rsplit_once('.').unwrap().0,
        URL_SAFE_NO_PAD.encode(sig)
    );
    assert_eq!(check(&t), Err(TokenError::BadSignature));
}

#[test]
fn rejects_unknown_kid_and_a_known_kid_with_another_key() {
    let t = sign_with(Some("rsa-9"), Algorithm::RS256, &rsa1(), &claims());
    assert_eq!(check(&t), Err(TokenError::UnknownKid("rsa-9".into())));
    // Signed by rsa-2's private key but claiming to be rsa-1.
    let other = EncodingKey::from_rsa_pem(RSA2).unwrap();
    let t = sign_with(Some("rsa-1"), Algorithm::RS256, &other, &claims());
    assert_eq!(check(&t), Err(TokenError::BadSignature));
    // An EC key named for an RSA signature.
    let t = sign_with(Some("ec-1"), Algorithm::RS256, &rsa1(), &claims());
    assert!(
        matches!(check(&t), Err(TokenError::KeyMismatch { .. })),
        "{:?}",
        check(&t)
    );
}

#[test]
fn rejects_subject_and_claim_mismatches() {
    let t = sign(&with(|c| {
        c.insert("sub".into(), json!("repo:evil/shop:ref:refs/heads/main"));
    }));
    let e = check(&t).unwrap_err();
    assert!(matches!(e, TokenError::SubjectNotAllowed(_)), "{e:?}");

    let t = sign(&with(|c| {
        c.insert("repository_owner".into(), json!("evil"));
    }));
    let e = check(&t).unwrap_err();
    assert_eq!(
        e,
        TokenError::ClaimMismatch {
            claim: "repository_owner".into(),
            value: Some("evil".into())
        }
    );
    assert_eq!(
        e.to_string(),
        "claim \"repository_owner\" = \"evil\" does not match this policy"
    );
    let t = sign(&with(|c| {
        c.remove("repository_owner");
    }));
    let e = check(&t).unwrap_err();
    assert!(e.to_string().contains("requires"), "{e}");
}

#[test]
fn rejects_missing_exp_sub_and_aud() {
    for claim in ["exp", "sub", "aud", "iss"] {
        let t = sign(&with(|c| {
            c.remove(claim);
        }));
        assert_eq!(
            check(&t),
            Err(TokenError::MissingClaim(claim.into())),
            "{claim}"
        );
    }
}

#[test]
fn rejects_garbage_and_empty() {
    assert_eq!(check(""), Err(TokenError::Empty));
    for junk in [
        "hunter2",
        "a.b.c",
        "a.b",
        "...",
        "eyJ.eyJ.sig",
        "😀.😀.😀",
        &"A".repeat(MAX_TOKEN_LEN + 1),
    ] {
        let e = check(junk).unwrap_err();
        assert!(matches!(e, TokenError::Malformed(_)), "{junk}: {e:?}");
    }
    assert_eq!(check("a.b.c.d.e"), Err(TokenError::Encrypted));
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","kid":"rsa-1","crit":["exp"]}"#);
    assert_eq!(
        check(&format!("{header}.e30.c2ln")),
        Err(TokenError::CriticalHeader)
    );
}

#[test]
fn nested_kubernetes_claims_match_by_path() {
    let rules = TokenRules {
        issuer: ISS.into(),
        audiences: vec!["pgwarden".into()],
        subjects: vec!["system:serviceaccount:*".into()],
        claims: vec![
            ("kubernetes.io.namespace".into(), "ci".into()),
            ("kubernetes.io.pod.name".into(), "agent-7f9".into()),
        ],
    };
    let pod = |ns: &str, pod: &str| {
        sign(&with(|c| {
            c.insert(
                "sub".into(),
                json!(format!("system:serviceaccount:{ns}:runner")),
            );
            c.insert(
                "kubernetes.io".into(),
                json!({"namespace": ns, "pod": {"name": pod, "uid": "1"},
                       "serviceaccount": {"name": "runner", "uid": "2"}}),
            );
        }))
    };
    let v = verify(&pod("ci", "agent-7f9"), &keys(), &rules, now()).unwrap();
    assert!(v
        .attributes
        .contains(&("kubernetes.io.serviceaccount.name".into(), "runner".into())));
    let e = verify(&pod("prod", "agent-7f9"), &keys(), &rules, now()).unwrap_err();
    assert_eq!(
        e,
        TokenError::ClaimMismatch {
            claim: "kubernetes.io.namespace".into(),
            value: Some("prod".into())
        }
    );
    let e = verify(&pod("ci", "other-pod"), &keys(), &rules, now()).unwrap_err();
    assert!(matches!(e, TokenError::ClaimMismatch { .. }), "{e:?}");
}

#[test]
fn key_sets_drop_symmetric_and_encryption_keys() {
    let only_bad = br#"{"keys":[
        {"kty":"oct","k":"c2VjcmV0","kid":"h"},
        {"kty":"RSA","use":"enc","kid":"e","n":"AQAB","e":"AQAB"}]}"#;
    let e = KeySet::from_json(only_bad).unwrap_err();
    assert!(e.contains("no usable signing key"), "{e}");
    assert!(KeySet::from_json(b"{}").is_err());
    assert!(KeySet::from_json(b"not json").is_err());
    // A symmetric key named like the token's kid cannot be used for HS256
    // (refused by algorithm) nor smuggled in under an RSA alg.
    let mut doc: Value = serde_json::from_slice(JWKS).unwrap();
    doc["keys"]
        .as_array_mut()
        .unwrap()
        .push(json!({"kty":"oct","k":"c2VjcmV0","kid":"sym"}));
    let ks = KeySet::from_json(doc.to_string().as_bytes()).unwrap();
    assert!(!ks.has_kid("sym"));
    assert_eq!(ks.kids(), vec!["rsa-1", "rsa-2", "ec-1"]);
}

#[test]
fn reasons_shorten_and_neutralise_claim_values() {
    let long = format!("repo:evil/{}\x1b[31m", "x".repeat(500));
    let t = sign(&with(|c| {
        c.insert("sub".into(), json!(long));
    }));
    let msg = check(&t).unwrap_err().to_string();
    assert!(msg.len() < 200, "{msg}");
    assert!(!msg.contains('\x1b'), "{msg}");
}
