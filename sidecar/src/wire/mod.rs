//! Stage 1 of the data path: cutting bytes into messages and (de)coding the few
//! messages the proxy has to look inside.
//!
//! Everything that arrives from a peer is hostile until `frame` has checked its
//! length against a per-type cap and cut out exactly one message. Decoders in
//! `codec` then work on that one slice and reject anything left over.

pub mod codec;
pub mod conn;
pub mod frame;
pub mod pg_error;
pub mod values;

pub use frame::{Direction, Frame, FrameError, Limits};
pub use pg_error::{PgError, Severity, SqlState};
