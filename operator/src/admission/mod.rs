//! The operator's admission webhooks (DESIGN §4 "Admission").

pub mod guard;
pub mod inject;
