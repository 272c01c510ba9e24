//! Predict shards: a customer's model from the registry ([`cache`]) run on a slice of rows,
//! whatever its inputs and outputs, as long as they are tensors of the four types the
//! gateway's registry takes. The model's bytes are checked against their hash before they are
//! loaded; a model ONNX Runtime refuses, or one that fails on its own rows, is the model's
//! fault (`InputUnusable`), not this node's.

mod cache;

use std::sync::PoisonError;

use anyhow::{bail, Context as _};
use ort::value::{DynValue, Tensor as OrtTensor};
use xpand_protocol::{ShardOutput, ShardTask, Tensor};

pub use self::cache::{held, ModelCache};
use super::{InputUnusable, Plugin};

pub const KIND: &str = "predict";
/// The name workers announce for the runner of registry models (the gateway's
/// `kinds::predict::RUNNER`).
pub const RUNNER: &str = "onnx-runtime";

pub struct PredictPlugin {
    cache: ModelCache,
}

impl PredictPlugin {
    pub fn new(cache: ModelCache) -> Self {
        Self { cache }
    }
}

impl Plugin for PredictPlugin {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn run(
        &self,
        task: &ShardTask,
        progress: &mut dyn FnMut(&ShardOutput) -> bool,
    ) -> anyhow::Result<ShardOutput> {
        let ShardTask::Predict(task) = task else {
            bail!("the predict plugin runs predict shards");
        };
        let session = self.cache.session(task)?;
        let inputs = task
            .inputs
            .iter()
            .map(|t| Ok((t.name.clone(), value(t)?)))
            .collect::<anyhow::Result<Vec<(String, DynValue)>>>()?;
        let mut session = session.lock().unwrap_or_else(PoisonError::into_inner);
        let results = session
            .run(inputs)
            .context("running the model")
            .context(InputUnusable)?;
        let outputs = task
            .outputs
            .iter()
            .map(|decl| {
                let value = results
                    .get(&decl.name)
                    .with_context(|| format!("the model returned no '{}'", decl.name))?;
                read(value, &decl.name, &decl.datatype)
            })
            .collect::<anyhow::Result<Vec<Tensor>>>()
            .context(InputUnusable)?;
        let output = ShardOutput::Predict { outputs };
        // One run covers every row: the progress chain gets them all at once.
        if !progress(&output) {
            bail!("the shard is no longer wanted");
        }
        Ok(output)
    }
}

/// An input tensor as ONNX Runtime takes it.
fn value(tensor: &Tensor) -> anyhow::Result<DynValue> {
    let shape = tensor.shape.clone();
    let data = &tensor.data;
    let value = match tensor.datatype.as_str() {
        "FP32" => {
            OrtTensor::from_array((shape, data.iter().map(|&x| x as f32).collect::<Vec<_>>()))?
                .into_dyn()
        }
        "FP64" => OrtTensor::from_array((shape, data.clone()))?.into_dyn(),
        "INT32" => {
            OrtTensor::from_array((shape, data.iter().map(|&x| x as i32).collect::<Vec<_>>()))?
                .into_dyn()
        }
        "INT64" => {
            OrtTensor::from_array((shape, data.iter().map(|&x| x as i64).collect::<Vec<_>>()))?
                .into_dyn()
        }
        other => bail!(
            "input '{}' has the unsupported datatype {other}",
            tensor.name
        ),
    };
    Ok(value)
}

/// An output of the run, read as the datatype the model declares for it.
fn read(value: &DynValue, name: &str, datatype: &str) -> anyhow::Result<Tensor> {
    fn extract<T: ort::value::PrimitiveTensorElementType + Copy + Into<f64>>(
        value: &DynValue,
    ) -> anyhow::Result<(Vec<i64>, Vec<f64>)> {
        let (shape, data) = value.try_extract_tensor::<T>()?;
        Ok((shape.to_vec(), data.iter().map(|&x| x.into()).collect()))
    }
    let (shape, data) = match datatype {
        "FP32" => extract::<f32>(value),
        "FP64" => extract::<f64>(value),
        "INT32" => extract::<i32>(value),
        "INT64" => {
            let (shape, data) = value.try_extract_tensor::<i64>()?;
            Ok((shape.to_vec(), data.iter().map(|&x| x as f64).collect()))
        }
        other => bail!("output '{name}' has the unsupported datatype {other}"),
    }
    .with_context(|| format!("reading output '{name}' as {datatype}"))?;
    Ok(Tensor {
        name: name.to_string(),
        datatype: datatype.to_string(),
        shape,
        data,
    })
}
