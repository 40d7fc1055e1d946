//! The OCR serving runtime: one binary, every role (API, worker, writer,
//! standalone). `domain` holds the rules, `app` the use cases, `storage`,
//! `queue` and `engine` the adapters, `api` the front ends.

pub mod api;
pub mod app;
pub mod config;
pub mod domain;
pub mod engine;
pub mod gpu;
pub mod health;
pub mod loadgen;
pub mod metrics;
pub mod notify;
pub mod queue;
pub mod roles;
pub mod standalone;
pub mod storage;
pub mod telemetry;
pub mod tls;
pub mod worker;
pub mod writer;
