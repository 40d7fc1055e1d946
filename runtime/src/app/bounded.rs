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
            let run = &images[run];
            match self.infer_run(run) {
                Ok(answered) => results.extend(answered),
                // One image that crashes the engine must not charge its
                // batch-mates an attempt: each is tried again alone, and only
                // the culprit fails (to be retried alone, then dead-lettered).
                Err(_) if run.len() > 1 => {
                    for image in run {
                        results.extend(
                            self.infer_run(std::slice::from_ref(image))
                                .unwrap_or_else(|reason| vec![Err(reason)]),
                        );
                    }
                }
                Err(reason) => results.push(Err(reason)),
            }
        }
        results
    }
}

impl BoundedEngine {
    /// One engine call, watched; a panic or a miscounted answer is an error.
    fn infer_run(
        &self,
        run: &[&[u8]],
    ) -> Result<Vec<Result<Page, RecognizeFailure>>, RecognizeFailure> {
        let _inferring = self.liveness.inference();
        let answered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.inner.recognize_batch(run)
        }))
        .map_err(|panic| {
            let detail = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("no detail");
            RecognizeFailure::Engine(format!("engine panicked: {detail}"))
        })?;
        if answered.len() == run.len() {
            Ok(answered)
        } else {
            Err(RecognizeFailure::Engine(format!(
                "engine returned {} results for {} images",
                answered.len(),
                run.len()
            )))
        }
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

    /// Recognises every image as its first byte, and panics on a 0xFF.
    struct Fussy;

    impl Recognize for Fussy {
        fn recognize_batch(&self, images: &[&[u8]]) -> Vec<Result<Page, RecognizeFailure>> {
            images
                .iter()
                .map(|image| {
                    assert_ne!(image[0], 0xFF, "the engine crashed on a poison image");
                    Ok(Page {
                        width: 1,
                        height: 1,
                        lines: Vec::new(),
                        text: image[0].to_string(),
                    })
                })
                .collect()
        }
    }

    #[test]
    fn an_image_that_crashes_the_engine_fails_alone() {
        let engine = BoundedEngine {
            inner: Arc::new(Fussy),
            max_batch_pixels: u64::MAX,
            limits: DecodeLimits::default(),
            liveness: Liveness::without_engine(),
        };
        let (good, poison, other): (&[u8], &[u8], &[u8]) = (&[1], &[0xFF], &[3]);
        let results = engine.recognize_batch(&[good, poison, other]);
        let texts: Vec<Result<String, RecognizeFailure>> = results
            .into_iter()
            .map(|r| r.map(|page| page.text))
            .collect();
        assert_eq!(texts[0], Ok("1".to_owned()));
        assert!(
            matches!(&texts[1], Err(RecognizeFailure::Engine(m)) if m.contains("poison")),
            "{:?}",
            texts[1]
        );
        assert_eq!(texts[2], Ok("3".to_owned()));
        assert!(engine.liveness.check().is_ok(), "no inference left running");
    }

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
