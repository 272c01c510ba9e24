//! Job kind `predict`: rows through a model from the registry (`crate::registry`), in the Open
//! Inference Protocol's shapes. The input is the protocol's request body plus the model's name
//! and version ([`tensors`]); the output is its response body.
//!
//! Map: the rows (every input's first dimension) are cut into shards of about
//! `XPAND_PREDICT_ELEMENTS_PER_SHARD` input elements, at most [`MAX_SHARDS`]; each shard carries its slice of
//! every input. A node fetches the model by its hash through a URL signed for its assignment,
//! checks the hash, and keeps it cached. Reduce: each output's shards are joined along the rows,
//! in order; each accepted shard streams its slice at once. Two runs agree when every float is
//! within a relative tolerance and every integer is equal ([`output`]).
//!
//! Price: the gateway's fee per job plus the model's `price_per_row` for each row, which the
//! node that runs the row earns, plus, for another account's published model, its
//! `royalty_per_row` for each row, which its owner is paid when the job succeeds.

mod output;
pub mod schema;
mod tensors;

use chrono::Utc;
use futures::future::BoxFuture;
use serde_json::Value;
use uuid::Uuid;
use xpand_protocol::{PredictTask, ShardOutput, ShardTask, Tensor};

use crate::error::{AppError, FieldError};
use crate::jobs::kind::{JobKind, PartialRows, PlanRequest};
use crate::jobs::{JobPlan, Scheduler, ShardPlan};
use crate::registry;
use crate::transfers::{Direction, TransferUrls};

pub const KIND: &str = "predict";
/// What workers that run registry models announce (the ONNX Runtime they run them on).
pub const RUNNER: &str = "onnx-runtime";
/// The gateway's fee per job, in micro-credits.
pub const PRICE_PER_JOB: i64 = 1_000;
pub const MAX_SHARDS: usize = 64;

/// The `predict` job kind.
pub struct Predict {
    /// About how many input elements a shard carries.
    pub elements_per_shard: usize,
    pub transfers: TransferUrls,
    /// How long a model URL stays valid.
    pub url_lifetime: std::time::Duration,
}

impl JobKind for Predict {
    fn name(&self) -> &'static str {
        KIND
    }

    fn plan<'a>(
        &'a self,
        ctx: &'a Scheduler,
        request: PlanRequest<'a>,
    ) -> BoxFuture<'a, Result<JobPlan, AppError>> {
        Box::pin(plan(ctx, request, self.elements_per_shard))
    }

    fn prepare(&self, task: &mut ShardTask, assignment: Uuid) {
        if let ShardTask::Predict(t) = task {
            // Usable only by this node, only while this assignment is the shard's current one.
            let expires = (Utc::now() + self.url_lifetime).timestamp_millis();
            t.model_url = self.transfers.url(Direction::Model, assignment, expires);
        }
    }

    fn check_output(&self, task: &ShardTask, output: &ShardOutput) -> Result<(), String> {
        match task {
            ShardTask::Predict(task) => output::check(task, output),
            _ => Err("a predict job must have predict shards".into()),
        }
    }

    fn outputs_agree(&self, task: &ShardTask, a: &ShardOutput, b: &ShardOutput) -> bool {
        matches!(task, ShardTask::Predict(_)) && output::agree(a, b)
    }

    fn partial(&self, output: &ShardOutput) -> Option<PartialRows> {
        output::partial(output)
    }

    fn reduce(&self, outputs: Vec<ShardOutput>) -> anyhow::Result<Value> {
        output::reduce(outputs)
    }
}

async fn plan(
    ctx: &Scheduler,
    request: PlanRequest<'_>,
    elements_per_shard: usize,
) -> Result<JobPlan, AppError> {
    let mut errors = Vec::new();
    if request.params.as_object().is_some_and(|p| !p.is_empty()) {
        errors.push(FieldError::new("params", "a predict job takes no params"));
    }
    let Some(asked) = tensors::request(request.input, &mut errors) else {
        return Err(AppError::Validation(errors));
    };
    let version =
        match registry::version(&ctx.db, request.account, &asked.model, &asked.version).await {
            Ok(version) => version,
            Err(AppError::NotFound(_)) => {
                let (field, detail) = if asked.version == "latest" {
                    (
                        "input.model",
                        format!("no model '{}' that you may run", asked.model),
                    )
                } else {
                    (
                        "input.version",
                        format!("model '{}' has no version '{}'", asked.model, asked.version),
                    )
                };
                errors.push(FieldError::new(field, detail));
                return Err(AppError::Validation(errors));
            }
            Err(AppError::Validation(mut more)) => {
                for e in &mut more {
                    e.field = format!("input.{}", e.field);
                }
                errors.extend(more);
                return Err(AppError::Validation(errors));
            }
            Err(other) => return Err(other),
        };
    let manifest = &version.manifest.0;
    let inputs = tensors::inputs(request.input, manifest, &mut errors);
    let outputs = tensors::outputs(request.input, manifest, &mut errors);
    let (Some(inputs), true) = (inputs, errors.is_empty()) else {
        return Err(AppError::Validation(errors));
    };
    let rows = inputs[0].shape[0];
    let owner = registry::owner(&ctx.db, &version.name).await?;
    let royalty = (owner != request.account && manifest.royalty_per_row > 0)
        .then(|| (owner, rows * manifest.royalty_per_row));
    let template = PredictTask {
        model: version.name.clone(),
        sha256: version.sha256.clone(),
        size: version.size as u64,
        model_url: String::new(),
        inputs: Vec::new(),
        outputs,
    };
    Ok(JobPlan {
        model: RUNNER.into(),
        gateway_fee: PRICE_PER_JOB,
        royalty,
        // The tensors travel in the shards' tasks; the job keeps which model it runs (a
        // version in use is not deleted).
        input_record: Some(serde_json::json!({ "model": version.name, "version": version.sha256 })),
        shards: shard(
            inputs,
            &template,
            manifest.price_per_row,
            elements_per_shard,
        ),
        staged: Vec::new(),
        reads: Vec::new(),
    })
}

/// Cuts the rows into shards, each with its slice of every input.
fn shard(
    inputs: Vec<Tensor>,
    template: &PredictTask,
    price_per_row: i64,
    elements_per_shard: usize,
) -> Vec<ShardPlan> {
    let rows = inputs[0].shape[0] as usize;
    let per_row: usize = inputs.iter().map(Tensor::row_len).sum::<usize>().max(1);
    let per_shard = (elements_per_shard / per_row)
        .max(1)
        .max(rows.div_ceil(MAX_SHARDS));
    (0..rows)
        .step_by(per_shard)
        .map(|offset| {
            let count = per_shard.min(rows - offset);
            let slice = inputs
                .iter()
                .map(|t| {
                    let n = t.row_len();
                    let mut shape = t.shape.clone();
                    shape[0] = count as i64;
                    Tensor {
                        name: t.name.clone(),
                        datatype: t.datatype.clone(),
                        shape,
                        data: t.data[offset * n..(offset + count) * n].to_vec(),
                    }
                })
                .collect();
            ShardPlan {
                row_offset: offset as i32,
                row_count: count as i32,
                fee: count as i64 * price_per_row,
                task: ShardTask::Predict(PredictTask {
                    inputs: slice,
                    ..template.clone()
                }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> PredictTask {
        PredictTask {
            model: "m".into(),
            sha256: "ab".into(),
            size: 1,
            model_url: String::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }

    #[test]
    fn rows_are_cut_in_order_with_every_input_sliced_and_priced_per_row() {
        let x = Tensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![20_000, 8],
            data: (0..160_000).map(f64::from).collect(),
        };
        let ids = Tensor {
            name: "id".into(),
            datatype: "INT64".into(),
            shape: vec![20_000, 1],
            data: (0..20_000).map(f64::from).collect(),
        };
        let shards = shard(vec![x, ids], &task(), 20, 65_536);
        // 9 elements a row: 7,281 rows a shard.
        assert_eq!(shards.len(), 3);
        assert_eq!(
            shards
                .iter()
                .map(|s| (s.row_offset, s.row_count))
                .collect::<Vec<_>>(),
            [(0, 7_281), (7_281, 7_281), (14_562, 5_438)]
        );
        assert_eq!(shards.iter().map(|s| s.fee).sum::<i64>(), 20_000 * 20);
        let ShardTask::Predict(second) = &shards[1].task else {
            panic!()
        };
        assert_eq!(second.inputs[0].shape, [7_281, 8]);
        assert_eq!(second.inputs[0].data[0], (7_281 * 8) as f64);
        assert_eq!(second.inputs[1].data[0], 7_281.0);
        assert_eq!(second.rows(), 7_281);
    }
}
