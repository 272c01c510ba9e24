//! ONNX Runtime: loading the shared library and building sessions on CUDA or CPU.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{anyhow, Context as _};
use ort::environment::Environment;
use ort::ep::{self, ExecutionProvider as _};
use ort::logging::LogLevel;
use ort::session::Session;
use xpand_protocol::Accelerator;

use crate::config::AcceleratorChoice;

/// ONNX Runtime allows one library and one environment per process, so every worker (tests run
/// several in one process) shares this one.
static ENVIRONMENT: Mutex<Option<(PathBuf, Environment)>> = Mutex::new(None);

/// The process's ONNX Runtime environment, loaded from `dylib` the first time (tests that run the
/// bare model beside in-process workers take it from here).
pub fn environment(dylib: &Path) -> anyhow::Result<Environment> {
    let mut slot = ENVIRONMENT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((loaded, env)) = slot.as_ref() {
        if loaded != dylib {
            tracing::warn!(
                loaded = %loaded.display(),
                requested = %dylib.display(),
                "ONNX Runtime is already loaded in this process; keeping the loaded library"
            );
        }
        return Ok(env.clone());
    }
    if !dylib.is_file() {
        anyhow::bail!(
            "ONNX Runtime library {} not found: run scripts/setup-onnxruntime.sh or set \
             ORT_DYLIB_PATH",
            dylib.display()
        );
    }
    let env = ort::init_from(dylib)
        .with_context(|| format!("loading ONNX Runtime from {}", dylib.display()))?
        .with_name("xpand-worker")
        .build()
        .context("creating the ONNX Runtime environment")?;
    // ONNX Runtime's own messages go through `tracing`; its info level is chatty.
    env.set_log_level(LogLevel::Warning);
    *slot = Some((dylib.to_path_buf(), env.clone()));
    Ok(env)
}

/// Builds inference sessions with the configured execution provider.
pub struct OnnxRuntime {
    env: Environment,
    use_cuda: bool,
    intra_threads: Option<usize>,
}

impl OnnxRuntime {
    pub fn load(dylib: &Path, choice: AcceleratorChoice) -> anyhow::Result<Self> {
        let env = environment(dylib)?;
        let cuda_built_in = ep::CUDA::is_available().unwrap_or(false);
        let use_cuda = match choice {
            AcceleratorChoice::Cpu => false,
            AcceleratorChoice::Auto | AcceleratorChoice::Cuda if cuda_built_in => true,
            AcceleratorChoice::Auto => {
                tracing::info!(
                    "this ONNX Runtime build has no CUDA execution provider; running on CPU"
                );
                false
            }
            AcceleratorChoice::Cuda => {
                tracing::warn!(
                    library = %dylib.display(),
                    "CUDA was requested but this ONNX Runtime library has no CUDA execution \
                     provider; CUDA needs the onnxruntime-gpu library (point ORT_DYLIB_PATH at \
                     it). Running on CPU"
                );
                false
            }
        };
        Ok(Self {
            env,
            use_cuda,
            intra_threads: None,
        })
    }

    /// Limits each session to `threads` intra-op threads (`None`: ONNX Runtime's default).
    pub fn with_threads(mut self, threads: Option<usize>) -> Self {
        self.intra_threads = threads;
        self
    }

    fn builder(&self) -> anyhow::Result<ort::session::builder::SessionBuilder> {
        let builder = Session::builder(&self.env).context("creating a session builder")?;
        match self.intra_threads {
            Some(n) => builder
                .with_intra_threads(n)
                .map_err(|e| anyhow!("setting {n} inference threads: {e}")),
            None => Ok(builder),
        }
    }

    /// A session for `model` (ONNX bytes) and where it runs. CUDA is tried first when enabled;
    /// if it cannot take the model (no GPU, missing CUDA libraries) the session runs on CPU.
    pub fn session(&self, model: &[u8]) -> anyhow::Result<(Session, Accelerator)> {
        if self.use_cuda {
            match self.cuda_session(model) {
                Ok(session) => return Ok((session, Accelerator::Cuda)),
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "CUDA unavailable; running on CPU")
                }
            }
        }
        let session = self
            .builder()?
            .commit_from_memory(model)
            .context("loading the model into ONNX Runtime")?;
        Ok((session, Accelerator::Cpu))
    }

    fn cuda_session(&self, model: &[u8]) -> anyhow::Result<Session> {
        self.builder()?
            .with_execution_providers([ep::CUDA::default().build().error_on_failure()])
            .map_err(|e| anyhow!("registering the CUDA execution provider: {e}"))?
            .commit_from_memory(model)
            .context("loading the model with the CUDA execution provider")
    }
}
