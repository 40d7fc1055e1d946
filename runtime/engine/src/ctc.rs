//! Greedy CTC decoding of the recogniser's per-timestep class probabilities.

/// Maps class indices to text. Class 0 is the CTC blank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtcDecoder {
    labels: Vec<String>,
}

/// One decoded line.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub text: String,
    /// Mean of the kept timesteps' top probabilities, 0 when nothing was kept. Each value is
    /// rounded to 5 decimals first, as the reference does, so scores compare exactly.
    pub confidence: f32,
}

impl CtcDecoder {
    /// `labels[i]` is the text of class `i`, with the blank at index 0.
    pub fn new(labels: Vec<String>) -> Self {
        Self { labels }
    }

    /// The PaddleOCR layout: the blank, the dictionary's characters, then a space.
    pub fn from_dictionary<S: AsRef<str>>(dictionary: &[S]) -> Self {
        let mut labels = Vec::with_capacity(dictionary.len() + 2);
        labels.push(String::new());
        labels.extend(dictionary.iter().map(|s| s.as_ref().to_owned()));
        labels.push(" ".to_owned());
        Self { labels }
    }

    /// Number of classes, blank included; must equal the network's output width.
    pub fn num_classes(&self) -> usize {
        self.labels.len()
    }

    /// Decodes one line from a row-major `timesteps × num_classes` probability matrix: take
    /// the most likely class per step, merge repeats, drop blanks. Rows are truncated or
    /// treated as blanks when `probs` is not a multiple of the class count.
    pub fn decode(&self, probs: &[f32], num_classes: usize) -> Decoded {
        if num_classes == 0 {
            return Decoded {
                text: String::new(),
                confidence: 0.0,
            };
        }
        self.decode_steps(probs.chunks_exact(num_classes).map(top1))
    }

    /// [`Self::decode`] from each timestep's most likely class and its probability, as
    /// `[class, probability]` pairs (the class index stored as f32), one per timestep.
    pub fn decode_top1(&self, steps: &[f32]) -> Decoded {
        self.decode_steps(
            steps
                .chunks_exact(2)
                .map(|s| (s[0].max(0.0) as usize, s[1])),
        )
    }

    fn decode_steps(&self, steps: impl Iterator<Item = (usize, f32)>) -> Decoded {
        let mut text = String::new();
        let mut conf_sum = 0.0f64;
        let mut kept = 0usize;
        let mut prev: Option<usize> = None;
        for (best, p) in steps {
            if best != 0 && prev != Some(best) {
                // Classes beyond the label table (a dictionary/model mismatch) decode to nothing
                // rather than panic; the engine checks the sizes once at load time.
                if let Some(label) = self.labels.get(best) {
                    text.push_str(label);
                }
                conf_sum += (f64::from(p) * 1e5).round() / 1e5;
                kept += 1;
            }
            prev = Some(best);
        }
        let confidence = if kept == 0 {
            0.0
        } else {
            ((conf_sum / kept as f64) * 1e5).round() / 1e5
        };
        Decoded {
            text,
            confidence: confidence as f32,
        }
    }
}

/// The most likely class of one timestep and its probability. The first maximum wins on ties,
/// as numpy's argmax.
pub fn top1(row: &[f32]) -> (usize, f32) {
    row.iter()
        .enumerate()
        .fold((0usize, f32::NEG_INFINITY), |acc, (i, &v)| {
            if v > acc.1 {
                (i, v)
            } else {
                acc
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One-hot-ish rows: class `c` gets `p`, the rest share the remainder.
    fn matrix(steps: &[(usize, f32)], classes: usize) -> Vec<f32> {
        let mut out = Vec::new();
        for &(c, p) in steps {
            let rest = (1.0 - p) / (classes - 1) as f32;
            out.extend((0..classes).map(|i| if i == c { p } else { rest }));
        }
        out
    }

    fn decoder() -> CtcDecoder {
        CtcDecoder::from_dictionary(&["a", "b", "c", "é", "中"])
    }

    #[test]
    fn layout_puts_blank_first_and_space_last() {
        let d = decoder();
        assert_eq!(d.num_classes(), 7);
        // 6 is the appended space.
        let m = matrix(&[(1, 0.9), (6, 0.8), (2, 0.7)], 7);
        assert_eq!(d.decode(&m, 7).text, "a b");
    }

    #[test]
    fn collapses_repeats_and_drops_blanks() {
        let d = decoder();
        // a a - a b b - - c : "aab c" → blank separates the repeated a.
        let steps = [
            (1, 0.9),
            (1, 0.8),
            (0, 0.99),
            (1, 0.7),
            (2, 0.6),
            (2, 0.9),
            (0, 0.9),
            (0, 0.9),
            (3, 0.5),
        ];
        let out = d.decode(&matrix(&steps, 7), 7);
        assert_eq!(out.text, "aabc");
        // Kept steps: 0 (0.9), 3 (0.7), 4 (0.6), 8 (0.5).
        assert!((out.confidence - 0.675).abs() < 1e-6, "{}", out.confidence);
    }

    #[test]
    fn multibyte_characters_and_empty_lines() {
        let d = decoder();
        let out = d.decode(&matrix(&[(4, 0.9), (0, 0.9), (5, 0.8)], 7), 7);
        assert_eq!(out.text, "é中");
        let empty = d.decode(&matrix(&[(0, 0.9), (0, 0.95)], 7), 7);
        assert_eq!(
            empty,
            Decoded {
                text: String::new(),
                confidence: 0.0
            }
        );
        assert_eq!(d.decode(&[], 7).text, "");
    }

    #[test]
    fn confidence_is_rounded_like_the_reference() {
        let d = decoder();
        let out = d.decode(&matrix(&[(1, 0.623_456_7), (2, 0.7)], 7), 7);
        // round(0.6234567, 5) = 0.62346; mean with 0.7 = 0.66173
        assert!(
            (out.confidence - 0.66173).abs() < 1e-7,
            "{}",
            out.confidence
        );
    }

    #[test]
    fn top1_pairs_decode_like_the_matrix() {
        let d = decoder();
        let steps = [(1, 0.9), (1, 0.8), (0, 0.99), (4, 0.7), (6, 0.6), (2, 0.5)];
        let pairs: Vec<f32> = steps.iter().flat_map(|&(c, p)| [c as f32, p]).collect();
        assert_eq!(d.decode_top1(&pairs), d.decode(&matrix(&steps, 7), 7));
    }

    #[test]
    fn out_of_range_class_decodes_to_nothing() {
        let d = CtcDecoder::new(vec![String::new(), "x".into()]);
        let out = d.decode(&matrix(&[(1, 0.9), (2, 0.95)], 3), 3);
        assert_eq!(out.text, "x");
    }
}
