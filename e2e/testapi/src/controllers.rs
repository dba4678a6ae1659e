//! The control plane's own clients: the garbage collector ([`crate::gc`]), the Job
//! controller ([`crate::jobs`]) and the pod runner ([`crate::kubelet`]) write
//! through [`Client`], which runs the same pipeline as an HTTPS request (admission,
//! validation, conditional commit) and is audited under the component's identity —
//! so a webhook sees a Job's pod being created exactly as on a real cluster.
//!
//! RBAC is not evaluated for these identities: on a real cluster their bootstrap
//! roles allow what they do here, and nothing a test grants or revokes should
//! change what the control plane can do.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::audit::AuditEvent;
use crate::auth::UserInfo;
use crate::handlers::{self, parse_query, Reply, Req, State};
use crate::storage::Change;

/// Starts the always-on controllers (garbage collector, Job controller) on the
/// current runtime; they end with it.
pub fn spawn(state: Arc<State>) {
    tokio::spawn(crate::gc::run(Client::new(
        state.clone(),
        "system:serviceaccount:kube-system:generic-garbage-collector",
    )));
    tokio::spawn(crate::jobs::run(Client::new(
        state,
        "system:serviceaccount:kube-system:job-controller",
    )));
}

/// A failed request: the HTTP code and the Status body.
#[derive(Debug, Clone)]
pub struct Failure {
    pub code: u16,
    pub status: Value,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({})",
            self.status["message"].as_str().unwrap_or("request failed"),
            self.code
        )
    }
}

/// An in-process API client acting as one control-plane identity.
#[derive(Clone)]
pub struct Client {
    state: Arc<State>,
    user: UserInfo,
}

impl Client {
    pub fn new(state: Arc<State>, username: &str) -> Client {
        let mut groups: Vec<String> = if username.starts_with("system:node:") {
            vec!["system:nodes".into()]
        } else {
            vec!["system:serviceaccounts".into()]
        };
        if let Some(ns) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split(':').next())
        {
            groups.push(format!("system:serviceaccounts:{ns}"));
        }
        groups.push("system:authenticated".into());
        Client {
            state,
            user: UserInfo {
                username: username.into(),
                uid: String::new(),
                groups,
            },
        }
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// One request; `path` may carry a query (`...?propagationPolicy=Background`).
    pub async fn request(
        &self,
        method: http::Method,
        path_and_query: &str,
        content_type: &str,
        body: Option<&Value>,
    ) -> Result<Value, Failure> {
        let (path, q) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let query = parse_query(q);
        let info = handlers::request_info(&method, path, &query);
        let req = Req {
            method,
            path: path.into(),
            query,
            accept: "application/json".into(),
            content_type: content_type.into(),
            body: body.map(|b| Bytes::from(b.to_string())).unwrap_or_default(),
            user: self.user.clone(),
        };
        let (code, body) = match handlers::handle(&self.state, &req, &info).await {
            Reply::Json { code, body, .. } => (code, body),
            // Watches are read from the store's feed directly, never through here.
            Reply::Stream(_) => (400, json!({"message": "watch is not served in-process"})),
        };
        let a = &info.attrs;
        self.state.audit.record(AuditEvent {
            user: self.user.username.clone(),
            groups: self.user.groups.clone(),
            verb: a.verb.clone(),
            group: a.group.clone(),
            resource: a.resource.clone(),
            subresource: a.subresource.clone(),
            namespace: a.namespace.clone(),
            name: a.name.clone(),
            uri: path_and_query.into(),
            code,
        });
        if code >= 400 {
            Err(Failure { code, status: body })
        } else {
            Ok(body)
        }
    }

    pub async fn get(&self, path: &str) -> Result<Value, Failure> {
        self.request(http::Method::GET, path, "", None).await
    }

    pub async fn create(&self, path: &str, obj: &Value) -> Result<Value, Failure> {
        self.request(http::Method::POST, path, "application/json", Some(obj))
            .await
    }

    pub async fn merge_patch(&self, path: &str, patch: &Value) -> Result<Value, Failure> {
        self.request(
            http::Method::PATCH,
            path,
            "application/merge-patch+json",
            Some(patch),
        )
        .await
    }

    pub async fn delete(&self, path: &str, options: &Value) -> Result<Value, Failure> {
        self.request(
            http::Method::DELETE,
            path,
            "application/json",
            Some(options),
        )
        .await
    }

    /// The live feed of changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        let store = self.state.store();
        match store.subscribe(store.current_rv()) {
            Ok((_, rx)) => rx,
            // Cannot happen at the current version; an empty feed is still safe
            // because every loop also resyncs on a timer.
            Err(_) => broadcast::channel(1).1,
        }
    }
}

/// The URL path of a stored object (its `apiVersion`, namespace, plural from the
/// storage key `group/plural`).
pub fn object_path(storage_key: &str, obj: &Value) -> String {
    let plural = storage_key.rsplit('/').next().unwrap_or_default();
    let av = obj["apiVersion"].as_str().unwrap_or("v1");
    let base = if av.contains('/') {
        format!("/apis/{av}")
    } else {
        format!("/api/{av}")
    };
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    if ns.is_empty() {
        format!("{base}/{plural}/{name}")
    } else {
        format!("{base}/namespaces/{ns}/{plural}/{name}")
    }
}

/// Waits until a change satisfies `relevant` (or the feed lagged, or `resync`
/// passed): level-triggered loops then look at the whole state again. `None`
/// when the feed is closed (server stopped).
pub async fn next_relevant(
    rx: &mut broadcast::Receiver<Arc<Change>>,
    resync: Duration,
    relevant: impl Fn(&Change) -> bool,
) -> Option<()> {
    let deadline = tokio::time::Instant::now() + resync;
    loop {
        tokio::select! {
            r = rx.recv() => match r {
                Ok(c) if relevant(&c) => return Some(()),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => return Some(()),
                Err(broadcast::error::RecvError::Closed) => return None,
            },
            _ = tokio::time::sleep_until(deadline) => return Some(()),
        }
    }
}
