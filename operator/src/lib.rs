//! Kubernetes operator for OCR pipelines (`OcrPipeline`, `ocr.serving.dev/v1alpha1`).
//!
//! Layout follows "pure core, thin shell": `crd` (types), `migration` (state
//! machine), `build` (spec → objects) and `status` are pure and unit-tested;
//! `controller` wires them to the API server; `leader`, `metrics` and `run`
//! make the binary.

pub mod build;
pub mod controller;
pub mod crd;
pub mod kafka;
pub mod leader;
pub mod metrics;
pub mod migration;
pub mod run;
pub mod status;
