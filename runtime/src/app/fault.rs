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
    /// An engine call whose input contains [`CRASH_MARKER`] aborts the
    /// process, as a driver fault on one poisonous image would.
    CrashOnMarker,
}

/// The bytes that make [`Fault::CrashOnMarker`] abort (appended to an image,
/// where decoders ignore them).
pub const CRASH_MARKER: &[u8] = b"OCR-FAULT-CRASH";

impl Fault {
    pub fn from_env() -> Fault {
        match std::env::var("OCR_FAULT").as_deref() {
            Ok("exit-after-db-write") => Fault::ExitAfterDbWrite,
            Ok("hang-inference") => Fault::HangInference,
            Ok("crash-on-marker") => Fault::CrashOnMarker,
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

/// The engine under [`Fault::CrashOnMarker`]: `inner`, unless an image
/// carries the marker.
pub struct CrashingEngine(pub std::sync::Arc<dyn Recognize>);

impl Recognize for CrashingEngine {
    fn recognize_batch(&self, images: &[&[u8]]) -> Vec<Result<Page, RecognizeFailure>> {
        let poisoned = images.iter().any(|image| {
            image
                .windows(CRASH_MARKER.len())
                .any(|window| window == CRASH_MARKER)
        });
        if poisoned {
            tracing::error!("fault injection: an image crashes the process");
            std::process::abort();
        }
        self.0.recognize_batch(images)
    }
}
