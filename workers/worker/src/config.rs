//! Worker configuration and the node key file.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use xpand_protocol::{BrokerLink, NodeKey};

/// ONNX Runtime release that `scripts/setup-onnxruntime.sh` installs.
pub const ONNXRUNTIME_VERSION: &str = "1.31.1";

/// Which execution provider to run models on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AcceleratorChoice {
    /// CUDA when the ONNX Runtime library has it and a session can use it, CPU otherwise.
    Auto,
    Cpu,
    /// Like `auto`, but warns when CUDA cannot be used.
    Cuda,
}

/// Everything a worker needs to run. Build it with [`WorkerConfig::new`] and adjust the fields.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub broker: BrokerLink,
    /// Root of the topic tree; tests use a unique one per test.
    pub topic_prefix: String,
    /// This node's identity; its public key hex is the node id.
    pub node_key: NodeKey,
    /// Hex public key of the gateway; assignments signed by anyone else are dropped.
    pub gateway_key: String,
    /// Holds one directory per model, each with a `manifest.json`.
    pub models_dir: PathBuf,
    /// The ONNX Runtime shared library to load.
    pub ort_dylib_path: PathBuf,
    /// Display name in the capability announce.
    pub name: String,
    /// Shards run at once; further assignments are rejected.
    pub max_concurrent_shards: usize,
    pub heartbeat_interval: Duration,
    pub accelerator: AcceleratorChoice,
    /// Intra-op threads of each inference session; `None`: ONNX Runtime's default (all cores).
    pub inference_threads: Option<usize>,
    /// Where registry models fetched for predict shards are kept, by sha256.
    pub model_cache_dir: PathBuf,
    /// Most bytes of fetched models kept on disk (least recently used go first).
    pub model_cache_bytes: u64,
}

/// Registry models kept loaded in memory, least recently used evicted first.
pub const MODEL_SESSIONS: usize = 8;

impl WorkerConfig {
    /// A configuration with defaults for everything but the broker and the two keys: topic prefix
    /// `xpand`, models in `workers/models`, ONNX Runtime from [`default_ort_dylib_path`], one
    /// shard per core, a heartbeat every 2 s, accelerator `auto`.
    pub fn new(broker: BrokerLink, node_key: NodeKey, gateway_key: impl Into<String>) -> Self {
        let name = default_name(&node_key);
        let model_cache_dir =
            std::env::temp_dir().join(format!("xpand-models-{}", &node_key.id()[..16]));
        Self {
            broker,
            topic_prefix: "xpand".to_string(),
            node_key,
            gateway_key: gateway_key.into(),
            models_dir: PathBuf::from("workers/models"),
            ort_dylib_path: default_ort_dylib_path(),
            name,
            max_concurrent_shards: cpu_cores(),
            heartbeat_interval: Duration::from_secs(2),
            accelerator: AcceleratorChoice::Auto,
            inference_threads: None,
            model_cache_dir,
            model_cache_bytes: 2 << 30,
        }
    }
}

/// The host name where the OS tells it, else a name made from the node id.
fn default_name(key: &NodeKey) -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| format!("worker-{}", &key.id()[..12]))
}

pub(crate) fn cpu_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `ORT_DYLIB_PATH` when set; else the library `scripts/setup-onnxruntime.sh` installs under
/// `$HOME/.cache/xpand/onnxruntime-<version>/` (whichever `libonnxruntime.so*` is there).
pub fn default_ort_dylib_path() -> PathBuf {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let dir = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".cache/xpand")
        .join(format!("onnxruntime-{ONNXRUNTIME_VERSION}"));
    let installed = fs::read_dir(&dir).ok().and_then(|entries| {
        entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| {
                path.file_name()
                    .and_then(|name| name.to_str())
                    .is_some_and(|name| {
                        name.starts_with("libonnxruntime.so") && !name.ends_with(".partial")
                    })
            })
            .min()
    });
    // The expected name keeps the "not found" error readable when nothing is installed.
    installed.unwrap_or_else(|| dir.join(format!("libonnxruntime.so.{ONNXRUNTIME_VERSION}")))
}

/// Loads the node key (a 64-hex-digit ed25519 seed) from `path`. When the file does not exist
/// and `generate` is set, writes a fresh key there first (mode 0600).
pub fn load_node_key(path: &Path, generate: bool) -> anyhow::Result<NodeKey> {
    if path.exists() {
        return NodeKey::read_file(path)
            .with_context(|| format!("reading key file {}", path.display()));
    }
    if !generate {
        bail!(
            "key file {} does not exist; pass --generate-key to create one",
            path.display()
        );
    }
    let key = NodeKey::create_file(path)
        .with_context(|| format!("creating key file {}", path.display()))?;
    tracing::info!(path = %path.display(), node_id = key.id(), "generated a new node key");
    Ok(key)
}

/// Exclusive use of a node identity on this machine, held while the returned file lives.
///
/// Two processes with one key would take each other's MQTT session (the client id is derived
/// from the key) every few hundred milliseconds; the second one is refused instead. The lock
/// is the kernel's, so it goes with the process however the process ends.
pub fn lock_node_key(path: &Path) -> anyhow::Result<std::fs::File> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("opening key file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "the node key {} is in use by another running xpand-worker: one node identity runs \
             in one process (stop the other one, or give this one its own --key-file)",
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking key file {}", path.display()))
        }
    }
}

/// Total memory in MiB from `/proc/meminfo`; 0 where that is unavailable.
pub(crate) fn total_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib / 1024)
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_key_is_used_by_one_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        load_node_key(&path, true).unwrap();
        let held = lock_node_key(&path).unwrap();
        let refused = lock_node_key(&path).unwrap_err().to_string();
        assert!(
            refused.contains("in use by another running xpand-worker"),
            "{refused}"
        );
        drop(held);
        lock_node_key(&path).expect("free again once the holder is gone");
    }

    #[test]
    fn key_file_is_created_only_when_asked_and_then_reused() {
        let dir = std::env::temp_dir().join(format!("xpand-key-{}", uuid::Uuid::new_v4()));
        let path = dir.join("node.key");
        assert!(load_node_key(&path, false).is_err());
        let created = load_node_key(&path, true).unwrap();
        let again = load_node_key(&path, true).unwrap();
        assert_eq!(created.id(), again.id());
        fs::write(&path, "not a key").unwrap();
        assert!(load_node_key(&path, false).is_err());
        fs::remove_dir_all(dir).unwrap();
    }
}
