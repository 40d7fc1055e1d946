//! Use cases shared by every front end: submitting a job (HTTP and gRPC) and
//! processing one (every worker mode).

pub mod input;
pub mod process;
pub mod submit;
pub mod sweeper;
