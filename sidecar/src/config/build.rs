//! A configuration snapshot (from files or the operator) → the running
//! configuration: compiled rules, authenticators, masking, approval stores,
//! recording. Errors name the object and field (and the file, when the
//! policy came from one).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pgwarden_api::{ConfigSnapshot, SnapshotPolicy};

use super::{ConfigError, ConfigErrors, GatewayConfig, LoadOptions, PolicyConfig};
use crate::approval::Approvals;
use crate::identity::Authenticator;
use crate::masking::{HashKey, MaskRules, Masking};
use crate::policy::Gate;
use crate::recording::{ship, Recording};
use crate::upstream::{tls::UpstreamTls, Credential, UpstreamTarget};

/// Build every policy of a snapshot; all or nothing.
pub fn build(snapshot: &ConfigSnapshot, opts: &LoadOptions) -> Result<GatewayConfig, ConfigErrors> {
    // The operator verified the pod (its token's binding, the pod object):
    // that beats anything the command line says about it.
    let with_pod;
    let opts = match &snapshot.pod {
        None => opts,
        Some(pod) => {
            let mut o = opts.clone();
            o.identity.pod_namespace = Some(pod.namespace.clone());
            o.identity.pod_name = Some(pod.name.clone());
            o.identity.service_account = Some(pod.service_account.clone());
            with_pod = o;
            &with_pod
        }
    };
    let mut errors = Vec::new();
    let key = snapshot.masking_key.as_ref().map(|k| k.0.as_slice());
    let mut built: Vec<Arc<PolicyConfig>> = Vec::new();
    for p in &snapshot.policies {
        let Some(cfg) = build_policy(p, key, opts, &mut errors) else {
            continue;
        };
        if let Some(other) = built
            .iter()
            .find(|o| o.upstream.database == cfg.upstream.database)
        {
            errors.push(ConfigError {
                file: None,
                object: Some(format!("DatabaseAccessPolicy {}", cfg.id)),
                path: Some("spec.database.name".into()),
                message: format!(
                    "database {:?} is already served by policy {}; a gateway picks the policy by database name",
                    cfg.upstream.database, other.id
                ),
            });
            continue;
        }
        built.push(Arc::new(cfg));
    }
    if errors.is_empty() && built.is_empty() {
        errors.push(ConfigError {
            file: None,
            object: None,
            path: None,
            message: "no DatabaseAccessPolicy found: with no policy there is no traffic".into(),
        });
    }
    if errors.is_empty() {
        Ok(GatewayConfig {
            policies: built,
            version: snapshot.version,
        })
    } else {
        Err(ConfigErrors(errors))
    }
}

fn build_policy(
    p: &SnapshotPolicy,
    masking_key: Option<&[u8]>,
    opts: &LoadOptions,
    errors: &mut Vec<ConfigError>,
) -> Option<PolicyConfig> {
    let before = errors.len();
    let id = format!("{}/{}", p.namespace, p.name);
    let err = |path: &str, message: String| ConfigError {
        file: p.source.as_ref().map(PathBuf::from),
        object: Some(format!("DatabaseAccessPolicy {id}")),
        path: Some(path.to_owned()),
        message,
    };
    for fe in p.spec.validate() {
        errors.push(err(&fe.path, fe.message));
    }
    let db = &p.spec.database;
    let tls = match &db.tls {
        None => Ok(UpstreamTls::Disable),
        Some(t) => UpstreamTls::from_mode(t.mode, p.ca_pem.as_deref().map(str::as_bytes)),
    };
    let tls = match tls {
        Ok(t) => Some(t),
        Err(m) => {
            errors.push(err("spec.database.tls", m));
            None
        }
    };
    // validate() already reported a policy with no identity: only report
    // what it could not know. Key files were made absolute by the producer.
    let authenticator = if errors.len() == before {
        match Authenticator::from_spec(&p.spec, Path::new("."), &opts.identity) {
            Ok(a) => Some(a),
            Err((path, message)) => {
                errors.push(err(path, message));
                None
            }
        }
    } else {
        None
    };
    let rules = MaskRules::new(&p.spec.masking);
    if rules.uses_hash() && masking_key.is_none() {
        let i = p
            .spec
            .masking
            .iter()
            .position(|m| m.strategy == pgwarden_api::MaskStrategy::Hash)
            .unwrap_or(0);
        errors.push(err(
            &format!("spec.masking[{i}].strategy"),
            "strategy Hash needs a key: pass --masking-key-file (in a cluster the operator provides it); it never comes from a client".into(),
        ));
    }
    let store = match &p.recording_dsn {
        None => None,
        Some(dsn) => match ship::parse_dsn(&dsn.0) {
            Ok(target) => {
                let table = p
                    .spec
                    .recording
                    .as_ref()
                    .and_then(|r| r.store.as_ref())
                    .and_then(|s| s.postgres.as_ref())
                    .and_then(|pg| pg.table.clone())
                    .unwrap_or_else(|| ship::DEFAULT_TABLE.into());
                Some((Arc::new(target), table))
            }
            Err(e) => {
                errors.push(err(
                    "spec.recording.store.postgres.dsnSecret",
                    format!("dsn: {e}"),
                ));
                None
            }
        },
    };
    if errors.len() != before {
        return None;
    }
    let (Some(tls), Some(authenticator)) = (tls, authenticator) else {
        return None;
    };
    let upstream = Arc::new(UpstreamTarget {
        host: db.host.clone(),
        port: db.port,
        database: db.name.clone(),
        credential: Credential {
            username: p.credential.username.clone(),
            password: p.credential.password.clone(),
        },
        tls,
    });
    let masking = (!rules.is_empty()).then(|| {
        Arc::new(Masking::new(
            rules,
            masking_key.map(HashKey::new),
            upstream.clone(),
        ))
    });
    let pod = match (&opts.identity.pod_namespace, &opts.identity.pod_name) {
        (Some(ns), Some(n)) => Some(format!("{ns}/{n}")),
        _ => None,
    };
    let approvals = match (&opts.cluster_approvals, &opts.state_dir) {
        (Some(client), _) => {
            // The operator's per-policy key; without it no fingerprint binds.
            let Some(key) = &p.fingerprint_key else {
                errors.push(err(
                    "spec.approval",
                    "the operator sent no fingerprint key for this policy".into(),
                ));
                return None;
            };
            Some(Arc::new(Approvals::in_cluster(
                client.clone(),
                key.0.clone(),
                p.spec.approval.as_ref(),
                &p.name,
                &p.namespace,
                &db.name,
                pod,
                opts.identity.service_account.clone(),
            )))
        }
        (None, None) => None,
        (None, Some(dir)) => {
            match Approvals::open_dir(
                dir,
                p.fingerprint_key.as_ref().map(|k| k.0.clone()),
                p.spec.approval.as_ref(),
                &p.name,
                &p.namespace,
                &db.name,
                pod,
                opts.identity.service_account.clone(),
            ) {
                Ok(a) => Some(Arc::new(a)),
                Err(e) => {
                    errors.push(err("spec.approval", format!("approval store: {e}")));
                    return None;
                }
            }
        }
    };
    let recording = match &p.spec.recording {
        None => None,
        Some(settings) => match opts.recorder() {
            Ok(r) => Some(Arc::new(Recording::new(r, settings, &p.spec, store))),
            Err(e) => {
                errors.push(err("spec.recording", format!("cannot record: {e}")));
                return None;
            }
        },
    };
    let session_terms = {
        let mut h = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let part = |h: &mut aws_lc_rs::digest::Context, bytes: &[u8]| {
            h.update(&(bytes.len() as u64).to_be_bytes());
            h.update(bytes);
        };
        part(
            &mut h,
            serde_json::to_string(db).unwrap_or_default().as_bytes(),
        );
        part(&mut h, p.credential.username.as_bytes());
        part(&mut h, p.credential.password.0.as_bytes());
        part(&mut h, p.ca_pem.as_deref().unwrap_or("").as_bytes());
        part(
            &mut h,
            serde_json::to_string(&p.spec.masking)
                .unwrap_or_default()
                .as_bytes(),
        );
        part(&mut h, masking_key.unwrap_or_default());
        let mut out = [0u8; 32];
        out.copy_from_slice(h.finish().as_ref());
        out
    };
    Some(PolicyConfig {
        session_terms,
        id,
        approvals,
        recording,
        upstream,
        gate: Gate::new(&p.spec, opts.cache_entries),
        authenticator,
        masking,
        spec: p.spec.clone(),
    })
}
