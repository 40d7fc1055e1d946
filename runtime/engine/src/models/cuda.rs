//! The engine's own CUDA kernels (`cuda/*.cu`, compiled to PTX by `build.rs`), for the layers
//! candle has no good kernel for. Each runs through a candle custom op, so it joins candle's
//! stream with no extra synchronisation.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Shape};

const DEPTHWISE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/depthwise.ptx"));

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the custom kernels off (candle's generic ops take over), for measuring what they
/// are worth; on by default.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Depthwise conv on CUDA storage: `x` `[n, c, h, w]`, `weight` `[c, 1, kh, kw]`, `bias` `[c]`,
/// all contiguous and of one dtype (f32, f16 or bf16).
pub fn depthwise_conv2d(
    (xs, xl): (&CudaStorage, &Layout),
    (ws, wl): (&CudaStorage, &Layout),
    (bs, bl): (&CudaStorage, &Layout),
    stride: (usize, usize),
    pads: [usize; 4],
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (n, c, h, w) = xl.shape().dims4()?;
    let (_, _, kh, kw) = wl.shape().dims4()?;
    if !(xl.is_contiguous() && wl.is_contiguous() && bl.is_contiguous()) {
        candle_core::bail!("depthwise conv (cuda): inputs must be contiguous");
    }
    let ho = (h + pads[0] + pads[2] - kh) / stride.0 + 1;
    let wo = (w + pads[1] + pads[3] - kw) / stride.1 + 1;
    let dims = Dims {
        n,
        c,
        h,
        w,
        kh,
        kw,
        stride,
        pt: pads[0],
        pl: pads[1],
        ho,
        wo,
    };
    let dev = xs.device();
    let offsets = (xl.start_offset(), wl.start_offset(), bl.start_offset());
    let slice = match (&xs.slice, &ws.slice, &bs.slice) {
        (CudaStorageSlice::F32(x), CudaStorageSlice::F32(wt), CudaStorageSlice::F32(b)) => {
            CudaStorageSlice::F32(launch(
                dev,
                "depthwise_conv2d_f32",
                x,
                wt,
                b,
                offsets,
                &dims,
            )?)
        }
        (CudaStorageSlice::F16(x), CudaStorageSlice::F16(wt), CudaStorageSlice::F16(b)) => {
            CudaStorageSlice::F16(launch(
                dev,
                "depthwise_conv2d_f16",
                x,
                wt,
                b,
                offsets,
                &dims,
            )?)
        }
        (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(wt), CudaStorageSlice::BF16(b)) => {
            CudaStorageSlice::BF16(launch(
                dev,
                "depthwise_conv2d_bf16",
                x,
                wt,
                b,
                offsets,
                &dims,
            )?)
        }
        _ => candle_core::bail!(
            "depthwise conv (cuda): input, weight and bias must share one of f32, f16, bf16"
        ),
    };
    Ok((
        CudaStorage {
            slice,
            device: dev.clone(),
        },
        Shape::from((n, c, ho, wo)),
    ))
}

struct Dims {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: (usize, usize),
    pt: usize,
    pl: usize,
    ho: usize,
    wo: usize,
}

fn launch<T: DeviceRepr>(
    dev: &CudaDevice,
    kernel: &str,
    x: &CudaSlice<T>,
    weight: &CudaSlice<T>,
    bias: &CudaSlice<T>,
    (xo, wo_, bo): (usize, usize, usize),
    d: &Dims,
) -> candle_core::Result<CudaSlice<T>> {
    let count = d.n * d.c * d.ho * d.wo;
    let u32_of = |v: usize| {
        u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{v} exceeds u32")))
    };
    let func = dev.get_or_load_custom_func(kernel, "ocr_engine_depthwise", DEPTHWISE_PTX)?;
    // SAFETY: every element is written by the kernel below before anything reads it.
    let out = unsafe { dev.alloc::<T>(count)? };
    let (x, weight, bias) = (x.slice(xo..), weight.slice(wo_..), bias.slice(bo..));
    let block = 256u32;
    // Grid-stride loop: enough blocks to fill the GPU, no more than the work needs.
    let blocks = u32_of(count.div_ceil(block as usize))?.clamp(1, 65_535 * 8);
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut builder = func.builder();
    builder.arg(&x);
    builder.arg(&weight);
    builder.arg(&bias);
    builder.arg(&out);
    candle_core::builder_arg!(
        builder,
        u32_of(d.n)?,
        u32_of(d.c)?,
        u32_of(d.h)?,
        u32_of(d.w)?,
        u32_of(d.kh)?,
        u32_of(d.kw)?,
        u32_of(d.stride.0)?,
        u32_of(d.stride.1)?,
        u32_of(d.pt)?,
        u32_of(d.pl)?,
        u32_of(d.ho)?,
        u32_of(d.wo)?
    );
    // SAFETY: the argument list matches the kernel's signature in cuda/depthwise.cu, and the
    // buffers hold at least the elements the dims above address.
    unsafe { builder.launch(cfg) }.w()?;
    Ok(out)
}

const EPILOGUE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/epilogue.ptx"));

/// How [`epilogue`] indexes the bias and what it applies (see `cuda/epilogue.cu`).
pub struct EpilogueParams {
    pub per_column: bool,
    pub cols: usize,
    pub rows: usize,
    pub inner: usize,
    pub repeat: usize,
    /// The activation's code in `cuda/epilogue.cu`.
    pub activation: u32,
    pub alpha: f32,
    pub beta: f32,
    pub post_affine: Option<(f32, f32)>,
}

/// `y = act(y + bias) * scale + shift` in place, on contiguous CUDA storage.
pub fn epilogue(
    (ys, yl): (&mut CudaStorage, &Layout),
    bias: Option<(&CudaStorage, &Layout)>,
    p: &EpilogueParams,
) -> candle_core::Result<()> {
    if !yl.is_contiguous() || bias.is_some_and(|(_, bl)| !bl.is_contiguous()) {
        candle_core::bail!("epilogue (cuda): tensors must be contiguous");
    }
    let dev = ys.device().clone();
    let total = yl.shape().elem_count();
    let yo = yl.start_offset();
    let bo = bias.map_or(0, |(_, bl)| bl.start_offset());
    match (&mut ys.slice, bias.map(|(bs, _)| &bs.slice)) {
        (CudaStorageSlice::F32(y), b) => {
            let b = match b {
                Some(CudaStorageSlice::F32(b)) => Some(b),
                None => None,
                _ => candle_core::bail!("epilogue (cuda): bias dtype differs from the output's"),
            };
            launch_epilogue(&dev, "epilogue_f32", y, b, (yo, bo), total, p)
        }
        (CudaStorageSlice::F16(y), b) => {
            let b = match b {
                Some(CudaStorageSlice::F16(b)) => Some(b),
                None => None,
                _ => candle_core::bail!("epilogue (cuda): bias dtype differs from the output's"),
            };
            launch_epilogue(&dev, "epilogue_f16", y, b, (yo, bo), total, p)
        }
        (CudaStorageSlice::BF16(y), b) => {
            let b = match b {
                Some(CudaStorageSlice::BF16(b)) => Some(b),
                None => None,
                _ => candle_core::bail!("epilogue (cuda): bias dtype differs from the output's"),
            };
            launch_epilogue(&dev, "epilogue_bf16", y, b, (yo, bo), total, p)
        }
        _ => candle_core::bail!("epilogue (cuda): only f32, f16 and bf16"),
    }
}

fn launch_epilogue<T: DeviceRepr>(
    dev: &CudaDevice,
    kernel: &str,
    y: &mut CudaSlice<T>,
    bias: Option<&CudaSlice<T>>,
    (yo, bo): (usize, usize),
    total: usize,
    p: &EpilogueParams,
) -> candle_core::Result<()> {
    let u32_of = |v: usize| {
        u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{v} exceeds u32")))
    };
    let func = dev.get_or_load_custom_func(kernel, "ocr_engine_epilogue", EPILOGUE_PTX)?;
    let block = 256u32;
    let blocks = u32_of(total.div_ceil(block as usize))?.clamp(1, 65_535 * 8);
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    };
    let (scale, shift) = p.post_affine.unwrap_or((1.0, 0.0));
    // Without a bias the kernel never reads the pointer; a one-element buffer stands in.
    let placeholder;
    let bias_view = match bias {
        Some(b) => b.slice(bo..),
        None => {
            // SAFETY: never read (has_bias = 0).
            placeholder = unsafe { dev.alloc::<T>(1)? };
            placeholder.slice(0..)
        }
    };
    let mut y = y.slice_mut(yo..);
    let mut builder = func.builder();
    builder.arg(&mut y);
    builder.arg(&bias_view);
    candle_core::builder_arg!(
        builder,
        total as u64,
        u32::from(bias.is_some()),
        u32::from(p.per_column),
        u32_of(p.cols)?,
        u32_of(p.rows)?,
        u32_of(p.inner)?,
        u32_of(p.repeat)?,
        p.activation,
        p.alpha,
        p.beta,
        u32::from(p.post_affine.is_some()),
        scale,
        shift
    );
    // SAFETY: the argument list matches `cuda/epilogue.cu`; `y` holds `total` elements from its
    // offset and the bias the count checked by the caller.
    unsafe { builder.launch(cfg) }.w()?;
    Ok(())
}
