//! A faithful test Kubernetes API server for pgwarden's cluster tests (issue 15,
//! DESIGN.md §8). The real `kubectl` and kube-rs talk to it unchanged: HTTPS with a
//! throwaway CA, bearer-token users, RBAC on every request, discovery, CRDs whose
//! resources are served with their schema validation, printer columns and status
//! subresource, watches with bookmarks and 410 Gone, and an audit log.
//!
//! ```no_run
//! let api = pgwarden_testapi::TestApiServer::start().unwrap();
//! let out = api.kubectl("admin", &["get", "namespaces"]);
//! assert!(out.status.success());
//! ```
//!
//! Module map: [`server`] (transport, authn → authz → dispatch → audit), [`auth`]
//! (tokens, kubeconfig), [`authz`] (RBAC), [`discovery`], [`registry`] (served
//! types, CRD → type), [`storage`] (objects, resourceVersion, watch history),
//! [`handlers`] (verbs, write pipeline), [`schema`] (CRD structural schemas),
//! [`patch`], [`selectors`], [`table`], [`admission`] (plugin stages), [`webhooks`]
//! (the admission webhook plugin), [`tokens`] (service-account tokens: TokenRequest,
//! TokenReview, issuer discovery and JWKS), [`audit`];
//! the control plane: [`controllers`] (their audited in-process client), [`gc`]
//! (ownerReference garbage collection), [`jobs`] (Job controller), and
//! [`kubelet`] (the pod runner tests start with [`kubelet::Kubelet::start`]).
//!
//! Not here: OpenAPI schemas of built-in kinds (custom resources have theirs) and
//! OpenAPI v2, server-side apply, list pagination, strategic-merge list merge keys,
//! CEL, admission of DELETE.
#![forbid(unsafe_code)]

pub mod admission;
pub mod audit;
pub mod auth;
pub mod authz;
pub mod controllers;
pub mod discovery;
pub mod gc;
pub mod handlers;
pub mod install;
pub mod jobs;
pub mod kubelet;
pub mod openapi;
pub mod patch;
pub mod pki;
pub mod proto;
pub mod registry;
pub mod schema;
pub mod selectors;
pub mod server;
pub mod status;
pub mod storage;
pub mod table;
pub mod tokens;
pub mod webhooks;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

pub use audit::AuditEvent;
pub use auth::{StaticUser, UserInfo};

use crate::handlers::State;
use crate::registry::Registry;
use crate::storage::Store;

/// Options of [`TestApiServer::start_with`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the kubeconfig, PKI, audit log go; a temp dir (removed on drop) if unset.
    pub dir: Option<PathBuf>,
    /// Port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    pub users: Vec<StaticUser>,
    /// How many changes watches can replay (older versions get 410 Gone).
    pub history: usize,
    pub bookmark_interval: Duration,
    /// Shortest TokenRequest `expirationSeconds` (600 s on a real server); tests
    /// lower it to watch tokens expire.
    pub min_token_expiration: Duration,
    /// Clock skew tolerated on service-account token times (real: 1 minute).
    pub token_leeway: Duration,
    /// Where webhooks' `clientConfig.service` (`NAME.NAMESPACE.svc`) are reached:
    /// there is no cluster DNS. [`TestApiServer::set_service_endpoint`] adds later.
    pub service_endpoints: std::collections::HashMap<String, std::net::SocketAddr>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            dir: None,
            port: 0,
            users: auth::default_users(),
            history: 10_000,
            bookmark_interval: Duration::from_secs(1),
            min_token_expiration: Duration::from_secs(600),
            token_leeway: Duration::from_secs(60),
            service_endpoints: Default::default(),
        }
    }
}

/// A running server; stops when dropped.
pub struct TestApiServer {
    state: Arc<State>,
    url: String,
    dir: PathBuf,
    kubeconfig: PathBuf,
    users: Vec<StaticUser>,
    endpoints: webhooks::ServiceEndpoints,
    _tmp: Option<tempfile::TempDir>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn bootstrap(store: &mut Store) {
    let ns = |name: &str| {
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": name, "uid": format!("ns-{name}"), "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": {"kubernetes.io/metadata.name": name}},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
    };
    for n in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let _ = store.create("/namespaces", "", n, ns(n));
        let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {
            "name": "default", "namespace": n, "uid": format!("sa-{n}"),
            "creationTimestamp": "2025-01-01T00:00:00Z"}});
        let _ = store.create("/serviceaccounts", n, "default", sa);
    }
    for (key, mut obj) in authz::bootstrap_objects() {
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        obj["metadata"]["uid"] = json!(format!("rbac-{name}"));
        obj["metadata"]["creationTimestamp"] = json!("2025-01-01T00:00:00Z");
        let _ = store.create(key, "", &name, obj);
    }
}

impl TestApiServer {
    pub fn start() -> std::io::Result<TestApiServer> {
        TestApiServer::start_with(Options::default())
    }

    pub fn start_with(opts: Options) -> std::io::Result<TestApiServer> {
        let (tmp, dir) = match &opts.dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (None, d.clone())
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("pgwarden-testapi-")
                    .tempdir()?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        // RSA key generation runs beside the PKI's openssl calls.
        let key = std::thread::spawn(tokens::generate_key);
        let pki = pki::Pki::generate(&dir)?;
        let acceptor = server::tls_acceptor(
            &std::fs::read(&pki.server_cert)?,
            &std::fs::read(&pki.server_key)?,
        )?;
        let std_listener = std::net::TcpListener::bind(("127.0.0.1", opts.port))?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let url = format!("https://{addr}");

        let mut store = Store::new(Registry::with_builtins(), opts.history);
        bootstrap(&mut store);
        let key = key
            .join()
            .map_err(|_| std::io::Error::other("service-account key generation panicked"))??;
        let issuer =
            tokens::Issuer::with_key(key, &url, opts.min_token_expiration, opts.token_leeway)?;
        let endpoints: webhooks::ServiceEndpoints =
            Arc::new(Mutex::new(opts.service_endpoints.clone()));
        let state = Arc::new(State {
            issuer,
            store: Mutex::new(store),
            authenticators: vec![Box::new(auth::StaticTokens::new(&opts.users))],
            audit: audit::Audit::new(Some(&dir.join("audit.log")))?,
            admission: {
                let mut a = admission::Admission::default();
                a.add(Arc::new(webhooks::Webhooks {
                    endpoints: endpoints.clone(),
                }));
                a
            },
            server_addr: addr.to_string(),
            bookmark_interval: opts.bookmark_interval,
            pod_logs: Default::default(),
        });

        let kubeconfig = dir.join("kubeconfig");
        let current = opts
            .users
            .first()
            .map(|u| u.name.clone())
            .unwrap_or_default();
        let kc = auth::kubeconfig(&url, &std::fs::read(&pki.ca_cert)?, &opts.users, &current);
        std::fs::write(
            &kubeconfig,
            serde_json::to_string_pretty(&kc).unwrap_or_default(),
        )?;

        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("testapi")
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("testapi".into())
            .spawn(move || {
                rt.block_on(async move {
                    // The garbage collector and the Job controller.
                    controllers::spawn(st.clone());
                    let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                        return;
                    };
                    tokio::select! {
                        _ = server::serve(listener, acceptor, st) => {}
                        _ = rx => {}
                    }
                });
                // Open watches end with the runtime.
                rt.shutdown_timeout(Duration::from_millis(100));
            })?;
        Ok(TestApiServer {
            state,
            url,
            dir,
            kubeconfig,
            users: opts.users,
            endpoints,
            _tmp: tmp,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// `https://127.0.0.1:PORT`
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The bearer token of a static user.
    pub fn token(&self, user: &str) -> Option<&str> {
        self.users
            .iter()
            .find(|u| u.name == user)
            .map(|u| u.token.as_str())
    }

    /// Mints a service-account token as `POST .../serviceaccounts/SA/token` would
    /// (same checks: the SA and the bound pod must exist). `audiences` empty: the
    /// API server's own; `ttl` `None`: one hour.
    pub fn token_request(
        &self,
        namespace: &str,
        service_account: &str,
        audiences: &[&str],
        pod: Option<&str>,
        ttl: Option<Duration>,
    ) -> Result<String, status::ApiError> {
        let mut spec = json!({ "audiences": audiences });
        if let Some(t) = ttl {
            spec["expirationSeconds"] = json!(t.as_secs());
        }
        if let Some(p) = pod {
            spec["boundObjectRef"] = json!({"kind": "Pod", "apiVersion": "v1", "name": p});
        }
        let now = jiff::Timestamp::now().as_second();
        let r = self.state.issuer.token_request(
            &self.state.store(),
            namespace,
            service_account,
            &json!({ "spec": spec }),
            now,
        )?;
        Ok(r["status"]["token"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// Makes webhooks with `clientConfig.service` `NAME.NAMESPACE.svc` reach
    /// `addr` (what cluster DNS and the service proxy do on a real cluster).
    pub fn set_service_endpoint(&self, host: &str, addr: std::net::SocketAddr) {
        self.endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(host.to_string(), addr);
    }

    /// Issues a serving certificate for `names` (DNS names or IPs) from this
    /// server's CA, as `(cert PEM, key PEM)`: for webhooks a test runs, whose
    /// `caBundle` is then [`TestApiServer::ca_cert`].
    pub fn issue_serving_cert(&self, names: &[&str]) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
        pki::issue_serving_cert(&self.dir, names)
    }

    /// The service-account token issuer (`iss`, the JWKS).
    pub fn issuer(&self) -> &tokens::Issuer {
        &self.state.issuer
    }

    /// The server's shared state (in-process control-plane components use it).
    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Every request so far, oldest first.
    pub fn audit(&self) -> Vec<AuditEvent> {
        self.state.audit.events()
    }

    /// Forgets the watch history (as etcd compaction): watches from any earlier
    /// resourceVersion now get 410 Gone.
    pub fn compact(&self) {
        self.state.store().compact();
    }

    /// The stored object (as stored, at its storage version), bypassing the API.
    pub fn stored(&self, group: &str, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        self.state
            .store()
            .get(&format!("{group}/{plural}"), namespace, name)
            .cloned()
    }

    /// A `kubectl` command for context `context` with this server's kubeconfig and
    /// its own discovery cache (the machine's kubectl dispatcher and discovery cache
    /// must not leak between servers).
    pub fn kubectl_command(&self, context: &str) -> Command {
        let mut c = Command::new("kubectl");
        c.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--context")
            .arg(context)
            .arg("--cache-dir")
            .arg(self.dir.join("kubectl-cache"))
            .env_remove("KUBECONFIG");
        c
    }

    /// Runs kubectl to completion.
    pub fn kubectl(&self, context: &str, args: &[&str]) -> Output {
        self.kubectl_command(context)
            .args(args)
            .output()
            .expect("run kubectl")
    }

    /// Runs kubectl to completion with `stdin` as its input (`-f -`); no
    /// input: an empty stdin.
    pub fn kubectl_stdin(&self, context: &str, args: &[&str], stdin: Option<&str>) -> Output {
        use std::io::Write as _;
        use std::process::Stdio;
        let mut child = self
            .kubectl_command(context)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kubectl");
        let mut input = child.stdin.take().expect("kubectl stdin");
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).expect("write kubectl stdin");
        }
        drop(input);
        child.wait_with_output().expect("kubectl")
    }
}

/// A command's stdout then stderr, for assertion messages.
pub fn output_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
