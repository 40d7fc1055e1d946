//! The crate's error type, shared by the networks and the pipeline around them.

use std::path::PathBuf;

use crate::decode::DecodeError;

/// Everything that can go wrong inside the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input bytes are not an image we accept; the caller's fault (HTTP 4xx).
    #[error(transparent)]
    Decode(#[from] DecodeError),

    /// A value handed to the engine breaks one of its preconditions (tensor shape, empty image…).
    #[error("bad input: {0}")]
    BadInput(String),

    /// A tensor operation failed; a bug or a device problem, not the caller's fault.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),

    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A model file the selected variant needs is not in the model directory.
    #[error("model file not found: {}", .0.display())]
    ModelNotFound(PathBuf),

    #[error("{}: not a valid ONNX protobuf: {source}", path.display())]
    OnnxDecode {
        path: PathBuf,
        source: prost::DecodeError,
    },

    #[error("{}: invalid ONNX model: {msg}", path.display())]
    OnnxInvalid { path: PathBuf, msg: String },

    /// The ONNX graph does not have the layout the native port expects.
    #[error("{}: unexpected model structure: {msg}", path.display())]
    ModelStructure { path: PathBuf, msg: String },

    /// The detector and recogniser do not fit each other or the pipeline (e.g. the
    /// recogniser's class count differs from its dictionary).
    #[error("invalid model: {0}")]
    InvalidModel(String),

    /// The device cannot compute in the precision asked for (bf16 matmuls are GPU-only).
    #[error("{precision} is not supported on {device}: {hint}")]
    UnsupportedPrecision {
        precision: crate::engine::Precision,
        device: String,
        hint: &'static str,
    },
}

impl Error {
    /// True when the error comes from the request's content rather than from the server.
    pub fn is_client_error(&self) -> bool {
        matches!(self, Error::Decode(_))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
