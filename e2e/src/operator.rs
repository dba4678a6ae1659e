//! The real `pgwarden-operator` binary as a child process, pointed at a
//! kubeconfig (the test API server's, or a real cluster's).
//!
//! ```no_run
//! # let kubeconfig = std::path::Path::new("kc");
//! let mut op = pgwarden_e2e::Operator::builder(kubeconfig).identity("op-a").start();
//! op.wait_ready(std::time::Duration::from_secs(10));
//! let metrics = op.metrics();
//! let status = op.terminate();
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::net::{free_port, http_get};

/// The operator binary: `$PGWARDEN_OPERATOR_BIN`, else beside the test
/// executable's profile dir (`cargo build -p pgwarden-operator`).
pub fn operator_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("PGWARDEN_OPERATOR_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.exists(),
            "PGWARDEN_OPERATOR_BIN={} does not exist",
            bin.display()
        );
        return bin;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|profile_dir| profile_dir.join("pgwarden-operator"))
        .expect("test executable has no grandparent dir");
    assert!(
        bin.exists(),
        "{} not found: build it first: cargo build -p pgwarden-operator",
        bin.display()
    );
    bin
}

#[derive(Clone, Debug)]
pub struct OperatorBuilder {
    kubeconfig: PathBuf,
    context: String,
    namespace: String,
    identity: Option<String>,
    leader_election: bool,
    lease_duration_seconds: u64,
    namespaces: Vec<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl OperatorBuilder {
    /// Kubeconfig context (default `admin`).
    pub fn context(mut self, context: &str) -> Self {
        self.context = context.into();
        self
    }

    /// The operator's own namespace (default `default`): its Lease and keys.
    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespace = ns.into();
        self
    }

    pub fn identity(mut self, id: &str) -> Self {
        self.identity = Some(id.into());
        self
    }

    pub fn leader_election(mut self, on: bool) -> Self {
        self.leader_election = on;
        self
    }

    /// Default 3 s, the shortest the operator accepts, so failover tests are quick.
    pub fn lease_duration_seconds(mut self, s: u64) -> Self {
        self.lease_duration_seconds = s;
        self
    }

    pub fn watch_namespaces(mut self, ns: &[&str]) -> Self {
        self.namespaces = ns.iter().map(|s| s.to_string()).collect();
        self
    }

    /// More command-line arguments (e.g. the config stream's flags).
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    pub fn start(self) -> Operator {
        let dir = tempfile::Builder::new()
            .prefix("pgwarden-operator-")
            .tempdir()
            .expect("temp dir");
        let log = dir.path().join("operator.log");
        let metrics_port = free_port();
        let mut cmd = Command::new(operator_bin());
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--context", &self.context])
            .args(["--namespace", &self.namespace])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args(["--leader-election", &self.leader_election.to_string()])
            .args([
                "--lease-duration-seconds",
                &self.lease_duration_seconds.to_string(),
            ]);
        if let Some(id) = &self.identity {
            cmd.args(["--identity", id]);
        }
        if !self.namespaces.is_empty() {
            cmd.args(["--namespaces", &self.namespaces.join(",")]);
        }
        // Tests run operators side by side: never the fixed default 0.0.0.0:8443.
        if !self.args.iter().any(|a| a.starts_with("--stream-addr")) {
            cmd.arg(format!("--stream-addr=127.0.0.1:{}", free_port()));
        }
        cmd.args(&self.args)
            .env_remove("KUBECONFIG")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .env("RUST_LOG", "info,pgwarden_operator=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create operator log"));
        let child = cmd.spawn().expect("spawn pgwarden-operator");
        Operator {
            child,
            metrics_port,
            log,
            identity: self.identity,
            _dir: dir,
        }
    }
}

/// A running operator; killed when dropped.
pub struct Operator {
    child: Child,
    metrics_port: u16,
    log: PathBuf,
    identity: Option<String>,
    _dir: tempfile::TempDir,
}

impl Operator {
    pub fn builder(kubeconfig: &Path) -> OperatorBuilder {
        OperatorBuilder {
            kubeconfig: kubeconfig.to_path_buf(),
            context: "admin".into(),
            namespace: "default".into(),
            identity: None,
            leader_election: true,
            lease_duration_seconds: 3,
            namespaces: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn identity(&self) -> Option<&str> {
        self.identity.as_deref()
    }

    pub fn metrics_port(&self) -> u16 {
        self.metrics_port
    }

    /// Everything the operator logged so far (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /metrics` (panics with the log if it is not served).
    pub fn metrics(&self) -> String {
        match http_get(self.metrics_port, "/metrics") {
            Ok((200, body)) => body,
            other => panic!("/metrics: {other:?}\n--- operator log ---\n{}", self.log()),
        }
    }

    /// The value of an unlabelled or fully labelled series (`name{a="b"}`).
    pub fn metric(&self, series: &str) -> Option<f64> {
        self.metrics().lines().find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
    }

    /// Waits until /readyz answers 200; panics with the log after `timeout`.
    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, _)) = http_get(self.metrics_port, "/readyz") {
                return;
            }
            assert!(
                self.running(),
                "pgwarden-operator exited\n--- operator log ---\n{}",
                self.log()
            );
            assert!(
                Instant::now() < deadline,
                "pgwarden-operator not ready after {timeout:?}: {:?}\n--- operator log ---\n{}",
                http_get(self.metrics_port, "/readyz"),
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn running(&self) -> bool {
        let pid = self.child.id();
        // try_wait needs &mut; /proc tells without reaping.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
    }

    /// SIGTERM and wait (SIGKILL after 15 s); returns how it exited. The log
    /// stays readable until `self` is dropped.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal_and_wait("TERM", Duration::from_secs(15))
    }

    /// SIGKILL: no shutdown, the Lease is not released.
    pub fn kill(&mut self) -> ExitStatus {
        self.signal_and_wait("KILL", Duration::from_secs(5))
    }

    fn signal_and_wait(&mut self, signal: &str, timeout: Duration) -> ExitStatus {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status;
        }
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        self.child.wait().expect("wait for pgwarden-operator")
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Pod shaped as injection builds it, for tests that run the sidecar
/// themselves instead of through the webhook: the `pgwarden.io/injected`
/// annotation, the native sidecar `pgwarden` as the only holder of the
/// `pgwarden.io/sidecar` token volume, and one app container. The operator's
/// stream serves nothing else (the annotation alone proves nothing).
pub fn injected_pod(
    namespace: &str,
    name: &str,
    labels: serde_json::Value,
    service_account: &str,
) -> serde_json::Value {
    serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels,
            "annotations": {"pgwarden.io/injected": "v1"}},
        "spec": {"serviceAccountName": service_account,
            "initContainers": [{"name": "pgwarden", "image": "pgwarden:e2e", "restartPolicy": "Always",
                "volumeMounts": [{"name": "pgwarden-sidecar-token",
                    "mountPath": "/var/run/secrets/pgwarden.io/sidecar", "readOnly": true}]}],
            "containers": [{"name": "app", "image": "busybox"}],
            "volumes": [{"name": "pgwarden-sidecar-token", "projected": {"sources": [
                {"serviceAccountToken": {"audience": "pgwarden.io/sidecar",
                    "expirationSeconds": 600, "path": "token"}}]}}]}})
}
