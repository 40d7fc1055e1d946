//! Layers shared by the detector and the recogniser, built from [`ConvSpec`]/[`LinearSpec`]s.
//!
//! Convolutions pick a kernel by shape: 1x1 convs run as one matmul, depthwise convs run through
//! [`depthwise_conv2d`] (a direct CPU loop, or shifted multiply-adds on other devices), other
//! ungrouped kxk convs as strided-phase matmuls over bands of rows ([`PhaseGemm`]) or, with few
//! input channels, as a banded im2col matmul; the rest go to candle's `conv2d`. candle's grouped
//! conv2d would instead launch one conv per channel, which made the depthwise layers dominate
//! the runtime. On the CPU, bias, activation and post-affine run as one in-place pass over each
//! conv's fresh output (`Epilogue`): every extra pass over a large map is another allocation
//! whose pages the kernel has to fault in. For the same reason the banded kernels multiply into
//! per-thread scratch buffers or straight into their output ([`super::matmul`]), an LCNet
//! block's expand/compress pair runs band by band without its hidden map
//! ([`pointwise_pair`]), and the recogniser's classifier reduces each block of logits to its
//! top class before computing the next ([`Linear::forward_top1`]).

use candle_core::{
    CpuStorage, CustomOp3, DType, Device, InplaceOp1, InplaceOp2, Layout, Module, Shape, Tensor, D,
};
use rayon::prelude::*;

use super::graph::{Activation, ConvSpec, LayerNormSpec, LinearSpec};
use super::matmul::{matmul_into, with_scratch, Mat, MatMut, Scratch};
use crate::error::Result;

/// Whether the `*_wide` copies of the kernels below (compiled for AVX2 + FMA) can run. The
/// crate is built for baseline x86-64 (SSE2), where their loops vectorise only 4 wide. Rust
/// never contracts `a * b + c` into an FMA, so both copies give the same bits.
#[inline(always)]
fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `$name`, which runs the `#[inline(always)]` kernel `$kernel` through a copy
/// compiled for AVX2 + FMA where [`has_avx2_fma`], else as built.
macro_rules! wide_kernel {
    ($name:ident = $kernel:ident $(<$g:ident: $b:path>)? ($($a:ident: $t:ty),* $(,)?)
        $(-> $r:ty)?) => {
        fn $name $(<$g: $b>)? ($($a: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide $(<$g: $b>)? ($($a: $t),*) $(-> $r)? {
                    $kernel($($a),*)
                }
                if has_avx2_fma() {
                    // SAFETY: the CPU supports the features `wide` is compiled for.
                    return unsafe { wide($($a),*) };
                }
            }
            $kernel($($a),*)
        }
    };
}

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

/// [`contiguous_f32`] of a tensor's storage, which must be on the CPU.
fn cpu_f32<'a>(
    s: &'a candle_core::Storage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::Storage::Cpu(s) = s else {
        candle_core::bail!("{op}: a tensor is not on the CPU");
    };
    contiguous_f32(s, l, op)
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
                    *o = gelu_erf_ftz(v);
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// GELU of one value, with subnormal results flushed to zero (see [`gelu_erf`]).
#[inline(always)]
fn gelu_erf_ftz(v: f32) -> f32 {
    let y = (erf_fast(v * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * v;
    if y.abs() < f32::MIN_POSITIVE {
        0.0
    } else {
        y
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

/// `e^x`, for softmax: range reduction to `x = n ln 2 + r` with `|r| <= ln 2 / 2`, then Cephes'
/// degree-6 polynomial for `e^r` (relative error about 2e-7, see the test). Branch-free so that
/// a row of them vectorises, where libm's expf runs one value at a time. Results below the
/// smallest normal f32 (`x < -87`) come out as about 1e-38 rather than the exact tiny value.
#[inline(always)]
fn exp_fast(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer (|x / ln 2| < 2^22).
    let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    // ln 2 split in two, the first part (0.693359375) short enough that its product with n is
    // exact.
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n, built from its exponent bits (n is in -126..=127 after the clamp).
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

wide_kernel!(exp_sum_wide = exp_sum(row: &[f32], max: f32) -> f32);

/// `sum(e^(v - max))` over `row`, in 16 running sums so the loop vectorises.
#[inline(always)]
fn exp_sum(row: &[f32], max: f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = row.chunks_exact(16);
    for chunk in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += exp_fast(v - max);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| exp_fast(v - max)).sum();
    acc.iter().sum::<f32>() + tail
}

/// The first maximum of a row of logits and its softmax probability, `1 / sum(e^(v - max))`
/// (its own term is `e^0 = 1`), without materialising the probabilities.
pub fn softmax_top1(row: &[f32]) -> (usize, f32) {
    let mut maxes = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for chunk in &mut chunks {
        for (m, &v) in maxes.iter_mut().zip(chunk) {
            *m = m.max(v);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&maxes)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let best = row.iter().position(|&v| v == max).unwrap_or(0);
    (best, 1.0 / exp_sum_wide(row, max))
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
            let pg = PhaseGemm::new(&spec.weight, spec.stride, device, spec.dtype)?;
            (ConvKind::Phase(pg), spec.weight.clone())
        } else {
            (ConvKind::Dense, spec.weight.clone())
        };
        let bias = match spec.bias {
            Some(b) => Some(b.to_device(device)?.to_dtype(spec.dtype)?),
            // The depthwise kernel always adds a bias; zeros keep it a single code path.
            None if matches!(kind, ConvKind::Depthwise) => {
                Some(Tensor::zeros(out_channels, spec.dtype, device)?)
            }
            None => None,
        };
        Ok(Self {
            kind,
            weight: weight.to_device(device)?.to_dtype(spec.dtype)?,
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

    /// The conv itself, with bias, activation and post-affine applied by [`Self::finish`]
    /// wherever the raw output is still contiguous, so they cost one in-place pass.
    fn forward_fused(&self, x: &Tensor) -> candle_core::Result<Tensor> {
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
                self.finish(y, true, 1)?
                    .reshape((n, self.out_channels, h, w))
            }
            ConvKind::Depthwise => {
                let bias = match &self.bias {
                    Some(b) => b.clone(),
                    None => Tensor::zeros(self.out_channels, x.dtype(), x.device())?,
                };
                let y = depthwise_conv2d(x, &self.weight, &bias, self.stride, self.pads)?;
                self.finish(y, false, 1)
            }
            ConvKind::Phase(ref pg) if pg.can_band(x) => {
                let (y, wo) = pg.forward_banded(&[(x, 1)], self.pads, BAND_ELEMS)?;
                self.finish(y, true, 1)?.narrow(3, 0, wo)
            }
            ConvKind::Dense
                if self.groups == 1 && x.device().is_cpu() && x.dtype() == DType::F32 =>
            {
                let y = im2col_banded(x, &self.weight, self.stride, self.pads, BAND_ELEMS)?;
                self.finish(y, true, 1)
            }
            // Elsewhere (a GPU, or half precision) candle's conv2d is one im2col and one
            // library matmul, where the phase split would launch a matmul and a shifted add
            // per kernel tap.
            ConvKind::Phase(_) | ConvKind::Dense => {
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
                self.finish(y, true, 1)
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
                // Everything after the matmul is per channel and elementwise, so it runs
                // before the pixel shuffle, on the contiguous product.
                let y = self.finish(y, true, kh * kw)?;
                if y.device().is_cpu() && y.dtype() == DType::F32 {
                    return y
                        .contiguous()?
                        .apply_op1_no_bwd(&PixelShuffle { o, kh, kw, h, w });
                }
                // [n, o*kh*kw, h*w] -> [n, o, h, kh, w, kw] -> [n, o, h*kh, w*kw]
                y.reshape((n, o, kh, kw, h, w))?
                    .permute((0, 1, 4, 2, 5, 3))?
                    .reshape((n, o, h * kh, w * kw))
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
                self.finish(y, true, 1)
            }
        }
    }

    /// The conv of the channel concatenation of `parts`, each nearest-upsampled by its factor
    /// first, without materialising the concatenation where the kernel allows.
    pub fn forward_concat(&self, parts: &[(Tensor, usize)]) -> candle_core::Result<Tensor> {
        if let (ConvKind::Phase(pg), Some((first, _))) = (&self.kind, parts.first()) {
            let c: usize = parts.iter().map(|(p, _)| p.dim(1).unwrap_or(0)).sum();
            if pg.can_band(first) && c == self.in_channels {
                let sources: Vec<(&Tensor, usize)> = parts.iter().map(|(p, f)| (p, *f)).collect();
                let (y, wo) = pg.forward_banded(&sources, self.pads, BAND_ELEMS)?;
                return self.finish(y, true, 1)?.narrow(3, 0, wo);
            }
        }
        let ups = parts
            .iter()
            .map(|(p, f)| upsample_nearest(p, *f, *f))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.forward(&Tensor::cat(&ups, 1)?)
    }

    /// Bias (if `with_bias`), activation and post-affine on a fresh conv output `y`
    /// `[n, out * repeat, ...]`, where output channel `c` owns rows `c * repeat ..`.
    fn finish(&self, y: Tensor, with_bias: bool, repeat: usize) -> candle_core::Result<Tensor> {
        let bias = self.bias.as_ref().filter(|_| with_bias);
        let ep = Epilogue {
            activation: self.activation,
            post_affine: self.post_affine,
            repeat,
            per_column: false,
        };
        if bias.is_none() && ep.is_identity() {
            return Ok(y);
        }
        if ((y.device().is_cpu() && y.dtype() == DType::F32) || custom_cuda_kernel(&y))
            && y.is_contiguous()
        {
            match bias {
                Some(b) => y.inplace_op2(b, &ep)?,
                None => y.inplace_op1(&ep)?,
            }
            return Ok(y);
        }
        let y = match bias {
            Some(b) => {
                let rows = self.out_channels * repeat;
                let b = b
                    .reshape((self.out_channels, 1))?
                    .broadcast_as((self.out_channels, repeat))?
                    .reshape(rows)?;
                let mut shape = vec![1; y.rank()];
                shape[1] = rows;
                y.broadcast_add(&b.reshape(shape)?)?
            }
            None => y,
        };
        let y = self.activation.apply(&y)?;
        match self.post_affine {
            Some((scale, shift)) => y.affine(f64::from(scale), f64::from(shift)),
            None => Ok(y),
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_fused(x)
    }
}

/// `[n, o * kh * kw, h * w]` -> `[n, o, h * kh, w * kw]`, the patch layout of a
/// [`ConvKind::TransposePatch`] product put in place: output pixel `(i * kh + a, j * kw + b)` of
/// channel `c` is row `(c * kh + a) * kw + b`, column `i * w + j`. On the rayon pool, where
/// candle's strided copy of the permuted view runs on one thread (the detector's head writes
/// 30 MB maps this way).
struct PixelShuffle {
    o: usize,
    kh: usize,
    kw: usize,
    h: usize,
    w: usize,
}

impl candle_core::CustomOp1 for PixelShuffle {
    fn name(&self) -> &'static str {
        "pixel-shuffle"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = contiguous_f32(s, l, "pixel shuffle")?;
        let Self { o, kh, kw, h, w } = *self;
        let (n, rows, cols) = l.shape().dims3()?;
        if rows != o * kh * kw || cols != h * w {
            candle_core::bail!(
                "pixel shuffle: {:?} is not [n, {o}x{kh}x{kw}, {h}x{w}]",
                l.dims()
            );
        }
        let shape = Shape::from((n, o, h * kh, w * kw));
        let mut out = vec![0f32; y.len()];
        if out.is_empty() {
            return Ok((CpuStorage::F32(out), shape));
        }
        // One task per input row `i` of a channel: the `kh` output rows it expands to.
        out.par_chunks_mut(kh * w * kw)
            .enumerate()
            .with_min_len(EPILOGUE_CHUNK.div_ceil(kh * w * kw))
            .for_each(|(r, dst)| {
                let (plane, i) = (r / h, r % h);
                let src = &y[plane * kh * kw * h * w..][..kh * kw * h * w];
                for (a, drow) in dst.chunks_exact_mut(w * kw).enumerate() {
                    for b in 0..kw {
                        let srow = &src[((a * kw + b) * h + i) * w..][..w];
                        for (d, &v) in drow[b..].iter_mut().step_by(kw).zip(srow) {
                            *d = v;
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), shape))
    }
}

/// `dst + upsample_nearest(src, fh, fw)`, written into `dst`'s storage on the CPU (one pass, no
/// upsampled copy); `dst` must not be shared.
pub fn add_upsampled_into(
    dst: Tensor,
    src: &Tensor,
    fh: usize,
    fw: usize,
) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = dst.dims4()?;
    let (sn, sc, sh, sw) = src.dims4()?;
    if dst.device().is_cpu()
        && dst.dtype() == DType::F32
        && src.dtype() == DType::F32
        && dst.is_contiguous()
        && (sn, sc, sh * fh, sw * fw) == (n, c, h, w)
    {
        dst.inplace_op2(&src.contiguous()?, &AddUpsampled { fh, fw })?;
        return Ok(dst);
    }
    dst + upsample_nearest(src, fh, fw)?
}

struct AddUpsampled {
    fh: usize,
    fw: usize,
}

impl InplaceOp2 for AddUpsampled {
    fn name(&self) -> &'static str {
        "add-upsampled"
    }

    fn cpu_fwd(
        &self,
        d: &mut CpuStorage,
        dl: &Layout,
        s: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        let src = contiguous_f32(s, sl, "add upsampled")?;
        let (_, _, h, w) = dl.shape().dims4()?;
        let dst = epilogue_slice(d, dl)?;
        let (fh, fw) = (self.fh, self.fw);
        let (sh, sw) = (h / fh.max(1), w / fw.max(1));
        if h * w == 0 || src.len() * fh * fw != dst.len() || sh * fh != h || sw * fw != w {
            candle_core::bail!(
                "add upsampled: {:?} += {:?} x{fh}x{fw}",
                dl.dims(),
                sl.dims()
            );
        }
        dst.par_chunks_mut(h * w)
            .zip(src.par_chunks(sh * sw))
            .with_min_len(EPILOGUE_CHUNK.div_ceil(h * w))
            .for_each(|(dplane, splane)| {
                for (y, drow) in dplane.chunks_exact_mut(w).enumerate() {
                    let srow = &splane[(y / fh) * sw..][..sw];
                    for (dchunk, &v) in drow.chunks_exact_mut(fw).zip(srow) {
                        for d in dchunk {
                            *d += v;
                        }
                    }
                }
            });
        Ok(())
    }
}

/// Hidden plus output elements per band of [`pointwise_pair`]: the band's hidden layer and
/// output (about 400 KB) stay in a core's L2 between the two products.
const PAIR_BAND_ELEMS: usize = 96 * 1024;

/// `second(first(x))`, plus `x` with `residual`, for two pointwise convs (an LCNet block's
/// expand/compress MLP), a band of pixels at a time: each band's hidden layer lives in a small
/// per-thread buffer between the two products instead of as a map twice the input's size, and
/// the bands run as independent rayon tasks, which scales across threads better than splitting
/// each product. With `residual` the result is written into `x`, which must not be shared.
/// `None` where this does not apply (not the CPU, not f32, not pointwise convs): run the convs
/// one by one then.
pub fn pointwise_pair(
    x: &Tensor,
    first: &Conv2d,
    second: &Conv2d,
    residual: bool,
) -> candle_core::Result<Option<Tensor>> {
    pointwise_pair_banded(x, first, second, residual, PAIR_BAND_ELEMS)
}

fn pointwise_pair_banded(
    x: &Tensor,
    first: &Conv2d,
    second: &Conv2d,
    residual: bool,
    band_elems: usize,
) -> candle_core::Result<Option<Tensor>> {
    let pointwise = |c: &Conv2d| matches!(c.kind, ConvKind::Pointwise);
    if !x.device().is_cpu()
        || x.dtype() != DType::F32
        || !x.is_contiguous()
        || !pointwise(first)
        || !pointwise(second)
    {
        return Ok(None);
    }
    let (n, c, h, w) = x.dims4()?;
    let (hid, co) = (first.out_channels, second.out_channels);
    if c != first.in_channels || second.in_channels != hid || (residual && co != c) {
        candle_core::bail!(
            "pointwise pair: {c} channels into {}->{hid}, {}->{co}{}",
            first.in_channels,
            second.in_channels,
            if residual { " with a residual" } else { "" }
        );
    }
    let hw = h * w;
    if n * hw == 0 {
        return Ok(None);
    }
    let bw = (band_elems / (hid + co) / 16 * 16).max(16).min(hw);
    // (batch item, first pixel, end): the bands, in the order their outputs are stored.
    let bands: Vec<(usize, usize, usize)> = (0..n)
        .flat_map(|b| (0..hw).step_by(bw).map(move |j| (b, j, (j + bw).min(hw))))
        .collect();
    let w1 = first.weight.contiguous()?;
    let w2 = second.weight.contiguous()?;
    let stage = |conv: &Conv2d| Epilogue {
        activation: conv.activation,
        post_affine: conv.post_affine,
        repeat: 1,
        per_column: false,
    };
    let (ep1, ep2) = (stage(first), stage(second));

    with_scratch(Scratch::PairOut, n * co * hw, |outs| {
        {
            let (xs, xl) = x.storage_and_layout();
            let (w1s, w1l) = w1.storage_and_layout();
            let (w2s, w2l) = w2.storage_and_layout();
            let b1g = first.bias.as_ref().map(Tensor::storage_and_layout);
            let b2g = second.bias.as_ref().map(Tensor::storage_and_layout);
            let xv = cpu_f32(&xs, xl, "pointwise pair")?;
            let w1m = Mat {
                data: cpu_f32(&w1s, w1l, "pointwise pair")?,
                rows: hid,
                cols: c,
                rs: c,
                cs: 1,
            };
            let w2m = Mat {
                data: cpu_f32(&w2s, w2l, "pointwise pair")?,
                rows: co,
                cols: hid,
                rs: hid,
                cs: 1,
            };
            let b1 = b1g
                .as_ref()
                .map(|(s, l)| cpu_f32(s, l, "pointwise pair"))
                .transpose()?;
            let b2 = b2g
                .as_ref()
                .map(|(s, l)| cpu_f32(s, l, "pointwise pair"))
                .transpose()?;

            let mut chunks = Vec::with_capacity(bands.len());
            let mut rest = &mut outs[..];
            for &(_, j0, j1) in &bands {
                let (chunk, tail) = rest.split_at_mut(co * (j1 - j0));
                chunks.push(chunk);
                rest = tail;
            }
            bands
                .par_iter()
                .zip(chunks)
                .try_for_each(|(&(b, j0, j1), out)| {
                    let len = j1 - j0;
                    with_scratch(Scratch::PairHidden, hid * bw, |hidden| {
                        let hidden = &mut hidden[..hid * len];
                        let xb = Mat {
                            data: &xv[b * c * hw + j0..],
                            rows: c,
                            cols: len,
                            rs: hw,
                            cs: 1,
                        };
                        let dst = MatMut {
                            data: &mut *hidden,
                            rows: hid,
                            cols: len,
                            rs: len,
                        };
                        matmul_into(dst, w1m, xb, false, 1)?;
                        if b1.is_some() || !ep1.is_identity() {
                            ep1.run_on(hidden, &[1, hid, len], b1, false)?;
                        }
                        let hm = Mat {
                            data: hidden,
                            rows: hid,
                            cols: len,
                            rs: len,
                            cs: 1,
                        };
                        let dst = MatMut {
                            data: &mut *out,
                            rows: co,
                            cols: len,
                            rs: len,
                        };
                        matmul_into(dst, w2m, hm, false, 1)?;
                        if b2.is_some() || !ep2.is_identity() {
                            ep2.run_on(out, &[1, co, len], b2, false)?;
                        }
                        Ok::<_, candle_core::Error>(())
                    })
                })?;
        }
        let scatter = ScatterBands {
            bands: outs,
            rows: co,
            hw,
            bw,
            add: residual,
        };
        if residual {
            x.inplace_op1(&scatter)?;
            return Ok(Some(x.clone()));
        }
        let mut y = vec![0f32; n * co * hw];
        scatter.apply(&mut y);
        Ok(Some(Tensor::from_vec(y, (n, co, h, w), x.device())?))
    })
}

/// Moves the band-major outputs of [`pointwise_pair`] (`[band][row][pixel]`, bands of `bw`
/// pixels, the last one of each batch item shorter) into NCHW planes, adding them to what the
/// planes hold if `add`.
struct ScatterBands<'a> {
    bands: &'a [f32],
    rows: usize,
    hw: usize,
    bw: usize,
    add: bool,
}

impl ScatterBands<'_> {
    fn apply(&self, y: &mut [f32]) {
        let (rows, hw, bw) = (self.rows, self.hw, self.bw);
        y.par_chunks_mut(hw)
            .enumerate()
            .with_min_len(EPILOGUE_CHUNK.div_ceil(hw))
            .for_each(|(plane, dst)| {
                let (b, r) = (plane / rows, plane % rows);
                for j0 in (0..hw).step_by(bw) {
                    let len = bw.min(hw - j0);
                    let src = &self.bands[b * rows * hw + rows * j0 + r * len..][..len];
                    let dst = &mut dst[j0..j0 + len];
                    if self.add {
                        add_assign_wide(dst, src);
                    } else {
                        dst.copy_from_slice(src);
                    }
                }
            });
    }
}

impl InplaceOp1 for ScatterBands<'_> {
    fn name(&self) -> &'static str {
        "scatter-bands"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let y = epilogue_slice(s, l)?;
        if y.len() != self.bands.len() {
            candle_core::bail!(
                "scatter bands: {} outputs into {:?}",
                self.bands.len(),
                l.dims()
            );
        }
        self.apply(y);
        Ok(())
    }
}

/// What follows a linear op, fused into one in-place pass over its output: bias add,
/// activation, then `scale * y + shift`. The bias runs along axis 1 (`[n, rows, ...]`, one bias
/// per `repeat` rows) for convs, or along the last axis (`per_column`) for [`Linear`].
struct Epilogue {
    activation: Activation,
    post_affine: Option<(f32, f32)>,
    repeat: usize,
    per_column: bool,
}

impl Epilogue {
    fn is_identity(&self) -> bool {
        matches!(self.activation, Activation::None) && self.post_affine.is_none()
    }

    fn run(&self, y: &mut [f32], dims: &[usize], bias: Option<&[f32]>) -> candle_core::Result<()> {
        self.run_on(y, dims, bias, true)
    }

    /// [`Self::run`], on the rayon pool if `parallel`, else on the calling thread (for callers
    /// that are rayon tasks already).
    fn run_on(
        &self,
        y: &mut [f32],
        dims: &[usize],
        bias: Option<&[f32]>,
        parallel: bool,
    ) -> candle_core::Result<()> {
        match self.activation {
            Activation::None => self.run_with(y, dims, bias, parallel, |v| v),
            Activation::Relu => self.run_with(y, dims, bias, parallel, |v| v.max(0.0)),
            Activation::GeluErf => self.run_with(y, dims, bias, parallel, gelu_erf_ftz),
            Activation::Swish => self.run_with(y, dims, bias, parallel, |v| v / (1.0 + (-v).exp())),
            Activation::Sigmoid => {
                self.run_with(y, dims, bias, parallel, |v| 1.0 / (1.0 + (-v).exp()))
            }
            Activation::HardSigmoid { alpha, beta } => {
                self.run_with(y, dims, bias, parallel, move |v| {
                    (v * alpha + beta).clamp(0.0, 1.0)
                })
            }
            Activation::HardSwish { alpha, beta } => {
                self.run_with(y, dims, bias, parallel, move |v| {
                    v * (v * alpha + beta).clamp(0.0, 1.0)
                })
            }
        }
    }

    /// Monomorphised per activation so the row loops vectorise.
    fn run_with<F: Fn(f32) -> f32 + Sync>(
        &self,
        y: &mut [f32],
        dims: &[usize],
        bias: Option<&[f32]>,
        parallel: bool,
        f: F,
    ) -> candle_core::Result<()> {
        let post = self.post_affine;
        if self.per_column {
            let cols = dims.last().copied().unwrap_or(1).max(1);
            let zeros;
            let b = match bias {
                Some(b) if b.len() == cols => b,
                Some(b) => candle_core::bail!("epilogue: {} biases for {cols} columns", b.len()),
                None => {
                    zeros = vec![0f32; cols];
                    &zeros[..]
                }
            };
            let row = |row: &mut [f32]| epilogue_cols_wide(row, b, post, &f);
            if parallel {
                y.par_chunks_mut(cols)
                    .with_min_len(EPILOGUE_CHUNK.div_ceil(cols))
                    .for_each(row);
            } else {
                y.chunks_mut(cols).for_each(row);
            }
            return Ok(());
        }
        let rows = dims.get(1).copied().unwrap_or(1).max(1);
        let inner: usize = dims.iter().skip(2).product();
        if inner == 0 {
            return Ok(());
        }
        if let Some(b) = bias {
            if b.len() * self.repeat != rows {
                candle_core::bail!(
                    "epilogue: {} biases x {} for {rows} rows",
                    b.len(),
                    self.repeat
                );
            }
        }
        let repeat = self.repeat.max(1);
        let row = |(r, row): (usize, &mut [f32])| {
            let bv = bias.map_or(0.0, |b| b[(r % rows) / repeat]);
            epilogue_row_wide(row, bv, post, &f);
        };
        if parallel {
            y.par_chunks_mut(inner)
                .enumerate()
                .with_min_len(EPILOGUE_CHUNK.div_ceil(inner))
                .for_each(row);
        } else {
            y.chunks_mut(inner).enumerate().for_each(row);
        }
        Ok(())
    }
}

/// Gathered input elements per band of [`PhaseGemm::forward_banded`] (8 MB): large enough
/// that the band's matmuls are efficient, small enough to stay in the L3 cache.
const BAND_ELEMS: usize = 2 * 1024 * 1024;

wide_kernel!(add_assign_wide = add_assign(dst: &mut [f32], src: &[f32]));

/// `dst[i] += src[i]`.
#[inline(always)]
fn add_assign(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

wide_kernel!(epilogue_row_wide = epilogue_row<F: Fn(f32) -> f32>(
    row: &mut [f32],
    bias: f32,
    post: Option<(f32, f32)>,
    f: &F,
));

/// `row[i] = f(row[i] + bias)`, then the post-affine.
#[inline(always)]
fn epilogue_row<F: Fn(f32) -> f32>(row: &mut [f32], bias: f32, post: Option<(f32, f32)>, f: &F) {
    match post {
        Some((scale, shift)) => {
            for v in row.iter_mut() {
                *v = f(*v + bias) * scale + shift;
            }
        }
        None => {
            for v in row.iter_mut() {
                *v = f(*v + bias);
            }
        }
    }
}

wide_kernel!(epilogue_cols_wide = epilogue_cols<F: Fn(f32) -> f32>(
    row: &mut [f32],
    bias: &[f32],
    post: Option<(f32, f32)>,
    f: &F,
));

/// `row[i] = f(row[i] + bias[i])`, then the post-affine.
#[inline(always)]
fn epilogue_cols<F: Fn(f32) -> f32>(
    row: &mut [f32],
    bias: &[f32],
    post: Option<(f32, f32)>,
    f: &F,
) {
    match post {
        Some((scale, shift)) => {
            for (v, &b) in row.iter_mut().zip(bias) {
                *v = f(*v + b) * scale + shift;
            }
        }
        None => {
            for (v, &b) in row.iter_mut().zip(bias) {
                *v = f(*v + b);
            }
        }
    }
}

/// Elements per rayon task of the epilogue: enough to amortise the task, small enough that
/// the detector's maps still split across threads.
const EPILOGUE_CHUNK: usize = 16 * 1024;

fn epilogue_slice<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("epilogue: only f32 is supported on the CPU");
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("epilogue: output must be contiguous");
    };
    Ok(&mut data[start..end])
}

impl InplaceOp1 for Epilogue {
    fn name(&self) -> &'static str {
        "conv-epilogue"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let y = epilogue_slice(s, l)?;
        self.run(y, l.dims(), None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> candle_core::Result<()> {
        super::cuda::epilogue((s, l), None, &self.cuda_params(l.dims()))
    }
}

impl InplaceOp2 for Epilogue {
    fn name(&self) -> &'static str {
        "conv-epilogue"
    }

    fn cpu_fwd(
        &self,
        s: &mut CpuStorage,
        l: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<()> {
        let b = contiguous_f32(bs, bl, "epilogue bias")?;
        let y = epilogue_slice(s, l)?;
        self.run(y, l.dims(), Some(b))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &mut candle_core::CudaStorage,
        l: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<()> {
        let params = self.cuda_params(l.dims());
        let expected = if self.per_column {
            params.cols
        } else {
            params.rows / params.repeat
        };
        if bl.shape().elem_count() != expected {
            candle_core::bail!(
                "epilogue: {} biases for {expected} (output {:?})",
                bl.shape().elem_count(),
                l.dims()
            );
        }
        super::cuda::epilogue((s, l), Some((bs, bl)), &params)
    }
}

impl Epilogue {
    #[cfg(feature = "cuda")]
    fn cuda_params(&self, dims: &[usize]) -> super::cuda::EpilogueParams {
        let (activation, alpha, beta) = match self.activation {
            Activation::None => (0, 0.0, 0.0),
            Activation::Relu => (1, 0.0, 0.0),
            Activation::GeluErf => (2, 0.0, 0.0),
            Activation::Swish => (3, 0.0, 0.0),
            Activation::Sigmoid => (4, 0.0, 0.0),
            Activation::HardSigmoid { alpha, beta } => (5, alpha, beta),
            Activation::HardSwish { alpha, beta } => (6, alpha, beta),
        };
        super::cuda::EpilogueParams {
            per_column: self.per_column,
            cols: dims.last().copied().unwrap_or(1).max(1),
            rows: dims.get(1).copied().unwrap_or(1).max(1),
            inner: dims.iter().skip(2).product::<usize>().max(1),
            repeat: self.repeat.max(1),
            activation,
            alpha,
            beta,
            post_affine: self.post_affine,
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
    fn new(
        weight: &Tensor,
        stride: (usize, usize),
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<Self> {
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
                let stacked = Tensor::cat(&mats, 0)?
                    .contiguous()?
                    .to_device(device)?
                    .to_dtype(dtype)?;
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

    #[cfg(test)]
    fn forward(&self, x: &Tensor, pads: [usize; 4]) -> candle_core::Result<Tensor> {
        let (y, wo) = self.forward_wide(x, pads)?;
        y.narrow(3, 0, wo)
    }

    #[cfg(test)]
    /// The conv output with `wh >= wo` columns per row, of which the first `wo` are valid;
    /// returned wide (and contiguous) so the epilogue can run in place before the cut.
    fn forward_wide(&self, x: &Tensor, pads: [usize; 4]) -> candle_core::Result<(Tensor, usize)> {
        let (n, _, h, w) = x.dims4()?;
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
        let phased = phase_split(x, (sh, sw), (pt, pl), (hh, wh))?;
        let o = self.out_channels;
        let mut acc: Option<Tensor> = None;
        for Phase {
            index,
            weight: wmat,
            shifts,
        } in &self.phases
        {
            // [n, c, hh * wh], contiguous: the phases are the outermost axis.
            let p = phased.get(*index)?;
            let y = if n == 1 {
                wmat.matmul(&p.squeeze(0)?)?.unsqueeze(0)?
            } else {
                wmat.broadcast_left(n)?.matmul(&p)?
            };
            let offsets: Vec<usize> = shifts.iter().map(|&(dy, dx)| dy * wh + dx).collect();
            acc = Some(match acc {
                Some(acc) if acc.device().is_cpu() && acc.dtype() == DType::F32 => {
                    shifted_sum_into(&acc, &y, o, &offsets, ho * wh)?;
                    acc
                }
                Some(acc) => (acc + shifted_sum(&y, o, &offsets, ho * wh)?)?,
                None => shifted_sum(&y, o, &offsets, ho * wh)?,
            });
        }
        let Some(acc) = acc else {
            candle_core::bail!("conv without kernel taps");
        };
        Ok((acc.reshape((n, o, ho, wh))?, wo))
    }

    /// Whether [`Self::forward_banded`] can run this conv on `x`'s device.
    fn can_band(&self, x: &Tensor) -> bool {
        x.device().is_cpu() && x.dtype() == DType::F32
    }

    /// [`Self::forward_wide`] on the CPU, a band of output rows at a time, with the input given
    /// as channel groups to concatenate, each nearest-upsampled by its factor
    /// (`[n, c_i, h / f_i, w / f_i]`). Each band's padded, phase-split input is gathered
    /// straight from the sources, so neither the concatenation nor a padded copy of the whole
    /// input (the DB head's is 384 channels at 1/4 resolution) is ever built, and the per-band
    /// buffers stay small enough to stay in cache and be recycled by the allocator.
    fn forward_banded(
        &self,
        sources: &[(&Tensor, usize)],
        pads: [usize; 4],
        band_elems: usize,
    ) -> candle_core::Result<(Tensor, usize)> {
        let Some(&(first, f0)) = sources.first() else {
            candle_core::bail!("conv without inputs");
        };
        let (n, _, h0, w0) = first.dims4()?;
        let (h, w) = (h0 * f0, w0 * f0);
        let mut views = Vec::with_capacity(sources.len());
        for &(x, f) in sources {
            let (sn, sc, sh, sw) = x.dims4()?;
            if sn != n || sh * f != h || sw * f != w || f == 0 {
                candle_core::bail!(
                    "conv inputs {:?} (x{f}) and {:?} (x{f0}) do not line up",
                    x.dims(),
                    first.dims()
                );
            }
            views.push((x.contiguous()?, sc, f));
        }
        let c: usize = views.iter().map(|v| v.1).sum();
        let (sh, sw) = self.stride;
        let (kh, kw) = self.kernel;
        let [pt, pl, pb, pr] = pads;
        let (hp, wp) = (h + pt + pb, w + pl + pr);
        let wc = self.phases.first().map_or(Ok(0), |p| p.weight.dim(1))?;
        if hp < kh || wp < kw || wc != c {
            candle_core::bail!(
                "conv input [{n}, {c}, {h}, {w}] does not fit kernel {kh}x{kw} over {wc} channels"
            );
        }
        let (ho, wo) = ((hp - kh) / sh + 1, (wp - kw) / sw + 1);
        // The phase grid as in `forward_wide`; a band of `bh` output rows reads `bh + halo`
        // phase rows (the last one spare, for the flat shifts of the band's last row).
        let wh = (kw - 1) / sw + wo;
        let halo = (kh - 1) / sh + 1;
        let nphase = sh * sw;
        let o = self.out_channels;
        let band = (band_elems / (nphase * n * c * wh).max(1)).clamp(1, ho);
        let mut out = vec![0f32; n * o * ho * wh];

        let guards: Vec<_> = views
            .iter()
            .map(|(x, _, _)| x.storage_and_layout())
            .collect();
        let mut srcs = Vec::with_capacity(views.len());
        for ((st, l), &(_, sc, f)) in guards.iter().zip(&views) {
            let candle_core::Storage::Cpu(cpu) = &**st else {
                candle_core::bail!("banded conv: input is not on the CPU");
            };
            srcs.push((contiguous_f32(cpu, l, "banded conv")?, sc, f));
        }
        // Every (batch item, channel) plane of the concatenated input, with its upsampling.
        let planes: Vec<(&[f32], usize)> = (0..n)
            .flat_map(|b| {
                srcs.iter().flat_map(move |&(x, sc, f)| {
                    let len = (h / f) * (w / f);
                    (0..sc).map(move |ch| (&x[(b * sc + ch) * len..][..len], f))
                })
            })
            .collect();
        let weight_guards: Vec<_> = self
            .phases
            .iter()
            .map(|p| p.weight.storage_and_layout())
            .collect();
        let mut weights = Vec::with_capacity(self.phases.len());
        for (st, l) in &weight_guards {
            let candle_core::Storage::Cpu(cpu) = &**st else {
                candle_core::bail!("banded conv: weights are not on the CPU");
            };
            weights.push(contiguous_f32(cpu, l, "banded conv weights")?);
        }
        let threads = candle_core::utils::get_num_threads();

        with_scratch(
            Scratch::Gather,
            nphase * n * c * (band + halo) * wh,
            |scratch| -> candle_core::Result<()> {
                for r0 in (0..ho).step_by(band) {
                    let bh = band.min(ho - r0);
                    let hb = bh + halo;
                    // [phase, n, c, hb * wh]: phase (a, b) holds padded rows (r0 + i) * sh + a
                    // and columns j * sw + b. The buffer is reused, so padding is written too.
                    let buf = &mut scratch[..nphase * n * c * hb * wh];
                    buf.par_chunks_mut(hb * wh)
                        .enumerate()
                        .for_each(|(idx, dst)| {
                            let (phase, (src, f)) =
                                (idx / planes.len(), planes[idx % planes.len()]);
                            let (a, b) = (phase / sw, phase % sw);
                            let src_w = w / f;
                            // Phase columns j whose padded column j * sw + b - pl lies in 0..w.
                            let (j0, j1) = columns_inside(pl, b, sw, w, wh);
                            for (i, drow) in dst.chunks_exact_mut(wh).enumerate() {
                                let iy = (r0 + i) * sh + a;
                                if j0 >= j1 || iy < pt || iy - pt >= h {
                                    drow.fill(0.0);
                                    continue;
                                }
                                drow[..j0].fill(0.0);
                                drow[j1..].fill(0.0);
                                let srow = &src[((iy - pt) / f) * src_w..][..src_w];
                                let ix0 = j0 * sw + b - pl;
                                match (f, sw) {
                                    (1, 1) => {
                                        drow[j0..j1].copy_from_slice(&srow[ix0..ix0 + (j1 - j0)]);
                                    }
                                    (1, _) => {
                                        for (d, s) in drow[j0..j1]
                                            .iter_mut()
                                            .zip(srow[ix0..].iter().step_by(sw))
                                        {
                                            *d = *s;
                                        }
                                    }
                                    (_, 1) => {
                                        // Runs of `f` equal pixels: one division per source
                                        // pixel.
                                        let mut j = j0;
                                        while j < j1 {
                                            let sx = (j + b - pl) / f;
                                            let end = (sx * f + f + pl - b).min(j1);
                                            drow[j..end].fill(srow[sx]);
                                            j = end;
                                        }
                                    }
                                    _ => {
                                        for (k, d) in drow[j0..j1].iter_mut().enumerate() {
                                            *d = srow[(ix0 + k * sw) / f];
                                        }
                                    }
                                }
                            }
                        });
                    // Each tap's product accumulates straight into the band of the output, in
                    // the order the taps were stacked: no per-band product buffer and no
                    // separate pass to sum the shifted taps.
                    let buf = &*buf;
                    let len = bh * wh;
                    let mut overwrite = true;
                    for (phase, wmat) in self.phases.iter().zip(&weights) {
                        for (t, &(dy, dx)) in phase.shifts.iter().enumerate() {
                            let lhs = Mat {
                                data: &wmat[t * o * c..],
                                rows: o,
                                cols: c,
                                rs: c,
                                cs: 1,
                            };
                            for b in 0..n {
                                let rhs = Mat {
                                    data: &buf
                                        [(phase.index * n + b) * c * hb * wh + dy * wh + dx..],
                                    rows: c,
                                    cols: len,
                                    rs: hb * wh,
                                    cs: 1,
                                };
                                let dst = MatMut {
                                    data: &mut out[b * o * ho * wh + r0 * wh..],
                                    rows: o,
                                    cols: len,
                                    rs: ho * wh,
                                };
                                matmul_into(dst, lhs, rhs, !overwrite, threads)?;
                            }
                            overwrite = false;
                        }
                    }
                }
                Ok(())
            },
        )?;
        drop(weight_guards);
        drop(guards);
        let y = Tensor::from_vec(out, (n, o, ho, wh), first.device())?;
        Ok((y, wo))
    }
}

/// An ungrouped conv as im2col + matmul, a band of output rows at a time. The band's columns
/// are gathered K-major (`[c * kh * kw, pixels]`), so the matmul writes NCHW rows directly,
/// where candle's conv2d gathers pixel-major and transposes its whole output afterwards. Used
/// for the RGB stem, where im2col is small (27 rows) and the output is not.
fn im2col_banded(
    x: &Tensor,
    weight: &Tensor,
    (sh, sw): (usize, usize),
    [pt, pl, pb, pr]: [usize; 4],
    band_elems: usize,
) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (o, wc, kh, kw) = weight.dims4()?;
    let (hp, wp) = (h + pt + pb, w + pl + pr);
    if wc != c || hp < kh || wp < kw || sh == 0 || sw == 0 {
        candle_core::bail!(
            "conv input {:?} does not fit weight {:?}",
            x.dims(),
            weight.dims()
        );
    }
    let (ho, wo) = ((hp - kh) / sh + 1, (wp - kw) / sw + 1);
    let k = c * kh * kw;
    let band = (band_elems / (k * wo).max(1)).clamp(1, ho);
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let mut out = vec![0f32; n * o * ho * wo];
    let threads = candle_core::utils::get_num_threads();
    {
        let (st, l) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*st else {
            candle_core::bail!("im2col conv: input is not on the CPU");
        };
        let xv = contiguous_f32(cpu, l, "im2col conv")?;
        let (wst, wl) = weight.storage_and_layout();
        let candle_core::Storage::Cpu(wcpu) = &*wst else {
            candle_core::bail!("im2col conv: weights are not on the CPU");
        };
        // [o, c, kh, kw] is the [o, k] matrix the columns are gathered for.
        let wmat = Mat {
            data: contiguous_f32(wcpu, wl, "im2col conv weights")?,
            rows: o,
            cols: k,
            rs: k,
            cs: 1,
        };
        with_scratch(
            Scratch::Gather,
            k * band * wo,
            |scratch| -> candle_core::Result<()> {
                for b in 0..n {
                    let img = &xv[b * c * h * w..(b + 1) * c * h * w];
                    for r0 in (0..ho).step_by(band) {
                        let bh = band.min(ho - r0);
                        let len = bh * wo;
                        // Reused from band to band, so padding is written too.
                        let cols = &mut scratch[..k * len];
                        cols.par_chunks_mut(len).enumerate().for_each(|(row, dst)| {
                            let (ci, ky, kx) = (row / (kh * kw), row / kw % kh, row % kw);
                            let plane = &img[ci * h * w..(ci + 1) * h * w];
                            // Output columns whose input column ox * sw + kx - pl is inside
                            // the image.
                            let (first, last) = columns_inside(pl, kx, sw, w, wo);
                            for (i, drow) in dst.chunks_exact_mut(wo).enumerate() {
                                let iy = (r0 + i) * sh + ky;
                                if first >= last || iy < pt || iy - pt >= h {
                                    drow.fill(0.0);
                                    continue;
                                }
                                drow[..first].fill(0.0);
                                drow[last..].fill(0.0);
                                let srow = &plane[(iy - pt) * w..(iy - pt + 1) * w];
                                let ix0 = first * sw + kx - pl;
                                for (d, s) in drow[first..last]
                                    .iter_mut()
                                    .zip(srow[ix0..].iter().step_by(sw))
                                {
                                    *d = *s;
                                }
                            }
                        });
                        // Straight into the band's rows of every output plane.
                        let rhs = Mat {
                            data: cols,
                            rows: k,
                            cols: len,
                            rs: len,
                            cs: 1,
                        };
                        let dst = MatMut {
                            data: &mut out[b * o * ho * wo + r0 * wo..],
                            rows: o,
                            cols: len,
                            rs: ho * wo,
                        };
                        matmul_into(dst, wmat, rhs, false, threads)?;
                    }
                }
                Ok(())
            },
        )?;
    }
    Tensor::from_vec(out, (n, o, ho, wo), x.device())
}

#[cfg(test)]
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

#[cfg(test)]
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

#[cfg(test)]
/// `acc += shifted_sum(y, o, offsets, acc.len)`, in place.
fn shifted_sum_into(
    acc: &Tensor,
    y: &Tensor,
    o: usize,
    offsets: &[usize],
    len: usize,
) -> candle_core::Result<()> {
    let op = ShiftedSum {
        o,
        offsets: offsets.to_vec(),
        len,
    };
    if acc.device().is_cpu() && acc.dtype() == DType::F32 && acc.is_contiguous() {
        acc.inplace_op2(&y.contiguous()?, &op)
    } else {
        candle_core::bail!("shifted sum: in-place accumulation needs a contiguous f32 CPU tensor")
    }
}

#[cfg(test)]
struct ShiftedSum {
    o: usize,
    offsets: Vec<usize>,
    len: usize,
}

#[cfg(test)]
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
        self.accumulate(&mut out, y, (rows, cols), false);
        Ok((CpuStorage::F32(out), Shape::from((n, o, len))))
    }
}

#[cfg(test)]
impl ShiftedSum {
    /// Sums the shifted taps of `y` (`[n, rows, cols]`) into `out` (`[n, o, len]`), adding to
    /// what `out` holds if `add`, else overwriting it.
    fn accumulate(&self, out: &mut [f32], y: &[f32], (rows, cols): (usize, usize), add: bool) {
        let (o, len) = (self.o, self.len);
        out.par_chunks_mut(len).enumerate().for_each(|(row, dst)| {
            let (b, c) = (row / o, row % o);
            for (t, &off) in self.offsets.iter().enumerate() {
                let src_row = (b * rows + t * o + c) * cols + off;
                let src = &y[src_row..src_row + len];
                if t == 0 && !add {
                    dst.copy_from_slice(src);
                } else {
                    add_assign_wide(dst, src);
                }
            }
        });
    }
}

#[cfg(test)]
impl InplaceOp2 for ShiftedSum {
    fn name(&self) -> &'static str {
        "shifted-sum-into"
    }

    fn cpu_fwd(
        &self,
        acc: &mut CpuStorage,
        al: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> candle_core::Result<()> {
        let y = contiguous_f32(ys, yl, "shifted sum")?;
        let (n, rows, cols) = yl.shape().dims3()?;
        if al.dims() != [n, self.o, self.len]
            || rows != self.o * self.offsets.len()
            || self.offsets.iter().any(|&off| off + self.len > cols)
        {
            candle_core::bail!(
                "shifted sum: bad shapes {:?} += {:?} for {} taps",
                al.dims(),
                yl.dims(),
                self.offsets.len()
            );
        }
        let out = epilogue_slice(acc, al)?;
        self.accumulate(out, y, (rows, cols), true);
        Ok(())
    }
}

#[cfg(test)]
/// The zero-padded input of a [`PhaseGemm`], split into its stride phases in one pass:
/// `[n, c, h, w]` -> `[sh * sw, n, c, hh * wh]` with
/// `out[a * sw + b][.., i * wh + j] = x[.., i * sh + a - pt, j * sw + b - pl]` (zero outside).
fn phase_split(
    x: &Tensor,
    stride: (usize, usize),
    pads: (usize, usize),
    grid: (usize, usize),
) -> candle_core::Result<Tensor> {
    let (n, c, _, _) = x.dims4()?;
    let (sh, sw) = stride;
    let (pt, pl) = pads;
    let (hh, wh) = grid;
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x
            .contiguous()?
            .apply_op1_no_bwd(&PhaseSplit { stride, pads, grid });
    }
    let x = fit(x, 2, pt, hh * sh)?;
    let x = fit(&x, 3, pl, wh * sw)?;
    x.reshape((n, c, hh, sh, wh, sw))?
        .permute((3, 5, 0, 1, 2, 4))?
        .contiguous()?
        .reshape((sh * sw, n, c, hh * wh))
}

#[cfg(test)]
struct PhaseSplit {
    stride: (usize, usize),
    pads: (usize, usize),
    grid: (usize, usize),
}

#[cfg(test)]
impl candle_core::CustomOp1 for PhaseSplit {
    fn name(&self) -> &'static str {
        "phase-split"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "phase split")?;
        let (n, c, h, w) = l.shape().dims4()?;
        let (sh, sw) = self.stride;
        let (pt, pl) = self.pads;
        let (hh, wh) = self.grid;
        let mut out = vec![0f32; sh * sw * n * c * hh * wh];
        if out.is_empty() {
            return Ok((CpuStorage::F32(out), Shape::from((sh * sw, n, c, hh * wh))));
        }
        let planes = n * c;
        out.par_chunks_mut(hh * wh)
            .enumerate()
            .for_each(|(idx, dst)| {
                let (phase, plane) = (idx / planes, idx % planes);
                let (a, b) = (phase / sw, phase % sw);
                let src = &x[plane * h * w..(plane + 1) * h * w];
                // Output columns j whose source column j * sw + b - pl lies in 0..w.
                let j0 = pl.saturating_sub(b).div_ceil(sw);
                let j1 = if w + pl > b {
                    ((w + pl - b - 1) / sw + 1).min(wh)
                } else {
                    0
                };
                if j0 >= j1 {
                    return;
                }
                for (i, drow) in dst.chunks_exact_mut(wh).enumerate() {
                    let iy = i * sh + a;
                    if iy < pt || iy - pt >= h {
                        continue;
                    }
                    let srow = &src[(iy - pt) * w..(iy - pt + 1) * w];
                    let ix0 = j0 * sw + b - pl;
                    if sw == 1 {
                        drow[j0..j1].copy_from_slice(&srow[ix0..ix0 + (j1 - j0)]);
                    } else {
                        for (d, s) in drow[j0..j1].iter_mut().zip(srow[ix0..].iter().step_by(sw)) {
                            *d = *s;
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((sh * sw, n, c, hh * wh))))
    }
}

#[cfg(test)]
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

/// MaxPool 2x2, stride 1, SAME_UPPER padding: `out[y][x]` is the max of `x[y..=y+1][x..=x+1]`
/// with the window clipped at the bottom and right edges (padding with -inf, as ONNX does).
pub fn max_pool_2x2_same(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1_no_bwd(&MaxPool2x2Same);
    }
    // Repeating the last row/column leaves every window's max unchanged.
    x.pad_with_same(2, 0, 1)?
        .pad_with_same(3, 0, 1)?
        .max_pool2d_with_stride(2, 1)
}

struct MaxPool2x2Same;

impl candle_core::CustomOp1 for MaxPool2x2Same {
    fn name(&self) -> &'static str {
        "max-pool-2x2-same"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "max pool")?;
        let (_, _, h, w) = l.shape().dims4()?;
        let mut out = vec![0f32; x.len()];
        if h * w == 0 {
            return Ok((CpuStorage::F32(out), l.shape().clone()));
        }
        out.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w))
            .for_each(|(dst, src)| {
                for y in 0..h {
                    let r0 = &src[y * w..(y + 1) * w];
                    let r1 = &src[(y + 1).min(h - 1) * w..][..w];
                    let d = &mut dst[y * w..(y + 1) * w];
                    for ((d, a), b) in d.iter_mut().zip(r0).zip(r1) {
                        *d = a.max(*b);
                    }
                    // Each column now holds its vertical max; fold in the right neighbour.
                    for x in 0..w - 1 {
                        d[x] = d[x].max(d[x + 1]);
                    }
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
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
    if (x.device().is_cpu() && x.dtype() == DType::F32) || custom_cuda_kernel(x) {
        let op = DepthwiseConv { stride, pads };
        x.contiguous()?.apply_op3_no_bwd(
            &weight.contiguous()?,
            &bias.to_dtype(x.dtype())?.contiguous()?,
            &op,
        )
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

/// Whether `x` is on a GPU where the engine's own CUDA kernels ([`super::cuda`]) run.
fn custom_cuda_kernel(x: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        x.device().is_cuda() && super::cuda::enabled()
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = x;
        false
    }
}

struct DepthwiseConv {
    stride: (usize, usize),
    pads: [usize; 4],
}

impl CustomOp3 for DepthwiseConv {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::depthwise_conv2d((xs, xl), (ws, wl), (bs, bl), self.stride, self.pads)
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

        let geom = DwGeometry {
            h,
            w: wd,
            kh,
            kw,
            sh,
            sw,
            pt,
            pl,
            wo,
            col_range,
        };
        out.par_chunks_mut(ho * wo)
            .enumerate()
            .for_each(|(plane, o)| {
                let ch = plane % c;
                let src = &x[plane * h * wd..(plane + 1) * h * wd];
                let k = &w[ch * kh * kw..(ch + 1) * kh * kw];
                o.fill(b[ch]);
                depthwise_plane_wide(&geom, src, k, o);
            });
        Ok((CpuStorage::F32(out), Shape::from((n, c, ho, wo))))
    }
}

/// Shape of one depthwise conv, shared by all its planes.
struct DwGeometry {
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    pt: usize,
    pl: usize,
    wo: usize,
    /// Per kernel column, the output columns whose input column is inside the image.
    col_range: Vec<(usize, usize)>,
}

wide_kernel!(depthwise_plane_wide = depthwise_plane(g: &DwGeometry, src: &[f32], k: &[f32], o: &mut [f32]));

/// One output plane `o` (already holding the bias) of a depthwise conv of plane `src` with
/// kernel `k`.
#[inline(always)]
fn depthwise_plane(g: &DwGeometry, src: &[f32], k: &[f32], o: &mut [f32]) {
    let DwGeometry {
        h,
        w,
        kh,
        kw,
        sh,
        sw,
        pt,
        pl,
        wo,
        ref col_range,
    } = *g;
    for (oy, orow) in o.chunks_exact_mut(wo).enumerate() {
        for ky in 0..kh {
            let iy = oy * sh + ky;
            if iy < pt || iy - pt >= h {
                continue;
            }
            let irow = &src[(iy - pt) * w..(iy - pt + 1) * w];
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
            weight: spec.weight.to_device(device)?.to_dtype(spec.dtype)?,
            bias: spec
                .bias
                .map(|b| b.to_device(device)?.to_dtype(spec.dtype))
                .transpose()?,
            activation: spec.activation,
        })
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// [`softmax_top1`] of every row of `self.forward(x)`: `[.., 2]` holding each row's most
    /// likely class (as f32) and its probability. On the CPU the logits are computed a block of
    /// rows at a time into a reused buffer: for a recogniser with thousands of classes they are
    /// by far the largest tensor of the forward (a batch's can pass 100 MB), and writing them
    /// into fresh memory cost more than the product itself. `None` where this does not apply
    /// (not the CPU, not f32, an activation after the product).
    pub fn forward_top1(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if !x.device().is_cpu()
            || x.dtype() != DType::F32
            || !matches!(self.activation, Activation::None)
        {
            return Ok(None);
        }
        let mut dims = x.dims().to_vec();
        let in_f = dims.last().copied().unwrap_or(0);
        let classes = self.out_features();
        let rows = x.elem_count() / in_f.max(1);
        if rows == 0 || in_f == 0 || classes == 0 || self.weight.dim(0)? != in_f {
            return Ok(None);
        }
        let x = x.contiguous()?;
        let weight = self.weight.contiguous()?;
        let block = (TOP1_BLOCK_ELEMS / classes).clamp(1, rows);
        let threads = candle_core::utils::get_num_threads();
        let mut out = vec![0f32; rows * 2];
        {
            let (xs, xl) = x.storage_and_layout();
            let (ws, wl) = weight.storage_and_layout();
            let bias = self.bias.as_ref().map(Tensor::storage_and_layout);
            let xv = cpu_f32(&xs, xl, "linear top-1")?;
            let wm = Mat {
                data: cpu_f32(&ws, wl, "linear top-1")?,
                rows: in_f,
                cols: classes,
                rs: classes,
                cs: 1,
            };
            let bias = bias
                .as_ref()
                .map(|(s, l)| cpu_f32(s, l, "linear top-1"))
                .transpose()?;
            if bias.is_some_and(|b| b.len() != classes) {
                candle_core::bail!("linear top-1: bias does not match {classes} classes");
            }
            with_scratch(
                Scratch::Gather,
                block * classes,
                |scratch| -> candle_core::Result<()> {
                    for (i, dst) in out.chunks_mut(2 * block).enumerate() {
                        let nr = dst.len() / 2;
                        let logits = &mut scratch[..nr * classes];
                        let xb = Mat {
                            data: &xv[i * block * in_f..],
                            rows: nr,
                            cols: in_f,
                            rs: in_f,
                            cs: 1,
                        };
                        let lm = MatMut {
                            data: &mut *logits,
                            rows: nr,
                            cols: classes,
                            rs: classes,
                        };
                        matmul_into(lm, xb, wm, false, threads)?;
                        logits
                            .par_chunks_mut(classes)
                            .zip(dst.par_chunks_mut(2))
                            .for_each(|(row, d)| {
                                if let Some(b) = bias {
                                    add_assign_wide(row, b);
                                }
                                let (best, p) = softmax_top1(row);
                                d[0] = best as f32;
                                d[1] = p;
                            });
                    }
                    Ok(())
                },
            )?;
        }
        if let Some(last) = dims.last_mut() {
            *last = 2;
        }
        Ok(Some(Tensor::from_vec(out, dims, x.device())?))
    }
}

/// Logits per block of [`Linear::forward_top1`] (8 MB).
const TOP1_BLOCK_ELEMS: usize = 2 * 1024 * 1024;

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_f = dims.last().copied().unwrap_or(0);
        let rows = x.elem_count() / in_f.max(1);
        let y = x.reshape((rows, in_f))?.matmul(&self.weight)?;
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = self.out_features();
        }
        let ep = Epilogue {
            activation: self.activation,
            post_affine: None,
            repeat: 1,
            per_column: true,
        };
        if ((y.device().is_cpu() && y.dtype() == DType::F32) || custom_cuda_kernel(&y))
            && y.is_contiguous()
        {
            match &self.bias {
                Some(b) => y.inplace_op2(b, &ep)?,
                None if !ep.is_identity() => y.inplace_op1(&ep)?,
                None => {}
            }
            return y.reshape(out_dims);
        }
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
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
    /// Always in f32: the variance of a half-precision row loses the few bits that separate
    /// similar characters, and the norm is a tiny part of the work.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let y = candle_nn::ops::layer_norm(
            &x.to_dtype(DType::F32)?.contiguous()?,
            &self.weight,
            &self.bias,
            self.eps,
        )?;
        y.to_dtype(dtype)
    }
}

/// `dst + src` for tensors of the same shape, written into `dst`'s storage when that is a
/// contiguous CPU buffer. `dst` must not be shared with a tensor still in use.
pub fn add_into(dst: Tensor, src: &Tensor) -> candle_core::Result<Tensor> {
    if dst.device().is_cpu()
        && dst.dtype() == DType::F32
        && dst.is_contiguous()
        && dst.dims() == src.dims()
    {
        dst.inplace_op2(&src.contiguous()?, &AddAssign)?;
        return Ok(dst);
    }
    dst + src
}

struct AddAssign;

impl InplaceOp2 for AddAssign {
    fn name(&self) -> &'static str {
        "add-assign"
    }

    fn cpu_fwd(
        &self,
        d: &mut CpuStorage,
        dl: &Layout,
        s: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        let src = contiguous_f32(s, sl, "add")?;
        let dst = epilogue_slice(d, dl)?;
        if src.len() != dst.len() {
            candle_core::bail!("add: {:?} += {:?}", dl.dims(), sl.dims());
        }
        dst.par_chunks_mut(EPILOGUE_CHUNK)
            .zip(src.par_chunks(EPILOGUE_CHUNK))
            .for_each(|(d, s)| add_assign_wide(d, s));
        Ok(())
    }
}

/// `x * gate` (or `x * (1 + gate)` with `plus_one`) for `x` `[n, c, h, w]` and a per-channel
/// `gate` `[n, c, 1, 1]`, written into `x`'s storage when that is a contiguous CPU buffer. `x`
/// must not be shared with a tensor still in use.
pub fn scale_channels_into(
    x: Tensor,
    gate: &Tensor,
    plus_one: bool,
) -> candle_core::Result<Tensor> {
    let (n, c, _, _) = x.dims4()?;
    if x.device().is_cpu()
        && x.dtype() == DType::F32
        && x.is_contiguous()
        && gate.elem_count() == n * c
    {
        x.inplace_op2(&gate.contiguous()?, &ChannelScale { plus_one })?;
        return Ok(x);
    }
    if plus_one {
        x.broadcast_mul(&(gate + 1.0)?)
    } else {
        x.broadcast_mul(gate)
    }
}

struct ChannelScale {
    plus_one: bool,
}

impl InplaceOp2 for ChannelScale {
    fn name(&self) -> &'static str {
        "channel-scale"
    }

    fn cpu_fwd(
        &self,
        d: &mut CpuStorage,
        dl: &Layout,
        s: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        let gate = contiguous_f32(s, sl, "channel scale")?;
        let x = epilogue_slice(d, dl)?;
        let plane = x.len() / gate.len().max(1);
        if plane == 0 {
            return Ok(());
        }
        let add = if self.plus_one { 1.0 } else { 0.0 };
        x.par_chunks_mut(plane)
            .enumerate()
            .with_min_len(EPILOGUE_CHUNK.div_ceil(plane))
            .for_each(|(i, row)| {
                let g = gate[i] + add;
                for v in row.iter_mut() {
                    *v *= g;
                }
            });
        Ok(())
    }
}

/// Mean over the spatial axes, keeping them: `[n, c, h, w]` -> `[n, c, 1, 1]`. Summed in f32
/// whatever `x` holds: an f16 sum over a page's 100k+ pixels overflows (65504) and turns the
/// squeeze-excite gates, and with them the detector's whole map, into NaN.
pub fn global_avg_pool(x: &Tensor) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    x.reshape((n, c, h * w))?
        .to_dtype(DType::F32)?
        .mean_keepdim(D::Minus1)?
        .to_dtype(x.dtype())?
        .reshape((n, c, 1, 1))
}

/// The range `first..last` of output columns `j < out_w` whose input column
/// `j * stride + offset - pad` lies inside `0..width`: what a gather copies,
/// the rest being padding.
fn columns_inside(
    pad: usize,
    offset: usize,
    stride: usize,
    width: usize,
    out_w: usize,
) -> (usize, usize) {
    let first = pad.saturating_sub(offset).div_ceil(stride).min(out_w);
    let last = if width + pad > offset {
        ((width + pad - offset - 1) / stride + 1).min(out_w)
    } else {
        0
    };
    (first, last)
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
                let pg = PhaseGemm::new(&wt, stride, &Device::Cpu, DType::F32).expect("new");
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
    fn banded_phase_gemm_matches_wide() {
        let cases: &[ConvCase] = &[
            ((3, 3), (1, 1), [1, 1, 1, 1], (9, 11)),
            ((2, 2), (1, 1), [0, 0, 1, 1], (5, 6)),
            ((5, 3), (1, 1), [2, 1, 2, 1], (6, 6)),
            ((3, 3), (2, 2), [1, 1, 1, 1], (9, 11)),
            ((3, 3), (2, 2), [1, 1, 1, 1], (8, 10)),
            ((3, 3), (2, 1), [1, 1, 1, 1], (8, 7)),
        ];
        for &((kh, kw), stride, pads, (h, w)) in cases {
            for n in [1, 2] {
                let wt = seq(&[6, 6, kh, kw], 1.0);
                let pg = PhaseGemm::new(&wt, stride, &Device::Cpu, DType::F32).expect("new");
                // Channels 0..2 at full size, 2..6 upsampled from a half-size map.
                let a = seq(&[n, 2, h, w], 2.0);
                let half = seq(&[n, 4, h.div_ceil(2), w.div_ceil(2)], 1.5);
                let b = upsample_nearest(&half, 2, 2)
                    .and_then(|t| t.narrow(2, 0, h))
                    .and_then(|t| t.narrow(3, 0, w))
                    .expect("up");
                let x = Tensor::cat(&[&a, &b], 1).expect("cat");
                let (want, wo) = pg.forward_wide(&x, pads).expect("wide");
                // A few hundred elements per band: several bands even on these small maps.
                let (got, wo2) = pg.forward_banded(&[(&x, 1)], pads, 300).expect("banded");
                assert_eq!((got.dims(), wo2), (want.dims(), wo));
                assert!(
                    max_diff(&got, &want) < 1e-4,
                    "k {kh}x{kw} s {stride:?} n {n}"
                );
                if h % 2 == 0 && w % 2 == 0 {
                    let (got, _) = pg
                        .forward_banded(&[(&a, 1), (&half, 2)], pads, 300)
                        .expect("sources");
                    assert!(
                        max_diff(&got, &want) < 1e-4,
                        "sources k {kh}x{kw} s {stride:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn im2col_matches_conv2d() {
        let cases: &[ConvCase] = &[
            ((3, 3), (2, 2), [1, 1, 1, 1], (9, 11)),
            ((3, 3), (1, 1), [1, 1, 1, 1], (8, 7)),
            ((3, 3), (2, 1), [0, 1, 2, 1], (8, 7)),
        ];
        for &((kh, kw), stride, pads, (h, w)) in cases {
            let x = seq(&[2, 3, h, w], 2.0);
            let wt = seq(&[5, 3, kh, kw], 1.0);
            let got = im2col_banded(&x, &wt, stride, pads, 40).expect("im2col");
            let xp = x
                .pad_with_zeros(2, pads[0], pads[2])
                .and_then(|t| t.pad_with_zeros(3, pads[1], pads[3]))
                .expect("pad");
            let full = xp.conv2d(&wt, 0, 1, 1, 1).expect("conv");
            let want =
                subsample(&subsample(&full, 2, stride.0).expect("s"), 3, stride.1).expect("s");
            assert_eq!(got.dims(), want.dims(), "k {kh}x{kw} s {stride:?}");
            assert!(max_diff(&got, &want) < 1e-4, "k {kh}x{kw} s {stride:?}");
        }
    }

    fn pointwise(weight: Tensor, bias: Option<Tensor>, activation: Activation) -> Conv2d {
        let spec = ConvSpec {
            node: "test".into(),
            weight,
            bias,
            stride: (1, 1),
            pads: [0; 4],
            groups: 1,
            transpose: false,
            activation,
            post_affine: None,
            input_op: None,
            input: "x".into(),
            output: "y".into(),
            dtype: DType::F32,
        };
        Conv2d::new(spec, &Device::Cpu).expect("conv")
    }

    #[test]
    fn pointwise_pair_matches_two_convs() {
        // 5x7 pixels: several bands per batch item, the last one short.
        for (c, hid, residual) in [(6, 700, true), (6, 12, false), (4, 9, false)] {
            let co = if residual { c } else { 5 };
            let first = pointwise(
                seq(&[hid, c, 1, 1], 1.0),
                Some(seq(&[hid], 0.5)),
                Activation::GeluErf,
            );
            let second = pointwise(seq(&[co, hid, 1, 1], 0.1), None, Activation::None);
            let x = seq(&[2, c, 5, 7], 2.0);
            let mut want = second
                .forward(&first.forward(&x).expect("first"))
                .expect("second");
            if residual {
                want = (want + &x).expect("residual");
            }
            // A copy, since with the residual the result is written into the input.
            let input = x.copy().expect("copy");
            let got = pointwise_pair(&input, &first, &second, residual)
                .expect("pair")
                .expect("applies on the CPU");
            assert_eq!(got.dims(), want.dims());
            assert!(max_diff(&got, &want) < 1e-4, "c {c} hid {hid}");
            // Bands of 16 pixels: three per batch item, the last one short.
            let input = x.copy().expect("copy");
            let got = pointwise_pair_banded(&input, &first, &second, residual, 16 * (hid + co))
                .expect("pair")
                .expect("applies on the CPU");
            assert!(max_diff(&got, &want) < 1e-4, "banded, c {c} hid {hid}");
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
    fn exp_fast_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let want = f64::from(x).exp();
            worst = worst.max(((f64::from(exp_fast(x)) - want) / want).abs());
        }
        assert!(worst < 3e-7, "exp relative error {worst}");
        assert_eq!(exp_fast(0.0), 1.0);
    }

    /// Pseudo-random values in `[-scale / 2, scale / 2)`: unlike [`seq`], no two rows repeat.
    fn noise(shape: &[usize], scale: f32, seed: u32) -> Tensor {
        let mut state = seed;
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((state >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    }

    #[test]
    fn linear_top1_matches_softmax_of_forward() {
        let spec = LinearSpec {
            node: "head".into(),
            weight: noise(&[24, 3000], 3.0, 1),
            bias: Some(noise(&[3000], 1.0, 2)),
            activation: Activation::None,
            output: "logits".into(),
            dtype: DType::F32,
        };
        let head = Linear::new(spec, &Device::Cpu).expect("linear");
        let x = noise(&[3, 7, 24], 2.0, 3);
        let got = head.forward_top1(&x).expect("top1").expect("applies");
        assert_eq!(got.dims(), &[3, 7, 2]);
        let probs =
            candle_nn::ops::softmax_last_dim(&head.forward(&x).expect("forward")).expect("softmax");
        let want: Vec<f32> = probs.flatten_all().and_then(|t| t.to_vec1()).expect("vec");
        let got: Vec<f32> = got.flatten_all().and_then(|t| t.to_vec1()).expect("vec");
        for (g, row) in got.chunks_exact(2).zip(want.chunks_exact(3000)) {
            let (best, p) = crate::ctc::top1(row);
            assert_eq!(g[0], best as f32);
            assert!((g[1] - p).abs() <= 1e-6 * p, "{} vs {p}", g[1]);
        }
    }

    #[test]
    fn max_pool_matches_padded_candle_pool() {
        for (h, w) in [(1, 1), (1, 5), (4, 1), (5, 7)] {
            let x = seq(&[2, 3, h, w], 3.0);
            let got = max_pool_2x2_same(&x).expect("pool");
            let want = x
                .pad_with_same(2, 0, 1)
                .and_then(|t| t.pad_with_same(3, 0, 1))
                .and_then(|t| t.max_pool2d_with_stride(2, 1))
                .expect("candle pool");
            assert_eq!(got.dims(), want.dims());
            assert!(max_diff(&got, &want) == 0.0, "{h}x{w}");
        }
    }

    #[test]
    fn pixel_shuffle_matches_permute() {
        let (n, o, kh, kw, h, w) = (2, 3, 2, 3, 4, 5);
        let y = seq(&[n, o * kh * kw, h * w], 1.0);
        let got = y
            .apply_op1_no_bwd(&PixelShuffle { o, kh, kw, h, w })
            .expect("shuffle");
        let want = y
            .reshape((n, o, kh, kw, h, w))
            .and_then(|t| t.permute((0, 1, 4, 2, 5, 3)))
            .and_then(|t| t.reshape((n, o, h * kh, w * kw)))
            .expect("permute");
        assert_eq!(got.dims(), want.dims());
        assert!(max_diff(&got, &want) == 0.0);
    }

    #[test]
    fn add_upsampled_matches_add_of_upsample() {
        let lateral = seq(&[2, 3, 6, 8], 1.0);
        let prev = seq(&[2, 3, 3, 4], 2.0);
        let want = (&lateral + upsample_nearest(&prev, 2, 2).expect("up")).expect("add");
        let got = add_upsampled_into(lateral.copy().expect("copy"), &prev, 2, 2).expect("into");
        assert!(max_diff(&got, &want) == 0.0);
    }

    #[test]
    fn upsample_repeats_pixels() {
        let x = Tensor::from_vec(vec![1f32, 2., 3., 4.], (1, 1, 2, 2), &Device::Cpu).expect("t");
        let y = upsample_nearest(&x, 2, 2).expect("up");
        let want = x.upsample_nearest2d(4, 4).expect("up");
        assert!(max_diff(&y, &want) == 0.0);
    }
}
