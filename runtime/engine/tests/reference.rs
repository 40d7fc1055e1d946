//! Agreement with rapidocr 3.10, from outputs saved by `scripts/engine_reference.py`.
//!
//! * `db_postprocess_matches_rapidocr`: our DB post-processing on the detector map rapidocr
//!   computed for `page_en.png` (quantised to 8 bits) gives the same boxes, in the same order.
//! * `full_pipeline_matches_rapidocr`: the whole engine with the real PP-OCRv6-small weights
//!   reads the page as rapidocr does. It needs the models (`OCR_MODEL_DIR` or
//!   `~/.cache/ocr-models`, see `scripts/fetch-models.sh`) and passes vacuously without them.
//!   With rapidocr's batching ([`PipelineConfig::rapidocr`]) texts and boxes are identical and
//!   confidences agree to 1e-3; with the default GPU batching the recogniser sees different
//!   padding, so only the confidences may move a little.
//!
//! Regenerate the data with `/work/venv-ocr/bin/python scripts/engine_reference.py
//! runtime/engine/tests/data` (rapidocr==3.10.0, onnxruntime, Pillow, DejaVu fonts).

use std::path::PathBuf;

use ocr_engine::engine::{default_model_dir, ModelVariant, OcrEngine, PipelineConfig};
use ocr_engine::postprocess::{boxes_from_map, DbParams};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(data("page_en_expected.json"))
        .expect("reference JSON is checked in");
    serde_json::from_str(&text).expect("reference JSON parses")
}

fn quad(v: &serde_json::Value) -> [[f32; 2]; 4] {
    let mut out = [[0.0; 2]; 4];
    for (i, p) in v
        .as_array()
        .expect("a box is a list of points")
        .iter()
        .enumerate()
        .take(4)
    {
        out[i] = [
            p[0].as_f64().unwrap_or(f64::NAN) as f32,
            p[1].as_f64().unwrap_or(f64::NAN) as f32,
        ];
    }
    out
}

fn max_corner_distance(a: &[[f32; 2]; 4], b: &[[f32; 2]; 4]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(p, q)| (p[0] - q[0]).abs().max((p[1] - q[1]).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn db_postprocess_matches_rapidocr() {
    let reference = expected();
    let db = &reference["db"];
    let map_img = image::open(data("page_en_det_map.png"))
        .expect("map PNG is checked in")
        .into_luma8();
    let (w, h) = map_img.dimensions();
    assert_eq!(
        (u64::from(w), u64::from(h)),
        (
            db["map_width"].as_u64().unwrap(),
            db["map_height"].as_u64().unwrap()
        )
    );
    let map: Vec<f32> = map_img
        .pixels()
        .map(|p| f32::from(p.0[0]) / 255.0)
        .collect();

    let boxes = boxes_from_map(
        &map,
        w as usize,
        h as usize,
        db["dest_width"].as_u64().unwrap() as u32,
        db["dest_height"].as_u64().unwrap() as u32,
        &DbParams::default(),
    );
    let want: Vec<[[f32; 2]; 4]> = db["boxes"].as_array().unwrap().iter().map(quad).collect();
    let scores: Vec<f64> = db["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_f64().unwrap())
        .collect();
    assert_eq!(
        boxes.len(),
        want.len(),
        "ours: {boxes:?}\nrapidocr: {want:?}"
    );
    for ((got, want), score) in boxes.iter().zip(&want).zip(&scores) {
        let d = max_corner_distance(&got.points, want);
        assert!(
            d <= 1.0,
            "box off by {d} px: ours {:?}, rapidocr {want:?}",
            got.points
        );
        assert!(
            (f64::from(got.score) - score).abs() < 0.01,
            "score {} vs {score}",
            got.score
        );
    }
}

/// The real v6-small weights; a missing download fails the test rather than
/// letting it pass without checking anything.
fn installed_engine() -> OcrEngine {
    let dir = default_model_dir();
    let variant = ModelVariant::V6Small;
    assert!(
        dir.join(variant.det_file()).is_file() && dir.join(variant.rec_file()).is_file(),
        "no {variant} weights in {}: run scripts/fetch-models.sh first",
        dir.display()
    );
    OcrEngine::load(variant, &dir, &candle_core::Device::Cpu).expect("models load")
}

/// Runs the page through `engine` and compares with rapidocr's output.
fn check_page(engine: &OcrEngine, max_box_px: f32, max_confidence_diff: f32) {
    let bytes = std::fs::read(data("page_en.png")).expect("page PNG is checked in");
    let page = engine.recognize(&bytes).expect("the page is readable");

    let reference = expected();
    let ocr = &reference["ocr"];
    let texts: Vec<&str> = ocr["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let got: Vec<&str> = page.lines.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(got, texts);
    // Boxes that share a visual row ("PAID" beside the invoice number, the two
    // columns) continue that row after a space instead of starting a new line.
    assert_eq!(
        page.text,
        "Invoice 2026-11-27 No. 48213 PAID\n\
         Total due: $1,234.56 (VAT incl.)\n\
         contact: billing@example.com\n\
         The quick brown fox jumps\n\
         Small print: terms apply within 30 days.\n\
         Left column Right column"
    );
    assert_eq!((page.width, page.height), (768, 736));
    for (line, want) in page.lines.iter().zip(ocr["boxes"].as_array().unwrap()) {
        let d = max_corner_distance(&line.polygon, &quad(want));
        assert!(d <= max_box_px, "{:?} off by {d} px from {want}", line.text);
    }
    for (line, want) in page.lines.iter().zip(ocr["scores"].as_array().unwrap()) {
        let want = want.as_f64().unwrap() as f32;
        eprintln!(
            "{:?}: confidence {} (rapidocr {want})",
            line.text, line.confidence
        );
        assert!(
            (line.confidence - want).abs() <= max_confidence_diff,
            "{:?}: {} vs {want}",
            line.text,
            line.confidence
        );
    }
}

#[test]
fn full_pipeline_matches_rapidocr() {
    let engine = installed_engine();
    // With rapidocr's batching, crops and inputs are the same, so only float noise remains.
    let engine = engine.with_config(PipelineConfig::rapidocr());
    check_page(&engine, 1.0, 0.001);
    // The default, GPU-sized batching pads lines differently; text and boxes must not change.
    let engine = engine.with_config(PipelineConfig::default());
    check_page(&engine, 1.0, 0.02);
}
