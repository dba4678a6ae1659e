//! Resource requests: routing a URL to a type, and the verbs. Writes go through one
//! pipeline, in the real server's order:
//!
//! decode → (patch applied to the current object) → system metadata and status
//! subresource rules → prune + default (CRD schema) → mutating admission →
//! validation (metadata, the kind's own checks, the CRD schema) → validating
//! admission → conditional commit (409 on a stale resourceVersion; patches retry).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::admission::{Admission, AdmissionAttributes};
use crate::audit::Audit;
use crate::auth::{Authenticator, UserInfo};
use crate::authz::{self, Attributes};
use crate::patch;
use crate::registry::{types_from_crd, ResourceType};
use crate::selectors::{extra_fields, FieldSelector, LabelSelector};
use crate::status::{ApiError, ApiResult, Cause, Target};
use crate::storage::{rv_of, Change, Store, WriteError};
use crate::table;

/// Everything a request handler needs.
pub struct State {
    pub store: Mutex<Store>,
    /// Service-account tokens: TokenRequest, TokenReview, bearer authentication.
    pub issuer: crate::tokens::Issuer,
    pub authenticators: Vec<Box<dyn Authenticator>>,
    pub audit: Audit,
    pub admission: Admission,
    /// `127.0.0.1:port`
    pub server_addr: String,
    pub bookmark_interval: Duration,
    /// Container logs of the pods a runner runs (`pods/log`).
    pub pod_logs: crate::kubelet::LogSource,
}

impl State {
    /// The store lock; a panic elsewhere must not wedge every later request.
    pub fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A decoded request.
pub struct Req {
    pub method: http::Method,
    pub path: String,
    pub query: HashMap<String, String>,
    pub accept: String,
    pub content_type: String,
    pub body: Bytes,
    pub user: UserInfo,
}

impl Req {
    pub fn q(&self, k: &str) -> &str {
        self.query.get(k).map(String::as_str).unwrap_or("")
    }
}

pub enum Reply {
    Json {
        code: u16,
        body: Value,
        warnings: Vec<String>,
    },
    /// A watch: newline-delimited JSON events until the sender is dropped.
    Stream(mpsc::Receiver<Bytes>),
}

impl Reply {
    fn ok(code: u16, body: Value) -> Reply {
        Reply::Json {
            code,
            body,
            warnings: Vec::new(),
        }
    }
}

impl From<ApiError> for Reply {
    fn from(e: ApiError) -> Reply {
        Reply::ok(e.code, e.to_status())
    }
}

/// Where a URL points (`RequestInfo` of the real server).
#[derive(Debug, Clone, Default)]
pub struct RequestInfo {
    pub attrs: Attributes,
    pub version: String,
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Parses a path into request attributes. Non-resource paths get
/// `resource_request = false` and the lowercase method as verb.
pub fn request_info(
    method: &http::Method,
    path: &str,
    query: &HashMap<String, String>,
) -> RequestInfo {
    let parts: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let non_resource = || RequestInfo {
        attrs: Attributes {
            verb: method.as_str().to_lowercase(),
            path: path.to_string(),
            ..Attributes::default()
        },
        version: String::new(),
    };
    let (group, version, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] if !rest.is_empty() => ("", *v, rest),
        ["apis", g, v, rest @ ..] if !rest.is_empty() => (*g, *v, rest),
        _ => return non_resource(),
    };
    let mut a = Attributes {
        resource_request: true,
        group: group.into(),
        path: path.into(),
        ..Attributes::default()
    };
    let rest: &[&str] = if rest[0] == "namespaces"
        && rest.len() >= 3
        && !matches!(rest[2], "status" | "finalize")
    {
        a.namespace = rest[1].into();
        &rest[2..]
    } else {
        rest
    };
    a.resource = rest[0].into();
    if let Some(n) = rest.get(1) {
        a.name = (*n).into();
    }
    if let Some(s) = rest.get(2) {
        a.subresource = (*s).into();
    }
    if rest.len() > 3 {
        return non_resource();
    }
    a.verb = match *method {
        http::Method::GET | http::Method::HEAD if a.name.is_empty() => {
            if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
                "watch"
            } else {
                "list"
            }
        }
        http::Method::GET | http::Method::HEAD => "get",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE if a.name.is_empty() => "deletecollection",
        http::Method::DELETE => "delete",
        _ => "unknown",
    }
    .into();
    // As the real RequestInfoFactory: a list or watch selecting one name by
    // `fieldSelector=metadata.name=X` is authorized (and audited) as for X, so
    // a Role with resourceNames can allow watching exactly one object.
    if matches!(a.verb.as_str(), "list" | "watch") {
        if let Some(fs) = query.get("fieldSelector") {
            let one = fs
                .strip_prefix("metadata.name==")
                .or_else(|| fs.strip_prefix("metadata.name="));
            if let Some(n) = one.filter(|n| !n.contains(',') && !n.is_empty()) {
                a.name = n.to_string();
            }
        }
    }
    // A namespace's own name is also its namespace for authorization.
    if a.resource == "namespaces" && !a.name.is_empty() {
        a.namespace = a.name.clone();
    }
    RequestInfo {
        attrs: a,
        version: version.into(),
    }
}

fn target(rt: &ResourceType, name: &str) -> Target {
    Target::new(&rt.group, &rt.plural, name)
}

fn write_err(e: WriteError, rt: &ResourceType, name: &str) -> ApiError {
    match e {
        WriteError::NotFound => ApiError::not_found(&target(rt, name)),
        WriteError::AlreadyExists => ApiError::already_exists(&target(rt, name)),
        WriteError::Conflict => ApiError::conflict(&target(rt, name)),
    }
}

/// The object as served at the requested version.
fn present(rt: &ResourceType, mut obj: Value) -> Value {
    obj["apiVersion"] = json!(rt.api_version());
    obj["kind"] = json!(rt.kind);
    obj
}

fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

pub(crate) fn new_uid() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn wants_table(req: &Req) -> bool {
    req.accept.contains("as=Table")
}

/// Entry point for resource requests (already authorized).
pub async fn handle(state: &Arc<State>, req: &Req, info: &RequestInfo) -> Reply {
    match handle_inner(state, req, info).await {
        Ok(r) => r,
        Err(e) => e.into(),
    }
}

async fn handle_inner(state: &Arc<State>, req: &Req, info: &RequestInfo) -> ApiResult<Reply> {
    let a = &info.attrs;
    let rt = state
        .store()
        .registry
        .get(&a.group, &info.version, &a.resource)
        .ok_or_else(ApiError::path_not_found)?;
    let served_subresource = (a.subresource == "status" && rt.status_subresource)
        || (a.subresource == "token" && rt.group.is_empty() && rt.plural == "serviceaccounts")
        || (a.subresource == "log" && rt.group.is_empty() && rt.plural == "pods");
    if !a.subresource.is_empty() && !served_subresource {
        return Err(ApiError::path_not_found());
    }
    if !rt.namespaced && !a.namespace.is_empty() && rt.plural != "namespaces" {
        return Err(ApiError::path_not_found());
    }
    let ns = if rt.namespaced {
        a.namespace.clone()
    } else {
        String::new()
    };
    if a.subresource == "log" {
        return match a.verb.as_str() {
            "get" => pod_log(state, req, &ns, &a.name),
            _ => Err(ApiError::method_not_allowed()),
        };
    }
    if a.subresource == "token" {
        return match a.verb.as_str() {
            "create" => token_request(state, req, &ns, &a.name).map(|v| Reply::ok(201, v)),
            _ => Err(ApiError::method_not_allowed()),
        };
    }
    if rt.virtual_create {
        return match a.verb.as_str() {
            "create" => access_review(state, req, &rt).map(|v| Reply::ok(201, v)),
            _ => Err(ApiError::method_not_allowed()),
        };
    }
    match a.verb.as_str() {
        "get" => {
            let obj = state
                .store()
                .get(&rt.storage_key(), &ns, &a.name)
                .cloned()
                .ok_or_else(|| ApiError::not_found(&target(&rt, &a.name)))?;
            let obj = present(&rt, obj);
            if wants_table(req) {
                let rv = rv_of(&obj);
                Ok(Reply::ok(
                    200,
                    table::table(&rt, &[obj], rv, req.q("includeObject"), true),
                ))
            } else {
                Ok(Reply::ok(200, obj))
            }
        }
        "list" => list(state, req, &rt, a),
        "watch" => watch(state, req, rt.clone(), a),
        "create" => write(state, req, &rt, a, &ns).await,
        "update" | "patch" => write(state, req, &rt, a, &ns).await,
        "delete" => delete(state, req, &rt, &ns, &a.name).await,
        "deletecollection" => {
            let (objs, _) = select(state, req, &rt, a)?;
            for o in objs {
                let n = o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let ons = o["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                delete(state, req, &rt, &ons, &n).await.ok();
            }
            Ok(Reply::ok(
                200,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
            ))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn selectors(req: &Req, rt: &ResourceType) -> ApiResult<(LabelSelector, FieldSelector)> {
    Ok((
        LabelSelector::parse(req.q("labelSelector"))?,
        FieldSelector::parse(req.q("fieldSelector"), extra_fields(&rt.group, &rt.plural))?,
    ))
}

fn select(
    state: &State,
    req: &Req,
    rt: &ResourceType,
    a: &Attributes,
) -> ApiResult<(Vec<Value>, u64)> {
    let (ls, fs) = selectors(req, rt)?;
    let store = state.store();
    let ns = (!a.namespace.is_empty()).then_some(a.namespace.as_str());
    let objs = store
        .list(&rt.storage_key(), ns)
        .into_iter()
        .map(|o| present(rt, o))
        .filter(|o| ls.matches(o) && fs.matches(o))
        .collect();
    Ok((objs, store.current_rv()))
}

fn list(state: &State, req: &Req, rt: &ResourceType, a: &Attributes) -> ApiResult<Reply> {
    let (objs, rv) = select(state, req, rt, a)?;
    // `limit`/`continue` are not implemented: the whole list is one page, which
    // every client accepts (no continue token means the end).
    if wants_table(req) {
        return Ok(Reply::ok(
            200,
            table::table(rt, &objs, rv, req.q("includeObject"), true),
        ));
    }
    Ok(Reply::ok(
        200,
        json!({
            "apiVersion": rt.api_version(), "kind": rt.list_kind(),
            "metadata": {"resourceVersion": rv.to_string()}, "items": objs,
        }),
    ))
}

fn event_line(kind: &str, object: Value) -> Bytes {
    let mut s = json!({"type": kind, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn watch(state: &Arc<State>, req: &Req, rt: Arc<ResourceType>, a: &Attributes) -> ApiResult<Reply> {
    let (ls, fs) = selectors(req, &rt)?;
    let ns = a.namespace.clone();
    let table_mode = wants_table(req);
    let include = req.q("includeObject").to_string();
    let bookmarks = req.q("allowWatchBookmarks") == "true";
    let send_initial = req.q("sendInitialEvents") == "true";
    let timeout = req
        .q("timeoutSeconds")
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs);
    let rv_param = req.q("resourceVersion").to_string();
    let from: Option<u64> = match rv_param.as_str() {
        "" | "0" => None,
        s => Some(
            s.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {s}")))?,
        ),
    };
    let key = rt.storage_key();
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let matches = move |o: &Value| {
        ls.matches(o) && fs.matches(o) && (ns.is_empty() || o["metadata"]["namespace"] == json!(ns))
    };
    let rt2 = rt.clone();
    let mut headers_sent = false;
    let mut render = move |kind: &str, obj: Value| -> Bytes {
        let obj = present(&rt2, obj);
        if table_mode {
            let rv = rv_of(&obj);
            let t = table::table(&rt2, &[obj], rv, &include, !headers_sent);
            headers_sent = true;
            event_line(kind, t)
        } else {
            event_line(kind, obj)
        }
    };
    // Initial state and subscription under one lock: no change can fall between.
    let (initial, subscription, start_rv) = {
        let store = state.store();
        let start = from.unwrap_or(store.current_rv());
        let initial = if from.is_none() || send_initial {
            store.list(&key, None)
        } else {
            Vec::new()
        };
        (initial, store.subscribe(start), start)
    };
    let state = state.clone();
    tokio::spawn(async move {
        let (backlog, mut rx_changes) = match subscription {
            Ok(s) => s,
            Err(oldest) => {
                // The real server answers an expired watch with 200 and an ERROR
                // event carrying the 410 Status; clients relist on it.
                let e = ApiError::gone(start_rv, oldest);
                let _ = tx.send(event_line("ERROR", e.to_status())).await;
                return;
            }
        };
        let mut last_rv = start_rv;
        for o in initial.into_iter().filter(|o| matches(o)) {
            last_rv = last_rv.max(rv_of(&o));
            if tx.send(render("ADDED", o)).await.is_err() {
                return;
            }
        }
        if send_initial {
            let bm = json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": {
                "resourceVersion": start_rv.to_string(),
                "annotations": {"k8s.io/initial-events-end": "true"}}});
            if tx.send(event_line("BOOKMARK", bm)).await.is_err() {
                return;
            }
        }
        let deliver = |c: &Change, render: &mut dyn FnMut(&str, Value) -> Bytes| -> Option<Bytes> {
            if c.key != key {
                return None;
            }
            let now = matches(&c.object);
            let before = c.previous.as_ref().is_some_and(&matches);
            let kind = match (c.kind, before, now) {
                ("ADDED", _, true) => "ADDED",
                ("MODIFIED", true, true) => "MODIFIED",
                ("MODIFIED", false, true) => "ADDED",
                ("MODIFIED", true, false) => "DELETED",
                ("DELETED", true, _) => "DELETED",
                _ => return None,
            };
            Some(render(kind, c.object.clone()))
        };
        for c in backlog {
            last_rv = c.rv;
            if let Some(line) = deliver(&c, &mut render) {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut tick = tokio::time::interval(state.bookmark_interval);
        tick.tick().await;
        loop {
            let sleep_until =
                deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            let line = tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep_until(sleep_until) => return,
                r = rx_changes.recv() => match r {
                    Ok(c) if c.rv <= last_rv => None,
                    Ok(c) => { last_rv = c.rv; deliver(&c, &mut render) }
                    // Too slow a reader: end the watch; the client re-watches from
                    // its last resourceVersion (or relists on 410).
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    // Drain what is queued under the lock, so the bookmark's version
                    // never skips a change this watch has not delivered.
                    let (pending, current) = {
                        let store = state.store();
                        let mut p = Vec::new();
                        while let Ok(c) = rx_changes.try_recv() { p.push(c); }
                        (p, store.current_rv())
                    };
                    for c in pending {
                        if c.rv > last_rv {
                            last_rv = c.rv;
                            if let Some(l) = deliver(&c, &mut render) {
                                if tx.send(l).await.is_err() { return; }
                            }
                        }
                    }
                    last_rv = last_rv.max(current);
                    Some(event_line("BOOKMARK", json!({"kind": rt.kind, "apiVersion": rt.api_version(),
                        "metadata": {"resourceVersion": last_rv.to_string()}})))
                }
            };
            if let Some(l) = line {
                if tx.send(l).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(Reply::Stream(rx))
}

// ---------------------------------------------------------------------------
// writes

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn is_dns_label(s: &str) -> bool {
    s.len() <= 63 && !s.contains('.') && is_dns_subdomain(s)
}

fn validate_metadata(rt: &ResourceType, obj: &Value, causes: &mut Vec<Cause>) {
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    let label_only = matches!(rt.plural.as_str(), "namespaces" | "services");
    let ok = if label_only {
        is_dns_label(name)
    } else {
        is_dns_subdomain(name)
    };
    if !ok {
        let detail = if label_only {
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
        } else {
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
        };
        causes.push(Cause::invalid(
            "metadata.name",
            &json!(name).to_string(),
            detail,
        ));
    }
    for field in ["labels", "annotations"] {
        let v = &obj["metadata"][field];
        if !v.is_null()
            && !v
                .as_object()
                .is_some_and(|m| m.values().all(Value::is_string))
        {
            causes.push(Cause::invalid(
                &format!("metadata.{field}"),
                "\"object\"",
                "values must be strings",
            ));
        }
    }
}

/// Checks of the built-in kinds beyond metadata (a small subset of the real ones:
/// enough that obviously broken objects do not slip through).
fn validate_builtin(rt: &ResourceType, obj: &Value, causes: &mut Vec<Cause>) {
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("rbac.authorization.k8s.io", "rolebindings" | "clusterrolebindings") => {
            for f in ["kind", "name"] {
                if obj["roleRef"][f].as_str().unwrap_or_default().is_empty() {
                    causes.push(Cause::required(&format!("roleRef.{f}")));
                }
            }
        }
        ("", "secrets") => {
            use base64::Engine;
            if let Some(d) = obj["data"].as_object() {
                for (k, v) in d {
                    let ok = v.as_str().is_some_and(|s| {
                        base64::engine::general_purpose::STANDARD.decode(s).is_ok()
                    });
                    if !ok {
                        causes.push(Cause::invalid(
                            &format!("data[{k}]"),
                            "\"<secret contents redacted>\"",
                            "illegal base64 data",
                        ));
                    }
                }
            }
        }
        ("", "pods")
            if obj["spec"]["containers"]
                .as_array()
                .is_none_or(|c| c.is_empty()) =>
        {
            causes.push(Cause::required("spec.containers"));
        }
        _ => {}
    }
}

/// What the server does to a new object of a kind before storing it.
fn prepare_create_builtin(rt: &ResourceType, obj: &mut Value) {
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "namespaces") => {
            obj["status"] = json!({"phase": "Active"});
            if obj["spec"]["finalizers"].is_null() {
                obj["spec"] = json!({"finalizers": ["kubernetes"]});
            }
            let name = obj["metadata"]["name"].clone();
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
        }
        ("", "pods") => {
            obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
            let spec = &mut obj["spec"];
            for (k, v) in [
                ("serviceAccountName", json!("default")),
                ("restartPolicy", json!("Always")),
                ("dnsPolicy", json!("ClusterFirst")),
                ("schedulerName", json!("default-scheduler")),
                ("terminationGracePeriodSeconds", json!(30)),
            ] {
                if spec[k].is_null() {
                    spec[k] = v;
                }
            }
        }
        ("", "secrets") if obj["type"].is_null() => obj["type"] = json!("Opaque"),
        ("batch", "jobs") => crate::jobs::default_new_job(obj),
        _ => {}
    }
}

fn normalize_builtin(rt: &ResourceType, obj: &mut Value) {
    // `stringData` is write-only: merged into `data`, base64-encoded.
    if rt.group.is_empty() && rt.plural == "secrets" {
        if let Some(sd) = obj.as_object_mut().and_then(|m| m.remove("stringData")) {
            use base64::Engine;
            if let Some(sd) = sd.as_object() {
                for (k, v) in sd {
                    let enc = base64::engine::general_purpose::STANDARD
                        .encode(v.as_str().unwrap_or_default());
                    obj["data"][k] = json!(enc);
                }
            }
        }
    }
}

/// Content compared for `generation`: everything but metadata and status.
fn generation_content(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        for k in ["metadata", "status", "apiVersion", "kind"] {
            m.remove(k);
        }
    }
    o
}

fn decode_body(req: &Req) -> ApiResult<Value> {
    let ct = req
        .content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim();
    if ct == "application/vnd.kubernetes.protobuf" {
        return crate::proto::decode(&req.body).ok_or_else(|| ApiError::unsupported_media_type(ct));
    }
    if !ct.is_empty() && ct != "application/json" && !ct.ends_with("+json") && ct != "*/*" {
        return Err(ApiError::unsupported_media_type(ct));
    }
    serde_json::from_slice(&req.body).map_err(|e| {
        ApiError::bad_request(format!(
            "the object provided is unrecognized: json parse error: {e}"
        ))
    })
}

fn check_type(rt: &ResourceType, obj: &Value) -> ApiResult<()> {
    let av = obj["apiVersion"].as_str().unwrap_or_default();
    let kind = obj["kind"].as_str().unwrap_or_default();
    if kind.is_empty() {
        return Err(ApiError::bad_request(
            "Object 'Kind' is missing in the object provided",
        ));
    }
    if kind != rt.kind {
        return Err(ApiError::bad_request(format!(
            "the object provided is unrecognized (must be of type {}): kind {kind} does not match {}",
            rt.kind, rt.kind
        )));
    }
    if av != rt.api_version() {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({av}) does not match the expected API version ({})",
            rt.api_version()
        )));
    }
    if !obj["metadata"].is_object() && !obj["metadata"].is_null() {
        return Err(ApiError::bad_request("metadata must be an object"));
    }
    Ok(())
}

async fn write(
    state: &Arc<State>,
    req: &Req,
    rt: &Arc<ResourceType>,
    a: &Attributes,
    ns: &str,
) -> ApiResult<Reply> {
    // A patch may race with another writer between read and commit: the real
    // server retries patches (GuaranteedUpdate); a PUT with a stale version fails.
    for _ in 0..5 {
        match write_once(state, req, rt, a, ns).await {
            Err(e)
                if e.code == 409
                    && e.reason == "Conflict"
                    && a.verb == "patch"
                    && !req_has_rv_precondition(req) =>
            {
                continue
            }
            r => return r,
        }
    }
    Err(ApiError::conflict(&target(rt, &a.name)))
}

fn req_has_rv_precondition(req: &Req) -> bool {
    serde_json::from_slice::<Value>(&req.body)
        .ok()
        .is_some_and(|p| p["metadata"]["resourceVersion"].is_string())
}

async fn write_once(
    state: &Arc<State>,
    req: &Req,
    rt: &Arc<ResourceType>,
    a: &Attributes,
    ns: &str,
) -> ApiResult<Reply> {
    let key = rt.storage_key();
    let creating = a.verb == "create";
    let status_only = a.subresource == "status";
    let dry_run = req.q("dryRun") == "All";
    let mut warnings = Vec::new();

    let old: Option<Value> = if creating {
        None
    } else {
        Some(
            state
                .store()
                .get(&key, ns, &a.name)
                .cloned()
                .ok_or_else(|| ApiError::not_found(&target(rt, &a.name)))?,
        )
    };

    // 1. the new object, as sent or as patched
    let mut obj = if a.verb == "patch" {
        let patch_body: Value = serde_json::from_slice(&req.body)
            .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
        let mut cur = present(rt, old.clone().unwrap_or_default());
        let ct = req
            .content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim();
        match ct {
            "application/merge-patch+json" => patch::merge_patch(&mut cur, &patch_body),
            "application/json-patch+json" => patch::json_patch(&mut cur, &patch_body)?,
            "application/strategic-merge-patch+json" if rt.crd_name.is_none() => {
                patch::strategic_merge_patch(&mut cur, &patch_body)
            }
            _ => {
                return Err(ApiError::new(415, "UnsupportedMediaType", format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json{}",
                    if rt.crd_name.is_none() { ", application/strategic-merge-patch+json" } else { "" })));
            }
        }
        // A resourceVersion in the patch is a precondition.
        if let (Some(want), Some(o)) = (patch_body["metadata"]["resourceVersion"].as_str(), &old) {
            if want != rv_of(o).to_string() {
                return Err(ApiError::conflict(&target(rt, &a.name)));
            }
        }
        cur
    } else {
        decode_body(req)?
    };
    check_type(rt, &obj)?;
    normalize_builtin(rt, &mut obj);
    if obj["metadata"].is_null() {
        obj["metadata"] = json!({});
    }

    // 2. identity: namespace and name
    let body_ns = obj["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if rt.namespaced {
        if !body_ns.is_empty() && body_ns != ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        obj["metadata"]["namespace"] = json!(ns);
    } else if let Some(m) = obj["metadata"].as_object_mut() {
        m.remove("namespace");
    }
    if creating {
        if obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .is_empty()
        {
            match obj["metadata"]["generateName"].as_str() {
                Some(g) if !g.is_empty() => {
                    let suffix: String = crate::auth::random_token().chars().take(5).collect();
                    obj["metadata"]["name"] = json!(format!("{g}{suffix}"));
                }
                _ => {
                    return Err(ApiError::invalid(
                        &rt.kind,
                        &rt.group,
                        "",
                        vec![Cause {
                            reason: "FieldValueRequired",
                            message: "Required value: name or generateName is required".into(),
                            field: "metadata.name".into(),
                        }],
                    ));
                }
            }
        }
        if rt.namespaced && state.store().get("/namespaces", "", ns).is_none() {
            return Err(ApiError::not_found(&Target::new("", "namespaces", ns)));
        }
    } else {
        let body_name = obj["metadata"]["name"].as_str().unwrap_or_default();
        if body_name != a.name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({})",
                a.name
            )));
        }
    }
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    // 3. system metadata and the status subresource
    let meta = obj["metadata"]
        .as_object_mut()
        .expect("metadata is an object");
    meta.remove("managedFields");
    meta.remove("selfLink");
    let expected_rv = match &old {
        None => {
            meta.remove("resourceVersion");
            meta.remove("deletionTimestamp");
            meta.insert("uid".into(), json!(new_uid()));
            meta.insert("creationTimestamp".into(), json!(now()));
            if rt.has_generation {
                meta.insert("generation".into(), json!(1));
            } else {
                meta.remove("generation");
            }
            0
        }
        Some(old) => {
            let current = rv_of(old);
            let sent = meta
                .get("resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if a.verb == "update" {
                if sent.is_empty() {
                    if !rt.allow_unconditional_update {
                        return Err(ApiError::invalid(
                            &rt.kind,
                            &rt.group,
                            &name,
                            vec![Cause::invalid(
                                "metadata.resourceVersion",
                                "0x0",
                                "must be specified for an update",
                            )],
                        ));
                    }
                } else if sent != current.to_string() {
                    return Err(ApiError::conflict(&target(rt, &name)));
                }
            }
            for k in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
            ] {
                match old["metadata"].get(k) {
                    Some(v) => meta.insert(k.into(), v.clone()),
                    None => meta.remove(k),
                };
            }
            current
        }
    };
    if rt.status_subresource {
        if status_only {
            // Everything but status comes from the stored object.
            let status = obj.get("status").cloned();
            let mut o = old.clone().unwrap_or_default();
            match status {
                Some(s) => o["status"] = s,
                None => {
                    if let Some(m) = o.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            obj = present(rt, o);
        } else if let Some(old) = &old {
            match old.get("status") {
                Some(s) => obj["status"] = s.clone(),
                None => {
                    if let Some(m) = obj.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        } else if let Some(m) = obj.as_object_mut() {
            m.remove("status");
        }
    }
    if creating {
        prepare_create_builtin(rt, &mut obj);
    }

    // 4. prune and default (custom resources)
    if let Some(schema) = &rt.schema {
        let mut unknown = Vec::new();
        schema.prune_root(&mut obj, &mut unknown);
        if !unknown.is_empty() {
            let list: Vec<String> = unknown
                .iter()
                .map(|u| format!("unknown field \"{u}\""))
                .collect();
            match req.q("fieldValidation") {
                "Strict" => {
                    return Err(ApiError::bad_request(format!(
                        "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
                        rt.kind,
                        rt.version,
                        rt.kind,
                        list.join(", ")
                    )));
                }
                "Warn" => warnings.extend(list),
                _ => {}
            }
        }
        schema.apply_defaults(&mut obj);
    }

    // 5. admission and validation
    let attrs = AdmissionAttributes {
        operation: if creating { "CREATE" } else { "UPDATE" },
        group: rt.group.clone(),
        version: rt.version.clone(),
        kind: rt.kind.clone(),
        resource: rt.plural.clone(),
        subresource: a.subresource.clone(),
        namespace: ns.to_string(),
        name: name.clone(),
        user: req.user.clone(),
        old_object: old.clone(),
        dry_run,
    };
    state.admission.mutate(state, &attrs, &mut obj).await?;
    let mut causes = Vec::new();
    validate_metadata(rt, &obj, &mut causes);
    validate_builtin(rt, &obj, &mut causes);
    if let Some(schema) = &rt.schema {
        schema.validate_root(&obj, old.as_ref(), &mut causes);
    }
    let crd_types =
        if rt.group == "apiextensions.k8s.io" && rt.plural == "customresourcedefinitions" {
            match types_from_crd(&obj) {
                Ok(t) => Some(t),
                Err(c) => {
                    causes.extend(c);
                    None
                }
            }
        } else {
            None
        };
    if !causes.is_empty() {
        return Err(ApiError::invalid(&rt.kind, &rt.group, &name, causes));
    }
    state.admission.validate(state, &attrs, &obj).await?;

    // 6. generation, CRD status, commit
    if rt.has_generation {
        if let Some(old) = &old {
            if generation_content(old) != generation_content(&obj) {
                let g = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
                obj["metadata"]["generation"] = json!(g);
            }
        }
    }
    if crd_types.is_some() {
        obj["status"] = json!({
            "acceptedNames": obj["spec"]["names"],
            "storedVersions": obj["spec"]["versions"].as_array().map(|vs| vs.iter()
                .filter(|v| v["storage"].as_bool().unwrap_or(false)).map(|v| v["name"].clone()).collect::<Vec<_>>()),
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now()},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now()},
            ],
        });
    }
    let obj = present(rt, obj);
    if dry_run {
        return Ok(Reply::Json {
            code: if creating { 201 } else { 200 },
            body: obj,
            warnings,
        });
    }
    let finalize = !creating
        && obj["metadata"]["deletionTimestamp"].is_string()
        && obj["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|f| f.is_empty());
    let mut store = state.store();
    let result = if creating {
        store.create(&key, ns, &name, obj)
    } else if finalize {
        // The last finalizer is gone from an object being deleted: it goes now.
        store.delete(&key, ns, &name, Some(expected_rv))
    } else {
        store.update(&key, ns, &name, expected_rv, obj)
    }
    .map_err(|e| write_err(e, rt, &name))?;
    if let Some(types) = crd_types {
        store.registry.remove_crd(&name);
        for t in types {
            store.registry.insert(t);
        }
    }
    if creating && rt.group.is_empty() && rt.plural == "namespaces" {
        // The service-account controller's job: every namespace has `default`.
        let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {
            "name": "default", "namespace": name, "uid": new_uid(), "creationTimestamp": now()}});
        let _ = store.create("/serviceaccounts", &name, "default", sa);
    }
    Ok(Reply::Json {
        code: if creating { 201 } else { 200 },
        body: result,
        warnings,
    })
}

async fn delete(
    state: &Arc<State>,
    req: &Req,
    rt: &Arc<ResourceType>,
    ns: &str,
    name: &str,
) -> ApiResult<Reply> {
    let key = rt.storage_key();
    let opts: Value = if req.body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&req.body).unwrap_or(json!({}))
    };
    let dry_run = req.q("dryRun") == "All"
        || opts["dryRun"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "All"));
    let mut store = state.store();
    let old = store
        .get(&key, ns, name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(&target(rt, name)))?;
    let pre = &opts["preconditions"];
    if pre["uid"]
        .as_str()
        .is_some_and(|u| u != old["metadata"]["uid"].as_str().unwrap_or_default())
        || pre["resourceVersion"]
            .as_str()
            .is_some_and(|v| v != rv_of(&old).to_string())
    {
        return Err(ApiError::conflict(&target(rt, name)));
    }
    if dry_run {
        return Ok(Reply::ok(200, present(rt, old)));
    }
    // A running pod is marked and stays until its kubelet has stopped it.
    if let Some(o) = crate::kubelet::graceful_deletion(rt, &old, &opts) {
        if o == old {
            return Ok(Reply::ok(200, present(rt, old)));
        }
        let o = store
            .update(&key, ns, name, rv_of(&old), o)
            .map_err(|e| write_err(e, rt, name))?;
        return Ok(Reply::ok(200, present(rt, o)));
    }
    // Orphan/Foreground propagation: the garbage collector's finalizer keeps the
    // object (marked for deletion) until it has dealt with the dependents.
    let mut old = old;
    if let Some(f) = crate::gc::deletion_finalizer(rt, &opts) {
        let mut fs = old["metadata"]["finalizers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !fs.iter().any(|x| x == f) {
            fs.push(json!(f));
            old["metadata"]["finalizers"] = Value::Array(fs);
        }
    }
    let has_finalizers = old["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty());
    if has_finalizers {
        // Graceful: mark and keep until the finalizers are removed.
        if old["metadata"]["deletionTimestamp"].is_string() {
            return Ok(Reply::ok(202, present(rt, old)));
        }
        let mut o = old.clone();
        o["metadata"]["deletionTimestamp"] = json!(now());
        o["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        let o = store
            .update(&key, ns, name, rv_of(&old), o)
            .map_err(|e| write_err(e, rt, name))?;
        return Ok(Reply::ok(202, present(rt, o)));
    }
    if rt.group.is_empty() && rt.plural == "namespaces" {
        // The namespace controller's job, done at once: everything in it goes.
        for (k, n, nm) in store.keys_in_namespace(name) {
            let _ = store.delete(&k, &n, &nm, None);
        }
    }
    let gone = store
        .delete(&key, ns, name, None)
        .map_err(|e| write_err(e, rt, name))?;
    if rt.group == "apiextensions.k8s.io" && rt.plural == "customresourcedefinitions" {
        let group = old["spec"]["group"].as_str().unwrap_or_default();
        let plural = old["spec"]["names"]["plural"].as_str().unwrap_or_default();
        let ckey = format!("{group}/{plural}");
        for o in store.list(&ckey, None) {
            let n = o["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let nm = o["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let _ = store.delete(&ckey, &n, &nm, None);
        }
        store.registry.remove_crd(name);
    }
    Ok(Reply::ok(200, present(rt, gone)))
}

/// `pods/NAME/log`: what the container wrote so far (`follow` ends at the
/// present), plain text.
fn pod_log(state: &State, req: &Req, ns: &str, name: &str) -> ApiResult<Reply> {
    let pod = state
        .store()
        .get("/pods", ns, name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(&Target::new("", "pods", name)))?;
    let container =
        crate::kubelet::log_container(&pod, req.q("container")).map_err(ApiError::bad_request)?;
    let text = state.pod_logs.read(ns, name, &container).ok_or_else(|| {
        ApiError::bad_request(format!(
            "container \"{container}\" in pod \"{name}\" is waiting to start: ContainerCreating"
        ))
    })?;
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(Bytes::from(text));
    Ok(Reply::Stream(rx))
}

/// `serviceaccounts/NAME/token` (a TokenRequest of authentication.k8s.io/v1).
fn token_request(state: &State, req: &Req, ns: &str, name: &str) -> ApiResult<Value> {
    let body = decode_body(req)?;
    let av = body["apiVersion"].as_str().unwrap_or_default();
    let kind = body["kind"].as_str().unwrap_or_default();
    if (kind, av) != ("TokenRequest", "authentication.k8s.io/v1") {
        return Err(ApiError::bad_request(format!(
            "the object provided is unrecognized (must be of type TokenRequest): {av}, Kind={kind}"
        )));
    }
    let now = jiff::Timestamp::now().as_second();
    state
        .issuer
        .token_request(&state.store(), ns, name, &body, now)
}

/// SelfSubjectAccessReview, SubjectAccessReview, SelfSubjectReview, TokenReview.
fn access_review(state: &State, req: &Req, rt: &ResourceType) -> ApiResult<Value> {
    let mut body = decode_body(req)?;
    check_type(rt, &body)?;
    if rt.kind == "TokenReview" {
        if body["spec"]["token"]
            .as_str()
            .unwrap_or_default()
            .is_empty()
        {
            return Err(ApiError::invalid(
                &rt.kind,
                &rt.group,
                "",
                vec![Cause::required("spec.token")],
            ));
        }
        let store = state.store();
        let others = |t: &str| state.authenticators.iter().find_map(|a| a.authenticate(t));
        return Ok(state.issuer.token_review(&store, &body, &others));
    }
    if rt.kind == "SelfSubjectReview" {
        body["status"] = json!({"userInfo": req.user.to_json()});
        body["metadata"] = json!({"creationTimestamp": null});
        return Ok(body);
    }
    let spec = &body["spec"];
    let user = if rt.kind == "SubjectAccessReview" {
        UserInfo {
            username: spec["user"].as_str().unwrap_or_default().into(),
            uid: spec["uid"].as_str().unwrap_or_default().into(),
            groups: spec["groups"]
                .as_array()
                .map(|g| {
                    g.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
        }
    } else {
        req.user.clone()
    };
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let attrs = if let Some(r) = spec.get("resourceAttributes").filter(|r| r.is_object()) {
        Attributes {
            verb: s(&r["verb"]),
            resource_request: true,
            group: s(&r["group"]),
            resource: s(&r["resource"]),
            subresource: s(&r["subresource"]),
            namespace: s(&r["namespace"]),
            name: s(&r["name"]),
            path: String::new(),
        }
    } else if let Some(n) = spec.get("nonResourceAttributes").filter(|r| r.is_object()) {
        Attributes {
            verb: s(&n["verb"]),
            path: s(&n["path"]),
            ..Attributes::default()
        }
    } else {
        return Err(ApiError::invalid(
            &rt.kind,
            &rt.group,
            "",
            vec![Cause::required("spec.resourceAttributes")],
        ));
    };
    let allowed = authz::authorize(&state.store(), &user, &attrs);
    body["metadata"] = json!({"creationTimestamp": null});
    body["status"] = if allowed {
        json!({"allowed": true, "reason": "allowed by RBAC"})
    } else {
        json!({"allowed": false})
    };
    Ok(body)
}
