//! Accuracy of the PP-OCRv6-small pipeline on the synthetic benchmark of
//! `/work/shared/ocr-bench` (`gen_bench.py`, default seed 1234), scored exactly as that
//! benchmark's `ocr_eval.py` scores rapidocr 3.10 on onnxruntime:
//!
//! * CER = Levenshtein edits / ground-truth characters (Unicode scalar values), summed over the
//!   items, after NFKC, folding curly quotes and en/em dashes, and collapsing whitespace.
//! * English pages (16 pages, 437 lines): *page CER* compares whole pages, the lines of both
//!   sides sorted top to bottom (`round(centre_y / 12)`, then left edge) and joined by spaces;
//!   *line CER* compares each ground-truth line with the predicted boxes whose centres fall
//!   inside it (grown by 25 % of its height on every side), left to right.
//! * English lines through det+rec (300 single-line images, `ocr_eval.py lines --line-det`):
//!   each image goes through detection (long side limited to 960, as the benchmark configures
//!   rapidocr for this mode) and recognition; the boxes' texts are joined left to right.
//!
//! Thresholds, with rapidocr's results on the same data (`results/SUMMARY.md`) in brackets:
//! page CER <= 0.25 % (0.16 %), page line CER <= 0.25 % (0.17 %), lines det+rec CER <= 1.6 %
//! (1.48 %).
//!
//! The data is not in the repository: `scripts/make-bench-data.sh` renders it into
//! `$OCR_BENCH_DATA` (default `${OCR_TOOLS_DIR:-~/.cache/ocr-serving}/ocr-bench-data`);
//! `scripts/test.sh` runs it first. Missing data or weights fail the tests.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ocr_engine::engine::{default_model_dir, ModelVariant, OcrEngine, Page, PipelineConfig};
use ocr_engine::preprocess::{DetParams, LimitType};

#[path = "common/bench_metrics.rs"]
mod bench_metrics;
use bench_metrics::{bbox, score_pages, Cer, GtPage};

const MAX_PAGE_CER: f64 = 0.0025;
const MAX_PAGE_LINE_CER: f64 = 0.0025;
const MAX_LINES_DET_REC_CER: f64 = 0.016;

/// Images per `recognize_batch` call: lets the recogniser batch lines across images.
const BATCH: usize = 8;

fn data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("OCR_BENCH_DATA").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let tools = std::env::var_os("OCR_TOOLS_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/ocr-serving")
        });
    tools.join("ocr-bench-data")
}

/// `dir/name`, failing the test with directions when the data set was not generated.
fn bench_file(name: &str) -> PathBuf {
    let dir = data_dir();
    let p = dir.join(name);
    assert!(
        dir.join(".complete").is_file() && p.is_file(),
        "benchmark data {} is missing: run scripts/make-bench-data.sh first \
         (it renders /work/shared/ocr-bench/gen_bench.py's set into $OCR_BENCH_DATA, \
         default ${{OCR_TOOLS_DIR:-~/.cache/ocr-serving}}/ocr-bench-data)",
        p.display()
    );
    p
}

fn engine(config: PipelineConfig) -> OcrEngine {
    let dir = default_model_dir();
    let variant = ModelVariant::V6Small;
    assert!(
        dir.join(variant.det_file()).is_file() && dir.join(variant.rec_file()).is_file(),
        "no {variant} weights in {}: run scripts/fetch-models.sh first",
        dir.display()
    );
    OcrEngine::load(variant, &dir, &candle_core::Device::Cpu)
        .expect("models load")
        .with_config(config)
}

/// OCR of `files` in batches of [`BATCH`]; any failed image fails the test.
fn recognize_files(engine: &OcrEngine, files: &[PathBuf]) -> Vec<Page> {
    let mut pages = Vec::with_capacity(files.len());
    for chunk in files.chunks(BATCH) {
        let bytes: Vec<Vec<u8>> = chunk
            .iter()
            .map(|f| std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display())))
            .collect();
        for (file, result) in chunk.iter().zip(engine.recognize_batch(&bytes)) {
            pages.push(result.unwrap_or_else(|e| panic!("{}: {e}", file.display())));
        }
    }
    pages
}

#[test]
fn english_pages_reach_rapidocr_accuracy() {
    let gt_path = bench_file("docs/gt.jsonl");
    let pages: Vec<GtPage> = std::fs::read_to_string(&gt_path)
        .expect("gt.jsonl reads")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("gt.jsonl line parses"))
        .filter(|p: &GtPage| p.lang == "en")
        .collect();
    assert_eq!(pages.len(), 16, "the benchmark has 16 English pages");
    let dir = gt_path.parent().expect("docs dir").to_path_buf();
    let files: Vec<PathBuf> = pages.iter().map(|p| dir.join(&p.file)).collect();

    let engine = engine(PipelineConfig::default());
    let started = Instant::now();
    let predicted = recognize_files(&engine, &files);
    let elapsed = started.elapsed();

    let (page_cer, line_cer) = score_pages(&pages, &predicted);

    println!(
        "v6-small, {} English pages ({} GT lines) in {:.1} s: page CER {:.3} % ({} / {} chars), \
         line CER {:.3} %, line accuracy {:.1} % [rapidocr 3.10: 0.16 %, 0.17 %, 95.2 %]",
        pages.len(),
        line_cer.items,
        elapsed.as_secs_f64(),
        100.0 * page_cer.cer(),
        page_cer.edits,
        page_cer.chars,
        100.0 * line_cer.cer(),
        100.0 * line_cer.accuracy(),
    );
    assert_eq!(line_cer.items, 437, "the English pages hold 437 lines");
    assert!(
        page_cer.cer() <= MAX_PAGE_CER,
        "page CER {:.3} % above {:.2} %",
        100.0 * page_cer.cer(),
        100.0 * MAX_PAGE_CER
    );
    assert!(
        line_cer.cer() <= MAX_PAGE_LINE_CER,
        "page line CER {:.3} % above {:.2} %",
        100.0 * line_cer.cer(),
        100.0 * MAX_PAGE_LINE_CER
    );
}

#[test]
fn english_lines_through_det_rec_reach_rapidocr_accuracy() {
    let gt_path = bench_file("lines_en/gt.tsv");
    let dir: &Path = gt_path.parent().expect("lines dir");
    // file, text, font, size_px, degradation ("L0:clean", "L1:rot0.3+blur0.4", ...)
    let rows: Vec<(String, String, String)> = std::fs::read_to_string(&gt_path)
        .expect("gt.tsv reads")
        .lines()
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert!(f.len() >= 5, "bad gt.tsv row {l:?}");
            (f[0].to_owned(), f[1].to_owned(), f[4][..2].to_owned())
        })
        .collect();
    assert_eq!(rows.len(), 300, "the benchmark has 300 English lines");
    let files: Vec<PathBuf> = rows.iter().map(|r| dir.join(&r.0)).collect();

    // `ocr_eval.py --line-det`: PaddleOCR's classic sizing; the default (short side grown to
    // 736) would turn a 40×600 line into 736×11000.
    let engine = engine(PipelineConfig {
        det: DetParams {
            limit_type: LimitType::Max,
            limit_side_len: 960,
            ..DetParams::default()
        },
        ..PipelineConfig::default()
    });
    let started = Instant::now();
    let predicted = recognize_files(&engine, &files);
    let elapsed = started.elapsed();

    let mut all = Cer::default();
    let mut by_level = [Cer::default(); 3];
    for ((_, gt, level), page) in rows.iter().zip(&predicted) {
        let mut boxes: Vec<(f64, &str)> = page
            .lines
            .iter()
            .map(|l| (bbox(&l.polygon)[0], l.text.as_str()))
            .collect();
        boxes.sort_by(|a, b| a.0.total_cmp(&b.0));
        let text = boxes.iter().map(|b| b.1).collect::<Vec<_>>().join(" ");
        all.add(gt, &text);
        let i = match level.as_str() {
            "L0" => 0,
            "L1" => 1,
            _ => 2,
        };
        by_level[i].add(gt, &text);
    }
    println!(
        "v6-small, {} English lines through det+rec in {:.1} s: CER {:.3} % ({} / {} chars), \
         line accuracy {:.1} %, CER L0/L1/L2 {:.2}/{:.2}/{:.2} % \
         [rapidocr 3.10: 1.48 %, 91.7 %, 0.30/1.30/3.58 %]",
        all.items,
        elapsed.as_secs_f64(),
        100.0 * all.cer(),
        all.edits,
        all.chars,
        100.0 * all.accuracy(),
        100.0 * by_level[0].cer(),
        100.0 * by_level[1].cer(),
        100.0 * by_level[2].cer(),
    );
    assert!(
        all.cer() <= MAX_LINES_DET_REC_CER,
        "lines det+rec CER {:.3} % above {:.2} %",
        100.0 * all.cer(),
        100.0 * MAX_LINES_DET_REC_CER
    );
}
