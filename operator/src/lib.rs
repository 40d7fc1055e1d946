//! Kubernetes operator for OCR pipelines (`OcrPipeline`, `ocr.serving.dev/v1alpha1`).
//!
//! Layout follows "pure core, thin shell", in the order of a reconcile:
//! `controller` dereferences (reads the pipeline, its objects and Secrets),
//! `validate` turns the spec into a `ValidPipeline`, `migration` plans the
//! step, `build` renders the desired objects (one module per object kind;
//! the runtime's configuration comes typed from `ocr-contract`), `controller`
//! applies them and deletes orphans, and `status` computes what to report.
//! `advisor` recommends an architecture from the signals `signals` reads.
//! Everything but `controller`, `kafka`, `leader`, `signals` and `run` is
//! pure and unit-tested; `metrics` and `run` make the binary.

pub mod advisor;
pub mod build;
pub mod controller;
pub mod crd;
pub mod kafka;
pub mod leader;
pub mod metrics;
pub mod migration;
pub mod run;
pub mod signals;
pub mod status;
pub mod validate;
