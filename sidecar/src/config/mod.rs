//! Runtime configuration: the policies this gateway serves, each resolved with
//! its upstream credential, ready for the data path.
//!
//! `load` turns the YAML a cluster admin applies into this, or into errors that
//! name the file, the object and the field.

mod build;
mod live;
mod load;
pub mod stream;

use std::sync::Arc;

use pgwarden_api::DatabaseAccessPolicySpec;

pub use build::build;
pub use live::LiveConfig;
pub use load::{load_files, load_policies, snapshot_files, ConfigError, ConfigErrors, LoadOptions};

use crate::approval::Approvals;
use crate::identity::Authenticator;
use crate::masking::Masking;
use crate::policy::Gate;
use crate::recording::Recording;
use crate::upstream::UpstreamTarget;

/// Everything the gateway serves. Immutable once built; a new snapshot replaces
/// it whole.
#[derive(Debug)]
pub struct GatewayConfig {
    pub policies: Vec<Arc<PolicyConfig>>,
    /// The snapshot's version.
    pub version: u64,
}

impl GatewayConfig {
    /// The policy for a client's startup `database` parameter. With a single
    /// policy, a client that names no database gets it.
    pub fn select(&self, database: Option<&str>) -> Option<&Arc<PolicyConfig>> {
        match database {
            Some(db) => self.policies.iter().find(|p| p.upstream.database == db),
            None if self.policies.len() == 1 => self.policies.first(),
            None => None,
        }
    }

    /// The policy serving `database` (how an open session finds its policy
    /// in a new configuration).
    pub fn for_database(&self, database: &str) -> Option<&Arc<PolicyConfig>> {
        self.policies
            .iter()
            .find(|p| p.upstream.database == database)
    }

    pub fn databases(&self) -> Vec<&str> {
        self.policies
            .iter()
            .map(|p| p.upstream.database.as_str())
            .collect()
    }
}

/// One DatabaseAccessPolicy with its Secret resolved.
#[derive(Debug)]
pub struct PolicyConfig {
    /// `namespace/name`, as logs and metrics name it.
    pub id: String,
    pub spec: DatabaseAccessPolicySpec,
    pub upstream: Arc<UpstreamTarget>,
    /// The compiled rules and verdict cache, shared by this policy's sessions.
    pub gate: Gate,
    /// Who may connect: built from `spec.identity`, shared by its sessions.
    pub authenticator: Authenticator,
    /// Column masking, when the policy has `masking:` entries.
    pub masking: Option<Arc<Masking>>,
    /// Where statements that need approval wait (`--state-dir`).
    pub approvals: Option<Arc<Approvals>>,
    /// Session recording, when the policy has `recording:`.
    pub recording: Option<Arc<Recording>>,
    /// A digest of what an open session cannot switch to under a new
    /// configuration: the upstream (address, database, credential, TLS) and
    /// masking (rules and key). Equal digests: sessions move to the new
    /// policy; different: they must reconnect.
    pub session_terms: [u8; 32],
}
