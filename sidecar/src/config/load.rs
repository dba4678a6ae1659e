//! Loading multi-document YAML files (DatabaseAccessPolicy and v1 Secret
//! objects) and validating them. Every error names the file, the object and,
//! where there is one, the field path.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Secret as K8sSecret;
use pgwarden_api::{
    ConfigSnapshot, DatabaseAccessPolicy, DatabaseAccessPolicySpec, SecretBytes, SecretString,
    SnapshotCredential, SnapshotPolicy,
};
use serde::Deserialize;

use super::GatewayConfig;
use crate::identity::IdentityOptions;
use crate::recording::Recorder;

const POLICY_API_VERSION: &str = "pgwarden.io/v1alpha1";

/// One precise problem in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the object came from; None for a snapshot from the operator.
    pub file: Option<PathBuf>,
    /// `Kind namespace/name`, when the problem belongs to an object.
    pub object: Option<String>,
    /// Field path such as `spec.rules[0].action`.
    pub path: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        if let Some(file) = &self.file {
            write!(f, "{}", file.display())?;
            sep = ": ";
        }
        if let Some(o) = &self.object {
            write!(f, "{sep}{o}")?;
        }
        if let Some(p) = &self.path {
            write!(f, ": {p}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// All problems found, so an admin fixes them in one round.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

struct Located<T> {
    file: PathBuf,
    object: String,
    value: T,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: Meta,
}

#[derive(Deserialize, Default)]
struct Meta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
}

fn ns_name(meta: &Meta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("<unnamed>")
    )
}

/// Gateway settings that shape how policies are resolved.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Verdict cache size per policy.
    pub cache_entries: usize,
    pub identity: IdentityOptions,
    /// The key of the `Hash` masking strategy (from `--masking-key-file`;
    /// in a cluster, from the operator). Never from a client.
    pub masking_key: Option<Vec<u8>>,
    /// Where approval requests and recordings are kept (`--state-dir`);
    /// without it a statement that needs approval is refused, and a policy
    /// that records cannot be loaded.
    pub state_dir: Option<PathBuf>,
    /// The gateway's one recording log, opened by the first policy that
    /// records.
    pub recorder: std::sync::OnceLock<Result<Recorder, String>>,
    /// Operator mode: approvals are the operator's ApprovalRequests.
    pub cluster_approvals: Option<std::sync::Arc<crate::approval::cluster::ClusterClient>>,
}

impl LoadOptions {
    pub(super) fn recorder(&self) -> Result<Recorder, String> {
        let Some(dir) = &self.state_dir else {
            return Err("recording needs a state directory (--state-dir)".into());
        };
        self.recorder
            .get_or_init(|| Recorder::start(dir).map_err(|e| e.to_string()))
            .clone()
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            cache_entries: crate::policy::DEFAULT_CACHE_ENTRIES,
            identity: IdentityOptions::default(),
            masking_key: None,
            state_dir: None,
            recorder: Default::default(),
            cluster_approvals: None,
        }
    }
}

/// Load and validate. Returns every error found, not just the first.
pub fn load_files(files: &[PathBuf], opts: &LoadOptions) -> Result<GatewayConfig, ConfigErrors> {
    let snapshot = snapshot_files(files, opts.masking_key.as_deref(), 0)?;
    super::build::build(&snapshot, opts)
}

/// Parse the files and resolve what their policies reference (Secrets, CA
/// files, relative key files) into the snapshot the operator would send.
pub fn snapshot_files(
    files: &[PathBuf],
    masking_key: Option<&[u8]>,
    version: u64,
) -> Result<ConfigSnapshot, ConfigErrors> {
    let mut errors = Vec::new();
    let mut policies = Vec::new();
    let mut secrets: BTreeMap<String, Located<K8sSecret>> = BTreeMap::new();
    if files.is_empty() {
        errors.push(ConfigError {
            file: Some(PathBuf::from("<command line>")),
            object: None,
            path: None,
            message: "no configuration file given (use -f FILE)".into(),
        });
    }
    for file in files {
        read_file(file, &mut policies, &mut secrets, &mut errors);
    }
    let mut snapshot = ConfigSnapshot {
        version,
        policies: Vec::new(),
        masking_key: masking_key.map(|k| SecretBytes(k.to_vec())),
        pod: None,
    };
    for p in policies {
        if let Some(sp) = snapshot_policy(p, &secrets, &mut errors) {
            snapshot.policies.push(sp);
        }
    }
    if errors.is_empty() && snapshot.policies.is_empty() {
        errors.push(ConfigError {
            file: files.first().cloned(),
            object: None,
            path: None,
            message: "no DatabaseAccessPolicy found: with no policy there is no traffic".into(),
        });
    }
    if errors.is_empty() {
        Ok(snapshot)
    } else {
        Err(ConfigErrors(errors))
    }
}

fn read_file(
    file: &Path,
    policies: &mut Vec<Located<DatabaseAccessPolicy>>,
    secrets: &mut BTreeMap<String, Located<K8sSecret>>,
    errors: &mut Vec<ConfigError>,
) {
    let err = |object: Option<String>, path: Option<String>, message: String| ConfigError {
        file: Some(file.to_path_buf()),
        object,
        path,
        message,
    };
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            errors.push(err(None, None, format!("cannot read file: {e}")));
            return;
        }
    };
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
        let value = match serde_yaml_ng::Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                // The error carries line and column.
                errors.push(err(None, None, format!("YAML document {}: {e}", i + 1)));
                return;
            }
        };
        if value.is_null() {
            continue; // empty document, e.g. a trailing `---`
        }
        let meta: TypeMeta = match serde_yaml_ng::from_value(value.clone()) {
            Ok(m) => m,
            Err(e) => {
                errors.push(err(None, None, format!("YAML document {}: {e}", i + 1)));
                continue;
            }
        };
        let object = format!("{} {}", meta.kind, ns_name(&meta.metadata));
        match (meta.api_version.as_str(), meta.kind.as_str()) {
            (POLICY_API_VERSION, "DatabaseAccessPolicy") => {
                match serde_path_to_error::deserialize::<_, DatabaseAccessPolicy>(value) {
                    Ok(p) => policies.push(Located {
                        file: file.to_path_buf(),
                        object,
                        value: p,
                    }),
                    Err(e) => errors.push(err(
                        Some(object),
                        Some(e.path().to_string()),
                        e.into_inner().to_string(),
                    )),
                }
            }
            ("v1", "Secret") => match serde_path_to_error::deserialize::<_, K8sSecret>(value) {
                Ok(s) => {
                    let key = ns_name(&meta.metadata);
                    secrets.insert(
                        key,
                        Located {
                            file: file.to_path_buf(),
                            object,
                            value: s,
                        },
                    );
                }
                Err(e) => errors.push(err(
                    Some(object),
                    Some(e.path().to_string()),
                    e.into_inner().to_string(),
                )),
            },
            (api, kind) => errors.push(err(
                Some(object),
                Some("kind".into()),
                format!(
                    "unsupported object {api}/{kind}: expected {POLICY_API_VERSION}/DatabaseAccessPolicy or v1/Secret"
                ),
            )),
        }
    }
}

/// Schema-level and semantic checks.
fn validate_policy(p: &Located<DatabaseAccessPolicy>, errors: &mut Vec<ConfigError>) {
    let err = |path: &str, message: String| ConfigError {
        file: Some(p.file.clone()),
        object: Some(p.object.clone()),
        path: Some(path.to_owned()),
        message,
    };
    for fe in p.value.spec.validate() {
        errors.push(err(&fe.path, fe.message));
    }
}

/// Policies only, validated, without resolving Secrets: what `pgwarden check`
/// needs to judge statements. Returns (`namespace/name`, spec) pairs.
pub fn load_policies(
    files: &[PathBuf],
) -> Result<Vec<(String, DatabaseAccessPolicySpec)>, ConfigErrors> {
    let mut errors = Vec::new();
    let mut policies = Vec::new();
    let mut secrets = BTreeMap::new();
    for file in files {
        read_file(file, &mut policies, &mut secrets, &mut errors);
    }
    for p in &policies {
        validate_policy(p, &mut errors);
    }
    if errors.is_empty() && policies.is_empty() {
        errors.push(ConfigError {
            file: files.first().cloned(),
            object: None,
            path: None,
            message: "no DatabaseAccessPolicy found".into(),
        });
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(policies
        .into_iter()
        .map(|p| {
            let ns = p
                .value
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let name = p.value.metadata.name.clone().unwrap_or_default();
            (format!("{ns}/{name}"), p.value.spec)
        })
        .collect())
}

/// One policy with its references resolved from the files.
fn snapshot_policy(
    p: Located<DatabaseAccessPolicy>,
    secrets: &BTreeMap<String, Located<K8sSecret>>,
    errors: &mut Vec<ConfigError>,
) -> Option<SnapshotPolicy> {
    let before = errors.len();
    let err = |path: &str, message: String| ConfigError {
        file: Some(p.file.clone()),
        object: Some(p.object.clone()),
        path: Some(path.to_owned()),
        message,
    };
    validate_policy(&p, errors);
    let policy = p.value;
    let ns = policy
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = policy.metadata.name.clone().unwrap_or_default();
    let mut spec = policy.spec;
    let db = &spec.database;
    let policy_dir = p.file.parent().unwrap_or(Path::new("."));

    let secret_key = format!("{ns}/{}", db.credentials_secret);
    let secret = secrets.get(&secret_key);
    if secret.is_none() && !db.credentials_secret.is_empty() {
        errors.push(err(
            "spec.database.credentialsSecret",
            format!(
                "Secret {secret_key} not found in the given files (it needs keys username and password)"
            ),
        ));
    }
    let get = |key: &str| -> Result<String, String> {
        let s = secret.ok_or_else(String::new)?;
        secret_value(&s.value, key).ok_or_else(|| {
            format!(
                "Secret {secret_key} ({}) has no key {key:?}",
                s.file.display()
            )
        })
    };
    let credential = match (get("username"), get("password")) {
        (Ok(u), Ok(pw)) => Some(SnapshotCredential {
            username: u,
            password: SecretString(pw),
        }),
        (u, pw) => {
            for m in [u.err(), pw.err()].into_iter().flatten() {
                if !m.is_empty() {
                    errors.push(err("spec.database.credentialsSecret", m));
                }
            }
            None
        }
    };
    let ca_pem = match db.tls.as_ref().map(|t| (&t.ca_secret, &t.ca_file)) {
        Some((Some(ca), _)) => {
            let key = format!("{ns}/{ca}");
            let pem = secrets
                .get(&key)
                .and_then(|s| secret_value(&s.value, "ca.crt"));
            if pem.is_none() {
                errors.push(err(
                    "spec.database.tls.caSecret",
                    format!("Secret {key} with key \"ca.crt\" not found in the given files"),
                ));
            }
            pem
        }
        // Relative to the policy file, so a checked-in example works from
        // any working directory.
        Some((None, Some(path))) => {
            let full = policy_dir.join(path);
            match std::fs::read_to_string(&full) {
                Ok(pem) => Some(pem),
                Err(e) => {
                    errors.push(err(
                        "spec.database.tls.caFile",
                        format!("cannot read {}: {e}", full.display()),
                    ));
                    None
                }
            }
        }
        _ => None,
    };
    let recording_dsn = match spec
        .recording
        .as_ref()
        .and_then(|r| r.store.as_ref())
        .and_then(|s| s.postgres.as_ref())
    {
        None => None,
        Some(pg) => {
            let key = format!("{ns}/{}", pg.dsn_secret);
            let dsn = secrets
                .get(&key)
                .ok_or_else(|| {
                    format!("Secret {key} not found in the given files (it needs key dsn)")
                })
                .and_then(|s| {
                    secret_value(&s.value, "dsn")
                        .ok_or_else(|| format!("Secret {key} has no key \"dsn\""))
                });
            match dsn {
                Ok(d) => Some(SecretString(d)),
                Err(m) => {
                    errors.push(err("spec.recording.store.postgres.dsnSecret", m));
                    None
                }
            }
        }
    };
    // A relative jwksFile is relative to the policy file too.
    if let Some(oidc) = spec.identity.oidc.as_mut() {
        if let Some(f) = oidc.jwks_file.as_mut() {
            *f = policy_dir.join(&*f).to_string_lossy().into_owned();
        }
    }
    if errors.len() != before {
        return None;
    }
    Some(SnapshotPolicy {
        namespace: ns,
        name,
        spec,
        credential: credential?,
        ca_pem,
        recording_dsn,
        fingerprint_key: None,
        source: Some(p.file.to_string_lossy().into_owned()),
    })
}

/// A Secret value from `stringData` or (base64-decoded) `data`.
fn secret_value(s: &K8sSecret, key: &str) -> Option<String> {
    if let Some(v) = s.string_data.as_ref().and_then(|d| d.get(key)) {
        return Some(v.clone());
    }
    let bytes = s.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

#[cfg(test)]
mod tests;
