//! The engine's device check: agreement of the GPU with the CPU, and throughput per batch size
//! and precision, printed beside the PyTorch eager figures for the same weights on the same
//! card (`/work/shared/ocr-bench/results/gpu-anchor-*.log`).
//!
//!   cargo build --release -p ocr-engine --features cuda --example gpu_check
//!   gpu_check [MODEL_DIR [BENCH_DATA_DIR]]
//!
//! MODEL_DIR defaults to `$OCR_MODEL_DIR` (see `scripts/fetch-models.sh`), BENCH_DATA_DIR to
//! `$OCR_BENCH_DATA` (`scripts/make-bench-data.sh`); without bench data the page part is
//! skipped. `scripts/gpu-check.sh` runs this and the worker benchmark on a lent GPU.
//!
//! 1. Logits: the recogniser's and detector's outputs on fixed pseudo-random inputs, CUDA in
//!    each precision against the CPU in f32 (max abs difference, top-1 agreement).
//! 2. Pages: the 16 English pages of the OCR benchmark through the whole pipeline on the CPU
//!    and on CUDA in each precision: page CER, lines whose text differs from the CPU's, pages/s.
//! 3. Throughput: detector 3x960x736 at batch 1, 8, 32 and recogniser 3x48x320 at batch 1, 8,
//!    32, 128, per precision (f32 also with TF32 matmuls, f16 also without the engine's own
//!    CUDA kernels).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use ocr_engine::engine::{default_model_dir, ModelVariant, OcrEngine, Page, Precision};
use ocr_engine::models::{DetModel, RecModel};

#[path = "../tests/common/bench_metrics.rs"]
mod bench_metrics;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Deterministic uniform values in [-1, 1): the same input on every device and run.
fn pseudo_random(shape: &[usize], seed: u64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Share of `[n, t, c]` rows whose argmax agrees.
fn top1_agreement(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a: Vec<u32> = a
        .to_device(&Device::Cpu)?
        .argmax(2)?
        .flatten_all()?
        .to_vec1()?;
    let b: Vec<u32> = b
        .to_device(&Device::Cpu)?
        .argmax(2)?
        .flatten_all()?
        .to_vec1()?;
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    Ok(same as f64 / a.len().max(1) as f64)
}

/// Median milliseconds per call of `run` (after a warm-up), over at least 3 calls and 0.5 s.
fn time_ms(device: &Device, mut run: impl FnMut() -> Result<()>) -> Result<f64> {
    run()?;
    device.synchronize()?;
    let mut times = Vec::new();
    let started = Instant::now();
    while times.len() < 3 || (started.elapsed() < Duration::from_millis(500) && times.len() < 50) {
        let t = Instant::now();
        run()?;
        device.synchronize()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn set_tf32(on: bool) {
    #[cfg(feature = "cuda")]
    candle_core::cuda::set_gemm_reduced_precision_f32(on);
    #[cfg(not(feature = "cuda"))]
    let _ = on;
}

fn set_custom_kernels(on: bool) {
    #[cfg(feature = "cuda")]
    ocr_engine::models::cuda::set_enabled(on);
    #[cfg(not(feature = "cuda"))]
    let _ = on;
}

fn model_paths(dir: &Path) -> (PathBuf, PathBuf) {
    let v = ModelVariant::V6Small;
    (dir.join(v.det_file()), dir.join(v.rec_file()))
}

fn check_logits(dir: &Path, gpu: &Device) -> Result<()> {
    println!("\n== 1. outputs, CUDA vs CPU f32 (fixed pseudo-random inputs)");
    let (det_path, rec_path) = model_paths(dir);
    let rec_in = pseudo_random(&[8, 3, 48, 320], 1)?;
    let det_in = pseudo_random(&[1, 3, 640, 640], 2)?;
    let rec_cpu = RecModel::load(&rec_path, &Device::Cpu)?.forward_logits(&rec_in)?;
    let det_cpu = DetModel::load(&det_path, &Device::Cpu)?.forward(&det_in)?;
    let runs = [
        ("f32", Precision::F32, true),
        ("f16", Precision::F16, true),
        ("f16-generic", Precision::F16, false),
        ("bf16", Precision::Bf16, true),
    ];
    for (label, precision, custom) in runs {
        set_custom_kernels(custom);
        let dtype = ocr_engine::engine::dtype(precision);
        let outcome = (|| -> Result<(f32, f64, f32)> {
            let rec = RecModel::load_as(&rec_path, gpu, dtype)?;
            let logits = rec.forward_logits(&rec_in.to_device(gpu)?)?;
            let det = DetModel::load_as(&det_path, gpu, dtype)?;
            let map = det.forward(&det_in.to_device(gpu)?)?;
            Ok((
                max_abs_diff(&logits, &rec_cpu)?,
                top1_agreement(&logits, &rec_cpu)?,
                max_abs_diff(&map, &det_cpu)?,
            ))
        })();
        match outcome {
            Ok((rec_diff, agree, det_diff)) => println!(
                "  {label:>11}: rec logits max|diff| {rec_diff:.2e}, top-1 agreement {:.2} %; \
                 det map max|diff| {det_diff:.2e}",
                100.0 * agree
            ),
            Err(e) => println!("  {label:>11}: FAILED: {e}"),
        }
    }
    set_custom_kernels(true);
    Ok(())
}

fn read_pages(bench: &Path) -> Result<Vec<(bench_metrics::GtPage, Vec<u8>)>> {
    let docs = bench.join("docs");
    let mut out = Vec::new();
    for line in std::fs::read_to_string(docs.join("gt.jsonl"))?.lines() {
        if line.trim().is_empty() {
            continue;
        }
        let page: bench_metrics::GtPage = serde_json::from_str(line)?;
        if page.lang == "en" {
            let bytes = std::fs::read(docs.join(&page.file))?;
            out.push((page, bytes));
        }
    }
    Ok(out)
}

/// All pages through `engine`, 8 images per call (as tests/accuracy.rs): pages and seconds.
fn run_pages(engine: &OcrEngine, images: &[&[u8]]) -> Result<(Vec<Page>, f64)> {
    let started = Instant::now();
    let mut pages = Vec::new();
    for chunk in images.chunks(8) {
        for page in engine.recognize_batch(chunk) {
            pages.push(page?);
        }
    }
    Ok((pages, started.elapsed().as_secs_f64()))
}

fn check_pages(dir: &Path, bench: &Path, gpu: &Device) -> Result<()> {
    println!("\n== 2. the benchmark's English pages through the whole pipeline");
    let pages = read_pages(bench)?;
    let gt: Vec<bench_metrics::GtPage> = pages.iter().map(|(g, _)| g.clone()).collect();
    let images: Vec<&[u8]> = pages.iter().map(|(_, b)| b.as_slice()).collect();
    let cpu = OcrEngine::load(ModelVariant::V6Small, dir, &Device::Cpu)?;
    let (reference, cpu_s) = run_pages(&cpu, &images)?;
    let (page_cer, line_cer) = bench_metrics::score_pages(&gt, &reference);
    let cpu_lines: usize = reference.iter().map(|p| p.lines.len()).sum();
    println!(
        "  cpu  f32: page CER {:.3} %, line CER {:.3} %, {cpu_lines} lines, {:.2} pages/s \
         ({} threads)",
        100.0 * page_cer.cer(),
        100.0 * line_cer.cer(),
        images.len() as f64 / cpu_s,
        candle_core::utils::get_num_threads()
    );
    for precision in Precision::ALL {
        let outcome = (|| -> Result<String> {
            let engine = OcrEngine::load_as(ModelVariant::V6Small, dir, gpu, precision)?;
            run_pages(&engine, &images)?; // warm-up: kernels load, allocations settle
            let (predicted, secs) = run_pages(&engine, &images)?;
            let (page_cer, line_cer) = bench_metrics::score_pages(&gt, &predicted);
            let texts = |p: &[Page]| -> Vec<String> {
                p.iter()
                    .flat_map(|p| p.lines.iter().map(|l| l.text.clone()))
                    .collect()
            };
            let (ours, theirs) = (texts(&predicted), texts(&reference));
            let differing = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count()
                + ours.len().abs_diff(theirs.len());
            Ok(format!(
                "page CER {:.3} %, line CER {:.3} %, {} lines, {differing} differ from the CPU's, \
                 {:.2} pages/s",
                100.0 * page_cer.cer(),
                100.0 * line_cer.cer(),
                ours.len(),
                images.len() as f64 / secs
            ))
        })();
        match outcome {
            Ok(line) => println!("  cuda {precision:>4}: {line}"),
            Err(e) => println!("  cuda {precision:>4}: FAILED: {e}"),
        }
    }
    Ok(())
}

/// PyTorch eager on the same weights and card (ms per batch), from the anchor logs.
fn anchor(model: &str, precision: &str, batch: usize) -> Option<f64> {
    let h200 = [
        ("det", "f32", 1, 9.43),
        ("det", "f32", 8, 17.01),
        ("det", "f32", 32, 56.36),
        ("det", "f16", 1, 9.26),
        ("det", "f16", 8, 12.89),
        ("det", "f16", 32, 42.96),
        ("rec", "f32", 1, 13.23),
        ("rec", "f32", 8, 13.47),
        ("rec", "f32", 32, 14.04),
        ("rec", "f32", 128, 24.81),
        ("rec", "f16", 1, 10.53),
        ("rec", "f16", 8, 11.66),
        ("rec", "f16", 32, 15.04),
        ("rec", "f16", 128, 16.45),
    ];
    h200.iter()
        .find(|(m, p, b, _)| *m == model && *p == precision && *b == batch)
        .map(|r| r.3)
}

fn check_throughput(dir: &Path, gpu: &Device) -> Result<()> {
    println!("\n== 3. forward throughput (median ms per batch; PyTorch eager on an H200 beside)");
    println!(
        "  {:<4} {:<11} {:>5} {:>10} {:>11} {:>12} {:>9}",
        "net", "precision", "batch", "ms/batch", "items/s", "torch ms", "vs torch"
    );
    let (det_path, rec_path) = model_paths(dir);
    // (label, precision, TF32 matmuls, the engine's own CUDA kernels)
    let runs: [(&str, Precision, bool, bool); 5] = [
        ("f32", Precision::F32, false, true),
        ("f32+tf32", Precision::F32, true, true),
        ("f16", Precision::F16, false, true),
        ("f16-generic", Precision::F16, false, false),
        ("bf16", Precision::Bf16, false, true),
    ];
    for (label, precision, tf32, custom) in runs {
        set_tf32(tf32);
        set_custom_kernels(custom);
        let anchor_precision = if precision == Precision::F32 {
            "f32"
        } else {
            "f16"
        };
        let outcome = (|| -> Result<()> {
            let dtype = ocr_engine::engine::dtype(precision);
            let det = DetModel::load_as(&det_path, gpu, dtype)?;
            for batch in [1, 8, 32] {
                let x = pseudo_random(&[batch, 3, 960, 736], 3)?.to_device(gpu)?;
                let ms = time_ms(gpu, || Ok(det.forward(&x).map(|_| ())?))?;
                print_row(
                    "det",
                    label,
                    batch,
                    ms,
                    anchor("det", anchor_precision, batch),
                );
            }
            let rec = RecModel::load_as(&rec_path, gpu, dtype)?;
            for batch in [1, 8, 32, 128] {
                let x = pseudo_random(&[batch, 3, 48, 320], 4)?.to_device(gpu)?;
                let ms = time_ms(gpu, || Ok(rec.forward_top1(&x).map(|_| ())?))?;
                print_row(
                    "rec",
                    label,
                    batch,
                    ms,
                    anchor("rec", anchor_precision, batch),
                );
            }
            Ok(())
        })();
        if let Err(e) = outcome {
            println!("  {label}: FAILED: {e}");
        }
    }
    set_tf32(false);
    set_custom_kernels(true);
    Ok(())
}

fn print_row(net: &str, label: &str, batch: usize, ms: f64, torch: Option<f64>) {
    let (torch_ms, ratio) = match torch {
        Some(t) => (format!("{t:.2}"), format!("{:.2}x", t / ms)),
        None => ("-".into(), "-".into()),
    };
    println!(
        "  {net:<4} {label:<11} {batch:>5} {ms:>10.2} {:>11.1} {torch_ms:>12} {ratio:>9}",
        batch as f64 * 1e3 / ms
    );
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = args
        .first()
        .map(PathBuf::from)
        .unwrap_or_else(default_model_dir);
    let bench = args
        .get(1)
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("OCR_BENCH_DATA").map(PathBuf::from));
    let gpu = Device::new_cuda(0)?;
    println!(
        "gpu_check: models {}, CPU threads {}",
        dir.display(),
        candle_core::utils::get_num_threads()
    );
    check_logits(&dir, &gpu)?;
    match bench {
        Some(bench) if bench.join("docs/gt.jsonl").is_file() => check_pages(&dir, &bench, &gpu)?,
        _ => println!("\n== 2. skipped: no benchmark data (give BENCH_DATA_DIR)"),
    }
    check_throughput(&dir, &gpu)?;
    Ok(())
}
