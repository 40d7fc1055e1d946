//! Front ends: the HTTP API (axum) and the gRPC API (tonic). Both call the
//! same use cases in `app`, admit requests through one budget and resolve
//! callers to tenants through one authenticator.

pub mod admission;
pub mod auth;
pub mod grpc;
pub mod http;
