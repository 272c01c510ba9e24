//! What the registry reads of an uploaded ONNX file before anything runs it. The file is
//! hostile until checked: it is parsed with a bounded protobuf reader (never by ONNX Runtime in
//! the gateway), and refused when it names files outside itself (external data: a path on the
//! machine that loads it), uses operators the workers' ONNX Runtime does not ship (custom
//! domains, newer opsets), or does not take and give the tensors its manifest promises.

use std::collections::{BTreeMap, HashSet};

use onnx_protobuf::{
    tensor_proto::DataLocation, tensor_shape_proto::dimension, type_proto, GraphProto, Message,
    ModelProto, NodeProto, TensorProto, ValueInfoProto,
};

use super::{Datatype, TensorSpec};
use crate::error::{AppError, FieldError};

/// The newest operator sets the workers' ONNX Runtime (1.31) loads, by domain. Checked: 1.31.1
/// takes a model importing `ai.onnx` 26 and `ai.onnx.ml` 5, and refuses 27 and 6.
pub const OPSETS: [(&str, i64); 3] = [("", 26), ("ai.onnx", 26), ("ai.onnx.ml", 5)];

/// A tensor as the graph declares it: its element type and dimensions (`None` where the graph
/// leaves one free: a symbolic or absent dimension).
#[derive(Debug, PartialEq)]
pub struct GraphTensor {
    pub datatype: Option<Datatype>,
    pub dims: Option<Vec<Option<i64>>>,
}

/// The graph's real inputs (those no initializer feeds) and outputs, by name, once every
/// refusal above is ruled out.
#[derive(Debug)]
pub struct Signature {
    pub inputs: BTreeMap<String, GraphTensor>,
    pub outputs: BTreeMap<String, GraphTensor>,
}

/// Reads and checks `bytes`; each refusal is a problem naming the `model` field and the reason.
pub fn check(bytes: &[u8]) -> Result<Signature, AppError> {
    let refuse = |detail: String| AppError::field("model", detail);
    let model = ModelProto::parse_from_bytes(bytes).map_err(|e| {
        refuse(format!(
            "is not an ONNX model (a truncated or damaged file?): {e}"
        ))
    })?;
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| refuse("is not an ONNX model: it has no graph".into()))?;
    if graph.node.is_empty() {
        return Err(refuse("has an empty graph".into()));
    }
    // Functions the model defines may be called under their own domain.
    let local: Vec<&str> = model.functions.iter().map(|f| f.domain.as_str()).collect();
    for opset in &model.opset_import {
        let newest = OPSETS
            .iter()
            .find(|(d, _)| *d == opset.domain)
            .map(|(_, v)| *v);
        match newest {
            Some(newest) if opset.version > newest => {
                return Err(refuse(format!(
                    "imports opset {} of domain '{}', newer than the workers' ONNX Runtime loads \
                     ({newest}); export it with opset {newest} or older",
                    opset.version,
                    display_domain(&opset.domain)
                )))
            }
            None if !local.contains(&opset.domain.as_str()) => {
                return Err(custom_domain(&opset.domain, None))
            }
            _ => {}
        }
    }
    complete(graph)?;
    let mut graphs = vec![graph];
    while let Some(g) = graphs.pop() {
        check_graph(g, &local, &mut graphs)?;
    }
    for function in &model.functions {
        for node in &function.node {
            check_node(node, &local, &mut Vec::new())?;
        }
    }
    let fed: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    Ok(Signature {
        inputs: graph
            .input
            .iter()
            .filter(|v| !fed.contains(&v.name.as_str()))
            .map(declared)
            .collect(),
        outputs: graph.output.iter().map(declared).collect(),
    })
}

/// Every value the graph reads is defined before it is read (nodes are in topological order),
/// and every output is made: a file cut short can still parse, as a graph missing its end.
fn complete(graph: &GraphProto) -> Result<(), AppError> {
    let broken = |what: String| {
        AppError::field(
            "model",
            format!(
                "is incomplete: {what}, which nothing in the graph defines (a truncated file?)"
            ),
        )
    };
    let sparse = graph
        .sparse_initializer
        .iter()
        .filter_map(|s| s.values.as_ref());
    let mut defined: HashSet<&str> = graph
        .input
        .iter()
        .map(|v| v.name.as_str())
        .chain(
            graph
                .initializer
                .iter()
                .chain(sparse)
                .map(|t| t.name.as_str()),
        )
        .collect();
    for node in &graph.node {
        if let Some(missing) = node
            .input
            .iter()
            .find(|i| !i.is_empty() && !defined.contains(i.as_str()))
        {
            return Err(broken(format!("node '{}' reads '{missing}'", node.name)));
        }
        defined.extend(node.output.iter().map(String::as_str));
    }
    if graph.output.is_empty() {
        return Err(AppError::field(
            "model",
            "is incomplete: its graph has no outputs",
        ));
    }
    match graph
        .output
        .iter()
        .find(|o| !defined.contains(o.name.as_str()))
    {
        Some(output) => Err(broken(format!(
            "the output '{}' is never made",
            output.name
        ))),
        None => Ok(()),
    }
}

fn check_graph<'g>(
    graph: &'g GraphProto,
    local: &[&str],
    nested: &mut Vec<&'g GraphProto>,
) -> Result<(), AppError> {
    let sparse = graph
        .sparse_initializer
        .iter()
        .flat_map(|s| s.values.as_ref().into_iter().chain(s.indices.as_ref()));
    for tensor in graph.initializer.iter().chain(sparse) {
        inside(tensor)?;
    }
    for node in &graph.node {
        check_node(node, local, nested)?;
    }
    Ok(())
}

/// A node's operator domain, the tensors in its attributes, and the subgraphs it holds (the
/// branches of `If`, the body of `Loop`), which are checked in turn.
fn check_node<'g>(
    node: &'g NodeProto,
    local: &[&str],
    nested: &mut Vec<&'g GraphProto>,
) -> Result<(), AppError> {
    let known = OPSETS.iter().any(|(d, _)| *d == node.domain);
    if !known && !local.contains(&node.domain.as_str()) {
        return Err(custom_domain(&node.domain, Some(node)));
    }
    for attribute in &node.attribute {
        for tensor in attribute.t.as_ref().into_iter().chain(&attribute.tensors) {
            inside(tensor)?;
        }
        nested.extend(attribute.g.as_ref());
        nested.extend(&attribute.graphs);
    }
    Ok(())
}

/// Refuses a tensor whose data lives in a file beside the model.
fn inside(tensor: &TensorProto) -> Result<(), AppError> {
    let external = tensor.data_location.enum_value() == Ok(DataLocation::EXTERNAL)
        || !tensor.external_data.is_empty();
    if !external {
        return Ok(());
    }
    let location = tensor
        .external_data
        .iter()
        .find(|e| e.key == "location")
        .map(|e| format!(" ('{}')", e.value.chars().take(100).collect::<String>()))
        .unwrap_or_default();
    Err(AppError::field(
        "model",
        format!(
            "tensor '{}' keeps its data in an external file{location}; save the model with \
             every tensor inside it (onnx.save_model(..., save_as_external_data=False))",
            tensor.name
        ),
    ))
}

fn custom_domain(domain: &str, node: Option<&NodeProto>) -> AppError {
    let by = node
        .map(|n| format!("operator '{}' (node '{}') is from", n.op_type, n.name))
        .unwrap_or_else(|| "the model imports".into());
    AppError::Validation(vec![FieldError::new(
        "model",
        format!(
            "{by} the custom domain '{domain}'; the workers run only the standard operators \
             (ai.onnx and ai.onnx.ml)"
        ),
    )])
}

fn display_domain(domain: &str) -> &str {
    if domain.is_empty() {
        "ai.onnx"
    } else {
        domain
    }
}

fn declared(value: &ValueInfoProto) -> (String, GraphTensor) {
    let tensor = match value.type_.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(t)) => GraphTensor {
            datatype: Datatype::from_onnx(t.elem_type),
            dims: t.shape.as_ref().map(|shape| {
                shape
                    .dim
                    .iter()
                    .map(|d| match d.value {
                        Some(dimension::Value::DimValue(v)) if v > 0 => Some(v),
                        _ => None,
                    })
                    .collect()
            }),
        },
        _ => GraphTensor {
            datatype: None,
            dims: None,
        },
    };
    (value.name.clone(), tensor)
}

/// Compares the manifest's tensors (`field` is `inputs` or `outputs`) with the graph's: the
/// same names, types and ranks, and a fixed dimension wherever the graph fixes one. Answers
/// every difference, each naming the manifest's field.
pub fn differences(
    field: &str,
    manifest: &[TensorSpec],
    graph: &BTreeMap<String, GraphTensor>,
) -> Vec<FieldError> {
    let mut errors = Vec::new();
    for (i, spec) in manifest.iter().enumerate() {
        let at = format!("manifest.{field}[{i}]");
        let Some(real) = graph.get(&spec.name) else {
            let names: Vec<&str> = graph.keys().map(String::as_str).collect();
            errors.push(FieldError::new(
                format!("{at}.name"),
                format!(
                    "the graph has no {} '{}' (it has: {})",
                    &field[..field.len() - 1],
                    spec.name,
                    names.join(", ")
                ),
            ));
            continue;
        };
        match real.datatype {
            Some(datatype) if datatype != spec.datatype => errors.push(FieldError::new(
                format!("{at}.datatype"),
                format!(
                    "is {} but the graph's '{}' is {}",
                    spec.datatype.name(),
                    spec.name,
                    datatype.name()
                ),
            )),
            None => errors.push(FieldError::new(
                format!("{at}.datatype"),
                format!(
                    "the graph's '{}' is not a tensor of a supported type",
                    spec.name
                ),
            )),
            _ => {}
        }
        if let Some(dims) = &real.dims {
            if dims.len() != spec.shape.len() {
                errors.push(FieldError::new(
                    format!("{at}.shape"),
                    format!(
                        "has {} dimensions but the graph's '{}' has {}",
                        spec.shape.len(),
                        spec.name,
                        dims.len()
                    ),
                ));
            } else {
                for (d, (&want, &fixed)) in spec.shape.iter().zip(dims).enumerate() {
                    if let Some(fixed) = fixed {
                        if want != fixed {
                            errors.push(FieldError::new(
                                format!("{at}.shape[{d}]"),
                                format!("is {want} but the graph fixes it at {fixed}"),
                            ));
                        }
                    }
                }
            }
        }
    }
    let named: Vec<&str> = manifest.iter().map(|s| s.name.as_str()).collect();
    for name in graph.keys().filter(|n| !named.contains(&n.as_str())) {
        errors.push(FieldError::new(
            format!("manifest.{field}"),
            format!(
                "leaves out the graph's {} '{name}'",
                &field[..field.len() - 1]
            ),
        ));
    }
    errors
}
