//! pgwarden's operator (DESIGN §4): reconciles DatabaseAccessPolicies into
//! status, and streams each injected sidecar the configuration snapshot of
//! the policies that select its pod.
//!
//! Layout, as data flows:
//! - `index`: what the cluster holds (policies, Secrets, injected pods), kept
//!   by reflectors; computes the snapshot a given pod is owed.
//! - `keys`: the masking and fingerprint keys, kept in a Secret the operator owns.
//! - `stream`: the HTTPS config stream sidecars connect to (auth by TokenReview,
//!   snapshots down, ACK/NACK up).
//! - `controller`: policy status (validate, conditions, selected/applied sidecars,
//!   Events); runs on the leader only (`leader`).
//! - `sidecars`: which sidecars are connected and what each acknowledged.
//! - `observe`: /metrics, /healthz, /readyz.

pub mod admission;
pub mod approvals;
pub mod args;
pub mod certs;
pub mod controller;
pub mod index;
pub mod keys;
pub mod leader;
pub mod observe;
pub mod sidecars;
pub mod stream;

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use futures_util::FutureExt as _;
use tokio::sync::watch;

use crate::args::Args;
use crate::keys::Keys;
use crate::leader::{Election, LeaseSettings};
use crate::observe::Observe;
use crate::sidecars::Sidecars;

/// Readiness gate: the API server answered once.
const API_GATE: &str = "kubernetes API";

pub fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "starting the runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The operator until SIGTERM/SIGINT: observability, keys, leader election,
/// the controller while leading, and (on every replica) the config stream.
/// Shutdown stops the controller first, then releases the Lease, so the
/// next leader starts at once and never overlaps this one.
pub async fn run(args: Args) -> anyhow::Result<()> {
    // One process-wide provider: kube's client and the stream's server agree.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let identity = args.identity();
    let config = args.kube_config().await?;
    let client = kube::Client::try_from(config).context("building the Kubernetes client")?;

    let (shutdown_tx, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        shutdown_tx.send_replace(true);
    });

    let sidecars = Arc::new(Sidecars::default());
    let observe = Arc::new(Observe::new(sidecars.clone()));
    observe.readiness.set(API_GATE, false);
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("listening on --metrics-addr {}", args.metrics_addr))?;
    tracing::info!(addr = %args.metrics_addr, "serving /metrics, /healthz, /readyz");
    tokio::spawn(observe::serve(listener, observe.clone(), shutdown.clone()));
    tokio::spawn(probe_api(client.clone(), observe.clone(), shutdown.clone()));

    let keys = Arc::new(
        Keys::load_or_create(client.clone(), &args.namespace, &args.keys_secret)
            .await
            .context("loading the keys Secret")?,
    );
    tokio::spawn({
        let (keys, client, stop) = (keys.clone(), client.clone(), shutdown.clone());
        let (ns, name) = (args.namespace.clone(), args.keys_secret.clone());
        async move { keys.keep_stored(client, &ns, &name, stop).await }
    });
    // Told by whichever replica makes a request's event true (see notify).
    approvals::notify::install(
        client.clone(),
        observe.metrics.approval_notifications.clone(),
    );
    // Admission webhooks (injection, pod guard) on every replica.
    let serving_cert = admission::start(
        &args.admission,
        &args.namespace,
        client.clone(),
        approvals::webhooks::routes(client.clone(), args.approvals.creator(&args.namespace)),
        shutdown.clone(),
    )
    .await?;
    // The config stream serves on every replica.
    stream::start(
        &args.stream,
        &args.namespaces,
        client.clone(),
        keys.clone(),
        sidecars.clone(),
        serving_cert,
        shutdown.clone(),
    )
    .await?;

    let (leading_tx, leading) = watch::channel(false);
    let election = match args.leader_election {
        true => {
            let settings = LeaseSettings {
                namespace: args.namespace.clone(),
                name: args.lease_name.clone(),
                identity: identity.clone(),
                duration: Duration::from_secs(args.lease_duration_seconds),
            };
            let election = Arc::new(Election::new(client.clone(), settings));
            let (e, stop) = (election.clone(), shutdown.clone());
            let task = tokio::spawn(async move { e.run(&leading_tx, stop).await });
            Some((election, task))
        }
        false => {
            leading_tx.send_replace(true);
            // Kept alive so `leading` never reads as closed.
            std::mem::forget(leading_tx);
            None
        }
    };

    let ctx = Arc::new(controller::Context::new(
        client.clone(),
        &identity,
        observe.clone(),
    ));
    // The ApprovalRequest controller follows the same Lease.
    let approvals_task = tokio::spawn(approvals::lifecycle::supervise(
        Arc::new(approvals::lifecycle::Context::new(
            client.clone(),
            &identity,
            args.approvals.approval_retention,
        )),
        args.namespaces.clone(),
        leading.clone(),
        shutdown.clone(),
    ));
    supervise_controller(ctx, args.namespaces.clone(), leading, shutdown).await;
    let _ = approvals_task.await;

    if let Some((election, task)) = election {
        let _ = task.await;
        match tokio::time::timeout(Duration::from_secs(5), election.release()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "releasing the lease failed"),
            Err(_) => tracing::warn!("releasing the lease timed out"),
        }
    }
    observe.metrics.is_leader.set(0);
    Ok(())
}

/// Runs the controller while this replica leads; stops it when leadership
/// is lost or on shutdown (reconciles in flight get a moment to finish).
async fn supervise_controller(
    ctx: Arc<controller::Context>,
    namespaces: Vec<String>,
    mut leading: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let metrics = &ctx.observe.metrics;
    loop {
        // Biased: shutdown wins over a leadership change seen at the same
        // time (the election ends on shutdown too, closing `leading`).
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return,
            r = leading.wait_for(|l| *l) => if r.is_err() { return },
        }
        metrics.is_leader.set(1);
        tracing::info!("starting the policy controller");
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut task = tokio::spawn(controller::run(
            ctx.clone(),
            namespaces.clone(),
            stopped(stop_rx),
        ));
        let done = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => true,
            r = leading.wait_for(|l| !*l) => r.is_err(),
            _ = &mut task => {
                tracing::error!("the policy controller ended by itself");
                false
            }
        };
        stop_tx.send_replace(true);
        if tokio::time::timeout(Duration::from_secs(3), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
        metrics.is_leader.set(0);
        tracing::info!("policy controller stopped");
        if done {
            return;
        }
    }
}

/// A cloneable future that resolves once `rx` turns true (or its sender goes).
fn stopped(
    mut rx: watch::Receiver<bool>,
) -> impl Future<Output = ()> + Send + Sync + Clone + 'static {
    async move {
        let _ = rx.wait_for(|s| *s).await;
    }
    .boxed()
    .shared()
}

/// Marks the API gate ready once the API server answers.
async fn probe_api(
    client: kube::Client,
    observe: Arc<Observe>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        match client.apiserver_version().await {
            Ok(_) => return observe.readiness.set(API_GATE, true),
            Err(e) => tracing::warn!(error = %e, "the Kubernetes API is not reachable yet"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // No signal handlers: only Ctrl-C.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
