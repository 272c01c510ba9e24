//! Inference plugins: one per shard kind, each wrapping a loaded model.

use anyhow::bail;
use xpand_protocol::{Accelerator, NodeKey, ShardOutput, ShardTask};

use crate::models::VerifiedModel;
use crate::onnx::OnnxRuntime;

pub mod anonymize;
pub mod face_detect;
pub mod forecast;
pub mod predict;

/// Runs shards of one kind on one model. `run` is called on a blocking thread.
pub trait Plugin: Send + Sync {
    /// The shard kind it serves: the `kind` tag of [`ShardTask`] (which may differ from the
    /// model's manifest kind: `face_detect` models serve `anonymize` shards).
    fn kind(&self) -> &'static str;

    /// Runs `task`, calling `progress` with each newly finished run of chunks, in order, as a
    /// partial output (so the progress chain covers [`ShardOutput::chunk_bytes`]), and returns
    /// the whole output. `progress` answers `false` when the gateway no longer wants the shard
    /// (another node answered it first): the plugin then stops and returns an error. Invalid
    /// input is an error, never a panic.
    fn run(
        &self,
        task: &ShardTask,
        progress: &mut dyn FnMut(&ShardOutput) -> bool,
    ) -> anyhow::Result<ShardOutput>;
}

/// Marks a plugin's error as being about the shard's input itself (it does not decode, or is
/// not what the task names) rather than about this node: attached with `.context(InputUnusable)`
/// and found with `downcast_ref`. The worker's reject then says so, and a second node's
/// agreement ends the job instead of sending the shard to every node in turn.
#[derive(Debug, Clone, Copy)]
pub struct InputUnusable;

impl std::fmt::Display for InputUnusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the shard's input cannot be processed")
    }
}

/// The `kind` tag of a task, as plugins name it.
pub fn task_kind(task: &ShardTask) -> &'static str {
    match task {
        ShardTask::Forecast { .. } => forecast::KIND,
        ShardTask::Anonymize(_) => anonymize::KIND,
        ShardTask::Predict(_) => predict::KIND,
    }
}

/// Whether this worker has a plugin that runs models of manifest kind `kind`.
pub fn serves(kind: &str) -> bool {
    matches!(kind, forecast::KIND | face_detect::KIND)
}

/// The plugin for a verified model (by its manifest kind), with a session of the model built on
/// `runtime`, and where that session runs. `node_key` signs what plugins ask of the gateway
/// (the anonymize plugin's transfers).
pub fn load(
    runtime: &OnnxRuntime,
    model: &VerifiedModel,
    node_key: &NodeKey,
) -> anyhow::Result<(Box<dyn Plugin>, Accelerator)> {
    let manifest = &model.manifest;
    match manifest.kind.as_str() {
        forecast::KIND => {
            let (session, runs_on) = runtime.session(&model.bytes)?;
            let plugin = forecast::ForecastPlugin::new(manifest, session)?;
            Ok((Box::new(plugin), runs_on))
        }
        face_detect::KIND => {
            let plugin = anonymize::AnonymizePlugin::load(runtime, model, node_key)?;
            let runs_on = plugin.runs_on();
            Ok((Box::new(plugin), runs_on))
        }
        other => bail!("no plugin serves model kind `{other}`"),
    }
}
