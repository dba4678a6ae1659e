//! One pod's life on the runner (see the module docs of [`super`]).

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{lock, log_path, probe, spec, Exec, PodControl, RunOptions, Shared};

/// Next loopback host number (127.0.0.2 first), shared by every runner in the
/// process so parallel tests never hand out one address twice.
static NEXT_IP: AtomicU32 = AtomicU32::new(2);

fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Ports the pod will listen on: declared containerPorts and listen flags.
fn pod_ports(pod: &Value) -> Vec<u16> {
    let mut ports = Vec::new();
    for list in ["initContainers", "containers"] {
        for c in pod["spec"][list].as_array().into_iter().flatten() {
            for p in c["ports"].as_array().into_iter().flatten() {
                if let Some(n) = p["containerPort"]
                    .as_u64()
                    .and_then(|n| u16::try_from(n).ok())
                {
                    ports.push(n);
                }
            }
            for a in spec::own_argv(c) {
                let v = a.rsplit('=').next().unwrap_or_default();
                if let Some((_, p)) = v.split_once(':') {
                    if let Ok(n) = p.parse::<u16>() {
                        ports.push(n);
                    }
                }
            }
        }
    }
    ports
}

/// A loopback address none of whose pod ports is taken (another process may use
/// the same range).
fn alloc_ip(pod: &Value) -> Option<String> {
    let ports = pod_ports(pod);
    for _ in 0..1000 {
        let n = NEXT_IP.fetch_add(1, Ordering::SeqCst);
        let (hi, lo) = (n / 256, n % 256);
        if hi > 255 {
            return None;
        }
        if lo == 0 || lo == 255 {
            continue;
        }
        let ip = format!("127.0.{hi}.{lo}");
        let free = ports
            .iter()
            .all(|p| std::net::TcpListener::bind((ip.as_str(), *p)).is_ok());
        if free {
            return Some(ip);
        }
    }
    None
}

/// One container as the runner tracks it.
struct Ctr {
    spec: Value,
    /// `None`: played.
    argv: Option<Vec<String>>,
    sidecar: bool,
    child: Option<Child>,
    started_at: Option<String>,
    started: bool,
    exit: Option<(i32, String)>,
    waiting: (String, String),
}

impl Ctr {
    fn status(&self) -> Value {
        let name = &self.spec["name"];
        let id = match &self.child {
            Some(c) => format!("testapi://{}", c.id()),
            None if self.argv.is_none() => "testapi://played".into(),
            None => String::new(),
        };
        let state = match (&self.exit, &self.started_at) {
            (Some((code, at)), started) => json!({"terminated": {
                "exitCode": code, "reason": if *code == 0 { "Completed" } else { "Error" },
                "startedAt": started, "finishedAt": at, "containerID": id}}),
            (None, Some(at)) => json!({"running": {"startedAt": at}}),
            (None, None) => {
                let mut w = json!({"reason": self.waiting.0});
                if !self.waiting.1.is_empty() {
                    w["message"] = json!(self.waiting.1);
                }
                json!({ "waiting": w })
            }
        };
        let running = self.exit.is_none() && self.started_at.is_some();
        let mut s = json!({"name": name, "image": self.spec["image"], "imageID": "",
            "ready": running && (self.started || !self.sidecar), "restartCount": 0,
            "started": running && self.started, "state": state, "lastState": {}});
        if self.started_at.is_some() {
            s["containerID"] = json!(id);
        }
        s
    }

    fn running(&mut self) -> bool {
        if self.exit.is_some() || self.started_at.is_none() {
            return false;
        }
        let Some(c) = &mut self.child else {
            return true;
        };
        match c.try_wait() {
            Ok(Some(st)) => {
                let code = st.code().unwrap_or(128 + st.signal().unwrap_or(9));
                self.exit = Some((code, now()));
                false
            }
            _ => true,
        }
    }

    /// SIGTERM to the container's process group, `grace`, then SIGKILL.
    fn stop(&mut self, grace: Duration) {
        if !self.running() {
            return;
        }
        let Some(c) = &mut self.child else {
            self.exit = Some((0, now()));
            return;
        };
        let group = format!("-{}", c.id());
        let _ = Command::new("kill")
            .args(["-TERM", "--", &group])
            .stderr(Stdio::null())
            .status();
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if !self.running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        if let Some(c) = &mut self.child {
            let _ = c.wait();
        }
        self.running();
    }
}

struct Pod {
    shared: Arc<Shared>,
    ctl: Arc<PodControl>,
    obj: Value,
    path: String,
    dir: PathBuf,
    ip: String,
    init: Vec<Ctr>,
    main: Vec<Ctr>,
    phase: &'static str,
    initialized: bool,
    start_time: String,
    message: Option<String>,
    tokens: HashMap<String, (String, Instant)>,
    /// [`RunOptions::grace`], else the pod's terminationGracePeriodSeconds.
    run_grace: Option<Duration>,
    spec_grace: Duration,
}

pub(crate) fn run(shared: Arc<Shared>, obj: Value, run: RunOptions, ctl: Arc<PodControl>) {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let (ns, name, uid) = (
        s(&obj["metadata"]["namespace"]),
        s(&obj["metadata"]["name"]),
        s(&obj["metadata"]["uid"]),
    );
    let dir = shared
        .dir
        .join("pods")
        .join(format!("{ns}_{name}_{}", uid.get(..8).unwrap_or(&uid)));
    let ctrs = |list: &str, run: &RunOptions| -> Vec<Ctr> {
        obj["spec"][list]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| Ctr {
                argv: exec_for(&shared, run, c),
                sidecar: list == "initContainers" && c["restartPolicy"] == "Always",
                spec: c.clone(),
                child: None,
                started_at: None,
                started: false,
                exit: None,
                waiting: (
                    if list == "initContainers" {
                        "PodInitializing"
                    } else {
                        "ContainerCreating"
                    }
                    .into(),
                    String::new(),
                ),
            })
            .collect()
    };
    let spec_grace = Duration::from_secs(
        obj["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30),
    );
    let mut pod = Pod {
        path: format!("/api/v1/namespaces/{ns}/pods/{name}/status"),
        init: ctrs("initContainers", &run),
        main: ctrs("containers", &run),
        shared: shared.clone(),
        ctl: ctl.clone(),
        obj,
        dir: dir.clone(),
        ip: String::new(),
        phase: "Pending",
        initialized: false,
        start_time: now(),
        message: None,
        tokens: HashMap::new(),
        run_grace: run.grace,
        spec_grace,
    };
    let Some(ip) = alloc_ip(&pod.obj) else {
        pod.fail("no free loopback address for the pod");
        return;
    };
    pod.ip = ip.clone();
    pod.obj["status"]["podIP"] = json!(ip);
    pod.obj["status"]["hostIP"] = json!("127.0.0.1");
    *lock(&ctl.ip) = Some(ip);
    if fs::create_dir_all(dir.join("logs")).is_err()
        || fs::create_dir_all(dir.join("volumes")).is_err()
    {
        pod.fail("cannot create the pod directory");
        return;
    }
    *lock(&ctl.dir) = Some(dir);
    pod.write();
    pod.live();
    // Deleted through the API: the containers are stopped, the pod object goes now
    // (what the kubelet's status manager does once a terminating pod is down).
    if lock(&ctl.deleting).is_some() && !shared.stop.load(Ordering::SeqCst) {
        let grace = pod.grace();
        pod.stop_all(grace);
        let path = pod.path.trim_end_matches("/status").to_string();
        let opts = json!({"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
            "preconditions": {"uid": uid}});
        let client = shared.client.clone();
        let _ = shared
            .rt
            .block_on(async move { client.delete(&path, &opts).await });
    }
}

fn exec_for(shared: &Shared, run: &RunOptions, c: &Value) -> Option<Vec<String>> {
    let name = c["name"].as_str().unwrap_or_default();
    match run.commands.get(name) {
        Some(Exec::Argv(a)) => return Some(a.clone()),
        Some(Exec::AsSpecified) => return Some(spec::own_argv(c)),
        None => {}
    }
    if spec::is_pgwarden(c) {
        // Without a binary the container cannot start: an empty argv fails it.
        return Some(match &shared.opts.pgwarden_bin {
            Some(bin) => spec::pgwarden_argv(&bin.to_string_lossy(), c),
            None => Vec::new(),
        });
    }
    None
}

impl Pod {
    fn gone(&self) -> bool {
        self.ctl.deleted.load(Ordering::SeqCst)
            || lock(&self.ctl.deleting).is_some()
            || self.shared.stop.load(Ordering::SeqCst)
    }

    /// How long a container may take after SIGTERM: the test's override, else the
    /// deletion's grace period, else the pod's terminationGracePeriodSeconds.
    fn grace(&self) -> Duration {
        self.run_grace
            .or_else(|| lock(&self.ctl.deleting).map(Duration::from_secs))
            .unwrap_or(self.spec_grace)
    }

    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.shared.rt.block_on(f)
    }

    fn write(&mut self) {
        let ready = self.phase == "Running"
            && self.main.iter_mut().all(|c| c.running())
            && self
                .init
                .iter_mut()
                .filter(|c| c.sidecar)
                .all(|c| c.running() && c.started);
        let cond = |t: &str, ok: bool, reason: Option<&str>| {
            let mut c = json!({"type": t, "status": if ok { "True" } else { "False" },
                "lastProbeTime": null, "lastTransitionTime": self.start_time});
            if let Some(r) = reason.filter(|_| !ok) {
                c["reason"] = json!(r);
            }
            c
        };
        let done = matches!(self.phase, "Succeeded" | "Failed");
        let not_ready = if done {
            "PodCompleted"
        } else {
            "ContainersNotReady"
        };
        let mut status = json!({
            "phase": self.phase,
            "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.ip, "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time, "qosClass": "BestEffort",
            "conditions": [
                cond("PodScheduled", true, None),
                cond("Initialized", self.initialized || done,
                     Some("ContainersNotInitialized")),
                cond("ContainersReady", ready, Some(not_ready)),
                cond("Ready", ready, Some(not_ready)),
            ],
            "initContainerStatuses": self.init.iter().map(Ctr::status).collect::<Vec<_>>(),
            "containerStatuses": self.main.iter().map(Ctr::status).collect::<Vec<_>>(),
        });
        if self.ip.is_empty() {
            for k in ["podIP", "podIPs"] {
                status[k] = Value::Null;
            }
        }
        if let Some(m) = &self.message {
            status["message"] = json!(m);
        }
        if self.init.is_empty() {
            status["initContainerStatuses"] = Value::Null;
        }
        let path = self.path.clone();
        let client = self.shared.client.clone();
        let _ = self.block_on(async move {
            client
                .merge_patch(&path, &json!({ "status": status }))
                .await
        });
    }

    fn fail(&mut self, message: &str) {
        self.message = Some(message.into());
        self.stop_all(Duration::from_secs(2));
        self.phase = "Failed";
        if !self.gone() {
            self.write();
        }
    }

    fn stop_all(&mut self, grace: Duration) {
        for i in 0..self.main.len() {
            self.stop_one(false, i, grace);
        }
        for i in (0..self.init.len()).rev() {
            self.stop_one(true, i, grace);
        }
    }

    fn stop_one(&mut self, init: bool, i: usize, grace: Duration) {
        let c = self.ctr(init, i);
        if !c.running() {
            return;
        }
        let name = c.spec["name"].as_str().unwrap_or_default().to_string();
        self.event(
            "Normal",
            "Killing",
            &name,
            &format!("Stopping container {name}"),
        );
        self.ctr(init, i).stop(grace);
    }

    /// A core/v1 Event about the pod (what `kubectl describe pod` lists).
    fn event(&self, type_: &str, reason: &str, container: &str, message: &str) {
        let m = &self.obj["metadata"];
        let ns = m["namespace"].as_str().unwrap_or_default().to_string();
        let node = self.shared.opts.node_name.clone();
        let mut involved = json!({"kind": "Pod", "apiVersion": "v1", "namespace": ns,
            "name": m["name"], "uid": m["uid"]});
        if !container.is_empty() {
            let list = if self.init.iter().any(|c| c.spec["name"] == container) {
                "initContainers"
            } else {
                "containers"
            };
            involved["fieldPath"] = json!(format!("spec.{list}{{{container}}}"));
        }
        let ev = json!({"apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": format!("{}.", m["name"].as_str().unwrap_or_default())},
            "involvedObject": involved, "reason": reason, "message": message, "type": type_,
            "source": {"component": "kubelet", "host": node},
            "reportingComponent": "kubelet", "reportingInstance": node,
            "firstTimestamp": now(), "lastTimestamp": now(), "count": 1});
        let client = self.shared.client.clone();
        let path = format!("/api/v1/namespaces/{ns}/events");
        let _ = self.block_on(async move { client.create(&path, &ev).await });
    }

    fn get(&self, kind: &str, name: &str) -> Option<Value> {
        let ns = self.obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default();
        let plural = if kind == "Secret" {
            "secrets"
        } else {
            "configmaps"
        };
        let path = format!("/api/v1/namespaces/{ns}/{plural}/{name}");
        let client = self.shared.client.clone();
        self.block_on(async move { client.get(&path).await.ok() })
    }

    fn live(&mut self) {
        // Volumes, retried while something they need is missing (ContainerCreating).
        loop {
            match self.sync_volumes() {
                Ok(()) => break,
                Err(e) => {
                    let msg = format!("MountVolume.SetUp failed: {e}");
                    if self.message.as_deref() != Some(&msg) {
                        self.event("Warning", "FailedMount", "", &msg);
                        self.message = Some(msg);
                        self.write();
                    }
                }
            }
            for _ in 0..50 {
                if self.gone() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.message = None;
        // Init containers, in order.
        for i in 0..self.init.len() {
            if let Err(e) = self.start(true, i) {
                return self.fail(&e);
            }
            self.write();
            let sidecar = self.init[i].sidecar;
            let result = if sidecar {
                self.startup(i)
            } else {
                self.complete_init(i)
            };
            if let Err(e) = result {
                if self.gone() {
                    return self.stop_all(self.grace());
                }
                return self.fail(&e);
            }
            self.write();
        }
        self.initialized = true;
        for i in 0..self.main.len() {
            if let Err(e) = self.start(false, i) {
                return self.fail(&e);
            }
        }
        self.phase = "Running";
        self.write();
        // Until every main container has finished, or the pod goes.
        let mut last_sync = Instant::now();
        loop {
            if self.gone() {
                return self.stop_all(self.grace());
            }
            let finish = *lock(&self.ctl.finish);
            let mut changed = false;
            for c in self.main.iter_mut().chain(self.init.iter_mut()) {
                let was = c.exit.is_some();
                if c.argv.is_none() && !c.sidecar && c.exit.is_none() {
                    if let Some(code) = finish {
                        c.exit = Some((code, now()));
                    }
                }
                c.running();
                changed |= was != c.exit.is_some();
            }
            if self.main.iter().all(|c| c.exit.is_some()) {
                break;
            }
            if changed {
                self.write();
            }
            if last_sync.elapsed() > Duration::from_secs(1) {
                let _ = self.sync_volumes();
                last_sync = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        // Main containers done: sidecars stop in reverse order.
        self.write();
        let grace = self.grace();
        for i in (0..self.init.len()).rev() {
            if self.init[i].sidecar {
                self.stop_one(true, i, grace);
            }
        }
        let ok = self
            .main
            .iter()
            .all(|c| c.exit.as_ref().is_some_and(|e| e.0 == 0));
        self.phase = if ok { "Succeeded" } else { "Failed" };
        if !self.gone() {
            self.write();
        }
    }

    fn ctr(&mut self, init: bool, i: usize) -> &mut Ctr {
        if init {
            &mut self.init[i]
        } else {
            &mut self.main[i]
        }
    }

    /// Starts (or, if played, marks running) one container.
    fn start(&mut self, init: bool, i: usize) -> Result<(), String> {
        let c = if init { &self.init[i] } else { &self.main[i] };
        let (spec_c, argv) = (c.spec.clone(), c.argv.clone());
        let name = spec_c["name"].as_str().unwrap_or_default().to_string();
        let Some(argv) = argv else {
            let c = self.ctr(init, i);
            c.started_at = Some(now());
            c.started = true;
            self.event(
                "Normal",
                "Started",
                &name,
                &format!("Started container {name} (played, not executed)"),
            );
            return Ok(());
        };
        if argv.is_empty() {
            return Err(format!(
                "container {name}: nothing to run (pgwarden's sidecar needs the runner's pgwarden binary)"
            ));
        }
        let lookup = |kind: &str, n: &str| self.get(kind, n);
        let mut env = spec::container_env(&self.obj, &spec_c, &lookup)
            .map_err(|e| format!("container {name}: CreateContainerConfigError: {e}"))?;
        let mut mounts: Vec<(String, String)> = spec_c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                let mut host = self
                    .dir
                    .join("volumes")
                    .join(m["name"].as_str().unwrap_or_default());
                if let Some(sp) = m["subPath"].as_str().filter(|s| !s.is_empty()) {
                    host = host.join(sp);
                }
                (
                    m["mountPath"].as_str().unwrap_or_default().to_string(),
                    host.to_string_lossy().into_owned(),
                )
            })
            .collect();
        mounts.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
        let argv: Vec<String> = argv.iter().map(|a| spec::expand(a, &env)).collect();
        let argv = spec::rewrite_args(&argv, &self.ip, &mounts);
        spec::rewrite_env(&mut env, &self.ip, &mounts);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path(&self.dir, &name))
            .map_err(|e| format!("container {name}: log file: {e}"))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &self.dir)
            .envs(&env)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log2))
            .stderr(Stdio::from(log))
            // Its own process group, so stopping it reaches every process in it.
            .process_group(0);
        if let Ok(l) = std::env::var("RUST_LOG") {
            cmd.env("RUST_LOG", l);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("container {name}: starting {}: {e}", argv[0]))?;
        let c = self.ctr(init, i);
        c.child = Some(child);
        c.started_at = Some(now());
        c.started = !c.sidecar || c.spec["startupProbe"].is_null();
        self.event(
            "Normal",
            "Started",
            &name,
            &format!("Started container {name}"),
        );
        Ok(())
    }

    fn startup(&mut self, i: usize) -> Result<(), String> {
        let probe_spec = self.init[i].spec["startupProbe"].clone();
        if probe_spec.is_null() || self.init[i].argv.is_none() {
            self.init[i].started = true;
            return Ok(());
        }
        let c_spec = self.init[i].spec.clone();
        let ip = self.ip.clone();
        let dir = self.dir.clone();
        let exec = |argv: &[String]| -> Result<(), String> {
            let st = Command::new(argv.first().ok_or("empty exec probe")?)
                .args(&argv[1..])
                .current_dir(&dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|e| e.to_string())?;
            if st.success() {
                Ok(())
            } else {
                Err(format!("command exited with {st}"))
            }
        };
        let ctl = self.ctl.clone();
        let shared = self.shared.clone();
        let child_exit = std::cell::RefCell::new(self.init[i].child.take());
        let keep_going = || -> Result<(), String> {
            if ctl.deleted.load(Ordering::SeqCst)
                || lock(&ctl.deleting).is_some()
                || shared.stop.load(Ordering::SeqCst)
            {
                return Err("pod deleted".into());
            }
            if let Some(c) = child_exit.borrow_mut().as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    return Err(format!(
                        "container exited before its startup probe passed ({st})"
                    ));
                }
            }
            Ok(())
        };
        let r = probe::wait(&probe_spec, &ip, &c_spec, &exec, &keep_going);
        self.init[i].child = child_exit.into_inner();
        match &r {
            Ok(()) => self.init[i].started = true,
            Err(e) => {
                self.init[i].running();
                let name = c_spec["name"].as_str().unwrap_or_default();
                self.event("Warning", "Unhealthy", name, e);
            }
        }
        r
    }

    fn complete_init(&mut self, i: usize) -> Result<(), String> {
        let c = &mut self.init[i];
        if c.argv.is_none() {
            c.exit = Some((0, now()));
            return Ok(());
        }
        loop {
            if self.gone() {
                return Err("pod deleted".into());
            }
            let c = &mut self.init[i];
            if !c.running() {
                return match &c.exit {
                    Some((0, _)) => Ok(()),
                    Some((code, _)) => Err(format!(
                        "init container {} exited with {code}",
                        c.spec["name"].as_str().unwrap_or_default()
                    )),
                    None => Ok(()),
                };
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Writes every volume's files (only what changed); tokens are renewed at 80%
    /// of their lifetime.
    fn sync_volumes(&mut self) -> Result<(), String> {
        let vols = self.obj["spec"]["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for v in vols {
            let name = v["name"].as_str().unwrap_or_default().to_string();
            let root = self.dir.join("volumes").join(&name);
            fs::create_dir_all(&root).map_err(|e| format!("volume {name}: {e}"))?;
            let mode = |src: &Value| src["defaultMode"].as_u64().unwrap_or(0o644) as u32;
            let files: Vec<(String, Vec<u8>, u32)> = if v["emptyDir"].is_object() {
                Vec::new()
            } else if v["secret"].is_object() {
                let s = &v["secret"];
                self.object_files(
                    "Secret",
                    s["secretName"].as_str().unwrap_or_default(),
                    s,
                    mode(s),
                )?
            } else if v["configMap"].is_object() {
                let s = &v["configMap"];
                self.object_files(
                    "ConfigMap",
                    s["name"].as_str().unwrap_or_default(),
                    s,
                    mode(s),
                )?
            } else if v["downwardAPI"].is_object() {
                self.downward_files(&v["downwardAPI"], mode(&v["downwardAPI"]))?
            } else if v["projected"].is_object() {
                let p = &v["projected"];
                let m = mode(p);
                let mut out = Vec::new();
                for src in p["sources"].as_array().into_iter().flatten() {
                    if src["serviceAccountToken"].is_object() {
                        out.push(self.token_file(&name, &src["serviceAccountToken"], m)?);
                    } else if src["secret"].is_object() {
                        let s = &src["secret"];
                        out.extend(self.object_files(
                            "Secret",
                            s["name"].as_str().unwrap_or_default(),
                            s,
                            m,
                        )?);
                    } else if src["configMap"].is_object() {
                        let s = &src["configMap"];
                        out.extend(self.object_files(
                            "ConfigMap",
                            s["name"].as_str().unwrap_or_default(),
                            s,
                            m,
                        )?);
                    } else if src["downwardAPI"].is_object() {
                        out.extend(self.downward_files(&src["downwardAPI"], m)?);
                    } else {
                        return Err(format!("volume {name}: unsupported projected source {src}"));
                    }
                }
                out
            } else {
                return Err(format!("volume {name}: unsupported volume type"));
            };
            for (path, data, mode) in files {
                write_file(&root, &path, &data, mode).map_err(|e| format!("volume {name}: {e}"))?;
            }
        }
        Ok(())
    }

    fn object_files(
        &self,
        kind: &str,
        name: &str,
        src: &Value,
        mode: u32,
    ) -> Result<Vec<(String, Vec<u8>, u32)>, String> {
        let Some(obj) = self.get(kind, name) else {
            if src["optional"] == true {
                return Ok(Vec::new());
            }
            return Err(format!("{} {name:?} not found", kind.to_lowercase()));
        };
        let items: Vec<(String, String, u32)> = match src["items"].as_array() {
            Some(items) => items
                .iter()
                .map(|it| {
                    (
                        it["key"].as_str().unwrap_or_default().to_string(),
                        it["path"].as_str().unwrap_or_default().to_string(),
                        it["mode"].as_u64().map(|m| m as u32).unwrap_or(mode),
                    )
                })
                .collect(),
            None => ["data", "binaryData"]
                .iter()
                .flat_map(|f| obj[*f].as_object().into_iter().flatten())
                .map(|(k, _)| (k.clone(), k.clone(), mode))
                .collect(),
        };
        items
            .into_iter()
            .map(|(key, path, mode)| {
                spec::key_of(&obj, kind, &key)
                    .map(|d| (path, d, mode))
                    .ok_or_else(|| format!("couldn't find key {key} in {kind} {name}"))
            })
            .collect()
    }

    fn downward_files(
        &self,
        src: &Value,
        mode: u32,
    ) -> Result<Vec<(String, Vec<u8>, u32)>, String> {
        src["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|it| {
                let path = it["path"].as_str().unwrap_or_default().to_string();
                let field = it["fieldRef"]["fieldPath"].as_str().unwrap_or_default();
                let v = spec::field_ref(&self.obj, field)?;
                Ok((
                    path,
                    v.into_bytes(),
                    it["mode"].as_u64().map(|m| m as u32).unwrap_or(mode),
                ))
            })
            .collect()
    }

    /// A projected service-account token from TokenRequest, bound to this pod.
    fn token_file(
        &mut self,
        vol: &str,
        src: &Value,
        mode: u32,
    ) -> Result<(String, Vec<u8>, u32), String> {
        let path = src["path"].as_str().unwrap_or_default().to_string();
        let key = format!("{vol}/{path}");
        if let Some((t, renew)) = self.tokens.get(&key) {
            if Instant::now() < *renew {
                return Ok((path, t.clone().into_bytes(), mode));
            }
        }
        let m = &self.obj["metadata"];
        let ns = m["namespace"].as_str().unwrap_or_default();
        let sa = self.obj["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("default");
        let ttl = src["expirationSeconds"].as_u64().unwrap_or(3600);
        let mut spec = json!({"expirationSeconds": ttl,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": m["name"], "uid": m["uid"]}});
        if let Some(a) = src["audience"].as_str().filter(|a| !a.is_empty()) {
            spec["audiences"] = json!([a]);
        }
        let req =
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec});
        let url = format!("/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token");
        let client = self.shared.client.clone();
        let resp = self
            .block_on(async move { client.create(&url, &req).await })
            .map_err(|e| format!("requesting a token for service account {sa}: {e}"))?;
        let token = resp["status"]["token"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if token.is_empty() {
            return Err("TokenRequest returned no token".into());
        }
        let lifetime = resp["status"]["expirationTimestamp"]
            .as_str()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .map(|exp| (exp.as_second() - jiff::Timestamp::now().as_second()).max(1) as u64)
            .unwrap_or(ttl);
        let renew = Instant::now() + Duration::from_secs(lifetime) * 4 / 5;
        self.tokens.insert(key, (token.clone(), renew));
        Ok((path, token.into_bytes(), mode))
    }
}

/// Writes `data` at `rel` under `root` if it differs (atomically: temp + rename).
fn write_file(root: &Path, rel: &str, data: &[u8], mode: u32) -> Result<(), String> {
    let rel_path = Path::new(rel);
    if rel.is_empty()
        || rel_path.is_absolute()
        || rel_path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(format!("invalid path {rel:?}"));
    }
    let path = root.join(rel_path);
    if fs::read(&path).ok().as_deref() == Some(data) {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| e.to_string())?;
    }
    let tmp = path.with_extension("testapi-tmp");
    fs::write(&tmp, data).map_err(|e| e.to_string())?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(|e| e.to_string())?;
    fs::rename(&tmp, &path).map_err(|e| e.to_string())
}
