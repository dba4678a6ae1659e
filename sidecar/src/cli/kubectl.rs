//! `kubectl pgwarden …` (this binary installed as `kubectl-pgwarden`, or
//! `pgwarden kubectl …`): the reviewer's side in a cluster.
//!
//! Every call is the real `kubectl` underneath — `get apr -o json` to read,
//! and for a decision exactly the merge patch of `spec.decision` the client's
//! NOTICE names — so the API server's RBAC and pgwarden's admission webhooks
//! decide as they do for a hand-typed `kubectl patch`, and their refusals
//! reach the reviewer verbatim.
//!
//! Exit codes: 0 done, 1 refused (by the API, or an ambiguous ID), 2 usage
//! or kubectl errors (kubectl missing, output that is not a request list).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Output, Stdio};

use k8s_openapi::jiff::Timestamp;
use pgwarden_api::{ApprovalPhase, ApprovalRequest, DecisionAction};

use super::output::{errln, out};
use super::{approvals, IdMatch};
use crate::approval::request;

/// The executable name kubectl looks for on PATH for `kubectl pgwarden`.
pub const PLUGIN_NAME: &str = "kubectl-pgwarden";

const EXIT_REFUSED: u8 = 1;
const EXIT_ERROR: u8 = 2;

#[derive(Debug, clap::Args)]
pub struct KubectlArgs {
    #[command(subcommand)]
    pub command: KubectlCommand,
    /// The namespace of the requests (default: the kubeconfig context's).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// Passed to kubectl.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Passed to kubectl.
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// Passed to kubectl.
    #[arg(long, global = true)]
    pub cache_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
pub enum KubectlCommand {
    /// Requests waiting for a decision, oldest first.
    Pending,
    /// One request in full. ID (here and below) may be a unique prefix among
    /// the namespace's requests.
    Show { id: String },
    /// Approve: `kubectl patch` of spec.decision (the webhook stamps who).
    Approve {
        id: String,
        /// Why; the requester reads it.
        #[arg(long)]
        reason: String,
    },
    /// Deny: the requester's statement fails with this reason.
    Deny {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

/// The command line when this binary runs as `kubectl-pgwarden` (kubectl
/// runs `kubectl-pgwarden ARGS` for `kubectl pgwarden ARGS`): the plugin's
/// arguments, with help and errors naming `kubectl pgwarden`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "kubectl pgwarden",
    bin_name = "kubectl pgwarden",
    version,
    about = "Decide pgwarden ApprovalRequests (kubectl underneath)"
)]
pub struct Plugin {
    #[command(flatten)]
    pub args: KubectlArgs,
}

/// Whether `argv0` (the program name) is the plugin's executable.
pub fn invoked_as_plugin(argv0: Option<&std::ffi::OsStr>) -> bool {
    argv0
        .map(std::path::Path::new)
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == PLUGIN_NAME)
}

pub fn kubectl(args: KubectlArgs) -> anyhow::Result<ExitCode> {
    let kc = Kubectl { args: &args };
    let (id, action, reason) = match &args.command {
        KubectlCommand::Pending => {
            let all = match kc.requests() {
                Ok(all) => all,
                Err(code) => return Ok(code),
            };
            out(&pending_table(&all, Timestamp::now()))?;
            return Ok(ExitCode::SUCCESS);
        }
        KubectlCommand::Show { id } => {
            let r = match kc.resolve(id) {
                Ok(Some(id)) => kc.request(&id),
                Ok(None) => kc.request(id),
                Err(code) => return Ok(code),
            };
            return Ok(match r {
                Ok(r) => {
                    out(&approvals::one(&r, Timestamp::now()))?;
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            });
        }
        KubectlCommand::Approve { id, reason } => (id, DecisionAction::Approve, reason),
        KubectlCommand::Deny { id, reason } => (id, DecisionAction::Deny, reason),
    };
    let id = match kc.resolve(id) {
        Ok(found) => found.unwrap_or_else(|| id.clone()),
        Err(code) => return Ok(code),
    };
    Ok(kc.decide(&id, action, reason))
}

struct Kubectl<'a> {
    args: &'a KubectlArgs,
}

impl Kubectl<'_> {
    fn command(&self) -> Command {
        let a = self.args;
        let mut c = Command::new("kubectl");
        if let Some(k) = &a.kubeconfig {
            c.arg("--kubeconfig").arg(k);
        }
        if let Some(ctx) = &a.context {
            c.arg("--context").arg(ctx);
        }
        if let Some(d) = &a.cache_dir {
            c.arg("--cache-dir").arg(d);
        }
        if let Some(ns) = &a.namespace {
            c.arg("--namespace").arg(ns);
        }
        c
    }

    /// Run kubectl capturing its output; a failure is printed verbatim.
    fn run(&self, args: &[&str]) -> Result<Output, ExitCode> {
        let mut c = self.command();
        c.args(args).stdin(Stdio::null());
        let o = c.output().map_err(missing)?;
        if !o.status.success() {
            errln(String::from_utf8_lossy(&o.stderr).trim_end());
            return Err(ExitCode::from(EXIT_REFUSED));
        }
        Ok(o)
    }

    fn requests(&self) -> Result<Vec<ApprovalRequest>, ExitCode> {
        let o = self.run(&["get", "approvalrequests.pgwarden.io", "-o", "json"])?;
        let list: ListOf = serde_json::from_slice(&o.stdout).map_err(|e| {
            fail(
                EXIT_ERROR,
                &format!("kubectl get approvalrequests: not a request list ({e})"),
            )
        })?;
        let mut all = list.items;
        request::sort(&mut all);
        Ok(all)
    }

    fn request(&self, id: &str) -> Result<ApprovalRequest, ExitCode> {
        let o = self.run(&["get", "approvalrequests.pgwarden.io", id, "-o", "json"])?;
        serde_json::from_slice(&o.stdout).map_err(|e| {
            fail(
                EXIT_ERROR,
                &format!("kubectl get approvalrequest {id}: not a request ({e})"),
            )
        })
    }

    /// The request `given` names: itself or a unique prefix (`None`: no
    /// such request; kubectl then says so under the given name).
    fn resolve(&self, given: &str) -> Result<Option<String>, ExitCode> {
        let all = self.requests()?;
        match super::resolve_id(given, all.iter().map(request::id)) {
            IdMatch::One(id) => Ok(Some(id)),
            IdMatch::None => Ok(None),
            IdMatch::Ambiguous(ids) => Err(fail(
                EXIT_REFUSED,
                &format!(
                    "{given:?} is the start of several requests: {}",
                    ids.join(", ")
                ),
            )),
        }
    }

    /// The NOTICE's `kubectl patch`, with kubectl's own output and refusals.
    fn decide(&self, id: &str, action: DecisionAction, reason: &str) -> ExitCode {
        let mut c = self.command();
        c.args([
            "patch",
            "approvalrequests.pgwarden.io",
            id,
            "--type",
            "merge",
            "-p",
        ])
        .arg(decision_patch(action, reason))
        .stdin(Stdio::null());
        match c.status() {
            Ok(s) if s.success() => ExitCode::SUCCESS,
            // kubectl printed the API's refusal (RBAC, the webhook) itself.
            Ok(_) => ExitCode::from(EXIT_REFUSED),
            Err(e) => missing(e),
        }
    }
}

#[derive(serde::Deserialize)]
struct ListOf {
    items: Vec<ApprovalRequest>,
}

/// `{"spec":{"decision":{"action":…,"reason":…}}}`: the merge patch a
/// reviewer would type (decidedBy/decidedAt are the webhook's to stamp).
pub fn decision_patch(action: DecisionAction, reason: &str) -> String {
    serde_json::json!({"spec": {"decision": {"action": action, "reason": reason}}}).to_string()
}

fn missing(e: std::io::Error) -> ExitCode {
    if e.kind() == std::io::ErrorKind::NotFound {
        fail(
            EXIT_ERROR,
            "kubectl was not found on PATH: `pgwarden kubectl` runs kubectl underneath (so RBAC and the webhooks decide as for kubectl patch); install kubectl",
        )
    } else {
        fail(EXIT_ERROR, &format!("running kubectl: {e}"))
    }
}

fn fail(code: u8, msg: &str) -> ExitCode {
    errln(&format!("pgwarden: {msg}"));
    ExitCode::from(code)
}

/// Pending requests, one line each, columns as wide as their widest
/// value, statement last (it is the long part).
pub fn pending_table(all: &[ApprovalRequest], now: Timestamp) -> String {
    let mut rows = vec![[
        "ID".to_owned(),
        "POLICY".to_owned(),
        "REQUESTER".to_owned(),
        "EST. ROWS".to_owned(),
        "EXPIRES".to_owned(),
        "STATEMENT".to_owned(),
    ]];
    for r in all
        .iter()
        .filter(|r| request::phase(r, now) == ApprovalPhase::Pending)
    {
        let statement: String = r
            .spec
            .statement
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let statement = if statement.chars().count() > 80 {
            format!("{}…", statement.chars().take(79).collect::<String>())
        } else {
            statement
        };
        let estimate = match &r.spec.estimate {
            Some(e) => e.rows.map_or("unknown".into(), |n| n.to_string()),
            None => "-".into(),
        };
        rows.push([
            request::id(r).to_owned(),
            r.spec.policy.clone(),
            r.spec.requester.subject.clone(),
            estimate,
            r.spec.expires_at.clone(),
            statement,
        ]);
    }
    let mut widths = [0usize; 5];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut t = String::new();
    for row in &rows {
        for (w, cell) in widths.iter().zip(row) {
            let _ = write!(t, "{cell:<w$}   ");
        }
        let _ = writeln!(t, "{}", row[5]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invoked_as_kubectl_pgwarden_the_arguments_are_the_plugins() {
        use clap::Parser;
        let as_plugin = |p: &str| invoked_as_plugin(Some(std::ffi::OsStr::new(p)));
        assert!(as_plugin("/usr/local/bin/kubectl-pgwarden"));
        assert!(as_plugin("kubectl-pgwarden"));
        assert!(!as_plugin("/usr/bin/pgwarden"));
        assert!(!as_plugin("kubectl-pgwarden-other"));
        assert!(!invoked_as_plugin(None));
        let p = Plugin::try_parse_from([
            "kubectl-pgwarden",
            "approve",
            "shop-1",
            "--reason",
            "ok",
            "-n",
            "ci",
        ])
        .unwrap();
        assert_eq!(p.args.namespace.as_deref(), Some("ci"));
        assert!(matches!(
            p.args.command,
            KubectlCommand::Approve { ref id, ref reason } if id == "shop-1" && reason == "ok"
        ));
        // A decision without a reason is a usage error naming the plugin.
        let e = Plugin::try_parse_from(["kubectl-pgwarden", "deny", "shop-1"]).unwrap_err();
        assert!(e.to_string().contains("kubectl pgwarden deny"), "{e}");
    }

    #[test]
    fn pending_lists_only_pending_requests_with_their_estimate_in_aligned_columns() {
        let req = |name: &str, subject: &str, estimate: Option<pgwarden_api::Estimate>| {
            let mut r: ApprovalRequest = serde_json::from_value(serde_json::json!({
                "apiVersion": "pgwarden.io/v1alpha1", "kind": "ApprovalRequest",
                "metadata": {"name": name, "namespace": "ci"},
                "spec": {"policy": "shop", "requester": {"subject": subject},
                    "database": "shop", "statement": "DELETE  FROM t\n WHERE id < 100",
                    "fingerprint": "f", "reason": "r", "expiresAt": "2999-01-01T00:00:00Z"},
                "status": {"phase": "Pending"}
            }))
            .unwrap();
            r.spec.estimate = estimate;
            r
        };
        let mut done = req("shop-000003", "x", None);
        done.status.as_mut().unwrap().phase = ApprovalPhase::Executed;
        let all = [
            req(
                "shop-000001",
                "system:serviceaccount:ci:runner",
                Some(pgwarden_api::Estimate {
                    rows: Some(99),
                    tables: vec!["public.t".into()],
                    unknown: None,
                }),
            ),
            req(
                "shop-000002",
                "dev",
                Some(pgwarden_api::Estimate::unknown("user code")),
            ),
            done,
        ];
        let t = pending_table(&all, Timestamp::now());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        let col = lines[0].find("EST. ROWS").unwrap();
        assert!(lines[1][col..].starts_with("99 "), "{t}");
        assert!(lines[2][col..].starts_with("unknown "), "{t}");
        assert!(lines[1].ends_with("DELETE FROM t WHERE id < 100"), "{t}");
        assert!(!t.contains("shop-000003"), "{t}");
    }

    #[test]
    fn the_patch_is_the_notices_and_escapes_the_reason() {
        assert_eq!(
            decision_patch(DecisionAction::Approve, "reviewed"),
            r#"{"spec":{"decision":{"action":"Approve","reason":"reviewed"}}}"#
        );
        let p: serde_json::Value =
            serde_json::from_str(&decision_patch(DecisionAction::Deny, "not \"now\"'\n")).unwrap();
        assert_eq!(p["spec"]["decision"]["reason"], "not \"now\"'\n");
        assert_eq!(p["spec"]["decision"]["action"], "Deny");
    }
}
