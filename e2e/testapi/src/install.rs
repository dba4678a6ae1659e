//! Installing pgwarden from its rendered chart (manifests/install.yaml) the
//! way a cluster would, minus the controllers this server does not run: every
//! object is applied with the real kubectl except the Deployment and the
//! PodDisruptionBudget, and the Deployment is *played* — its operator
//! container's args and env (fieldRefs filled in, `$(VAR)` expanded) start the
//! real `pgwarden-operator` binary, authenticated as the chart's
//! ServiceAccount through a token this server issued, so the chart's RBAC is
//! what the operator gets.
//!
//! No cluster network here, so three rewrites, and nothing else:
//! - the container's `0.0.0.0:PORT` listen addresses become free loopback ports;
//! - the Service's DNS name `NAME.NAMESPACE.svc` leads webhook calls to the
//!   admission port ([`TestApiServer::set_service_endpoint`]);
//! - sidecars reach the stream by address: `--operator-url` points at the
//!   stream's port, and the operator's own certificate also names 127.0.0.1.
//!
//! Used by e2e/tests/chart_install.rs and `scripts/testcluster --operator`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::TestApiServer;

/// The chart's Deployment, played: the operator process and where it listens.
pub struct PlayedOperator {
    child: Child,
    pub log: PathBuf,
    pub metrics_port: u16,
    pub admission_port: u16,
    pub stream_port: u16,
    /// The ServiceAccount user the operator runs as.
    pub user: String,
}

impl PlayedOperator {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for PlayedOperator {
    /// SIGTERM, as a kubelet would, then SIGKILL after 10 s.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn err(m: impl Into<String>) -> std::io::Error {
    std::io::Error::other(m.into())
}

/// The documents of a rendered manifest, as JSON values.
pub fn manifest_docs(path: &Path) -> std::io::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)?;
    let mut docs = Vec::new();
    for d in serde_yaml_ng::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(d)
            .map_err(|e| err(format!("{}: {e}", path.display())))?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Applies every object of `manifest` but the Deployment and the
/// PodDisruptionBudget (returns the kinds applied), then plays the
/// Deployment's operator container with `operator_bin`, its files in `dir`.
pub fn install(
    api: &TestApiServer,
    manifest: &Path,
    operator_bin: &Path,
    dir: &Path,
) -> std::io::Result<(Vec<String>, PlayedOperator)> {
    let docs = manifest_docs(manifest)?;
    let mut applied = Vec::new();
    for doc in &docs {
        let kind = doc["kind"].as_str().unwrap_or_default();
        if matches!(kind, "Deployment" | "PodDisruptionBudget") {
            continue;
        }
        let out = apply(api, &doc.to_string())?;
        if !out.status.success() {
            return Err(err(format!(
                "kubectl apply of {kind} {}: {}",
                doc["metadata"]["name"],
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        applied.push(kind.to_string());
    }
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .ok_or_else(|| err("the manifest has no Deployment"))?;
    let played = play(api, deployment, operator_bin, dir)?;
    Ok((applied, played))
}

fn apply(api: &TestApiServer, doc: &str) -> std::io::Result<std::process::Output> {
    use std::io::Write;
    let mut child = api
        .kubectl_command("admin")
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| err("kubectl stdin"))?
        .write_all(doc.as_bytes())?;
    child.wait_with_output()
}

fn play(
    api: &TestApiServer,
    deployment: &Value,
    operator_bin: &Path,
    dir: &Path,
) -> std::io::Result<PlayedOperator> {
    let namespace = deployment["metadata"]["namespace"]
        .as_str()
        .ok_or_else(|| err("the Deployment has no namespace"))?;
    let pod = &deployment["spec"]["template"]["spec"];
    let sa = pod["serviceAccountName"]
        .as_str()
        .ok_or_else(|| err("the Deployment names no serviceAccountName"))?;
    let container = &pod["containers"][0];
    let token = api
        .token_request(namespace, sa, &[], None, None)
        .map_err(|e| err(format!("token for {namespace}/{sa}: {e:?}")))?;
    let kubeconfig = dir.join("operator.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"{}\", certificate-authority: \"{}\"}}\nusers:\n- name: sa\n  user: {{token: \"{token}\"}}\ncontexts:\n- name: sa\n  context: {{cluster: c, user: sa}}\ncurrent-context: sa\n",
            api.url(),
            api.ca_cert().display()
        ),
    )?;
    let pod_name = format!(
        "{}-7d9f-x2k4p",
        deployment["metadata"]["name"]
            .as_str()
            .unwrap_or("operator")
    );
    let mut env: Vec<(String, String)> = Vec::new();
    for e in container["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap_or_default().to_string();
        let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("metadata.name") => pod_name.clone(),
            Some("metadata.namespace") => namespace.to_string(),
            Some("spec.serviceAccountName") => sa.to_string(),
            Some(other) => return Err(err(format!("fieldRef {other} is not played"))),
            None => e["value"].as_str().unwrap_or_default().to_string(),
        };
        env.push((name, value));
    }
    // The container's declared ports, by name, become free loopback ports.
    let port_of = |name: &str| -> Option<u64> {
        container["ports"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == name)?["containerPort"]
            .as_u64()
    };
    let (metrics_port, admission_port, stream_port) = (free_port()?, free_port()?, free_port()?);
    let mut moves = Vec::new();
    for (name, free) in [
        ("metrics", metrics_port),
        ("webhook", admission_port),
        ("stream", stream_port),
    ] {
        let port =
            port_of(name).ok_or_else(|| err(format!("the container declares no {name} port")))?;
        moves.push((format!("0.0.0.0:{port}"), format!("127.0.0.1:{free}")));
    }
    let mut args: Vec<String> = Vec::new();
    for a in container["args"].as_array().into_iter().flatten() {
        let mut a = a.as_str().unwrap_or_default().to_string();
        for (k, v) in &env {
            a = a.replace(&format!("$({k})"), v);
        }
        for (from, to) in &moves {
            a = a.replace(from, to);
        }
        if a.starts_with("--operator-url=") {
            a = format!("--operator-url=https://127.0.0.1:{stream_port}");
        }
        args.push(a);
    }
    args.push("--serving-cert-san=127.0.0.1".into());
    // The webhook configurations name the Service: lead it to the admission port.
    if let Some(service) = args.iter().find_map(|a| a.strip_prefix("--service-name=")) {
        api.set_service_endpoint(
            &format!("{service}.{namespace}.svc"),
            std::net::SocketAddr::from(([127, 0, 0, 1], admission_port)),
        );
    }
    let log = dir.join("operator.log");
    let child = Command::new(operator_bin)
        .args(&args)
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .map_err(|e| err(format!("starting {}: {e}", operator_bin.display())))?;
    Ok(PlayedOperator {
        child,
        log,
        metrics_port,
        admission_port,
        stream_port,
        user: format!("system:serviceaccount:{namespace}:{sa}"),
    })
}
