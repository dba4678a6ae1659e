//! Approvals in a live session: what the client half holds while a
//! reviewer decides. (What a released statement then did is `outcome`'s.)

use std::sync::Arc;
use std::time::Instant;

use crate::approval::request::Param;
use crate::masking::plan::MaskCtx;
use crate::wire::codec;

/// While a statement is held the client may go on sending; past this much
/// buffered input the proxy stops reading until the hold ends.
pub const MAX_BUFFERED_WHILE_HELD: usize = 1024 * 1024;

/// A prepared statement's text as judged (kept for statements that need
/// approval, and for all when the session is recorded).
#[derive(Debug)]
pub struct Need {
    pub sql: String,
    /// Some: it needs approval, because `approval required by rule "x": ...`.
    pub reason: Option<String>,
    /// It touches masked columns: its parameters are never shown.
    pub sensitive: bool,
    /// Parameter types the client declared in Parse.
    pub param_types: Vec<u32>,
    /// The rule that decided it (for the recording).
    pub rule: Option<String>,
    /// Forwarded only because its policy is in audit mode: what the rules
    /// would have done (for the recording).
    pub would: Option<Would>,
}

/// What an audit-mode policy's rules would have done with a statement the
/// gateway forwarded anyway.
#[derive(Clone, Debug)]
pub struct Would {
    /// `WouldDeny` or `WouldHold`.
    pub verdict: crate::recording::RecordedVerdict,
    /// The refusal or approval reason the rules gave (names the rule and
    /// the access, never a value).
    pub reason: String,
}

/// A portal bound to such a statement, with its parameters.
#[derive(Debug)]
pub struct HeldPortal {
    pub need: Arc<Need>,
    pub params: Vec<(i16, Option<Vec<u8>>)>,
    /// Parameter types (declared in Parse, or learnt from the server).
    pub types: Vec<u32>,
    /// The statement it was bound to, and the result formats asked for.
    pub statement: String,
    pub result_formats: Vec<i16>,
}

impl HeldPortal {
    pub fn new(need: Arc<Need>, bind: &codec::Bind<'_>, types: Vec<u32>) -> Self {
        HeldPortal {
            need,
            params: bind
                .params
                .iter()
                .map(|(f, v)| (*f, v.map(<[u8]>::to_vec)))
                .collect(),
            types,
            statement: bind.statement.to_owned(),
            result_formats: bind.result_formats.clone(),
        }
    }
}

pub enum HoldKind {
    /// A simple Query; its judgement's effects apply once it is released.
    Query {
        ctx: MaskCtx,
        judgement: Arc<crate::policy::Judgement>,
    },
    Execute {
        portal: String,
    },
}

/// One held client message.
pub struct Hold {
    pub kind: HoldKind,
    /// The message exactly as the client sent it: released unchanged.
    pub bytes: Vec<u8>,
    pub need: Arc<Need>,
    pub params: Vec<(i16, Option<Vec<u8>>)>,
    pub types: Vec<u32>,
    pub rule: Option<String>,
    /// Result columns when known in advance (see `outcome::Watch`).
    pub columns: Option<Arc<Vec<codec::Column>>>,
}

impl HeldPortal {
    /// Parameters as a recording shows them (sensitive ones masked).
    pub fn rendered_params(&self) -> Vec<Option<String>> {
        render(&self.need, &self.params, &self.types)
    }
}

fn refs<'a>(params: &'a [(i16, Option<Vec<u8>>)], types: &[u32]) -> Vec<Param<'a>> {
    params
        .iter()
        .enumerate()
        .map(|(i, (format, value))| Param {
            format: *format,
            type_oid: types.get(i).copied().unwrap_or(0),
            value: value.as_deref(),
        })
        .collect()
}

fn render(need: &Need, params: &[(i16, Option<Vec<u8>>)], types: &[u32]) -> Vec<Option<String>> {
    crate::approval::request::render_params(&refs(params, types), need.sensitive)
}

impl Hold {
    pub fn rendered_params(&self) -> Vec<Option<String>> {
        render(&self.need, &self.params, &self.types)
    }

    pub fn param_refs(&self) -> Vec<Param<'_>> {
        refs(&self.params, &self.types)
    }
}

/// Sleeps until the instant, or forever without one.
pub async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
