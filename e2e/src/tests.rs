//! Harness self-tests: they need PostgreSQL, psql and openssl, but not the proxy.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use super::*;
use crate::client::run_command;
use crate::net::parse_response;

fn psql_stdout(env: &[(String, String)], sql: &str) -> Result<String, String> {
    let out = run_psql(
        env,
        &["-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql],
        None,
    );
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn with_env(mut env: Vec<(String, String)>, name: &str, value: &str) -> Vec<(String, String)> {
    env.retain(|(k, _)| k != name);
    env.push((name.to_string(), value.to_string()));
    env
}

#[test]
fn cluster_starts_and_admin_sql_works() {
    let pg = PgCluster::start();
    assert_eq!(
        pg.admin_sql("SELECT current_user, current_database()"),
        "postgres|shop"
    );
    assert_eq!(
        pg.admin_sql(
            "SELECT r.rolsuper, r.rolcanlogin, d.datname FROM pg_roles r \
             JOIN pg_database d ON d.datdba = r.oid WHERE r.rolname = 'app'"
        ),
        "t|t|shop"
    );
    // Several statements, one result per SELECT.
    assert_eq!(
        pg.admin_sql("CREATE TABLE t(x int); INSERT INTO t VALUES (1), (2); SELECT sum(x) FROM t;"),
        "3"
    );
    assert_eq!(pg.admin_sql("SHOW listen_addresses"), "127.0.0.1");
}

#[test]
#[should_panic(expected = "admin_sql failed")]
fn admin_sql_panics_with_stderr_on_error() {
    let pg = PgCluster::start();
    pg.admin_sql("SELECT * FROM no_such_table");
}

fn direct_login_works(auth: UpstreamAuth, stored_prefix: &str) {
    let pg = PgCluster::builder().auth(auth).start();
    assert_eq!(pg.auth(), auth);
    assert_eq!(
        psql_stdout(
            &pg.direct_env(),
            "SELECT current_user || '@' || current_database()"
        )
        .unwrap(),
        "app@shop"
    );
    assert_eq!(
        pg.admin_sql(&format!(
            "SELECT starts_with(rolpassword, '{stored_prefix}') FROM pg_authid WHERE rolname = 'app'"
        )),
        "t",
        "{auth}: stored password should start with {stored_prefix}"
    );
    let wrong = with_env(pg.direct_env(), "PGPASSWORD", "not-the-password");
    match psql_stdout(&wrong, "SELECT 1") {
        Ok(out) if auth == UpstreamAuth::Trust => assert_eq!(out, "1"),
        Ok(out) => panic!("{auth}: wrong password accepted: {out}"),
        Err(err) => {
            assert_ne!(auth, UpstreamAuth::Trust, "trust refused: {err}");
            assert!(
                err.contains("password authentication failed for user \"app\""),
                "{auth}: {err}"
            );
        }
    }
}

#[test]
fn direct_psql_with_scram() {
    direct_login_works(UpstreamAuth::Scram, "SCRAM-SHA-256$");
}

#[test]
fn direct_psql_with_md5() {
    direct_login_works(UpstreamAuth::Md5, "md5");
}

#[test]
fn direct_psql_with_cleartext_password() {
    direct_login_works(UpstreamAuth::Password, "SCRAM-SHA-256$");
}

#[test]
fn direct_psql_with_trust() {
    direct_login_works(UpstreamAuth::Trust, "SCRAM-SHA-256$");
}

#[test]
fn ssl_cluster_requires_and_verifies_tls() {
    let pg = PgCluster::builder().ssl(true).start();
    assert!(pg.ca_cert_path().exists());
    // verify-full against 127.0.0.1 checks the IP SAN.
    assert_eq!(
        psql_stdout(
            &pg.direct_env(),
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        .unwrap(),
        "t"
    );
    // Host name verification against the DNS SAN.
    let by_name = with_env(pg.direct_env(), "PGHOST", "localhost");
    assert_eq!(psql_stdout(&by_name, "SELECT 1").unwrap(), "1");
    // hostssl only: a plaintext client is refused.
    let plain = with_env(pg.direct_env(), "PGSSLMODE", "disable");
    let err = psql_stdout(&plain, "SELECT 1").unwrap_err();
    assert!(err.contains("no pg_hba.conf entry"), "{err}");
    // A CA that did not sign the server certificate fails verification.
    let other = TestPki::generate();
    let wrong_ca = with_env(
        pg.direct_env(),
        "PGSSLROOTCERT",
        other.ca.cert_path().to_str().unwrap(),
    );
    let err = psql_stdout(&wrong_ca, "SELECT 1").unwrap_err();
    assert!(err.contains("certificate verify failed"), "{err}");
}

#[test]
fn drop_stops_the_server_and_removes_files() {
    let pg = PgCluster::start();
    let port = pg.port();
    let socket_dir = pg.socket_dir().to_path_buf();
    let pid: String = pg.admin_sql("SELECT pg_backend_pid()");
    assert!(!pid.is_empty());
    drop(pg);
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    assert!(!socket_dir.exists());
}

#[test]
fn clusters_in_parallel_get_distinct_ports() {
    let a = PgCluster::start();
    let b = PgCluster::start();
    assert_ne!(a.port(), b.port());
    a.admin_sql("CREATE TABLE only_in_a(x int)");
    assert_eq!(
        b.admin_sql("SELECT count(*) FROM pg_class WHERE relname = 'only_in_a'"),
        "0"
    );
}

#[test]
fn free_port_never_repeats_within_a_process() {
    let ports: std::collections::BTreeSet<u16> = (0..50).map(|_| free_port()).collect();
    assert_eq!(ports.len(), 50);
}

#[test]
fn wait_until_reports_success_and_timeout() {
    let mut n = 0;
    assert!(wait_until(Duration::from_secs(5), || {
        n += 1;
        n >= 3
    }));
    assert!(!wait_until(Duration::from_millis(50), || false));
}

#[test]
fn run_command_kills_on_timeout() {
    let result = std::panic::catch_unwind(|| {
        run_command(
            Command::new("sleep").arg("30"),
            None,
            Duration::from_millis(200),
        )
    });
    let msg = result.unwrap_err();
    let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("did not finish"), "{msg}");
}

#[test]
fn http_get_reads_status_and_body() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        for body in ["plain", "chunked"] {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            let mut byte = [0u8; 1];
            while !req.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut byte).unwrap();
                req.push(byte[0]);
            }
            assert!(String::from_utf8_lossy(&req).starts_with("GET /readyz HTTP/1.0\r\n"));
            let resp = if body == "plain" {
                "HTTP/1.0 503 Service Unavailable\r\nContent-Length: 5\r\n\r\nplain".to_string()
            } else {
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nchu\r\n4\r\nnked\r\n0\r\n\r\n"
                    .to_string()
            };
            s.write_all(resp.as_bytes()).unwrap();
        }
    });
    assert_eq!(
        http_get(port, "/readyz").unwrap(),
        (503, "plain".to_string())
    );
    assert_eq!(
        http_get(port, "/readyz").unwrap(),
        (200, "chunked".to_string())
    );
    server.join().unwrap();
    assert!(parse_response(b"garbage").is_err());
}

#[test]
fn test_pki_issues_a_cert_its_ca_verifies() {
    let pki = TestPki::generate();
    let out = run_command(
        Command::new("openssl").args([
            "verify",
            "-CAfile",
            pki.ca.cert_path().to_str().unwrap(),
            "-verify_hostname",
            "localhost",
            "-verify_ip",
            "127.0.0.1",
            pki.server.cert.to_str().unwrap(),
        ]),
        None,
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = std::fs::read_to_string(&pki.server.key).unwrap();
    assert!(key.contains("PRIVATE KEY"), "{key}");
    assert!(pki.dir().exists());
}

#[test]
fn policy_yaml_is_the_documented_shape() {
    let yaml = policy_yaml(
        5433,
        Some(("verify-full", Some(std::path::Path::new("/ca.crt")))),
    );
    for line in [
        "kind: DatabaseAccessPolicy",
        "  identity:\n    localTrust: {subject: dev}\n",
        "    port: 5433\n",
        "    credentialsSecret: shop-cred\n",
        "    tls: {mode: verify-full, caFile: \"/ca.crt\"}\n",
    ] {
        assert!(yaml.contains(line), "{line:?} missing from:\n{yaml}");
    }
    // The default policy is the realistic default-deny one, and the real
    // binary reads it so: app tables pass, anything else does not.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, &yaml).unwrap();
    for (sql, code) in [
        ("SELECT * FROM public.items", 0),
        ("CREATE TABLE ledger (id int)", 0),
        ("SELECT * FROM vault.keys", 1),
        ("DO $$ BEGIN END $$", 1),
        ("DELETE FROM customers", 3),
    ] {
        let out = std::process::Command::new(pgwarden_bin())
            .args(["check", "-f"])
            .arg(&file)
            .args(["--sql", sql])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(code),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn pgwarden_bin_honours_env_override() {
    // Only checks the path logic; the env var is read, not set, to stay thread-safe.
    if let Some(bin) = std::env::var_os("PGWARDEN_BIN") {
        assert_eq!(pgwarden_bin(), std::path::PathBuf::from(bin));
    } else {
        let result = std::panic::catch_unwind(pgwarden_bin);
        if let Err(msg) = result {
            let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(
                msg.contains("build it first: cargo build -p pgwarden-sidecar"),
                "{msg}"
            );
        }
    }
}
