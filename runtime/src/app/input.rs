//! Checks on an uploaded image, done before anything is stored so that a
//! rejected request leaves no row and no blob.

use crate::config::LimitsConfig;
use ocr_engine::decode::{check, DecodeError, DecodeLimits, ImageFormat};

/// Why an upload was refused; each maps to one HTTP status.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    #[error("the request body is empty")]
    Empty,
    #[error("the body is {actual} bytes; the limit is {limit} bytes")]
    TooLarge { actual: usize, limit: usize },
    #[error("content type {0:?} is not accepted; send image/png, image/jpeg, image/tiff, image/webp or image/bmp (or application/octet-stream)")]
    UnsupportedContentType(String),
    #[error("content type says {declared} but the body is {actual}")]
    ContentTypeMismatch { declared: String, actual: String },
    #[error("the image is {width}x{height}; the limits are {max_pixels} pixels and {max_side} pixels per side")]
    TooManyPixels {
        width: u32,
        height: u32,
        max_pixels: u64,
        max_side: u32,
    },
    #[error("the body is not a supported image (PNG, JPEG, TIFF, WebP, BMP)")]
    NotAnImage,
    #[error("the image is damaged or truncated: {0}")]
    Corrupt(String),
}

impl InputError {
    pub fn http_status(&self) -> u16 {
        match self {
            InputError::TooLarge { .. } | InputError::TooManyPixels { .. } => 413,
            InputError::UnsupportedContentType(_) | InputError::ContentTypeMismatch { .. } => 415,
            InputError::Empty | InputError::NotAnImage | InputError::Corrupt(_) => 422,
        }
    }

    /// Stable machine-readable code for API clients.
    pub fn code(&self) -> &'static str {
        match self {
            InputError::Empty => "empty_body",
            InputError::TooLarge { .. } => "body_too_large",
            InputError::UnsupportedContentType(_) => "unsupported_content_type",
            InputError::ContentTypeMismatch { .. } => "content_type_mismatch",
            InputError::TooManyPixels { .. } => "image_too_large",
            InputError::NotAnImage => "not_an_image",
            InputError::Corrupt(_) => "corrupt_image",
        }
    }
}

fn declared_format(content_type: &str) -> Result<Option<ImageFormat>, InputError> {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "" | "application/octet-stream" => Ok(None),
        "image/png" => Ok(Some(ImageFormat::Png)),
        "image/jpeg" | "image/jpg" => Ok(Some(ImageFormat::Jpeg)),
        "image/tiff" => Ok(Some(ImageFormat::Tiff)),
        "image/webp" => Ok(Some(ImageFormat::WebP)),
        "image/bmp" => Ok(Some(ImageFormat::Bmp)),
        _ => Err(InputError::UnsupportedContentType(content_type.to_owned())),
    }
}

pub fn decode_limits(limits: &LimitsConfig) -> DecodeLimits {
    DecodeLimits {
        max_bytes: limits.max_body_bytes,
        max_pixels: limits.max_pixels,
        max_side: limits.max_side,
    }
}

/// Checks the header against the limits and the file's framing for
/// truncation and damage, without decoding pixels (see
/// [`ocr_engine::structure`]), and returns the content type to store. Costs
/// time in proportion to the body's bytes (a checksum pass over a PNG).
pub fn check_image(
    bytes: &[u8],
    content_type: &str,
    limits: &LimitsConfig,
) -> Result<&'static str, InputError> {
    if bytes.is_empty() {
        return Err(InputError::Empty);
    }
    if bytes.len() > limits.max_body_bytes {
        return Err(InputError::TooLarge {
            actual: bytes.len(),
            limit: limits.max_body_bytes,
        });
    }
    let declared = declared_format(content_type)?;
    let limits = decode_limits(limits);
    let map = |err: DecodeError| match err {
        DecodeError::Empty => InputError::Empty,
        DecodeError::UnsupportedFormat => InputError::NotAnImage,
        DecodeError::TooLarge {
            width,
            height,
            max_pixels,
            max_side,
        } => InputError::TooManyPixels {
            width,
            height,
            max_pixels,
            max_side,
        },
        DecodeError::TooManyBytes { len, max } => InputError::TooLarge {
            actual: len,
            limit: max,
        },
        other => InputError::Corrupt(other.to_string()),
    };
    let info = check(bytes, &limits).map_err(map)?;
    if let Some(declared) = declared {
        if declared != info.format {
            return Err(InputError::ContentTypeMismatch {
                declared: content_type.to_owned(),
                actual: info.format.to_mime_type().to_owned(),
            });
        }
    }
    Ok(info.format.to_mime_type())
}
