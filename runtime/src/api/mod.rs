//! Front ends: the HTTP API (axum) and, later, gRPC (tonic). Both call the
//! same use cases in `app`.

pub mod admission;
pub mod grpc;
pub mod http;
