//! `pgwarden-testapi --kubeconfig FILE [--dir DIR] [--port N] [--run-pods
//! --pgwarden-bin PATH]`: starts the test API server, copies its kubeconfig
//! (contexts admin, alice, bob) to FILE, prints one line `ready`, and runs until
//! SIGTERM/SIGINT. With `--run-pods` the pod runner runs every pod that appears:
//! pgwarden sidecars as the binary at PATH, other containers played. With
//! `--operator-bin BIN --manifest FILE` pgwarden is installed from the
//! rendered chart (`pgwarden_testapi::install`): its objects applied, its
//! Deployment played by starting BIN as the chart's ServiceAccount.

use std::path::PathBuf;

fn usage() -> ! {
    eprintln!(
        "usage: pgwarden-testapi --kubeconfig FILE [--dir DIR] [--port N] [--run-pods --pgwarden-bin PATH] [--operator-bin BIN --manifest FILE]"
    );
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut kubeconfig, mut opts) = (None::<PathBuf>, pgwarden_testapi::Options::default());
    let (mut run_pods, mut pgwarden_bin) = (false, None::<PathBuf>);
    let (mut operator_bin, mut manifest) = (None::<PathBuf>, None::<PathBuf>);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--kubeconfig" => kubeconfig = Some(PathBuf::from(val())),
            "--dir" => opts.dir = Some(PathBuf::from(val())),
            "--port" => opts.port = val().parse().unwrap_or_else(|_| usage()),
            "--run-pods" => run_pods = true,
            "--pgwarden-bin" => pgwarden_bin = Some(PathBuf::from(val())),
            "--operator-bin" => operator_bin = Some(PathBuf::from(val())),
            "--manifest" => manifest = Some(PathBuf::from(val())),
            _ => usage(),
        }
    }
    let Some(kubeconfig) = kubeconfig else {
        usage()
    };
    let server = match pgwarden_testapi::TestApiServer::start_with(opts) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pgwarden-testapi: {e}");
            std::process::exit(1)
        }
    };
    let kubelet = if run_pods {
        let Some(bin) = pgwarden_bin else { usage() };
        // Containers run in their pod's directory: a relative path would not resolve.
        let bin = std::fs::canonicalize(&bin).unwrap_or_else(|e| {
            eprintln!("pgwarden-testapi: --pgwarden-bin {}: {e}", bin.display());
            std::process::exit(1)
        });
        let opts = pgwarden_testapi::kubelet::KubeletOptions {
            pgwarden_bin: Some(bin),
            run_all: true,
            ..Default::default()
        };
        match pgwarden_testapi::kubelet::Kubelet::start(&server, opts) {
            Ok(k) => Some(k),
            Err(e) => {
                eprintln!("pgwarden-testapi: pod runner: {e}");
                std::process::exit(1)
            }
        }
    } else {
        None
    };
    let operator = match (operator_bin, manifest) {
        (None, None) => None,
        (Some(bin), Some(manifest)) => {
            match pgwarden_testapi::install::install(&server, &manifest, &bin, server.dir()) {
                Ok((_, op)) => {
                    eprintln!(
                        "pgwarden-testapi: pgwarden installed from {}; operator (pid {}) as {}, log {}",
                        manifest.display(),
                        op.pid(),
                        op.user,
                        op.log.display()
                    );
                    Some(op)
                }
                Err(e) => {
                    eprintln!("pgwarden-testapi: installing pgwarden: {e}");
                    std::process::exit(1)
                }
            }
        }
        _ => usage(),
    };
    if let Err(e) = std::fs::copy(server.kubeconfig(), &kubeconfig) {
        eprintln!("pgwarden-testapi: writing {}: {e}", kubeconfig.display());
        std::process::exit(1)
    }
    eprintln!(
        "pgwarden-testapi: serving {} (audit log {})",
        server.url(),
        server.dir().join("audit.log").display()
    );
    println!("ready");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    });
    // Pods' processes stop (SIGTERM, grace) before the operator and the server go.
    drop(kubelet);
    drop(operator);
    drop(server);
}
