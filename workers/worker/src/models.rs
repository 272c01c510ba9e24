//! Model manifests and the integrity check that gates loading a model.
//!
//! Each model lives in `<models_dir>/<dir>/` with a `manifest.json` naming its file and that file's
//! sha256. A model whose bytes do not hash to the manifest's value is refused: the gateway pays for
//! results of the model the worker announced, so it must be exactly that model.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde::Deserialize;
use xpand_protocol::{sha256_hex, ModelInfo};

/// `manifest.json`. Fields a model kind needs beyond these (for forecasting: `context_length`,
/// `max_horizon`, `min_history`) stay in `params` for its plugin to read.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    /// Shard kind the model serves (`forecast`, ...).
    pub kind: String,
    /// Model file, relative to the manifest's directory.
    pub file: PathBuf,
    pub sha256: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    #[serde(flatten)]
    pub params: serde_json::Map<String, serde_json::Value>,
}

/// One model input or output as the manifest declares it.
#[derive(Debug, Clone, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<Dim>,
}

/// A tensor dimension: a fixed size, or a symbol (such as `N`, the batch) for a dynamic one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(u64),
    Symbolic(String),
}

impl Manifest {
    pub fn info(&self) -> ModelInfo {
        ModelInfo {
            name: self.name.clone(),
            version: self.version.clone(),
            kind: self.kind.clone(),
            sha256: self.sha256.to_ascii_lowercase(),
        }
    }
}

/// A model whose file matched its manifest's hash, with the exact bytes that were hashed (the
/// session is built from these, so a file swapped after the check is never loaded).
pub struct VerifiedModel {
    pub manifest: Manifest,
    pub bytes: Vec<u8>,
}

/// Reads `dir/manifest.json` and its model file and checks the file's sha256.
pub fn verify(dir: &Path) -> anyhow::Result<VerifiedModel> {
    let manifest_path = dir.join("manifest.json");
    let text = fs::read_to_string(&manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let manifest: Manifest = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", manifest_path.display()))?;
    if manifest.file.is_absolute() || manifest.file.components().count() != 1 {
        bail!(
            "{}: `file` must name a file in the manifest's directory, not {}",
            manifest_path.display(),
            manifest.file.display()
        );
    }
    let model_path = dir.join(&manifest.file);
    let bytes =
        fs::read(&model_path).with_context(|| format!("reading {}", model_path.display()))?;
    let actual = sha256_hex(&bytes);
    if !actual.eq_ignore_ascii_case(manifest.sha256.trim()) {
        bail!(
            "sha256 of {} is {actual} but its manifest says {}; refusing the model",
            model_path.display(),
            manifest.sha256
        );
    }
    Ok(VerifiedModel { manifest, bytes })
}

/// Verifies every model directory under `models_dir`. Models that fail are logged and left out;
/// only an unreadable `models_dir` is an error.
pub fn discover(models_dir: &Path) -> anyhow::Result<Vec<VerifiedModel>> {
    let entries = fs::read_dir(models_dir)
        .with_context(|| format!("reading models directory {}", models_dir.display()))?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.join("manifest.json").is_file())
        .collect();
    dirs.sort();
    let mut verified = Vec::new();
    for dir in dirs {
        match verify(&dir) {
            Ok(model) => verified.push(model),
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = format!("{e:#}"), "model refused")
            }
        }
    }
    Ok(verified)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"{"name":"m","version":"1","kind":"forecast","file":"model.onnx",
        "sha256":"HASH","inputs":[{"name":"values","dtype":"float32","shape":["N",64]}],
        "outputs":[{"name":"forecast","dtype":"float32","shape":["N",24]}],"max_horizon":24}"#;

    fn model_dir(root: &Path, name: &str, bytes: &[u8], claimed_hash: &str) {
        let dir = root.join(name);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("model.onnx"), bytes).unwrap();
        let manifest = MANIFEST
            .replace("HASH", claimed_hash)
            .replace("\"m\"", &format!("{name:?}"));
        fs::write(dir.join("manifest.json"), manifest).unwrap();
    }

    #[test]
    fn a_model_whose_hash_differs_from_its_manifest_is_refused() {
        let root = std::env::temp_dir().join(format!("xpand-models-{}", uuid::Uuid::new_v4()));
        model_dir(
            &root,
            "good",
            b"model bytes",
            &sha256_hex(b"model bytes").to_uppercase(),
        );
        model_dir(
            &root,
            "tampered",
            b"other bytes",
            &sha256_hex(b"model bytes"),
        );
        fs::create_dir_all(root.join("not-a-model")).unwrap();

        let err = verify(&root.join("tampered")).err().unwrap();
        assert!(format!("{err:#}").contains("refusing the model"), "{err:#}");

        let found = discover(&root).unwrap();
        assert_eq!(found.len(), 1);
        let good = &found[0];
        assert_eq!(good.manifest.name, "good");
        assert_eq!(good.bytes, b"model bytes");
        assert_eq!(good.manifest.info().sha256, sha256_hex(b"model bytes"));
        assert_eq!(good.manifest.params["max_horizon"], 24);
        assert_eq!(
            good.manifest.inputs[0].shape,
            [Dim::Symbolic("N".into()), Dim::Fixed(64)]
        );
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn model_files_outside_the_manifest_directory_are_refused() {
        let root = std::env::temp_dir().join(format!("xpand-models-{}", uuid::Uuid::new_v4()));
        let dir = root.join("escape");
        fs::create_dir_all(&dir).unwrap();
        let manifest = MANIFEST.replace("model.onnx", "../model.onnx");
        fs::write(dir.join("manifest.json"), manifest).unwrap();
        assert!(verify(&dir).is_err());
        assert!(discover(&root).unwrap().is_empty());
        fs::remove_dir_all(root).unwrap();
    }
}
