//! The PP-OCR networks, ported natively to candle, with weights read from the ONNX exports.
//!
//! - [`DetModel`]: DBNet text detector (PPLCNetV4 + RepLKFPN, or PPLCNetV3 + stage projections +
//!   RSEFPN; DB head). Input `[n, 3, h, w]` f32 normalised as `(x / 255 - 0.5) / 0.5`, `h` and
//!   `w` multiples of 32; output the `[n, 1, h, w]` text probability map.
//! - [`RecModel`]: CTC text recogniser (PPLCNetV4 + light SVTR or conv neck, or PPLCNetV3 +
//!   SVTR encoder; linear head). Input `[n, 3, 48, w]` f32 normalised the same way; output
//!   `[n, t, classes]` softmax probabilities, `t = w / 8` (rounded down twice).
//!   [`RecModel::dictionary`] maps class ids to text: id 0 is the CTC blank (""), the last id is
//!   the space PaddleOCR appends.
//!
//! Supported exports (checked against onnxruntime in `tests/parity.rs`): PP-OCRv6 small and tiny
//! and PP-OCRv5 mobile, detector and recogniser each. All go through the same loader: the layer
//! layout (stem, blocks, SE, strides, stage taps, neck kind) is read from the graph (see
//! [`graph`]), and a graph that does not fit fails to load with
//! [`crate::Error::ModelStructure`] naming the node that did not match.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod det;
pub mod graph;
pub mod layers;
mod matmul;
pub mod pplcnet;
pub mod rec;

pub use det::DetModel;
pub use rec::RecModel;
