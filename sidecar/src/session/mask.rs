//! Masking in a live session: matching every result, error and notice from
//! the server to the statement it belongs to, so `masking::plan` applies the
//! right plan to it. Only sessions whose policy masks columns pay for this.
//!
//! The client half (`FrontMask`) sends one `Slot` per message that gets a
//! reply the proxy must attribute, in order, before the message goes
//! upstream; the server half (`BackMask`) consumes them as replies arrive.
//! Replies come in request order, an error skips the extended protocol to
//! Sync, and ReadyForQuery ends a Sync or Query: that is all the state needed.
//!
//! Extended protocol: after each Bind of a statement that reads masked data
//! the proxy adds its own `Describe portal`. Its reply (swallowed here)
//! gives the portal's exact columns and result formats, so a prepared
//! statement executed again and again without a Describe of the client's is
//! masked exactly the same, in text or binary.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::BytesMut;

use super::names::NameMap;
use crate::masking::plan::{self, MaskCtx, StatementMask};
use crate::masking::{Masking, Refusal, RowPlan};
use crate::policy::{Gate, Judgement};
use crate::wire::codec::{self, TxStatus};
use crate::wire::Limits;

/// A client message whose reply the server half must attribute.
#[derive(Debug)]
pub enum Slot {
    /// A simple Query (or a refusal sentinel sent as one): replies until 'Z'.
    Query(MaskCtx),
    Bind {
        portal: String,
        ctx: MaskCtx,
    },
    /// The proxy's own Describe of this portal: its reply is swallowed.
    InjectedDescribe(String),
    ClientDescribe,
    Execute(String),
    Sync,
    /// The last n Syncs sent went to a server in COPY FROM STDIN, which
    /// ignores them: they end no request.
    IgnoredSyncs(u64),
}

/// A pair of session halves sharing one session's masking state.
pub fn session_pair(masking: &Arc<Masking>, limits: Limits) -> (FrontMask, BackMask) {
    let inbox = Arc::new(Inbox::default());
    let ddl = Arc::new(AtomicBool::new(false));
    (
        FrontMask {
            masking: masking.clone(),
            slots: inbox.clone(),
            statements: NameMap::default(),
            ddl: ddl.clone(),
        },
        BackMask {
            masking: masking.clone(),
            limits,
            slots: inbox,
            queue: VecDeque::new(),
            portals: NameMap::default(),
            query: None,
            ddl,
        },
    )
}

/// Slots on their way from the client half to the server half. Both halves
/// run in one task, so the lock is never contended; a channel cost several
/// atomic operations and a waker per message (issue #21).
#[derive(Default)]
struct Inbox(Mutex<Vec<Slot>>);

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        // Nothing panics while holding it; a poisoned one is still whole.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Client half: remembers each prepared statement's masking context.
pub struct FrontMask {
    masking: Arc<Masking>,
    slots: Arc<Inbox>,
    statements: NameMap<MaskCtx>,
    /// A schema change went upstream: re-read the column map once it is
    /// committed (the server half sees ReadyForQuery outside a transaction).
    ddl: Arc<AtomicBool>,
}

impl FrontMask {
    /// The masking context of an allowed query text, or why masking cannot
    /// make it safe.
    pub fn context(&self, gate: &Gate, j: &Judgement) -> Result<MaskCtx, Refusal> {
        let Some(map) = self.masking.map() else {
            // Sessions start only with a map; never pass results unmasked.
            return Err(Refusal("the masking column map is not available".into()));
        };
        let user_code = gate.calls_user_code(j);
        let ctx = plan::memoized(j, &map, user_code, || {
            plan::statement_mask(&self.masking.rules, &map, &j.statements, user_code)
        })?;
        let changes_schema = j.statements.iter().any(|s| {
            s.accesses
                .iter()
                .any(|a| a.class == Some(pgwarden_api::StatementClass::Ddl))
        });
        if changes_schema {
            self.ddl.store(true, Ordering::Release);
        }
        Ok(ctx)
    }

    fn send(&self, slot: Slot) {
        self.slots.lock().push(slot);
    }

    pub fn query(&mut self, ctx: MaskCtx) {
        self.send(Slot::Query(ctx));
    }

    pub fn parsed(&mut self, statement: &str, ctx: MaskCtx) {
        self.statements.insert(statement.to_owned(), ctx);
    }

    /// A Parse the proxy refused: forget the name, so a later Bind to it
    /// (should the server still hold an older statement of that name) is
    /// masked as the worst case rather than as nothing.
    pub fn refused_parse(&mut self, statement: &str) {
        self.statements.remove(statement);
    }

    pub fn closed_statement(&mut self, statement: &str) {
        self.statements.remove(statement);
    }

    pub fn closed_all(&mut self) {
        self.statements.clear();
    }

    /// A Bind; true when the proxy must follow it with a Describe of the
    /// portal (`put_describe_portal`), already accounted for here.
    pub fn bind(&mut self, portal: &str, statement: &str) -> bool {
        let ctx = match self.statements.get(statement) {
            Some(ctx) => ctx.clone(),
            // Prepared with SQL PREPARE (same namespace): its text was
            // judged, but its masking is not known here; assume the worst.
            None => self
                .masking
                .map()
                .map(|map| Arc::new(StatementMask { map, tainted: true })),
        };
        let inject = ctx.is_some();
        self.send(Slot::Bind {
            portal: portal.to_owned(),
            ctx,
        });
        if inject {
            self.send(Slot::InjectedDescribe(portal.to_owned()));
        }
        inject
    }

    pub fn describe(&mut self) {
        self.send(Slot::ClientDescribe);
    }

    pub fn execute(&mut self, portal: &str) {
        self.send(Slot::Execute(portal.to_owned()));
    }

    pub fn sync(&mut self) {
        self.send(Slot::Sync);
    }

    pub fn ignored_syncs(&mut self, n: u64) {
        if n > 0 {
            self.send(Slot::IgnoredSyncs(n));
        }
    }
}

struct Portal {
    ctx: MaskCtx,
    plan: Option<RowPlan>,
}

/// What the server half does with one backend message.
#[derive(Debug, PartialEq, Eq)]
pub enum Disposition {
    Pass,
    /// The reply to the proxy's own Describe.
    Swallow,
    /// An error or notice of a statement that reads masked data.
    Scrub,
    /// A DataRow of the current simple query's result.
    QueryRow,
    /// A DataRow of this portal's result.
    PortalRow(String),
}

/// Server half: the slots in flight, each portal's plan.
pub struct BackMask {
    masking: Arc<Masking>,
    limits: Limits,
    slots: Arc<Inbox>,
    queue: VecDeque<Slot>,
    portals: NameMap<Portal>,
    query: Option<RowPlan>,
    ddl: Arc<AtomicBool>,
}

impl BackMask {
    /// Update the state for one backend message and say what to do with it.
    /// Err: the server's replies do not fit the requests; the session ends
    /// rather than risk passing a row unmasked.
    pub fn on_message(&mut self, ty: u8, body: &[u8]) -> Result<Disposition, String> {
        let mut inbox = self.slots.lock();
        for s in inbox.drain(..) {
            match s {
                // Take back the Syncs the server ignored: the latest ones.
                Slot::IgnoredSyncs(mut n) => {
                    let mut i = self.queue.len();
                    while n > 0 && i > 0 {
                        i -= 1;
                        if matches!(self.queue[i], Slot::Sync) {
                            self.queue.remove(i);
                            n -= 1;
                        }
                    }
                }
                s => self.queue.push_back(s),
            }
        }
        drop(inbox);
        let scan = !self.masking.rules.detectors().is_empty();
        Ok(match ty {
            b'2' => {
                while let Some(s) = self.queue.pop_front() {
                    if let Slot::Bind { portal, ctx } = s {
                        self.portals.insert(portal, Portal { ctx, plan: None });
                        break;
                    }
                }
                Disposition::Pass
            }
            b'T' | b'n' => match self.queue.front() {
                Some(Slot::InjectedDescribe(_)) => {
                    let Some(Slot::InjectedDescribe(portal)) = self.queue.pop_front() else {
                        unreachable!("front was checked");
                    };
                    let fields = if ty == b'T' {
                        codec::row_description(body).map_err(|e| format!("RowDescription: {e}"))?
                    } else {
                        Vec::new()
                    };
                    if let Some(p) = self.portals.get_mut(&portal) {
                        p.plan = p.ctx.as_ref().map(|c| RowPlan::new(c, &fields, scan));
                        if p.plan.as_ref().is_some_and(|pl| pl.saw_unknown) {
                            self.masking.refresh_soon(self.limits);
                        }
                    }
                    Disposition::Swallow
                }
                Some(Slot::ClientDescribe) => {
                    self.queue.pop_front();
                    Disposition::Pass
                }
                Some(Slot::Query(None)) => {
                    // Nothing of it is masked: no need to read the columns.
                    self.query = None;
                    Disposition::Pass
                }
                Some(Slot::Query(Some(ctx))) if ty == b'T' => {
                    let fields =
                        codec::row_description(body).map_err(|e| format!("RowDescription: {e}"))?;
                    self.query = Some(RowPlan::new(ctx, &fields, scan));
                    if self.query.as_ref().is_some_and(|pl| pl.saw_unknown) {
                        self.masking.refresh_soon(self.limits);
                    }
                    Disposition::Pass
                }
                _ => Disposition::Pass,
            },
            b'D' => match self.queue.front() {
                Some(Slot::Query(None)) => Disposition::Pass,
                Some(Slot::Query(Some(_))) => Disposition::QueryRow,
                Some(Slot::Execute(p)) => match self.portals.get(p) {
                    Some(Portal { ctx: None, .. }) => Disposition::Pass,
                    Some(Portal { plan: Some(_), .. }) => Disposition::PortalRow(p.clone()),
                    _ => return Err(format!("a row for portal {p:?} whose columns are unknown")),
                },
                _ => return Err("a row with no statement to attribute it to".into()),
            },
            b'C' | b'I' | b's' => {
                match self.queue.front() {
                    Some(Slot::Execute(_)) => {
                        self.queue.pop_front();
                    }
                    Some(Slot::Query(_)) => self.query = None,
                    _ => {}
                }
                Disposition::Pass
            }
            b'E' | b'N' => {
                let active = match self.queue.front() {
                    Some(Slot::Query(ctx)) | Some(Slot::Bind { ctx, .. }) => ctx.is_some(),
                    Some(Slot::Execute(p)) => self
                        .portals
                        .get(p)
                        .is_none_or(|portal| portal.ctx.is_some()),
                    _ => false,
                };
                if ty == b'E' && !matches!(self.queue.front(), Some(Slot::Query(_))) {
                    // The server skips the rest of the extended batch.
                    while self
                        .queue
                        .front()
                        .is_some_and(|s| !matches!(s, Slot::Sync | Slot::Query(_)))
                    {
                        self.queue.pop_front();
                    }
                }
                if active {
                    Disposition::Scrub
                } else {
                    Disposition::Pass
                }
            }
            b'Z' => {
                while let Some(s) = self.queue.pop_front() {
                    if matches!(s, Slot::Sync | Slot::Query(_)) {
                        break;
                    }
                }
                self.query = None;
                if codec::ready_for_query(body).is_ok_and(|s| s == TxStatus::Idle) {
                    // Outside a transaction block no portal survives.
                    self.portals.clear();
                    if self.ddl.swap(false, Ordering::AcqRel) {
                        self.masking.refresh_soon(self.limits);
                    }
                }
                Disposition::Pass
            }
            _ => Disposition::Pass,
        })
    }

    /// Write the client's version of a DataRow.
    pub fn mask_row(
        &self,
        d: &Disposition,
        bytes: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), String> {
        let plan = match d {
            Disposition::QueryRow => self.query.as_ref(),
            Disposition::PortalRow(p) => self.portals.get(p).and_then(|p| p.plan.as_ref()),
            _ => None,
        }
        .ok_or("a row with no plan")?;
        plan.mask_row(&self.masking.rules, self.masking.key.as_ref(), bytes, out)
    }
}
