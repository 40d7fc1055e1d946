//! The Candle OCR engine behind the worker's [`Recognize`] port.

use crate::app::process::{Recognize, RecognizeFailure};
use crate::config::ModelConfig;
use anyhow::Context;
use ocr_engine::decode::DecodeLimits;
use ocr_engine::{OcrEngine, Page};

pub struct CandleRecognizer {
    engine: OcrEngine,
}

impl CandleRecognizer {
    pub fn load(model: &ModelConfig) -> anyhow::Result<Self> {
        let variant = model.variant;
        let device = parse_device(&model.device)?;
        let engine = OcrEngine::load_as(variant, &model.dir, &device, model.precision)
            .with_context(|| {
                format!(
                    "loading {} weights from {} in {} (run scripts/fetch-models.sh to fetch them)",
                    model.variant,
                    model.dir.display(),
                    model.precision
                )
            })?;
        let mut pipeline = engine.config().clone();
        pipeline.det.limit_side_len = model.det_limit_side_len;
        pipeline.det.limit_type = model.det_limit_type;
        Ok(CandleRecognizer {
            engine: engine.with_config(pipeline),
        })
    }

    /// Decodes within the configured limits rather than the engine's own
    /// defaults, so what the API accepts is what the worker decodes.
    pub fn with_decode_limits(self, limits: DecodeLimits) -> Self {
        let mut pipeline = self.engine.config().clone();
        pipeline.decode = limits;
        CandleRecognizer {
            engine: self.engine.with_config(pipeline),
        }
    }

    pub fn engine(&self) -> &OcrEngine {
        &self.engine
    }
}

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> anyhow::Result<candle_core::Device> {
    match spec {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => open_cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => open_cuda(ordinal),
            _ => anyhow::bail!("device {other:?} is not cpu, cuda or cuda:N"),
        },
    }
}

/// The CUDA build loads the driver and cuBLAS at run time, and cudarc panics (with a list of
/// library names) where they are missing; this turns that into an error that says what to fix.
fn open_cuda(ordinal: usize) -> anyhow::Result<candle_core::Device> {
    if !cfg!(feature = "cuda") {
        anyhow::bail!(
            "model.device = cuda:{ordinal}, but this binary was built without CUDA \
             (build with `--features cuda`, or use the runtime-cuda image)"
        );
    }
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(|| candle_core::Device::new_cuda(ordinal));
    std::panic::set_hook(previous_hook);
    match opened {
        Ok(device) => device.with_context(|| format!("opening CUDA device {ordinal}")),
        Err(panic) => {
            let detail = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("no detail");
            anyhow::bail!(
                "model.device = cuda:{ordinal}, but the CUDA libraries could not be loaded \
                 (is the NVIDIA driver installed and are libcuda.so.1 and libcublas.so.13 on \
                 the library path?): {}",
                detail.lines().next().unwrap_or(detail)
            )
        }
    }
}

impl Recognize for CandleRecognizer {
    fn recognize_batch(&self, images: &[&[u8]]) -> Vec<Result<Page, RecognizeFailure>> {
        self.engine
            .recognize_batch(images)
            .into_iter()
            .map(|result| {
                result.map_err(|err| {
                    if err.is_client_error() {
                        RecognizeFailure::BadInput(err.to_string())
                    } else {
                        RecognizeFailure::Engine(err.to_string())
                    }
                })
            })
            .collect()
    }
}
