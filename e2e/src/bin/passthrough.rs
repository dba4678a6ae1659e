//! The floor under any tokio proxy: bytes copied between client and server
//! with no framing, no inspection and nothing recorded. `scripts/profile
//! --passthrough` runs it where it runs the gateway, so the difference
//! between the two is what pgwarden's inspection costs, and the rest is the
//! event loop's (issue #21).
//!
//!   passthrough LISTEN_ADDR UPSTREAM_ADDR     e.g. 127.0.0.1:6433 127.0.0.1:5432
//!
//! Built like the gateway: one thread (`new_current_thread`), TCP_NODELAY on
//! both sockets, one task per connection.

use std::process::ExitCode;

use tokio::net::{TcpListener, TcpStream};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream] = args.as_slice() else {
        eprintln!("usage: passthrough LISTEN_ADDR UPSTREAM_ADDR");
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("passthrough: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(listen, upstream.clone())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("passthrough: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(listen: &str, upstream: String) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (mut client, _) = listener.accept().await?;
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(&upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
    }
}
