//! Test harness: the real relay between a scripted client and a scripted
//! upstream over in-memory pipes — no PostgreSQL, no network.
//!
//! The upstream answers like a PostgreSQL server for the texts its `Script`
//! knows (rows or a command tag), rejects the refusal sentinel with a syntax
//! error quoting it as PostgreSQL does, and skips to Sync after an error in
//! the extended protocol. Everything it receives is kept, so a test can
//! prove what never reached the server.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use super::{End, Relay};
use crate::config::{GatewayConfig, LiveConfig, LoadOptions, PolicyConfig};
use crate::identity::{ClientTransport, Identity};
use crate::observe::Metrics;
use crate::session::server_settings::ServerSettings;
use crate::session::Login;
use crate::wire::codec::{self, TxStatus};
use crate::wire::conn::FrameBuf;
use crate::wire::{Direction, Limits};

/// Longest any one step may take: these tests run in milliseconds, so a
/// step this slow is a hang, not a slow machine.
const STEP: Duration = Duration::from_secs(5);

// === messages ===

/// One protocol message as read off a pipe.
#[derive(Debug, Clone)]
pub struct Msg {
    pub ty: u8,
    pub body: Vec<u8>,
}

impl Msg {
    /// The fields of an ErrorResponse or NoticeResponse by code.
    pub fn field(&self, code: u8) -> Option<String> {
        codec::notice_fields(&self.body)
            .ok()?
            .into_iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v)
    }

    /// A DataRow's values as text (None = NULL).
    pub fn row(&self) -> Vec<Option<String>> {
        codec::data_row(&self.body)
            .expect("a well-formed DataRow")
            .into_iter()
            .map(|v| v.map(|b| String::from_utf8_lossy(b).into_owned()))
            .collect()
    }

    /// Whether its body carries `text` anywhere.
    pub fn carries(&self, text: &str) -> bool {
        self.body.windows(text.len()).any(|w| w == text.as_bytes())
    }
}

/// The message type bytes, in order: the shape of a reply at a glance.
pub fn types(msgs: &[Msg]) -> String {
    msgs.iter().map(|m| m.ty as char).collect()
}

fn frame(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(ty);
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// What a client sends.
pub mod client {
    use super::{cstr, frame};

    pub fn query(sql: &str) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, sql);
        frame(b'Q', &b)
    }

    pub fn parse(statement: &str, sql: &str) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, statement);
        cstr(&mut b, sql);
        b.extend_from_slice(&0i16.to_be_bytes());
        frame(b'P', &b)
    }

    /// Bind with text parameters and text results.
    pub fn bind(portal: &str, statement: &str, params: &[&str]) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, portal);
        cstr(&mut b, statement);
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for p in params {
            b.extend_from_slice(&(p.len() as i32).to_be_bytes());
            b.extend_from_slice(p.as_bytes());
        }
        b.extend_from_slice(&0i16.to_be_bytes());
        frame(b'B', &b)
    }

    pub fn describe_portal(portal: &str) -> Vec<u8> {
        let mut b = vec![b'P'];
        cstr(&mut b, portal);
        frame(b'D', &b)
    }

    pub fn execute(portal: &str) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, portal);
        b.extend_from_slice(&0i32.to_be_bytes());
        frame(b'E', &b)
    }

    pub fn sync() -> Vec<u8> {
        frame(b'S', &[])
    }

    pub fn terminate() -> Vec<u8> {
        frame(b'X', &[])
    }
}

// === the scripted upstream ===

/// A result column: its name and, for a table column, where it comes from
/// (relation OID, attribute number) as RowDescription reports it.
#[derive(Debug, Clone)]
pub struct Column {
    pub name: &'static str,
    pub table: u32,
    pub attnum: i16,
}

/// What the scripted server answers to one statement text.
#[derive(Debug, Clone)]
pub enum Answer {
    /// A text-format result (every column `text`).
    Rows {
        columns: Vec<Column>,
        rows: Vec<Vec<Option<&'static str>>>,
    },
    Command(&'static str),
}

/// The statement texts the scripted server knows.
#[derive(Debug, Clone, Default)]
pub struct Script(HashMap<String, Answer>);

impl Script {
    pub fn rows(
        mut self,
        sql: &str,
        columns: Vec<Column>,
        rows: Vec<Vec<Option<&'static str>>>,
    ) -> Self {
        self.0
            .insert(sql.to_owned(), Answer::Rows { columns, rows });
        self
    }

    pub fn command(mut self, sql: &str, tag: &'static str) -> Self {
        self.0.insert(sql.to_owned(), Answer::Command(tag));
        self
    }
}

const TEXT_OID: u32 = 25;

fn put_row_description(columns: &[Column], out: &mut BytesMut) {
    let mut b = Vec::new();
    b.extend_from_slice(&(columns.len() as i16).to_be_bytes());
    for c in columns {
        cstr(&mut b, c.name);
        b.extend_from_slice(&c.table.to_be_bytes());
        b.extend_from_slice(&c.attnum.to_be_bytes());
        b.extend_from_slice(&TEXT_OID.to_be_bytes());
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
    }
    out.put_slice(&frame(b'T', &b));
}

fn put_tag(tag: &str, out: &mut BytesMut) {
    let mut b = Vec::new();
    cstr(&mut b, tag);
    out.put_slice(&frame(b'C', &b));
}

/// An error as the server words it.
fn put_server_error(code: &str, message: &str, out: &mut BytesMut) {
    let mut b = Vec::new();
    for (f, v) in [
        (b'S', "ERROR"),
        (b'V', "ERROR"),
        (b'C', code),
        (b'M', message),
    ] {
        b.push(f);
        cstr(&mut b, v);
    }
    b.push(0);
    out.put_slice(&frame(b'E', &b));
}

impl Answer {
    /// The result's description, as Describe of a portal answers it.
    fn describe(&self, out: &mut BytesMut) {
        match self {
            Answer::Rows { columns, .. } => put_row_description(columns, out),
            Answer::Command(_) => out.put_slice(&frame(b'n', &[])),
        }
    }

    /// Rows and completion, as Execute answers (no RowDescription).
    fn run(&self, out: &mut BytesMut) {
        match self {
            Answer::Rows { rows, .. } => {
                for r in rows {
                    codec::put_data_row(r.iter().map(|v| v.map(str::as_bytes)), out);
                }
                put_tag(&format!("SELECT {}", rows.len()), out);
            }
            Answer::Command(tag) => put_tag(tag, out),
        }
    }
}

/// The server's side of one session: answers what the relay forwards, and
/// reports every message it receives.
async fn serve_upstream(
    stream: DuplexStream,
    script: Script,
    received: mpsc::UnboundedSender<Msg>,
) {
    let (mut r, mut w) = tokio::io::split(stream);
    let mut statements: HashMap<String, String> = HashMap::new();
    let mut portals: HashMap<String, String> = HashMap::new();
    // After an error in the extended protocol, everything up to Sync is
    // discarded, as PostgreSQL does.
    let mut failed = false;
    let unknown = |sql: &str, out: &mut BytesMut| {
        if sql.starts_with("pgwarden_refused_") {
            // PostgreSQL's own wording, quoting the sentinel.
            put_server_error("42601", &format!("syntax error at or near \"{sql}\""), out);
        } else {
            put_server_error("XX000", "the scripted server does not know this text", out);
        }
    };
    while let Some(m) = read_msg(&mut r).await {
        let _ = received.send(m.clone());
        let mut out = BytesMut::new();
        let body = &m.body[..];
        match m.ty {
            b'X' => return,
            b'S' => {
                failed = false;
                codec::put_ready_for_query(TxStatus::Idle, &mut out);
            }
            _ if failed => {}
            b'Q' => {
                let sql = codec::query_text(body).unwrap_or_default();
                match script.0.get(sql) {
                    Some(a) => {
                        if let Answer::Rows { columns, .. } = a {
                            put_row_description(columns, &mut out);
                        }
                        a.run(&mut out);
                    }
                    None => unknown(sql, &mut out),
                }
                codec::put_ready_for_query(TxStatus::Idle, &mut out);
            }
            b'P' => {
                let p = codec::parse(body).expect("a well-formed Parse");
                if script.0.contains_key(p.query) {
                    statements.insert(p.statement.to_owned(), p.query.to_owned());
                    out.put_slice(&frame(b'1', &[]));
                } else {
                    unknown(p.query, &mut out);
                    failed = true;
                }
            }
            b'B' => {
                let (portal, statement) = codec::bind_names(body).expect("a well-formed Bind");
                match statements.get(statement) {
                    Some(sql) => {
                        portals.insert(portal.to_owned(), sql.clone());
                        out.put_slice(&frame(b'2', &[]));
                    }
                    None => {
                        put_server_error("26000", "prepared statement does not exist", &mut out);
                        failed = true;
                    }
                }
            }
            b'D' => {
                let (_, portal) = codec::describe(body).expect("a well-formed Describe");
                if let Some(a) = portals.get(portal).and_then(|sql| script.0.get(sql)) {
                    a.describe(&mut out);
                }
            }
            b'E' => {
                let portal = codec::execute_portal(body).expect("a well-formed Execute");
                if let Some(a) = portals.get(portal).and_then(|sql| script.0.get(sql)) {
                    a.run(&mut out);
                }
            }
            _ => {}
        }
        if w.write_all(&out).await.is_err() {
            return;
        }
    }
}

async fn read_msg<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Option<Msg> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head).await.ok()?;
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    let mut body = vec![0u8; usize::try_from(len).ok()?.checked_sub(4)?];
    r.read_exact(&mut body).await.ok()?;
    Some(Msg { ty: head[0], body })
}

// === the gateway side ===

/// A policy loaded from YAML the way `pgwarden run -f` loads it, with a
/// state directory for approvals.
pub struct Policy {
    pub config: Arc<PolicyConfig>,
    live: &'static LiveConfig,
    pub state_dir: tempfile::TempDir,
}

/// `spec` continues a DatabaseAccessPolicy's `spec:` (two-space indent)
/// after its identity and database.
pub fn policy(spec: &str) -> Policy {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("policy.yaml");
    let yaml = format!(
        "apiVersion: pgwarden.io/v1alpha1
kind: DatabaseAccessPolicy
metadata: {{name: relay, namespace: test}}
spec:
  identity: {{localTrust: {{subject: dev}}}}
  database: {{host: 127.0.0.1, port: 1, name: shop, credentialsSecret: cred}}
{spec}
---
apiVersion: v1
kind: Secret
metadata: {{name: cred, namespace: test}}
stringData: {{username: app, password: pw}}
"
    );
    std::fs::File::create(&file)
        .and_then(|mut f| f.write_all(yaml.as_bytes()))
        .expect("policy file written");
    let opts = LoadOptions {
        state_dir: Some(dir.path().to_owned()),
        ..LoadOptions::default()
    };
    let config: GatewayConfig = crate::config::load_files(&[file], &opts)
        .unwrap_or_else(|e| panic!("test policy refused: {e:?}"));
    let live: &'static LiveConfig = Box::leak(Box::new(LiveConfig::new(Some(config))));
    let config = live
        .current()
        .and_then(|c| c.policies.first().cloned())
        .expect("one policy");
    Policy {
        config,
        live,
        state_dir: dir,
    }
}

/// One session through the real relay.
pub struct Session {
    client: DuplexStream,
    pub metrics: &'static Metrics,
    /// Everything the scripted server received, in order.
    received: mpsc::UnboundedReceiver<Msg>,
    seen: Vec<Msg>,
    /// Kept open: a dropped sender would read as the gateway shutting down.
    _shutdown: tokio::sync::watch::Sender<bool>,
    relay: JoinHandle<End>,
    server: JoinHandle<()>,
}

impl Policy {
    /// Open a session to a scripted server that knows `script`.
    pub fn session(&self, script: Script) -> Session {
        let (client, client_far) = tokio::io::duplex(64 * 1024);
        let (upstream, upstream_far) = tokio::io::duplex(64 * 1024);
        let (tx, received) = mpsc::unbounded_channel();
        let server = tokio::spawn(serve_upstream(upstream_far, script, tx));
        let metrics: &'static Metrics = Box::leak(Box::new(Metrics::new()));
        let server_settings = ServerSettings::at_login([
            ("server_version", "15.4"),
            ("client_encoding", "UTF8"),
            ("standard_conforming_strings", "on"),
            ("integer_datetimes", "on"),
        ])
        .expect("login settings accepted");
        let policy = self.config.clone();
        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let relay = Relay {
            policy: policy.clone(),
            live: self.live,
            generation: self.live.generation(),
            login: Login {
                identity: Identity {
                    subject: "dev".into(),
                    method: "localTrust",
                    attributes: Vec::new(),
                    expires_at: None,
                },
                transport: ClientTransport {
                    peer: ([127, 0, 0, 1], 40000).into(),
                    tls: false,
                },
                token: None,
                os_user: None,
            },
            metrics,
            nonce: "00000000feedface".into(),
            status: TxStatus::Idle,
            max_rows: policy.spec.limits.as_ref().and_then(|l| l.max_rows),
            statement_timeout: None,
            cancel: None,
            shutdown: shutdown_rx,
            expires: None,
            masking: policy.masking.clone(),
            approvals: policy.approvals.clone(),
            subject: "dev".into(),
            interrupt: Arc::new(Notify::new()),
            log: None,
            limits: Limits::default(),
            server_settings,
            span: tracing::Span::none(),
        };
        let limits = Limits::default();
        let relay = tokio::spawn(relay.run(
            client_far,
            FrameBuf::new(Direction::Frontend, limits),
            upstream,
            FrameBuf::new(Direction::Backend, limits),
        ));
        Session {
            client,
            metrics,
            received,
            seen: Vec::new(),
            _shutdown: shutdown,
            relay,
            server,
        }
    }
}

impl Session {
    /// Send client messages, all in one write (a pipelining client).
    pub async fn send(&mut self, msgs: &[Vec<u8>]) {
        let all: Vec<u8> = msgs.concat();
        tokio::time::timeout(STEP, self.client.write_all(&all))
            .await
            .expect("the relay reads the client")
            .expect("the client pipe is open");
    }

    /// The next message the client reads.
    pub async fn next(&mut self) -> Msg {
        tokio::time::timeout(STEP, read_msg(&mut self.client))
            .await
            .expect("the client gets a message")
            .expect("the relay keeps the client's connection open")
    }

    /// What the client reads up to and including the next ReadyForQuery.
    pub async fn until_ready(&mut self) -> Vec<Msg> {
        let mut got = Vec::new();
        loop {
            let m = tokio::time::timeout(STEP, read_msg(&mut self.client))
                .await
                .unwrap_or_else(|_| panic!("no ReadyForQuery; so far: {}", types(&got)))
                .unwrap_or_else(|| panic!("the relay closed; so far: {}", types(&got)));
            let ready = m.ty == b'Z';
            got.push(m);
            if ready {
                return got;
            }
        }
    }

    /// Everything the server has received so far.
    pub fn received_so_far(&mut self) -> Vec<Msg> {
        while let Ok(m) = self.received.try_recv() {
            self.seen.push(m);
        }
        self.seen.clone()
    }

    /// End the session as a client does; how it ended, and everything the
    /// server received.
    pub async fn terminate(mut self) -> (End, Vec<Msg>) {
        self.send(&[client::terminate()]).await;
        self.ended().await
    }

    /// Wait for the relay to end by itself; how it ended, and everything
    /// the server received.
    pub async fn ended(mut self) -> (End, Vec<Msg>) {
        let end = tokio::time::timeout(STEP, &mut self.relay)
            .await
            .expect("the relay ends after Terminate")
            .expect("the relay task does not panic");
        let _ = tokio::time::timeout(STEP, &mut self.server).await;
        (end, self.received_so_far())
    }
}
