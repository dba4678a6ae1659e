//! Command line and environment of `pgwarden-operator`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{ArgAction, Parser};

#[derive(Clone, Debug, Parser)]
#[command(
    name = "pgwarden-operator",
    version,
    about = "pgwarden's Kubernetes operator: policy status, config stream to sidecars"
)]
pub struct Args {
    /// Kubeconfig to use; without it: in-cluster config, else $KUBECONFIG or ~/.kube/config.
    #[arg(long, env = "PGWARDEN_KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// Kubeconfig context (default: the file's current context).
    #[arg(long, env = "PGWARDEN_CONTEXT")]
    pub context: Option<String>,

    /// Namespaces whose policies are reconciled, comma-separated (default: all).
    #[arg(
        long,
        env = "PGWARDEN_NAMESPACES",
        value_delimiter = ',',
        value_name = "NS,..."
    )]
    pub namespaces: Vec<String>,

    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "PGWARDEN_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// Run the controllers only on the replica holding the Lease. Off: this
    /// replica always runs them (one replica only!).
    #[arg(
        long,
        env = "PGWARDEN_LEADER_ELECTION",
        default_value_t = true,
        action = ArgAction::Set,
        value_name = "true|false"
    )]
    pub leader_election: bool,

    /// Name of the Lease (in --namespace).
    #[arg(long, env = "PGWARDEN_LEASE_NAME", default_value = "pgwarden-operator")]
    pub lease_name: String,

    /// How long the Lease lasts unrenewed: a replica killed without releasing it
    /// is replaced after this long. The leader renews every third of it.
    #[arg(
        long,
        env = "PGWARDEN_LEASE_DURATION_SECONDS",
        default_value_t = 15,
        value_parser = clap::value_parser!(u64).range(3..=3600)
    )]
    pub lease_duration_seconds: u64,

    /// The operator's own namespace (its Lease and keys Secret live there).
    #[arg(long, env = "POD_NAMESPACE", default_value = "pgwarden-system")]
    pub namespace: String,

    /// This replica's identity in the Lease (default: host name plus a random
    /// suffix, so two processes on one host never share it).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Secret (in --namespace) holding the masking and fingerprint keys; created if missing.
    #[arg(long, env = "PGWARDEN_KEYS_SECRET", default_value = "pgwarden-keys")]
    pub keys_secret: String,
    #[command(flatten)]
    pub stream: crate::stream::StreamArgs,
    #[command(flatten)]
    pub admission: crate::admission::AdmissionArgs,
    #[command(flatten)]
    pub approvals: crate::approvals::ApprovalArgs,
}

impl Args {
    pub fn identity(&self) -> String {
        if let Some(id) = self.identity.as_deref().filter(|s| !s.is_empty()) {
            return id.to_owned();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "pgwarden-operator".to_owned());
        format!("{host}_{:08x}", rand::random::<u32>())
    }

    /// The kube client configuration these flags ask for.
    pub async fn kube_config(&self) -> Result<kube::Config, anyhow::Error> {
        use anyhow::Context as _;
        let opts = kube::config::KubeConfigOptions {
            context: self.context.clone(),
            ..Default::default()
        };
        match &self.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kc, &opts)
                    .await
                    .with_context(|| format!("kubeconfig {}", path.display()))
            }
            None if self.context.is_some() => kube::Config::from_kubeconfig(&opts)
                .await
                .context("loading kubeconfig"),
            None => kube::Config::infer()
                .await
                .context("no in-cluster config and no kubeconfig"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_flags() {
        let a = Args::try_parse_from(["pgwarden-operator"]).unwrap();
        assert!(a.leader_election);
        assert!(a.namespaces.is_empty());
        assert_eq!(a.metrics_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(a.lease_duration_seconds, 15);
        assert_eq!(a.keys_secret, "pgwarden-keys");
        let id = a.identity();
        assert!(
            id.contains('_') && id != a.identity(),
            "unique per call: {id}"
        );

        let a = Args::try_parse_from([
            "pgwarden-operator",
            "--namespaces",
            "ci,prod",
            "--leader-election",
            "false",
            "--identity",
            "op-0",
            "--lease-duration-seconds",
            "3",
        ])
        .unwrap();
        assert_eq!(a.namespaces, ["ci", "prod"]);
        assert!(!a.leader_election);
        assert_eq!(a.identity(), "op-0");
        assert!(Args::try_parse_from(["x", "--lease-duration-seconds", "1"]).is_err());
        assert!(Args::try_parse_from(["x", "--leader-election", "maybe"]).is_err());
    }
}
