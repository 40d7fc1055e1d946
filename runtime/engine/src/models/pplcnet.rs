//! PPLCNet, the backbone of the PP-OCR detectors and recognisers, with its re-parameterised
//! branches already merged (as exported for inference): PPLCNetV4 (PP-OCRv6) and PPLCNetV3
//! (PP-OCRv5 mobile).
//!
//! V4 follows each block's depthwise token mixer with an expand/compress channel MLP and a
//! residual; V3 follows it with a single pointwise conv and wraps each conv's output in
//! learnable scalar affines (folded into the conv, or kept as its `post_affine`, by the graph
//! walker). V3's stem is one stride-2 conv, V4's a branching stride-4 one (or, in the tiny
//! recogniser, a plain one).
//!
//! The stage layout (how many blocks, which have squeeze-excite, where the stride-2 blocks are,
//! which block outputs the neck reads) is read from the graph, so the same code serves every
//! size of both the detection and the recognition variant.

use candle_core::{Device, Module, Tensor};

use super::graph::{ConvSpec, GraphWalker};
use super::layers::{
    add_into, global_avg_pool, max_pool_2x2_same, pointwise_pair, scale_channels_into, Conv2d,
};
use crate::error::Result;

/// Squeeze-and-excite: `x * gate(conv2(relu(conv1(mean(x)))))`. The gate (hard sigmoid, with
/// slope 1/6 in the backbone and 0.2 in the FPN) is the activation fused into `expand`.
#[derive(Debug, Clone)]
pub struct SqueezeExcite {
    reduce: Conv2d,
    expand: Conv2d,
}

impl SqueezeExcite {
    pub fn load(g: &mut GraphWalker, channels: usize, device: &Device) -> Result<Self> {
        let reduce = g.next_conv_checked("SE reduce", Some(channels), None, Some((1, 1)))?;
        let hidden = reduce.out_channels();
        let expand =
            g.next_conv_checked("SE expand", Some(hidden), Some(channels), Some((1, 1)))?;
        Ok(Self {
            reduce: Conv2d::new(reduce, device)?,
            expand: Conv2d::new(expand, device)?,
        })
    }

    /// True if the next conv in the graph reads a spatial mean, i.e. starts an SE module.
    pub fn comes_next(g: &GraphWalker) -> Result<bool> {
        Ok(g.peek_conv()?.is_some_and(|c| {
            matches!(
                c.input_op.as_deref(),
                Some("ReduceMean") | Some("GlobalAveragePool")
            )
        }))
    }
}

impl SqueezeExcite {
    /// The per-channel gate, `[n, c, 1, 1]`.
    pub fn gate(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.expand
            .forward(&self.reduce.forward(&global_avg_pool(x)?)?)
    }

    /// [`Module::forward`] that scales `x` in place; `x` must not be shared.
    pub fn forward_into(&self, x: Tensor) -> candle_core::Result<Tensor> {
        let s = self.gate(&x)?;
        scale_channels_into(x, &s, false)
    }
}

impl Module for SqueezeExcite {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_mul(&self.gate(x)?)
    }
}

/// LCNet block: depthwise token mixer (+ optional SE), then one pointwise conv (V3) or an
/// expand/compress channel MLP (V4), with a residual around the MLP where the graph has one.
#[derive(Debug, Clone)]
pub struct LcNetBlock {
    dw: Conv2d,
    se: Option<SqueezeExcite>,
    /// One or two 1x1 convs.
    mlp: Vec<Conv2d>,
    residual: bool,
    /// Resolved name of the block's output in the graph.
    output: String,
}

impl LcNetBlock {
    pub fn load(g: &mut GraphWalker, device: &Device) -> Result<Self> {
        let dw = g.next_conv()?;
        if !dw.is_depthwise() {
            return Err(g.error(format!(
                "block token mixer {} is not a depthwise conv (weight {:?}, groups {})",
                dw.node,
                dw.weight.dims(),
                dw.groups
            )));
        }
        let c = dw.in_channels();
        let stride = dw.stride;
        let se = if SqueezeExcite::comes_next(g)? {
            Some(SqueezeExcite::load(g, c, device)?)
        } else {
            None
        };
        let first = g.next_conv_checked("block pointwise", Some(c), None, Some((1, 1)))?;
        let mut output = first.output.clone();
        let mut mlp = vec![first];
        // A second pointwise conv belongs to the block only if it reads the first one's output:
        // after a V3 block the next 1x1 conv is the detector's stage projection, which reads
        // some earlier block's output.
        if let Some(next) = g.peek_conv()? {
            if next.kernel() == (1, 1) && !next.is_depthwise() && next.input == output {
                let hidden = mlp[0].out_channels();
                let compress =
                    g.next_conv_checked("block compress", Some(hidden), None, Some((1, 1)))?;
                output = compress.output.clone();
                mlp.push(compress);
            }
        }
        let out_ch = mlp.last().map(ConvSpec::out_channels).unwrap_or(c);
        let residual = match g.residual_sum_of(&output) {
            Some(sum) => {
                if stride != (1, 1) || out_ch != c {
                    return Err(g.error(format!(
                        "block at {} adds a residual but changes the shape (stride {stride:?}, \
                         {c} -> {out_ch} channels)",
                        dw.node
                    )));
                }
                output = sum;
                true
            }
            None => false,
        };
        Ok(Self {
            dw: Conv2d::new(dw, device)?,
            se,
            mlp: mlp
                .into_iter()
                .map(|spec| Conv2d::new(spec, device))
                .collect::<Result<_>>()?,
            residual,
            output,
        })
    }

    pub fn stride(&self) -> (usize, usize) {
        self.dw.stride()
    }

    pub fn out_channels(&self) -> usize {
        self.mlp
            .last()
            .map(Conv2d::out_channels)
            .unwrap_or(self.dw.out_channels())
    }
}

impl Module for LcNetBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let t = self.dw.forward(x)?;
        let t = match &self.se {
            Some(se) => se.forward_into(t)?,
            None => t,
        };
        if let [expand, compress] = &self.mlp[..] {
            if let Some(y) = pointwise_pair(&t, expand, compress, self.residual)? {
                return Ok(y);
            }
        }
        let mut y = t.clone();
        for conv in &self.mlp {
            y = conv.forward(&y)?;
        }
        if self.residual {
            add_into(y, &t)
        } else {
            Ok(y)
        }
    }
}

#[derive(Debug, Clone)]
pub struct BranchStem {
    stem1: Conv2d,
    stem2a: Conv2d,
    stem2b: Conv2d,
    stem3: Conv2d,
    stem4: Conv2d,
}

/// The stem, total stride 4.
#[derive(Debug, Clone)]
pub enum Stem {
    /// conv3x3/2 -> {maxpool2x2, conv2x2 -> conv2x2} -> concat -> conv3x3/2 -> conv1x1.
    Branch(Box<BranchStem>),
    /// A plain sequence of convs (the "simple" stem of the tiny recogniser, and V3's single
    /// stride-2 conv).
    Plain(Vec<Conv2d>),
}

impl Stem {
    fn load(g: &mut GraphWalker, device: &Device) -> Result<Self> {
        let stem1 = g.next_conv_checked("stem conv1", Some(3), None, Some((3, 3)))?;
        let mid = stem1.out_channels();
        let next = g
            .peek_conv()?
            .ok_or_else(|| g.error("graph ends after the first stem conv"))?;
        if next.kernel() == (2, 2) {
            let stem2a = g.next_conv_checked("stem2a", Some(mid), None, Some((2, 2)))?;
            let stem2b = g.next_conv_checked(
                "stem2b",
                Some(stem2a.out_channels()),
                Some(mid),
                Some((2, 2)),
            )?;
            let stem3 = g.next_conv_checked("stem3", Some(2 * mid), None, Some((3, 3)))?;
            let stem4 =
                g.next_conv_checked("stem4", Some(stem3.out_channels()), None, Some((1, 1)))?;
            Ok(Stem::Branch(Box::new(BranchStem {
                stem1: Conv2d::new(stem1, device)?,
                stem2a: Conv2d::new(stem2a, device)?,
                stem2b: Conv2d::new(stem2b, device)?,
                stem3: Conv2d::new(stem3, device)?,
                stem4: Conv2d::new(stem4, device)?,
            })))
        } else {
            let mut convs = vec![Conv2d::new(stem1, device)?];
            // Plain stems end where the first depthwise block starts.
            while g.peek_conv()?.is_some_and(|c| !c.is_depthwise()) {
                let prev = convs.last().map(Conv2d::out_channels);
                convs.push(Conv2d::new(
                    g.next_conv_checked("stem conv", prev, None, None)?,
                    device,
                )?);
            }
            Ok(Stem::Plain(convs))
        }
    }

    pub fn out_channels(&self) -> usize {
        match self {
            Stem::Branch(b) => b.stem4.out_channels(),
            Stem::Plain(v) => v.last().map(Conv2d::out_channels).unwrap_or(3),
        }
    }
}

impl Module for Stem {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Stem::Branch(b) => {
                let BranchStem {
                    stem1,
                    stem2a,
                    stem2b,
                    stem3,
                    stem4,
                } = b.as_ref();
                let x = stem1.forward(x)?;
                let x2 = stem2b.forward(&stem2a.forward(&x)?)?;
                let x1 = max_pool_2x2_same(&x)?;
                stem4.forward(&stem3.forward_concat(&[(x1, 1), (x2, 1)])?)
            }
            Stem::Plain(convs) => {
                let mut x = x.clone();
                for c in convs {
                    x = c.forward(&x)?;
                }
                Ok(x)
            }
        }
    }
}

/// PPLCNet: stem plus LCNet blocks, grouped into stages.
#[derive(Debug, Clone)]
pub struct PpLcNet {
    stem: Stem,
    blocks: Vec<LcNetBlock>,
    /// Index (into `blocks`) of the last block of each stage.
    stage_ends: Vec<usize>,
}

impl PpLcNet {
    /// Consumes the stem and every following depthwise block from the graph.
    pub fn load(g: &mut GraphWalker, device: &Device) -> Result<Self> {
        let stem = Stem::load(g, device)?;
        let mut blocks: Vec<LcNetBlock> = Vec::new();
        // Blocks start with a square depthwise conv; the recognisers' necks continue with a
        // 1-D (1 x k) depthwise conv, which must not be taken for another block.
        while g
            .peek_conv()?
            .is_some_and(|c| c.is_depthwise() && c.kernel().0 == c.kernel().1)
        {
            let b = LcNetBlock::load(g, device)?;
            let expected = blocks
                .last()
                .map(LcNetBlock::out_channels)
                .unwrap_or(stem.out_channels());
            if b.dw.in_channels() != expected {
                return Err(g.error(format!(
                    "block {} takes {} channels, the previous layer gives {expected}",
                    blocks.len(),
                    b.dw.in_channels()
                )));
            }
            blocks.push(b);
        }
        if blocks.is_empty() {
            return Err(g.error("no LCNet blocks after the stem"));
        }
        // A stage ends where something besides the next block reads the output (the
        // detector's neck taps these), and at the last block. Which blocks those are differs
        // between V3 and V4: V3's stride-2 stem leaves a first stage the neck ignores.
        let last = blocks.len() - 1;
        let stage_ends: Vec<usize> = (0..blocks.len())
            .filter(|&i| i == last || g.reader_count(&blocks[i].output) > 1)
            .collect();
        Ok(Self {
            stem,
            blocks,
            stage_ends,
        })
    }

    /// Output channels of each stage.
    pub fn stage_channels(&self) -> Vec<usize> {
        self.stage_ends
            .iter()
            .map(|&i| self.blocks[i].out_channels())
            .collect()
    }

    /// Resolved graph names of each stage's output.
    pub fn stage_outputs(&self) -> Vec<&str> {
        self.stage_ends
            .iter()
            .map(|&i| self.blocks[i].output.as_str())
            .collect()
    }

    pub fn out_channels(&self) -> usize {
        self.blocks
            .last()
            .map(LcNetBlock::out_channels)
            .unwrap_or(0)
    }

    /// The output of every stage, shallowest first.
    pub fn forward_stages(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let mut x = self.stem.forward(x)?;
        let mut outs = Vec::with_capacity(self.stage_ends.len());
        for (i, b) in self.blocks.iter().enumerate() {
            x = b.forward(&x)?;
            if self.stage_ends.contains(&i) {
                outs.push(x.clone());
            }
        }
        Ok(outs)
    }
}

impl Module for PpLcNet {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.stem.forward(x)?;
        for b in &self.blocks {
            x = b.forward(&x)?;
        }
        Ok(x)
    }
}
