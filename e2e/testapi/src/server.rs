//! Transport: HTTPS (rustls, aws-lc-rs, HTTP/1.1 only via ALPN) and hyper's
//! connection-level server; per request: authenticate → authorize (RBAC) →
//! dispatch → audit.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

use crate::audit::AuditEvent;
use crate::auth::UserInfo;
use crate::authz;
use crate::discovery;
use crate::handlers::{self, parse_query, Reply, Req, State};
use crate::status::ApiError;

/// etcd's default request size limit, which the real server enforces too.
const MAX_BODY: usize = 3 * 1024 * 1024;

type RespBody = BoxBody<Bytes, Infallible>;

/// A watch stream's body: chunks from a channel until its sender is gone.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

pub fn tls_acceptor(cert_pem: &[u8], key_pem: &[u8]) -> std::io::Result<TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| std::io::Error::other(format!("server certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| std::io::Error::other(format!("server key: {e}")))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(std::io::Error::other)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Accepts connections until the task is dropped.
pub async fn serve(listener: TcpListener, acceptor: TlsAcceptor, state: Arc<State>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (acceptor, state) = (acceptor.clone(), state.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
        });
    }
}

fn json_response(code: u16, body: &Value, warnings: &[String]) -> Response<RespBody> {
    let mut b = Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .header("cache-control", "no-cache, private");
    for w in warnings {
        b = b.header("warning", format!("299 - {}", json!(w)));
    }
    b.body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn authenticate(state: &State, req: &Request<Incoming>) -> Result<UserInfo, ApiError> {
    let Some(h) = req.headers().get(http::header::AUTHORIZATION) else {
        return Ok(UserInfo::anonymous());
    };
    let token = h
        .to_str()
        .ok()
        .and_then(|s| {
            s.strip_prefix("Bearer ")
                .or_else(|| s.strip_prefix("bearer "))
        })
        .map(str::trim)
        .ok_or_else(ApiError::unauthorized)?;
    state
        .authenticators
        .iter()
        .find_map(|a| a.authenticate(token))
        .or_else(|| state.issuer.authenticate(&state.store(), token))
        .ok_or_else(ApiError::unauthorized)
}

/// `Impersonate-User`/`-Group`/`-Uid` headers: the request runs as that identity
/// if the authenticated user may `impersonate` it (RBAC; `system:masters` may), as
/// the real server's impersonation filter does. `kubectl --as`/`--as-group` and
/// kube-rs's `impersonate` send these.
fn impersonate(
    state: &State,
    req: &Request<Incoming>,
    user: UserInfo,
) -> Result<UserInfo, ApiError> {
    let values = |n: &str| -> Vec<String> {
        req.headers()
            .get_all(n)
            .iter()
            .filter_map(|v| v.to_str().ok().map(String::from))
            .collect()
    };
    let (names, groups, uids) = (
        values("impersonate-user"),
        values("impersonate-group"),
        values("impersonate-uid"),
    );
    if names.is_empty() {
        if groups.is_empty() && uids.is_empty() {
            return Ok(user);
        }
        return Err(ApiError::new(
            500,
            "InternalError",
            "Internal error occurred: requested impersonation of groups or uid without impersonating a user",
        ));
    }
    let name = names[0].clone();
    let check = |resource: &str, namespace: &str, obj: &str| -> Result<(), ApiError> {
        let a = authz::Attributes {
            verb: "impersonate".into(),
            resource_request: true,
            group: if resource == "uids" {
                "authentication.k8s.io".into()
            } else {
                String::new()
            },
            resource: resource.into(),
            namespace: namespace.into(),
            name: obj.into(),
            ..authz::Attributes::default()
        };
        if authz::authorize(&state.store(), &user, &a) {
            Ok(())
        } else {
            Err(authz::forbidden(&user, &a))
        }
    };
    let sa = name
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split_once(':'));
    match sa {
        Some((ns, sa_name)) => check("serviceaccounts", ns, sa_name)?,
        None => check("users", "", &name)?,
    }
    for g in &groups {
        check("groups", "", g)?;
    }
    for u in &uids {
        check("uids", "", u)?;
    }
    let mut all = groups;
    if let Some((ns, _)) = sa {
        if all.is_empty() {
            all = vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
            ];
        }
    }
    if name != "system:anonymous" && !all.iter().any(|g| g == "system:authenticated") {
        all.push("system:authenticated".into());
    }
    Ok(UserInfo {
        username: name,
        uid: uids.into_iter().next().unwrap_or_default(),
        groups: all,
    })
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<RespBody> {
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query());
    let info = handlers::request_info(req.method(), &path, &query);
    let uri = req.uri().to_string();
    let user = authenticate(&state, &req).and_then(|u| impersonate(&state, &req, u));
    let (code, resp) = match user {
        Err(ref e) => (e.code, json_response(e.code, &e.to_status(), &[])),
        Ok(ref user) => {
            let r = handle_authenticated(&state, req, user.clone(), &path, query, &info).await;
            (r.status().as_u16(), r)
        }
    };
    let user = user.unwrap_or_else(|_| UserInfo::anonymous());
    let a = &info.attrs;
    state.audit.record(AuditEvent {
        user: user.username,
        groups: user.groups,
        verb: a.verb.clone(),
        group: a.group.clone(),
        resource: a.resource.clone(),
        subresource: a.subresource.clone(),
        namespace: a.namespace.clone(),
        name: a.name.clone(),
        uri,
        code,
    });
    resp
}

async fn handle_authenticated(
    state: &Arc<State>,
    req: Request<Incoming>,
    user: UserInfo,
    path: &str,
    query: std::collections::HashMap<String, String>,
    info: &handlers::RequestInfo,
) -> Response<RespBody> {
    let allowed = authz::authorize(&state.store(), &user, &info.attrs);
    if !allowed {
        // Anonymous requests are authorized like anyone else's (as with the
        // real server's default --anonymous-auth=true): a 403, not a 401.
        let e = authz::forbidden(&user, &info.attrs);
        return json_response(e.code, &e.to_status(), &[]);
    }
    if !info.attrs.resource_request {
        return non_resource(state, path);
    }
    let header = |n: http::HeaderName| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (accept, content_type) = (
        header(http::header::ACCEPT),
        header(http::header::CONTENT_TYPE),
    );
    let method = req.method().clone();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            let e = ApiError::new(
                413,
                "RequestEntityTooLarge",
                "Request entity too large: limit is 3145728",
            );
            return json_response(e.code, &e.to_status(), &[]);
        }
    };
    let r = Req {
        method,
        path: path.to_string(),
        query,
        accept,
        content_type,
        body,
        user,
    };
    match handlers::handle(state, &r, info).await {
        Reply::Json {
            code,
            body,
            warnings,
        } => json_response(code, &body, &warnings),
        Reply::Stream(rx) => Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .header("cache-control", "no-cache, private")
            .body(BodyExt::boxed(ChannelBody(rx)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed())),
    }
}

fn typed_json(content_type: &str, body: &Value) -> Response<RespBody> {
    Response::builder()
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn non_resource(state: &State, path: &str) -> Response<RespBody> {
    let p = path.trim_end_matches('/');
    let store = state.store();
    let doc = match p
        .split('/')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["version"] => Some(discovery::version()),
        ["healthz"] | ["livez"] | ["readyz"] => {
            return Response::builder()
                .header("content-type", "text/plain; charset=utf-8")
                .body(Full::new(Bytes::from_static(b"ok")).boxed())
                .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()));
        }
        ["api"] => Some(discovery::core_versions(&state.server_addr)),
        ["api", v] => discovery::resources(&store.registry, "", v),
        ["apis"] => Some(discovery::groups(&store.registry)),
        ["apis", g] => discovery::group(&store.registry, g),
        ["apis", g, v] => discovery::resources(&store.registry, g, v),
        [".well-known", "openid-configuration"] => {
            return typed_json("application/json", &state.issuer.discovery());
        }
        ["openid", "v1", "jwks"] => {
            return typed_json("application/jwk-set+json", &state.issuer.jwks());
        }
        ["openapi", "v3"] => Some(crate::openapi::index(&store.registry)),
        ["openapi", "v3", rest @ ..] => crate::openapi::group_version(&store, &rest.join("/")),
        _ => None,
    };
    match doc {
        Some(d) => json_response(200, &d, &[]),
        None => {
            let e = ApiError::path_not_found();
            json_response(404, &e.to_status(), &[])
        }
    }
}
