//! Layers shared by the detector and the recogniser, built from [`ConvSpec`]/[`LinearSpec`]s.
//!
//! Convolutions pick a kernel by shape: 1x1 convs run as one matmul, depthwise convs run through
//! [`depthwise_conv2d`] (a direct CPU loop, or shifted multiply-adds on other devices), and the
//! few dense convs go to candle's `conv2d`. candle's grouped conv2d would instead launch one conv
//! per channel, which made the depthwise layers dominate the runtime.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Module, Shape, Tensor, D};
use rayon::prelude::*;

use super::graph::{Activation, ConvSpec, LayerNormSpec, LinearSpec};
use crate::error::Result;

impl Activation {
    pub fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match *self {
            Activation::None => Ok(x.clone()),
            Activation::Relu => x.relu(),
            Activation::GeluErf => gelu_erf(x),
            Activation::Swish => x.silu(),
            Activation::Sigmoid => candle_nn::ops::sigmoid(x),
            Activation::HardSigmoid { alpha, beta } => hard_sigmoid(x, alpha, beta),
            Activation::HardSwish { alpha, beta } => x.mul(&hard_sigmoid(x, alpha, beta)?),
        }
    }
}

/// Exact (erf) GELU. On the CPU, results below the smallest normal f32 are flushed to zero:
/// the PP-OCRv6 weights drive whole channels to pre-activations near -13, where GELU's output
/// is subnormal, and subnormal operands slow the following matmul on x86 by 50x or more. The
/// flush changes values by less than 1.2e-38.
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1_no_bwd(&GeluErfFtz)
    } else {
        x.gelu_erf()
    }
}

/// The f32 data a CPU custom op works on; the ops here only take contiguous f32.
fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{op}: only f32 is supported on the CPU");
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: input must be contiguous");
    };
    Ok(&data[start..end])
}

struct GeluErfFtz;

impl candle_core::CustomOp1 for GeluErfFtz {
    fn name(&self) -> &'static str {
        "gelu-erf-ftz"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "gelu")?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(16 * 1024)
            .zip(x.par_chunks(16 * 1024))
            .for_each(|(o, i)| {
                for (o, &v) in o.iter_mut().zip(i) {
                    // Below -10 the result is under 1e-22 in magnitude, and erff's tail
                    // computation hits subnormal intermediates, which are slow.
                    let y = (erf_fast(v * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * v;
                    *o = if y.abs() < f32::MIN_POSITIVE { 0.0 } else { y };
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// erf as a branch-free rational function of `x^2` on `[-4, 4]` (the approximation Eigen and
/// XLA use for f32; absolute error about 1e-7, see the test). It vectorises, unlike libm's erff,
/// which was the largest cost of GELU.
#[inline(always)]
fn erf_fast(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906_3e-4;
    p = p * x2 - 2.954_6e-3;
    p = p * x2 - 1.609_603_3e-2;
    let mut q = x2 * -1.456_607_2e-5 - 2.133_740_6e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329e-3;
    q = q * x2 - 1.426_474e-2;
    x * p / q
}

pub fn hard_sigmoid(x: &Tensor, alpha: f32, beta: f32) -> candle_core::Result<Tensor> {
    x.affine(f64::from(alpha), f64::from(beta))?
        .clamp(0f32, 1f32)
}

#[derive(Debug, Clone)]
enum ConvKind {
    /// 1x1, stride 1, no padding, one group: `weight` is `[out, in]`.
    Pointwise,
    /// One filter per channel: `weight` is `[c, 1, kh, kw]`.
    Depthwise,
    /// Grouped convs that are not depthwise, through candle's conv2d.
    Dense,
    /// Ungrouped kxk convs as strided-phase shifted matmuls (see [`PhaseGemm`]).
    Phase(PhaseGemm),
    /// ConvTranspose whose kernel equals its stride and has no padding: each input pixel
    /// expands to its own `kh x kw` output patch, so it is one matmul plus a pixel shuffle.
    /// `weight` is `[out * kh * kw, in]`.
    TransposePatch,
    /// Any other ConvTranspose, through candle's conv_transpose2d.
    Transpose,
}

/// A 2-D convolution (or transposed convolution) with optional bias and fused activation.
#[derive(Debug, Clone)]
pub struct Conv2d {
    kind: ConvKind,
    weight: Tensor,
    bias: Option<Tensor>,
    stride: (usize, usize),
    pads: [usize; 4],
    groups: usize,
    in_channels: usize,
    out_channels: usize,
    kernel: (usize, usize),
    activation: Activation,
    /// `scale * y + shift` after the activation (see [`ConvSpec::post_affine`]).
    post_affine: Option<(f32, f32)>,
}

impl Conv2d {
    pub fn new(spec: ConvSpec, device: &Device) -> Result<Self> {
        let in_channels = spec.in_channels();
        let out_channels = spec.out_channels();
        let kernel = spec.kernel();
        let (kind, weight) = if spec.transpose {
            if spec.groups == 1
                && spec.stride == kernel
                && spec.pads == [0; 4]
                && kernel.0 > 0
                && kernel.1 > 0
            {
                // [in, out, kh, kw] -> [out * kh * kw, in]
                let w = spec
                    .weight
                    .reshape((in_channels, out_channels * kernel.0 * kernel.1))?
                    .t()?
                    .contiguous()?;
                (ConvKind::TransposePatch, w)
            } else {
                (ConvKind::Transpose, spec.weight.clone())
            }
        } else if spec.groups == 1
            && kernel == (1, 1)
            && spec.stride == (1, 1)
            && spec.pads == [0; 4]
        {
            let w = spec.weight.reshape((out_channels, in_channels))?;
            (ConvKind::Pointwise, w)
        } else if spec.is_depthwise() {
            (ConvKind::Depthwise, spec.weight.clone())
        } else if spec.groups == 1 && out_channels <= 2 * in_channels {
            // The phase matmuls write `taps * out` rows per pixel where im2col copies
            // `taps * in`; with few input channels (the RGB stem) im2col is the smaller one.
            let pg = PhaseGemm::new(&spec.weight, spec.stride, device)?;
            (ConvKind::Phase(pg), spec.weight.clone())
        } else {
            (ConvKind::Dense, spec.weight.clone())
        };
        let bias = match spec.bias {
            Some(b) => Some(b.to_device(device)?),
            // The depthwise kernel always adds a bias; zeros keep it a single code path.
            None if matches!(kind, ConvKind::Depthwise) => {
                Some(Tensor::zeros(out_channels, DType::F32, device)?)
            }
            None => None,
        };
        Ok(Self {
            kind,
            weight: weight.to_device(device)?,
            bias,
            stride: spec.stride,
            pads: spec.pads,
            groups: spec.groups,
            in_channels,
            out_channels,
            kernel,
            activation: spec.activation,
            post_affine: spec.post_affine,
        })
    }

    pub fn in_channels(&self) -> usize {
        self.in_channels
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    pub fn stride(&self) -> (usize, usize) {
        self.stride
    }

    pub fn activation(&self) -> Activation {
        self.activation
    }

    fn forward_linear(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        if c != self.in_channels {
            candle_core::bail!(
                "conv expects {} input channels, got {c} (input {:?})",
                self.in_channels,
                x.dims()
            );
        }
        match self.kind {
            ConvKind::Pointwise => {
                let x3 = x.reshape((n, c, h * w))?;
                let y = if n == 1 {
                    self.weight.matmul(&x3.squeeze(0)?)?.unsqueeze(0)?
                } else {
                    self.weight.broadcast_left(n)?.matmul(&x3.contiguous()?)?
                };
                let y = match &self.bias {
                    Some(b) => y.broadcast_add(&b.reshape((1, self.out_channels, 1))?)?,
                    None => y,
                };
                y.reshape((n, self.out_channels, h, w))
            }
            ConvKind::Depthwise => {
                let bias = match &self.bias {
                    Some(b) => b.clone(),
                    None => Tensor::zeros(self.out_channels, DType::F32, x.device())?,
                };
                depthwise_conv2d(x, &self.weight, &bias, self.stride, self.pads)
            }
            ConvKind::Phase(ref pg) => {
                let y = pg.forward(x, self.pads)?;
                match &self.bias {
                    Some(b) => y.broadcast_add(&b.reshape((1, self.out_channels, 1, 1))?),
                    None => Ok(y),
                }
            }
            ConvKind::Dense => {
                let [t, l, b, r] = self.pads;
                let (x, pad) = if t == b && l == r && t == l {
                    (x.clone(), t)
                } else {
                    (x.pad_with_zeros(2, t, b)?.pad_with_zeros(3, l, r)?, 0)
                };
                let y = if self.stride.0 == self.stride.1 {
                    x.conv2d(&self.weight, pad, self.stride.0, 1, self.groups)?
                } else {
                    let y = x.conv2d(&self.weight, pad, 1, 1, self.groups)?;
                    subsample(&subsample(&y, 2, self.stride.0)?, 3, self.stride.1)?
                };
                match &self.bias {
                    Some(b) => y.broadcast_add(&b.reshape((1, self.out_channels, 1, 1))?),
                    None => Ok(y),
                }
            }
            ConvKind::TransposePatch => {
                let (kh, kw) = self.kernel;
                let o = self.out_channels;
                let x3 = x.reshape((n, c, h * w))?;
                let y = if n == 1 {
                    self.weight.matmul(&x3.squeeze(0)?)?.unsqueeze(0)?
                } else {
                    self.weight.broadcast_left(n)?.matmul(&x3.contiguous()?)?
                };
                // [n, o*kh*kw, h*w] -> [n, o, h, kh, w, kw] -> [n, o, h*kh, w*kw]
                let y = y
                    .reshape((n, o, kh, kw, h, w))?
                    .permute((0, 1, 4, 2, 5, 3))?
                    .reshape((n, o, h * kh, w * kw))?;
                match &self.bias {
                    Some(b) => y.broadcast_add(&b.reshape((1, o, 1, 1))?),
                    None => Ok(y),
                }
            }
            ConvKind::Transpose => {
                if self.stride.0 != self.stride.1
                    || self.pads.iter().any(|&p| p != self.pads[0])
                    || self.groups != 1
                {
                    candle_core::bail!(
                        "transposed conv with strides {:?}, pads {:?}, groups {} is not supported",
                        self.stride,
                        self.pads,
                        self.groups
                    );
                }
                let y = x.conv_transpose2d(&self.weight, self.pads[0], 0, self.stride.0, 1)?;
                match &self.bias {
                    Some(b) => y.broadcast_add(&b.reshape((1, self.out_channels, 1, 1))?),
                    None => Ok(y),
                }
            }
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.activation.apply(&self.forward_linear(x)?)?;
        match self.post_affine {
            Some((scale, shift)) => y.affine(f64::from(scale), f64::from(shift)),
            None => Ok(y),
        }
    }
}

/// A dense (ungrouped) convolution computed as a few large matmuls instead of im2col.
///
/// The zero-padded input is split into `sh * sw` stride phases (`phase[a][b][i][j] =
/// x[i * sh + a][j * sw + b]`), so every kernel tap `(ky, kx)` reads one phase shifted by
/// `(ky / sh, kx / sw)` with unit stride. All taps of a phase are stacked into one `[taps * out,
/// in]` matrix and multiplied with the flattened phase in a single matmul; each tap's slice of
/// the product, shifted by its flat offset `dy * width + dx`, is then summed. Shifting in the
/// flattened image wraps rows around, which only pollutes columns past the output width, and
/// those are cut off at the end. Unlike candle's im2col conv2d this never materialises a
/// `kh * kw` times larger copy of the input, which made the 3x3 convs at 1/4 resolution of the
/// detector the slowest layers.
#[derive(Debug, Clone)]
pub struct PhaseGemm {
    stride: (usize, usize),
    kernel: (usize, usize),
    out_channels: usize,
    phases: Vec<Phase>,
}

/// The taps of a [`PhaseGemm`] that read stride phase `index = a * sw + b`.
#[derive(Debug, Clone)]
struct Phase {
    index: usize,
    /// The taps' weights stacked: `[taps * out, in]`.
    weight: Tensor,
    /// Each tap's `(rows, columns)` shift within the phase.
    shifts: Vec<(usize, usize)>,
}

impl PhaseGemm {
    fn new(weight: &Tensor, stride: (usize, usize), device: &Device) -> candle_core::Result<Self> {
        let (o, c, kh, kw) = weight.dims4()?;
        let (sh, sw) = stride;
        let mut phases = Vec::new();
        for a in 0..sh.min(kh) {
            for b in 0..sw.min(kw) {
                let mut mats = Vec::new();
                let mut shifts = Vec::new();
                for ky in (a..kh).step_by(sh) {
                    for kx in (b..kw).step_by(sw) {
                        mats.push(weight.narrow(2, ky, 1)?.narrow(3, kx, 1)?.reshape((o, c))?);
                        shifts.push((ky / sh, kx / sw));
                    }
                }
                let stacked = Tensor::cat(&mats, 0)?.contiguous()?.to_device(device)?;
                phases.push(Phase {
                    index: a * sw + b,
                    weight: stacked,
                    shifts,
                });
            }
        }
        Ok(Self {
            stride,
            kernel: (kh, kw),
            out_channels: o,
            phases,
        })
    }

    fn forward(&self, x: &Tensor, pads: [usize; 4]) -> candle_core::Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let (sh, sw) = self.stride;
        let (kh, kw) = self.kernel;
        let [pt, pl, pb, pr] = pads;
        let (hp, wp) = (h + pt + pb, w + pl + pr);
        if hp < kh || wp < kw {
            candle_core::bail!("conv input {:?} smaller than kernel {kh}x{kw}", x.dims());
        }
        let (ho, wo) = ((hp - kh) / sh + 1, (wp - kw) / sw + 1);
        // Phase grid: enough rows/columns for every tap's shift, plus one spare row so the
        // flattened shifts of the last output row stay in bounds.
        let (hh, wh) = ((kh - 1) / sh + ho + 1, (kw - 1) / sw + wo);
        let x = fit(x, 2, pt, hh * sh)?;
        let x = fit(&x, 3, pl, wh * sw)?;
        let phased = if sh == 1 && sw == 1 {
            x.reshape((n, 1, c, hh * wh))?
        } else {
            x.reshape((n, c, hh, sh, wh, sw))?
                .permute((0, 3, 5, 1, 2, 4))?
                .contiguous()?
                .reshape((n, sh * sw, c, hh * wh))?
        };
        let o = self.out_channels;
        let mut acc: Option<Tensor> = None;
        for Phase {
            index,
            weight: wmat,
            shifts,
        } in &self.phases
        {
            let p = phased.narrow(1, *index, 1)?.squeeze(1)?;
            let y = if n == 1 {
                wmat.matmul(&p.squeeze(0)?)?.unsqueeze(0)?
            } else {
                wmat.broadcast_left(n)?.matmul(&p.contiguous()?)?
            };
            let offsets: Vec<usize> = shifts.iter().map(|&(dy, dx)| dy * wh + dx).collect();
            let part = shifted_sum(&y, o, &offsets, ho * wh)?;
            acc = Some(match acc {
                Some(acc) => (acc + part)?,
                None => part,
            });
        }
        let Some(acc) = acc else {
            candle_core::bail!("conv without kernel taps");
        };
        acc.reshape((n, o, ho, wh))?.narrow(3, 0, wo)
    }
}

/// `y`: `[n, taps * o, l]`. Returns `[n, o, len]` with
/// `out[:, c, i] = sum_t y[:, t * o + c, offsets[t] + i]`.
fn shifted_sum(y: &Tensor, o: usize, offsets: &[usize], len: usize) -> candle_core::Result<Tensor> {
    if y.device().is_cpu() && y.dtype() == DType::F32 {
        return y.contiguous()?.apply_op1_no_bwd(&ShiftedSum {
            o,
            offsets: offsets.to_vec(),
            len,
        });
    }
    shifted_sum_generic(y, o, offsets, len)
}

/// [`shifted_sum`] from narrow + add, for devices without the fused kernel.
fn shifted_sum_generic(
    y: &Tensor,
    o: usize,
    offsets: &[usize],
    len: usize,
) -> candle_core::Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for (t, &off) in offsets.iter().enumerate() {
        let part = y.narrow(1, t * o, o)?.narrow(2, off, len)?;
        acc = Some(match acc {
            Some(acc) => (acc + part)?,
            None => part.contiguous()?,
        });
    }
    acc.ok_or_else(|| candle_core::Error::Msg("shifted sum without taps".into()))
}

struct ShiftedSum {
    o: usize,
    offsets: Vec<usize>,
    len: usize,
}

impl candle_core::CustomOp1 for ShiftedSum {
    fn name(&self) -> &'static str {
        "shifted-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = contiguous_f32(s, l, "shifted sum")?;
        let (n, rows, cols) = l.shape().dims3()?;
        let (o, len) = (self.o, self.len);
        if rows != o * self.offsets.len() || self.offsets.iter().any(|&off| off + len > cols) {
            candle_core::bail!(
                "shifted sum: bad shape {:?} for {} taps",
                l.dims(),
                self.offsets.len()
            );
        }
        let mut out = vec![0f32; n * o * len];
        out.par_chunks_mut(len).enumerate().for_each(|(row, dst)| {
            let (b, c) = (row / o, row % o);
            for (t, &off) in self.offsets.iter().enumerate() {
                let src_row = (b * rows + t * o + c) * cols + off;
                let src = &y[src_row..src_row + len];
                if t == 0 {
                    dst.copy_from_slice(src);
                } else {
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d += s;
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, o, len))))
    }
}

/// Pads `dim` with `before` zeros in front and zeros (or a cut) at the end so it has length
/// `len`.
fn fit(x: &Tensor, dim: usize, before: usize, len: usize) -> candle_core::Result<Tensor> {
    let cur = x.dim(dim)? + before;
    let x = x.pad_with_zeros(dim, before, len.saturating_sub(cur))?;
    if cur > len {
        x.narrow(dim, 0, len)
    } else {
        Ok(x)
    }
}

/// Keeps every `step`-th element along `dim`, starting with the first.
pub fn subsample(x: &Tensor, dim: usize, step: usize) -> candle_core::Result<Tensor> {
    if step == 1 {
        return Ok(x.clone());
    }
    let len = x.dim(dim)?;
    let idx = Tensor::arange_step(0u32, len as u32, step as u32, x.device())?;
    x.index_select(&idx, dim)
}

/// Nearest-neighbour upsampling by integer factors (what ONNX Resize does with `nearest`,
/// `asymmetric`, `floor` and integer scales), as a broadcast instead of a gather.
pub fn upsample_nearest(x: &Tensor, fh: usize, fw: usize) -> candle_core::Result<Tensor> {
    if fh == 1 && fw == 1 {
        return Ok(x.clone());
    }
    let (n, c, h, w) = x.dims4()?;
    x.reshape((n, c, h, 1, w, 1))?
        .broadcast_as((n, c, h, fh, w, fw))?
        .reshape((n, c, h * fh, w * fw))
}

/// Depthwise 2-D convolution: `x` `[n, c, h, w]`, `weight` `[c, 1, kh, kw]`, `bias` `[c]`,
/// with independent vertical/horizontal strides and asymmetric zero padding
/// (`pads` = top, left, bottom, right).
pub fn depthwise_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: (usize, usize),
    pads: [usize; 4],
) -> candle_core::Result<Tensor> {
    let (_, c, h, w) = x.dims4()?;
    let (wc, one, kh, kw) = weight.dims4()?;
    if wc != c || one != 1 || bias.dims1()? != c {
        candle_core::bail!(
            "depthwise conv: input {:?}, weight {:?}, bias {:?} do not match",
            x.dims(),
            weight.dims(),
            bias.dims()
        );
    }
    if stride.0 == 0 || stride.1 == 0 || h + pads[0] + pads[2] < kh || w + pads[1] + pads[3] < kw {
        candle_core::bail!(
            "depthwise conv: input {:?} too small for kernel {kh}x{kw} with pads {pads:?}",
            x.dims()
        );
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        let op = DepthwiseConv { stride, pads };
        x.contiguous()?
            .apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op)
    } else {
        depthwise_conv2d_taps(x, weight, bias, stride, pads)
    }
}

/// Device-independent depthwise conv: one shifted multiply-add per kernel tap, at stride 1,
/// then subsampled. Slower than a fused kernel but only uses ops every backend has.
pub fn depthwise_conv2d_taps(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: (usize, usize),
    pads: [usize; 4],
) -> candle_core::Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    let (_, _, kh, kw) = weight.dims4()?;
    let [t, l, b, r] = pads;
    let xp = x.pad_with_zeros(2, t, b)?.pad_with_zeros(3, l, r)?;
    let (n, _, hp, wp) = xp.dims4()?;
    let (ho, wo) = (hp - kh + 1, wp - kw + 1);
    let w = weight.reshape((c, kh * kw))?;
    let mut acc = bias
        .reshape((1, c, 1, 1))?
        .broadcast_as((n, c, ho, wo))?
        .contiguous()?;
    for ky in 0..kh {
        for kx in 0..kw {
            let tap = xp.narrow(2, ky, ho)?.narrow(3, kx, wo)?;
            let wk = w.narrow(1, ky * kw + kx, 1)?.reshape((1, c, 1, 1))?;
            acc = (acc + tap.broadcast_mul(&wk)?)?;
        }
    }
    subsample(&subsample(&acc, 2, stride.0)?, 3, stride.1)
}

struct DepthwiseConv {
    stride: (usize, usize),
    pads: [usize; 4],
}

impl CustomOp3 for DepthwiseConv {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, b) = match (xs, ws, bs) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => (x, w, b),
            _ => candle_core::bail!("depthwise conv: only f32 is supported on the CPU"),
        };
        let (Some((xo, xe)), Some((wo, we)), Some((bo, be))) = (
            xl.contiguous_offsets(),
            wl.contiguous_offsets(),
            bl.contiguous_offsets(),
        ) else {
            candle_core::bail!("depthwise conv: inputs must be contiguous");
        };
        let (x, w, b) = (&x[xo..xe], &w[wo..we], &b[bo..be]);
        let (n, c, h, wd) = xl.shape().dims4()?;
        let (_, _, kh, kw) = wl.shape().dims4()?;
        let (sh, sw) = self.stride;
        let [pt, pl, pb, pr] = self.pads;
        let ho = (h + pt + pb - kh) / sh + 1;
        let wo = (wd + pl + pr - kw) / sw + 1;
        let mut out = vec![0f32; n * c * ho * wo];
        if ho * wo == 0 {
            return Ok((CpuStorage::F32(out), Shape::from((n, c, ho, wo))));
        }

        // For each kernel column kx, the range of output columns whose input column
        // ox * sw + kx - pl lies inside the image; computed once, used for every row.
        let col_range: Vec<(usize, usize)> = (0..kw)
            .map(|kx| {
                let first = pl.saturating_sub(kx).div_ceil(sw);
                let last = if wd + pl > kx {
                    ((wd + pl - kx - 1) / sw + 1).min(wo)
                } else {
                    0
                };
                (first.min(last), last)
            })
            .collect();

        out.par_chunks_mut(ho * wo)
            .enumerate()
            .for_each(|(plane, o)| {
                let ch = plane % c;
                let src = &x[plane * h * wd..(plane + 1) * h * wd];
                let k = &w[ch * kh * kw..(ch + 1) * kh * kw];
                o.fill(b[ch]);
                for oy in 0..ho {
                    let orow = &mut o[oy * wo..(oy + 1) * wo];
                    for ky in 0..kh {
                        let iy = oy * sh + ky;
                        if iy < pt || iy - pt >= h {
                            continue;
                        }
                        let irow = &src[(iy - pt) * wd..(iy - pt + 1) * wd];
                        for kx in 0..kw {
                            let wv = k[ky * kw + kx];
                            let (first, last) = col_range[kx];
                            if first >= last {
                                continue;
                            }
                            let ix0 = first * sw + kx - pl;
                            if sw == 1 {
                                // Contiguous on both sides, so this loop vectorises.
                                for (ov, iv) in orow[first..last].iter_mut().zip(&irow[ix0..]) {
                                    *ov += wv * iv;
                                }
                            } else {
                                for (ov, iv) in orow[first..last]
                                    .iter_mut()
                                    .zip(irow[ix0..].iter().step_by(sw))
                                {
                                    *ov += wv * iv;
                                }
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, c, ho, wo))))
    }
}

/// `x @ weight + bias` over the last axis, with a fused activation.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[in, out]`.
    weight: Tensor,
    bias: Option<Tensor>,
    activation: Activation,
}

impl Linear {
    pub fn new(spec: LinearSpec, device: &Device) -> Result<Self> {
        Ok(Self {
            weight: spec.weight.to_device(device)?,
            bias: spec.bias.map(|b| b.to_device(device)).transpose()?,
            activation: spec.activation,
        })
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[1]
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_f = dims.last().copied().unwrap_or(0);
        let rows = x.elem_count() / in_f.max(1);
        let y = x.reshape((rows, in_f))?.matmul(&self.weight)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = self.out_features();
        }
        self.activation.apply(&y.reshape(out_dims)?)
    }
}

#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn new(spec: LayerNormSpec, device: &Device) -> Result<Self> {
        Ok(Self {
            weight: spec.weight.to_device(device)?,
            bias: spec.bias.to_device(device)?,
            eps: spec.eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)
    }
}

/// Mean over the spatial axes, keeping them: `[n, c, h, w]` -> `[n, c, 1, 1]`.
pub fn global_avg_pool(x: &Tensor) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    x.reshape((n, c, h * w))?
        .mean_keepdim(D::Minus1)?
        .reshape((n, c, 1, 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kernel, stride, pads (top, left, bottom, right), input size
    type ConvCase = ((usize, usize), (usize, usize), [usize; 4], (usize, usize));

    fn seq(shape: &[usize], scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 97) as f32 / 97.0 - 0.5) * scale)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .expect("sub")
            .abs()
            .expect("abs")
            .flatten_all()
            .expect("flatten")
            .max(0)
            .expect("max")
            .to_scalar::<f32>()
            .expect("scalar")
    }

    /// Reference through candle's grouped conv2d (symmetric stride, explicit padding).
    fn reference(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        stride: (usize, usize),
        pads: [usize; 4],
    ) -> Tensor {
        let c = x.dim(1).expect("dim");
        let xp = x
            .pad_with_zeros(2, pads[0], pads[2])
            .and_then(|t| t.pad_with_zeros(3, pads[1], pads[3]))
            .expect("pad");
        let y = xp.conv2d(w, 0, 1, 1, c).expect("conv");
        let y = subsample(&subsample(&y, 2, stride.0).expect("s"), 3, stride.1).expect("s");
        y.broadcast_add(&b.reshape((1, c, 1, 1)).expect("r"))
            .expect("add")
    }

    #[test]
    fn depthwise_matches_grouped_conv() {
        let cases: &[ConvCase] = &[
            ((3, 3), (1, 1), [1, 1, 1, 1], (9, 11)),
            ((3, 3), (2, 2), [1, 1, 1, 1], (9, 11)),
            ((3, 3), (2, 1), [1, 1, 1, 1], (8, 10)),
            ((3, 3), (1, 2), [1, 1, 1, 1], (8, 10)),
            ((7, 7), (1, 1), [3, 3, 3, 3], (8, 9)),
            ((1, 7), (1, 1), [0, 3, 0, 3], (1, 12)),
            ((2, 2), (1, 1), [0, 0, 1, 1], (5, 6)),
            ((5, 5), (2, 2), [2, 2, 2, 2], (3, 4)),
        ];
        for &((kh, kw), stride, pads, (h, w)) in cases {
            let x = seq(&[2, 5, h, w], 2.0);
            let wt = seq(&[5, 1, kh, kw], 1.0);
            let b = seq(&[5], 1.0);
            let want = reference(&x, &wt, &b, stride, pads);
            let got = depthwise_conv2d(&x, &wt, &b, stride, pads).expect("dw");
            assert_eq!(got.dims(), want.dims(), "k {kh}x{kw} s {stride:?}");
            assert!(max_diff(&got, &want) < 1e-5, "k {kh}x{kw} s {stride:?}");
            let taps = depthwise_conv2d_taps(&x, &wt, &b, stride, pads).expect("taps");
            assert!(
                max_diff(&taps, &want) < 1e-5,
                "taps k {kh}x{kw} s {stride:?}"
            );
        }
    }

    #[test]
    fn phase_gemm_matches_conv2d() {
        let cases: &[ConvCase] = &[
            ((3, 3), (1, 1), [1, 1, 1, 1], (9, 11)),
            ((3, 3), (2, 2), [1, 1, 1, 1], (9, 11)),
            ((3, 3), (2, 2), [1, 1, 1, 1], (8, 10)),
            ((2, 2), (1, 1), [0, 0, 1, 1], (5, 6)),
            ((3, 3), (2, 1), [1, 1, 1, 1], (8, 7)),
            ((1, 1), (2, 2), [0, 0, 0, 0], (7, 8)),
            ((5, 3), (1, 1), [2, 1, 2, 1], (6, 6)),
        ];
        for &((kh, kw), stride, pads, (h, w)) in cases {
            for n in [1, 2] {
                let x = seq(&[n, 4, h, w], 2.0);
                let wt = seq(&[6, 4, kh, kw], 1.0);
                let pg = PhaseGemm::new(&wt, stride, &Device::Cpu).expect("new");
                let got = pg.forward(&x, pads).expect("phase");
                let xp = x
                    .pad_with_zeros(2, pads[0], pads[2])
                    .and_then(|t| t.pad_with_zeros(3, pads[1], pads[3]))
                    .expect("pad");
                let full = xp.conv2d(&wt, 0, 1, 1, 1).expect("conv");
                let want =
                    subsample(&subsample(&full, 2, stride.0).expect("s"), 3, stride.1).expect("s");
                assert_eq!(got.dims(), want.dims(), "k {kh}x{kw} s {stride:?}");
                assert!(
                    max_diff(&got, &want) < 1e-4,
                    "k {kh}x{kw} s {stride:?} n {n}"
                );
            }
        }
    }

    #[test]
    fn shifted_sum_kernel_matches_generic() {
        let y = seq(&[2, 3 * 4, 20], 1.0);
        let offsets = [0, 3, 7];
        let fused = shifted_sum(&y, 4, &offsets, 13).expect("fused");
        let generic = shifted_sum_generic(&y, 4, &offsets, 13).expect("generic");
        assert_eq!(fused.dims(), &[2, 4, 13]);
        assert!(max_diff(&fused, &generic) < 1e-6);
    }

    #[test]
    fn gelu_matches_candle() {
        let x = seq(&[3, 5, 7, 11], 30.0);
        let ours = gelu_erf(&x).expect("gelu");
        let candle = x.gelu_erf().expect("gelu");
        assert!(max_diff(&ours, &candle) < 1e-5);
    }

    #[test]
    fn erf_fast_is_accurate() {
        let mut worst = 0f32;
        for i in -100_000..=100_000 {
            let x = i as f32 * 1e-4;
            worst = worst.max((erf_fast(x) - libm::erff(x)).abs());
        }
        assert!(worst < 5e-7, "erf error {worst}");
    }

    #[test]
    fn upsample_repeats_pixels() {
        let x = Tensor::from_vec(vec![1f32, 2., 3., 4.], (1, 1, 2, 2), &Device::Cpu).expect("t");
        let y = upsample_nearest(&x, 2, 2).expect("up");
        let want = x.upsample_nearest2d(4, 4).expect("up");
        assert!(max_diff(&y, &want) == 0.0);
    }
}
