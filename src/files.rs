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

/// Opens the configured object store: `XPAND_FILES_URL` when set (S3 and the other stores
/// `object_store` speaks, options from the environment), else the local directory.
pub fn open_store(config: &crate::config::Config) -> anyhow::Result<Arc<dyn ObjectStore>> {
    let Some(url) = &config.files_url else {
        return local_store(&config.files_dir);
    };
    let parsed =
        url::Url::parse(url).map_err(|e| anyhow::anyhow!("XPAND_FILES_URL {url:?}: {e}"))?;
    let options = std::env::vars()
        .filter(|(k, _)| k.starts_with("AWS_"))
        .map(|(k, v)| (k.to_ascii_lowercase(), v));
    let (store, prefix) = object_store::parse_url_opts(&parsed, options)
        .map_err(|e| anyhow::anyhow!("opening object store {url}: {e}"))?;
    Ok(Arc::new(object_store::prefix::PrefixStore::new(
        store, prefix,
    )))
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

/// What [`store_stream`] stored.
pub struct Stored {
    pub size: u64,
    pub sha256: String,
}

/// Streams `body` into `path`, refusing more than `limit` bytes while it streams and empty
/// bodies. Nothing is left at `path` when it fails.
pub async fn store_stream<S, E>(
    store: &Arc<dyn ObjectStore>,
    path: &ObjectPath,
    limit: u64,
    mut body: S,
) -> Result<Stored, AppError>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut writer = WriteMultipart::new(
        store
            .put_multipart(path)
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
    Ok(Stored {
        size,
        sha256: hex::encode(hash.finalize()),
    })
}

/// Streams a local file into `path` (see [`store_stream`]).
pub async fn store_local_file(
    store: &Arc<dyn ObjectStore>,
    path: &ObjectPath,
    file: &std::path::Path,
) -> anyhow::Result<Stored> {
    let opened = tokio::fs::File::open(file)
        .await
        .map_err(|e| anyhow::anyhow!("opening {}: {e}", file.display()))?;
    store_stream(
        store,
        path,
        u64::MAX,
        tokio_util::io::ReaderStream::new(opened),
    )
    .await
    .map_err(|e| anyhow::anyhow!("storing {}: {e:?}", file.display()))
}

/// Copies the object at `path` into a local file, returning its size and sha256.
pub async fn fetch_to_file(
    store: &Arc<dyn ObjectStore>,
    path: &ObjectPath,
    file: &std::path::Path,
) -> anyhow::Result<Stored> {
    use tokio::io::AsyncWriteExt;
    let mut stream = store
        .get(path)
        .await
        .map_err(|e| anyhow::anyhow!("reading {path}: {e}"))?
        .into_stream();
    let mut out = tokio::fs::File::create(file)
        .await
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", file.display()))?;
    let mut hash = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| anyhow::anyhow!("reading {path}: {e}"))?;
        hash.update(&chunk);
        size += chunk.len() as u64;
        out.write_all(&chunk).await?;
    }
    out.flush().await?;
    Ok(Stored {
        size,
        sha256: hex::encode(hash.finalize()),
    })
}

/// How much an upload may store: the per-file limit and the account's storage quota.
#[derive(Debug, Clone, Copy)]
pub struct UploadLimits {
    pub max_bytes: u64,
    pub quota_bytes: i64,
}

/// Bytes the account stores now: its files and its models' versions.
pub async fn used_bytes<'c, E: sqlx::PgExecutor<'c>>(db: E, account: Uuid) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT (coalesce((SELECT sum(size) FROM files WHERE account_id = $1), 0)
               + coalesce((SELECT sum(size) FROM model_versions WHERE account_id = $1), 0))::bigint",
    )
    .bind(account)
    .fetch_one(db)
    .await
}

fn over_quota(quota: i64) -> AppError {
    AppError::QuotaExceeded(format!(
        "the account's files and models would exceed its storage quota of {quota} bytes; \
         delete some (DELETE /v1/files/{{id}}, DELETE /v1/models/{{name}}/versions/{{v}}) or \
         wait for files to expire"
    ))
}

/// Makes room for `size` more bytes of `account` within `quota`, in `tx`: the account row
/// lock makes the check and the caller's insert one step against concurrent uploads.
pub async fn reserve(
    tx: &mut sqlx::PgConnection,
    account: Uuid,
    size: i64,
    quota: i64,
) -> Result<(), AppError> {
    sqlx::query("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE")
        .bind(account)
        .execute(&mut *tx)
        .await?;
    if used_bytes(&mut *tx, account).await? + size > quota {
        return Err(over_quota(quota));
    }
    Ok(())
}

/// Streams `body` into storage as a new file of `account` (see [`store_stream`]), within the
/// per-file limit and the account's quota. A refused or broken upload leaves no object and no
/// row behind.
pub async fn upload<S, E>(
    store: &Arc<dyn ObjectStore>,
    db: &PgPool,
    account: Uuid,
    content_type: &str,
    limits: UploadLimits,
    declared: Option<u64>,
    body: S,
) -> Result<FileInfo, AppError>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let room = u64::try_from(limits.quota_bytes - used_bytes(db, account).await?).unwrap_or(0);
    if declared.is_some_and(|n| n > room) || room == 0 {
        return Err(over_quota(limits.quota_bytes));
    }
    let id = Uuid::now_v7();
    let path = object_path(id);
    let stored = match store_stream(store, &path, limits.max_bytes.min(room), body).await {
        Err(AppError::PayloadTooLarge { .. }) if room < limits.max_bytes => {
            return Err(over_quota(limits.quota_bytes))
        }
        other => other?,
    };
    let row = insert_within_quota(db, id, account, &stored, content_type, limits.quota_bytes).await;
    if row.is_err() {
        let _ = store.delete(&path).await;
    }
    row
}

/// Inserts the row unless concurrent uploads filled the quota meanwhile (the account row lock
/// makes the check and the insert one step).
async fn insert_within_quota(
    db: &PgPool,
    id: Uuid,
    account: Uuid,
    stored: &Stored,
    content_type: &str,
    quota: i64,
) -> Result<FileInfo, AppError> {
    let mut tx = db.begin().await?;
    reserve(&mut tx, account, stored.size as i64, quota).await?;
    let info = insert(&mut *tx, id, account, stored, content_type).await?;
    tx.commit().await?;
    Ok(info)
}

/// Deletes one of the caller's files: its row, then its bytes. A file an unfinished job still
/// reads is refused with a conflict naming the job: its nodes' work would be wasted otherwise.
pub async fn delete(
    store: &Arc<dyn ObjectStore>,
    db: &PgPool,
    account: Uuid,
    id: Uuid,
) -> Result<(), AppError> {
    let mut tx = db.begin().await?;
    // Locked first (waiting out a submit that holds it), then the jobs are read in a new
    // statement, which sees every job committed by then.
    let owned: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM files WHERE id = $1 AND account_id = $2 FOR UPDATE")
            .bind(id)
            .bind(account)
            .fetch_optional(&mut *tx)
            .await?;
    if owned.is_none() {
        return Err(AppError::NotFound("file"));
    }
    if let Some(job) = reader(&mut tx, id).await? {
        return Err(AppError::Conflict(format!(
            "job {job} still reads this file; delete it once the job has ended (or cancel the job)"
        )));
    }
    sqlx::query("DELETE FROM files WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    remove_object(store, id).await;
    Ok(())
}

/// An unfinished job that reads file `id`, if any.
async fn reader(conn: &mut sqlx::PgConnection, id: Uuid) -> sqlx::Result<Option<Uuid>> {
    sqlx::query_scalar(
        "SELECT id FROM jobs WHERE input_files @> ARRAY[$1] AND status IN ('queued', 'running')
         LIMIT 1",
    )
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// Holds the files a job being submitted will read, in the submit's transaction: each must
/// still be the caller's, and none can be deleted until the transaction ends (and then the job
/// it inserted protects them).
pub async fn hold_for_job(
    conn: &mut sqlx::PgConnection,
    account: Uuid,
    ids: &[Uuid],
) -> Result<(), AppError> {
    if ids.is_empty() {
        return Ok(());
    }
    let held: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM files WHERE id = ANY($1) AND account_id = $2 FOR SHARE")
            .bind(ids)
            .bind(account)
            .fetch_all(conn)
            .await?;
    if held.len() < ids.len() {
        return Err(AppError::Conflict(
            "an input file was deleted while the job was being submitted".into(),
        ));
    }
    Ok(())
}

/// Removes a file's bytes; a failure only leaves an orphan object, which is logged.
pub async fn remove_object(store: &Arc<dyn ObjectStore>, id: Uuid) {
    match store.delete(&object_path(id)).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => tracing::warn!(file = %id, error = %e, "deleting a file's bytes failed"),
    }
}

/// Deletes objects staged for a job (best effort: a failure only leaves an orphan, logged).
pub async fn delete_all(store: &dyn ObjectStore, paths: &[ObjectPath]) {
    for path in paths {
        if let Err(e) = store.delete(path).await {
            tracing::warn!(%path, error = %e, "could not delete a staged object");
        }
    }
}

/// Records a stored object as a file of `account`.
pub async fn insert<'c, E: sqlx::PgExecutor<'c>>(
    db: E,
    id: Uuid,
    account: Uuid,
    stored: &Stored,
    content_type: &str,
) -> sqlx::Result<FileInfo> {
    sqlx::query_as(
        "INSERT INTO files (id, account_id, size, sha256, content_type) VALUES ($1, $2, $3, $4, $5)
         RETURNING id, size, sha256, content_type, created_at",
    )
    .bind(id)
    .bind(account)
    .bind(stored.size as i64)
    .bind(&stored.sha256)
    .bind(content_type)
    .fetch_one(db)
    .await
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

/// A `Range: bytes=...` header resolved against a file's size: the inclusive byte range. A
/// header outside the document's grammar (one range of digits: no spaces, signs, lists or other
/// units) is refused by name; a well-formed range that misses the file is "not satisfiable".
pub fn parse_range(header: &str, size: u64) -> Result<(u64, u64), AppError> {
    let malformed = || {
        AppError::field(
            "Range",
            "must be bytes=START-END, bytes=START- or bytes=-SUFFIX (one range of digits)",
        )
    };
    let (start, end) = header
        .strip_prefix("bytes=")
        .and_then(|spec| spec.split_once('-'))
        .ok_or_else(malformed)?;
    let number = |s: &str| -> Result<Option<u64>, AppError> {
        if s.is_empty() {
            return Ok(None);
        }
        if !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed());
        }
        // Past u64 is past any file: not satisfiable as a start, the end of the file as an end.
        Ok(Some(s.parse().unwrap_or(u64::MAX)))
    };
    let unsatisfiable = AppError::RangeNotSatisfiable { size };
    let range = match (number(start)?, number(end)?) {
        (None, None) => return Err(malformed()),
        _ if size == 0 => return Err(unsatisfiable),
        (None, Some(suffix)) => (size - suffix.min(size), size - 1),
        (Some(start), None) => (start, size - 1),
        (Some(start), Some(end)) => (start, end.min(size - 1)),
    };
    if range.0 <= range.1 && range.0 < size {
        Ok(range)
    } else {
        Err(unsatisfiable)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_range;
    use crate::error::AppError;

    #[test]
    fn ranges_resolve_against_the_size() {
        let range = |h: &str, size| parse_range(h, size).ok();
        assert_eq!(range("bytes=0-99", 1000), Some((0, 99)));
        assert_eq!(range("bytes=900-", 1000), Some((900, 999)));
        assert_eq!(range("bytes=-100", 1000), Some((900, 999)));
        assert_eq!(range("bytes=990-2000", 1000), Some((990, 999)));
        assert_eq!(range("bytes=-5000", 1000), Some((0, 999)));
        assert_eq!(
            range("bytes=0-99999999999999999999999", 1000),
            Some((0, 999))
        );
    }

    #[test]
    fn a_range_past_the_file_is_unsatisfiable_and_a_malformed_one_is_refused_by_name() {
        let unsatisfiable = ["bytes=1000-", "bytes=5-1", "bytes=-0", "bytes=0-0"];
        for (header, size) in unsatisfiable.iter().zip([1000, 1000, 1000, 0]) {
            assert!(
                matches!(
                    parse_range(header, size),
                    Err(AppError::RangeNotSatisfiable { .. })
                ),
                "{header}"
            );
        }
        for header in [
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=x-1",
            "bytes= 0-1",
            "bytes=+5-",
            "bytes=-",
            "{}",
            "null",
            "",
        ] {
            match parse_range(header, 1000) {
                Err(AppError::Validation(errors)) => assert_eq!(errors[0].field, "Range"),
                other => panic!("{header}: {other:?}"),
            }
        }
    }
}
