//! OCR of image files with the whole pipeline, one JSON object per line on stdout:
//! `{"file": ..., "page": {...}}` or `{"file": ..., "error": ...}`.
//!
//!   cargo run --release -p ocr-engine --example ocr_files -- [--variant v6-small] [--batch N]
//!       [--rapidocr-batching] FILE...
//!
//! Models come from `$OCR_MODEL_DIR` (default `~/.cache/ocr-models`). All files given are
//! recognised as batches of `--batch` images (default 8), so this also exercises
//! `recognize_batch`. `--rapidocr-batching` recognises lines in rapidocr's batches of 6, for
//! exact comparisons with it. Timings go to stderr.

use std::time::Instant;

use candle_core::Device;
use ocr_engine::engine::{default_model_dir, ModelVariant, OcrEngine, PipelineConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut variant = ModelVariant::V6Small;
    let mut batch = 8usize;
    let mut rapidocr_batching = false;
    let mut files = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--variant" => variant = args.next().ok_or("--variant needs a value")?.parse()?,
            "--batch" => batch = args.next().ok_or("--batch needs a value")?.parse()?,
            "--rapidocr-batching" => rapidocr_batching = true,
            _ => files.push(arg),
        }
    }
    if files.is_empty() {
        return Err(
            "usage: ocr_files [--variant v6-small|v6-tiny|v5-mobile] [--batch N] [--rapidocr-batching] FILE...".into(),
        );
    }
    let device = if cfg!(feature = "cuda") {
        Device::new_cuda(0)?
    } else {
        Device::Cpu
    };
    let started = Instant::now();
    let mut engine = OcrEngine::load(variant, &default_model_dir(), &device)?;
    if rapidocr_batching {
        engine = engine.with_config(PipelineConfig::rapidocr());
    }
    eprintln!("loaded {variant} in {:?}", started.elapsed());

    for chunk in files.chunks(batch.max(1)) {
        let bytes: Vec<Vec<u8>> = chunk
            .iter()
            .map(|f| std::fs::read(f).unwrap_or_default())
            .collect();
        let started = Instant::now();
        let results = engine.recognize_batch(&bytes);
        eprintln!("{} images in {:?}", chunk.len(), started.elapsed());
        for (file, result) in chunk.iter().zip(results) {
            let line = match result {
                Ok(page) => serde_json::json!({ "file": file, "page": page }),
                Err(e) => serde_json::json!({ "file": file, "error": e.to_string() }),
            };
            println!("{line}");
        }
    }
    Ok(())
}
