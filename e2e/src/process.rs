//! A child process the test owns: killed on drop, its stdout and stderr in one
//! log file the test reads back (for assertions and failure messages).

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// A child killed on drop, its output in a file.
pub struct LoggedProcess {
    /// Public so a test can kill it early or read its pid.
    pub child: Child,
    log: PathBuf,
}

impl LoggedProcess {
    /// Spawns `cmd` with no stdin, `RUST_LOG=info` and no `KUBECONFIG` (each
    /// test names its own), stdout and stderr to `log`.
    pub fn spawn(mut cmd: Command, log: PathBuf) -> LoggedProcess {
        let f = fs::File::create(&log).expect("log file");
        let f2 = f.try_clone().expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(f2))
            .stderr(Stdio::from(f))
            .env("RUST_LOG", "info")
            .env_remove("KUBECONFIG");
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        LoggedProcess { child, log }
    }

    /// Everything it has written so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for LoggedProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
