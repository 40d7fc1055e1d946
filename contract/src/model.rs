//! Which model the workers run and how: the names the configuration, the
//! CRD and the model folder share.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The variable that names the model folder for the runtime (the default of
/// `model.dir`), the engine's tests and `scripts/fetch-models.sh`.
pub const MODEL_DIR_ENV: &str = "OCR_MODEL_DIR";

// The shipped PP-OCR model pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum ModelVariant {
    /// PP-OCRv6 small (rapidocr 3.10): the most accurate.
    #[default]
    #[serde(rename = "v6-small")]
    V6Small,
    /// PP-OCRv6 tiny: about 4x faster on a CPU, weaker on small text.
    #[serde(rename = "v6-tiny")]
    V6Tiny,
    /// PP-OCRv5 mobile.
    #[serde(rename = "v5-mobile")]
    V5Mobile,
}

impl ModelVariant {
    pub const ALL: [ModelVariant; 3] = [Self::V6Small, Self::V6Tiny, Self::V5Mobile];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::V6Small => "v6-small",
            Self::V6Tiny => "v6-tiny",
            Self::V5Mobile => "v5-mobile",
        }
    }

    fn stem(self) -> &'static str {
        match self {
            Self::V6Small => "ppocrv6_small",
            Self::V6Tiny => "ppocrv6_tiny",
            Self::V5Mobile => "ppocrv5_mobile",
        }
    }

    /// File name of the detector in the model folder, e.g. `ppocrv6_small_det.onnx`.
    pub fn det_file(self) -> String {
        format!("{}_det.onnx", self.stem())
    }

    /// File name of the recogniser in the model folder, e.g. `ppocrv6_small_rec.onnx`.
    pub fn rec_file(self) -> String {
        format!("{}_rec.onnx", self.stem())
    }

    /// Dictionary file used when the recogniser does not embed its character list,
    /// as `scripts/fetch-models.sh` names them (PP-OCRv6 small embeds its list).
    pub fn dict_file(self) -> &'static str {
        match self {
            Self::V6Small => "ppocrv6_small_dict.txt",
            Self::V6Tiny => "ppocrv6_tiny_dict.txt",
            Self::V5Mobile => "ppocrv5_dict.txt",
        }
    }
}

impl fmt::Display for ModelVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ModelVariant {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|v| v.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                format!("unknown model variant {s:?} (expected v6-small, v6-tiny or v5-mobile)")
            })
    }
}

// What the networks compute in. Half precision halves the memory traffic and
// runs the matmuls on a GPU's tensor cores; layer norms, the softmax and
// everything the post-processing reads stay f32. On the CPU only f32 has the
// engine's own kernels, and bf16 is refused there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats everywhere: the reference numbers, and the only fast choice on a CPU.
    #[default]
    F32,
    /// 16-bit floats: on a GPU the same page CER as f32 on the benchmark, and faster.
    F16,
    /// bfloat16: GPU only.
    Bf16,
}

impl Precision {
    pub const ALL: [Precision; 3] = [Self::F32, Self::F16, Self::Bf16];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("unknown precision {s:?} (expected f32, f16 or bf16)"))
    }
}

/// How the detector's input size is chosen from `det_limit_side_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DetLimitType {
    /// Grow the image until its short side reaches the limit (rapidocr's default).
    Min,
    /// Shrink the image until its long side fits the limit.
    Max,
}

/// `$OCR_MODEL_DIR`, else `~/.cache/ocr-models` (where `scripts/fetch-models.sh` puts them).
pub fn default_model_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(MODEL_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("ocr-models")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_text_and_serde() {
        for variant in ModelVariant::ALL {
            assert_eq!(variant.as_str().parse::<ModelVariant>(), Ok(variant));
            let quoted = format!("\"{variant}\"");
            assert_eq!(serde_json_like(&variant), quoted);
        }
        for precision in Precision::ALL {
            assert_eq!(precision.as_str().parse::<Precision>(), Ok(precision));
            assert_eq!(serde_json_like(&precision), format!("\"{precision}\""));
        }
        assert!("v7".parse::<ModelVariant>().is_err());
    }

    /// The TOML form of a bare value (`value = "..."`), without a JSON dependency.
    fn serde_json_like<T: Serialize>(value: &T) -> String {
        #[derive(Serialize)]
        struct Wrap<'a, T> {
            value: &'a T,
        }
        let text = toml::to_string(&Wrap { value }).expect("serialisable");
        text.trim().trim_start_matches("value = ").to_owned()
    }
}
