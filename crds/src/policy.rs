//! `DatabaseAccessPolicy` (pgwarden.io/v1alpha1): who may reach which database,
//! what they may run there, and what they may see.
//!
//! Spec structs use `deny_unknown_fields` so a misspelt key in a policy is an error,
//! not a silently ignored guardrail. kube's schema rewriter drops the resulting
//! `additionalProperties: false`, which structural schemas forbid next to
//! `properties`, so the CRD stays valid; in a cluster the apiserver's strict field
//! validation plays the same role.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::Duration;

/// Access policy for one upstream database, applied by the pgwarden sidecar of
/// every selected pod (or by `pgwarden run` in standalone mode).
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "pgwarden.io",
    version = "v1alpha1",
    kind = "DatabaseAccessPolicy",
    namespaced,
    shortname = "dap",
    category = "pgwarden",
    status = "DatabaseAccessPolicyStatus",
    derive = "PartialEq",
    doc = "Guardrails between automated SQL clients and one PostgreSQL database: identity, statement rules, column masking, limits, approvals and recording.",
    // JSON form: clippy's duplicated_attributes misfires on repeated printcolumn(..).
    printcolumn = r#"{"name":"Database", "type":"string", "jsonPath":".spec.database.name"}"#,
    printcolumn = r#"{"name":"Default", "type":"string", "description":"Action for accesses no rule matches", "jsonPath":".spec.defaultAction"}"#,
    printcolumn = r#"{"name":"Selected", "type":"integer", "description":"Running pods matched by podSelector", "jsonPath":".status.selectedPods"}"#,
    printcolumn = r#"{"name":"Applied", "type":"integer", "description":"Sidecars running the current generation", "jsonPath":".status.appliedSidecars"}"#,
    printcolumn = r#"{"name":"Host", "type":"string", "jsonPath":".spec.database.host", "priority":1}"#,
    printcolumn = r#"{"name":"Age", "type":"date", "jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(transform = crate::schema::kube_int_formats)]
pub struct DatabaseAccessPolicySpec {
    /// Which injected pods get this policy. Ignored in standalone mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,

    /// How clients prove who they are. Exactly one of `oidc`, `kubernetes`, `localTrust`, `pod`.
    pub identity: Identity,

    /// The upstream database and the credential the proxy (never the client) logs in with.
    pub database: DatabaseTarget,

    /// Decides any access that no rule matches.
    #[serde(default)]
    pub default_action: Action,

    /// `Audit` rolls a policy out against real traffic: what its rules or
    /// `defaultAction` would deny or hold runs anyway and is recorded and
    /// counted as "would deny" / "would hold". Built-in denials, masking and
    /// limits still apply.
    #[serde(default, skip_serializing_if = "Enforcement::is_enforce")]
    pub enforcement: Enforcement,

    /// Ordered; the first rule matching an access decides it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,

    /// Columns masked before a result leaves the proxy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub masking: Vec<MaskingRule>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,

    /// Who may approve `RequireApproval` statements, and how long they wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalSettings>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording: Option<RecordingSettings>,
}

/// Set by the operator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseAccessPolicyStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Running pods matched by `podSelector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_pods: Option<i32>,

    /// Sidecars that have acknowledged the current generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_sidecars: Option<i32>,
}

// === identity ===

/// Exactly one member is set (see `validate`). A struct of options rather than an
/// enum because structural CRD schemas cannot express `oneOf` between objects.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Identity {
    /// The client sends a JWT as its Postgres password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc: Option<OidcIdentity>,

    /// The client sends the pod's projected service-account token as its password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesIdentity>,

    /// Standalone mode only: loopback clients are trusted as `subject`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_trust: Option<LocalTrustIdentity>,

    /// Injected sidecars: a client on the pod's loopback is the pod, with
    /// subject `system:serviceaccount:NAMESPACE:NAME` of the pod's service
    /// account as the operator verified it. No password, no token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodIdentity>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OidcIdentity {
    /// `https://` URL; must equal the token's `iss`.
    pub issuer: String,

    /// The token's `aud` must contain one of these.
    pub audiences: Vec<String>,

    /// Default: `jwks_uri` from the issuer's discovery document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,

    /// A local JWKS file, for offline use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<String>,

    /// Globs on `sub`; empty means any subject.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subjects: Vec<String>,

    /// Every listed claim must be present and match its glob.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub claims: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesIdentity {
    /// Audience the projected token must carry.
    pub audience: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodIdentity {
    /// Globs on the pod's service account name; empty means any. A policy
    /// selecting pods by label can still admit only the accounts it names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalTrustIdentity {
    /// The subject recorded for every loopback client.
    pub subject: String,
}

// === database ===

pub const DEFAULT_PORT: u16 = 5432;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DatabaseTarget {
    pub host: String,

    #[serde(default = "default_port")]
    #[schemars(range(min = 1))]
    pub port: u16,

    /// Database name; clients select this policy by it.
    pub name: String,

    /// Secret with keys `username` and `password`.
    pub credentials_secret: String,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<DatabaseTls>,
}

fn default_port() -> u16 {
    DEFAULT_PORT
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DatabaseTls {
    pub mode: TlsMode,

    /// Secret whose `ca.crt` verifies the server (for `verify-full`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<String>,

    /// PEM file that verifies the server (for `verify-full`, standalone mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

/// Upstream TLS, named as in libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    Disable,
    Require,
    VerifyFull,
}

// === rules ===

/// What happens to a matching access.
// Declared in order of severity, so a statement's verdict is the `max` of its accesses'.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
pub enum Action {
    Allow,
    RequireApproval,
    #[default]
    Deny,
}

/// Whether a policy's rules are enforced or only audited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Enforcement {
    #[default]
    Enforce,
    /// Rule verdicts are recorded, not acted on (built-in denials still are).
    Audit,
}

impl Enforcement {
    /// The default, left out when a spec is written back.
    pub fn is_enforce(&self) -> bool {
        *self == Enforcement::Enforce
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// Unique within the policy; named in denials, approvals and recordings.
    pub name: String,

    pub action: Action,

    /// Statement classes this rule matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statements: Vec<StatementClass>,

    /// `schema.table` globs this rule matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<String>,

    /// Function-name globs this rule matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub functions: Vec<String>,

    /// Match only UPDATE/DELETE without a WHERE clause.
    #[serde(default, skip_serializing_if = "is_false")]
    pub unfiltered: bool,
}

fn is_false(b: &bool) -> bool {
    !b
}

/// Statement class. DDL: CREATE/ALTER/DROP/COMMENT on schema objects; PRIVILEGE:
/// GRANT/REVOKE and role management; SESSION: SET/RESET/SHOW/DISCARD; MAINTENANCE:
/// VACUUM/ANALYZE/REINDEX/CLUSTER/REFRESH; CODE: DO, CALL and anything else that runs
/// code the proxy cannot see into.
// Variants carry no doc comments: schemars would turn documented variants into
// `oneOf` branches and kube would hoist them out of declaration order.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StatementClass {
    Select,
    Insert,
    Update,
    Delete,
    Merge,
    Truncate,
    CopyFrom,
    CopyTo,
    Ddl,
    Privilege,
    Transaction,
    Session,
    Explain,
    Maintenance,
    Code,
}

impl StatementClass {
    pub const ALL: [Self; 15] = [
        Self::Select,
        Self::Insert,
        Self::Update,
        Self::Delete,
        Self::Merge,
        Self::Truncate,
        Self::CopyFrom,
        Self::CopyTo,
        Self::Ddl,
        Self::Privilege,
        Self::Transaction,
        Self::Session,
        Self::Explain,
        Self::Maintenance,
        Self::Code,
    ];

    /// The spelling used in policies, e.g. `COPY_FROM`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Select => "SELECT",
            Self::Insert => "INSERT",
            Self::Update => "UPDATE",
            Self::Delete => "DELETE",
            Self::Merge => "MERGE",
            Self::Truncate => "TRUNCATE",
            Self::CopyFrom => "COPY_FROM",
            Self::CopyTo => "COPY_TO",
            Self::Ddl => "DDL",
            Self::Privilege => "PRIVILEGE",
            Self::Transaction => "TRANSACTION",
            Self::Session => "SESSION",
            Self::Explain => "EXPLAIN",
            Self::Maintenance => "MAINTENANCE",
            Self::Code => "CODE",
        }
    }
}

impl std::fmt::Display for StatementClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Allow => "Allow",
            Self::RequireApproval => "RequireApproval",
            Self::Deny => "Deny",
        })
    }
}

// === masking ===

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MaskingRule {
    /// `schema.table.column` globs, e.g. `public.customers.email`, `*.*.ssn`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,

    /// Instead of `columns`: content detectors run over the text values of
    /// every result column, masking what they find (a backstop for data that
    /// lives where no column entry points).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub detect: Vec<Detector>,

    pub strategy: MaskStrategy,

    /// `Partial`: characters kept at the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_first: Option<u32>,

    /// `Partial`: characters kept at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,

    /// Whether statements may filter, join, sort or group on these columns,
    /// which reveals something about their values. Default `Allow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_predicates: Option<PredicateUse>,
}

/// What a content detector looks for. CreditCard: 13-19 digits (spaces or
/// dashes allowed) passing the Luhn check. Email: local@domain.tld. USSSN:
/// NNN-NN-NNNN.
// No variant doc comments; see `StatementClass`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Detector {
    CreditCard,
    Email,
    #[serde(rename = "USSSN")]
    UsSsn,
}

/// Allow: masked columns may appear in WHERE, JOIN, ORDER BY, GROUP BY.
/// Deny: statements that use them there are refused.
// No variant doc comments; see `StatementClass`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum PredicateUse {
    Allow,
    Deny,
}

/// Redact: a fixed marker. Partial: keep keepFirst/keepLast characters. Hash: keyed
/// HMAC-SHA256, joinable pseudonyms (the key comes from the operator). Null: SQL NULL.
/// Email: keep only the domain.
// No variant doc comments; see `StatementClass`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum MaskStrategy {
    Redact,
    Partial,
    Hash,
    Null,
    Email,
}

// === limits, approval, recording ===

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Rows returned per statement before the proxy cuts the result off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows: Option<u64>,

    /// Upstream `statement_timeout` for every statement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement_timeout: Option<Duration>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApprovalSettings {
    #[serde(default)]
    pub approvers: Approvers,

    /// How long the client's statement is held waiting for a decision; `0s` fails
    /// fast and the client retries once approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<Duration>,

    /// How long an undecided request stays open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_after: Option<Duration>,

    /// A webhook (Slack-compatible JSON) the operator calls when a request is
    /// opened and when it is decided or expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<ApprovalNotify>,
}

/// Where approval notifications go. The URL is read from a Secret because
/// webhook URLs carry their token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApprovalNotify {
    /// Secret (same namespace as the policy) and key holding the webhook URL
    /// (`https://`; plain `http://` only to a loopback host).
    pub url_secret_ref: SecretKeyRef,
}

/// One key of a Secret in the policy's namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
}

impl ApprovalSettings {
    /// `wait` when unset: long enough for a reviewer on call to react, short
    /// enough that a client's own timeouts rarely fire first.
    pub const DEFAULT_WAIT: Duration = Duration::from_millis(5 * 60 * 1000);
    /// `expiresAfter` when unset.
    pub const DEFAULT_EXPIRES_AFTER: Duration = Duration::from_millis(60 * 60 * 1000);

    pub fn effective_wait(&self) -> Duration {
        self.wait.unwrap_or(Self::DEFAULT_WAIT)
    }

    pub fn effective_expires_after(&self) -> Duration {
        self.expires_after.unwrap_or(Self::DEFAULT_EXPIRES_AFTER)
    }
}

/// Reviewers allowed to decide; the requester can never approve its own request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Approvers {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,

    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RecordingSettings {
    /// Masked result rows kept per statement for replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_rows: Option<u32>,

    /// fsync the record before the statement's result reaches the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durable: Option<bool>,

    /// Where records are shipped besides the local spool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<RecordingStore>,
}

/// A durable store for session records.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RecordingStore {
    /// An audit PostgreSQL, written through an INSERT-only role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresRecordingStore>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PostgresRecordingStore {
    /// Secret (same namespace) whose key `dsn` holds a libpq URI:
    /// `postgres://writer:...@audit-pg:5432/audit?sslmode=verify-full`.
    pub dsn_secret: String,
    /// Table the records go to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
}
