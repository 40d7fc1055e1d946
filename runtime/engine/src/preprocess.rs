//! Pixels → network inputs, following rapidocr 3.10's rules:
//!
//! * page: shrink so the long side is ≤ 2000 px, grow so the short side is ≥ 30 px (both
//!   snapped to multiples of 32), then pad very flat images top and bottom with black;
//! * detector: grow so the short side is ≥ 736 px, snap both sides to multiples of 32,
//!   normalise `(x/255 - 0.5) / 0.5`;
//! * recogniser: resize each line crop to height 48 keeping its aspect ratio, normalise the
//!   same way, pad with zeros on the right to the widest line of its batch (at least 320 px).
//!
//! Channels are fed in BGR order: PaddleOCR models were trained on OpenCV images.

use candle_core::{Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Resizes like OpenCV's `INTER_LINEAR`: pixel-centre alignment, two taps per axis, no
/// anti-aliasing when shrinking (the networks were trained on images resized that way).
pub fn resize_bilinear(img: &RgbImage, new_w: u32, new_h: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if (w, h) == (new_w, new_h) || w == 0 || h == 0 || new_w == 0 || new_h == 0 {
        return if new_w == 0 || new_h == 0 {
            RgbImage::new(new_w, new_h)
        } else if (w, h) == (new_w, new_h) {
            img.clone()
        } else {
            RgbImage::new(new_w, new_h)
        };
    }
    let taps = |src: u32, dst: u32| -> Vec<(usize, usize, f32)> {
        let scale = f64::from(src) / f64::from(dst);
        (0..dst)
            .map(|d| {
                let f = (f64::from(d) + 0.5) * scale - 0.5;
                let mut i = f.floor();
                let mut t = f - i;
                if i < 0.0 {
                    i = 0.0;
                    t = 0.0;
                }
                let i = i as usize;
                if i + 1 >= src as usize {
                    (src as usize - 1, src as usize - 1, 0.0)
                } else {
                    (i, i + 1, t as f32)
                }
            })
            .collect()
    };
    let xs = taps(w, new_w);
    let ys = taps(h, new_h);
    let src = img.as_raw();
    let stride = w as usize * 3;
    let mut out = vec![0u8; new_w as usize * new_h as usize * 3];
    // One horizontally resampled row per source row the vertical pass needs.
    let mut row_a = vec![0f32; new_w as usize * 3];
    let mut row_b = vec![0f32; new_w as usize * 3];
    let hpass = |y: usize, dst: &mut [f32]| {
        let row = &src[y * stride..(y + 1) * stride];
        for (d, &(x0, x1, t)) in dst.chunks_exact_mut(3).zip(&xs) {
            let (a, b) = (&row[x0 * 3..x0 * 3 + 3], &row[x1 * 3..x1 * 3 + 3]);
            for ((d, &a), &b) in d.iter_mut().zip(a).zip(b) {
                let a = f32::from(a);
                *d = a + (f32::from(b) - a) * t;
            }
        }
    };
    let mut cached: (usize, usize) = (usize::MAX, usize::MAX);
    for (dst, &(y0, y1, t)) in out.chunks_exact_mut(new_w as usize * 3).zip(&ys) {
        if cached.0 != y0 {
            if cached.1 == y0 {
                std::mem::swap(&mut row_a, &mut row_b);
                cached = (y0, cached.0);
            } else {
                hpass(y0, &mut row_a);
                cached.0 = y0;
            }
        }
        if cached.1 != y1 {
            hpass(y1, &mut row_b);
            cached.1 = y1;
        }
        for ((d, &a), &b) in dst.iter_mut().zip(&row_a).zip(&row_b) {
            // Adding 0.5 then truncating rounds the non-negative value to nearest.
            *d = (a + (b - a) * t + 0.5) as u8;
        }
    }
    RgbImage::from_raw(new_w, new_h, out).unwrap_or_default()
}

/// Python's `round(v / 32) * 32`, which rounds halves to even.
fn snap32(v: u32) -> u32 {
    ((f64::from(v) / 32.0).round_ties_even() * 32.0) as u32
}

/// Page-level normalisation done before detection (rapidocr's `Global` settings).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct PageParams {
    pub max_side_len: u32,
    pub min_side_len: u32,
    /// Pad images shorter than `min_height` or flatter than `width_height_ratio`:1.
    pub use_vertical_padding: bool,
    pub min_height: u32,
    pub width_height_ratio: f32,
}

impl Default for PageParams {
    fn default() -> Self {
        Self {
            max_side_len: 2000,
            min_side_len: 30,
            use_vertical_padding: true,
            min_height: 30,
            width_height_ratio: 8.0,
        }
    }
}

/// The image the detector and the crops work on, and how to map back to the original.
#[derive(Debug, Clone)]
pub struct PreparedPage {
    pub image: RgbImage,
    pub original_width: u32,
    pub original_height: u32,
    /// Original pixels per working pixel.
    pub ratio_w: f64,
    pub ratio_h: f64,
    /// Rows of black added above the (resized) image.
    pub pad_top: u32,
}

impl PreparedPage {
    /// Working-image point → original-image point, clamped to the original's bounds.
    pub fn to_original(&self, [x, y]: [f32; 2]) -> [f32; 2] {
        let ox = f64::from(x) * self.ratio_w;
        let oy = (f64::from(y) - f64::from(self.pad_top)) * self.ratio_h;
        [
            ox.clamp(0.0, f64::from(self.original_width)) as f32,
            oy.clamp(0.0, f64::from(self.original_height)) as f32,
        ]
    }
}

/// Scales a side by `ratio` and snaps it to a multiple of 32 as the reference does.
fn scaled_snapped(w: u32, h: u32, ratio: f64) -> (u32, u32) {
    let rw = (f64::from(w) * ratio) as u32;
    let rh = (f64::from(h) * ratio) as u32;
    (snap32(rw), snap32(rh))
}

pub fn prepare_page(img: &RgbImage, params: &PageParams) -> Result<PreparedPage> {
    let (orig_w, orig_h) = img.dimensions();
    if orig_w == 0 || orig_h == 0 {
        return Err(Error::BadInput("empty image".into()));
    }
    let mut work: Option<RgbImage> = None;
    let (mut ratio_w, mut ratio_h) = (1.0f64, 1.0f64);

    let resize_to = |src: &RgbImage, limit: u32, shrink: bool| -> (RgbImage, f64, f64) {
        let (w, h) = src.dimensions();
        let ratio = if shrink {
            f64::from(limit) / f64::from(w.max(h))
        } else {
            f64::from(limit) / f64::from(w.min(h))
        };
        let (nw, nh) = scaled_snapped(w, h, ratio);
        // The reference fails on sides that round to 0 (e.g. 16000×5); one block of 32 keeps
        // such strips readable, and the vertical padding below then makes room for the detector.
        let (nw, nh) = (nw.max(32), nh.max(32));
        (
            resize_bilinear(src, nw, nh),
            f64::from(w) / f64::from(nw),
            f64::from(h) / f64::from(nh),
        )
    };

    if orig_w.max(orig_h) > params.max_side_len {
        let (im, rw, rh) = resize_to(img, params.max_side_len, true);
        work = Some(im);
        (ratio_w, ratio_h) = (rw, rh);
    }
    let current = work.as_ref().unwrap_or(img);
    if current.width().min(current.height()) < params.min_side_len {
        let (im, rw, rh) = resize_to(current, params.min_side_len, false);
        work = Some(im);
        // Composed with the first resize; the reference keeps only this step's ratios, which
        // misplaces boxes in the rare images (extreme aspect ratios) that need both steps.
        (ratio_w, ratio_h) = (ratio_w * rw, ratio_h * rh);
    }
    let mut image = work.unwrap_or_else(|| img.clone());

    let mut pad_top = 0;
    if params.use_vertical_padding {
        let (w, h) = image.dimensions();
        let too_flat = params.width_height_ratio > 0.0
            && f64::from(w) / f64::from(h) > f64::from(params.width_height_ratio);
        if h <= params.min_height || too_flat {
            let target = ((f64::from(w) / f64::from(params.width_height_ratio)) as u32)
                .max(params.min_height)
                * 2;
            pad_top = target.abs_diff(h) / 2;
            let mut padded = RgbImage::new(w, h + 2 * pad_top);
            image::imageops::replace(&mut padded, &image, 0, i64::from(pad_top));
            image = padded;
        }
    }
    Ok(PreparedPage {
        image,
        original_width: orig_w,
        original_height: orig_h,
        ratio_w,
        ratio_h,
        pad_top,
    })
}

/// How the detector's input size is chosen: the runtime configuration's `model.det_limit_type`.
pub use ocr_contract::model::DetLimitType as LimitType;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DetParams {
    pub limit_side_len: u32,
    pub limit_type: LimitType,
    /// Per-channel mean and std in B, G, R order, applied to values scaled to [0, 1].
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for DetParams {
    fn default() -> Self {
        Self {
            limit_side_len: 736,
            limit_type: LimitType::Min,
            mean: [0.5; 3],
            std: [0.5; 3],
        }
    }
}

/// The detector's input size for a `w`×`h` image, or `None` when it rounds to nothing.
pub fn det_input_size(w: u32, h: u32, params: &DetParams) -> Option<(u32, u32)> {
    let limit = f64::from(params.limit_side_len);
    let ratio = match params.limit_type {
        LimitType::Max if w.max(h) > params.limit_side_len => limit / f64::from(w.max(h)),
        LimitType::Min if w.min(h) < params.limit_side_len => limit / f64::from(w.min(h)),
        _ => 1.0,
    };
    let (nw, nh) = scaled_snapped(w, h, ratio);
    (nw > 0 && nh > 0).then_some((nw, nh))
}

/// Writes `img` as normalised BGR planes (C×H×W) into `out`.
fn push_planes(img: &RgbImage, mean: [f32; 3], std: [f32; 3], out: &mut Vec<f32>) {
    let plane = img.width() as usize * img.height() as usize;
    let start = out.len();
    out.resize(start + 3 * plane, 0.0);
    let (b, rest) = out[start..].split_at_mut(plane);
    let (g, r) = rest.split_at_mut(plane);
    for (i, p) in img.pixels().enumerate() {
        let [pr, pg, pb] = p.0;
        b[i] = (f32::from(pb) / 255.0 - mean[0]) / std[0];
        g[i] = (f32::from(pg) / 255.0 - mean[1]) / std[1];
        r[i] = (f32::from(pr) / 255.0 - mean[2]) / std[2];
    }
}

/// Resized and normalised detector input for one page, as a flat C×H×W buffer.
#[derive(Debug, Clone)]
pub struct DetInput {
    pub data: Vec<f32>,
    pub width: u32,
    pub height: u32,
}

pub fn det_input(img: &RgbImage, params: &DetParams) -> Option<DetInput> {
    let (w, h) = det_input_size(img.width(), img.height(), params)?;
    let resized = resize_bilinear(img, w, h);
    let mut data = Vec::with_capacity(3 * w as usize * h as usize);
    push_planes(&resized, params.mean, params.std, &mut data);
    Some(DetInput {
        data,
        width: w,
        height: h,
    })
}

/// Stacks same-sized detector inputs into one `[N, 3, H, W]` tensor.
pub fn det_batch_tensor(inputs: &[&DetInput], device: &Device) -> Result<Tensor> {
    let Some(first) = inputs.first() else {
        return Err(Error::BadInput("empty detector batch".into()));
    };
    if inputs
        .iter()
        .any(|i| (i.width, i.height) != (first.width, first.height))
    {
        return Err(Error::BadInput("detector batch mixes input sizes".into()));
    }
    let mut data = Vec::with_capacity(inputs.len() * first.data.len());
    for i in inputs {
        data.extend_from_slice(&i.data);
    }
    let shape = (inputs.len(), 3, first.height as usize, first.width as usize);
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// Recogniser input height; the PP-OCR recognisers are trained at 48.
pub const REC_HEIGHT: u32 = 48;
/// Narrowest recogniser input (the reference's `rec_img_shape` width).
pub const REC_MIN_WIDTH: u32 = 320;

/// Width of the padded batch whose widest line has aspect ratio `max_ratio` (width / height).
pub fn rec_batch_width(max_ratio: f64) -> u32 {
    let floor = f64::from(REC_MIN_WIDTH) / f64::from(REC_HEIGHT);
    (f64::from(REC_HEIGHT) * max_ratio.max(floor)) as u32
}

pub fn aspect_ratio(img: &RgbImage) -> f64 {
    f64::from(img.width()) / f64::from(img.height().max(1))
}

/// Groups line crops into recogniser batches: sorted by aspect ratio so lines of similar width
/// share a batch, at most `max_batch` lines each, and a new batch is started when padding to
/// the widest line would make the batch more than `max_width_growth` times wider than its
/// narrowest line needs (padding costs compute and, through attention, a little accuracy).
/// Returns indices into `ratios`.
pub fn plan_rec_batches(
    ratios: &[f64],
    max_batch: usize,
    max_width_growth: f64,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..ratios.len()).collect();
    order.sort_by(|&a, &b| ratios[a].total_cmp(&ratios[b]));
    let max_batch = max_batch.max(1);
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut first_width = 0u32;
    for i in order {
        let width = rec_batch_width(ratios[i]);
        match batches.last_mut() {
            Some(batch)
                if batch.len() < max_batch
                    && f64::from(width) <= f64::from(first_width) * max_width_growth =>
            {
                batch.push(i)
            }
            _ => {
                batches.push(vec![i]);
                first_width = width;
            }
        }
    }
    batches
}

/// One recogniser batch `[N, 3, 48, W]`, each crop resized to height 48 (width from its
/// aspect ratio, capped at W) and zero-padded on the right.
pub fn rec_batch_tensor(crops: &[&RgbImage], device: &Device) -> Result<Tensor> {
    if crops.is_empty() {
        return Err(Error::BadInput("empty recogniser batch".into()));
    }
    let max_ratio = crops.iter().map(|c| aspect_ratio(c)).fold(0.0, f64::max);
    let width = rec_batch_width(max_ratio);
    let (h, w) = (REC_HEIGHT as usize, width as usize);
    let mut data = vec![0f32; crops.len() * 3 * h * w];
    data.par_chunks_mut(3 * h * w)
        .zip(crops.par_iter())
        .for_each(|(dst, crop)| {
            let target = (f64::from(REC_HEIGHT) * aspect_ratio(crop)).ceil() as u32;
            let resized_w = target.clamp(1, width);
            let resized = resize_bilinear(crop, resized_w, REC_HEIGHT);
            let mut planes = Vec::with_capacity(3 * h * resized_w as usize);
            push_planes(&resized, [0.5; 3], [0.5; 3], &mut planes);
            // Row by row into the zero-filled slot: the right-hand padding stays 0.
            for (src, dst) in planes
                .chunks_exact(resized_w as usize)
                .zip(dst.chunks_exact_mut(w))
            {
                dst[..src.len()].copy_from_slice(src);
            }
        });
    Ok(Tensor::from_vec(data, (crops.len(), 3, h, w), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_matches_opencv_on_small_cases() {
        // cv2.resize(np.array([[0, 100, 200, 250]], np.uint8), (2, 1)) == [[50, 225]]
        let img = RgbImage::from_fn(4, 1, |x, _| {
            let v = [0u8, 100, 200, 250][x as usize];
            image::Rgb([v, v, v])
        });
        let half = resize_bilinear(&img, 2, 1);
        assert_eq!(half.get_pixel(0, 0).0[0], 50);
        assert_eq!(half.get_pixel(1, 0).0[0], 225);
        // cv2.resize(np.array([[0, 100]], np.uint8), (4, 1)) == [[0, 25, 75, 100]]
        let two = RgbImage::from_fn(2, 1, |x, _| image::Rgb([x as u8 * 100; 3]));
        let up: Vec<u8> = resize_bilinear(&two, 4, 1)
            .pixels()
            .map(|p| p.0[0])
            .collect();
        assert_eq!(up, vec![0, 25, 75, 100]);
    }

    #[test]
    fn detector_size_follows_the_reference() {
        let p = DetParams::default();
        // Short side grown to 736, both snapped to 32 (Python rounds halves to even).
        assert_eq!(det_input_size(1000, 1300, &p), Some((992, 1312)));
        assert_eq!(det_input_size(400, 100, &p), Some((2944, 736)));
        assert_eq!(det_input_size(800, 736, &p), Some((800, 736)));
        // 48 / 32 = 1.5 rounds to 2, 80 / 32 = 2.5 rounds to 2.
        let max = DetParams {
            limit_type: LimitType::Max,
            limit_side_len: 4000,
            ..p
        };
        assert_eq!(det_input_size(48, 80, &max), Some((64, 64)));
        assert_eq!(det_input_size(10, 10, &max), None);
    }

    #[test]
    fn page_preparation_shrinks_and_pads() {
        let big = RgbImage::new(4000, 1000);
        let page = prepare_page(&big, &PageParams::default()).unwrap();
        // 2000 / 32 = 62.5 rounds to even: 62 * 32 = 1984.
        assert_eq!(page.image.dimensions(), (1984, 512));
        assert_eq!(page.pad_top, 0);
        let back = page.to_original([1984.0, 512.0]);
        assert_eq!(back, [4000.0, 1000.0]);

        // A single text line: 400×40 is flatter than 8:1, so it gets 30 black rows on each
        // side (max(400/8, 30) * 2 = 100 rows in all).
        let line = RgbImage::from_pixel(400, 40, image::Rgb([255, 255, 255]));
        let page = prepare_page(&line, &PageParams::default()).unwrap();
        assert_eq!(page.image.dimensions(), (400, 100));
        assert_eq!(page.pad_top, 30);
        assert_eq!(page.image.get_pixel(10, 10).0, [0, 0, 0]);
        assert_eq!(page.image.get_pixel(10, 50).0, [255, 255, 255]);
        assert_eq!(page.to_original([10.0, 30.0]), [10.0, 0.0]);

        // A 16000×5 strip shrinks to 2000×32 rather than to nothing, then gets padded.
        let strip = RgbImage::new(16_000, 5);
        let page = prepare_page(&strip, &PageParams::default()).unwrap();
        assert_eq!(page.image.width(), 1984);
        assert!(page.image.height() > 300, "{:?}", page.image.dimensions());
        assert!(det_input_size(
            page.image.width(),
            page.image.height(),
            &DetParams::default()
        )
        .is_some());
    }

    #[test]
    fn detector_tensor_is_bgr_and_normalised() {
        let img = RgbImage::from_pixel(40, 40, image::Rgb([255, 0, 51]));
        let input = det_input(&img, &DetParams::default()).unwrap();
        assert_eq!((input.width, input.height), (736, 736));
        let t = det_batch_tensor(&[&input, &input], &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 3, 736, 736]);
        let px: Vec<f32> = t
            .get(0)
            .unwrap()
            .flatten_from(1)
            .unwrap()
            .get_on_dim(1, 0)
            .unwrap()
            .to_vec1()
            .unwrap();
        // B = 51 → 51/255/0.5 - 1 = -0.6; G = 0 → -1; R = 255 → 1.
        assert!(
            (px[0] + 0.6).abs() < 1e-5 && (px[1] + 1.0).abs() < 1e-6 && (px[2] - 1.0).abs() < 1e-6,
            "{px:?}"
        );
    }

    #[test]
    fn rec_batches_pad_to_the_widest_line() {
        let narrow = RgbImage::from_pixel(96, 24, image::Rgb([255, 255, 255])); // ratio 4 → 192 px
        let wide = RgbImage::from_pixel(500, 25, image::Rgb([0, 0, 0])); // ratio 20 → 960 px
        let t = rec_batch_tensor(&[&narrow, &wide], &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 3, 48, 960]);
        let row: Vec<f32> = t
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(10)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(row[..192].iter().all(|&v| (v - 1.0).abs() < 1e-6));
        assert!(row[192..].iter().all(|&v| v == 0.0));
        let row: Vec<f32> = t
            .get(1)
            .unwrap()
            .get(2)
            .unwrap()
            .get(47)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(row.iter().all(|&v| (v + 1.0).abs() < 1e-6));

        let short = RgbImage::new(30, 30);
        assert_eq!(
            rec_batch_tensor(&[&short], &Device::Cpu).unwrap().dims(),
            &[1, 3, 48, 320]
        );
    }

    #[test]
    fn rec_batch_plan_sorts_and_buckets() {
        let ratios = [20.0, 1.0, 5.0, 2.0, 21.0, 6.5, 40.0];
        let plan = plan_rec_batches(&ratios, 3, 1.5);
        // Ratios ≤ 6.67 all pad to 320 px; 20 and 21 share a bucket; 40 is alone.
        assert_eq!(plan, vec![vec![1, 3, 2], vec![5], vec![0, 4], vec![6]]);
        let flat: Vec<usize> = plan_rec_batches(&ratios, 100, f64::INFINITY).concat();
        assert_eq!(flat, vec![1, 3, 2, 5, 0, 4, 6]);
    }
}
