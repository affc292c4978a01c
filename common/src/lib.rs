//! Pieces shared by the controller, the agent and the CLI: the generated gRPC
//! code, domain types (ids, job states, repositories), input validation, job
//! environment composition, log offset arithmetic and token helpers.
//!
//! Architecture invariant: nothing here does I/O. It is pure code that every
//! other crate may depend on.

pub mod env;
pub mod ids;
pub mod job;
pub mod logs;
pub mod proto;
pub mod secrets;
pub mod token;
pub mod transport;
pub mod validate;

/// The build version of every Hobotnica binary (one workspace version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub mod duration;
