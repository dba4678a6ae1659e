//! ApprovalRequests in a cluster (DESIGN §2, §4 "Approvals in a cluster"):
//!
//! - `admission`: the decision webhooks (stamp who decided; refuse what
//!   may not happen), as pure functions.

pub mod admission;
