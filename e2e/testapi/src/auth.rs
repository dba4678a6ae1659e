//! Authentication: who is asking. Static bearer tokens for people (the
//! `--token-auth-file` of a real API server) resolve to a [`UserInfo`]; every
//! authenticated user also gets `system:authenticated`, as the real server adds.
//!
//! Service-account JWTs are checked after the static tokens by
//! [`crate::tokens::Issuer::authenticate`] (it needs the store: the service account
//! and a bound pod must still exist); impersonation headers are applied after
//! authentication in [`crate::server`].

use std::collections::HashMap;

use serde_json::{json, Value};

/// The identity the authorizer and the audit log see (`authentication.k8s.io/v1`
/// `UserInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
}

impl UserInfo {
    pub fn anonymous() -> UserInfo {
        UserInfo {
            username: "system:anonymous".into(),
            uid: String::new(),
            groups: vec!["system:unauthenticated".into()],
        }
    }

    pub fn to_json(&self) -> Value {
        json!({ "username": self.username, "uid": self.uid, "groups": self.groups })
    }
}

/// A static user: its bearer token and identity.
#[derive(Debug, Clone)]
pub struct StaticUser {
    pub name: String,
    pub token: String,
    pub groups: Vec<String>,
}

/// Anything that can turn a bearer token into a user.
pub trait Authenticator: Send + Sync {
    fn authenticate(&self, token: &str) -> Option<UserInfo>;
}

/// `--token-auth-file`: a fixed table of tokens.
#[derive(Debug, Default)]
pub struct StaticTokens {
    by_token: HashMap<String, UserInfo>,
}

impl StaticTokens {
    pub fn new(users: &[StaticUser]) -> StaticTokens {
        let by_token = users
            .iter()
            .map(|u| {
                let mut groups = u.groups.clone();
                groups.push("system:authenticated".into());
                (
                    u.token.clone(),
                    UserInfo {
                        username: u.name.clone(),
                        uid: format!("uid-{}", u.name),
                        groups,
                    },
                )
            })
            .collect();
        StaticTokens { by_token }
    }
}

impl Authenticator for StaticTokens {
    fn authenticate(&self, token: &str) -> Option<UserInfo> {
        self.by_token.get(token).cloned()
    }
}

/// Random URL-safe token text.
pub fn random_token() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..32)
        .map(|_| {
            let i = rng.random_range(0..36u8);
            (if i < 10 { b'0' + i } else { b'a' + i - 10 }) as char
        })
        .collect()
}

/// The default people of a test cluster: `admin` (cluster superuser through
/// `system:masters`), `alice` (group `dba-oncall`), `bob` (no group).
pub fn default_users() -> Vec<StaticUser> {
    let u = |name: &str, groups: &[&str]| StaticUser {
        name: name.into(),
        token: format!("{name}-{}", random_token()),
        groups: groups.iter().map(|g| g.to_string()).collect(),
    };
    vec![
        u("admin", &["system:masters"]),
        u("alice", &["dba-oncall"]),
        u("bob", &[]),
    ]
}

/// A kubeconfig (JSON, which every kubeconfig reader accepts as YAML) with one
/// cluster `testapi`, one user and one context per static user (context name = user
/// name), namespace `default`, current context `current`.
pub fn kubeconfig(server: &str, ca_pem: &[u8], users: &[StaticUser], current: &str) -> Value {
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    json!({
        "apiVersion": "v1",
        "kind": "Config",
        "preferences": {},
        "clusters": [{ "name": "testapi", "cluster": {
            "server": server, "certificate-authority-data": ca } }],
        "users": users.iter().map(|u| json!({ "name": u.name, "user": { "token": u.token } }))
            .collect::<Vec<_>>(),
        "contexts": users.iter().map(|u| json!({ "name": u.name, "context": {
            "cluster": "testapi", "user": u.name, "namespace": "default" } }))
            .collect::<Vec<_>>(),
        "current-context": current,
    })
}
