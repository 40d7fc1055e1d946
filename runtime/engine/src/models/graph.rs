//! Maps the weights of an exported PP-OCR graph onto the hand-written networks.
//!
//! The Paddle exports give every tensor an auto generated name (`conv2d_113.w_0`,
//! `p2o.pd_op.add.7.0`), so names say nothing about which layer a weight belongs to. What is
//! stable is the order: the exporter writes nodes in execution order, and the network code builds
//! its layers in the same order. [`GraphWalker`] therefore hands out the weight-bearing nodes
//! (convolutions, linear layers, layer norms) one after the other, each with the bias, batch norm
//! (PP-OCRv6 has them folded already, PP-OCRv5 keeps some), scalar affine and activation that the
//! graph applies right after it, and the network code checks every shape it consumes. Where the
//! layout branches (which block outputs feed the neck, whether a block has a residual), the
//! network code asks the walker how tensors flow between nodes. A model with a different layout
//! fails to load with an error naming the node, instead of producing garbage.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::onnx::{scalar_f32, Attribute, Node, OnnxModel};

/// An activation fused into a layer, read from the nodes that consume the layer's output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    None,
    Relu,
    /// Exact GELU, `x * 0.5 * (1 + erf(x / sqrt(2)))`.
    GeluErf,
    /// `x * sigmoid(x)`.
    Swish,
    Sigmoid,
    /// `clamp(alpha * x + beta, 0, 1)`.
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    /// `x * hardsigmoid(x)`.
    HardSwish {
        alpha: f32,
        beta: f32,
    },
}

/// A convolution as the graph holds it, with bias and batch norm folded in.
#[derive(Debug, Clone)]
pub struct ConvSpec {
    pub node: String,
    /// `[out, in / groups, kh, kw]` for Conv, `[in, out / groups, kh, kw]` for ConvTranspose.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Option<Tensor>,
    pub stride: (usize, usize),
    /// top, left, bottom, right.
    pub pads: [usize; 4],
    pub groups: usize,
    pub transpose: bool,
    pub activation: Activation,
    /// PPLCNetV3's learnable affine after the activation, `scale * y + shift`. It cannot be
    /// folded into the next conv: that conv zero-pads the affine's output, not its input.
    pub post_affine: Option<(f32, f32)>,
    /// The op type that produced the convolution's input (after skipping Identity nodes).
    pub input_op: Option<String>,
    /// Resolved name of the tensor the convolution reads.
    pub input: String,
    /// Resolved name of the tensor the layer produces, after everything fused into it.
    pub output: String,
    /// What the layer computes in (see [`GraphWalker::with_dtype`]); `weight` stays f32.
    pub dtype: DType,
}

impl ConvSpec {
    pub fn out_channels(&self) -> usize {
        let d = self.weight.dims();
        if self.transpose {
            d[1] * self.groups
        } else {
            d[0]
        }
    }

    pub fn in_channels(&self) -> usize {
        let d = self.weight.dims();
        if self.transpose {
            d[0]
        } else {
            d[1] * self.groups
        }
    }

    pub fn kernel(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[2], d[3])
    }

    /// One filter per channel (`groups == in == out`), the layout of every token mixer here.
    pub fn is_depthwise(&self) -> bool {
        !self.transpose
            && self.groups > 1
            && self.groups == self.in_channels()
            && self.groups == self.out_channels()
    }
}

/// A MatMul against a constant `[in, out]` matrix, plus the bias add and activation after it.
#[derive(Debug, Clone)]
pub struct LinearSpec {
    pub node: String,
    /// `[in, out]`, as ONNX MatMul stores it.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub activation: Activation,
    /// Resolved name of the tensor the layer produces (after bias, before activation).
    pub output: String,
    /// What the layer computes in (see [`GraphWalker::with_dtype`]); `weight` stays f32.
    pub dtype: DType,
}

/// A layer norm over the last axis, decomposed in the graph into
/// ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add.
#[derive(Debug, Clone)]
pub struct LayerNormSpec {
    pub node: String,
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f32,
}

pub struct GraphWalker<'a> {
    model: &'a OnnxModel,
    /// Output -> input of pass-through nodes (see [`is_passthrough`]).
    alias: HashMap<&'a str, &'a str>,
    /// Resolved tensor name -> indices of the non-pass-through nodes reading it.
    consumers: HashMap<&'a str, Vec<usize>>,
    /// Resolved tensor name -> index of the node writing it.
    producer: HashMap<&'a str, usize>,
    convs: Vec<usize>,
    next_conv: usize,
    linears: Vec<usize>,
    next_linear: usize,
    norms: Vec<usize>,
    next_norm: usize,
    batch_norms_total: usize,
    batch_norms_folded: usize,
    dtype: DType,
}

impl<'a> GraphWalker<'a> {
    /// Layers built from this walker's specs compute in `dtype` (f16/bf16 halve the memory
    /// traffic and use the GPU's tensor cores); folding happens in f32 (or f64) first, so only
    /// the final weights are rounded. Layer norms stay f32 (see [`super::layers::LayerNorm`]).
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    pub fn new(model: &'a OnnxModel) -> Self {
        let mut alias = HashMap::new();
        for n in &model.nodes {
            if is_passthrough(n) {
                if let (Some(i), Some(o)) = (n.inputs.first(), n.outputs.first()) {
                    alias.insert(o.as_str(), i.as_str());
                }
            }
        }
        let mut walker = Self {
            model,
            alias,
            consumers: HashMap::new(),
            producer: HashMap::new(),
            convs: Vec::new(),
            next_conv: 0,
            linears: Vec::new(),
            next_linear: 0,
            norms: Vec::new(),
            next_norm: 0,
            batch_norms_total: 0,
            batch_norms_folded: 0,
            dtype: DType::F32,
        };
        for (idx, n) in model.nodes.iter().enumerate() {
            if is_passthrough(n) {
                continue;
            }
            for i in &n.inputs {
                let r = walker.resolve(i);
                walker.consumers.entry(r).or_default().push(idx);
            }
            for o in &n.outputs {
                walker.producer.insert(o.as_str(), idx);
            }
            match n.op_type.as_str() {
                "Conv" | "ConvTranspose" => walker.convs.push(idx),
                "MatMul" if n.inputs.get(1).is_some_and(|w| walker.init(w).is_some()) => {
                    walker.linears.push(idx)
                }
                "Sqrt" => walker.norms.push(idx),
                "BatchNormalization" => walker.batch_norms_total += 1,
                _ => {}
            }
        }
        walker
    }

    pub fn path(&self) -> &Path {
        self.model.path()
    }

    pub fn model(&self) -> &'a OnnxModel {
        self.model
    }

    /// A [`Error::ModelStructure`] for this model.
    pub fn error(&self, msg: impl Into<String>) -> Error {
        Error::ModelStructure {
            path: self.model.path().to_path_buf(),
            msg: msg.into(),
        }
    }

    /// Follows pass-through nodes back to the tensor they forward. Works for names of any
    /// lifetime: the aliases point into the model, which outlives them.
    fn resolve<'s>(&self, name: &'s str) -> &'s str
    where
        'a: 's,
    {
        let mut name = name;
        // Pass-through chains are short; the bound only guards against a malformed cyclic graph.
        for _ in 0..64 {
            match self.alias.get(name) {
                Some(next) => name = next,
                None => break,
            }
        }
        name
    }

    fn init(&self, name: &str) -> Option<&'a Tensor> {
        self.model.initializer(self.resolve(name))
    }

    fn node(&self, idx: usize) -> &'a Node {
        &self.model.nodes[idx]
    }

    fn consumers_of(&self, name: &str) -> &[usize] {
        self.consumers
            .get(self.resolve(name))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    fn producer_of(&self, name: &str) -> Option<&'a Node> {
        self.producer.get(self.resolve(name)).map(|&i| self.node(i))
    }

    fn single_consumer(&self, name: &str) -> Option<&'a Node> {
        match self.consumers_of(name) {
            [one] => Some(self.node(*one)),
            _ => None,
        }
    }

    /// For a binary node, the initializer among its inputs and the other (dynamic) input.
    fn const_operand(&self, n: &'a Node) -> Option<(&'a Tensor, &'a str)> {
        let [a, b] = n.inputs.as_slice() else {
            return None;
        };
        match (self.init(a), self.init(b)) {
            (None, Some(t)) => Some((t, a.as_str())),
            (Some(t), None) => Some((t, b.as_str())),
            _ => None,
        }
    }

    /// Follows a bias `Add` with `channels` values, if that is the only consumer of `out`.
    fn take_bias(&self, out: &'a str, channels: usize) -> Result<Option<(Tensor, &'a str)>> {
        let Some(n) = self.single_consumer(out) else {
            return Ok(None);
        };
        if n.op_type != "Add" {
            return Ok(None);
        }
        let Some((t, _)) = self.const_operand(n) else {
            return Ok(None);
        };
        if t.elem_count() != channels || t.dims().iter().filter(|&&d| d != 1).count() > 1 {
            return Ok(None);
        }
        let Some(o) = n.outputs.first() else {
            return Ok(None);
        };
        Ok(Some((t.flatten_all()?, self.resolve(o))))
    }

    /// Reads the activation applied to `out`, requiring that nothing else reads the
    /// pre-activation value (otherwise fusing it into the layer would be wrong). Also returns
    /// the tensor holding the activated value.
    fn activation_of<'s>(&self, out: &'s str) -> (Activation, &'s str)
    where
        'a: 's,
    {
        let cons: Vec<&'a Node> = self
            .consumers_of(out)
            .iter()
            .map(|&i| self.node(i))
            .collect();
        let op = |n: &Node, t: &str| n.op_type == t;
        let output = |n: &'a Node| n.outputs.first().map(|o| self.resolve(o));
        let (act, node): (Activation, Option<&'a Node>) = match cons.as_slice() {
            [n] if op(n, "Relu") => (Activation::Relu, Some(*n)),
            [n] if op(n, "Sigmoid") => (Activation::Sigmoid, Some(*n)),
            [n] if op(n, "HardSigmoid") => (
                Activation::HardSigmoid {
                    alpha: n.attr_float("alpha").unwrap_or(0.2),
                    beta: n.attr_float("beta").unwrap_or(0.5),
                },
                Some(*n),
            ),
            // ONNX HardSwish has fixed constants: x * clamp(x / 6 + 1 / 2, 0, 1).
            [n] if op(n, "HardSwish") => (
                Activation::HardSwish {
                    alpha: 1.0 / 6.0,
                    beta: 0.5,
                },
                Some(*n),
            ),
            [a, b] => {
                let (g, m) = if op(b, "Mul") { (*a, *b) } else { (*b, *a) };
                if !op(m, "Mul") {
                    return (Activation::None, out);
                }
                let g_out = g.outputs.first().map(|s| self.resolve(s));
                let mul_reads_gate = m.inputs.iter().any(|i| Some(self.resolve(i)) == g_out);
                match g.op_type.as_str() {
                    "Sigmoid" if mul_reads_gate => (Activation::Swish, Some(m)),
                    "HardSigmoid" if mul_reads_gate => (
                        Activation::HardSwish {
                            alpha: g.attr_float("alpha").unwrap_or(0.2),
                            beta: g.attr_float("beta").unwrap_or(0.5),
                        },
                        Some(m),
                    ),
                    // GELU as exported: Div(x, sqrt2) -> Erf -> Add 1 -> Mul(x, .) -> Mul 0.5.
                    "Div" if self.is_gelu_div(g) => {
                        let half = m
                            .outputs
                            .first()
                            .and_then(|o| self.single_consumer(o))
                            .filter(|n| op(n, "Mul") && self.const_operand(n).is_some());
                        (Activation::GeluErf, Some(half.unwrap_or(m)))
                    }
                    _ => (Activation::None, None),
                }
            }
            _ => (Activation::None, None),
        };
        match node.and_then(output) {
            Some(o) if act != Activation::None => (act, o),
            _ => (Activation::None, out),
        }
    }

    /// A `Mul` by a one-element constant, optionally followed by an `Add` of one, as the only
    /// reader of `out`: PPLCNetV3's learnable affine block. Returns scale, shift and the
    /// tensor after it.
    fn take_scalar_affine(&self, out: &str) -> Option<(f32, f32, &'a str)> {
        let mul = self.single_consumer(out).filter(|n| n.op_type == "Mul")?;
        let (s, _) = self.const_operand(mul)?;
        if s.elem_count() != 1 {
            return None;
        }
        let scale = scalar_f32(s).ok()?;
        let mul_out = self.resolve(mul.outputs.first()?);
        let add = self
            .single_consumer(mul_out)
            .filter(|n| n.op_type == "Add")
            .and_then(|n| Some((n, self.const_operand(n)?.0)))
            .filter(|(_, c)| c.elem_count() == 1);
        match add {
            Some((n, c)) => Some((scale, scalar_f32(c).ok()?, self.resolve(n.outputs.first()?))),
            None => Some((scale, 0.0, mul_out)),
        }
    }

    fn is_gelu_div(&self, div: &Node) -> bool {
        let Some((c, _)) = self.const_operand(div) else {
            return false;
        };
        let Ok(c) = scalar_f32(c) else {
            return false;
        };
        let Some(out) = div.outputs.first() else {
            return false;
        };
        (c - std::f32::consts::SQRT_2).abs() < 1e-5
            && self
                .single_consumer(out)
                .is_some_and(|n| n.op_type == "Erf")
    }

    /// The next Conv/ConvTranspose without consuming it.
    pub fn peek_conv(&self) -> Result<Option<ConvSpec>> {
        match self.convs.get(self.next_conv) {
            Some(&idx) => Ok(Some(self.conv_spec(idx)?)),
            None => Ok(None),
        }
    }

    /// The Conv/ConvTranspose `offset` places after the next one, without consuming anything.
    pub fn peek_conv_at(&self, offset: usize) -> Result<Option<ConvSpec>> {
        match self.convs.get(self.next_conv + offset) {
            Some(&idx) => Ok(Some(self.conv_spec(idx)?)),
            None => Ok(None),
        }
    }

    /// Consumes the next Conv/ConvTranspose.
    pub fn next_conv(&mut self) -> Result<ConvSpec> {
        let Some(&idx) = self.convs.get(self.next_conv) else {
            return Err(self.error("expected another convolution, the graph has no more"));
        };
        let spec = self.conv_spec(idx)?;
        self.next_conv += 1;
        let n = self.node(idx);
        let mut out = n.outputs.first().map(|o| self.resolve(o));
        // Count batch norms folded into this conv so `finish` can spot ones nobody consumed.
        while let Some(o) = out {
            match self.single_consumer(o) {
                Some(c) if c.op_type == "BatchNormalization" => {
                    self.batch_norms_folded += 1;
                    out = c.outputs.first().map(|x| self.resolve(x));
                }
                Some(c) if c.op_type == "Add" && self.const_operand(c).is_some() => {
                    out = c.outputs.first().map(|x| self.resolve(x));
                }
                _ => break,
            }
        }
        Ok(spec)
    }

    /// Consumes the next conv and checks its shape; `None` fields are not checked.
    pub fn next_conv_checked(
        &mut self,
        what: &str,
        in_ch: Option<usize>,
        out_ch: Option<usize>,
        kernel: Option<(usize, usize)>,
    ) -> Result<ConvSpec> {
        let c = self.next_conv()?;
        let ok = in_ch.is_none_or(|v| v == c.in_channels())
            && out_ch.is_none_or(|v| v == c.out_channels())
            && kernel.is_none_or(|k| k == c.kernel());
        if !ok {
            return Err(self.error(format!(
                "{what}: node {} has weight {:?} (in {}, out {}, groups {}), expected in {:?}, out {:?}, kernel {:?}",
                c.node,
                c.weight.dims(),
                c.in_channels(),
                c.out_channels(),
                c.groups,
                in_ch,
                out_ch,
                kernel
            )));
        }
        Ok(c)
    }

    fn conv_spec(&self, idx: usize) -> Result<ConvSpec> {
        let n = self.node(idx);
        let transpose = n.op_type == "ConvTranspose";
        let err = |m: String| self.error(format!("{} node {}: {m}", n.op_type, n.name));
        let w_name = n
            .inputs
            .get(1)
            .ok_or_else(|| err("no weight input".into()))?;
        let weight = self
            .init(w_name)
            .ok_or_else(|| err(format!("weight {w_name} is not an initializer")))?
            .to_dtype(DType::F32)?;
        if weight.rank() != 4 {
            return Err(err(format!(
                "weight has shape {:?}, expected 4-D",
                weight.dims()
            )));
        }
        let groups = n.attr_int("group").unwrap_or(1).max(1) as usize;
        let (kh, kw) = (weight.dims()[2], weight.dims()[3]);
        let out_ch = if transpose {
            weight.dims()[1] * groups
        } else {
            weight.dims()[0]
        };
        if let Some(d) = n.attr_ints("dilations") {
            if d.iter().any(|&v| v != 1) {
                return Err(err(format!("dilations {d:?} are not supported")));
            }
        }
        let stride = match n.attr_ints("strides") {
            Some([h, w]) => (to_usize(*h), to_usize(*w)),
            None => (1, 1),
            Some(s) => return Err(err(format!("strides {s:?} are not 2-D"))),
        };
        if stride.0 == 0 || stride.1 == 0 {
            return Err(err(format!("invalid strides {stride:?}")));
        }
        let auto_pad = n.attr_str("auto_pad").unwrap_or(b"NOTSET");
        let pads = match auto_pad {
            b"NOTSET" | b"" => match n.attr_ints("pads") {
                Some([t, l, b, r]) => [to_usize(*t), to_usize(*l), to_usize(*b), to_usize(*r)],
                None => [0; 4],
                Some(p) => return Err(err(format!("pads {p:?} are not 2-D"))),
            },
            b"VALID" => [0; 4],
            // SAME_* only has input-independent padding at stride 1; the PP-OCR graphs use it
            // solely for the 2x2 stem convs.
            b"SAME_UPPER" | b"SAME_LOWER" if stride == (1, 1) && !transpose => {
                let (th, tw) = (kh - 1, kw - 1);
                if auto_pad == b"SAME_UPPER" {
                    [th / 2, tw / 2, th - th / 2, tw - tw / 2]
                } else {
                    [th - th / 2, tw - tw / 2, th / 2, tw / 2]
                }
            }
            other => {
                return Err(err(format!(
                    "auto_pad {} with strides {stride:?} is not supported",
                    String::from_utf8_lossy(other)
                )))
            }
        };
        if transpose
            && (n
                .attr_ints("output_padding")
                .is_some_and(|p| p.iter().any(|&v| v != 0))
                || n.attr("output_shape").is_some())
        {
            return Err(err("output_padding/output_shape are not supported".into()));
        }

        let mut weight = weight;
        let mut bias = match n.inputs.get(2).filter(|s| !s.is_empty()) {
            Some(b) => Some(
                self.init(b)
                    .ok_or_else(|| err(format!("bias {b} is not an initializer")))?
                    .to_dtype(DType::F32)?
                    .flatten_all()?,
            ),
            None => None,
        };
        let mut out = match n.outputs.first() {
            Some(o) => self.resolve(o),
            None => return Err(err("no output".into())),
        };
        let mut seen_bias_add = false;
        loop {
            if !seen_bias_add {
                if let Some((b, next)) = self.take_bias(out, out_ch)? {
                    bias = Some(match bias {
                        Some(prev) => (prev + b)?,
                        None => b,
                    });
                    out = next;
                    seen_bias_add = true;
                    continue;
                }
            }
            match self.single_consumer(out) {
                Some(bn) if bn.op_type == "BatchNormalization" => {
                    let (w, b) = self.fold_batch_norm(
                        bn,
                        &weight,
                        bias.as_ref(),
                        out_ch,
                        transpose,
                        groups,
                    )?;
                    weight = w;
                    bias = Some(b);
                    out = match bn.outputs.first() {
                        Some(o) => self.resolve(o),
                        None => return Err(err("batch norm without output".into())),
                    };
                    // A bias add may follow the batch norm; allow one more.
                    seen_bias_add = false;
                }
                _ => break,
            }
        }

        // PPLCNetV3 scales and shifts every conv output by learned scalars before the
        // activation; that is linear, so it folds into the weights.
        while let Some((scale, shift, next)) = self.take_scalar_affine(out) {
            weight = (weight * f64::from(scale))?;
            bias = Some(match bias {
                Some(b) => b.affine(f64::from(scale), f64::from(shift))?,
                None => Tensor::full(shift, out_ch, weight.device())?,
            });
            out = next;
        }
        let (activation, mut out) = self.activation_of(out);
        let mut post_affine = None;
        if activation != Activation::None {
            if let Some((scale, shift, next)) = self.take_scalar_affine(out) {
                post_affine = Some((scale, shift));
                out = next;
            }
        }

        let input = n.inputs.first().ok_or_else(|| err("no input".into()))?;
        let input_op = self.producer_of(input).map(|p| p.op_type.clone());
        Ok(ConvSpec {
            node: n.name.clone(),
            weight,
            bias,
            stride,
            pads,
            groups,
            transpose,
            activation,
            post_affine,
            input_op,
            input: self.resolve(input).to_string(),
            dtype: self.dtype,
            output: out.to_string(),
        })
    }

    /// Folds `BatchNormalization(scale, B, mean, var)` into the preceding conv.
    fn fold_batch_norm(
        &self,
        bn: &Node,
        weight: &Tensor,
        bias: Option<&Tensor>,
        channels: usize,
        transpose: bool,
        groups: usize,
    ) -> Result<(Tensor, Tensor)> {
        // A transposed conv keeps output channels on axis 1, split per group; only the
        // ungrouped case (PP-OCRv5's DB head) maps them one to one.
        if transpose && groups != 1 {
            return Err(self.error(format!(
                "batch norm {} after a grouped transposed conv is not supported",
                bn.name
            )));
        }
        let get = |i: usize| -> Result<Tensor> {
            let name = bn
                .inputs
                .get(i)
                .ok_or_else(|| self.error(format!("batch norm {} lacks input {i}", bn.name)))?;
            let t = self.init(name).ok_or_else(|| {
                self.error(format!(
                    "batch norm {} input {name} is not constant",
                    bn.name
                ))
            })?;
            if t.elem_count() != channels {
                return Err(self.error(format!(
                    "batch norm {} input {name} has {} values, expected {channels}",
                    bn.name,
                    t.elem_count()
                )));
            }
            Ok(t.to_dtype(DType::F64)?.flatten_all()?)
        };
        let (gamma, beta, mean, var) = (get(1)?, get(2)?, get(3)?, get(4)?);
        let eps = f64::from(bn.attr_float("epsilon").unwrap_or(1e-5));
        // Folding in f64 keeps the fused weights within f32 rounding of what ORT computes.
        let scale = (gamma / (var + eps)?.sqrt()?)?;
        let scale_shape = if transpose {
            (1, channels, 1, 1)
        } else {
            (channels, 1, 1, 1)
        };
        let w = weight
            .to_dtype(DType::F64)?
            .broadcast_mul(&scale.reshape(scale_shape)?)?;
        let b0 = match bias {
            Some(b) => b.to_dtype(DType::F64)?,
            None => Tensor::zeros(channels, DType::F64, weight.device())?,
        };
        let b = ((b0 - mean)? * &scale)?.add(&beta)?;
        Ok((w.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?))
    }

    /// Consumes the next MatMul-with-constant and checks its `[in, out]` shape.
    pub fn next_linear(
        &mut self,
        what: &str,
        in_f: Option<usize>,
        out_f: Option<usize>,
    ) -> Result<LinearSpec> {
        let spec = self.peek_linear()?.ok_or_else(|| {
            self.error(format!(
                "{what}: expected another linear layer, the graph has no more"
            ))
        })?;
        let (i, o) = spec.weight.dims2()?;
        if in_f.is_some_and(|v| v != i) || out_f.is_some_and(|v| v != o) {
            return Err(self.error(format!(
                "{what}: node {} has weight [{i}, {o}], expected [{in_f:?}, {out_f:?}]",
                spec.node
            )));
        }
        self.next_linear += 1;
        Ok(spec)
    }

    pub fn peek_linear(&self) -> Result<Option<LinearSpec>> {
        let Some(&idx) = self.linears.get(self.next_linear) else {
            return Ok(None);
        };
        let n = self.node(idx);
        let err = |m: &str| self.error(format!("MatMul node {}: {m}", n.name));
        let w_name = n.inputs.get(1).ok_or_else(|| err("no weight"))?;
        let weight = self
            .init(w_name)
            .ok_or_else(|| err("weight is not constant"))?
            .to_dtype(DType::F32)?;
        if weight.rank() != 2 {
            return Err(err("weight is not 2-D"));
        }
        let out_f = weight.dims()[1];
        let out = self.resolve(n.outputs.first().ok_or_else(|| err("no output"))?);
        let (bias, out) = match self.take_bias(out, out_f)? {
            Some((b, next)) => (Some(b), next),
            None => (None, out),
        };
        Ok(Some(LinearSpec {
            node: n.name.clone(),
            weight,
            bias,
            activation: self.activation_of(out).0,
            output: out.to_string(),
            dtype: self.dtype,
        }))
    }

    /// The constant target shape of the Reshape that reads `tensor`, e.g. the
    /// `[0, -1, 3, heads, head_dim]` split after an attention's qkv projection.
    pub fn reshape_target_of(&self, tensor: &str) -> Option<Vec<i64>> {
        self.consumers_of(tensor).iter().find_map(|&i| {
            let n = self.node(i);
            if n.op_type != "Reshape" {
                return None;
            }
            let t = self.init(n.inputs.get(1)?)?;
            t.to_dtype(DType::I64)
                .ok()?
                .flatten_all()
                .ok()?
                .to_vec1::<i64>()
                .ok()
        })
    }

    /// Consumes the next layer norm (found through its Sqrt) and checks its width.
    pub fn next_layer_norm(&mut self, what: &str, channels: usize) -> Result<LayerNormSpec> {
        let Some(&idx) = self.norms.get(self.next_norm) else {
            return Err(self.error(format!("{what}: expected another layer norm")));
        };
        let sqrt = self.node(idx);
        let err = |m: &str| self.error(format!("{what}: layer norm at {}: {m}", sqrt.name));
        let eps_add = sqrt
            .inputs
            .first()
            .and_then(|i| self.producer_of(i))
            .filter(|n| n.op_type == "Add")
            .ok_or_else(|| err("Sqrt input is not an Add of epsilon"))?;
        let eps = scalar_f32(
            self.const_operand(eps_add)
                .ok_or_else(|| err("no epsilon"))?
                .0,
        )?;
        let sqrt_out = sqrt.outputs.first().ok_or_else(|| err("no output"))?;
        let div = self
            .consumers_of(sqrt_out)
            .iter()
            .map(|&i| self.node(i))
            .find(|n| n.op_type == "Div")
            .ok_or_else(|| err("no Div after Sqrt"))?;
        let div_out = div.outputs.first().ok_or_else(|| err("no Div output"))?;
        let mul = self
            .single_consumer(div_out)
            .filter(|n| n.op_type == "Mul")
            .ok_or_else(|| err("no scale Mul after Div"))?;
        let (weight, _) = self
            .const_operand(mul)
            .ok_or_else(|| err("scale is not constant"))?;
        let mul_out = mul.outputs.first().ok_or_else(|| err("no Mul output"))?;
        let add = self
            .single_consumer(mul_out)
            .filter(|n| n.op_type == "Add")
            .ok_or_else(|| err("no shift Add after scale"))?;
        let (bias, _) = self
            .const_operand(add)
            .ok_or_else(|| err("shift is not constant"))?;
        if weight.elem_count() != channels || bias.elem_count() != channels {
            return Err(err(&format!(
                "scale/shift have {}/{} values, expected {channels}",
                weight.elem_count(),
                bias.elem_count()
            )));
        }
        self.next_norm += 1;
        Ok(LayerNormSpec {
            node: sqrt.name.clone(),
            weight: weight.to_dtype(DType::F32)?.flatten_all()?,
            bias: bias.to_dtype(DType::F32)?.flatten_all()?,
            eps,
        })
    }

    /// True if the next layer norm comes before the next linear layer in the graph.
    pub fn layer_norm_comes_before_linear(&self) -> bool {
        match (
            self.norms.get(self.next_norm),
            self.linears.get(self.next_linear),
        ) {
            (Some(norm), Some(linear)) => norm < linear,
            (Some(_), None) => true,
            _ => false,
        }
    }

    /// True if a layer norm is left to consume.
    pub fn has_layer_norm(&self) -> bool {
        self.next_norm < self.norms.len()
    }

    /// How many nodes read `tensor` (pass-through nodes are looked through).
    pub fn reader_count(&self, tensor: &str) -> usize {
        self.consumers_of(tensor).len()
    }

    /// True if `tensor` is read, and read only by convolutions.
    pub fn only_convs_read(&self, tensor: &str) -> bool {
        let readers = self.consumers_of(tensor);
        !readers.is_empty()
            && readers
                .iter()
                .all(|&i| matches!(self.node(i).op_type.as_str(), "Conv" | "ConvTranspose"))
    }

    /// The output of an `Add` of `tensor` and another computed (non-constant) tensor, i.e. a
    /// residual sum that `tensor` flows into.
    pub fn residual_sum_of(&self, tensor: &str) -> Option<String> {
        self.consumers_of(tensor).iter().find_map(|&i| {
            let n = self.node(i);
            let dynamic = n.inputs.len() == 2 && n.inputs.iter().all(|x| self.init(x).is_none());
            if n.op_type == "Add" && dynamic {
                n.outputs.first().map(|o| self.resolve(o).to_string())
            } else {
                None
            }
        })
    }

    /// Where `tensor` sits among the inputs of the `Concat` that reads it: (position, count).
    pub fn concat_position(&self, tensor: &str) -> Option<(usize, usize)> {
        let target = self.resolve(tensor);
        self.consumers_of(tensor).iter().find_map(|&i| {
            let n = self.node(i);
            if n.op_type != "Concat" {
                return None;
            }
            let pos = n.inputs.iter().position(|x| self.resolve(x) == target)?;
            Some((pos, n.inputs.len()))
        })
    }

    /// The first node of `op_type`, for reading attributes of parameter-free layers.
    pub fn first_node(&self, op_type: &str) -> Option<&'a Node> {
        self.model.nodes.iter().find(|n| n.op_type == op_type)
    }

    /// Fails if any weight-bearing node was left unused: that means the network code does not
    /// cover the whole graph, so its output would not match the export.
    pub fn finish(&self) -> Result<()> {
        if let Some(&idx) = self.convs.get(self.next_conv) {
            let n = self.node(idx);
            return Err(self.error(format!(
                "{} convolutions left unused, starting at {} {}",
                self.convs.len() - self.next_conv,
                n.op_type,
                n.name
            )));
        }
        if let Some(&idx) = self.linears.get(self.next_linear) {
            return Err(self.error(format!(
                "{} linear layers left unused, starting at {}",
                self.linears.len() - self.next_linear,
                self.node(idx).name
            )));
        }
        if let Some(&idx) = self.norms.get(self.next_norm) {
            return Err(self.error(format!(
                "{} layer norms left unused, starting at {}",
                self.norms.len() - self.next_norm,
                self.node(idx).name
            )));
        }
        if self.batch_norms_folded != self.batch_norms_total {
            return Err(self.error(format!(
                "{} of {} batch norms do not follow a convolution",
                self.batch_norms_total - self.batch_norms_folded,
                self.batch_norms_total
            )));
        }
        Ok(())
    }
}

/// Nodes that do not change the data as the networks here see it: Identity, and the
/// Squeeze/Unsqueeze of the height axis (always 1) around the 1-D convs and batch norms of the
/// recognisers' necks, which the network code keeps in 4-D.
fn is_passthrough(n: &Node) -> bool {
    match n.op_type.as_str() {
        "Identity" => true,
        "Squeeze" | "Unsqueeze" => n.inputs.len() == 1 && n.attr_ints("axes") == Some(&[2][..]),
        _ => false,
    }
}

fn to_usize(v: i64) -> usize {
    usize::try_from(v).unwrap_or(0)
}

/// Reads a Resize/Pool style integer pair attribute.
pub fn attr_pair(n: &Node, name: &str) -> Option<(usize, usize)> {
    match n.attr(name) {
        Some(Attribute::Ints(v)) if v.len() == 2 => Some((to_usize(v[0]), to_usize(v[1]))),
        _ => None,
    }
}
