//! Approval notifications (`spec.approval.notify`): a Slack-compatible JSON
//! POST to a webhook when a request is opened and when it is decided or
//! expires.
//!
//! Advice, never a gate: events go into a bounded queue (full: dropped with
//! a warning and counted) and are delivered by background tasks with a
//! timeout per try and a bounded, exponentially backed-off retry. Nothing on
//! the data path or in a reconcile waits for them.
//!
//! Each event is sent once per operator set because it is sent by the one
//! write that made it true: "requested" by the replica whose create
//! succeeded, "decided" by whichever resourceVersion-guarded status write
//! first moved the request out of Pending (the leader's controller, or a
//! sidecar's claim of a fresh approval). The queue is in memory: an event
//! queued on a replica that dies before delivering it is lost (at most
//! once, never twice), and a new leader does not replay old events.
//!
//! The URL lives in a Secret (webhook URLs carry their token); it is read
//! per delivery and never logged, counted or put in an error: logs name the
//! Secret.
//!
//! [`payload`] and [`decided`] are pure; the rest is the IO shell.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, USER_AGENT};
use http::{Request, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use kube::{Api, Client, ResourceExt as _};
use pgwarden_api::stream::approvals::approve_command;
use pgwarden_api::{ApprovalPhase, ApprovalRequest, DatabaseAccessPolicy, SecretKeyRef};
use prometheus::IntCounterVec;
use rustls_pki_types::ServerName;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::TlsConnector;

use super::stored_phase;

#[cfg(test)]
mod tests;

/// Events waiting for delivery; beyond this they are dropped (a receiver
/// that is down must not grow the operator's memory).
const QUEUE: usize = 256;
/// Deliveries in flight at once (each may be waiting out a backoff).
const IN_FLIGHT: usize = 16;
/// Tries per event, the first included.
const TRIES: u32 = 5;
/// Before the second try; doubled before each next one (1s, 2s, 4s, 8s).
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// One try: connect, TLS, request and response head.
const TRY_TIMEOUT: Duration = Duration::from_secs(10);
/// Statements longer than this are cut in the message (Slack's own limit
/// on `text` is larger; a reviewer reads the full one with kubectl).
const MAX_STATEMENT_CHARS: usize = 2000;

/// What happened to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Requested,
    Approved,
    Denied,
    Expired,
}

impl Event {
    fn as_str(self) -> &'static str {
        match self {
            Event::Requested => "Requested",
            Event::Approved => "Approved",
            Event::Denied => "Denied",
            Event::Expired => "Expired",
        }
    }
}

/// The decision event a status write tells, if it is the write that moved
/// `before` out of Pending. A sidecar's claim of an approval the
/// controller has not yet written goes straight to Executed: that is the
/// approval.
pub fn decided(before: &ApprovalRequest, written: ApprovalPhase) -> Option<Event> {
    if stored_phase(before) != ApprovalPhase::Pending {
        return None;
    }
    match written {
        ApprovalPhase::Approved | ApprovalPhase::Executed | ApprovalPhase::Failed => {
            Some(Event::Approved)
        }
        ApprovalPhase::Denied => Some(Event::Denied),
        ApprovalPhase::Expired => Some(Event::Expired),
        ApprovalPhase::Pending => None,
    }
}

/// The rule named in a request's reason (`approval required by rule "x": …`).
pub fn rule_of(reason: &str) -> Option<&str> {
    let rest = &reason[reason.find("rule \"")? + "rule \"".len()..];
    Some(&rest[..rest.find('"')?])
}

/// The JSON posted for `event` on `r`: Slack's `text`, plus the same facts
/// as fields for receivers that are not Slack. Parameters are exactly as
/// the request holds them (the sidecar masked the sensitive ones).
pub fn payload(r: &ApprovalRequest, event: Event) -> Value {
    let ns = r.namespace().unwrap_or_default();
    let name = r.name_any();
    let spec = &r.spec;
    let who = &spec.requester.subject;
    let pod = spec.requester.pod.as_deref();
    let statement = cut(&spec.statement, MAX_STATEMENT_CHARS);
    let decision = spec.decision.as_ref();
    let decided_by = decision.and_then(|d| d.decided_by.as_deref());
    let decision_reason = decision.and_then(|d| d.reason.as_deref());
    let command = (event == Event::Requested).then(|| approve_command(&ns, &name));
    let phase = match event {
        Event::Requested => ApprovalPhase::Pending,
        Event::Approved => ApprovalPhase::Approved,
        Event::Denied => ApprovalPhase::Denied,
        Event::Expired => ApprovalPhase::Expired,
    };

    let params = if spec.parameters.is_empty() {
        String::new()
    } else {
        let shown: Vec<String> = spec
            .parameters
            .iter()
            .enumerate()
            .map(|(i, p)| format!("${}={}", i + 1, p.as_deref().unwrap_or("NULL")))
            .collect();
        format!("\nParameters: {}", shown.join(", "))
    };
    let from = match pod {
        Some(pod) => format!("{who} (pod {pod})"),
        None => who.clone(),
    };
    let head = match event {
        Event::Requested => format!(
            "Approval requested: {ns}/{name} (policy {}): {from} waits to run:",
            spec.policy
        ),
        Event::Approved | Event::Denied => format!(
            "{ns}/{name} (policy {}) was {} by {}: {}. Requested by {from}:",
            spec.policy,
            if event == Event::Approved {
                "approved"
            } else {
                "denied"
            },
            decided_by.unwrap_or("a reviewer"),
            decision_reason.unwrap_or("no reason given"),
        ),
        Event::Expired => format!(
            "{ns}/{name} (policy {}) expired at {} without being used. Requested by {from}:",
            spec.policy, spec.expires_at
        ),
    };
    let mut text = format!(
        "{}\n```{}```{}\nWhy: {}",
        slack_escape(&head),
        slack_escape(&statement),
        slack_escape(&params),
        slack_escape(&spec.reason)
    );
    if let Some(c) = &command {
        text.push_str(&format!("\nApprove with: `{}`", slack_escape(c)));
    }

    json!({
        "text": text,
        "event": event.as_str(),
        "namespace": ns,
        "request": name,
        "policy": spec.policy,
        "database": spec.database,
        "requester": spec.requester.subject,
        "pod": pod,
        "serviceAccount": spec.requester.service_account,
        "statement": statement,
        "parameters": spec.parameters,
        "rule": rule_of(&spec.reason),
        "reason": spec.reason,
        "phase": format!("{phase:?}"),
        "expiresAt": spec.expires_at,
        "decidedBy": decided_by,
        "decisionReason": decision_reason,
        "approveCommand": command,
    })
}

/// Slack's mrkdwn needs only these three escaped.
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

// === the IO shell ===

/// One event on its way.
struct Job {
    namespace: String,
    policy: String,
    request: String,
    event: Event,
    body: Bytes,
}

pub struct Notifier {
    queue: mpsc::Sender<Job>,
    /// `result`: sent, failed (every try), dropped (queue full).
    counter: IntCounterVec,
}

static NOTIFIER: OnceLock<Notifier> = OnceLock::new();

/// Starts the delivery tasks and makes [`requested`]/[`decided_write`]
/// deliver. Without it (unit tests, tools) they do nothing.
pub fn install(client: Client, counter: IntCounterVec) {
    let (queue, rx) = mpsc::channel(QUEUE);
    for result in ["sent", "failed", "dropped"] {
        counter.with_label_values(&[result]);
    }
    if NOTIFIER
        .set(Notifier {
            queue,
            counter: counter.clone(),
        })
        .is_ok()
    {
        tokio::spawn(deliver_all(client, rx, counter));
    }
}

/// The replica that created `r` tells of it.
pub fn requested(r: &ApprovalRequest) {
    enqueue(r, Event::Requested);
}

/// After a status write of `written` over `before` succeeded: tells of the
/// decision if this write made it.
pub fn decided_write(before: &ApprovalRequest, written: ApprovalPhase) {
    if let Some(event) = decided(before, written) {
        enqueue(before, event);
    }
}

fn enqueue(r: &ApprovalRequest, event: Event) {
    let Some(n) = NOTIFIER.get() else { return };
    let job = Job {
        namespace: r.namespace().unwrap_or_default(),
        policy: r.spec.policy.clone(),
        request: r.name_any(),
        event,
        body: Bytes::from(serde_json::to_vec(&payload(r, event)).unwrap_or_default()),
    };
    if let Err(e) = n.queue.try_send(job) {
        let job = match e {
            mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => j,
        };
        n.counter.with_label_values(&["dropped"]).inc();
        tracing::warn!(approval.namespace = %job.namespace, approval.name = %job.request,
            event = job.event.as_str(), "approval notification dropped: the queue is full");
    }
}

async fn deliver_all(client: Client, mut rx: mpsc::Receiver<Job>, counter: IntCounterVec) {
    let tls = match tls_connector() {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "approval notifications are off: no TLS client");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(job) = rx.recv().await {
        // Waiting here lets the queue fill, so a stuck receiver drops new
        // events instead of piling up tasks.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (client, tls, counter) = (client.clone(), tls.clone(), counter.clone());
        tokio::spawn(async move {
            if let Some(result) = deliver(&client, &tls, &job).await {
                counter.with_label_values(&[result]).inc();
            }
            drop(slot);
        });
    }
}

/// Why a try failed; never holds the URL.
#[derive(Debug)]
enum TryError {
    /// Worth another try (network, timeout, 5xx, 429, API read).
    Transient(String),
    /// Another try would fail the same way (no Secret, bad URL, 4xx).
    Permanent(String),
}

/// Tries until sent, a permanent failure, or [`TRIES`]. Returns the
/// counter's result label; `None` when the policy asks for no notifications.
async fn deliver(client: &Client, tls: &TlsConnector, job: &Job) -> Option<&'static str> {
    let mut backoff = FIRST_BACKOFF;
    let mut secret = None;
    for attempt in 1..=TRIES {
        let outcome = match target(client, job).await {
            Ok(None) => return None,
            Ok(Some((r, url))) => {
                secret = Some(r.name);
                match tokio::time::timeout(TRY_TIMEOUT, post(tls, &url, job.body.clone())).await {
                    Ok(result) => result,
                    Err(_) => Err(TryError::Transient(format!(
                        "no answer within {}s",
                        TRY_TIMEOUT.as_secs()
                    ))),
                }
            }
            Err(e) => Err(e),
        };
        let secret = secret.as_deref().unwrap_or("?");
        match outcome {
            Ok(()) => {
                tracing::info!(approval.namespace = %job.namespace, approval.name = %job.request,
                    event = job.event.as_str(), secret = %secret, "approval notification sent");
                return Some("sent");
            }
            Err(TryError::Permanent(why)) => {
                tracing::warn!(approval.namespace = %job.namespace, approval.name = %job.request,
                    event = job.event.as_str(), secret = %secret, error = %why,
                    "approval notification failed; not retried");
                return Some("failed");
            }
            Err(TryError::Transient(why)) if attempt < TRIES => {
                tracing::info!(approval.namespace = %job.namespace, approval.name = %job.request,
                    event = job.event.as_str(), secret = %secret, error = %why, attempt,
                    "approval notification failed; retrying in {}s", backoff.as_secs());
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2);
            }
            Err(TryError::Transient(why)) => {
                tracing::warn!(approval.namespace = %job.namespace, approval.name = %job.request,
                    event = job.event.as_str(), secret = %secret, error = %why,
                    "approval notification failed after {TRIES} tries; dropped");
            }
        }
    }
    Some("failed")
}

/// The policy's notify Secret and the URL in it; `None` when the policy
/// (now) asks for no notifications.
async fn target(client: &Client, job: &Job) -> Result<Option<(SecretKeyRef, String)>, TryError> {
    let policies: Api<DatabaseAccessPolicy> = Api::namespaced(client.clone(), &job.namespace);
    let policy = policies
        .get_opt(&job.policy)
        .await
        .map_err(|e| TryError::Transient(format!("reading policy {}: {e}", job.policy)))?;
    let Some(r) = policy
        .and_then(|p| p.spec.approval)
        .and_then(|a| a.notify)
        .map(|n| n.url_secret_ref)
    else {
        return Ok(None);
    };
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), &job.namespace);
    let secret = secrets
        .get_opt(&r.name)
        .await
        .map_err(|e| TryError::Transient(format!("reading Secret {}: {e}", r.name)))?
        .ok_or_else(|| TryError::Permanent(format!("no Secret {}/{}", job.namespace, r.name)))?;
    let url = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            TryError::Permanent(format!(
                "Secret {}/{} has no UTF-8 key {}",
                job.namespace, r.name, r.key
            ))
        })?;
    Ok(Some((r, url)))
}

fn tls_connector() -> Result<TlsConnector, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// One POST. Errors describe what failed without the URL (it carries the
/// webhook's token): the Secret is named by the caller.
async fn post(tls: &TlsConnector, url: &str, body: Bytes) -> Result<(), TryError> {
    let bad = |why: &str| TryError::Permanent(format!("the URL in the Secret {why}"));
    let uri: Uri = url.parse().map_err(|_| bad("does not parse"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(bad("is not http(s)")),
    };
    let host = uri.host().ok_or_else(|| bad("has no host"))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare == "localhost"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !https && !loopback {
        return Err(bad("must be https:// (http:// only to a loopback host)"));
    }
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    // Host without any userinfo the URL may carry.
    let authority = match uri.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let request = Request::post(path)
        .header(HOST, authority)
        .header(CONTENT_TYPE, "application/json")
        .header(USER_AGENT, concat!("pgwarden/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(body))
        .map_err(|_| bad("does not make a request"))?;
    // io::Error texts name neither host nor path.
    let tcp = TcpStream::connect((bare, port))
        .await
        .map_err(|e| TryError::Transient(format!("connect: {e}")))?;
    let _ = tcp.set_nodelay(true);
    if https {
        let name = ServerName::try_from(bare.to_owned())
            .map_err(|_| bad("has a host that is not a TLS server name"))?;
        let stream = tls
            .connect(name, tcp)
            .await
            .map_err(|e| TryError::Transient(format!("TLS: {e}")))?;
        exchange(stream, request).await
    } else {
        exchange(tcp, request).await
    }
}

async fn exchange<S>(stream: S, request: Request<Full<Bytes>>) -> Result<(), TryError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| TryError::Transient(format!("HTTP: {e}")))?;
    let conn = tokio::spawn(conn);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| TryError::Transient(format!("HTTP: {e}")))?;
    let status = response.status();
    // The body is not needed; reading a little lets the connection close cleanly.
    let _ = http_body_util::Limited::new(response.into_body(), 64 * 1024)
        .collect()
        .await;
    conn.abort();
    if status.is_success() {
        Ok(())
    } else if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS {
        Err(TryError::Transient(format!("HTTP status {status}")))
    } else {
        Err(TryError::Permanent(format!("HTTP status {status}")))
    }
}
