//! psql running one statement as `agent`, its stderr read line by line as it
//! arrives: psql prints a NOTICE the moment it comes, so a test can act on a
//! NOTICE (e.g. approve a held statement) while psql still waits.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::{libpq_command, APP_DATABASE};

/// psql running one statement; its stderr lines as they come.
pub struct PsqlSession {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl PsqlSession {
    /// Runs `sql` (ON_ERROR_STOP) as `agent` against 127.0.0.1:`port`.
    pub fn start(port: u16, sql: &str) -> PsqlSession {
        let mut child = libpq_command("psql", &[])
            .args(["-X", "-v", "ON_ERROR_STOP=1"])
            .arg(format!(
                "host=127.0.0.1 port={port} user=agent dbname={APP_DATABASE}"
            ))
            .args(["-c", sql])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("psql");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        PsqlSession {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first stderr line containing `words`; panics with everything psql
    /// said if none comes within `timeout`.
    pub fn wait_line(&mut self, words: &str, timeout: Duration) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.contains(words)) {
            return l.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(words) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "psql never said {words:?}; it said:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Success, stdout and all of stderr once it ends (within `timeout`).
    pub fn finish(mut self, timeout: Duration) -> (bool, String, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("psql wait") {
                break s;
            }
            assert!(Instant::now() < deadline, "psql did not finish");
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut out = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(500)) {
            self.seen.push(l);
        }
        (status.success(), out, self.seen.join("\n"))
    }
}
