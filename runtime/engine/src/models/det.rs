//! DBNet text detectors: PP-OCRv6 (PPLCNetV4 backbone, RepLKFPN neck) and PP-OCRv5 mobile
//! (PPLCNetV3 backbone with per-stage projections, RSEFPN neck), both with the DB probability
//! head.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};

use super::graph::GraphWalker;
use super::layers::{add_upsampled_into, scale_channels_into, Conv2d};
use super::pplcnet::{PpLcNet, SqueezeExcite};
use crate::error::{Error, Result};
use crate::onnx::OnnxModel;

/// A conv followed by squeeze-excite, with the SE added back onto the conv output
/// (`y = c + se(c)`, the "shortcut" form both RepLKFPN branches use).
#[derive(Debug, Clone)]
struct ConvSe {
    convs: Vec<Conv2d>,
    se: SqueezeExcite,
}

impl ConvSe {
    /// Reads convs until the SE module, checking that channel counts chain.
    fn load(g: &mut GraphWalker, in_ch: usize, device: &Device) -> Result<Self> {
        let mut convs = Vec::new();
        let mut ch = in_ch;
        while !SqueezeExcite::comes_next(g)? {
            let c = g.next_conv_checked("FPN conv", Some(ch), None, None)?;
            ch = c.out_channels();
            convs.push(Conv2d::new(c, device)?);
            if convs.len() > 4 {
                return Err(g.error("FPN branch without a squeeze-excite module"));
            }
        }
        if convs.is_empty() {
            return Err(g.error("FPN branch starts with squeeze-excite, expected a conv"));
        }
        let se = SqueezeExcite::load(g, ch, device)?;
        Ok(Self { convs, se })
    }

    fn out_channels(&self) -> usize {
        self.convs.last().map(Conv2d::out_channels).unwrap_or(0)
    }
}

impl Module for ConvSe {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut y = x.clone();
        for c in &self.convs {
            y = c.forward(&y)?;
        }
        // y + y * gate, as one in-place scale.
        let gate = self.se.gate(&y)?;
        scale_channels_into(y, &gate, true)
    }
}

/// The FPN of both detectors: lateral 1x1 convs, top-down nearest-upsample adds, then per
/// level an output branch, all levels upsampled to 1/4 and concatenated. Every branch ends in a
/// shortcut SE. RepLKFPN (v6) builds its output branches from a large-kernel depthwise conv and
/// a pointwise conv; RSEFPN (v5) from one dense 3x3 conv.
#[derive(Debug, Clone)]
struct RepLkFpn {
    /// Lateral branches, deepest level first (the graph's order).
    ins: Vec<ConvSe>,
    /// Output branches, deepest level first.
    inp: Vec<ConvSe>,
}

impl RepLkFpn {
    fn load(g: &mut GraphWalker, stage_channels: &[usize], device: &Device) -> Result<Self> {
        let mut ins = Vec::new();
        for &c in stage_channels.iter().rev() {
            ins.push(ConvSe::load(g, c, device)?);
        }
        let width = ins[0].out_channels();
        if ins.iter().any(|b| b.out_channels() != width) {
            return Err(g.error("FPN lateral branches have different widths"));
        }
        let mut inp = Vec::new();
        for _ in stage_channels {
            inp.push(ConvSe::load(g, width, device)?);
        }
        Ok(Self { ins, inp })
    }

    fn out_channels(&self) -> usize {
        self.inp.iter().map(ConvSe::out_channels).sum()
    }

    /// Each level's output branch with the factor that upsamples it to the finest level; the
    /// network's output is their channel concatenation, which [`DbHead`] reads in parts.
    fn forward(&self, stages: &[Tensor]) -> candle_core::Result<Vec<(Tensor, usize)>> {
        // Top-down pathway, deepest first: out[i] = lateral[i] + up2(out[i-1]).
        let mut tops: Vec<Tensor> = Vec::with_capacity(stages.len());
        for (branch, x) in self.ins.iter().zip(stages.iter().rev()) {
            let lateral = branch.forward(x)?;
            let merged = match tops.last() {
                Some(prev) => {
                    let (_, _, h, w) = lateral.dims4()?;
                    let (_, _, ph, pw) = prev.dims4()?;
                    add_upsampled_into(lateral, prev, h / ph.max(1), w / pw.max(1))?
                }
                None => lateral,
            };
            tops.push(merged);
        }
        let outs = self
            .inp
            .iter()
            .zip(&tops)
            .map(|(b, x)| b.forward(x))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // The shallowest level sets the output size; the others are integer multiples below it.
        let Some(finest) = outs.last() else {
            candle_core::bail!("FPN without levels");
        };
        let (_, _, h, w) = finest.dims4()?;
        outs.iter()
            .map(|p| {
                let (_, _, ph, pw) = p.dims4()?;
                let (fh, fw) = (h / ph.max(1), w / pw.max(1));
                if fh != fw || ph * fh != h || pw * fw != w {
                    candle_core::bail!("FPN level {:?} does not upsample to {h}x{w}", p.dims());
                }
                Ok((p.clone(), fh))
            })
            .collect()
    }
}

/// PPLCNetV3's detection variant narrows each stage output with a 1x1 conv before the FPN
/// (PPLCNetV4 feeds the stages in directly). They run after the whole backbone in the graph,
/// so they are read as a group: one per stage, in stage order, each reading its stage's output
/// and read only by the FPN's lateral conv.
#[derive(Debug, Clone)]
struct StageProjections {
    convs: Vec<Conv2d>,
}

impl StageProjections {
    /// `None` if the graph goes straight from the backbone into the FPN.
    fn load(g: &mut GraphWalker, backbone: &PpLcNet, device: &Device) -> Result<Option<Self>> {
        let taps = backbone.stage_outputs();
        let channels = backbone.stage_channels();
        let mut convs = Vec::new();
        for (tap, &ch) in taps.iter().zip(&channels) {
            let Some(next) = g.peek_conv()? else { break };
            if next.input != *tap || next.kernel() != (1, 1) || !g.only_convs_read(&next.output) {
                break;
            }
            convs.push(Conv2d::new(
                g.next_conv_checked("stage projection", Some(ch), None, Some((1, 1)))?,
                device,
            )?);
        }
        match convs.len() {
            0 => Ok(None),
            n if n == taps.len() => Ok(Some(Self { convs })),
            n => Err(g.error(format!(
                "{n} of {} backbone stages have a projection conv",
                taps.len()
            ))),
        }
    }

    fn out_channels(&self) -> Vec<usize> {
        self.convs.iter().map(Conv2d::out_channels).collect()
    }

    fn forward(&self, stages: Vec<Tensor>) -> candle_core::Result<Vec<Tensor>> {
        self.convs
            .iter()
            .zip(&stages)
            .map(|(c, x)| c.forward(x))
            .collect()
    }
}

/// DB head (probability branch only, as exported): conv3x3 + ReLU, then two 2x transposed
/// convs, the last followed by a sigmoid. Batch norms (v5 keeps them after the transposed
/// convs) are folded in by the graph walker.
#[derive(Debug, Clone)]
struct DbHead {
    layers: Vec<Conv2d>,
}

impl DbHead {
    fn load(g: &mut GraphWalker, in_ch: usize, device: &Device) -> Result<Self> {
        let mut layers = Vec::new();
        let mut ch = in_ch;
        while g.peek_conv()?.is_some() {
            let c = g.next_conv_checked("DB head", Some(ch), None, None)?;
            ch = c.out_channels();
            layers.push(Conv2d::new(c, device)?);
        }
        if ch != 1 {
            return Err(g.error(format!("DB head ends with {ch} channels, expected 1")));
        }
        Ok(Self { layers })
    }
}

impl DbHead {
    /// The head on the channel concatenation of `parts` (each upsampled by its factor).
    fn forward(&self, parts: &[(Tensor, usize)]) -> candle_core::Result<Tensor> {
        let Some((first, rest)) = self.layers.split_first() else {
            candle_core::bail!("DB head without layers");
        };
        let mut y = first.forward_concat(parts)?;
        for l in rest {
            y = l.forward(&y)?;
        }
        Ok(y)
    }
}

/// The DBNet text detector.
#[derive(Debug, Clone)]
pub struct DetModel {
    backbone: PpLcNet,
    projections: Option<StageProjections>,
    neck: RepLkFpn,
    head: DbHead,
    device: Device,
    dtype: DType,
}

impl DetModel {
    /// Total downsampling of the backbone: input height and width must be multiples of this.
    pub const SIZE_MULTIPLE: usize = 32;

    /// Loads a PP-OCRv6 or PP-OCRv5 mobile detection ONNX export (weights only; the graph
    /// layout is checked).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::load_as(path, device, DType::F32)
    }

    /// [`Self::load`] computing in `dtype`: inputs are cast to it, the map comes back as f32.
    pub fn load_as(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let onnx = OnnxModel::read(path)?;
        Self::from_onnx(&onnx, device, dtype)
    }

    pub fn from_onnx(onnx: &OnnxModel, device: &Device, dtype: DType) -> Result<Self> {
        let mut g = GraphWalker::new(onnx).with_dtype(dtype);
        let backbone = PpLcNet::load(&mut g, device)?;
        let stages = backbone.stage_channels();
        if stages.len() != 4 {
            return Err(g.error(format!(
                "detector backbone has {} stages ({stages:?}), expected 4",
                stages.len()
            )));
        }
        let projections = StageProjections::load(&mut g, &backbone, device)?;
        let fpn_in = projections
            .as_ref()
            .map(StageProjections::out_channels)
            .unwrap_or(stages);
        let neck = RepLkFpn::load(&mut g, &fpn_in, device)?;
        let head = DbHead::load(&mut g, neck.out_channels(), device)?;
        g.finish()?;
        Ok(Self {
            backbone,
            projections,
            neck,
            head,
            device: device.clone(),
            dtype,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `x`: `[n, 3, h, w]` f32, normalised like PP-OCR's detector preprocessing, with `h` and
    /// `w` multiples of [`Self::SIZE_MULTIPLE`]. Returns the `[n, 1, h, w]` text probability map.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        if c != 3
            || h == 0
            || w == 0
            || h % Self::SIZE_MULTIPLE != 0
            || w % Self::SIZE_MULTIPLE != 0
        {
            return Err(Error::BadInput(format!(
                "detector input must be [n, 3, h, w] with h and w positive multiples of {}, got {:?}",
                Self::SIZE_MULTIPLE,
                x.dims()
            )));
        }
        let mut stages = self.backbone.forward_stages(&x.to_dtype(self.dtype)?)?;
        if let Some(p) = &self.projections {
            stages = p.forward(stages)?;
        }
        let levels = self.neck.forward(&stages)?;
        Ok(self.head.forward(&levels)?.to_dtype(DType::F32)?)
    }
}
