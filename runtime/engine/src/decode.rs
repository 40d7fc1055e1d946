//! Untrusted bytes → RGB pixels, with limits checked before any large allocation.
//!
//! The API calls [`check`] to answer 4xx cheaply (the header and the file's framing, never the
//! pixels), and the engine calls [`decode`], which runs the same limits and then decodes,
//! applies the EXIF orientation and flattens alpha the way the reference pipeline (rapidocr)
//! does.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

pub use image::ImageFormat;

/// Bounds on what [`probe`] and [`decode`] accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DecodeLimits {
    /// Largest accepted encoded size in bytes.
    pub max_bytes: usize,
    /// Largest accepted `width * height`, read from the header before decoding.
    pub max_pixels: u64,
    /// Largest accepted width or height: very thin images pass the pixel check but still
    /// blow up the detector's resize, whose short side is scaled up to 736.
    pub max_side: u32,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_bytes: 32 * 1024 * 1024,
            max_pixels: 40_000_000,
            max_side: 16_384,
        }
    }
}

/// What the header says, after EXIF orientation (a 90° rotation swaps width and height).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
    pub orientation: Orientation,
}

/// Why some bytes were refused. Every variant is the client's fault, so the HTTP layer maps
/// all of them to a 4xx (413 for the size ones, 415 for the format, 400 otherwise).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty input")]
    Empty,
    #[error("input is {len} bytes, more than the limit of {max}")]
    TooManyBytes { len: usize, max: usize },
    #[error("unsupported or unrecognised image format (accepted: PNG, JPEG, TIFF, WebP, BMP)")]
    UnsupportedFormat,
    #[error(
        "image is {width}x{height}, over the limit of {max_pixels} pixels or {max_side} per side"
    )]
    TooLarge {
        width: u32,
        height: u32,
        max_pixels: u64,
        max_side: u32,
    },
    #[error("image has a zero width or height")]
    ZeroSize,
    #[error("image data is truncated")]
    Truncated,
    #[error("malformed image: {0}")]
    Malformed(String),
    #[error("unsupported image feature: {0}")]
    UnsupportedFeature(String),
}

impl DecodeError {
    /// The HTTP status the runtime should answer with.
    pub fn http_status(&self) -> u16 {
        match self {
            DecodeError::TooManyBytes { .. } | DecodeError::TooLarge { .. } => 413,
            DecodeError::UnsupportedFormat | DecodeError::UnsupportedFeature(_) => 415,
            _ => 400,
        }
    }
}

const ACCEPTED: [ImageFormat; 5] = [
    ImageFormat::Png,
    ImageFormat::Jpeg,
    ImageFormat::Tiff,
    ImageFormat::WebP,
    ImageFormat::Bmp,
];

/// Reads the header only and checks every limit.
pub fn probe(bytes: &[u8], limits: &DecodeLimits) -> Result<ImageInfo, DecodeError> {
    let (info, _) = open(bytes, limits)?;
    Ok(info)
}

/// Reads the header, checks every limit, then walks the file's framing (chunk lengths and
/// checksums, markers, declared sizes) without decoding a pixel: what the API runs on an
/// upload, at a cost proportional to its bytes rather than its pixels.
pub fn check(bytes: &[u8], limits: &DecodeLimits) -> Result<ImageInfo, DecodeError> {
    let info = probe(bytes, limits)?;
    crate::structure::check_framing(bytes, info.format).map_err(|err| match err {
        crate::structure::StructureError::Truncated => DecodeError::Truncated,
        crate::structure::StructureError::Malformed(what) => DecodeError::Malformed(what),
    })?;
    Ok(info)
}

/// Decodes to 8-bit RGB with the EXIF orientation applied and transparency flattened.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, DecodeError> {
    let (info, decoder) = open(bytes, limits)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(map_image_error)?;
    image.apply_orientation(info.orientation);
    Ok(flatten_to_rgb(image))
}

fn open<'a>(
    bytes: &'a [u8],
    limits: &DecodeLimits,
) -> Result<(ImageInfo, Box<dyn ImageDecoder + 'a>), DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    if bytes.len() > limits.max_bytes {
        return Err(DecodeError::TooManyBytes {
            len: bytes.len(),
            max: limits.max_bytes,
        });
    }
    let format = image::guess_format(bytes).map_err(|_| DecodeError::UnsupportedFormat)?;
    if !ACCEPTED.contains(&format) {
        return Err(DecodeError::UnsupportedFormat);
    }
    // zune-jpeg fills a cut-off scan with grey instead of failing, so check the structure.
    if format == ImageFormat::Jpeg && !crate::structure::jpeg_has_end_marker(bytes) {
        return Err(DecodeError::Truncated);
    }

    // The reader's default limits (512 MiB) bound what reading the header may allocate.
    let reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut decoder = reader.into_decoder().map_err(map_image_error)?;

    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(DecodeError::ZeroSize);
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels
        || width > limits.max_side
        || height > limits.max_side
    {
        return Err(DecodeError::TooLarge {
            width,
            height,
            max_pixels: limits.max_pixels,
            max_side: limits.max_side,
        });
    }
    // Caps the decoder's buffers to what the accepted size needs (8 bytes a pixel covers
    // 16-bit RGBA), in case a decoder allocates more than the header suggests.
    let mut image_limits = image::Limits::default();
    image_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(1 << 24));
    decoder.set_limits(image_limits).map_err(map_image_error)?;
    // A broken EXIF block must not cost the user their OCR: fall back to the stored layout.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let (width, height) = if swaps_axes(orientation) {
        (height, width)
    } else {
        (width, height)
    };
    Ok((
        ImageInfo {
            format,
            width,
            height,
            orientation,
        },
        Box::new(decoder),
    ))
}

fn swaps_axes(orientation: Orientation) -> bool {
    matches!(
        orientation,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

fn map_image_error(err: image::ImageError) -> DecodeError {
    use image::ImageError;
    match err {
        ImageError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            DecodeError::Truncated
        }
        ImageError::IoError(e) => DecodeError::Malformed(e.to_string()),
        ImageError::Decoding(e) => {
            let text = e.to_string();
            let lower = text.to_ascii_lowercase();
            // The decoders report a short read in their own words rather than as an io error.
            if lower.contains("eof")
                || lower.contains("end of file")
                || lower.contains("unexpected end")
                || lower.contains("truncated")
                || lower.contains("not enough data")
                || lower.contains("no more data")
            {
                DecodeError::Truncated
            } else {
                DecodeError::Malformed(text)
            }
        }
        ImageError::Limits(_) => DecodeError::TooLarge {
            width: 0,
            height: 0,
            max_pixels: 0,
            max_side: 0,
        },
        ImageError::Unsupported(e) => DecodeError::UnsupportedFeature(e.to_string()),
        ImageError::Encoding(e) => DecodeError::Malformed(e.to_string()),
        ImageError::Parameter(e) => DecodeError::Malformed(e.to_string()),
    }
}

/// Alpha is flattened as rapidocr does: grey+alpha over white; colour+alpha over white when
/// the visible pixels are dark on average and over black otherwise, so text keeps its contrast.
fn flatten_to_rgb(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    if !image.color().has_color() {
        let la = image.into_luma_alpha8();
        let mut out = RgbImage::new(la.width(), la.height());
        for (dst, src) in out.pixels_mut().zip(la.pixels()) {
            let [l, a] = src.0;
            let v = if a == 0 { 0 } else { l }.saturating_add(255 - a);
            dst.0 = [v, v, v];
        }
        return out;
    }
    let rgba = image.into_rgba8();
    let (mut sum, mut count) = (0.0f64, 0u64);
    for p in rgba.pixels().filter(|p| p.0[3] > 0) {
        let [r, g, b, _] = p.0;
        sum += 0.299 * f64::from(r) + 0.587 * f64::from(g) + 0.114 * f64::from(b);
        count += 1;
    }
    let background = if count == 0 || sum / (count as f64) < 128.0 {
        255.0
    } else {
        0.0
    };
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (dst, src) in out.pixels_mut().zip(rgba.pixels()) {
        let alpha = f32::from(src.0[3]) / 255.0;
        for c in 0..3 {
            let v = f32::from(src.0[c]) * alpha + background * (1.0 - alpha);
            dst.0[c] = v as u8; // truncation, as the reference's astype(uint8)
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use image::{GrayAlphaImage, ImageEncoder, LumaA, Rgb, Rgba, RgbaImage};

    fn png_bytes(img: &DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .expect("encoding a test image cannot fail");
        out
    }

    pub(crate) fn jpeg_bytes(img: &RgbImage) -> Vec<u8> {
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95)
            .write_image(
                img,
                img.width(),
                img.height(),
                image::ExtendedColorType::Rgb8,
            )
            .expect("encoding a test image cannot fail");
        out
    }

    /// An image whose four quadrants have distinct colours, so any flip or rotation shows.
    fn quadrants(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| match (x < w / 2, y < h / 2) {
            (true, true) => Rgb([255, 0, 0]),
            (false, true) => Rgb([0, 255, 0]),
            (true, false) => Rgb([0, 0, 255]),
            (false, false) => Rgb([255, 255, 255]),
        })
    }

    /// A baseline JPEG with an APP1/EXIF segment whose only tag is Orientation.
    pub(crate) fn jpeg_with_orientation(img: &RgbImage, orientation: u16) -> Vec<u8> {
        let plain = jpeg_bytes(img);
        let mut tiff = Vec::new();
        tiff.extend_from_slice(b"MM\0\x2a\0\0\0\x08"); // big-endian TIFF, IFD at 8
        tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
        tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
        tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
        tiff.extend_from_slice(&1u32.to_be_bytes());
        tiff.extend_from_slice(&orientation.to_be_bytes());
        tiff.extend_from_slice(&[0, 0]);
        tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend_from_slice(&tiff);
        let mut out = plain[..2].to_vec();
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&app1);
        out.extend_from_slice(&plain[2..]);
        out
    }

    /// A small PNG file whose header claims the given size: IHDR, a few bytes of IDAT, IEND.
    fn png_header_only(width: u32, height: u32) -> Vec<u8> {
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut chunk = |kind: &[u8], data: &[u8]| {
            let mut body = kind.to_vec();
            body.extend_from_slice(data);
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(&body);
            out.extend_from_slice(&crc32(&body).to_be_bytes());
        };
        let mut ihdr = width.to_be_bytes().to_vec();
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
        chunk(b"IHDR", &ihdr);
        chunk(
            b"IDAT",
            &[0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01],
        );
        chunk(b"IEND", &[]);
        out
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn near(a: [u8; 3], b: [u8; 3]) -> bool {
        a.iter().zip(b).all(|(&x, y)| x.abs_diff(y) < 40)
    }

    #[test]
    fn decodes_png_and_jpeg() {
        let img = quadrants(40, 20);
        let limits = DecodeLimits::default();
        let png = decode(&png_bytes(&DynamicImage::ImageRgb8(img.clone())), &limits).unwrap();
        assert_eq!(png, img);
        let info = probe(&jpeg_bytes(&img), &limits).unwrap();
        assert_eq!(
            (info.format, info.width, info.height),
            (ImageFormat::Jpeg, 40, 20)
        );
        let jpg = decode(&jpeg_bytes(&img), &limits).unwrap();
        assert_eq!(jpg.dimensions(), (40, 20));
        assert!(near(jpg.get_pixel(5, 5).0, [255, 0, 0]));
    }

    #[test]
    fn decodes_tiff_webp_and_bmp() {
        let img = quadrants(16, 8);
        for format in [ImageFormat::Tiff, ImageFormat::WebP, ImageFormat::Bmp] {
            let mut bytes = Vec::new();
            DynamicImage::ImageRgb8(img.clone())
                .write_to(&mut Cursor::new(&mut bytes), format)
                .expect("encoding a test image cannot fail");
            let info = probe(&bytes, &DecodeLimits::default()).unwrap();
            assert_eq!((info.format, info.width, info.height), (format, 16, 8));
            assert_eq!(
                decode(&bytes, &DecodeLimits::default()).unwrap(),
                img,
                "{format:?}"
            );
        }
    }

    #[test]
    fn rejects_truncated_png() {
        let bytes = png_bytes(&DynamicImage::ImageRgb8(quadrants(64, 64)));
        let cut = &bytes[..bytes.len() / 2];
        assert_eq!(
            decode(cut, &DecodeLimits::default()),
            Err(DecodeError::Truncated)
        );
    }

    #[test]
    fn rejects_truncated_jpeg() {
        let bytes = jpeg_bytes(&quadrants(64, 64));
        for cut in [bytes.len() - 2, bytes.len() / 2, 30] {
            assert_eq!(
                decode(&bytes[..cut], &DecodeLimits::default()),
                Err(DecodeError::Truncated),
                "cut at {cut}"
            );
        }
        // A JPEG with bytes after its end marker is still complete.
        let mut trailing = bytes.clone();
        trailing.extend_from_slice(b"trailing junk");
        assert!(decode(&trailing, &DecodeLimits::default()).is_ok());
    }

    fn encoded(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
        let mut bytes = Vec::new();
        DynamicImage::ImageRgb8(img.clone())
            .write_to(&mut Cursor::new(&mut bytes), format)
            .expect("encoding a test image cannot fail");
        bytes
    }

    #[test]
    fn check_accepts_every_format_without_decoding() {
        let img = quadrants(24, 10);
        let limits = DecodeLimits::default();
        for format in ACCEPTED {
            let bytes = encoded(&img, format);
            let info = check(&bytes, &limits).unwrap_or_else(|e| panic!("{format:?}: {e}"));
            assert_eq!((info.format, info.width, info.height), (format, 24, 10));
        }
        // A 40-megapixel page of one colour is under a megabyte of PNG and 120 MB of pixels:
        // the check takes it as it is.
        let blank = RgbImage::from_pixel(6_300, 6_300, Rgb([255, 255, 255]));
        let bytes = encoded(&blank, ImageFormat::Png);
        assert!(bytes.len() < 1_000_000, "{} bytes", bytes.len());
        assert_eq!(check(&bytes, &limits).map(|i| i.width), Ok(6_300));
    }

    /// What the API lets through, the worker can decode: a file cut anywhere is either refused
    /// by the check or still decodes.
    #[test]
    fn no_cut_file_passes_the_check_and_then_fails_to_decode() {
        let img = quadrants(16, 8);
        let limits = DecodeLimits::default();
        for format in ACCEPTED {
            let bytes = encoded(&img, format);
            let mut refused = 0;
            for cut in 1..bytes.len() {
                let part = &bytes[..cut];
                if check(part, &limits).is_ok() {
                    assert!(
                        decode(part, &limits).is_ok(),
                        "{format:?} cut at {cut} of {} passed the check but does not decode",
                        bytes.len()
                    );
                } else {
                    refused += 1;
                }
            }
            assert!(refused > 0, "{format:?}: no cut was refused");
        }
    }

    #[test]
    fn check_refuses_damaged_framing() {
        let limits = DecodeLimits::default();
        let png = png_bytes(&DynamicImage::ImageRgb8(quadrants(64, 64)));
        assert_eq!(
            check(&png[..png.len() - 1], &limits),
            Err(DecodeError::Truncated)
        );
        // One flipped bit inside the compressed data: the header is fine, the checksum is not.
        let mut flipped = png.clone();
        let last_idat_byte = png.len() - 12 - 4 - 1;
        flipped[last_idat_byte] ^= 0x01;
        assert!(
            matches!(check(&flipped, &limits), Err(DecodeError::Malformed(m)) if m.contains("IDAT")),
            "{:?}",
            check(&flipped, &limits)
        );
        // IEND without a single IDAT.
        let mut no_data = png[..33].to_vec(); // signature + IHDR
        no_data.extend_from_slice(&png[png.len() - 12..]);
        assert!(matches!(
            check(&no_data, &limits),
            Err(DecodeError::Malformed(_))
        ));

        let jpeg = jpeg_bytes(&quadrants(64, 64));
        assert_eq!(
            check(&jpeg[..jpeg.len() - 2], &limits),
            Err(DecodeError::Truncated)
        );
        let bmp = encoded(&quadrants(64, 64), ImageFormat::Bmp);
        assert_eq!(
            check(&bmp[..bmp.len() - 100], &limits),
            Err(DecodeError::Truncated)
        );
        let webp = encoded(&quadrants(64, 64), ImageFormat::WebP);
        assert_eq!(
            check(&webp[..webp.len() - 3], &limits),
            Err(DecodeError::Truncated)
        );
    }

    #[test]
    fn rejects_non_images() {
        let limits = DecodeLimits::default();
        assert_eq!(decode(b"", &limits), Err(DecodeError::Empty));
        assert_eq!(
            decode(b"%PDF-1.7 definitely not an image", &limits),
            Err(DecodeError::UnsupportedFormat)
        );
        assert_eq!(
            probe(b"GIF89a\x01\0\x01\0\0\0\0", &limits),
            Err(DecodeError::UnsupportedFormat)
        );
        let corrupt = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDRgarbagegarbage";
        assert!(decode(corrupt, &limits).is_err());
    }

    #[test]
    fn rejects_huge_header_before_decoding() {
        let header = png_header_only(30_000, 30_000);
        let err = probe(&header, &DecodeLimits::default()).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::TooLarge {
                    width: 30_000,
                    height: 30_000,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.http_status(), 413);
        // A long, thin image passes the pixel count but not the side limit.
        assert!(matches!(
            probe(&png_header_only(100_000, 10), &DecodeLimits::default()),
            Err(DecodeError::TooLarge { .. })
        ));
        let small = DecodeLimits {
            max_pixels: 100,
            ..DecodeLimits::default()
        };
        let bytes = png_bytes(&DynamicImage::ImageRgb8(quadrants(20, 20)));
        assert!(matches!(
            decode(&bytes, &small),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn rejects_too_many_bytes() {
        let bytes = png_bytes(&DynamicImage::ImageRgb8(quadrants(20, 20)));
        let limits = DecodeLimits {
            max_bytes: 10,
            ..DecodeLimits::default()
        };
        assert!(matches!(
            probe(&bytes, &limits),
            Err(DecodeError::TooManyBytes { max: 10, .. })
        ));
    }

    #[test]
    fn applies_exif_rotation() {
        // Stored 40 wide and 20 high; orientation 6 means "rotate 90° clockwise to display".
        let stored = quadrants(40, 20);
        let bytes = jpeg_with_orientation(&stored, 6);
        let limits = DecodeLimits::default();
        let info = probe(&bytes, &limits).unwrap();
        assert_eq!((info.width, info.height), (20, 40));
        assert_eq!(info.orientation, Orientation::Rotate90);
        let img = decode(&bytes, &limits).unwrap();
        assert_eq!(img.dimensions(), (20, 40));
        // After a clockwise turn the stored top-left (red) sits top-right, and the stored
        // bottom-left (blue) sits top-left.
        assert!(
            near(img.get_pixel(15, 5).0, [255, 0, 0]),
            "{:?}",
            img.get_pixel(15, 5)
        );
        assert!(
            near(img.get_pixel(4, 5).0, [0, 0, 255]),
            "{:?}",
            img.get_pixel(4, 5)
        );
        assert!(near(img.get_pixel(15, 35).0, [0, 255, 0]));

        let flipped = decode(&jpeg_with_orientation(&stored, 3), &limits).unwrap();
        assert_eq!(flipped.dimensions(), (40, 20));
        assert!(near(flipped.get_pixel(35, 15).0, [255, 0, 0]));
    }

    #[test]
    fn flattens_alpha_like_the_reference() {
        // Dark text on a transparent background must land on white, or it vanishes.
        let rgba = RgbaImage::from_fn(4, 1, |x, _| {
            if x == 0 {
                Rgba([10, 10, 10, 255])
            } else {
                Rgba([0, 0, 0, 0])
            }
        });
        let img = decode(
            &png_bytes(&DynamicImage::ImageRgba8(rgba)),
            &DecodeLimits::default(),
        )
        .unwrap();
        assert_eq!(img.get_pixel(0, 0).0, [10, 10, 10]);
        assert_eq!(img.get_pixel(1, 0).0, [255, 255, 255]);

        // Light text on transparency lands on black.
        let rgba = RgbaImage::from_fn(2, 1, |x, _| {
            if x == 0 {
                Rgba([250, 250, 250, 255])
            } else {
                Rgba([0, 0, 0, 0])
            }
        });
        let img = decode(
            &png_bytes(&DynamicImage::ImageRgba8(rgba)),
            &DecodeLimits::default(),
        )
        .unwrap();
        assert_eq!(img.get_pixel(1, 0).0, [0, 0, 0]);

        let la = GrayAlphaImage::from_fn(2, 1, |x, _| LumaA([20, if x == 0 { 255 } else { 0 }]));
        let img = decode(
            &png_bytes(&DynamicImage::ImageLumaA8(la)),
            &DecodeLimits::default(),
        )
        .unwrap();
        assert_eq!(img.get_pixel(0, 0).0, [20, 20, 20]);
        assert_eq!(img.get_pixel(1, 0).0, [255, 255, 255]);
    }
}
