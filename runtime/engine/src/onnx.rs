//! Minimal ONNX reader: just enough of `onnx.proto` to pull weights, the node list and metadata
//! out of the PP-OCR exports, without protoc or a build script.
//!
//! Only the fields the engine needs are declared; prost skips every other field while decoding.
//! Field numbers follow `onnx/onnx.proto` (IR version 10).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// `TensorProto.DataType` values this reader converts.
mod data_type {
    pub const FLOAT: i32 = 1;
    pub const INT32: i32 = 6;
    pub const INT64: i32 = 7;
    pub const DOUBLE: i32 = 11;
}

/// `TensorProto.DataLocation.EXTERNAL`.
const DATA_LOCATION_EXTERNAL: i32 = 1;

/// `AttributeProto.AttributeType` values.
mod attr_type {
    pub const FLOAT: i32 = 1;
    pub const INT: i32 = 2;
    pub const STRING: i32 = 3;
    pub const TENSOR: i32 = 4;
    pub const FLOATS: i32 = 6;
    pub const INTS: i32 = 7;
}

#[derive(Clone, PartialEq, prost::Message)]
struct ModelProto {
    #[prost(int64, tag = "1")]
    ir_version: i64,
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "14")]
    metadata_props: Vec<StringStringEntryProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StringStringEntryProto {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(string, tag = "2")]
    value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    node: Vec<NodeProto>,
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    output: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ValueInfoProto {
    #[prost(string, tag = "1")]
    name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    output: Vec<String>,
    #[prost(string, tag = "3")]
    name: String,
    #[prost(string, tag = "4")]
    op_type: String,
    #[prost(message, repeated, tag = "5")]
    attribute: Vec<AttributeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct AttributeProto {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(float, tag = "2")]
    f: f32,
    #[prost(int64, tag = "3")]
    i: i64,
    #[prost(bytes = "vec", tag = "4")]
    s: Vec<u8>,
    #[prost(message, optional, tag = "5")]
    t: Option<TensorProto>,
    #[prost(float, repeated, tag = "7")]
    floats: Vec<f32>,
    #[prost(int64, repeated, tag = "8")]
    ints: Vec<i64>,
    #[prost(int32, tag = "20")]
    r#type: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    data_type: i32,
    #[prost(float, repeated, tag = "4")]
    float_data: Vec<f32>,
    #[prost(int32, repeated, tag = "5")]
    int32_data: Vec<i32>,
    #[prost(int64, repeated, tag = "7")]
    int64_data: Vec<i64>,
    #[prost(string, tag = "8")]
    name: String,
    #[prost(bytes = "vec", tag = "9")]
    raw_data: Vec<u8>,
    #[prost(double, repeated, tag = "10")]
    double_data: Vec<f64>,
    #[prost(int32, tag = "14")]
    data_location: i32,
}

/// A node attribute, reduced to the value kinds the PP-OCR graphs use.
#[derive(Debug, Clone)]
pub enum Attribute {
    Float(f32),
    Int(i64),
    String(Vec<u8>),
    Floats(Vec<f32>),
    Ints(Vec<i64>),
    Tensor(Tensor),
    /// A kind this reader does not decode (graphs, sparse tensors, ...).
    Unsupported(i32),
}

/// One graph node.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attributes: HashMap<String, Attribute>,
}

impl Node {
    pub fn attr(&self, name: &str) -> Option<&Attribute> {
        self.attributes.get(name)
    }

    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        match self.attributes.get(name) {
            Some(Attribute::Ints(v)) => Some(v),
            _ => None,
        }
    }

    pub fn attr_int(&self, name: &str) -> Option<i64> {
        match self.attributes.get(name) {
            Some(Attribute::Int(v)) => Some(*v),
            _ => None,
        }
    }

    pub fn attr_float(&self, name: &str) -> Option<f32> {
        match self.attributes.get(name) {
            Some(Attribute::Float(v)) => Some(*v),
            _ => None,
        }
    }

    pub fn attr_str(&self, name: &str) -> Option<&[u8]> {
        match self.attributes.get(name) {
            Some(Attribute::String(v)) => Some(v),
            _ => None,
        }
    }
}

/// A decoded ONNX model: nodes in graph order, initializers as CPU tensors, and metadata.
#[derive(Debug)]
pub struct OnnxModel {
    path: PathBuf,
    pub ir_version: i64,
    pub nodes: Vec<Node>,
    /// Initializers by name, on the CPU. FLOAT/DOUBLE become f32, INT32/INT64 become i64.
    pub initializers: HashMap<String, Tensor>,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub metadata: HashMap<String, String>,
}

impl OnnxModel {
    /// Reads and decodes an ONNX file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes, path)
    }

    /// Decodes ONNX bytes; `path` is only used in error messages.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let model =
            <ModelProto as prost::Message>::decode(bytes).map_err(|source| Error::OnnxDecode {
                path: path.to_path_buf(),
                source,
            })?;
        let invalid = |msg: String| Error::OnnxInvalid {
            path: path.to_path_buf(),
            msg,
        };
        let graph = model
            .graph
            .ok_or_else(|| invalid("the model has no graph".into()))?;

        let mut initializers = HashMap::with_capacity(graph.initializer.len());
        for t in &graph.initializer {
            let tensor = tensor_from_proto(t).map_err(&invalid)?;
            initializers.insert(t.name.clone(), tensor);
        }

        let mut nodes = Vec::with_capacity(graph.node.len());
        for n in graph.node {
            let mut attributes = HashMap::with_capacity(n.attribute.len());
            for a in n.attribute {
                let value = match a.r#type {
                    attr_type::FLOAT => Attribute::Float(a.f),
                    attr_type::INT => Attribute::Int(a.i),
                    attr_type::STRING => Attribute::String(a.s),
                    attr_type::FLOATS => Attribute::Floats(a.floats),
                    attr_type::INTS => Attribute::Ints(a.ints),
                    attr_type::TENSOR => match &a.t {
                        Some(t) => Attribute::Tensor(tensor_from_proto(t).map_err(|msg| {
                            invalid(format!("node {} attribute {}: {msg}", n.name, a.name))
                        })?),
                        None => Attribute::Unsupported(a.r#type),
                    },
                    other => Attribute::Unsupported(other),
                };
                attributes.insert(a.name, value);
            }
            nodes.push(Node {
                name: n.name,
                op_type: n.op_type,
                inputs: n.input,
                outputs: n.output,
                attributes,
            });
        }

        let metadata = model
            .metadata_props
            .into_iter()
            .map(|e| (e.key, e.value))
            .collect();

        Ok(Self {
            path: path.to_path_buf(),
            ir_version: model.ir_version,
            nodes,
            initializers,
            inputs: graph.input.into_iter().map(|v| v.name).collect(),
            outputs: graph.output.into_iter().map(|v| v.name).collect(),
            metadata,
        })
    }

    /// The file the model was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An initializer by name.
    pub fn initializer(&self, name: &str) -> Option<&Tensor> {
        self.initializers.get(name)
    }
}

fn tensor_from_proto(t: &TensorProto) -> std::result::Result<Tensor, String> {
    if t.data_location == DATA_LOCATION_EXTERNAL {
        return Err(format!(
            "tensor {} uses external data, which is not supported",
            t.name
        ));
    }
    let dims = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("tensor {}: negative dim {d}", t.name)))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let numel: usize = dims.iter().product();
    let check_len = |len: usize| {
        if len == numel {
            Ok(())
        } else {
            Err(format!(
                "tensor {}: {len} values for dims {dims:?} ({numel} expected)",
                t.name
            ))
        }
    };
    let build = |r: candle_core::Result<Tensor>| r.map_err(|e| format!("tensor {}: {e}", t.name));
    let raw = &t.raw_data;
    match t.data_type {
        data_type::FLOAT => {
            let data = if raw.is_empty() {
                t.float_data.clone()
            } else {
                little_endian(raw, &t.name, f32::from_le_bytes)?
            };
            check_len(data.len())?;
            build(Tensor::from_vec(data, dims.as_slice(), &Device::Cpu))
        }
        data_type::DOUBLE => {
            let data: Vec<f32> = if raw.is_empty() {
                t.double_data.iter().map(|&v| v as f32).collect()
            } else {
                little_endian(raw, &t.name, |b| f64::from_le_bytes(b) as f32)?
            };
            check_len(data.len())?;
            build(Tensor::from_vec(data, dims.as_slice(), &Device::Cpu))
        }
        data_type::INT64 => {
            let data = if raw.is_empty() {
                t.int64_data.clone()
            } else {
                little_endian(raw, &t.name, i64::from_le_bytes)?
            };
            check_len(data.len())?;
            build(Tensor::from_vec(data, dims.as_slice(), &Device::Cpu))
        }
        data_type::INT32 => {
            let data: Vec<i64> = if raw.is_empty() {
                t.int32_data.iter().map(|&v| i64::from(v)).collect()
            } else {
                little_endian(raw, &t.name, |b| i64::from(i32::from_le_bytes(b)))?
            };
            check_len(data.len())?;
            build(Tensor::from_vec(data, dims.as_slice(), &Device::Cpu))
        }
        other => Err(format!(
            "tensor {}: data type {other} is not supported (only float, double, int32, int64)",
            t.name
        )),
    }
}

/// Decodes `raw_data`: fixed-size little-endian values, as ONNX stores them.
fn little_endian<const N: usize, T>(
    raw: &[u8],
    name: &str,
    convert: impl Fn([u8; N]) -> T,
) -> Result<Vec<T>, String> {
    let chunks = raw.chunks_exact(N);
    if !chunks.remainder().is_empty() {
        return Err(format!(
            "tensor {name}: raw_data length not a multiple of {N}"
        ));
    }
    Ok(chunks
        .map(|b| {
            let mut bytes = [0u8; N];
            bytes.copy_from_slice(b);
            convert(bytes)
        })
        .collect())
}

/// Reads a scalar or one-element float tensor, e.g. an epsilon constant.
pub fn scalar_f32(t: &Tensor) -> candle_core::Result<f32> {
    t.to_dtype(DType::F32)?
        .flatten_all()?
        .get(0)?
        .to_scalar::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn decodes_float_data_and_raw_data() {
        let model = ModelProto {
            ir_version: 10,
            graph: Some(GraphProto {
                node: vec![NodeProto {
                    input: vec!["x".into(), "w".into()],
                    output: vec!["y".into()],
                    name: "Conv.0".into(),
                    op_type: "Conv".into(),
                    attribute: vec![AttributeProto {
                        name: "strides".into(),
                        ints: vec![2, 1],
                        r#type: attr_type::INTS,
                        ..Default::default()
                    }],
                }],
                initializer: vec![
                    TensorProto {
                        dims: vec![2],
                        data_type: data_type::FLOAT,
                        float_data: vec![1.5, -2.0],
                        name: "w".into(),
                        ..Default::default()
                    },
                    TensorProto {
                        dims: vec![1, 2],
                        data_type: data_type::FLOAT,
                        raw_data: [3.0f32, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect(),
                        name: "b".into(),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }),
            metadata_props: vec![StringStringEntryProto {
                key: "character".into(),
                value: "a\nb".into(),
            }],
        };
        let bytes = model.encode_to_vec();
        let m = OnnxModel::from_bytes(&bytes, Path::new("mem.onnx")).expect("decode");
        let w = m
            .initializer("w")
            .expect("w")
            .to_vec1::<f32>()
            .expect("vec");
        assert_eq!(w, vec![1.5, -2.0]);
        let b = m
            .initializer("b")
            .expect("b")
            .to_vec2::<f32>()
            .expect("vec");
        assert_eq!(b, vec![vec![3.0, 4.0]]);
        assert_eq!(m.nodes[0].attr_ints("strides"), Some(&[2i64, 1][..]));
        assert_eq!(
            m.metadata.get("character").map(String::as_str),
            Some("a\nb")
        );
    }

    #[test]
    fn rejects_length_mismatch_with_path_in_message() {
        let model = ModelProto {
            graph: Some(GraphProto {
                initializer: vec![TensorProto {
                    dims: vec![3],
                    data_type: data_type::FLOAT,
                    float_data: vec![1.0],
                    name: "w".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = OnnxModel::from_bytes(&model.encode_to_vec(), Path::new("bad.onnx"))
            .expect_err("must fail");
        assert!(err.to_string().contains("bad.onnx"), "{err}");
    }

    #[test]
    fn garbage_is_a_decode_error() {
        let err = OnnxModel::from_bytes(&[0xff, 0xff, 0xff], Path::new("junk.onnx"))
            .expect_err("must fail");
        assert!(matches!(err, Error::OnnxDecode { .. }), "{err}");
    }
}
