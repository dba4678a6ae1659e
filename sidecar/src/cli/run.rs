//! `pgwarden run`: load the configuration, bind, serve until a signal.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use super::output::errln;
use super::RunArgs;
use crate::config;
use crate::identity::IdentityOptions;
use crate::observe::{self, Metrics};
use crate::session::{self, CancelRegistry, Shared};
use crate::transport::Accepted;
use crate::wire::{codec, Limits, PgError};

/// Exit code for configuration errors (bad YAML, unsupported features).
const EXIT_CONFIG: u8 = 2;

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let masking_key = match &args.masking_key_file {
        None => None,
        Some(path) => match std::fs::read(path) {
            Ok(k) if k.len() >= 32 => Some(k),
            Ok(k) => {
                errln(&format!(
                    "pgwarden: --masking-key-file {}: the key has {} bytes; use at least 32 random bytes",
                    path.display(),
                    k.len()
                ));
                return Ok(ExitCode::from(EXIT_CONFIG));
            }
            Err(e) => {
                errln(&format!(
                    "pgwarden: --masking-key-file {}: {e}",
                    path.display()
                ));
                return Ok(ExitCode::from(EXIT_CONFIG));
            }
        },
    };
    let opts = config::LoadOptions {
        cache_entries: args.verdict_cache_entries,
        identity: IdentityOptions {
            ca_files: args.issuer_ca_files.clone(),
            kubernetes_issuer: args.kubernetes_issuer.clone(),
            kubernetes_jwks_file: args.kubernetes_jwks_file.clone(),
            pod_namespace: args.pod_namespace.clone(),
            pod_name: args.pod_name.clone(),
            service_account: args.service_account.clone(),
        },
        masking_key,
        state_dir: Some(args.state_dir.clone()),
        ..config::LoadOptions::default()
    };
    // Before the policies: each opens its approval store in it.
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating state dir {}", args.state_dir.display()))?;
    // Operator mode: no files; the stream brings the configuration.
    let stream = match &args.operator {
        None => None,
        Some(url) => match operator_stream(&args, url) {
            Ok(s) => Some(s),
            Err(e) => {
                errln(&format!("pgwarden: {e}"));
                return Ok(ExitCode::from(EXIT_CONFIG));
            }
        },
    };
    // In a cluster, held statements become the operator's ApprovalRequests
    // (the decisions come down the stream).
    let mut opts = opts;
    opts.cluster_approvals = stream.as_ref().and_then(|s| s.approvals.clone());
    let loaded = match stream {
        Some(_) => Ok(None),
        None => config::load_files(&args.files, &opts).map(Some),
    };
    let config = match loaded {
        Ok(c) => c,
        Err(errors) => {
            // Another gateway writing this state directory's recording log
            // is not a configuration problem: say so, naming it.
            let recorder_failed = matches!(opts.recorder.get(), Some(Err(_)));
            if let Some(holder) = recorder_failed
                .then(|| crate::recording::spool::held_by(&args.state_dir))
                .flatten()
            {
                errln(&format!(
                    "pgwarden: another gateway is writing the recording log in {} ({holder}); two writers would interleave their records and break its chain. Stop that gateway, or give this one another --state-dir",
                    crate::recording::spool::dir(&args.state_dir).display()
                ));
                return Ok(ExitCode::from(EXIT_CONFIG));
            }
            errln(&format!("pgwarden: {}", errors.to_string().trim_end()));
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    // One log per gateway, opened by the first policy that records.
    let log_broken = config
        .iter()
        .flat_map(|c| &c.policies)
        .find_map(|p| p.recording.as_ref())
        .is_some_and(|r| r.log_break().is_some());
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => match crate::transport::server_tls(c, k) {
            Ok(t) => Some(t),
            Err(e) => {
                errln(&format!("pgwarden: client TLS: {e}"));
                return Ok(ExitCode::from(EXIT_CONFIG));
            }
        },
        _ => None,
    };
    let runtime = if args.worker_threads == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.worker_threads)
            .enable_all()
            .build()?
    };
    let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
    let shared = Arc::new(Shared {
        config: config::LiveConfig::new(config),
        tls,
        cancels: CancelRegistry::default(),
        metrics: Arc::new(Metrics::new()),
        limits: Limits {
            large: args.max_message_bytes,
        },
        shutdown,
        startup_timeout: Duration::from_secs(args.startup_timeout_seconds),
    });
    if log_broken {
        shared.metrics.recording_log_breaks.inc();
    }
    runtime.block_on(serve(args, shared, Arc::new(opts), stream, shutdown_tx))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(
    args: RunArgs,
    shared: Arc<Shared>,
    opts: Arc<config::LoadOptions>,
    stream: Option<config::stream::StreamOptions>,
    shutdown_tx: tokio::sync::watch::Sender<bool>,
) -> anyhow::Result<()> {
    // Ready once listening and every policy's upstream took our login.
    let ready = Arc::new(observe::Readiness::default());
    let config = shared.clone();
    tokio::spawn(observe::watch_upstreams(
        move || config.config.current(),
        shared.metrics.clone(),
        shared.limits,
        ready.clone(),
    ));
    if let Some(addr) = args.metrics_listen {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding --metrics-listen {addr}"))?;
        tokio::spawn(observe::serve_admin(
            l,
            shared.metrics.clone(),
            ready.clone(),
        ));
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding --listen {}", args.listen))?;
    let shipping = Shipping::default();
    tokio::spawn(observe::sample(
        shared.metrics.clone(),
        observe::Sources {
            approvals: match &opts.cluster_approvals {
                Some(c) => observe::PendingFrom::Cluster(c.clone()),
                None => observe::PendingFrom::Dir(args.state_dir.clone()),
            },
            recorder: {
                let opts = opts.clone();
                Box::new(move || opts.recorder.get()?.as_ref().ok().cloned())
            },
            shipping: {
                let shipping = shipping.clone();
                Box::new(move || {
                    let loops = shipping.lock().unwrap_or_else(|e| e.into_inner());
                    loops.values().map(|(_, p)| p.clone()).collect()
                })
            },
        },
    ));
    if let Some(cfg) = shared.config.current() {
        start_policies(&cfg, &args.state_dir, &shipping, shared.limits);
    }
    match stream {
        None => {
            tokio::spawn(reload_on_change(
                args.files.clone(),
                args.state_dir.clone(),
                opts,
                shared.clone(),
                shipping.clone(),
            ));
        }
        Some(stream) => {
            let gateway = StreamedConfig {
                opts,
                state_dir: args.state_dir.clone(),
                shared: shared.clone(),
                shipping: shipping.clone(),
            };
            let metrics = shared.metrics.clone();
            tokio::spawn(config::stream::follow(stream, gateway, metrics));
        }
    }
    let local = listener.local_addr()?;
    let unix = match &args.listen_unix {
        Some(dir) => Some(
            crate::transport::UnixSocketFile::bind(dir, local.port())
                .map_err(|e| anyhow::anyhow!("binding --listen-unix: {e}"))?,
        ),
        None => None,
    };
    match &unix {
        Some(u) => info!(listen = %local, listen.unix = %u.path().display(), "pgwarden listening"),
        None => info!(listen = %local, "pgwarden listening"),
    }
    ready.set_listening(true);

    let permits = Arc::new(Semaphore::new(args.max_connections));
    let login_slots = session::LoginSlots::new(
        usize::try_from(args.max_unauthenticated_per_source).unwrap_or(usize::MAX),
    );
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a.map(|(tcp, addr)| (Accepted::Tcp(tcp), session::Peer::tcp(addr))),
            a = accept_unix(unix.as_ref()) => a,
            _ = &mut shutdown => break,
        };
        let (conn, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            shared
                .metrics
                .connections_rejected
                .with_label_values(&["too_many"])
                .inc();
            tokio::spawn(refuse(conn, PgError::too_many_connections()));
            continue;
        };
        let Some(slot) = login_slots.enter(peer.addr.ip()) else {
            shared
                .metrics
                .startup_aborted
                .with_label_values(&["per_source_limit"])
                .inc();
            tokio::spawn(refuse(conn, PgError::too_many_logins_from_source()));
            continue;
        };
        let shared = shared.clone();
        let loopback_owner = args.loopback_owner == super::Switch::On;
        tokio::spawn(async move {
            let peer = match &conn {
                Accepted::Tcp(tcp) => tcp_peer(tcp, peer.addr, loopback_owner).await,
                Accepted::Unix(_) => peer,
            };
            session::serve(conn, peer, shared, slot).await;
            drop(permit);
        });
    }
    ready.set_listening(false);
    drop(listener);
    drop(unix);
    // Idle sessions close now; busy ones after their request completes.
    let _ = shutdown_tx.send(true);
    info!("shutting down: waiting for open sessions");
    let all = u32::try_from(args.max_connections).unwrap_or(u32::MAX);
    let grace = Duration::from_secs(args.shutdown_grace_seconds);
    if tokio::time::timeout(grace, permits.acquire_many(all))
        .await
        .is_err()
    {
        warn!("sessions still open after the grace period; closing them");
    }
    // The recording log's head moves to its last record (one writer serves
    // all policies; flushing through any of them is enough).
    if let Some(r) = shared
        .config
        .current()
        .and_then(|c| c.policies.iter().find_map(|p| p.recording.clone()))
    {
        r.flush().await;
    }
    // Shipping stops (what it did not send is sent after the next start).
    shipping.lock().unwrap_or_else(|e| e.into_inner()).clear();
    Ok(())
}

/// An audit store: host, port, database, table.
type StoreKey = (String, u16, String, String);

/// The running shipping loops, one per audit store; dropping a store's
/// sender stops its loop.
type Shipping = Arc<
    std::sync::Mutex<
        std::collections::HashMap<
            StoreKey,
            (
                tokio::sync::watch::Sender<bool>,
                Arc<crate::recording::ship::driver::Progress>,
            ),
        >,
    >,
>;

/// Background work of newly built policies: token key refresh, masking
/// column-map refresh (both end with the policy), and shipping the
/// recording log to each audit store (one loop per store, whichever policy
/// names it: the log is the gateway's, not the policy's; a store no policy
/// names any more stops being shipped to).
fn start_policies(
    cfg: &config::GatewayConfig,
    state_dir: &std::path::Path,
    shipping: &Shipping,
    limits: Limits,
) {
    let mut loops = shipping.lock().unwrap_or_else(|e| e.into_inner());
    let mut stores = std::collections::HashSet::new();
    for p in &cfg.policies {
        // Valid but probably not meant (pgwarden check -f lists the same).
        for w in p.spec.lint() {
            warn!(policy.name = %p.id, "policy warning: {w}");
        }
        // Token keys are fetched in the background: an issuer that is down
        // leaves the gateway ready, refusing logins with the fetch error.
        p.authenticator.start();
        if let Some(m) = &p.masking {
            m.spawn_refresher(limits);
        }
        if let Some((target, table)) = p.recording.as_ref().and_then(|r| r.store.clone()) {
            let key = (
                target.host.clone(),
                target.port,
                target.database.clone(),
                table.clone(),
            );
            stores.insert(key.clone());
            if let std::collections::hash_map::Entry::Vacant(slot) = loops.entry(key) {
                let (stop, stopped) = tokio::sync::watch::channel(false);
                let progress =
                    crate::recording::ship::spawn(state_dir, target, table, limits, stopped);
                slot.insert((stop, progress));
            }
        }
        info!(policy.name = %p.id, database = %p.upstream.database,
              upstream = %format!("{}:{}", p.upstream.host, p.upstream.port), "serving policy");
    }
    loops.retain(|key, _| stores.contains(key));
}

/// Standalone hot reload: a change to any `-f` file (checked every second)
/// or SIGHUP loads the files again. A good configuration replaces the
/// running one whole; a bad one is refused whole (errors logged with their
/// field paths, counted) and the last good one keeps serving.
async fn reload_on_change(
    files: Vec<std::path::PathBuf>,
    state_dir: std::path::PathBuf,
    opts: Arc<config::LoadOptions>,
    shared: Arc<Shared>,
    shipping: Shipping,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).ok();
    let stamp = |files: &[std::path::PathBuf]| -> Vec<Option<(std::time::SystemTime, u64)>> {
        files
            .iter()
            .map(|f| {
                std::fs::metadata(f)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len())))
            })
            .collect()
    };
    let mut seen = stamp(&files);
    let mut tick = tokio::time::interval(RELOAD_POLL);
    let mut version = 0u64;
    loop {
        let why = tokio::select! {
            Some(()) = async { hup.as_mut()?.recv().await } => "SIGHUP",
            _ = tick.tick() => {
                let now = stamp(&files);
                if now == seen {
                    continue;
                }
                seen = now;
                "a configuration file changed"
            }
        };
        version += 1;
        let (files_, opts_) = (files.clone(), opts.clone());
        let build = move || {
            config::snapshot_files(&files_, opts_.masking_key.as_deref(), version)
                .and_then(|snap| config::build(&snap, &opts_))
        };
        match put_in_force(build, &state_dir, &shipping, &shared).await {
            Ok(()) => info!(reason = why, version, "configuration reloaded"),
            Err(errors) => warn!(
                reason = why,
                "configuration reload refused; the previous configuration stays in force: {errors}"
            ),
        }
    }
}

/// The one way a new configuration goes into force, from files or the
/// operator: built off the loop (file reads, the approval stores'
/// directory work), its policies' background work started, swapped in
/// whole. A bad one is refused whole and counted; the previous stays.
async fn put_in_force(
    build: impl FnOnce() -> Result<config::GatewayConfig, config::ConfigErrors> + Send + 'static,
    state_dir: &std::path::Path,
    shipping: &Shipping,
    shared: &Shared,
) -> Result<(), String> {
    let result = match tokio::task::spawn_blocking(build).await {
        Ok(Ok(cfg)) => {
            start_policies(&cfg, state_dir, shipping, shared.limits);
            shared.config.replace(cfg);
            Ok(())
        }
        Ok(Err(errors)) => Err(errors.to_string().trim_end().to_owned()),
        Err(e) => Err(format!("building the configuration failed: {e}")),
    };
    let label = if result.is_ok() { "ok" } else { "failed" };
    shared
        .metrics
        .config_reloads
        .with_label_values(&[label])
        .inc();
    result
}

/// `--operator URL --operator-ca FILE`: the stream's settings.
fn operator_stream(args: &RunArgs, url: &str) -> Result<config::stream::StreamOptions, String> {
    let ca_file = args
        .operator_ca
        .as_ref()
        .ok_or("--operator needs --operator-ca FILE (the operator's CA)")?;
    let ca =
        std::fs::read(ca_file).map_err(|e| format!("--operator-ca {}: {e}", ca_file.display()))?;
    let mut stream = config::stream::StreamOptions::new(
        url,
        &ca,
        args.operator_token_file.clone(),
        args.operator_stale_after,
    )?;
    stream.approvals = Some(Arc::new(crate::approval::cluster::ClusterClient::new(
        stream.clone(),
    )));
    Ok(stream)
}

/// The gateway as the operator's stream sees it: snapshots go into force
/// through [`put_in_force`], as file reloads do.
struct StreamedConfig {
    opts: Arc<config::LoadOptions>,
    state_dir: std::path::PathBuf,
    shared: Arc<Shared>,
    shipping: Shipping,
}

impl config::stream::Apply for StreamedConfig {
    async fn apply(&self, snapshot: pgwarden_api::ConfigSnapshot) -> Result<(), String> {
        let opts = self.opts.clone();
        let build = move || config::stream::build_streamed(&snapshot, &opts);
        put_in_force(build, &self.state_dir, &self.shipping, &self.shared).await
    }

    fn set_stale(&self, stale: bool) -> bool {
        self.shared.config.set_stale(stale)
    }
}

/// How often the `-f` files are checked for changes.
const RELOAD_POLL: Duration = Duration::from_secs(1);

/// A client over a limit still gets a reason, not a reset.
async fn refuse(conn: Accepted, err: PgError) {
    use tokio::io::AsyncWriteExt;
    let mut out = bytes::BytesMut::new();
    codec::put_error(&err, &mut out);
    let write = async {
        match conn {
            Accepted::Tcp(mut s) => s.write_all(&out).await,
            Accepted::Unix(mut s) => s.write_all(&out).await,
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), write).await;
}

/// The next client on the Unix socket, named by its uid; never, without one.
async fn accept_unix(
    unix: Option<&crate::transport::UnixSocketFile>,
) -> std::io::Result<(Accepted, session::Peer)> {
    let Some(unix) = unix else {
        return std::future::pending().await;
    };
    let (stream, uid) = unix.accept().await?;
    let os_user = crate::approval::os_user::name_of(uid);
    let peer = session::Peer {
        // Local, as PostgreSQL's `local` lines: loopback for identity and
        // for the per-source login cap.
        addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        label: format!("{} (OS user {os_user})", unix.path().display()),
        os_user: Some(os_user),
    };
    Ok((Accepted::Unix(stream), peer))
}

/// A TCP client, named by the OS user owning its socket when it is on this
/// host and the kernel's table lists it; otherwise its OS user is recorded
/// as unknown (and only the subject checks apply to its requests).
async fn tcp_peer(
    tcp: &tokio::net::TcpStream,
    addr: std::net::SocketAddr,
    lookup: bool,
) -> session::Peer {
    use crate::approval::os_user::{self, tcp_owner};
    let name = match tcp.local_addr() {
        Ok(server) if lookup && tcp_owner::is_local(addr, server) => {
            tokio::task::spawn_blocking(move || {
                tcp_owner::lookup(addr, server).map(os_user::name_of)
            })
            .await
            .ok()
            .flatten()
        }
        _ => None,
    };
    match name {
        Some(name) => session::Peer {
            addr,
            label: format!("{addr} (OS user {name})"),
            os_user: Some(name),
        },
        None => session::Peer {
            os_user: Some(os_user::UNKNOWN.to_owned()),
            ..session::Peer::tcp(addr)
        },
    }
}

/// SIGTERM, SIGINT and SIGQUIT shut down (flushing the recording log);
/// SIGHUP reloads (`reload_on_change`).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::quit()),
    ) {
        (Ok(mut term), Ok(mut int), Ok(mut quit)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = quit.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}
