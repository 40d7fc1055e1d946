//! The OCR benchmark's scoring (`/work/shared/ocr-bench/ocr_eval.py`), shared by
//! `tests/accuracy.rs` and `examples/gpu_check.rs` so both score pages the same way.
#![allow(dead_code)]

use ocr_engine::engine::Page;
use unicode_normalization::UnicodeNormalization;

/// Python's `str.isspace` (what `re.sub(r"\s+", ...)` and `str.strip` use): Rust's
/// `char::is_whitespace` plus the information separators U+001C..U+001F.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `ocr_eval.norm`: NFKC, curly quotes and en/em dashes folded, whitespace runs collapsed to
/// one space, ends trimmed.
pub fn norm(s: &str) -> String {
    let folded: String = s
        .nfkc()
        .map(|c| match c {
            '\u{2018}' | '\u{2019}' => '\'',
            '\u{201c}' | '\u{201d}' => '"',
            '\u{2013}' | '\u{2014}' => '-',
            c => c,
        })
        .collect();
    let mut out = String::with_capacity(folded.len());
    for word in folded.split(py_space).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Cer {
    pub edits: usize,
    pub chars: usize,
    pub exact: usize,
    pub items: usize,
}

impl Cer {
    pub fn add(&mut self, gt: &str, pred: &str) {
        let (g, p) = (norm(gt), norm(pred));
        self.edits += strsim::levenshtein(&g, &p);
        self.chars += g.chars().count();
        self.exact += usize::from(g == p);
        self.items += 1;
    }

    pub fn cer(&self) -> f64 {
        self.edits as f64 / self.chars.max(1) as f64
    }

    pub fn accuracy(&self) -> f64 {
        self.exact as f64 / self.items.max(1) as f64
    }
}

/// Axis-aligned `[x0, y0, x1, y1]` around a predicted polygon, as `ocr_eval.py` takes it.
pub fn bbox(polygon: &[[f32; 2]; 4]) -> [f64; 4] {
    let xs = polygon.map(|p| f64::from(p[0]));
    let ys = polygon.map(|p| f64::from(p[1]));
    let min = |v: [f64; 4]| v.into_iter().fold(f64::INFINITY, f64::min);
    let max = |v: [f64; 4]| v.into_iter().fold(f64::NEG_INFINITY, f64::max);
    [min(xs), min(ys), max(xs), max(ys)]
}

/// Reading order of `run_docs`: `(round(centre_y / 12), x0)` with Python's round-half-even.
pub fn reading_key(b: &[f64; 4]) -> (i64, f64) {
    (((b[1] + b[3]) / 2.0 / 12.0).round_ties_even() as i64, b[0])
}

pub fn sorted_text(mut items: Vec<([f64; 4], &str)>) -> String {
    // A stable sort, like Python's `sorted`.
    items.sort_by(|a, b| {
        let (ka, kb) = (reading_key(&a.0), reading_key(&b.0));
        ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1))
    });
    items
        .into_iter()
        .map(|(_, t)| t)
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Clone, serde::Deserialize)]
pub struct GtPage {
    pub file: String,
    pub lang: String,
    pub lines: Vec<GtLine>,
}

#[derive(Clone, serde::Deserialize)]
pub struct GtLine {
    pub text: String,
    #[serde(rename = "box")]
    pub bbox: [f64; 4],
}

/// Page CER and page line CER of `predicted[i]` against `pages[i]`, as `ocr_eval.py docs`.
pub fn score_pages(pages: &[GtPage], predicted: &[Page]) -> (Cer, Cer) {
    let (mut page_cer, mut line_cer) = (Cer::default(), Cer::default());
    for (gt, pred) in pages.iter().zip(predicted) {
        let boxes: Vec<([f64; 4], &str)> = pred
            .lines
            .iter()
            .map(|l| (bbox(&l.polygon), l.text.as_str()))
            .collect();
        let gt_text = sorted_text(gt.lines.iter().map(|l| (l.bbox, l.text.as_str())).collect());
        page_cer.add(&gt_text, &sorted_text(boxes.clone()));

        for line in &gt.lines {
            let [x0, y0, x1, y1] = line.bbox;
            let m = 0.25 * (y1 - y0);
            let mut hits: Vec<(f64, usize, &str)> = boxes
                .iter()
                .enumerate()
                .filter(|(_, (b, _))| {
                    let (cx, cy) = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
                    x0 - m <= cx && cx <= x1 + m && y0 - m <= cy && cy <= y1 + m
                })
                .map(|(i, (b, t))| (b[0], i, *t))
                .collect();
            hits.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let text = hits.iter().map(|h| h.2).collect::<Vec<_>>().join(" ");
            line_cer.add(&line.text, &text);
        }
    }
    (page_cer, line_cer)
}

#[cfg(test)]
#[test]
fn metric_helpers_follow_ocr_eval() {
    assert_eq!(norm("  a\u{3000}\u{ff1a}b \t\n c  "), "a :b c");
    assert_eq!(
        norm("\u{201c}x\u{2019}s\u{201d} \u{2014} 1\u{2013}2"),
        "\"x's\" - 1-2"
    );
    let mut c = Cer::default();
    c.add("kitten", "sitting");
    c.add("ab", "ab");
    assert_eq!((c.edits, c.chars, c.exact), (3, 8, 1));
    // Python's round() rounds halves to even: centres 18 and 30 both give key 2.
    assert_eq!(reading_key(&[0.0, 12.0, 5.0, 24.0]).0, 2);
    assert_eq!(reading_key(&[0.0, 24.0, 5.0, 36.0]).0, 2);
    assert_eq!(
        sorted_text(vec![
            ([50.0, 100.0, 90.0, 120.0], "b"),
            ([10.0, 102.0, 40.0, 121.0], "a"),
            ([10.0, 10.0, 40.0, 30.0], "title"),
        ]),
        "title a b"
    );
}
