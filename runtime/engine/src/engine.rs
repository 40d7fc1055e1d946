//! The page pipeline: bytes → decoded image → detection → line crops → recognition → [`Page`].
//!
//! [`OcrEngine::recognize_batch`] detects pages in batches of equal input size and recognises
//! the lines of all pages together, batched by width, so a request with many small images keeps
//! the accelerator busy. Each image carries its own result: a bad image never fails the others.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;

use crate::ctc::CtcDecoder;
use crate::decode::{self, DecodeLimits};
use crate::error::{Error, Result};
use crate::models::{DetModel, RecModel};
use crate::postprocess::{self, geometry, DbParams, DetBox};
use crate::preprocess::{self, DetInput, DetParams, PageParams, PreparedPage};

/// One recognised text line.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Line {
    pub text: String,
    /// Mean top probability of the decoded characters, in [0, 1].
    pub confidence: f32,
    /// Corners top-left, top-right, bottom-right, bottom-left in original-image pixels
    /// (after EXIF orientation).
    pub polygon: [[f32; 2]; 4],
}

/// The OCR result of one image.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Page {
    pub width: u32,
    pub height: u32,
    /// In reading order: top to bottom, left to right within a line.
    pub lines: Vec<Line>,
    /// The lines' texts: lines on one visual row joined by a space, rows by a newline.
    pub text: String,
}

pub use ocr_contract::model::{default_model_dir, ModelVariant, Precision};

/// The candle type a [`Precision`] computes in.
pub fn dtype(precision: Precision) -> DType {
    match precision {
        Precision::F32 => DType::F32,
        Precision::F16 => DType::F16,
        Precision::Bf16 => DType::BF16,
    }
}

/// Every knob of the pipeline; the defaults reproduce rapidocr 3.10 (except the batch sizes,
/// which are sized for a GPU).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct PipelineConfig {
    pub decode: DecodeLimits,
    pub page: PageParams,
    pub det: DetParams,
    pub db: DbParams,
    /// Lines whose confidence is below this are dropped.
    pub text_score: f32,
    /// Most pages per detector forward (only pages with the same input size share one).
    pub det_batch_size: usize,
    /// Most lines per recogniser forward.
    pub rec_batch_size: usize,
    /// A recogniser batch is closed when its padded width would exceed this many times the
    /// width its narrowest line needs.
    pub rec_max_width_growth: f64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            decode: DecodeLimits::default(),
            page: PageParams::default(),
            det: DetParams::default(),
            db: DbParams::default(),
            text_score: 0.5,
            det_batch_size: 4,
            rec_batch_size: 32,
            rec_max_width_growth: 1.25,
        }
    }
}

impl PipelineConfig {
    /// rapidocr's own batching too (6 lines per recogniser batch, any width mix), for
    /// bit-for-bit comparisons: attention in the recogniser sees the padding, so the batch
    /// composition nudges confidences in the third decimal.
    pub fn rapidocr() -> Self {
        Self {
            det_batch_size: 1,
            rec_batch_size: 6,
            rec_max_width_growth: f64::INFINITY,
            ..Self::default()
        }
    }
}

/// A text detector: `[N, 3, H, W]` normalised BGR → `[N, 1, H, W]` probabilities.
pub trait TextDetector {
    fn detect(&self, x: &Tensor) -> Result<Tensor>;
}

/// A CTC recogniser: `[N, 3, 48, W]` → `[N, T, C]` softmax probabilities.
pub trait TextRecognizer {
    fn recognize(&self, x: &Tensor) -> Result<Tensor>;
    /// What CTC decoding reads of [`Self::recognize`]: `[N, T, 2]` holding each timestep's
    /// most likely class (as f32) and its probability, plus `C`. A model can produce this
    /// without materialising the `[N, T, C]` probabilities.
    fn recognize_top1(&self, x: &Tensor) -> Result<(Tensor, usize)> {
        let probs = self.recognize(x)?;
        let (_, _, c) = probs.dims3()?;
        Ok((crate::models::rec::top1_of_probs(&probs)?, c))
    }
    /// Either the full label table (blank first, `C` entries) or the bare dictionary
    /// (`C - 2` entries, PaddleOCR adds the blank and a trailing space).
    fn dictionary(&self) -> &[String];
}

impl TextDetector for DetModel {
    fn detect(&self, x: &Tensor) -> Result<Tensor> {
        self.forward(x)
    }
}

impl TextRecognizer for RecModel {
    fn recognize(&self, x: &Tensor) -> Result<Tensor> {
        self.forward(x)
    }

    fn recognize_top1(&self, x: &Tensor) -> Result<(Tensor, usize)> {
        self.forward_top1(x)
    }

    fn dictionary(&self) -> &[String] {
        RecModel::dictionary(self)
    }
}

/// Detector + recogniser + the pipeline around them. Cheap to share across threads
/// (`&self` everywhere); the networks run wherever `device` is.
pub struct OcrEngine<D = DetModel, R = RecModel> {
    det: D,
    rec: R,
    device: Device,
    config: PipelineConfig,
    /// For a recogniser whose dictionary is the full label table.
    full_labels: CtcDecoder,
    /// For one whose dictionary lacks the blank and the space.
    bare_labels: CtcDecoder,
}

impl OcrEngine<DetModel, RecModel> {
    /// Loads `variant` from `model_dir` (see [`ModelVariant::det_file`]).
    pub fn load(variant: ModelVariant, model_dir: &Path, device: &Device) -> Result<Self> {
        Self::load_as(variant, model_dir, device, Precision::F32)
    }

    /// [`Self::load`] with the networks computing in `precision`.
    pub fn load_as(
        variant: ModelVariant,
        model_dir: &Path,
        device: &Device,
        precision: Precision,
    ) -> Result<Self> {
        if device.is_cpu() && precision == Precision::Bf16 {
            return Err(Error::UnsupportedPrecision {
                precision,
                device: "the CPU".into(),
                hint: "candle has no bf16 matmul there; use f32 (or f16)",
            });
        }
        let dtype = dtype(precision);
        let det_path = model_dir.join(variant.det_file());
        let rec_path = model_dir.join(variant.rec_file());
        for p in [&det_path, &rec_path] {
            if !p.is_file() {
                return Err(Error::ModelNotFound(p.clone()));
            }
        }
        let det = DetModel::load_as(&det_path, device, dtype)?;
        let dict_path = model_dir.join(variant.dict_file());
        // Prefer the list embedded in the ONNX file; older exports only have a sidecar file.
        let rec = match RecModel::load_as(&rec_path, device, dtype) {
            Ok(rec) => rec,
            Err(embedded_err) if dict_path.is_file() => {
                tracing::debug!(%embedded_err, "no embedded dictionary, using {}", dict_path.display());
                RecModel::load_with_dictionary_as(&rec_path, &dict_path, device, dtype)?
            }
            Err(e) => return Err(e),
        };
        Ok(Self::from_models(det, rec, device.clone()))
    }

    /// [`OcrEngine::load`] from [`default_model_dir`].
    pub fn load_default_dir(variant: ModelVariant, device: &Device) -> Result<Self> {
        Self::load(variant, &default_model_dir(), device)
    }
}

/// A detected line on its way through the pipeline.
struct PendingLine {
    page: usize,
    det: DetBox,
    crop: RgbImage,
}

impl<D: TextDetector, R: TextRecognizer> OcrEngine<D, R> {
    pub fn from_models(det: D, rec: R, device: Device) -> Self {
        let full_labels = CtcDecoder::new(rec.dictionary().to_vec());
        let bare_labels = CtcDecoder::from_dictionary(rec.dictionary());
        Self {
            det,
            rec,
            device,
            config: PipelineConfig::default(),
            full_labels,
            bare_labels,
        }
    }

    pub fn with_config(mut self, config: PipelineConfig) -> Self {
        self.config = config;
        self
    }

    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// OCR of one encoded image (PNG, JPEG, TIFF, WebP, BMP).
    pub fn recognize(&self, bytes: &[u8]) -> Result<Page> {
        self.recognize_batch(&[bytes])
            .pop()
            .unwrap_or_else(|| Err(Error::BadInput("no result".into())))
    }

    /// OCR of one decoded image.
    pub fn recognize_image(&self, image: &RgbImage) -> Result<Page> {
        self.recognize_images(&[image])
            .pop()
            .unwrap_or_else(|| Err(Error::BadInput("no result".into())))
    }

    /// OCR of several encoded images; `result[i]` belongs to `images[i]`.
    pub fn recognize_batch<B: AsRef<[u8]> + Sync>(&self, images: &[B]) -> Vec<Result<Page>> {
        let limits = &self.config.decode;
        let decoded: Vec<Result<RgbImage>> = images
            .par_iter()
            .map(|b| decode::decode(b.as_ref(), limits).map_err(Error::from))
            .collect();
        let ok: Vec<&RgbImage> = decoded.iter().filter_map(|d| d.as_ref().ok()).collect();
        let mut pages = self.recognize_images(&ok).into_iter();
        decoded
            .into_iter()
            .map(|d| match d {
                Ok(_) => pages
                    .next()
                    .unwrap_or_else(|| Err(Error::BadInput("no result".into()))),
                Err(e) => Err(e),
            })
            .collect()
    }

    /// OCR of several decoded images; `result[i]` belongs to `images[i]`.
    ///
    /// The per-image CPU work (resizing, DB post-processing, crops) runs on the rayon pool;
    /// the networks run in as few forwards as the batch sizes allow.
    pub fn recognize_images(&self, images: &[&RgbImage]) -> Vec<Result<Page>> {
        let started = Instant::now();
        let page_params = &self.config.page;
        let (prepared, mut failed): (Vec<Option<PreparedPage>>, Vec<Option<Error>>) = images
            .par_iter()
            .map(|img| match preprocess::prepare_page(img, page_params) {
                Ok(p) => (Some(p), None),
                Err(e) => (None, Some(e)),
            })
            .unzip();

        let boxes = self.detect_all(&prepared, &mut failed);
        let t_det = started.elapsed();

        let detected: Vec<(usize, DetBox)> = boxes
            .into_iter()
            .enumerate()
            .flat_map(|(page, page_boxes)| page_boxes.into_iter().map(move |b| (page, b)))
            .collect();
        let lines: Vec<PendingLine> = detected
            .into_par_iter()
            .filter_map(|(page, det)| {
                let prep = prepared[page].as_ref()?;
                // A box too thin to cut is simply not text.
                let crop = geometry::crop_quad(&prep.image, &det.points_f64())?;
                Some(PendingLine { page, det, crop })
            })
            .collect();
        let texts = self.recognize_lines(&lines, &mut failed);
        let t_rec = started.elapsed() - t_det;

        let mut pages: Vec<Page> = prepared
            .iter()
            .map(|p| Page {
                width: p.as_ref().map_or(0, |p| p.original_width),
                height: p.as_ref().map_or(0, |p| p.original_height),
                lines: Vec::new(),
                text: String::new(),
            })
            .collect();
        for (line, decoded) in lines.iter().zip(texts) {
            let Some((text, confidence)) = decoded else {
                continue;
            };
            if text.trim().is_empty() || confidence < self.config.text_score {
                continue;
            }
            let Some(prep) = &prepared[line.page] else {
                continue;
            };
            pages[line.page].lines.push(Line {
                text,
                confidence,
                polygon: line.det.points.map(|p| prep.to_original(p)),
            });
        }
        tracing::debug!(
            images = images.len(),
            lines = lines.len(),
            det_ms = t_det.as_millis() as u64,
            rec_ms = t_rec.as_millis() as u64,
            "ocr batch"
        );
        pages
            .into_iter()
            .zip(failed)
            .map(|(mut page, fail)| match fail {
                Some(e) => Err(e),
                None => {
                    page.text = page_text(&page.lines);
                    Ok(page)
                }
            })
            .collect()
    }

    /// Boxes for every prepared page, in reading order and working-image coordinates.
    fn detect_all(
        &self,
        prepared: &[Option<PreparedPage>],
        failed: &mut [Option<Error>],
    ) -> Vec<Vec<DetBox>> {
        let mut boxes: Vec<Vec<DetBox>> = vec![Vec::new(); prepared.len()];
        let det_params = &self.config.det;
        let db = &self.config.db;
        let inputs: Vec<Option<DetInput>> = prepared
            .par_iter()
            .map(|p| {
                p.as_ref()
                    .and_then(|p| preprocess::det_input(&p.image, det_params))
            })
            .collect();

        // Same-size pages share forwards; padding pages to a common size would shift DB's output.
        let mut by_size: Vec<((u32, u32), Vec<usize>)> = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            let Some(input) = input else { continue };
            let key = (input.width, input.height);
            match by_size.iter_mut().find(|(k, _)| *k == key) {
                Some((_, group)) => group.push(i),
                None => by_size.push((key, vec![i])),
            }
        }
        for (_, group) in by_size {
            for chunk in group.chunks(self.config.det_batch_size.max(1)) {
                let batch: Vec<&DetInput> =
                    chunk.iter().filter_map(|&i| inputs[i].as_ref()).collect();
                match self.run_detector(&batch) {
                    Ok(maps) => {
                        let found: Vec<Vec<DetBox>> = chunk
                            .par_iter()
                            .zip(maps.par_iter())
                            .map(|(&i, map)| {
                                boxes_for(map, inputs[i].as_ref(), prepared[i].as_ref(), db)
                            })
                            .collect();
                        for (&i, page_boxes) in chunk.iter().zip(found) {
                            boxes[i] = page_boxes;
                        }
                    }
                    // Retry alone, so that whatever broke the batch only fails its own page.
                    Err(_) if chunk.len() > 1 => {
                        for &i in chunk {
                            let Some(input) = inputs[i].as_ref() else {
                                continue;
                            };
                            match self.run_detector(&[input]).map(|mut m| m.pop()) {
                                Ok(Some(map)) => {
                                    boxes[i] =
                                        boxes_for(&map, Some(input), prepared[i].as_ref(), db)
                                }
                                Ok(None) => {
                                    failed[i] =
                                        Some(Error::BadInput("detector returned nothing".into()))
                                }
                                Err(e) => failed[i] = Some(e),
                            }
                        }
                    }
                    Err(e) => failed[chunk[0]] = Some(e),
                }
            }
        }
        boxes
    }

    /// One detector forward; returns each page's probability map as a flat H×W buffer.
    fn run_detector(&self, batch: &[&DetInput]) -> Result<Vec<Vec<f32>>> {
        let x = preprocess::det_batch_tensor(batch, &self.device)?;
        let y = self.det.detect(&x)?;
        let (n, _, h, w) = y.dims4()?;
        let first = batch.first().map(|i| (i.height as usize, i.width as usize));
        if n != batch.len() || Some((h, w)) != first {
            return Err(Error::InvalidModel(format!(
                "detector returned {:?} for an input of {:?}",
                y.dims(),
                x.dims()
            )));
        }
        let flat: Vec<f32> = y
            .narrow(1, 0, 1)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        Ok(flat.chunks_exact(h * w).map(<[f32]>::to_vec).collect())
    }

    /// Text and confidence per line (`None` where its page already failed).
    fn recognize_lines(
        &self,
        lines: &[PendingLine],
        failed: &mut [Option<Error>],
    ) -> Vec<Option<(String, f32)>> {
        let mut out: Vec<Option<(String, f32)>> = vec![None; lines.len()];
        let ratios: Vec<f64> = lines
            .iter()
            .map(|l| preprocess::aspect_ratio(&l.crop))
            .collect();
        let plan = preprocess::plan_rec_batches(
            &ratios,
            self.config.rec_batch_size,
            self.config.rec_max_width_growth,
        );
        for batch in plan {
            match self.run_recognizer(lines, &batch) {
                Ok(decoded) => {
                    for (i, d) in batch.into_iter().zip(decoded) {
                        out[i] = Some(d);
                    }
                }
                Err(_) if batch.len() > 1 => {
                    for i in batch {
                        match self.run_recognizer(lines, &[i]).map(|mut d| d.pop()) {
                            Ok(d) => out[i] = d,
                            Err(e) => {
                                failed[lines[i].page].get_or_insert(e);
                            }
                        }
                    }
                }
                Err(e) => {
                    if let Some(&i) = batch.first() {
                        failed[lines[i].page].get_or_insert(e);
                    }
                }
            }
        }
        out
    }

    fn run_recognizer(&self, lines: &[PendingLine], batch: &[usize]) -> Result<Vec<(String, f32)>> {
        let crops: Vec<&RgbImage> = batch.iter().map(|&i| &lines[i].crop).collect();
        let x = preprocess::rec_batch_tensor(&crops, &self.device)?;
        let (y, c) = self.rec.recognize_top1(&x)?;
        let (n, t, _) = y.dims3()?;
        if n != batch.len() {
            return Err(Error::InvalidModel(format!(
                "recogniser returned {n} rows for a batch of {}",
                batch.len()
            )));
        }
        let decoder = if c == self.full_labels.num_classes() {
            &self.full_labels
        } else if c == self.bare_labels.num_classes() {
            &self.bare_labels
        } else {
            return Err(Error::InvalidModel(format!(
                "recogniser predicts {c} classes but its dictionary has {} entries",
                self.full_labels.num_classes()
            )));
        };
        let steps: Vec<f32> = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Ok(steps
            .chunks_exact((t * 2).max(1))
            .take(n)
            .map(|row| {
                let d = decoder.decode_top1(row);
                (d.text, d.confidence)
            })
            .collect())
    }
}

fn boxes_for(
    map: &[f32],
    input: Option<&DetInput>,
    prep: Option<&PreparedPage>,
    db: &DbParams,
) -> Vec<DetBox> {
    let (Some(input), Some(prep)) = (input, prep) else {
        return Vec::new();
    };
    postprocess::boxes_from_map(
        map,
        input.width as usize,
        input.height as usize,
        prep.image.width(),
        prep.image.height(),
        db,
    )
}

/// Lines in reading order → text. The detector often splits one printed line
/// into several boxes (words, or at wide gaps); a newline between them would
/// invent a line break, so a line whose vertical centre lies within the
/// previous line's vertical extent continues that row after a space.
fn page_text(lines: &[Line]) -> String {
    let mut text = String::new();
    let mut previous: Option<(f32, f32)> = None;
    for line in lines {
        let ys = line.polygon.map(|p| p[1]);
        let top = ys.iter().copied().fold(f32::INFINITY, f32::min);
        let bottom = ys.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let centre = (top + bottom) / 2.0;
        match previous {
            Some((prev_top, prev_bottom)) if (prev_top..=prev_bottom).contains(&centre) => {
                text.push(' ')
            }
            Some(_) => text.push('\n'),
            None => {}
        }
        text.push_str(&line.text);
        previous = Some((top, bottom));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn line(text: &str, x: [f32; 2], y: [f32; 2]) -> Line {
        Line {
            text: text.into(),
            confidence: 1.0,
            polygon: [[x[0], y[0]], [x[1], y[0]], [x[1], y[1]], [x[0], y[1]]],
        }
    }

    #[test]
    fn boxes_on_one_row_read_as_one_line() {
        let lines = [
            line("Hello OCR", [10.0, 120.0], [10.0, 40.0]),
            line("world", [130.0, 200.0], [12.0, 41.0]),
            line("Total:", [10.0, 80.0], [60.0, 90.0]),
            line("1,234.50", [90.0, 180.0], [58.0, 88.0]),
            line("Thanks", [10.0, 90.0], [110.0, 140.0]),
        ];
        assert_eq!(
            page_text(&lines),
            "Hello OCR world\nTotal: 1,234.50\nThanks"
        );
        assert_eq!(page_text(&[]), "");
    }

    #[test]
    fn variants_parse_and_name_their_files() {
        assert_eq!(
            "v6-small".parse::<ModelVariant>(),
            Ok(ModelVariant::V6Small)
        );
        assert_eq!(
            " V6-TINY ".parse::<ModelVariant>(),
            Ok(ModelVariant::V6Tiny)
        );
        assert!("v4".parse::<ModelVariant>().is_err());
        assert_eq!(ModelVariant::V6Small.det_file(), "ppocrv6_small_det.onnx");
        assert_eq!(ModelVariant::V5Mobile.rec_file(), "ppocrv5_mobile_rec.onnx");
        assert_eq!(ModelVariant::V6Tiny.dict_file(), "ppocrv6_tiny_dict.txt");
        assert_eq!(ModelVariant::V5Mobile.dict_file(), "ppocrv5_dict.txt");
        assert_eq!(
            serde_json::to_string(&ModelVariant::V5Mobile).unwrap(),
            "\"v5-mobile\""
        );
        for v in ModelVariant::ALL {
            assert_eq!(v.to_string().parse::<ModelVariant>(), Ok(v));
        }
    }

    #[test]
    fn missing_models_are_reported_by_path() {
        let dir = std::env::temp_dir().join("ocr-engine-no-models-here");
        match OcrEngine::load(ModelVariant::V6Tiny, &dir, &Device::Cpu) {
            Err(Error::ModelNotFound(p)) => assert!(p.ends_with("ppocrv6_tiny_det.onnx")),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("loaded models from an empty directory"),
        }
    }

    /// Stands in for DBNet: every pixel with any channel darker than mid-grey is text.
    struct DarkPixelDetector {
        calls: AtomicUsize,
    }

    impl TextDetector for DarkPixelDetector {
        fn detect(&self, x: &Tensor) -> Result<Tensor> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(x.min_keepdim(1)?.lt(0.0)?.to_dtype(DType::F32)?)
        }
    }

    /// Stands in for the recogniser: names the colour of the first non-white pixel on the
    /// middle row ("r", "g" or "b"), so each line's text tells which rectangle it came from.
    struct ColourNamer {
        dict: Vec<String>,
        batches: std::sync::Mutex<Vec<usize>>,
    }

    impl TextRecognizer for ColourNamer {
        fn recognize(&self, x: &Tensor) -> Result<Tensor> {
            let (n, _, h, w) = x.dims4()?;
            self.batches
                .lock()
                .map_err(|_| Error::BadInput("poisoned".into()))?
                .push(n);
            let rows: Vec<Vec<Vec<f32>>> = x.narrow(2, h / 2, 1)?.squeeze(2)?.to_vec3()?;
            let (t, c) = (w / 8, self.dict.len() + 2);
            let mut out = vec![0f32; n * t * c];
            for (i, planes) in rows.iter().enumerate() {
                // Planes are B, G, R; white is 1.0 everywhere.
                let class = (0..w)
                    .find(|&x| planes.iter().any(|p| p[x] < 0.5))
                    .map(|x| {
                        let (b, g, r) = (planes[0][x], planes[1][x], planes[2][x]);
                        if r >= g && r >= b {
                            1
                        } else if g >= b {
                            2
                        } else {
                            3
                        }
                    })
                    .unwrap_or(0);
                for step in 0..t {
                    let k = if step == 1 { class } else { 0 };
                    out[(i * t + step) * c + k] = 0.9;
                    out[(i * t + step) * c + (k + 1) % c] = 0.1;
                }
            }
            Ok(Tensor::from_vec(out, (n, t, c), x.device())?)
        }

        fn dictionary(&self) -> &[String] {
            &self.dict
        }
    }

    fn fake_engine() -> OcrEngine<DarkPixelDetector, ColourNamer> {
        OcrEngine::from_models(
            DarkPixelDetector {
                calls: AtomicUsize::new(0),
            },
            ColourNamer {
                dict: vec!["r".into(), "g".into(), "b".into()],
                batches: std::sync::Mutex::new(Vec::new()),
            },
            Device::Cpu,
        )
    }

    fn page_with(w: u32, h: u32, rects: &[(u32, u32, u32, u32, [u8; 3])]) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            for &(rx, ry, rw, rh, c) in rects {
                if x >= rx && x < rx + rw && y >= ry && y < ry + rh {
                    return image::Rgb(c);
                }
            }
            image::Rgb([255, 255, 255])
        })
    }

    fn png(img: &RgbImage) -> Vec<u8> {
        let mut out = Vec::new();
        image::DynamicImage::ImageRgb8(img.clone())
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .expect("encoding a test image cannot fail");
        out
    }

    const RED: [u8; 3] = [220, 0, 0];
    const GREEN: [u8; 3] = [0, 160, 0];
    const BLUE: [u8; 3] = [0, 0, 220];

    #[test]
    fn batch_keeps_order_isolates_bad_images_and_shares_recogniser_batches() {
        let engine = fake_engine();
        // Green is drawn first but sits lower: reading order must put red first.
        let two_lines = page_with(
            400,
            300,
            &[(40, 200, 250, 24, GREEN), (60, 60, 200, 20, RED)],
        );
        let one_line = page_with(300, 200, &[(50, 90, 180, 22, BLUE)]);
        let images: Vec<Vec<u8>> = vec![png(&two_lines), b"not an image".to_vec(), png(&one_line)];
        let results = engine.recognize_batch(&images);
        assert_eq!(results.len(), 3);

        let page = results[0].as_ref().expect("first image is fine");
        assert_eq!((page.width, page.height), (400, 300));
        let texts: Vec<&str> = page.lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, vec!["r", "g"]);
        assert_eq!(page.text, "r\ng");
        // The polygon surrounds the drawn rectangle, grown by DB's unclip.
        let [tl, tr, br, bl] = page.lines[0].polygon;
        assert!(
            tl[0] < 60.0 && tl[1] < 60.0 && br[0] > 260.0 && br[1] > 80.0,
            "{:?}",
            page.lines[0]
        );
        assert!(
            tl[0] > 20.0 && tl[1] > 30.0 && br[0] < 290.0 && br[1] < 110.0,
            "{:?}",
            page.lines[0]
        );
        assert!(tr[0] > tl[0] && bl[1] > tl[1]);
        assert!((page.lines[0].confidence - 0.9).abs() < 1e-6);

        assert!(matches!(results[1], Err(Error::Decode(_))));
        let page = results[2].as_ref().expect("third image is fine");
        assert_eq!(page.text, "b");
        assert_eq!((page.width, page.height), (300, 200));

        // Three lines from two pages went through one recogniser forward.
        let batches = engine.rec.batches.lock().unwrap().clone();
        assert_eq!(batches, vec![3]);
    }

    #[test]
    fn same_size_pages_share_a_detector_forward() {
        let engine = fake_engine();
        let a = page_with(320, 240, &[(40, 100, 200, 24, RED)]);
        let b = page_with(320, 240, &[(40, 60, 200, 24, BLUE)]);
        let c = page_with(500, 240, &[(40, 60, 300, 24, GREEN)]);
        let results = engine.recognize_images(&[&a, &b, &c]);
        let texts: Vec<String> = results.into_iter().map(|r| r.unwrap().text).collect();
        assert_eq!(texts, vec!["r", "b", "g"]);
        assert_eq!(engine.det.calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn blank_pages_and_low_confidence_lines_give_empty_pages() {
        let engine = fake_engine();
        let blank = RgbImage::from_pixel(200, 100, image::Rgb([255, 255, 255]));
        let page = engine.recognize_image(&blank).unwrap();
        assert!(page.lines.is_empty() && page.text.is_empty());

        let strict = fake_engine().with_config(PipelineConfig {
            text_score: 0.95,
            ..PipelineConfig::default()
        });
        let page = strict
            .recognize_image(&page_with(300, 200, &[(50, 90, 180, 22, BLUE)]))
            .unwrap();
        assert!(page.lines.is_empty());
    }

    #[test]
    fn tiny_images_give_a_page_not_an_error() {
        // A tiny 1-pixel image cannot reach the detector; it still yields a page, not an error.
        let engine = fake_engine();
        let dot = RgbImage::from_pixel(1, 1, image::Rgb([0, 0, 0]));
        let page = engine.recognize(&png(&dot)).unwrap();
        assert_eq!((page.width, page.height), (1, 1));
    }

    #[test]
    fn exif_rotation_is_applied_before_detection() {
        // Stored 300×200 with a horizontal bar; EXIF 6 shows it turned clockwise, 200×300 with
        // a vertical bar at x ∈ [148, 170), y ∈ [20, 200). The tall crop is turned upright
        // for the recogniser, and the polygon is reported in the displayed frame.
        let stored = page_with(300, 200, &[(20, 30, 180, 22, RED)]);
        let bytes = crate::decode::tests::jpeg_with_orientation(&stored, 6);
        let page = fake_engine().recognize(&bytes).unwrap();
        assert_eq!((page.width, page.height), (200, 300));
        assert_eq!(page.text, "r");
        let poly = page.lines[0].polygon;
        let (xs, ys): (Vec<f32>, Vec<f32>) = poly.iter().map(|p| (p[0], p[1])).unzip();
        let (x0, x1) = (
            xs.iter().copied().fold(f32::MAX, f32::min),
            xs.iter().copied().fold(0.0, f32::max),
        );
        let (y0, y1) = (
            ys.iter().copied().fold(f32::MAX, f32::min),
            ys.iter().copied().fold(0.0, f32::max),
        );
        assert!(
            x0 > 120.0 && x0 < 148.0 && x1 > 170.0 && x1 < 200.0,
            "{poly:?}"
        );
        assert!(y0 < 20.0 && y1 > 200.0 && y1 < 240.0, "{poly:?}");
    }

    #[test]
    fn engine_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<OcrEngine>();
    }

    #[test]
    fn config_accepts_partial_json() {
        let json =
            r#"{"text_score": 0.7, "db": {"box_thresh": 0.6}, "decode": {"max_pixels": 1000}}"#;
        let config: PipelineConfig = serde_json::from_str(json).unwrap();
        assert_eq!(config.text_score, 0.7);
        assert_eq!(config.db.box_thresh, 0.6);
        assert_eq!(config.db.unclip_ratio, DbParams::default().unclip_ratio);
        assert_eq!(config.decode.max_pixels, 1000);
        assert_eq!(config.decode.max_bytes, DecodeLimits::default().max_bytes);
        assert_eq!(
            config.rec_batch_size,
            PipelineConfig::default().rec_batch_size
        );
    }

    #[test]
    fn page_serialises_to_json() {
        let page = Page {
            width: 10,
            height: 20,
            lines: vec![Line {
                text: "hi".into(),
                confidence: 0.5,
                polygon: [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]],
            }],
            text: "hi".into(),
        };
        let json = serde_json::to_string(&page).unwrap();
        assert!(
            json.contains("\"polygon\":[[0.0,0.0],[1.0,0.0],[1.0,1.0],[0.0,1.0]]"),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Page>(&json).unwrap(), page);
    }
}
