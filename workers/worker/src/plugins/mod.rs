//! Inference plugins: one per shard kind, each wrapping a loaded model.

use anyhow::bail;
use ort::session::Session;
use xpand_protocol::{ShardOutput, ShardTask};

use crate::models::Manifest;

pub mod face_detect;
pub mod forecast;

/// Runs shards of one kind on one model. `run` is called on a blocking thread.
pub trait Plugin: Send + Sync {
    /// The shard kind it serves: the `kind` tag of [`ShardTask`].
    fn kind(&self) -> &'static str;

    /// Runs `task`, calling `progress` with each newly finished run of chunks, in order, as a
    /// partial output (so the progress chain covers [`ShardOutput::chunk_bytes`]), and returns
    /// the whole output. Invalid input is an error, never a panic.
    fn run(
        &self,
        task: &ShardTask,
        progress: &mut dyn FnMut(&ShardOutput),
    ) -> anyhow::Result<ShardOutput>;
}

/// The `kind` tag of a task, as plugins and manifests name it.
pub fn task_kind(task: &ShardTask) -> &'static str {
    match task {
        ShardTask::Forecast { .. } => forecast::KIND,
    }
}

/// Whether this worker has a plugin that runs models of `kind`.
pub fn serves(kind: &str) -> bool {
    kind == forecast::KIND
}

/// The plugin for `manifest.kind`, around a session of its model.
pub fn load(manifest: &Manifest, session: Session) -> anyhow::Result<Box<dyn Plugin>> {
    match manifest.kind.as_str() {
        forecast::KIND => Ok(Box::new(forecast::ForecastPlugin::new(manifest, session)?)),
        other => bail!("no plugin serves model kind `{other}`"),
    }
}
