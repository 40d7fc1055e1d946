//! Use cases shared by every front end: submitting a job (HTTP and gRPC),
//! processing one (direct modes), inferring and publishing (writer mode) and
//! persisting results (the writer role).

pub mod bounded;
pub mod crash_journal;
pub mod fault;
pub mod infer;
pub mod input;
pub mod persist;
pub mod process;
pub mod replay;
pub mod submit;
pub mod sweeper;
