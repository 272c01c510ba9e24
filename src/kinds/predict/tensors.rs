//! Reading a predict job's input, the Open Inference Protocol's request body plus the model:
//! `{model, version?, id?, inputs: [{name, shape, datatype, data}], outputs?: [{name}]}`. Every
//! input is checked against the model's manifest, and every problem names the tensor and, for
//! data, the element (`input.inputs[0].data[17]`).

use serde_json::Value;
use xpand_protocol::{Tensor, TensorDecl};

use crate::error::FieldError;
use crate::registry::{Datatype, Manifest};

/// Most elements one job may carry, over all its inputs.
pub const MAX_ELEMENTS: usize = 4_000_000;
/// Most rows (the batch dimension) one job may carry.
pub const MAX_ROWS: i64 = 1_000_000;

/// The model the request names.
pub struct Request {
    pub model: String,
    pub version: String,
}

/// Reads `model` and `version` (and checks `id`), each named when it is wrong.
pub fn request(input: &Value, errors: &mut Vec<FieldError>) -> Option<Request> {
    let Some(object) = input.as_object() else {
        errors.push(FieldError::new("input", "must be an object"));
        return None;
    };
    for key in object.keys() {
        if !["model", "version", "id", "inputs", "outputs", "parameters"].contains(&key.as_str()) {
            errors.push(FieldError::new(
                format!("input.{key}"),
                "is not a predict input",
            ));
        }
    }
    let text = |key: &str, errors: &mut Vec<FieldError>| match object.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 128 => Some(s.clone()),
        Some(_) => {
            errors.push(FieldError::new(
                format!("input.{key}"),
                "must be text of 1 to 128 bytes",
            ));
            None
        }
    };
    let model = text("model", errors);
    if model.is_none() && !errors.iter().any(|e| e.field == "input.model") {
        errors.push(FieldError::new(
            "input.model",
            "is required: the model's name",
        ));
    }
    let version = text("version", errors).unwrap_or_else(|| "latest".into());
    // The protocol's request id is echoed by its endpoint; here it is only checked.
    text("id", errors);
    Some(Request {
        model: model?,
        version,
    })
}

/// The inputs, in the manifest's order, checked against it; `None` when any is wrong (each
/// problem is in `errors`). All inputs share their first dimension, the rows.
pub fn inputs(
    input: &Value,
    manifest: &Manifest,
    errors: &mut Vec<FieldError>,
) -> Option<Vec<Tensor>> {
    let Some(given) = input.get("inputs").and_then(Value::as_array) else {
        errors.push(FieldError::new(
            "input.inputs",
            "is required: an array of tensors",
        ));
        return None;
    };
    let before = errors.len();
    let mut found: Vec<Option<Tensor>> = vec![None; manifest.inputs.len()];
    let mut elements = 0usize;
    for (i, tensor) in given.iter().enumerate() {
        let at = format!("input.inputs[{i}]");
        let name = tensor
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let Some(slot) = manifest.inputs.iter().position(|s| s.name == name) else {
            let names: Vec<&str> = manifest.inputs.iter().map(|s| s.name.as_str()).collect();
            errors.push(FieldError::new(
                format!("{at}.name"),
                format!(
                    "'{name}' is not an input of model '{}' (it takes: {})",
                    manifest.name,
                    names.join(", ")
                ),
            ));
            continue;
        };
        if found[slot].is_some() {
            errors.push(FieldError::new(
                format!("{at}.name"),
                format!("'{name}' is given twice"),
            ));
            continue;
        }
        let spec = &manifest.inputs[slot];
        match tensor
            .get("datatype")
            .and_then(Value::as_str)
            .map(Datatype::parse)
        {
            Some(Some(d)) if d == spec.datatype => {}
            _ => {
                errors.push(FieldError::new(
                    format!("{at}.datatype"),
                    format!("must be {}, the datatype of '{name}'", spec.datatype.name()),
                ));
                continue;
            }
        }
        let shape: Option<Vec<i64>> = tensor
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|dims| dims.iter().map(Value::as_i64).collect());
        let Some(shape) = shape.filter(|s| s.len() == spec.shape.len()) else {
            errors.push(FieldError::new(
                format!("{at}.shape"),
                format!(
                    "must be {} dimensions, like {:?}",
                    spec.shape.len(),
                    spec.shape
                ),
            ));
            continue;
        };
        let mut bad_shape = false;
        for (d, (&got, &want)) in shape.iter().zip(&spec.shape).enumerate() {
            let limit = if d == 0 {
                MAX_ROWS
            } else {
                MAX_ELEMENTS as i64
            };
            if got < 1 || got > limit || (want != -1 && got != want) {
                let expected = if want == -1 {
                    format!("from 1 to {limit}")
                } else {
                    want.to_string()
                };
                errors.push(FieldError::new(
                    format!("{at}.shape[{d}]"),
                    format!("is {got}; it must be {expected}"),
                ));
                bad_shape = true;
            }
        }
        if bad_shape {
            continue;
        }
        let count: usize = shape.iter().map(|&d| d as usize).product();
        elements += count;
        if elements > MAX_ELEMENTS {
            errors.push(FieldError::new(
                "input.inputs",
                format!("hold more than {MAX_ELEMENTS} elements; split the rows over jobs"),
            ));
            return None;
        }
        let Some(data) = flat(tensor.get("data"), count, spec.datatype, &at, errors) else {
            continue;
        };
        found[slot] = Some(Tensor {
            name: name.to_string(),
            datatype: spec.datatype.name().to_string(),
            shape,
            data,
        });
    }
    for (spec, tensor) in manifest.inputs.iter().zip(&found) {
        if tensor.is_none() && errors.len() == before {
            errors.push(FieldError::new(
                "input.inputs",
                format!(
                    "lack '{}', an input of model '{}'",
                    spec.name, manifest.name
                ),
            ));
        }
    }
    if errors.len() > before {
        return None;
    }
    let tensors: Vec<Tensor> = found.into_iter().flatten().collect();
    let rows = tensors[0].shape[0];
    if let Some((i, t)) = tensors.iter().enumerate().find(|(_, t)| t.shape[0] != rows) {
        errors.push(FieldError::new(
            format!("input.inputs[{i}].shape[0]"),
            format!(
                "is {}, but '{}' has {rows} rows: every input has the same rows",
                t.shape[0], tensors[0].name
            ),
        ));
        return None;
    }
    Some(tensors)
}

/// The tensor's data, flat in row-major order (nested arrays are flattened), every element a
/// value of `datatype`, `count` of them.
fn flat(
    data: Option<&Value>,
    count: usize,
    datatype: Datatype,
    at: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Vec<f64>> {
    let Some(data) = data.and_then(Value::as_array) else {
        errors.push(FieldError::new(
            format!("{at}.data"),
            "is required: an array of numbers",
        ));
        return None;
    };
    let mut out = Vec::with_capacity(count);
    let mut stack: Vec<std::slice::Iter<Value>> = vec![data.iter()];
    while let Some(top) = stack.last_mut() {
        match top.next() {
            None => {
                stack.pop();
            }
            Some(Value::Array(inner)) if stack.len() < 9 => stack.push(inner.iter()),
            Some(value) => {
                let k = out.len();
                match value.as_f64() {
                    Some(x) if datatype.holds(x) => out.push(x),
                    _ => {
                        errors.push(FieldError::new(
                            format!("{at}.data[{k}]"),
                            format!("is {value}, not a {} value", datatype.name()),
                        ));
                        return None;
                    }
                }
                if out.len() > count {
                    break;
                }
            }
        }
    }
    if out.len() != count {
        errors.push(FieldError::new(
            format!("{at}.data"),
            format!("has {} elements; the shape needs {count}", out.len()),
        ));
        return None;
    }
    Some(out)
}

/// The outputs to return: those named in `outputs`, else all the model's, in the manifest's
/// order.
pub fn outputs(
    input: &Value,
    manifest: &Manifest,
    errors: &mut Vec<FieldError>,
) -> Vec<TensorDecl> {
    let decl = |s: &crate::registry::TensorSpec| TensorDecl {
        name: s.name.clone(),
        datatype: s.datatype.name().to_string(),
    };
    let Some(asked) = input.get("outputs").filter(|v| !v.is_null()) else {
        return manifest.outputs.iter().map(decl).collect();
    };
    let Some(asked) = asked.as_array().filter(|a| !a.is_empty()) else {
        errors.push(FieldError::new(
            "input.outputs",
            "must be a non-empty array of {\"name\": ...}",
        ));
        return Vec::new();
    };
    let mut chosen = Vec::new();
    for (j, output) in asked.iter().enumerate() {
        let name = output
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        match manifest.outputs.iter().find(|s| s.name == name) {
            Some(spec) if !chosen.iter().any(|d: &TensorDecl| d.name == name) => {
                chosen.push(decl(spec))
            }
            Some(_) => errors.push(FieldError::new(
                format!("input.outputs[{j}].name"),
                "is asked twice",
            )),
            None => errors.push(FieldError::new(
                format!("input.outputs[{j}].name"),
                format!("'{name}' is not an output of model '{}'", manifest.name),
            )),
        }
    }
    chosen
}
