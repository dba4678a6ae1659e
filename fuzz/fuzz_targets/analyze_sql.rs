//! Statement analysis on arbitrary SQL text: PostgreSQL's own parser
//! (libpg_query, C) and the walk over its tree, then the corpus policy's
//! verdict. A crash here is a crash of the gateway, so it runs where the
//! gateway runs it: on a thread with tokio's 2 MiB stack.
#![no_main]

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use pgwarden_sidecar::config::load_policies;
use pgwarden_sidecar::policy::{split, Gate, SessionState};

/// tokio's worker and blocking threads: where the gateway analyses.
const GATEWAY_STACK: usize = 2 * 1024 * 1024;

struct Worker {
    texts: Sender<String>,
    done: Receiver<()>,
}

fn worker() -> &'static Mutex<Worker> {
    static W: OnceLock<Mutex<Worker>> = OnceLock::new();
    W.get_or_init(|| {
        let policy = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../e2e/corpus/policy.yaml"
        ));
        let policies = load_policies(&[policy]).expect("the corpus policy loads");
        // Both analyser settings: with and without a pinned statement_timeout.
        let mut spec = policies[0].1.clone();
        let gates = [Gate::new(&spec, 64), {
            let limits = spec.limits.get_or_insert_with(Default::default);
            limits.statement_timeout = Some("5s".parse().expect("a duration"));
            Gate::new(&spec, 64)
        }];
        let (texts, rx) = channel::<String>();
        let (tx, done) = channel();
        std::thread::Builder::new()
            .name("analyze".into())
            .stack_size(GATEWAY_STACK)
            .spawn(move || {
                let mut session = SessionState::default();
                for sql in rx {
                    // Analysis and verdict as a session judges a text (one
                    // parse per input: libpg_query under ASan is the cost).
                    let gate = &gates[sql.len() % 2];
                    let _ = gate.judge(&sql, &mut session);
                    // `pgwarden check` splits a file into statements.
                    for piece in split::statements(&sql) {
                        let _ = piece.line(&sql);
                    }
                    if tx.send(()).is_err() {
                        return;
                    }
                }
            })
            .expect("the analysis thread starts");
        Mutex::new(Worker { texts, done })
    })
}

fuzz_target!(|data: &[u8]| {
    // Query texts reach the analyser as UTF-8 (the codec refuses the rest).
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let w = worker().lock().unwrap_or_else(|e| e.into_inner());
    w.texts
        .send(sql.to_owned())
        .expect("the analysis thread runs");
    w.done.recv().expect("the analysis thread answers");
});
