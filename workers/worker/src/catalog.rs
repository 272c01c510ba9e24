//! The models this worker runs: every model in the models directory whose manifest verifies,
//! loaded behind the plugin for its kind, by name, and the runner of customers' registry models
//! (`onnx-runtime`, serving predict shards). What the worker announces comes from here.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::bail;
use xpand_protocol::{Accelerator, ModelInfo};

use crate::config::{WorkerConfig, MODEL_SESSIONS, ONNXRUNTIME_VERSION};
use crate::models;
use crate::onnx::OnnxRuntime;
use crate::plugins::predict::{self, ModelCache, PredictPlugin};
use crate::plugins::{self, Plugin};

/// A verified model behind its plugin.
pub(crate) struct LoadedModel {
    pub info: ModelInfo,
    pub plugin: Box<dyn Plugin>,
}

/// Verifies and loads every model in the models directory; models that fail are logged and
/// skipped. Returns the models by name and where they run.
pub(crate) fn load_all(
    config: &WorkerConfig,
) -> anyhow::Result<(HashMap<String, Arc<LoadedModel>>, Accelerator)> {
    let verified = models::discover(&config.models_dir)?;
    if verified.is_empty() {
        bail!(
            "no usable model in {}: each model needs a <dir>/manifest.json whose sha256 \
             matches its file",
            config.models_dir.display()
        );
    }
    let runtime = OnnxRuntime::load(&config.ort_dylib_path, config.accelerator)?
        .with_threads(config.inference_threads);
    let mut loaded = HashMap::new();
    let mut accelerator = Accelerator::Cpu;
    for model in verified {
        let info = model.manifest.info();
        if loaded.contains_key(&info.name) {
            tracing::error!(model = %info.name, "another model already has this name; refusing it");
            continue;
        }
        if !plugins::serves(&info.kind) {
            // A model installed ahead of the code that runs it: verified, but not loaded or
            // announced.
            tracing::info!(model = %info.name, kind = %info.kind, "no plugin runs this kind yet; skipped");
            continue;
        }
        match plugins::load(&runtime, &model, &config.node_key) {
            Ok((plugin, runs_on)) => {
                if runs_on == Accelerator::Cuda {
                    accelerator = Accelerator::Cuda;
                }
                tracing::info!(
                    model = %info.name,
                    version = %info.version,
                    kind = %info.kind,
                    serves = plugin.kind(),
                    accelerator = ?runs_on,
                    "model loaded"
                );
                loaded.insert(info.name.clone(), Arc::new(LoadedModel { info, plugin }));
            }
            Err(e) => {
                tracing::error!(model = %info.name, error = format!("{e:#}"), "model refused")
            }
        }
    }
    if loaded.is_empty() {
        bail!(
            "no usable model in {}: every model failed to load (see the errors above)",
            config.models_dir.display()
        );
    }
    // Customers' models from the registry, fetched as predict shards name them.
    let cache = ModelCache::new(
        runtime,
        config.node_key.clone(),
        config.model_cache_dir.clone(),
        config.model_cache_bytes,
        MODEL_SESSIONS,
    )?;
    let info = ModelInfo {
        name: predict::RUNNER.into(),
        version: ONNXRUNTIME_VERSION.into(),
        kind: predict::KIND.into(),
        sha256: String::new(),
    };
    let plugin = Box::new(PredictPlugin::new(cache));
    loaded.insert(info.name.clone(), Arc::new(LoadedModel { info, plugin }));
    Ok((loaded, accelerator))
}
