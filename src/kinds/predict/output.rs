//! A predict shard's output: checked against its task (the outputs asked, their types, a row of
//! each for every row of the slice), compared with a replica's, streamed as a slice, and joined
//! along the rows into the protocol's response body.

use serde_json::{json, Value};
use xpand_protocol::{PredictTask, ShardOutput, Tensor};

use crate::jobs::kind::PartialRows;
use crate::registry::Datatype;

/// Two floats agree within this much of the larger (or absolutely, near zero): runs on other
/// hardware, threads or execution providers differ in the last bits.
const RELATIVE_TOLERANCE: f64 = 1e-4;
const ABSOLUTE_TOLERANCE: f64 = 1e-5;

pub fn check(task: &PredictTask, output: &ShardOutput) -> Result<(), String> {
    let ShardOutput::Predict { outputs } = output else {
        return Err("a predict shard's output must be a predict output".into());
    };
    if outputs.len() != task.outputs.len() {
        return Err(format!(
            "{} outputs for {} asked",
            outputs.len(),
            task.outputs.len()
        ));
    }
    let rows = i64::from(task.rows());
    for (tensor, asked) in outputs.iter().zip(&task.outputs) {
        if tensor.name != asked.name || tensor.datatype != asked.datatype {
            return Err(format!(
                "output '{}' ({}) where '{}' ({}) was asked",
                tensor.name, tensor.datatype, asked.name, asked.datatype
            ));
        }
        if tensor.shape.first() != Some(&rows) || tensor.shape.iter().any(|&d| d < 1) {
            return Err(format!(
                "output '{}' has shape {:?} for {rows} rows",
                tensor.name, tensor.shape
            ));
        }
        let count: i64 = tensor.shape.iter().product();
        if tensor.data.len() as i64 != count {
            return Err(format!(
                "output '{}' has {} elements for shape {:?}",
                tensor.name,
                tensor.data.len(),
                tensor.shape
            ));
        }
        let datatype = Datatype::parse(&tensor.datatype).ok_or("an unknown datatype")?;
        if let Some(k) = tensor.data.iter().position(|&x| !datatype.holds(x)) {
            return Err(format!(
                "output '{}' element {k} is not a {} value",
                tensor.name,
                datatype.name()
            ));
        }
    }
    Ok(())
}

pub fn agree(a: &ShardOutput, b: &ShardOutput) -> bool {
    let (ShardOutput::Predict { outputs: a }, ShardOutput::Predict { outputs: b }) = (a, b) else {
        return false;
    };
    a.len() == b.len()
        && a.iter().zip(b).all(|(a, b)| {
            a.name == b.name
                && a.shape == b.shape
                && a.data.len() == b.data.len()
                && a.data.iter().zip(&b.data).all(|(&x, &y)| {
                    (x - y).abs()
                        <= ABSOLUTE_TOLERANCE.max(RELATIVE_TOLERANCE * x.abs().max(y.abs()))
                })
        })
}

/// A shard's slice as the stream carries it: each row's values across the outputs, in their
/// order (`[label, p0, p1]`), and the same slice as the protocol's tensors.
pub fn partial(output: &ShardOutput) -> Option<PartialRows> {
    let ShardOutput::Predict { outputs } = output else {
        return None;
    };
    let count = outputs
        .first()
        .and_then(|t| t.shape.first())
        .map_or(0, |&r| r.max(0) as usize);
    let rows: Vec<Vec<f64>> = (0..count)
        .map(|i| {
            outputs
                .iter()
                .flat_map(|t| {
                    let n = t.row_len();
                    t.data
                        .get(i * n..(i + 1) * n)
                        .unwrap_or(&[])
                        .iter()
                        .copied()
                })
                .collect()
        })
        .collect();
    Some(PartialRows {
        rows: json!(rows),
        intervals: None,
        outputs: Some(json!(outputs.iter().map(body).collect::<Vec<_>>())),
    })
}

/// The outputs of every shard, in order, joined along the rows.
pub fn reduce(outputs: Vec<ShardOutput>) -> anyhow::Result<Value> {
    let mut joined: Vec<Tensor> = Vec::new();
    for output in outputs {
        let ShardOutput::Predict { outputs } = output else {
            anyhow::bail!("a predict job with a shard output of another kind");
        };
        if joined.is_empty() {
            joined = outputs;
            continue;
        }
        for (into, part) in joined.iter_mut().zip(outputs) {
            into.shape[0] += part.shape[0];
            into.data.extend(part.data);
        }
    }
    Ok(json!({ "outputs": joined.iter().map(body).collect::<Vec<_>>() }))
}

/// A tensor as the protocol's response writes it; integers as integers.
fn body(tensor: &Tensor) -> Value {
    let integer = tensor.datatype.starts_with("INT");
    let data: Vec<Value> = tensor
        .data
        .iter()
        .map(|&x| if integer { json!(x as i64) } else { json!(x) })
        .collect();
    json!({ "name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape, "data": data })
}

#[cfg(test)]
mod tests {
    use super::*;
    use xpand_protocol::TensorDecl;

    fn tensor(rows: i64, data: Vec<f64>) -> Tensor {
        Tensor {
            name: "p".into(),
            datatype: "FP32".into(),
            shape: vec![rows, 1],
            data,
        }
    }

    #[test]
    fn outputs_are_checked_compared_within_tolerance_and_joined_in_order() {
        let task = PredictTask {
            model: "m".into(),
            sha256: "ab".into(),
            size: 1,
            model_url: String::new(),
            inputs: vec![Tensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![2, 1],
                data: vec![1.0, 2.0],
            }],
            outputs: vec![TensorDecl {
                name: "p".into(),
                datatype: "FP32".into(),
            }],
        };
        let good = ShardOutput::Predict {
            outputs: vec![tensor(2, vec![0.25, 0.5])],
        };
        assert_eq!(check(&task, &good), Ok(()));
        let short = ShardOutput::Predict {
            outputs: vec![tensor(2, vec![0.25])],
        };
        assert!(check(&task, &short).unwrap_err().contains("1 elements"));
        let rows = ShardOutput::Predict {
            outputs: vec![tensor(3, vec![0.0; 3])],
        };
        assert!(check(&task, &rows).is_err());

        let close = ShardOutput::Predict {
            outputs: vec![tensor(2, vec![0.250_000_1, 0.5])],
        };
        let far = ShardOutput::Predict {
            outputs: vec![tensor(2, vec![0.26, 0.5])],
        };
        assert!(agree(&good, &close));
        assert!(!agree(&good, &far));

        let second = ShardOutput::Predict {
            outputs: vec![tensor(1, vec![0.75])],
        };
        let joined = reduce(vec![good, second]).unwrap();
        assert_eq!(joined["outputs"][0]["shape"], json!([3, 1]));
        assert_eq!(joined["outputs"][0]["data"], json!([0.25, 0.5, 0.75]));
    }
}
