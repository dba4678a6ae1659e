//! The cluster a conformance test runs against: the test API server, or a real
//! cluster when `PGWARDEN_E2E_KUBECONFIG` names a kubeconfig (its current context,
//! or `PGWARDEN_E2E_CONTEXT`). The same test code runs on both, so the stand-in
//! cannot drift from the real thing unnoticed.
//!
//! Each test gets its own namespace (on the test API server: its own server too)
//! with pgwarden's CRDs applied. Users: `admin`, `alice` (group `dba-oncall`) and
//! `bob` (no groups). The test API server has them as kubeconfig contexts; on a
//! real cluster only the admin credential exists, so alice and bob are
//! impersonated (`--as`/`--as-group`, kube-rs `impersonate`) — which the test API
//! server honours too; `PGWARDEN_E2E_IMPERSONATE=1` makes local runs use it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use pgwarden_testapi::TestApiServer;

/// Who a request is made as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum User {
    Admin,
    /// Group `dba-oncall`.
    Alice,
    /// No groups.
    Bob,
}

impl User {
    pub fn name(self) -> &'static str {
        match self {
            User::Admin => "admin",
            User::Alice => "alice",
            User::Bob => "bob",
        }
    }

    pub fn groups(self) -> &'static [&'static str] {
        match self {
            User::Admin => &["system:masters"],
            User::Alice => &["dba-oncall"],
            User::Bob => &[],
        }
    }
}

pub enum Backend {
    Local(TestApiServer),
    External {
        kubeconfig: PathBuf,
        context: Option<String>,
    },
}

pub struct Cluster {
    pub backend: Backend,
    /// This test's namespace.
    pub ns: String,
    /// kubectl's discovery cache, private to the test.
    cache: tempfile::TempDir,
    /// Impersonate alice/bob even on the test API server (what a real cluster needs).
    pub impersonate: bool,
}

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

pub fn text(o: &Output) -> String {
    pgwarden_testapi::output_text(o)
}

impl Cluster {
    /// The cluster for test `test` (a namespace `pgw-<test>-<random>`).
    pub fn new(test: &str) -> Cluster {
        Cluster::with_options(test, pgwarden_testapi::Options::default())
    }

    /// As [`Cluster::new`], with these options for the test API server.
    pub fn with_options(test: &str, opts: pgwarden_testapi::Options) -> Cluster {
        let cache = tempfile::tempdir().expect("kubectl cache dir");
        let backend = match std::env::var_os("PGWARDEN_E2E_KUBECONFIG") {
            Some(k) if !k.is_empty() => Backend::External {
                kubeconfig: PathBuf::from(k),
                context: std::env::var("PGWARDEN_E2E_CONTEXT").ok(),
            },
            _ => {
                eprintln!(
                    "{test}: against the test API server (set PGWARDEN_E2E_KUBECONFIG to run it against a real cluster)"
                );
                Backend::Local(TestApiServer::start_with(opts).expect("start the test API server"))
            }
        };
        let suffix: String = pgwarden_testapi::auth::random_token()
            .chars()
            .take(5)
            .collect();
        let ns = format!("pgw-{}-{suffix}", test.replace('_', "-"))
            .chars()
            .take(63)
            .collect();
        let c = Cluster {
            backend,
            ns,
            cache,
            // PGWARDEN_E2E_IMPERSONATE=1 runs the local suite the way a real
            // cluster must be driven (admin credential + impersonation).
            impersonate: std::env::var_os("PGWARDEN_E2E_IMPERSONATE").is_some(),
        };
        let crds = [
            repo("crds/databaseaccesspolicies.yaml"),
            repo("crds/approvalrequests.yaml"),
        ];
        // Client-side apply on both (the CRDs are far below the annotation limit;
        // the test API server has no server-side apply).
        let mut args = vec!["apply".to_string()];
        for f in &crds {
            args.push("-f".into());
            args.push(f.to_string_lossy().into_owned());
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        c.ok(User::Admin, &a);
        c.ok(
            User::Admin,
            &[
                "wait",
                "--for=condition=Established",
                "crd/databaseaccesspolicies.pgwarden.io",
                "crd/approvalrequests.pgwarden.io",
                "--timeout=60s",
            ],
        );
        c.ok(User::Admin, &["create", "namespace", &c.ns]);
        c
    }

    pub fn is_local(&self) -> bool {
        matches!(self.backend, Backend::Local(_))
    }

    /// The test API server, when that is what runs.
    pub fn local(&self) -> Option<&TestApiServer> {
        match &self.backend {
            Backend::Local(s) => Some(s),
            Backend::External { .. } => None,
        }
    }

    fn kubeconfig(&self) -> (&Path, Option<&str>) {
        match &self.backend {
            Backend::Local(s) => (s.kubeconfig(), Some("admin")),
            Backend::External {
                kubeconfig,
                context,
            } => (kubeconfig, context.as_deref()),
        }
    }

    /// `kubectl` as `user`, in this test's namespace.
    pub fn kubectl_command(&self, user: User) -> Command {
        let mut c = Command::new("kubectl");
        let (kc, ctx) = self.kubeconfig();
        c.arg("--kubeconfig")
            .arg(kc)
            .arg("--cache-dir")
            .arg(self.cache.path())
            .arg("-n")
            .arg(&self.ns)
            .env_remove("KUBECONFIG");
        let direct = self.is_local() && !self.impersonate;
        match (direct, user) {
            (true, u) => {
                c.arg("--context").arg(u.name());
            }
            (false, u) => {
                if let Some(ctx) = ctx {
                    c.arg("--context").arg(ctx);
                }
                if u != User::Admin {
                    c.arg(format!("--as={}", u.name()));
                    for g in u.groups() {
                        c.arg(format!("--as-group={g}"));
                    }
                }
            }
        }
        c
    }

    pub fn kubectl(&self, user: User, args: &[&str], stdin: Option<&str>) -> Output {
        use std::io::Write;
        let mut child = self
            .kubectl_command(user)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kubectl");
        let mut input = child.stdin.take().expect("stdin");
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).expect("write stdin");
        }
        drop(input);
        child.wait_with_output().expect("kubectl")
    }

    /// Runs kubectl and requires success; returns stdout.
    pub fn ok(&self, user: User, args: &[&str]) -> String {
        let o = self.kubectl(user, args, None);
        assert!(
            o.status.success(),
            "kubectl {args:?} as {user:?}:\n{}",
            text(&o)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs kubectl and requires failure; returns stdout+stderr.
    pub fn fails(&self, user: User, args: &[&str]) -> String {
        let o = self.kubectl(user, args, None);
        assert!(
            !o.status.success(),
            "kubectl {args:?} as {user:?} succeeded:\n{}",
            text(&o)
        );
        text(&o)
    }

    /// A kube-rs client as `user`.
    pub async fn client(&self, user: User) -> kube::Client {
        use kube::config::{KubeConfigOptions, Kubeconfig};
        let (kc, ctx) = self.kubeconfig();
        let direct = self.is_local() && !self.impersonate;
        let context = if direct {
            Some(user.name().to_string())
        } else {
            ctx.map(String::from)
        };
        let kubeconfig = Kubeconfig::read_from(kc).expect("read kubeconfig");
        let mut config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &KubeConfigOptions {
                context,
                ..KubeConfigOptions::default()
            },
        )
        .await
        .expect("kubeconfig");
        if !direct && user != User::Admin {
            config.auth_info.impersonate = Some(user.name().into());
            config.auth_info.impersonate_groups =
                Some(user.groups().iter().map(|g| g.to_string()).collect());
        }
        config.default_namespace = self.ns.clone();
        kube::Client::try_from(config).expect("kube client")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.is_local() {
            // A real cluster outlives the test: take the namespace away.
            let _ = self
                .kubectl_command(User::Admin)
                .args(["delete", "namespace", &self.ns, "--wait=false"])
                .output();
        }
    }
}
