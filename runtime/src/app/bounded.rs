//! The engine as every worker mode calls it: micro-batches bounded by pixels
//! as well as by count, and each engine call watched for [`crate::health`].
//!
//! A batch of eight 40-megapixel pages would need eight full-size decodes and
//! detector inputs at once; split into runs of at most `max_batch_pixels`,
//! the worker's memory follows the configured bound instead of the worst
//! case of `max_batch_size` × `limits.max_pixels`.

use super::process::{Recognize, RecognizeFailure};
use crate::health::Liveness;
use ocr_engine::decode::{probe, DecodeLimits};
use ocr_engine::Page;
use std::ops::Range;
use std::sync::Arc;

pub struct BoundedEngine {
    pub inner: Arc<dyn Recognize>,
    pub max_batch_pixels: u64,
    pub limits: DecodeLimits,
    pub liveness: Liveness,
}

impl Recognize for BoundedEngine {
    fn recognize_batch(&self, images: &[&[u8]]) -> Vec<Result<Page, RecognizeFailure>> {
        // An image whose header does not read fails in the engine at once, at no cost.
        let pixels: Vec<u64> = images
            .iter()
            .map(|bytes| {
                probe(bytes, &self.limits)
                    .map_or(0, |info| u64::from(info.width) * u64::from(info.height))
            })
            .collect();
        let mut results = Vec::with_capacity(images.len());
        for run in plan_runs(&pixels, self.max_batch_pixels) {
            let expected = run.len();
            let _inferring = self.liveness.inference();
            let answered = self.inner.recognize_batch(&images[run]);
            if answered.len() == expected {
                results.extend(answered);
            } else {
                let reason = format!(
                    "engine returned {} results for {expected} images",
                    answered.len()
                );
                results.extend(vec![Err(RecognizeFailure::Engine(reason)); expected]);
            }
        }
        results
    }
}

/// Consecutive runs covering every image in order, each adding up to at most
/// `budget` pixels; an image over the budget on its own is a run alone.
pub fn plan_runs(pixels: &[u64], budget: u64) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    let mut sum = 0u64;
    for (i, &p) in pixels.iter().enumerate() {
        if i > start && sum.saturating_add(p) > budget {
            runs.push(start..i);
            start = i;
            sum = 0;
        }
        sum = sum.saturating_add(p);
    }
    if start < pixels.len() {
        runs.push(start..pixels.len());
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn splits_where_the_budget_would_be_exceeded() {
        assert_eq!(plan_runs(&[], 10), Vec::<Range<usize>>::new());
        assert_eq!(plan_runs(&[3, 3, 3], 10), vec![0..3]);
        assert_eq!(plan_runs(&[6, 6, 6], 10), vec![0..1, 1..2, 2..3]);
        assert_eq!(plan_runs(&[4, 6, 25, 1, 9], 10), vec![0..2, 2..3, 3..5]);
        assert_eq!(plan_runs(&[0, 0, 0], 0), vec![0..3]);
    }

    proptest! {
        #[test]
        fn runs_cover_every_image_once_in_order_within_budget(
            pixels in prop::collection::vec(0u64..100, 0..40),
            budget in 1u64..150,
        ) {
            let runs = plan_runs(&pixels, budget);
            let mut next = 0;
            for run in &runs {
                prop_assert_eq!(run.start, next);
                prop_assert!(run.end > run.start);
                next = run.end;
                let sum: u64 = pixels[run.clone()].iter().sum();
                prop_assert!(sum <= budget || run.len() == 1, "{:?} sums to {}", run, sum);
            }
            prop_assert_eq!(next, pixels.len());
            // Greedy: no two neighbouring runs would fit together.
            for pair in runs.windows(2) {
                let joined: u64 = pixels[pair[0].start..pair[1].end].iter().sum();
                prop_assert!(joined > budget);
            }
        }
    }
}
