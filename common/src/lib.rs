//! Pieces shared by the controller, the agent and the CLI: the generated gRPC
//! code, domain types (ids, job states, repositories), input validation, job
//! environment composition, log offset arithmetic, token helpers, and the
//! rules for private files and secret files.
//!
//! Architecture invariant: nothing here does I/O but `private_fs` (reading a
//! secret file, making files and directories private). The rest is pure code
//! that every other crate may depend on.

pub mod env;
pub mod ids;
pub mod job;
pub mod logging;
pub mod logs;
pub mod mask_forms;
pub mod metrics;
pub mod notifications;
pub mod private_fs;
pub mod proto;
pub mod secrets;
pub mod service_manager;
pub mod size;
pub mod token;
pub mod transport;
pub mod validate;

/// The build version of every Hobotnica binary (one workspace version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub mod duration;
