//! The Candle OCR engine behind the worker's [`Recognize`] port.

use crate::app::process::{Recognize, RecognizeFailure};
use crate::config::{DetLimitType, ModelConfig};
use anyhow::Context;
use ocr_engine::preprocess::LimitType;
use ocr_engine::{ModelVariant, OcrEngine, Page};

pub struct CandleRecognizer {
    engine: OcrEngine,
}

impl CandleRecognizer {
    pub fn load(model: &ModelConfig) -> anyhow::Result<Self> {
        let variant: ModelVariant = model
            .variant
            .parse()
            .map_err(|e: String| anyhow::anyhow!("model variant: {e}"))?;
        let device = parse_device(&model.device)?;
        let engine = OcrEngine::load(variant, &model.dir, &device).with_context(|| {
            format!(
                "loading {} weights from {} (run scripts/fetch-models.sh to fetch them)",
                model.variant,
                model.dir.display()
            )
        })?;
        let mut pipeline = engine.config().clone();
        pipeline.det.limit_side_len = model.det_limit_side_len;
        pipeline.det.limit_type = match model.det_limit_type {
            DetLimitType::Min => LimitType::Min,
            DetLimitType::Max => LimitType::Max,
        };
        Ok(CandleRecognizer {
            engine: engine.with_config(pipeline),
        })
    }

    pub fn engine(&self) -> &OcrEngine {
        &self.engine
    }
}

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> anyhow::Result<candle_core::Device> {
    match spec {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => Ok(candle_core::Device::new_cuda(0)?),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => Ok(candle_core::Device::new_cuda(ordinal)?),
            _ => anyhow::bail!("device {other:?} is not cpu, cuda or cuda:N"),
        },
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
