//! Semantic checks on a `DatabaseAccessPolicySpec` that the CRD schema cannot
//! express. Shared by `pgwarden run` (exit 2 on errors) and the operator (which
//! reports them in status and keeps the last good policy).

use std::collections::HashMap;

/// A client's token may never carry the audience of the sidecar's own token:
/// a token an app container can hold must not be able to fetch a snapshot
/// (which holds the database credential), and the sidecar's token must not
/// log in as a client.
const SIDECAR_AUDIENCE_RESERVED: &str =
    "pgwarden.io/sidecar is reserved for the sidecar's own token; choose another audience (for example pgwarden)";

use crate::{DatabaseAccessPolicySpec, Duration, MaskStrategy, StatementClass, TlsMode};

/// One problem in a policy, located by its path in the object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FieldError {
    /// e.g. `spec.rules[2].unfiltered`.
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub(crate) fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl DatabaseAccessPolicySpec {
    /// Every semantic problem in this spec, in document order; empty if it is usable.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::default();
        self.validate_identity(&mut errs);
        self.validate_database(&mut errs);
        self.validate_rules(&mut errs);
        self.validate_masking(&mut errs);
        self.validate_approval(&mut errs);
        self.validate_recording(&mut errs);
        errs.0
    }

    fn validate_recording(&self, errs: &mut Errors) {
        let Some(r) = &self.recording else { return };
        if r.result_rows.is_some_and(|n| n > 10_000) {
            errs.push(
                "spec.recording.resultRows",
                "at most 10000 rows per statement are kept",
            );
        }
        let Some(pg) = r.store.as_ref().and_then(|s| s.postgres.as_ref()) else {
            return;
        };
        errs.non_empty("spec.recording.store.postgres.dsnSecret", &pg.dsn_secret);
        if let Some(t) = &pg.table {
            // Interpolated into SQL: plain (optionally schema-qualified) names only.
            let ok = t.split('.').count() <= 2
                && t.split('.').all(|p| {
                    p.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                        && p.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                });
            if !ok {
                errs.push(
                    "spec.recording.store.postgres.table",
                    format!(
                        "{t:?} is not a plain table name ([schema.]table, lower case, digits, _)"
                    ),
                );
            }
        }
    }

    fn validate_approval(&self, errs: &mut Errors) {
        let Some(a) = &self.approval else { return };
        if a.expires_after == Some(Duration::ZERO) {
            errs.push(
                "spec.approval.expiresAfter",
                "must be more than 0s: a request that expires at once can never be approved",
            );
        }
        if a.effective_wait() > a.effective_expires_after() {
            errs.push(
                "spec.approval.wait",
                format!(
                    "{} is longer than expiresAfter ({}): a statement would wait for a request that has already expired",
                    a.effective_wait(),
                    a.effective_expires_after()
                ),
            );
        }
        if let Some(n) = &a.notify {
            const P: &str = "spec.approval.notify.urlSecretRef";
            let r = &n.url_secret_ref;
            errs.non_empty(&format!("{P}.name"), &r.name);
            errs.non_empty(&format!("{P}.key"), &r.key);
            // Secret data keys: what the API server accepts in `data`.
            let key_ok = r
                .key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !r.key.is_empty() && !key_ok {
                errs.push(
                    format!("{P}.key"),
                    format!("{:?} is not a Secret key (letters, digits, -, _, .)", r.key),
                );
            }
        }
    }

    fn validate_identity(&self, errs: &mut Errors) {
        let id = &self.identity;
        let set: Vec<&str> = [
            ("oidc", id.oidc.is_some()),
            ("kubernetes", id.kubernetes.is_some()),
            ("localTrust", id.local_trust.is_some()),
            ("pod", id.pod.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, is_set)| is_set.then_some(name))
        .collect();
        if set.len() != 1 {
            let found = if set.is_empty() {
                "none".to_owned()
            } else {
                set.join(", ")
            };
            errs.push(
                "spec.identity",
                format!(
                    "exactly one of oidc, kubernetes, localTrust, pod must be set (found {found})"
                ),
            );
        }

        if let Some(oidc) = &id.oidc {
            const P: &str = "spec.identity.oidc";
            if let Err(why) = check_url(&oidc.issuer) {
                errs.push(format!("{P}.issuer"), why);
            }
            if oidc.audiences.is_empty() {
                errs.push(format!("{P}.audiences"), "must list at least one audience");
            }
            errs.non_empty_items(&format!("{P}.audiences"), &oidc.audiences);
            for (i, aud) in oidc.audiences.iter().enumerate() {
                if aud == crate::SIDECAR_AUDIENCE {
                    errs.push(format!("{P}.audiences[{i}]"), SIDECAR_AUDIENCE_RESERVED);
                }
            }
            errs.non_empty_items(&format!("{P}.subjects"), &oidc.subjects);
            if let Some(Err(why)) = oidc.jwks_uri.as_deref().map(check_url) {
                errs.push(format!("{P}.jwksUri"), why);
            }
            if oidc.jwks_uri.is_some() && oidc.jwks_file.is_some() {
                errs.push(P, "set at most one of jwksUri, jwksFile");
            }
        }
        if let Some(k8s) = &id.kubernetes {
            errs.non_empty("spec.identity.kubernetes.audience", &k8s.audience);
            if k8s.audience == crate::SIDECAR_AUDIENCE {
                errs.push(
                    "spec.identity.kubernetes.audience",
                    SIDECAR_AUDIENCE_RESERVED,
                );
            }
        }
        if let Some(local) = &id.local_trust {
            errs.non_empty("spec.identity.localTrust.subject", &local.subject);
        }
        if let Some(pod) = &id.pod {
            errs.non_empty_items("spec.identity.pod.serviceAccounts", &pod.service_accounts);
        }
    }

    fn validate_database(&self, errs: &mut Errors) {
        let db = &self.database;
        errs.non_empty("spec.database.host", &db.host);
        if db.port == 0 {
            errs.push("spec.database.port", "must be between 1 and 65535");
        }
        errs.non_empty("spec.database.name", &db.name);
        errs.non_empty("spec.database.credentialsSecret", &db.credentials_secret);
        if let Some(tls) = &db.tls {
            if tls.mode == TlsMode::VerifyFull && tls.ca_secret.is_none() && tls.ca_file.is_none() {
                errs.push(
                    "spec.database.tls",
                    "mode verify-full needs caSecret or caFile to verify the server",
                );
            }
        }
    }

    fn validate_rules(&self, errs: &mut Errors) {
        let mut first_by_name: HashMap<&str, usize> = HashMap::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let p = format!("spec.rules[{i}]");
            if rule.name.is_empty() {
                errs.push(format!("{p}.name"), "must not be empty");
            } else if let Some(first) = first_by_name.get(rule.name.as_str()) {
                errs.push(
                    format!("{p}.name"),
                    format!(
                        "duplicate rule name {:?} (first used by spec.rules[{first}])",
                        rule.name
                    ),
                );
            } else {
                first_by_name.insert(&rule.name, i);
            }

            if rule.statements.is_empty() && rule.tables.is_empty() && rule.functions.is_empty() {
                errs.push(
                    &p,
                    "a rule must name at least one of statements, tables, functions",
                );
            }
            errs.non_empty_items(&format!("{p}.tables"), &rule.tables);
            errs.non_empty_items(&format!("{p}.functions"), &rule.functions);

            let filterable = [StatementClass::Update, StatementClass::Delete];
            if rule.unfiltered
                && (rule.statements.is_empty()
                    || rule.statements.iter().any(|s| !filterable.contains(s)))
            {
                errs.push(
                    format!("{p}.unfiltered"),
                    "unfiltered applies only to UPDATE and DELETE; statements must list only those",
                );
            }
        }
    }

    fn validate_masking(&self, errs: &mut Errors) {
        for (i, rule) in self.masking.iter().enumerate() {
            let p = format!("spec.masking[{i}]");
            match (rule.columns.is_empty(), rule.detect.is_empty()) {
                (true, true) => errs.push(
                    format!("{p}.columns"),
                    "must list at least one column (or use detect)",
                ),
                (false, false) => errs.push(&p, "set either columns or detect, not both"),
                _ => {}
            }
            if !rule.detect.is_empty() && rule.in_predicates.is_some() {
                errs.push(
                    format!("{p}.inPredicates"),
                    "applies to columns entries, not detect",
                );
            }
            for (j, column) in rule.columns.iter().enumerate() {
                if let Err(why) = check_column_glob(column) {
                    errs.push(format!("{p}.columns[{j}]"), why);
                }
            }
            let keeps = rule.keep_first.is_some() || rule.keep_last.is_some();
            match rule.strategy {
                MaskStrategy::Partial if !keeps => {
                    errs.push(&p, "strategy Partial needs keepFirst or keepLast")
                }
                MaskStrategy::Partial => {}
                other if keeps => errs.push(
                    &p,
                    format!("keepFirst/keepLast apply only to strategy Partial, not {other:?}"),
                ),
                _ => {}
            }
        }
    }
}

/// Collects errors; the helpers keep each check to one line.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(path, message));
    }

    fn non_empty(&mut self, path: &str, value: &str) {
        if value.is_empty() {
            self.push(path, "must not be empty");
        }
    }

    fn non_empty_items(&mut self, path: &str, items: &[impl AsRef<str>]) {
        for (i, item) in items.iter().enumerate() {
            if item.as_ref().is_empty() {
                self.push(format!("{path}[{i}]"), "must not be empty");
            }
        }
    }
}

/// `schema.table.column`: each part non-empty, globs (`*`, `?`) allowed.
/// Unquoted: a name containing a dot cannot be masked by glob, which is rare enough
/// not to warrant a quoting syntax.
fn check_column_glob(glob: &str) -> Result<(), String> {
    let parts: Vec<&str> = glob.split('.').collect();
    if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
        return Err(format!(
            "{glob:?} is not schema.table.column (globs allowed, e.g. \"*.*.ssn\")"
        ));
    }
    Ok(())
}

/// Token issuers and key sets are fetched over https. Plain http is allowed only
/// to a loopback host, for tests against a local issuer.
fn check_url(url: &str) -> Result<(), String> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| not_url(url))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = host_of(authority);
    if host.is_empty() {
        return Err(not_url(url));
    }
    match scheme {
        "https" => Ok(()),
        "http" if is_loopback(host) => Ok(()),
        "http" => Err(format!(
            "{url:?} must use https:// (http:// is allowed only for loopback hosts)"
        )),
        _ => Err(format!("{url:?} must use https://")),
    }
}

fn not_url(url: &str) -> String {
    format!("{url:?} is not an absolute https:// URL")
}

/// The host of `userinfo@host:port`, without brackets for IPv6.
fn host_of(authority: &str) -> &str {
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(v6) = hostport.strip_prefix('[') {
        return v6.split_once(']').map_or("", |(h, _)| h);
    }
    hostport.split_once(':').map_or(hostport, |(h, _)| h)
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests;
