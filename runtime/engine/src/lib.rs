//! PP-OCR text detection and recognition implemented natively in Candle.

pub mod ctc;
pub mod decode;
pub mod engine;
pub mod error;
pub mod models;
pub mod onnx;
pub mod postprocess;
pub mod preprocess;
pub mod structure;

pub use engine::{Line, ModelVariant, OcrEngine, Page, PipelineConfig};
pub use error::{Error, Result};
