//! The model registry: customers' own ONNX models, each upload an immutable version addressed
//! by the sha256 of its bytes, described by a manifest in the shape of the Open Inference
//! Protocol's model metadata. A name belongs to the account that first registered it; a model
//! is private to its owner until published, and another account's private model is "not found",
//! never "forbidden". Bytes live in object storage at `models/{name}/{sha256}` and count
//! against the owner's storage quota with their files.

pub mod onnx;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::{AppError, FieldError};

/// Most tensors a manifest may list on each side.
const MAX_TENSORS: usize = 32;
/// Most dimensions of one tensor.
const MAX_RANK: usize = 8;
/// Highest price per row, in micro-credits.
pub const MAX_PRICE_PER_ROW: i64 = 1_000_000;

/// A tensor element type, by the Open Inference Protocol's names: those the workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Datatype {
    Fp32,
    Fp64,
    Int32,
    Int64,
}

impl Datatype {
    pub const NAMES: &'static str = "FP32, FP64, INT32 or INT64";

    /// The type of an ONNX `TensorProto.DataType` code, if the workers run it.
    pub fn from_onnx(code: i32) -> Option<Self> {
        Some(match code {
            1 => Self::Fp32,
            6 => Self::Int32,
            7 => Self::Int64,
            11 => Self::Fp64,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Fp32 => "FP32",
            Self::Fp64 => "FP64",
            Self::Int32 => "INT32",
            Self::Int64 => "INT64",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [Self::Fp32, Self::Fp64, Self::Int32, Self::Int64]
            .into_iter()
            .find(|d| d.name() == name)
    }

    /// Whether a value is one of this type's: integers for the integer types, in range.
    pub fn holds(self, x: f64) -> bool {
        match self {
            Self::Fp32 => x.is_finite() && x.abs() <= f32::MAX as f64,
            Self::Fp64 => x.is_finite(),
            Self::Int32 => x.fract() == 0.0 && (i32::MIN as f64..=i32::MAX as f64).contains(&x),
            // Exact as a JSON number only within ±2^53.
            Self::Int64 => x.fract() == 0.0 && x.abs() <= 9_007_199_254_740_992.0,
        }
    }
}

/// One input or output tensor: the first dimension is the batch (rows), `-1` a free one.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: Datatype,
    #[schema(min_items = 1, max_items = 8)]
    pub shape: Vec<i64>,
}

/// What an upload says of its model (the `manifest` part).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// 1 to 64 of `a-z 0-9 . _ -`, starting with a letter or digit.
    #[schema(example = "churn", pattern = "^[a-z0-9][a-z0-9._-]{0,63}$")]
    pub name: String,
    #[serde(default)]
    #[schema(max_length = 1000)]
    pub description: String,
    #[schema(min_items = 1, max_items = 32)]
    pub inputs: Vec<TensorSpec>,
    #[schema(min_items = 1, max_items = 32)]
    pub outputs: Vec<TensorSpec>,
    /// Micro-credits per row (per element of the batch dimension) a job pays the nodes.
    #[schema(minimum = 1, maximum = 1_000_000, example = 20)]
    pub price_per_row: i64,
    /// Micro-credits per row that another account's job pays you, the owner, when it succeeds
    /// (published models; your own jobs pay none).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1_000_000, example = 5)]
    pub royalty_per_row: i64,
}

impl Manifest {
    /// The checks a manifest passes on its own, each naming its field.
    pub fn validate(&self) -> Result<(), AppError> {
        let mut errors = Vec::new();
        let name_ok = (1..=64).contains(&self.name.len())
            && self
                .name
                .starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if !name_ok {
            errors.push(FieldError::new(
                "manifest.name",
                "must be 1 to 64 of a-z, 0-9, '.', '_' and '-', starting with a letter or digit",
            ));
        }
        if self.description.chars().count() > 1000 {
            errors.push(FieldError::new(
                "manifest.description",
                "must be at most 1000 characters",
            ));
        }
        if !(1..=MAX_PRICE_PER_ROW).contains(&self.price_per_row) {
            errors.push(FieldError::new(
                "manifest.price_per_row",
                format!("must be from 1 to {MAX_PRICE_PER_ROW} micro-credits"),
            ));
        }
        if !(0..=MAX_PRICE_PER_ROW).contains(&self.royalty_per_row) {
            errors.push(FieldError::new(
                "manifest.royalty_per_row",
                format!("must be from 0 to {MAX_PRICE_PER_ROW} micro-credits"),
            ));
        }
        for (field, tensors) in [("inputs", &self.inputs), ("outputs", &self.outputs)] {
            if !(1..=MAX_TENSORS).contains(&tensors.len()) {
                errors.push(FieldError::new(
                    format!("manifest.{field}"),
                    format!("must list 1 to {MAX_TENSORS} tensors"),
                ));
            }
            for (i, tensor) in tensors.iter().enumerate() {
                let at = format!("manifest.{field}[{i}]");
                if tensor.name.is_empty() || tensor.name.len() > 256 {
                    errors.push(FieldError::new(
                        format!("{at}.name"),
                        "must be 1 to 256 bytes",
                    ));
                }
                if tensors[..i].iter().any(|t| t.name == tensor.name) {
                    errors.push(FieldError::new(format!("{at}.name"), "is listed twice"));
                }
                if !(1..=MAX_RANK).contains(&tensor.shape.len()) {
                    errors.push(FieldError::new(
                        format!("{at}.shape"),
                        format!("must have 1 to {MAX_RANK} dimensions, the first the batch"),
                    ));
                }
                for (d, &dim) in tensor.shape.iter().enumerate() {
                    if dim == 0 || dim < -1 {
                        errors.push(FieldError::new(
                            format!("{at}.shape[{d}]"),
                            "must be -1 (free) or a positive size",
                        ));
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(AppError::Validation(errors))
        }
    }
}

/// One version of a model, as its readers see it.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct ModelVersion {
    pub name: String,
    /// Hex sha256 of the ONNX bytes: the version's address.
    pub sha256: String,
    /// Bytes.
    pub size: i64,
    #[schema(value_type = Manifest)]
    pub manifest: sqlx::types::Json<Manifest>,
    pub created_at: DateTime<Utc>,
}

/// A model: its versions, newest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Model {
    pub name: String,
    /// Whether the caller owns it (else it is a published model of another account).
    pub owned: bool,
    /// Whether any account may run it.
    pub published: bool,
    pub created_at: DateTime<Utc>,
    pub versions: Vec<ModelVersion>,
}

pub fn object_path(name: &str, sha256: &str) -> ObjectPath {
    ObjectPath::from(format!("models/{name}/{sha256}"))
}

/// Registers `bytes` as a version of the manifest's model for `account`, after every check:
/// the manifest, the graph against it, the name's owner, the storage quota. Answers the version
/// and whether it is new (the same bytes again are the same version). A refusal leaves nothing
/// stored.
pub async fn register(
    store: &Arc<dyn ObjectStore>,
    db: &PgPool,
    account: Uuid,
    manifest: Manifest,
    bytes: bytes::Bytes,
    quota: i64,
) -> Result<(ModelVersion, bool), AppError> {
    manifest.validate()?;
    let signature = onnx::check(&bytes)?;
    let mut differences = onnx::differences("inputs", &manifest.inputs, &signature.inputs);
    differences.extend(onnx::differences(
        "outputs",
        &manifest.outputs,
        &signature.outputs,
    ));
    if !differences.is_empty() {
        return Err(AppError::Validation(differences));
    }
    let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    let size = bytes.len() as i64;
    let path = object_path(&manifest.name, &sha256);

    let mut tx = db.begin().await?;
    // Claims the name if it is free (a concurrent claim waits here), then reads its owner.
    sqlx::query("INSERT INTO models (name, account_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(&manifest.name)
        .bind(account)
        .execute(&mut *tx)
        .await?;
    let owner: Uuid =
        sqlx::query_scalar("SELECT account_id FROM models WHERE name = $1 FOR UPDATE")
            .bind(&manifest.name)
            .fetch_one(&mut *tx)
            .await?;
    if owner != account {
        return Err(AppError::Conflict(format!(
            "the model name '{}' belongs to another account; choose another",
            manifest.name
        )));
    }
    if let Some(existing) = version_row(&mut *tx, &manifest.name, &sha256).await? {
        return Ok((existing, false));
    }
    crate::files::reserve(&mut tx, account, size, quota).await?;
    store
        .put(&path, bytes.into())
        .await
        .map_err(|e| anyhow::anyhow!("storing the model: {e}"))?;
    let inserted = sqlx::query_as(
        "INSERT INTO model_versions (name, sha256, account_id, size, manifest)
         VALUES ($1, $2, $3, $4, $5)
         RETURNING name, sha256, size, manifest, created_at",
    )
    .bind(&manifest.name)
    .bind(&sha256)
    .bind(account)
    .bind(size)
    .bind(sqlx::types::Json(&manifest))
    .fetch_one(&mut *tx)
    .await;
    let committed = match inserted {
        Ok(version) => tx.commit().await.map(|()| version),
        Err(e) => Err(e),
    };
    match committed {
        Ok(version) => Ok((version, true)),
        Err(e) => {
            let _ = store.delete(&path).await;
            Err(e.into())
        }
    }
}

async fn version_row<'c, E: sqlx::PgExecutor<'c>>(
    db: E,
    name: &str,
    sha256: &str,
) -> sqlx::Result<Option<ModelVersion>> {
    sqlx::query_as(
        "SELECT name, sha256, size, manifest, created_at FROM model_versions
         WHERE name = $1 AND sha256 = $2",
    )
    .bind(name)
    .bind(sha256)
    .fetch_optional(db)
    .await
}

/// The models `account` may see: its own and the published ones, by name.
pub async fn list(db: &PgPool, account: Uuid) -> Result<Vec<Model>, AppError> {
    visible(db, account, None).await
}

/// One model `account` may see, with its versions newest first.
pub async fn get(db: &PgPool, account: Uuid, name: &str) -> Result<Model, AppError> {
    visible(db, account, Some(name))
        .await?
        .pop()
        .ok_or(AppError::NotFound("model"))
}

/// The models `account` may see (only `name`, if given), each with its versions newest first:
/// two queries however many models there are.
async fn visible(db: &PgPool, account: Uuid, name: Option<&str>) -> Result<Vec<Model>, AppError> {
    let rows: Vec<(String, Uuid, bool, DateTime<Utc>)> = sqlx::query_as(
        "SELECT name, account_id, published, created_at FROM models
         WHERE (account_id = $1 OR published) AND ($2::text IS NULL OR name = $2)
         ORDER BY name LIMIT 1000",
    )
    .bind(account)
    .bind(name)
    .fetch_all(db)
    .await?;
    let names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    let mut versions: Vec<ModelVersion> = sqlx::query_as(
        "SELECT name, sha256, size, manifest, created_at FROM model_versions
         WHERE name = ANY($1) ORDER BY name, created_at DESC, sha256",
    )
    .bind(&names)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, owner, published, created_at)| {
            let split = versions.partition_point(|v| v.name == name);
            let rest = versions.split_off(split);
            Model {
                versions: std::mem::replace(&mut versions, rest),
                name,
                owned: owner == account,
                published,
                created_at,
            }
        })
        .collect())
}

/// One version `account` may see: `version` is its sha256, a prefix of at least 8 hex digits
/// that names one version, or `latest`.
pub async fn version(
    db: &PgPool,
    account: Uuid,
    name: &str,
    version: &str,
) -> Result<ModelVersion, AppError> {
    let model = get(db, account, name).await?;
    pick(model.versions, version)
}

fn pick(versions: Vec<ModelVersion>, version: &str) -> Result<ModelVersion, AppError> {
    if version == "latest" {
        return versions
            .into_iter()
            .next()
            .ok_or(AppError::NotFound("model version"));
    }
    let hex = version.len() >= 8 && version.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex {
        return Err(AppError::field(
            "version",
            "must be `latest`, a sha256 or a prefix of at least 8 hex digits",
        ));
    }
    let wanted = version.to_ascii_lowercase();
    let mut found = versions
        .into_iter()
        .filter(|v| v.sha256.starts_with(&wanted));
    match (found.next(), found.next()) {
        (Some(v), None) => Ok(v),
        (None, _) => Err(AppError::NotFound("model version")),
        (Some(_), Some(_)) => Err(AppError::field(
            "version",
            "names more than one version; give more digits",
        )),
    }
}

/// The account that owns model `name` (never shown to others; a royalty is paid to it).
pub async fn owner(db: &PgPool, name: &str) -> Result<Uuid, AppError> {
    sqlx::query_scalar("SELECT account_id FROM models WHERE name = $1")
        .bind(name)
        .fetch_optional(db)
        .await?
        .ok_or(AppError::NotFound("model"))
}

/// Publishes (or withdraws) a model of `account`.
pub async fn publish(
    db: &PgPool,
    account: Uuid,
    name: &str,
    published: bool,
) -> Result<Model, AppError> {
    let updated =
        sqlx::query("UPDATE models SET published = $3 WHERE name = $1 AND account_id = $2")
            .bind(name)
            .bind(account)
            .bind(published)
            .execute(db)
            .await?;
    if updated.rows_affected() == 0 {
        return Err(AppError::NotFound("model"));
    }
    get(db, account, name).await
}

/// Deletes a version of a model `account` owns, then its bytes; the last version takes the
/// model (and its name) with it.
pub async fn delete_version(
    store: &Arc<dyn ObjectStore>,
    db: &PgPool,
    account: Uuid,
    name: &str,
    version: &str,
) -> Result<(), AppError> {
    let mut tx = db.begin().await?;
    let owned: Option<Uuid> = sqlx::query_scalar(
        "SELECT account_id FROM models WHERE name = $1 AND account_id = $2 FOR UPDATE",
    )
    .bind(name)
    .bind(account)
    .fetch_optional(&mut *tx)
    .await?;
    if owned.is_none() {
        return Err(AppError::NotFound("model"));
    }
    let versions = sqlx::query_as(
        "SELECT name, sha256, size, manifest, created_at FROM model_versions
         WHERE name = $1 ORDER BY created_at DESC, sha256",
    )
    .bind(name)
    .fetch_all(&mut *tx)
    .await?;
    let victim = pick(versions, version)?;
    // Its nodes would find the model gone: the job is let finish first.
    let reader: Option<Uuid> = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE kind = 'predict' AND status IN ('queued', 'running')
         AND input->>'model' = $1 LIMIT 1",
    )
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(job) = reader {
        return Err(AppError::Conflict(format!(
            "job {job} runs model '{name}'; delete the version once the job has ended (or cancel it)"
        )));
    }
    sqlx::query("DELETE FROM model_versions WHERE name = $1 AND sha256 = $2")
        .bind(name)
        .bind(&victim.sha256)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "DELETE FROM models m WHERE name = $1
         AND NOT EXISTS (SELECT 1 FROM model_versions v WHERE v.name = m.name)",
    )
    .bind(name)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let _ = store.delete(&object_path(name, &victim.sha256)).await;
    Ok(())
}
