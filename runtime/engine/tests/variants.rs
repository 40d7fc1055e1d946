//! Every model variant, loaded the way the service loads it (`OcrEngine::load` from the model
//! directory), reads the invoice fixture the runtime's own tests submit
//! (`runtime/tests/data/invoice.png`). Parity with onnxruntime is `tests/parity.rs`; this checks
//! the whole pipeline around each network, including the dictionary lookup.
//!
//! At the default detector scale (the short side brought up to 736 px, 3.5x for this 208 px
//! tall page) PP-OCRv5 mobile's detector separates the words of each line; onnxruntime gives
//! the same nine boxes, so that is the network, not the port. At the page's own scale it finds
//! the three lines, which `v5_mobile_finds_the_lines_at_native_scale` checks.
//!
//! The weights come from `scripts/fetch-models.sh`; missing weights fail the tests.

use std::path::Path;

use candle_core::Device;
use ocr_engine::engine::{
    default_model_dir, ModelVariant, OcrEngine, Page, PipelineConfig, Precision,
};
use ocr_engine::preprocess::{DetParams, LimitType};

/// What the invoice says, one entry per text line, top to bottom.
const INVOICE_LINES: [&str; 3] = [
    "Invoice 2026-11-27",
    "Total: 1,234.50 EUR",
    "Thank you for your order",
];

fn invoice() -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/invoice.png");
    std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn engine(variant: ModelVariant) -> OcrEngine {
    let dir = default_model_dir();
    assert!(
        dir.join(variant.det_file()).is_file() && dir.join(variant.rec_file()).is_file(),
        "no {variant} weights in {}: run scripts/fetch-models.sh first",
        dir.display()
    );
    OcrEngine::load(variant, &dir, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{variant} fails to load: {e}"))
}

fn words(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Reads the invoice and checks the words, in reading order, and every line's confidence.
fn read_invoice(variant: ModelVariant, config: PipelineConfig) -> Page {
    let page = engine(variant)
        .with_config(config)
        .recognize(&invoice())
        .unwrap_or_else(|e| panic!("{variant} fails on the invoice: {e}"));
    let lines: Vec<&str> = page.lines.iter().map(|l| l.text.as_str()).collect();
    println!("{variant}: {lines:?}");
    assert_eq!(
        words(&page.text),
        INVOICE_LINES.join(" "),
        "{variant} misreads the invoice"
    );
    for line in &page.lines {
        assert!(
            line.confidence > 0.9,
            "{variant}: {:?} read with confidence {}",
            line.text,
            line.confidence
        );
    }
    page
}

fn assert_lines(variant: ModelVariant, page: &Page) {
    let lines: Vec<String> = page.lines.iter().map(|l| words(&l.text)).collect();
    assert_eq!(
        lines, INVOICE_LINES,
        "{variant} splits the lines differently"
    );
}

#[test]
fn v6_small_reads_the_invoice() {
    let page = read_invoice(ModelVariant::V6Small, PipelineConfig::default());
    assert_lines(ModelVariant::V6Small, &page);
}

#[test]
fn v6_tiny_reads_the_invoice() {
    let page = read_invoice(ModelVariant::V6Tiny, PipelineConfig::default());
    assert_lines(ModelVariant::V6Tiny, &page);
}

#[test]
fn v5_mobile_reads_the_invoice() {
    read_invoice(ModelVariant::V5Mobile, PipelineConfig::default());
}

#[test]
fn v5_mobile_finds_the_lines_at_native_scale() {
    let config = PipelineConfig {
        det: DetParams {
            limit_side_len: 960,
            limit_type: LimitType::Max,
            ..DetParams::default()
        },
        ..PipelineConfig::default()
    };
    let page = read_invoice(ModelVariant::V5Mobile, config);
    assert_lines(ModelVariant::V5Mobile, &page);
}

/// Half precision runs the layers through candle's generic ops, the code path every
/// accelerator takes (the CPU's own kernels are f32 only), so this also checks, without a GPU,
/// that the CUDA build's layer plumbing reads the page: same lines, same words, boxes within
/// a pixel or two of f32's. (It found the phase-split conv failing off the CPU.)
#[test]
fn half_precision_reads_the_invoice_like_f32() {
    let dir = default_model_dir();
    let config = PipelineConfig {
        det: DetParams {
            limit_type: LimitType::Max,
            limit_side_len: 960,
            ..DetParams::default()
        },
        ..PipelineConfig::default()
    };
    let f32_page = OcrEngine::load(ModelVariant::V6Small, &dir, &Device::Cpu)
        .expect("f32 loads")
        .with_config(config.clone())
        .recognize(&invoice())
        .expect("f32 reads the invoice");
    for precision in [Precision::F16] {
        let page = OcrEngine::load_as(ModelVariant::V6Small, &dir, &Device::Cpu, precision)
            .unwrap_or_else(|e| panic!("{precision} fails to load: {e}"))
            .with_config(config.clone())
            .recognize(&invoice())
            .unwrap_or_else(|e| panic!("{precision} fails on the invoice: {e}"));
        println!("{precision}: {:?}", page.text);
        assert_lines(ModelVariant::V6Small, &page);
        assert_eq!(page.lines.len(), f32_page.lines.len());
        for (half, full) in page.lines.iter().zip(&f32_page.lines) {
            assert!(
                (half.confidence - full.confidence).abs() < 0.02,
                "{precision}: confidence {} vs f32 {} for {:?}",
                half.confidence,
                full.confidence,
                full.text
            );
            for (a, b) in half.polygon.iter().zip(&full.polygon) {
                let moved = (a[0] - b[0]).abs().max((a[1] - b[1]).abs());
                assert!(
                    moved <= 2.0,
                    "{precision}: a corner of {:?} moved {moved} px",
                    full.text
                );
            }
        }
    }
    // candle has no bf16 matmul on the CPU: refused at load, with the reason.
    let refused = OcrEngine::load_as(ModelVariant::V6Small, &dir, &Device::Cpu, Precision::Bf16)
        .err()
        .expect("bf16 on the CPU is refused");
    assert!(
        refused
            .to_string()
            .contains("bf16 is not supported on the CPU"),
        "{refused}"
    );
}
