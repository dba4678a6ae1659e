//! Container probes as the kubelet runs them: `httpGet` (HTTP only; 200–399
//! passes), `tcpSocket` (a connection passes) and `exec` (exit 0 passes), against
//! the pod's IP, with `initialDelaySeconds`, `periodSeconds` (default 10),
//! `timeoutSeconds` (default 1) and `failureThreshold` (default 3). An `exec`
//! probe runs on the host in the pod's directory with the runner's environment
//! (there is no container to exec into).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A probe's port: a number or the name of one of the container's ports.
fn port(v: &Value, container: &Value) -> Result<u16, String> {
    if let Some(n) = v.as_u64() {
        return u16::try_from(n).map_err(|_| format!("invalid port {n}"));
    }
    let name = v.as_str().unwrap_or_default();
    if let Ok(n) = name.parse::<u16>() {
        return Ok(n);
    }
    container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .and_then(|n| u16::try_from(n).ok())
        .ok_or_else(|| format!("no port named {name:?}"))
}

/// One attempt. `exec` runs a command in the container's environment.
pub fn once(
    probe: &Value,
    pod_ip: &str,
    container: &Value,
    exec: &dyn Fn(&[String]) -> Result<(), String>,
) -> Result<(), String> {
    let timeout = Duration::from_secs(probe["timeoutSeconds"].as_u64().unwrap_or(1).max(1));
    if let Some(h) = probe.get("httpGet").filter(|h| h.is_object()) {
        if h["scheme"].as_str().is_some_and(|s| s != "HTTP") {
            return Err("only HTTP probes are supported".into());
        }
        let host = h["host"].as_str().unwrap_or(pod_ip);
        let addr: SocketAddr = format!("{host}:{}", port(&h["port"], container)?)
            .parse()
            .map_err(|e| format!("probe address: {e}"))?;
        let path = h["path"].as_str().unwrap_or("/");
        let mut s = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| format!("Get \"http://{addr}{path}\": {e}"))?;
        s.set_read_timeout(Some(timeout)).ok();
        s.set_write_timeout(Some(timeout)).ok();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.32\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .map_err(|e| format!("probe write: {e}"))?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).map_err(|e| format!("probe read: {e}"))?;
        let line = String::from_utf8_lossy(&buf[..n]);
        let code: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| "probe: not an HTTP response".to_string())?;
        return if (200..400).contains(&code) {
            Ok(())
        } else {
            Err(format!("HTTP probe failed with statuscode: {code}"))
        };
    }
    if let Some(t) = probe.get("tcpSocket").filter(|t| t.is_object()) {
        let host = t["host"].as_str().unwrap_or(pod_ip);
        let addr: SocketAddr = format!("{host}:{}", port(&t["port"], container)?)
            .parse()
            .map_err(|e| format!("probe address: {e}"))?;
        return TcpStream::connect_timeout(&addr, timeout)
            .map(|_| ())
            .map_err(|e| format!("dial tcp {addr}: {e}"));
    }
    if let Some(e) = probe.get("exec").filter(|e| e.is_object()) {
        let argv: Vec<String> = e["command"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(String::from))
            .collect();
        return exec(&argv);
    }
    Err("probe has no handler (httpGet, tcpSocket, exec)".into())
}

/// Runs `probe` until it passes; `Err` with the last failure after
/// `failureThreshold` failures, or at once when `keep_going` says stop (the
/// container exited, the pod was deleted).
pub fn wait(
    probe: &Value,
    pod_ip: &str,
    container: &Value,
    exec: &dyn Fn(&[String]) -> Result<(), String>,
    keep_going: &dyn Fn() -> Result<(), String>,
) -> Result<(), String> {
    let secs = |k: &str, d: u64| Duration::from_secs(probe[k].as_u64().unwrap_or(d));
    let period = secs("periodSeconds", 10).max(Duration::from_secs(1));
    let threshold = probe["failureThreshold"].as_u64().unwrap_or(3).max(1);
    let sleep = |d: Duration| -> Result<(), String> {
        let until = Instant::now() + d;
        while Instant::now() < until {
            keep_going()?;
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    };
    sleep(secs("initialDelaySeconds", 0))?;
    let mut failures = 0;
    loop {
        keep_going()?;
        match once(probe, pod_ip, container, exec) {
            Ok(()) => return Ok(()),
            Err(e) => {
                failures += 1;
                if failures >= threshold {
                    return Err(format!("Startup probe failed: {e}"));
                }
            }
        }
        sleep(period)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::net::TcpListener;

    /// A one-shot HTTP server answering `status`; returns its port.
    fn http_once(status: u16) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf);
                let _ = write!(s, "HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
            }
        });
        port
    }

    fn no_exec(_: &[String]) -> Result<(), String> {
        Err("no exec here".into())
    }

    #[test]
    fn http_get_passes_on_2xx_3xx_by_named_port_and_fails_otherwise() {
        let port = http_once(204);
        let c = json!({"ports": [{"name": "metrics", "containerPort": port}]});
        let p = json!({"httpGet": {"path": "/healthz", "port": "metrics"}});
        assert_eq!(once(&p, "127.0.0.1", &c, &no_exec), Ok(()));
        let port = http_once(503);
        let p = json!({"httpGet": {"path": "/readyz", "port": port}});
        let e = once(&p, "127.0.0.1", &json!({}), &no_exec).unwrap_err();
        assert!(e.contains("503"), "{e}");
        let p = json!({"httpGet": {"port": "nope"}});
        assert!(once(&p, "127.0.0.1", &json!({}), &no_exec).is_err());
    }

    #[test]
    fn tcp_and_exec_probes() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let p = json!({"tcpSocket": {"port": port}});
        assert_eq!(once(&p, "127.0.0.1", &json!({}), &no_exec), Ok(()));
        drop(l);
        assert!(once(&p, "127.0.0.1", &json!({}), &no_exec).is_err());
        let p = json!({"exec": {"command": ["true"]}});
        let exec = |argv: &[String]| -> Result<(), String> {
            (argv == ["true"])
                .then_some(())
                .ok_or("ran something else".into())
        };
        assert_eq!(once(&p, "127.0.0.1", &json!({}), &exec), Ok(()));
        // failureThreshold failures end the wait with the last error.
        let p = json!({"tcpSocket": {"port": port}, "periodSeconds": 1, "failureThreshold": 1});
        let e = wait(&p, "127.0.0.1", &json!({}), &no_exec, &|| Ok(())).unwrap_err();
        assert!(e.starts_with("Startup probe failed"), "{e}");
    }
}
