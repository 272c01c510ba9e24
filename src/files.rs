//! Files: uploads streamed into object storage (a local directory by default; the
//! `object_store` crate also speaks S3 and others), with size and sha256 computed on the way.
//! The bytes live under `files/{id}`; Postgres says whose they are and what they hash to.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::AppError;

/// An uploaded file as its owner sees it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct FileInfo {
    pub id: Uuid,
    /// Bytes.
    pub size: i64,
    /// Hex sha256 of the content.
    pub sha256: String,
    pub content_type: String,
    pub created_at: DateTime<Utc>,
}

/// Opens the local directory store, creating the directory.
pub fn local_store(dir: &std::path::Path) -> anyhow::Result<Arc<dyn ObjectStore>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("creating files directory {}: {e}", dir.display()))?;
    Ok(Arc::new(
        object_store::local::LocalFileSystem::new_with_prefix(dir)?,
    ))
}

pub fn object_path(id: Uuid) -> ObjectPath {
    ObjectPath::from(format!("files/{id}"))
}

/// Streams `body` into storage as a new file of `account`, refusing more than `limit` bytes
/// while it streams. A refused or broken upload leaves no object and no row behind.
pub async fn upload<S, E>(
    store: &Arc<dyn ObjectStore>,
    db: &PgPool,
    account: Uuid,
    content_type: &str,
    limit: u64,
    mut body: S,
) -> Result<FileInfo, AppError>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let id = Uuid::now_v7();
    let path = object_path(id);
    let mut writer = WriteMultipart::new(
        store
            .put_multipart(&path)
            .await
            .map_err(|e| anyhow::anyhow!("starting upload {path}: {e}"))?,
    );
    let mut hash = Sha256::new();
    let mut size: u64 = 0;
    let refusal = loop {
        let Some(chunk) = body.next().await else {
            break None;
        };
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                break Some(AppError::field(
                    "body",
                    format!("the upload broke off: {e}"),
                ))
            }
        };
        size += chunk.len() as u64;
        if size > limit {
            break Some(AppError::PayloadTooLarge {
                limit: limit as usize,
            });
        }
        hash.update(&chunk);
        writer.put(chunk);
        if let Err(e) = writer.wait_for_capacity(4).await {
            break Some(AppError::Internal(anyhow::anyhow!("writing {path}: {e}")));
        }
    };
    let refusal = refusal.or((size == 0).then(|| AppError::field("body", "the file is empty")));
    if let Some(refusal) = refusal {
        let _ = writer.abort().await;
        return Err(refusal);
    }
    writer
        .finish()
        .await
        .map_err(|e| anyhow::anyhow!("completing upload {path}: {e}"))?;
    let stored = sqlx::query_as(
        "INSERT INTO files (id, account_id, size, sha256, content_type) VALUES ($1, $2, $3, $4, $5)
         RETURNING id, size, sha256, content_type, created_at",
    )
    .bind(id)
    .bind(account)
    .bind(size as i64)
    .bind(hex::encode(hash.finalize()))
    .bind(content_type)
    .fetch_one(db)
    .await;
    match stored {
        Ok(info) => Ok(info),
        Err(e) => {
            let _ = store.delete(&path).await;
            Err(e.into())
        }
    }
}

/// One of the caller's files; another account's file is "not found".
pub async fn get(db: &PgPool, account: Uuid, id: Uuid) -> Result<FileInfo, AppError> {
    sqlx::query_as(
        "SELECT id, size, sha256, content_type, created_at FROM files
         WHERE id = $1 AND account_id = $2",
    )
    .bind(id)
    .bind(account)
    .fetch_optional(db)
    .await?
    .ok_or(AppError::NotFound("file"))
}

/// A `Range: bytes=...` header resolved against a file's size: the inclusive byte range, or
/// `None` for "not satisfiable". Only single ranges are served.
pub fn parse_range(header: &str, size: u64) -> Option<(u64, u64)> {
    let spec = header.trim().strip_prefix("bytes=")?;
    if spec.contains(',') || size == 0 {
        return None;
    }
    let (start, end) = spec.split_once('-')?;
    let (start, end) = match (start.trim(), end.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().ok()?;
            (size.checked_sub(n.min(size))?, size - 1)
        }
        (start, "") => (start.parse().ok()?, size - 1),
        (start, end) => (start.parse().ok()?, end.parse::<u64>().ok()?.min(size - 1)),
    };
    (start <= end && start < size).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges_resolve_against_the_size() {
        assert_eq!(parse_range("bytes=0-99", 1000), Some((0, 99)));
        assert_eq!(parse_range("bytes=900-", 1000), Some((900, 999)));
        assert_eq!(parse_range("bytes=-100", 1000), Some((900, 999)));
        assert_eq!(parse_range("bytes=990-2000", 1000), Some((990, 999)));
        assert_eq!(parse_range("bytes=-5000", 1000), Some((0, 999)));
        assert_eq!(parse_range("bytes=1000-", 1000), None);
        assert_eq!(parse_range("bytes=5-1", 1000), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), None);
        assert_eq!(parse_range("items=0-1", 1000), None);
        assert_eq!(parse_range("bytes=x-1", 1000), None);
    }
}
