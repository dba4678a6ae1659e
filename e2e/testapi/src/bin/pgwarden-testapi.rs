//! `pgwarden-testapi --kubeconfig FILE [--dir DIR] [--port N]`: starts the test API
//! server, copies its kubeconfig (contexts admin, alice, bob) to FILE, prints one
//! line `ready`, and runs until SIGTERM/SIGINT.

use std::path::PathBuf;

fn usage() -> ! {
    eprintln!("usage: pgwarden-testapi --kubeconfig FILE [--dir DIR] [--port N]");
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut kubeconfig, mut opts) = (None::<PathBuf>, pgwarden_testapi::Options::default());
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--kubeconfig" => kubeconfig = Some(PathBuf::from(val())),
            "--dir" => opts.dir = Some(PathBuf::from(val())),
            "--port" => opts.port = val().parse().unwrap_or_else(|_| usage()),
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
    drop(server);
}
