//! Stage 5: statements that wait for a named human.
//!
//! - `request`: the `ApprovalRequest` model, sans-IO — fingerprint, the
//!   parameters a reviewer sees, and every phase transition;
//! - `store`: where requests live (the state directory standalone);
//! - `os_user`: OS users by name (who asked, who decides, standalone);
//! - `estimate`: the planner's rows and tables for a held DML statement;
//! - this module: one policy's approvals as the data path uses them —
//!   open a request for a held statement, follow it, claim an approval,
//!   record the outcome — and the words the client reads.
//!
//! The relay (session/relay.rs) decides *when* to hold; nothing here touches
//! a socket.

pub mod cluster;
pub mod estimate;
pub mod os_user;
pub mod request;
pub mod store;

use std::path::Path;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use pgwarden_api::{ApprovalPhase, ApprovalRequest, ApprovalSettings, Approvers, Requester};

use crate::wire::PgError;
use request::{Draft, Outcome, Param, Standing};
use store::{DirStore, StoreError};

/// The store seam. Standalone: a directory. In a cluster the operator's
/// resources (created over the sidecar's config stream) plug in here.
#[derive(Debug, Clone)]
pub enum Store {
    Dir(DirStore),
    /// The operator's ApprovalRequests (`cluster`).
    Cluster(std::sync::Arc<cluster::ClusterClient>),
}

impl Store {
    /// The command a reviewer runs to approve `id` (in `namespace`).
    pub fn approve_command(&self, namespace: &str, id: &str) -> String {
        match self {
            Store::Dir(d) => format!(
                "pgwarden approvals approve {id} --state-dir {}",
                shell_word(&d.state_dir().display().to_string())
            ),
            Store::Cluster(_) => pgwarden_api::stream::approvals::approve_command(namespace, id),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&DirStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        match self {
            Store::Dir(d) => {
                let path = d.state_dir().to_owned();
                let d = d.clone();
                // File I/O and fsync: off the proxy's threads.
                match tokio::task::spawn_blocking(move || f(&d)).await {
                    Ok(r) => r,
                    Err(e) => Err(StoreError::Io {
                        path,
                        source: std::io::Error::other(e.to_string()),
                    }),
                }
            }
            Store::Cluster(_) => Err(StoreError::Operator(
                "the cluster store has no directory".into(),
            )),
        }
    }
}

/// Quote a path for a shell command line when it needs it.
fn shell_word(s: &str) -> String {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// One policy's approvals.
#[derive(Debug)]
pub struct Approvals {
    store: Store,
    key: Vec<u8>,
    policy: String,
    namespace: String,
    database: String,
    /// How long a statement is held; zero fails fast.
    pub wait: Duration,
    expires_after: Duration,
    /// The pod this sidecar serves, when known (downward API).
    pod: Option<String>,
    service_account: Option<String>,
    /// Who may decide (recorded on each request; the CLI checks it).
    approvers: Option<Approvers>,
}

/// What the data path hands over for a statement that needs approval.
pub struct Ask<'a> {
    pub subject: &'a str,
    pub statement: &'a str,
    pub params: &'a [Param<'a>],
    /// The statement touches masked columns: its parameters are not shown.
    pub sensitive: bool,
    pub reason: &'a str,
    /// The client's OS user, where the kernel told (it may never decide).
    pub os_user: Option<&'a str>,
    /// The planner's estimate (DML only; `estimate`).
    pub estimate: Option<pgwarden_api::Estimate>,
}

/// Where a held statement stands after asking.
#[derive(Debug)]
pub enum Opened {
    /// An approval for exactly this was waiting and is now used: run it.
    Released(ApprovalRequest),
    /// Waiting for a reviewer (a new request, or the same one again).
    Pending(ApprovalRequest),
    Denied(ApprovalRequest),
}

/// How waiting on a request ended.
#[derive(Debug)]
pub enum Waited {
    Released(ApprovalRequest),
    Denied(ApprovalRequest),
    Expired(ApprovalRequest),
    /// Approved, but another session with the same fingerprint used it.
    UsedElsewhere(ApprovalRequest),
    Pending,
}

/// How often the directory store looks for a decision another process
/// (the CLI) wrote. A cluster store is told instead.
const POLL_EVERY: Duration = Duration::from_millis(200);

impl Approvals {
    /// One policy's approvals kept in `state_dir`. `key` is the fingerprint
    /// key the configuration gives (in a cluster, the operator's per-policy
    /// key); without one, the state directory's own.
    #[allow(clippy::too_many_arguments)]
    pub fn open_dir(
        state_dir: &Path,
        key: Option<Vec<u8>>,
        settings: Option<&ApprovalSettings>,
        policy: &str,
        namespace: &str,
        database: &str,
        pod: Option<String>,
        service_account: Option<String>,
    ) -> Result<Self, StoreError> {
        let store = DirStore::open(state_dir)?;
        let key = match key {
            Some(k) => k,
            None => store.fingerprint_key()?,
        };
        let defaults = ApprovalSettings::default();
        let settings = settings.unwrap_or(&defaults);
        Ok(Approvals {
            store: Store::Dir(store),
            key,
            policy: policy.to_owned(),
            namespace: namespace.to_owned(),
            database: database.to_owned(),
            wait: settings.effective_wait().as_std(),
            expires_after: settings.effective_expires_after().as_std(),
            pod,
            service_account,
            approvers: Some(settings.approvers.clone())
                .filter(|a| !a.users.is_empty() || !a.groups.is_empty()),
        })
    }

    pub fn approve_command(&self, id: &str) -> String {
        self.store.approve_command(&self.namespace, id)
    }

    /// Find or open the request for a held statement. A matching approval
    /// is claimed here, under the store's lock: it releases one execution.
    pub async fn open(&self, ask: Ask<'_>) -> Result<Opened, StoreError> {
        if let Store::Cluster(c) = &self.store {
            return self.open_in_cluster(c, ask).await;
        }
        let fingerprint = request::fingerprint(
            &self.key,
            &format!("{}/{}", self.namespace, self.policy),
            &self.database,
            ask.subject,
            ask.statement,
            ask.params,
        );
        let draft = Draft {
            database: self.database.clone(),
            requester: Requester {
                subject: ask.subject.to_owned(),
                pod: self.pod.clone(),
                service_account: self.service_account.clone(),
                os_user: ask.os_user.map(str::to_owned),
            },
            statement: ask.statement.to_owned(),
            parameters: request::render_params(ask.params, ask.sensitive),
            fingerprint,
            reason: ask.reason.to_owned(),
            approvers: self.approvers.clone(),
            estimate: ask.estimate,
        };
        let (policy, namespace, expires_after) = (
            self.policy.clone(),
            self.namespace.clone(),
            self.expires_after,
        );
        self.store
            .blocking(move |s| {
                let now = Timestamp::now();
                let same: Vec<_> = s
                    .list()?
                    .into_iter()
                    .filter(|r| r.spec.fingerprint == draft.fingerprint)
                    .collect();
                match request::standing(&same, now) {
                    Standing::Approved(r) => {
                        let claimed = s.update(request::id(&r), |r| {
                            let ok = request::claim(r, now).is_ok();
                            (true, ok.then(|| r.clone()))
                        })?;
                        if let Some(r) = claimed {
                            return Ok(Opened::Released(r));
                        }
                    }
                    Standing::Pending(r) => return Ok(Opened::Pending(r)),
                    Standing::Denied(r) => return Ok(Opened::Denied(r)),
                    Standing::None => {}
                }
                let r = s.create(|| {
                    let id = format!("{policy}-{:06x}", rand::random::<u32>() & 0xff_ffff);
                    request::new_request(
                        draft.clone(),
                        &policy,
                        &namespace,
                        &id,
                        now,
                        expires_after,
                    )
                })?;
                Ok(Opened::Pending(r))
            })
            .await
    }

    /// Resolves once request `id` is no longer pending (decided, expired,
    /// gone). Reads only, so it is safe to drop at any point (the relay
    /// selects on it with the client, cancel, shutdown and the deadline);
    /// `check` then claims. The directory store learns of a decision by
    /// looking every 200 ms (the reviewer's CLI is another process).
    pub async fn decided(&self, id: &str) {
        if let Store::Cluster(c) = &self.store {
            return c.decided(id).await;
        }
        loop {
            let id = id.to_owned();
            let pending = self
                .store
                .blocking(move |s| {
                    let r = s.get(&id)?;
                    Ok(request::phase(&r, Timestamp::now()) == ApprovalPhase::Pending)
                })
                .await;
            if !matches!(pending, Ok(true)) {
                return;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Look at a request once; claims it when it has been approved.
    pub async fn check(&self, id: &str) -> Result<Waited, StoreError> {
        if let Store::Cluster(c) = &self.store {
            return self.check_in_cluster(c, id).await;
        }
        let id = id.to_owned();
        self.store
            .blocking(move |s| {
                s.update(&id, |r| {
                    let now = Timestamp::now();
                    match request::phase(r, now) {
                        ApprovalPhase::Approved => match request::claim(r, now) {
                            Ok(()) => (true, Waited::Released(r.clone())),
                            Err(_) => (true, Waited::UsedElsewhere(r.clone())),
                        },
                        ApprovalPhase::Pending => (false, Waited::Pending),
                        ApprovalPhase::Denied => (false, Waited::Denied(r.clone())),
                        ApprovalPhase::Expired => {
                            let changed = request::expire(r, now);
                            (changed, Waited::Expired(r.clone()))
                        }
                        ApprovalPhase::Executed | ApprovalPhase::Failed => {
                            (false, Waited::UsedElsewhere(r.clone()))
                        }
                    }
                })
            })
            .await
    }

    /// Record what the released statement did.
    pub async fn finish(&self, id: String, outcome: Outcome) {
        if let Store::Cluster(c) = &self.store {
            if let Err(e) = c.finish(&id, &outcome).await {
                tracing::warn!(error = %e, "recording the outcome of an approved statement failed");
            }
            return;
        }
        let result = self
            .store
            .blocking(move |s| {
                s.update(&id, |r| {
                    request::finish(r, &outcome);
                    (true, ())
                })
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "recording the outcome of an approved statement failed");
        }
    }
}

/// The words a client reads.
pub mod messages {
    use super::*;

    fn decider(r: &ApprovalRequest) -> (String, String) {
        let d = r.spec.decision.as_ref();
        (
            d.and_then(|d| d.decided_by.clone())
                .unwrap_or_else(|| "a reviewer".into()),
            d.and_then(|d| d.reason.clone())
                .unwrap_or_else(|| "no reason given".into()),
        )
    }

    /// Sent the moment a statement starts waiting (psql prints it).
    pub fn waiting(a: &Approvals, r: &ApprovalRequest) -> PgError {
        let id = request::id(r);
        PgError::notice(format!(
            "waiting up to {} for approval of request {id} ({}). A reviewer approves with: {}",
            human(a.wait),
            r.spec.reason,
            a.approve_command(id)
        ))
    }

    /// Fail-fast: the request exists, nothing ran.
    pub fn pending(a: &Approvals, r: &ApprovalRequest) -> PgError {
        let id = request::id(r);
        PgError::denied(format!(
            "{}: request {id} is waiting for a reviewer; the statement did not run",
            r.spec.reason
        ))
        .with_hint(format!(
            "approve with: {} — then run the same statement again; it runs once, until {}",
            a.approve_command(id),
            r.spec.expires_at
        ))
    }

    pub fn timed_out(a: &Approvals, r: &ApprovalRequest) -> PgError {
        let id = request::id(r);
        PgError::denied(format!(
            "request {id} was not decided within {}; the statement did not run",
            human(a.wait)
        ))
        .with_hint(format!(
            "the request stays open until {}; once approved ({}), run the same statement again and it runs once",
            r.spec.expires_at,
            a.approve_command(id)
        ))
    }

    pub fn denied(r: &ApprovalRequest) -> PgError {
        let (by, why) = decider(r);
        PgError::denied(format!(
            "request {} was denied by {by}: {why}",
            request::id(r)
        ))
    }

    pub fn expired(r: &ApprovalRequest) -> PgError {
        PgError::denied(format!(
            "request {} expired at {} without being approved; the statement did not run",
            request::id(r),
            r.spec.expires_at
        ))
        .with_hint("run the statement again to open a new request")
    }

    pub fn used_elsewhere(r: &ApprovalRequest) -> PgError {
        PgError::denied(format!(
            "the approval of request {} was already used; an approval releases one execution",
            request::id(r)
        ))
        .with_hint("run the statement again to open a new request")
    }

    pub fn cancelled(r: &ApprovalRequest) -> PgError {
        PgError::canceled(format!(
            "canceling statement due to user request (it was waiting for approval of request {}, which stays open until {})",
            request::id(r),
            r.spec.expires_at
        ))
    }

    pub fn store_failed(e: &StoreError) -> PgError {
        PgError::denied(format!(
            "approval required, but the approval store failed ({e}); the statement did not run"
        ))
    }

    pub fn no_store(reason: &str) -> PgError {
        PgError::denied(format!("{reason} (this gateway has no approval store)"))
    }
}

/// `1h30m`, `45s`: as durations are written in a policy.
fn human(d: Duration) -> String {
    pgwarden_api::Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .to_string()
}
