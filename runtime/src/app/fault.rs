//! Test-only fault injection, read from `OCR_FAULT` at start-up. It lets the
//! crash-recovery tests put a real process in the exact state they need.

use super::process::{Recognize, RecognizeFailure};
use ocr_engine::Page;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    None,
    /// Exit the process right after the job row is written, before the publish.
    ExitAfterDbWrite,
    /// Every engine call blocks forever, as a wedged device would.
    HangInference,
}

impl Fault {
    pub fn from_env() -> Fault {
        match std::env::var("OCR_FAULT").as_deref() {
            Ok("exit-after-db-write") => Fault::ExitAfterDbWrite,
            Ok("hang-inference") => Fault::HangInference,
            _ => Fault::None,
        }
    }
}

/// The engine under [`Fault::HangInference`].
pub struct HungEngine;

impl Recognize for HungEngine {
    fn recognize_batch(&self, _images: &[&[u8]]) -> Vec<Result<Page, RecognizeFailure>> {
        tracing::warn!("fault injection: the engine call never returns");
        loop {
            std::thread::park();
        }
    }
}
