//! Numeric parity of the native candle networks against onnxruntime: PP-OCRv6 small and tiny,
//! PP-OCRv5 mobile, detector and recogniser each.
//!
//! The references in `tests/data/*.npz` come from `scripts/make-engine-reference.py`. The
//! weights are not in the repository: `scripts/fetch-models.sh` puts them in
//! `$OCR_MODEL_DIR` (default `~/.cache/ocr-models`). A missing weight file fails the test on
//! purpose, so CI cannot pass without actually checking parity.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ocr_engine::models::{DetModel, RecModel};

/// Largest absolute difference tolerated between candle and onnxruntime.
const TOLERANCE: f32 = 1e-3;

fn model_dir() -> PathBuf {
    match std::env::var_os("OCR_MODEL_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            home.join(".cache/ocr-models")
        }
    }
}

fn model_path(name: &str) -> PathBuf {
    let p = model_dir().join(name);
    assert!(
        p.is_file(),
        "model weights {} are missing: run scripts/fetch-models.sh first \
         (it downloads them into $OCR_MODEL_DIR, default ~/.cache/ocr-models)",
        p.display()
    );
    p
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    Tensor::read_npz(&p)
        .unwrap_or_else(|e| {
            panic!(
                "reading {}: {e} (regenerate with scripts/make-engine-reference.py)",
                p.display()
            )
        })
        .into_iter()
        .collect()
}

fn get<'a>(data: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    data.get(key)
        .unwrap_or_else(|| panic!("reference has no array {key}"))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff")
}

fn input(key: &str) -> Tensor {
    let data = reference("inputs.npz");
    get(&data, key).to_dtype(DType::F32).expect("input")
}

fn check_det(model_file: &str, reference_file: &str) {
    let data = reference(reference_file);
    let want = get(&data, "prob");
    let model = DetModel::load(&model_path(model_file), &Device::Cpu).expect("load det");
    let got = model.forward(&input("det")).expect("det forward");
    let diff = max_abs_diff(&got, want);
    println!("{model_file}: max abs diff {diff:e} over {:?}", got.dims());
    assert!(
        diff <= TOLERANCE,
        "{model_file} differs from onnxruntime by {diff}"
    );
}

fn check_rec(model: &RecModel, model_file: &str, reference_file: &str) {
    let data = reference(reference_file);
    let shape: Vec<usize> = get(&data, "shape")
        .to_vec1::<i32>()
        .expect("shape")
        .into_iter()
        .map(|v| v as usize)
        .collect();
    let coords = get(&data, "coords").to_vec2::<i32>().expect("coords");
    let values = get(&data, "values").to_vec1::<f32>().expect("values");

    let got = model.forward(&input("rec")).expect("rec forward");
    assert_eq!(got.dims(), shape.as_slice());

    // Rebuild the reference densely, with the entries below the sparse threshold (1e-4) as 0.
    // Where the reference is 0 the measured difference is candle's own value, and the true
    // difference is at most max(that, 1e-4), so the bound below covers the whole output.
    let (n, t, c) = (shape[0], shape[1], shape[2]);
    let mut dense = vec![0f32; n * t * c];
    for (xyz, v) in coords.iter().zip(&values) {
        let [i, j, k] = [xyz[0] as usize, xyz[1] as usize, xyz[2] as usize];
        dense[(i * t + j) * c + k] = *v;
    }
    let want = Tensor::from_vec(dense, (n, t, c), &Device::Cpu).expect("dense");
    let diff = max_abs_diff(&got, &want);
    println!("{model_file}: max abs diff {diff:e} over {:?}", got.dims());
    assert!(
        diff <= TOLERANCE,
        "{model_file} differs from onnxruntime by {diff}"
    );

    // The dictionary follows PaddleOCR's CTC convention and decodes the rendered lines.
    let dict = model.dictionary();
    assert_eq!(dict.len(), c);
    assert_eq!(dict[0], "");
    assert_eq!(dict[c - 1], " ");
    let ids = got
        .argmax(2)
        .expect("argmax")
        .to_vec2::<u32>()
        .expect("ids");
    let texts: Vec<String> = ids
        .iter()
        .map(|row| {
            let mut s = String::new();
            let mut prev = 0u32;
            for &i in row {
                if i != 0 && i != prev {
                    s.push_str(&dict[i as usize]);
                }
                prev = i;
            }
            s
        })
        .collect();
    assert_eq!(texts, vec!["Parity 2025", "hello candle"]);
}

#[test]
fn det_v6_small_matches_onnxruntime() {
    check_det("ppocrv6_small_det.onnx", "det_v6_small.npz");
}

#[test]
fn det_v6_tiny_matches_onnxruntime() {
    check_det("ppocrv6_tiny_det.onnx", "det_v6_tiny.npz");
}

#[test]
fn rec_v6_small_matches_onnxruntime() {
    let file = "ppocrv6_small_rec.onnx";
    let model = RecModel::load(&model_path(file), &Device::Cpu).expect("load rec");
    check_rec(&model, file, "rec_v6_small.npz");
}

#[test]
fn rec_v6_tiny_matches_onnxruntime() {
    let file = "ppocrv6_tiny_rec.onnx";
    let model = RecModel::load_with_dictionary(
        &model_path(file),
        &model_path("ppocrv6_tiny_dict.txt"),
        &Device::Cpu,
    )
    .expect("load rec");
    check_rec(&model, file, "rec_v6_tiny.npz");
}

#[test]
fn det_v5_mobile_matches_onnxruntime() {
    check_det("ppocrv5_mobile_det.onnx", "det_v5_mobile.npz");
}

#[test]
fn rec_v5_mobile_matches_onnxruntime() {
    let file = "ppocrv5_mobile_rec.onnx";
    let model = RecModel::load(&model_path(file), &Device::Cpu).expect("load rec");
    check_rec(&model, file, "rec_v5_mobile.npz");
}
