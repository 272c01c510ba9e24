//! The registry models this node holds: fetched by hash through the URL signed for an
//! assignment, checked against the hash before anything reads them, kept on disk up to a byte
//! budget and loaded in memory up to a count, least recently used going first in each.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{bail, Context as _};
use ort::session::Session;
use xpand_protocol::{NodeKey, PredictTask};

use crate::onnx::OnnxRuntime;
use crate::plugins::anonymize::transfer::{block_on, download, file_digest, http_client};
use crate::plugins::InputUnusable;

pub struct ModelCache {
    runtime: OnnxRuntime,
    node_key: NodeKey,
    http: reqwest::Client,
    dir: PathBuf,
    max_bytes: u64,
    max_sessions: usize,
    /// Loaded models, most recently used first.
    sessions: Mutex<VecDeque<(String, Arc<Mutex<Session>>)>>,
}

impl ModelCache {
    pub fn new(
        runtime: OnnxRuntime,
        node_key: NodeKey,
        dir: PathBuf,
        max_bytes: u64,
        max_sessions: usize,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            runtime,
            node_key,
            http: http_client()?,
            dir,
            max_bytes,
            max_sessions: max_sessions.max(1),
            sessions: Mutex::new(VecDeque::new()),
        })
    }

    /// A session of the task's model: in memory, else from disk, else fetched. A model that
    /// ONNX Runtime refuses is the model's fault, marked [`InputUnusable`].
    pub fn session(&self, task: &PredictTask) -> anyhow::Result<Arc<Mutex<Session>>> {
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = sessions.iter().position(|(sha, _)| *sha == task.sha256) {
            let entry = sessions.remove(at).expect("found above");
            sessions.push_front(entry.clone());
            return Ok(entry.1);
        }
        drop(sessions);
        let path = self.fetched(task)?;
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let (session, _) = self
            .runtime
            .session(&bytes)
            .with_context(|| format!("model '{}' does not load", task.model))
            .context(InputUnusable)?;
        let session = Arc::new(Mutex::new(session));
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        // Another shard of the model may have loaded it meanwhile: one session is kept.
        if let Some((_, loaded)) = sessions.iter().find(|(sha, _)| *sha == task.sha256) {
            return Ok(loaded.clone());
        }
        sessions.push_front((task.sha256.clone(), session.clone()));
        sessions.truncate(self.max_sessions);
        Ok(session)
    }

    /// The model's file on disk, fetched and checked first if it is not there.
    fn fetched(&self, task: &PredictTask) -> anyhow::Result<PathBuf> {
        let valid = task.sha256.len() == 64 && task.sha256.bytes().all(|b| b.is_ascii_hexdigit());
        if !valid {
            bail!("the task names no model hash");
        }
        let path = self.dir.join(format!("{}.onnx", task.sha256));
        if path.is_file() {
            // Touched, so that eviction sees it used.
            let _ = std::fs::File::options()
                .append(true)
                .open(&path)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
            return Ok(path);
        }
        let partial = self
            .dir
            .join(format!("{}.part-{}", task.sha256, uuid::Uuid::new_v4()));
        let fetched = block_on(download(
            &self.http,
            &self.node_key,
            &task.model_url,
            &partial,
            task.size,
        ))
        .and_then(|r| r)
        .context("fetching the model");
        let checked = fetched.and_then(|_| {
            let (digest, _) =
                file_digest(&partial).with_context(|| format!("reading {}", partial.display()))?;
            if digest != task.sha256 {
                bail!(
                    "the fetched model hashes to {digest}, not {}: refused",
                    task.sha256
                );
            }
            Ok(())
        });
        if let Err(e) = checked {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        std::fs::rename(&partial, &path).with_context(|| format!("keeping {}", path.display()))?;
        self.evict(&path);
        Ok(path)
    }

    /// Removes the least recently used models until the rest fit the budget (never `keep`).
    fn evict(&self, keep: &Path) {
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "onnx"))
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                Some((meta.modified().ok()?, meta.len(), e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, size, path) in files {
            if total <= self.max_bytes {
                break;
            }
            if path != keep && std::fs::remove_file(&path).is_ok() {
                tracing::info!(model = %path.display(), "evicted from the model cache");
                total -= size;
            }
        }
    }
}

/// The sha256s of the models kept in `dir`, sorted: what the capability statement says the
/// node holds.
pub fn held(dir: &Path) -> Vec<String> {
    let mut held: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".onnx")
                .map(str::to_string)
        })
        .collect();
    held.sort();
    held
}
