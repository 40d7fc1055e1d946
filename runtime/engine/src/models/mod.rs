//! The PP-OCR networks, ported natively to candle, with weights read from the ONNX exports.

pub mod det;
pub mod graph;
pub mod layers;
pub mod pplcnet;
pub mod rec;

pub use det::DetModel;
pub use rec::RecModel;
