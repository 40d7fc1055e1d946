//! Walking an image file's framing without decoding its pixels.
//!
//! The API must refuse a truncated or damaged upload before it stores anything, but decoding
//! to check costs the full pixel buffer: a 52 KB single-colour PNG of 40 megapixels inflates
//! to 120 MB. Every format accepted here frames its data with lengths and markers, so walking
//! them finds a cut-off or spliced file at a cost proportional to the bytes, not the pixels.
//! What a walk cannot see (a damaged compressed stream inside intact framing) fails at the
//! worker's decode, which fails the job as bad input.

use image::ImageFormat;

/// Why the framing is not intact.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StructureError {
    #[error("image data is truncated")]
    Truncated,
    #[error("malformed image: {0}")]
    Malformed(String),
}

/// Checks the framing of `bytes`, already recognised as `format`.
pub fn check_framing(bytes: &[u8], format: ImageFormat) -> Result<(), StructureError> {
    match format {
        ImageFormat::Png => png(bytes),
        ImageFormat::Jpeg => {
            if jpeg_has_end_marker(bytes) {
                Ok(())
            } else {
                Err(StructureError::Truncated)
            }
        }
        ImageFormat::WebP => webp(bytes),
        ImageFormat::Bmp => bmp(bytes),
        ImageFormat::Tiff => tiff(bytes),
        _ => Ok(()),
    }
}

fn malformed(what: impl Into<String>) -> StructureError {
    StructureError::Malformed(what.into())
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn le_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn le_i32(bytes: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// PNG: IHDR first, every chunk whole with a matching CRC (the decoder rejects a bad one, so
/// the API must too), at least one IDAT, and IEND. Bytes after IEND are ignored, as decoders do.
fn png(bytes: &[u8]) -> Result<(), StructureError> {
    const SIGNATURE: usize = 8;
    let mut pos = SIGNATURE;
    let mut first = true;
    let mut seen_data = false;
    loop {
        let Some(length) = be_u32(bytes, pos) else {
            return Err(StructureError::Truncated);
        };
        if length > i32::MAX as u32 {
            return Err(malformed(format!(
                "PNG chunk length {length} is over 2^31-1"
            )));
        }
        let kind_at = pos + 4;
        let data_at = kind_at + 4;
        let crc_at = data_at + length as usize;
        let Some(stored_crc) = be_u32(bytes, crc_at) else {
            return Err(StructureError::Truncated);
        };
        let kind = &bytes[kind_at..data_at];
        if crc32fast::hash(&bytes[kind_at..crc_at]) != stored_crc {
            return Err(malformed(format!(
                "PNG chunk {} has a bad checksum",
                String::from_utf8_lossy(kind)
            )));
        }
        if first && kind != b"IHDR" {
            return Err(malformed("PNG does not start with IHDR"));
        }
        first = false;
        match kind {
            b"IDAT" => seen_data = true,
            b"IEND" if seen_data => return Ok(()),
            b"IEND" => return Err(malformed("PNG has no image data")),
            _ => {}
        }
        pos = crc_at + 4;
    }
}

/// JPEG: walks the marker segments up to the first scan (so an EXIF thumbnail's own end marker
/// does not count), then looks for the end-of-image marker in or after the entropy-coded data,
/// where 0xFF bytes are always stuffed and so cannot fake it. zune-jpeg fills a cut-off scan
/// with grey instead of failing, so even the decoder relies on this.
pub(crate) fn jpeg_has_end_marker(bytes: &[u8]) -> bool {
    let mut pos = 2; // past SOI, which format detection has seen
    loop {
        // Fill bytes (0xFF runs) may precede a marker.
        while pos < bytes.len() && bytes[pos] == 0xFF && bytes.get(pos + 1) == Some(&0xFF) {
            pos += 1;
        }
        let (Some(&0xFF), Some(&marker)) = (bytes.get(pos), bytes.get(pos + 1)) else {
            return false;
        };
        pos += 2;
        match marker {
            0xD9 => return true,
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let (Some(&hi), Some(&lo)) = (bytes.get(pos), bytes.get(pos + 1)) else {
            return false;
        };
        let segment_end = pos + usize::from(u16::from_be_bytes([hi, lo]));
        if segment_end > bytes.len() {
            return false;
        }
        if marker == 0xDA {
            return bytes[segment_end..].windows(2).any(|w| w == [0xFF, 0xD9]);
        }
        pos = segment_end;
    }
}

/// WebP: the RIFF size covers the file, and every chunk inside fits in it.
fn webp(bytes: &[u8]) -> Result<(), StructureError> {
    const HEADER: usize = 12; // "RIFF", size, "WEBP"
    let riff_size = le_u32(bytes, 4).ok_or(StructureError::Truncated)? as usize;
    let riff_end = riff_size
        .checked_add(8)
        .ok_or_else(|| malformed("RIFF size overflows"))?;
    if riff_end > bytes.len() {
        return Err(StructureError::Truncated);
    }
    let mut pos = HEADER;
    let mut chunks = 0;
    while pos < riff_end {
        let size = le_u32(bytes, pos + 4).ok_or(StructureError::Truncated)? as usize;
        // Chunks are padded to an even size.
        let end = (pos + 8)
            .checked_add(size + (size & 1))
            .ok_or_else(|| malformed("WebP chunk size overflows"))?;
        if end > riff_end {
            return Err(StructureError::Truncated);
        }
        chunks += 1;
        pos = end;
    }
    if chunks == 0 {
        return Err(malformed("WebP has no chunks"));
    }
    Ok(())
}

/// BMP: the uncompressed pixel array the header describes lies within the file. Compressed
/// bitmaps (RLE) carry no fixed size, so only their data offset is checked.
fn bmp(bytes: &[u8]) -> Result<(), StructureError> {
    const BI_RGB: u32 = 0;
    const BI_BITFIELDS: u32 = 3;
    const BI_ALPHABITFIELDS: u32 = 6;
    let data_offset = le_u32(bytes, 10).ok_or(StructureError::Truncated)? as u64;
    let header_size = le_u32(bytes, 14).ok_or(StructureError::Truncated)?;
    let (width, height, bits, compression) = if header_size == 12 {
        // BITMAPCOREHEADER: 16-bit sizes, no compression field.
        let width = le_u16(bytes, 18).ok_or(StructureError::Truncated)?;
        let height = le_u16(bytes, 20).ok_or(StructureError::Truncated)?;
        let bits = le_u16(bytes, 24).ok_or(StructureError::Truncated)?;
        (u64::from(width), u64::from(height), bits, BI_RGB)
    } else {
        let width = le_i32(bytes, 18).ok_or(StructureError::Truncated)?;
        let height = le_i32(bytes, 22).ok_or(StructureError::Truncated)?;
        let bits = le_u16(bytes, 28).ok_or(StructureError::Truncated)?;
        let compression = le_u32(bytes, 30).ok_or(StructureError::Truncated)?;
        (
            u64::from(width.unsigned_abs()),
            // Negative: stored top-down.
            u64::from(height.unsigned_abs()),
            bits,
            compression,
        )
    };
    let len = bytes.len() as u64;
    if data_offset > len {
        return Err(StructureError::Truncated);
    }
    if matches!(compression, BI_RGB | BI_BITFIELDS | BI_ALPHABITFIELDS) {
        // Rows are padded to 4 bytes.
        let row = (u64::from(bits) * width).div_ceil(32) * 4;
        let needed = data_offset.saturating_add(row.saturating_mul(height));
        if needed > len {
            return Err(StructureError::Truncated);
        }
    }
    Ok(())
}

/// TIFF: every strip or tile of the first image lies within the file.
fn tiff(bytes: &[u8]) -> Result<(), StructureError> {
    use tiff::decoder::{ChunkType, Decoder};
    use tiff::tags::Tag;
    let mut decoder = Decoder::new(std::io::Cursor::new(bytes)).map_err(tiff_error)?;
    let (offsets, counts) = match decoder.get_chunk_type() {
        ChunkType::Strip => (Tag::StripOffsets, Tag::StripByteCounts),
        ChunkType::Tile => (Tag::TileOffsets, Tag::TileByteCounts),
    };
    let offsets = decoder
        .find_tag_unsigned_vec::<u64>(offsets)
        .map_err(tiff_error)?
        .ok_or_else(|| malformed("TIFF has no data offsets"))?;
    let counts = decoder
        .find_tag_unsigned_vec::<u64>(counts)
        .map_err(tiff_error)?
        .ok_or_else(|| malformed("TIFF has no data sizes"))?;
    if offsets.len() != counts.len() {
        return Err(malformed(format!(
            "TIFF has {} data offsets but {} sizes",
            offsets.len(),
            counts.len()
        )));
    }
    let len = bytes.len() as u64;
    if offsets
        .iter()
        .zip(&counts)
        .any(|(&offset, &count)| offset.saturating_add(count) > len)
    {
        return Err(StructureError::Truncated);
    }
    Ok(())
}

fn tiff_error(err: tiff::TiffError) -> StructureError {
    match err {
        tiff::TiffError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            StructureError::Truncated
        }
        other => malformed(other.to_string()),
    }
}
