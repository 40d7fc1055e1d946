//! Forward-pass timing of the native networks.
//!
//!   cargo run --release -p ocr-engine --example bench_models [-- ITERS [DET_H DET_W [REC_N REC_W]]]
//!
//! Times the PP-OCRv6 small detector on 1x3x960x960 and the recogniser on 8x3x48x320 (or the
//! sizes given) with
//! fixed pseudo-random inputs, on the CPU (or the first CUDA device with `--features cuda`).
//! Weights come from $OCR_MODEL_DIR (default ~/.cache/ocr-models, see scripts/fetch-models.sh).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use ocr_engine::models::{DetModel, RecModel};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = |i: usize, default: usize| -> Result<usize, std::num::ParseIntError> {
        std::env::args().nth(i).map_or(Ok(default), |s| s.parse())
    };
    let iters = arg(1, 3)?;
    let (det_h, det_w) = (arg(2, 960)?, arg(3, 960)?);
    let (rec_n, rec_w) = (arg(4, 8)?, arg(5, 320)?);
    let dir = std::env::var_os("OCR_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/ocr-models")
        });
    let device = if cfg!(feature = "cuda") {
        Device::new_cuda(0)?
    } else {
        Device::Cpu
    };
    println!(
        "device: {device:?}, threads: {}",
        candle_core::utils::get_num_threads()
    );

    let det = DetModel::load(&dir.join("ppocrv6_small_det.onnx"), &device)?;
    let rec = RecModel::load(&dir.join("ppocrv6_small_rec.onnx"), &device)?;

    // Drawn on the CPU: random GPU tensors would need cuRAND, which the CUDA build leaves out.
    let det_in =
        Tensor::rand(-1f32, 1f32, (1, 3, det_h, det_w), &Device::Cpu)?.to_device(&device)?;
    let rec_in =
        Tensor::rand(-1f32, 1f32, (rec_n, 3, 48, rec_w), &Device::Cpu)?.to_device(&device)?;

    for (name, run) in [
        (
            format!("det 1x3x{det_h}x{det_w}"),
            &(|| det.forward(&det_in).map(|_| ())) as &dyn Fn() -> ocr_engine::Result<()>,
        ),
        (format!("rec {rec_n}x3x48x{rec_w} (top-1)"), &|| {
            rec.forward_top1(&rec_in).map(|_| ())
        }),
    ] {
        run()?; // warm-up (allocations, CUDA module loading)
        device.synchronize()?;
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t = Instant::now();
            run()?;
            device.synchronize()?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{name}: median {:.1} ms, min {:.1} ms over {iters} runs",
            times[times.len() / 2],
            times[0]
        );
    }
    Ok(())
}
