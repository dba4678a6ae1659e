//! The pod runner: plays the kubelet of one node for the test API server (issue 15
//! items 8 and 10, DESIGN.md §8).
//!
//! For each pod it runs (the ones a test names with [`Kubelet::run_pod`] /
//! [`Kubelet::run_matching`], or every pod with [`KubeletOptions::run_all`]) it:
//! - gives the pod its own loopback address (127.0.0.2, 127.0.0.3, …; Linux routes
//!   all of 127/8 to `lo`), skipping addresses whose declared ports are taken;
//! - writes `status` as a kubelet does: `podIP`/`podIPs`, `hostIP`, `startTime`,
//!   phase, the PodScheduled/Initialized/ContainersReady/Ready conditions and
//!   `initContainerStatuses`/`containerStatuses`;
//! - writes volumes as files under the pod's directory (Secret, ConfigMap,
//!   downwardAPI, emptyDir, projected serviceAccountToken/secret/configMap/
//!   downwardAPI; tokens come from TokenRequest bound to the pod and are renewed at
//!   80% of their lifetime; Secret/ConfigMap changes reach the files within a
//!   second). A missing Secret keeps the pod in ContainerCreating and is retried.
//! - runs init containers in order: native sidecars (`restartPolicy: Always`)
//!   start and must pass their startupProbe (httpGet, tcpSocket or exec) before
//!   the next one; ordinary init containers run to completion;
//! - then starts the main containers;
//! - records Events on the pod as a kubelet does (Started, Killing, Unhealthy,
//!   FailedMount), which `kubectl describe pod` lists.
//!
//! Which containers execute: pgwarden's sidecar (see [`spec::is_pgwarden`]) runs as
//! the real binary ([`KubeletOptions::pgwarden_bin`]); a container the test names
//! in [`RunOptions`] runs that host command (or its own command); every other
//! container is *played*: reported running, never executed — the test (or a tool
//! outside, with `scripts/testcluster --run-pods`) acts for it against the pod's IP
//! and ends it with [`Kubelet::finish_pod`] or the pod annotation
//! `testapi.pgwarden.io/exit-code: "N"`. Played init containers complete at once.
//! Each executed container gets the pod's environment and the rewrites of
//! [`spec`] (mount paths, listen addresses), its own process group, and its
//! stdout+stderr in a file ([`Kubelet::pod_logs`], and `kubectl logs` through the
//! server's `pods/log`, which ends at the present even with `-f`).
//!
//! When every main container has finished, the sidecars are stopped as a kubelet
//! does (in reverse order: SIGTERM, `terminationGracePeriodSeconds` — overridable
//! per pod — then SIGKILL) and the phase becomes Succeeded (all main containers
//! exited 0) or Failed. Deleting a running pod is graceful as on a real cluster
//! ([`graceful_deletion`]): the server marks it, the runner stops every container
//! the same way (grace = the deletion's) and then deletes it with grace 0, so
//! `kubectl delete pod` returns once the sidecar has shut down.
//!
//! Not here: restarts (a failed container is not restarted, whatever the
//! restartPolicy: a failing ordinary init container or startup probe fails the
//! pod), readiness/liveness probes (ready = running), `spec.nodeName` binding,
//! resource limits, images.

pub mod probe;
pub mod spec;
mod worker;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::broadcast::error::TryRecvError;

use crate::controllers::Client;
use crate::selectors::LabelSelector;
use crate::TestApiServer;

/// The pod annotation a tool outside sets to end a pod's played main containers
/// with that exit code (what [`Kubelet::finish_pod`] does in-process).
pub const EXIT_CODE_ANNOTATION: &str = "testapi.pgwarden.io/exit-code";

/// How the runner treats one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exec {
    /// Run the container's own `command` + `args` on the host.
    AsSpecified,
    /// Run this argv on the host instead.
    Argv(Vec<String>),
}

/// What a test asks of the runner for the pods it names.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Containers (by name) to execute on the host; others are pgwarden's sidecar
    /// or played.
    pub commands: BTreeMap<String, Exec>,
    /// Overrides the pod's `terminationGracePeriodSeconds`.
    pub grace: Option<Duration>,
}

impl RunOptions {
    pub fn new() -> RunOptions {
        RunOptions::default()
    }

    /// Runs `argv` for container `container`.
    pub fn command(mut self, container: &str, argv: &[&str]) -> RunOptions {
        let argv = argv.iter().map(|s| s.to_string()).collect();
        self.commands.insert(container.into(), Exec::Argv(argv));
        self
    }

    /// Runs the container's own command and args.
    pub fn as_specified(mut self, container: &str) -> RunOptions {
        self.commands.insert(container.into(), Exec::AsSpecified);
        self
    }

    pub fn grace(mut self, grace: Duration) -> RunOptions {
        self.grace = Some(grace);
        self
    }
}

#[derive(Debug, Clone)]
pub struct KubeletOptions {
    /// The node name (in the kubelet's identity `system:node:NAME`).
    pub node_name: String,
    /// The real `pgwarden` binary that pgwarden sidecar containers run as.
    pub pgwarden_bin: Option<PathBuf>,
    /// Run every pod that appears (with default [`RunOptions`]).
    pub run_all: bool,
    /// Pod directories (volumes, logs); `<server dir>/kubelet` if unset.
    pub dir: Option<PathBuf>,
}

impl Default for KubeletOptions {
    fn default() -> KubeletOptions {
        KubeletOptions {
            node_name: "testnode".into(),
            pgwarden_bin: None,
            run_all: false,
            dir: None,
        }
    }
}

enum Target {
    Name(String),
    Selector(LabelSelector),
}

struct Rule {
    namespace: String,
    target: Target,
    run: RunOptions,
}

/// What a pod's worker is told from outside.
#[derive(Default)]
pub(crate) struct PodControl {
    pub uid: String,
    /// Exit code for the played main containers.
    pub finish: Mutex<Option<i32>>,
    /// Gone from the store.
    pub deleted: AtomicBool,
    /// Marked for deletion (graceful): the grace period in seconds.
    pub deleting: Mutex<Option<u64>>,
    pub dir: Mutex<Option<PathBuf>>,
    pub ip: Mutex<Option<String>>,
}

pub(crate) struct Shared {
    pub client: Client,
    pub rt: tokio::runtime::Handle,
    pub opts: KubeletOptions,
    pub dir: PathBuf,
    pub stop: AtomicBool,
    rules: Mutex<Vec<Rule>>,
    pods: Mutex<HashMap<(String, String), Arc<PodControl>>>,
}

/// A running pod runner; stops every pod's processes when dropped.
pub struct Kubelet {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
    workers: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
    _rt: tokio::runtime::Runtime,
}

impl Kubelet {
    pub fn start(api: &TestApiServer, opts: KubeletOptions) -> std::io::Result<Kubelet> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kubelet")
            .enable_all()
            .build()?;
        let dir = opts
            .dir
            .clone()
            .unwrap_or_else(|| api.dir().join("kubelet"));
        std::fs::create_dir_all(&dir)?;
        let client = Client::new(
            api.state().clone(),
            &format!("system:node:{}", opts.node_name),
        );
        let rx = client.subscribe();
        let shared = Arc::new(Shared {
            client,
            rt: rt.handle().clone(),
            opts,
            dir,
            stop: AtomicBool::new(false),
            rules: Mutex::new(Vec::new()),
            pods: Mutex::new(HashMap::new()),
        });
        let workers = Arc::new(Mutex::new(Vec::new()));
        let (s, w) = (shared.clone(), workers.clone());
        let watch = std::thread::Builder::new()
            .name("kubelet-watch".into())
            .spawn(move || watch_loop(s, w, rx))?;
        let weak = Arc::downgrade(&shared);
        let reader: LogReader = Box::new(move |ns: &str, pod: &str, container: &str| {
            let shared = weak.upgrade()?;
            let pods = lock(&shared.pods);
            let dir = lock(&pods.get(&(ns.to_string(), pod.to_string()))?.dir).clone()?;
            // A played container or one not started yet has written nothing.
            Some(std::fs::read(log_path(&dir, container)).unwrap_or_default())
        });
        shared.client.state().pod_logs.set(Some(reader));
        let k = Kubelet {
            shared,
            threads: vec![watch],
            workers,
            _rt: rt,
        };
        k.rescan();
        Ok(k)
    }

    /// Runs pod `namespace/name` (now, or when it appears).
    pub fn run_pod(&self, namespace: &str, name: &str, run: RunOptions) {
        lock(&self.shared.rules).push(Rule {
            namespace: namespace.into(),
            target: Target::Name(name.into()),
            run,
        });
        self.rescan();
    }

    /// Runs every pod of `namespace` matching `selector` (`job-name=x`), present
    /// or future.
    pub fn run_matching(
        &self,
        namespace: &str,
        selector: &str,
        run: RunOptions,
    ) -> Result<(), String> {
        let sel = LabelSelector::parse(selector).map_err(|e| e.message)?;
        lock(&self.shared.rules).push(Rule {
            namespace: namespace.into(),
            target: Target::Selector(sel),
            run,
        });
        self.rescan();
        Ok(())
    }

    /// The played main containers of the pod finish with `exit_code`.
    pub fn finish_pod(&self, namespace: &str, name: &str, exit_code: i32) {
        if let Some(c) = lock(&self.shared.pods).get(&(namespace.into(), name.into())) {
            *lock(&c.finish) = Some(exit_code);
        }
    }

    /// The pod's directory (volumes, logs), once it runs.
    pub fn pod_dir(&self, namespace: &str, name: &str) -> Option<PathBuf> {
        let pods = lock(&self.shared.pods);
        let c = pods.get(&(namespace.into(), name.into()))?;
        let d = lock(&c.dir).clone();
        d
    }

    /// The pod's IP, once it runs.
    pub fn pod_ip(&self, namespace: &str, name: &str) -> Option<String> {
        let pods = lock(&self.shared.pods);
        let c = pods.get(&(namespace.into(), name.into()))?;
        let ip = lock(&c.ip).clone();
        ip
    }

    /// What an executed container wrote to stdout and stderr so far.
    pub fn pod_logs(&self, namespace: &str, name: &str, container: &str) -> String {
        self.pod_dir(namespace, name)
            .map(|d| log_path(&d, container))
            .and_then(|p| std::fs::read(p).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn rescan(&self) {
        rescan(&self.shared, &self.workers);
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.shared.client.state().pod_logs.set(None);
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let workers: Vec<_> = lock(&self.workers).drain(..).collect();
        for w in workers {
            let _ = w.join();
        }
    }
}

/// Reads a container's log: (namespace, pod, container) → bytes.
pub type LogReader = Box<dyn Fn(&str, &str, &str) -> Option<Vec<u8>> + Send + Sync>;

/// Where the server's `pods/log` reads from: the runner registers itself while
/// it runs (without one, logs are "waiting to start").
#[derive(Default)]
pub struct LogSource(Mutex<Option<LogReader>>);

impl LogSource {
    pub fn read(&self, namespace: &str, pod: &str, container: &str) -> Option<Vec<u8>> {
        lock(&self.0).as_ref()?(namespace, pod, container)
    }

    fn set(&self, reader: Option<LogReader>) {
        *lock(&self.0) = reader;
    }
}

/// The container `pods/log` shows: the one asked for, else the only one.
pub fn log_container(pod: &Value, requested: &str) -> Result<String, String> {
    let names = |list: &str| -> Vec<String> {
        pod["spec"][list]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str().map(String::from))
            .collect()
    };
    let (main, init) = (names("containers"), names("initContainers"));
    let pod_name = pod["metadata"]["name"].as_str().unwrap_or_default();
    if !requested.is_empty() {
        return if main.iter().chain(&init).any(|n| n == requested) {
            Ok(requested.to_string())
        } else {
            Err(format!(
                "container {requested} is not valid for pod {pod_name}"
            ))
        };
    }
    match main.as_slice() {
        [only] if init.is_empty() => Ok(only.clone()),
        _ => Err(format!(
            "a container name must be specified for pod {pod_name}, choose one of: [{}] or one of the init containers: [{}]",
            main.join(" "),
            init.join(" ")
        )),
    }
}

/// The API server's half of graceful pod deletion: a pod a kubelet runs (it has a
/// `hostIP`: there is no scheduler binding `spec.nodeName` here) that has not
/// finished is not removed at once but marked — `deletionTimestamp` = now + grace,
/// `deletionGracePeriodSeconds` = grace (DeleteOptions' `gracePeriodSeconds`, else
/// the pod's `terminationGracePeriodSeconds`) — and the runner deletes it with
/// grace 0 once its containers have stopped. Returns the object to store, or the
/// stored one when it is already marked; `None`: delete as usual.
pub fn graceful_deletion(
    rt: &crate::registry::ResourceType,
    old: &Value,
    opts: &Value,
) -> Option<Value> {
    let bound_pod =
        rt.group.is_empty() && rt.plural == "pods" && old["status"]["hostIP"].is_string();
    if !bound_pod {
        return None;
    }
    if matches!(
        old["status"]["phase"].as_str(),
        Some("Succeeded" | "Failed")
    ) {
        return None;
    }
    let grace = opts["gracePeriodSeconds"]
        .as_u64()
        .or_else(|| old["spec"]["terminationGracePeriodSeconds"].as_u64())
        .unwrap_or(30);
    if grace == 0 {
        return None;
    }
    if old["metadata"]["deletionTimestamp"].is_string() {
        return Some(old.clone());
    }
    let at = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_secs(grace as i64))
        .ok()?
        .round(jiff::Unit::Second)
        .ok()?;
    let mut o = old.clone();
    o["metadata"]["deletionTimestamp"] = Value::String(at.to_string());
    o["metadata"]["deletionGracePeriodSeconds"] = Value::from(grace);
    Some(o)
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn log_path(pod_dir: &Path, container: &str) -> PathBuf {
    pod_dir.join("logs").join(format!("{container}.log"))
}

fn key_of(pod: &Value) -> (String, String) {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (
        s(&pod["metadata"]["namespace"]),
        s(&pod["metadata"]["name"]),
    )
}

fn runnable(pod: &Value) -> bool {
    !matches!(
        pod["status"]["phase"].as_str(),
        Some("Succeeded" | "Failed")
    ) && !pod["metadata"]["deletionTimestamp"].is_string()
        && pod["status"]["podIP"].is_null()
}

/// The run options for a pod, if it is to run here.
fn wanted(shared: &Shared, pod: &Value) -> Option<RunOptions> {
    let (ns, name) = key_of(pod);
    let rules = lock(&shared.rules);
    for r in rules.iter().rev() {
        let hit = r.namespace == ns
            && match &r.target {
                Target::Name(n) => *n == name,
                Target::Selector(s) => s.matches(pod),
            };
        if hit {
            return Some(r.run.clone());
        }
    }
    shared.opts.run_all.then(RunOptions::default)
}

fn consider(
    shared: &Arc<Shared>,
    workers: &Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
    pod: &Value,
) {
    let key = key_of(pod);
    let uid = pod["metadata"]["uid"].as_str().unwrap_or_default();
    // A pod created again under a known name is a new pod.
    if let Some(c) = lock(&shared.pods).get(&key).filter(|c| c.uid == uid) {
        let code = pod["metadata"]["annotations"][EXIT_CODE_ANNOTATION]
            .as_str()
            .and_then(|s| s.parse::<i32>().ok());
        if let Some(code) = code {
            lock(&c.finish).get_or_insert(code);
        }
        if pod["metadata"]["deletionTimestamp"].is_string() {
            let grace = pod["metadata"]["deletionGracePeriodSeconds"]
                .as_u64()
                .unwrap_or(0);
            lock(&c.deleting).get_or_insert(grace);
        }
        return;
    }
    if !runnable(pod) {
        return;
    }
    let Some(run) = wanted(shared, pod) else {
        return;
    };
    let ctl = Arc::new(PodControl {
        uid: uid.into(),
        ..PodControl::default()
    });
    lock(&shared.pods).insert(key.clone(), ctl.clone());
    let (s, p) = (shared.clone(), pod.clone());
    let t = std::thread::Builder::new()
        .name(format!("pod-{}", key.1))
        .spawn(move || worker::run(s, p, run, ctl));
    if let Ok(t) = t {
        lock(workers).push(t);
    }
}

fn rescan(shared: &Arc<Shared>, workers: &Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>) {
    let pods = shared.client.state().store().list("/pods", None);
    let live: std::collections::HashSet<_> = pods.iter().map(key_of).collect();
    for (k, c) in lock(&shared.pods).iter() {
        if !live.contains(k) {
            c.deleted.store(true, Ordering::SeqCst);
        }
    }
    for p in &pods {
        consider(shared, workers, p);
    }
}

fn watch_loop(
    shared: Arc<Shared>,
    workers: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
    mut rx: tokio::sync::broadcast::Receiver<Arc<crate::storage::Change>>,
) {
    while !shared.stop.load(Ordering::SeqCst) {
        match rx.try_recv() {
            Ok(c) if c.key == "/pods" => {
                if c.kind == "DELETED" {
                    let uid = &c.object["metadata"]["uid"];
                    if let Some(ctl) = lock(&shared.pods).get(&key_of(&c.object)) {
                        // Only the pod this worker runs (not a new one of the same name).
                        if ctl.uid == uid.as_str().unwrap_or_default() {
                            ctl.deleted.store(true, Ordering::SeqCst);
                        }
                    }
                } else {
                    consider(&shared, &workers, &c.object);
                }
            }
            Ok(_) => {}
            Err(TryRecvError::Lagged(_)) => rescan(&shared, &workers),
            Err(TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(20)),
            Err(TryRecvError::Closed) => return,
        }
    }
}
