//! Service-account tokens as a real cluster issues them: RS256 JWTs signed with a
//! key generated at start, `TokenRequest` (`serviceaccounts/NAME/token`),
//! `TokenReview`, the issuer's OIDC discovery document and JWKS, and the bearer
//! authenticator the server itself uses for service accounts.
//!
//! Claims, validation order and error texts follow `pkg/serviceaccount` of the real
//! server (claims.go, jwt.go), because consumers (the operator's TokenReview of an
//! agent, a relying party verifying with the JWKS) depend on them. Everything here is
//! synchronous over a locked [`Store`], so it is tested without sockets.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{self, KeyPair as _, UnparsedPublicKey};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};

use crate::auth::UserInfo;
use crate::status::{ApiError, ApiResult, Cause, Target};
use crate::storage::Store;

/// The real server's default and bounds for `spec.expirationSeconds`.
const DEFAULT_EXPIRATION: i64 = 3600;
const MAX_EXPIRATION: i64 = 1 << 32;
const TOKEN_REQUEST_GROUP: &str = "authentication.k8s.io";

/// The signing key and the rules tokens are issued and checked by.
pub struct Issuer {
    key: KeyPair,
    kid: String,
    /// `iss`, also the server's own (implicit) audience, as with the real server's
    /// `--api-audiences` defaulting to `--service-account-issuer`.
    url: String,
    /// Shortest `expirationSeconds` a TokenRequest may ask for (600 s on a real
    /// server; tests may lower it to see tokens expire).
    min_expiration: Duration,
    /// Clock skew tolerated on `exp`/`nbf`/`iat` (go-jose's default: 1 minute).
    leeway: Duration,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Issuer")
            .field("kid", &self.kid)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// A successfully reviewed token: TokenReview's `status.user` and `audiences`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    pub user: UserInfo,
    pub extra: BTreeMap<String, Vec<String>>,
    pub audiences: Vec<String>,
}

impl Reviewed {
    pub fn user_json(&self) -> Value {
        let mut u = self.user.to_json();
        if !self.extra.is_empty() {
            u["extra"] = json!(self.extra);
        }
        u
    }
}

/// A service-account signing key (RSA 2048, as a real cluster's default).
pub fn generate_key() -> std::io::Result<KeyPair> {
    KeyPair::generate(KeySize::Rsa2048)
        .map_err(|_| std::io::Error::other("generating the service-account signing key"))
}

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn unix_now() -> i64 {
    jiff::Timestamp::now().as_second()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn random_id() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl Issuer {
    /// A fresh 2048-bit key for issuer `url`.
    pub fn generate(
        url: &str,
        min_expiration: Duration,
        leeway: Duration,
    ) -> std::io::Result<Issuer> {
        Issuer::with_key(generate_key()?, url, min_expiration, leeway)
    }

    /// An issuer signing with `key` (from [`generate_key`], which the server runs
    /// beside its other start-up work: RSA generation takes a noticeable while).
    pub fn with_key(
        key: KeyPair,
        url: &str,
        min_expiration: Duration,
        leeway: Duration,
    ) -> std::io::Result<Issuer> {
        use aws_lc_rs::encoding::AsDer;
        // The real server's kid: the SHA-256 of the public key's PKIX DER.
        let der = key
            .public_key()
            .as_der()
            .map_err(|_| std::io::Error::other("encoding the service-account public key"))?;
        let kid = b64(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der.as_ref()).as_ref());
        Ok(Issuer {
            key,
            kid,
            url: url.to_string(),
            min_expiration,
            leeway,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The audiences the API server itself accepts.
    pub fn api_audiences(&self) -> Vec<String> {
        vec![self.url.clone()]
    }

    /// `/.well-known/openid-configuration`
    pub fn discovery(&self) -> Value {
        json!({
            "issuer": self.url,
            "jwks_uri": format!("{}/openid/v1/jwks", self.url),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        })
    }

    /// `/openid/v1/jwks`
    pub fn jwks(&self) -> Value {
        let pk = self.key.public_key();
        json!({"keys": [{
            "use": "sig", "kty": "RSA", "kid": self.kid, "alg": "RS256",
            "n": b64(pk.modulus().big_endian_without_leading_zero()),
            "e": b64(pk.exponent().big_endian_without_leading_zero()),
        }]})
    }

    /// A compact RS256 JWS of `claims`.
    pub fn sign(&self, claims: &Value) -> Result<String, ApiError> {
        let header = json!({"alg": "RS256", "kid": self.kid});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let mut sig = vec![0u8; self.key.public_modulus_len()];
        self.key
            .sign(
                &signature::RSA_PKCS1_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .map_err(|_| ApiError::new(500, "InternalError", "signing the token failed"))?;
        Ok(format!("{input}.{}", b64(&sig)))
    }

    /// The claims of a token this issuer signed, or why it is not one.
    fn verified_claims(&self, token: &str) -> Option<Value> {
        let mut parts = token.split('.');
        let (h, p, s) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).ok()?).ok()?;
        if header["alg"] != "RS256" || header["kid"].as_str().is_some_and(|k| k != self.kid) {
            return None;
        }
        let sig = URL_SAFE_NO_PAD.decode(s).ok()?;
        UnparsedPublicKey::new(
            &signature::RSA_PKCS1_2048_8192_SHA256,
            self.key.public_key().as_ref(),
        )
        .verify(format!("{h}.{p}").as_bytes(), &sig)
        .ok()?;
        let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).ok()?).ok()?;
        (claims["iss"] == self.url.as_str()).then_some(claims)
    }

    /// Authenticates `token` for `audiences` (empty: the API server's own), as the
    /// service-account token authenticator does. `Err(None)`: not a token of this
    /// issuer at all; `Err(Some(reason))`: ours, but not valid now.
    pub fn review(
        &self,
        store: &Store,
        token: &str,
        audiences: &[String],
        now: i64,
    ) -> Result<Reviewed, Option<String>> {
        let claims = self.verified_claims(token).ok_or(None)?;
        let requested = if audiences.is_empty() {
            self.api_audiences()
        } else {
            audiences.to_vec()
        };
        let token_auds = match &claims["aud"] {
            Value::String(s) => vec![s.clone()],
            v => strings(v),
        };
        let auds: Vec<String> = token_auds
            .iter()
            .filter(|a| requested.contains(a))
            .cloned()
            .collect();
        if auds.is_empty() {
            return Err(Some(format!(
                "token audiences {token_auds:?} is invalid for the target audiences {requested:?}"
            )));
        }
        let leeway = i64::try_from(self.leeway.as_secs()).unwrap_or(60);
        let t = |k: &str| claims[k].as_i64();
        if t("exp").is_none_or(|exp| now > exp + leeway) {
            return Err(Some("service account token has expired".into()));
        }
        if t("nbf").is_some_and(|nbf| now + leeway < nbf) {
            return Err(Some("service account token is not valid yet".into()));
        }
        if t("iat").is_some_and(|iat| now + leeway < iat) {
            return Err(Some("service account token is issued in the future".into()));
        }
        let k = &claims["kubernetes.io"];
        let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let (ns, sa_name, sa_uid) = (
            s(&k["namespace"]),
            s(&k["serviceaccount"]["name"]),
            s(&k["serviceaccount"]["uid"]),
        );
        if claims["sub"] != format!("system:serviceaccount:{ns}:{sa_name}").as_str() {
            return Err(Some("service account token claims are invalid".into()));
        }
        let invalidated = || Some("service account token has been invalidated".to_string());
        let sa = store
            .get("/serviceaccounts", &ns, &sa_name)
            .ok_or_else(invalidated)?;
        if sa["metadata"]["deletionTimestamp"].is_string() {
            return Err(invalidated());
        }
        let stored_sa_uid = s(&sa["metadata"]["uid"]);
        if stored_sa_uid != sa_uid {
            return Err(Some(format!(
                "service account UID ({stored_sa_uid}) does not match claim ({sa_uid})"
            )));
        }
        let mut extra = BTreeMap::new();
        let pod = &k["pod"];
        if pod.is_object() {
            let (pod_name, pod_uid) = (s(&pod["name"]), s(&pod["uid"]));
            let p = store.get("/pods", &ns, &pod_name).ok_or_else(invalidated)?;
            if p["metadata"]["deletionTimestamp"].is_string() {
                return Err(invalidated());
            }
            let stored = s(&p["metadata"]["uid"]);
            if stored != pod_uid {
                return Err(Some(format!(
                    "pod UID ({stored}) does not match claim ({pod_uid})"
                )));
            }
            extra.insert(
                "authentication.kubernetes.io/pod-name".to_string(),
                vec![pod_name],
            );
            extra.insert("authentication.kubernetes.io/pod-uid".into(), vec![pod_uid]);
        }
        let secret = &k["secret"];
        if secret.is_object() {
            let (name, uid) = (s(&secret["name"]), s(&secret["uid"]));
            let stored = store.get("/secrets", &ns, &name).ok_or_else(invalidated)?;
            if s(&stored["metadata"]["uid"]) != uid {
                return Err(invalidated());
            }
        }
        if let Some(jti) = claims["jti"].as_str() {
            extra.insert(
                "authentication.kubernetes.io/credential-id".into(),
                vec![format!("JTI={jti}")],
            );
        }
        Ok(Reviewed {
            user: UserInfo {
                username: format!("system:serviceaccount:{ns}:{sa_name}"),
                uid: sa_uid,
                groups: vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{ns}"),
                    "system:authenticated".into(),
                ],
            },
            extra,
            audiences: auds,
        })
    }

    /// `POST /api/v1/namespaces/NS/serviceaccounts/NAME/token`: validates the
    /// TokenRequest `body` and returns it with `status.token` (the response body).
    pub fn token_request(
        &self,
        store: &Store,
        ns: &str,
        sa_name: &str,
        body: &Value,
        now: i64,
    ) -> ApiResult<Value> {
        let sa = store
            .get("/serviceaccounts", ns, sa_name)
            .ok_or_else(|| ApiError::not_found(&Target::new("", "serviceaccounts", sa_name)))?;
        let spec = &body["spec"];
        let mut causes = Vec::new();
        let expiration = match &spec["expirationSeconds"] {
            Value::Null => DEFAULT_EXPIRATION,
            v => v.as_i64().unwrap_or(0),
        };
        let min = i64::try_from(self.min_expiration.as_secs()).unwrap_or(600);
        if expiration < min {
            let detail = if min == 600 {
                "may not specify a duration less than 10 minutes".to_string()
            } else {
                format!("may not specify a duration less than {min} seconds")
            };
            causes.push(Cause::invalid(
                "spec.expirationSeconds",
                &expiration.to_string(),
                &detail,
            ));
        } else if expiration > MAX_EXPIRATION {
            causes.push(Cause::invalid(
                "spec.expirationSeconds",
                &expiration.to_string(),
                "may not specify a duration larger than 2^32 seconds",
            ));
        }
        if !spec["audiences"].is_null()
            && !spec["audiences"]
                .as_array()
                .is_some_and(|a| a.iter().all(Value::is_string))
        {
            causes.push(Cause::invalid(
                "spec.audiences",
                "\"array\"",
                "must be a list of strings",
            ));
        }
        if !causes.is_empty() {
            return Err(ApiError::invalid(
                "TokenRequest",
                TOKEN_REQUEST_GROUP,
                sa_name,
                causes,
            ));
        }
        let mut audiences = strings(&spec["audiences"]);
        if audiences.is_empty() {
            audiences = self.api_audiences();
        }
        let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let sa_uid = s(&sa["metadata"]["uid"]);
        let mut k8s = json!({
            "namespace": ns,
            "serviceaccount": {"name": sa_name, "uid": sa_uid},
        });
        let bound = &spec["boundObjectRef"];
        let mut bound_out = Value::Null;
        if bound.is_object() {
            let (kind, name) = (s(&bound["kind"]), s(&bound["name"]));
            let (key, resource) = match kind.as_str() {
                "Pod" => ("/pods", "pods"),
                "Secret" => ("/secrets", "secrets"),
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "cannot bind token to object of type /v1, Kind={kind}"
                    )));
                }
            };
            let obj = store
                .get(key, ns, &name)
                .ok_or_else(|| ApiError::not_found(&Target::new("", resource, &name)))?;
            let uid = s(&obj["metadata"]["uid"]);
            let want = s(&bound["uid"]);
            if !want.is_empty() && want != uid {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {resource} \"{name}\": the UID in the bound object reference ({want}) does not match the UID in record. The object might have been deleted and then recreated"
                    ),
                ));
            }
            if kind == "Pod" {
                let pod_sa = obj["spec"]["serviceAccountName"]
                    .as_str()
                    .unwrap_or("default");
                if pod_sa != sa_name {
                    return Err(ApiError::bad_request(format!(
                        "cannot bind token for serviceaccount {sa_name:?} to pod running with different serviceaccount name."
                    )));
                }
                k8s["pod"] = json!({"name": name, "uid": uid});
            } else {
                k8s["secret"] = json!({"name": name, "uid": uid});
            }
            bound_out = json!({"kind": kind, "apiVersion": "v1", "name": name, "uid": uid});
        }
        let exp = now.saturating_add(expiration);
        let claims = json!({
            "aud": audiences,
            "exp": exp,
            "iat": now,
            "iss": self.url,
            "jti": random_id(),
            "kubernetes.io": k8s,
            "nbf": now,
            "sub": format!("system:serviceaccount:{ns}:{sa_name}"),
        });
        let token = self.sign(&claims)?;
        let expires = jiff::Timestamp::from_second(exp)
            .map(|t| t.to_string())
            .unwrap_or_default();
        let mut spec_out = json!({"audiences": audiences, "expirationSeconds": expiration});
        if !bound_out.is_null() {
            spec_out["boundObjectRef"] = bound_out;
        }
        let created = jiff::Timestamp::from_second(now)
            .map(|t| t.to_string())
            .unwrap_or_default();
        Ok(json!({
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": sa_name, "namespace": ns, "creationTimestamp": created},
            "spec": spec_out,
            "status": {"token": token, "expirationTimestamp": expires},
        }))
    }

    /// `POST /apis/authentication.k8s.io/v1/tokenreviews` for a token of this issuer
    /// or any other authenticator (`others`, audience-agnostic: they count only for
    /// the API server's own audiences, as the real server wraps them).
    pub fn token_review(
        &self,
        store: &Store,
        body: &Value,
        others: &dyn Fn(&str) -> Option<UserInfo>,
    ) -> Value {
        let token = body["spec"]["token"].as_str().unwrap_or_default();
        let requested = strings(&body["spec"]["audiences"]);
        let status = match self.review(store, token, &requested, unix_now()) {
            Ok(r) => {
                json!({"authenticated": true, "user": r.user_json(), "audiences": r.audiences})
            }
            Err(why) => {
                let implicit = requested.is_empty()
                    || requested.iter().any(|a| self.api_audiences().contains(a));
                match others(token).filter(|_| implicit && why.is_none()) {
                    Some(u) => {
                        let auds = if requested.is_empty() {
                            self.api_audiences()
                        } else {
                            requested.clone()
                        };
                        json!({"authenticated": true, "user": u.to_json(), "audiences": auds})
                    }
                    None => {
                        let error = match why {
                            Some(w) => format!("[invalid bearer token, {w}]"),
                            None => "invalid bearer token".into(),
                        };
                        json!({"user": {}, "error": error})
                    }
                }
            }
        };
        // The token is not sent back: a response body may end up in a log.
        let mut spec = body["spec"].clone();
        if let Some(m) = spec.as_object_mut() {
            m.remove("token");
        } else {
            spec = json!({});
        }
        json!({
            "kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": spec,
            "status": status,
        })
    }

    /// Authenticates an API request's bearer token (audience: the server's own).
    pub fn authenticate(&self, store: &Store, token: &str) -> Option<UserInfo> {
        self.review(store, token, &[], unix_now())
            .ok()
            .map(|r| r.user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    fn store() -> Store {
        let mut s = Store::new(Registry::with_builtins(), 100);
        let _ = s.create(
            "/serviceaccounts",
            "ns1",
            "agent",
            json!({"metadata": {"name": "agent", "namespace": "ns1", "uid": "sa-uid"}}),
        );
        let _ = s.create(
            "/pods",
            "ns1",
            "p",
            json!({"metadata": {"name": "p", "namespace": "ns1", "uid": "pod-uid"},
                   "spec": {"serviceAccountName": "agent"}}),
        );
        s
    }

    fn issuer() -> Issuer {
        Issuer::generate(
            "https://127.0.0.1:1",
            Duration::from_secs(1),
            Duration::ZERO,
        )
        .unwrap()
    }

    fn mint(i: &Issuer, s: &Store, spec: Value, now: i64) -> String {
        let r = i
            .token_request(s, "ns1", "agent", &json!({"spec": spec}), now)
            .unwrap();
        r["status"]["token"].as_str().unwrap().to_string()
    }

    #[test]
    fn bound_token_reviews_until_pod_goes_or_expires() {
        let (i, mut s) = (issuer(), store());
        let now = 1_800_000_000;
        let t = mint(
            &i,
            &s,
            json!({"audiences": ["pgwarden"], "expirationSeconds": 10,
                   "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "p"}}),
            now,
        );
        let aud = vec!["pgwarden".to_string()];
        let r = i.review(&s, &t, &aud, now + 5).unwrap();
        assert_eq!(r.user.username, "system:serviceaccount:ns1:agent");
        assert_eq!(r.user.uid, "sa-uid");
        assert_eq!(
            r.extra["authentication.kubernetes.io/pod-uid"],
            vec!["pod-uid"]
        );
        assert_eq!(r.audiences, aud);
        // Not for the API server itself, nor another audience.
        assert!(i
            .review(&s, &t, &[], now)
            .unwrap_err()
            .unwrap()
            .contains("invalid for the target audiences"));
        assert_eq!(
            i.review(&s, &t, &aud, now + 11).unwrap_err().unwrap(),
            "service account token has expired"
        );
        // A tampered payload fails the signature: not our token at all.
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = b64(br#"{"iss":"https://127.0.0.1:1"}"#);
        parts[1] = &forged;
        assert_eq!(i.review(&s, &parts.join("."), &aud, now), Err(None));
        // The same pod name with a new uid is another pod.
        s.delete("/pods", "ns1", "p", None).unwrap();
        assert_eq!(
            i.review(&s, &t, &aud, now).unwrap_err().unwrap(),
            "service account token has been invalidated"
        );
        let _ = s.create(
            "/pods",
            "ns1",
            "p",
            json!({"metadata": {"name": "p", "namespace": "ns1", "uid": "new-uid"},
                   "spec": {"serviceAccountName": "agent"}}),
        );
        assert!(i
            .review(&s, &t, &aud, now)
            .unwrap_err()
            .unwrap()
            .contains("pod UID (new-uid) does not match claim (pod-uid)"));
    }

    #[test]
    fn token_review_answers_without_echoing_the_token() {
        let (i, s) = (issuer(), store());
        let t = mint(&i, &s, json!({"audiences": ["pgwarden"]}), unix_now());
        let none = |_: &str| None;
        let r = i.token_review(
            &s,
            &json!({"spec": {"token": t, "audiences": ["pgwarden"]}}),
            &none,
        );
        assert_eq!(r["status"]["authenticated"], true, "{r}");
        assert_eq!(r["spec"], json!({"audiences": ["pgwarden"]}));
        assert!(!r.to_string().contains(&t));
        // A static user's token counts only for the API server's own audience.
        let admin = |t: &str| (t == "static").then(UserInfo::anonymous);
        let r = i.token_review(&s, &json!({"spec": {"token": "static"}}), &admin);
        assert_eq!(r["status"]["authenticated"], true, "{r}");
        let r = i.token_review(
            &s,
            &json!({"spec": {"token": "static", "audiences": ["pgwarden"]}}),
            &admin,
        );
        assert_eq!(r["status"]["error"], "invalid bearer token", "{r}");
    }

    #[test]
    fn token_requests_are_checked() {
        let (i, s) = (issuer(), store());
        let req = |spec: Value| i.token_request(&s, "ns1", "agent", &json!({"spec": spec}), 0);
        assert_eq!(req(json!({"expirationSeconds": 0})).unwrap_err().code, 422);
        let e = req(json!({"boundObjectRef": {"kind": "Pod", "name": "nope"}})).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (404, "pods \"nope\" not found")
        );
        let e =
            req(json!({"boundObjectRef": {"kind": "Pod", "name": "p", "uid": "old"}})).unwrap_err();
        assert_eq!(e.code, 409);
        let e = i
            .token_request(&s, "ns1", "ghost", &json!({"spec": {}}), 0)
            .unwrap_err();
        assert_eq!(e.code, 404);
        // Defaults: one hour, the API server's audience.
        let r = req(json!({})).unwrap();
        assert_eq!(r["spec"]["expirationSeconds"], 3600);
        assert_eq!(r["spec"]["audiences"], json!(["https://127.0.0.1:1"]));
        let t = r["status"]["token"].as_str().unwrap();
        assert!(i.authenticate(&s, t).is_none(), "issued at 0: long expired");
        let t = mint(&i, &s, json!({}), unix_now());
        let u = i.authenticate(&s, &t).unwrap();
        assert_eq!(
            u.groups,
            [
                "system:serviceaccounts",
                "system:serviceaccounts:ns1",
                "system:authenticated"
            ]
        );
    }
}
