//! `/v1/files`: streamed uploads and ranged downloads, owner only.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use object_store::{GetOptions, GetRange};
use uuid::Uuid;

use super::extract::Path;
use crate::error::{AppError, AppResult, Problem};
use crate::files::{self, FileInfo};
use crate::http::auth::{Caller, Scope};
use crate::http::state::AppState;

/// Upload a file (the raw body, streamed; size-limited; sha256 computed on the way).
#[utoipa::path(
    post, path = "/v1/files", tag = "files",
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The file's bytes; its Content-Type is kept"),
    responses(
        (status = 201, description = "Stored", body = FileInfo),
        (status = 403, description = "The account's storage quota (XPAND_STORAGE_QUOTA_BYTES) would be exceeded", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Larger than XPAND_MAX_UPLOAD_BYTES", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Empty or broken upload", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn upload(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> AppResult<(StatusCode, Json<FileInfo>)> {
    caller.require(Scope::JobsWrite)?;
    let limit = state.config.max_upload_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let limits = files::UploadLimits {
        max_bytes: limit,
        quota_bytes: state.config.limits.storage_quota_bytes,
    };
    if declared.is_some_and(|n| n > limit) {
        return Err(AppError::PayloadTooLarge {
            limit: limit as usize,
        });
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 255)
        .unwrap_or("application/octet-stream");
    let info = files::upload(
        &state.files,
        &state.db,
        caller.account_id,
        content_type,
        limits,
        declared,
        body.into_data_stream(),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(info)))
}

/// Delete one of your files (an upload or a job's output) now, before it expires. A file that
/// an unfinished job still reads (a video job's input) is kept until the job ends: 409.
#[utoipa::path(
    delete, path = "/v1/files/{id}", tag = "files", operation_id = "delete_file",
    params(("id" = Uuid, Path, description = "File id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "An unfinished job reads the file; the detail names it", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> AppResult<StatusCode> {
    caller.require(Scope::JobsWrite)?;
    files::delete(&state.files, &state.db, caller.account_id, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Download one of your files; `Range: bytes=...` (one range) gets a 206.
#[utoipa::path(
    get, path = "/v1/files/{id}", tag = "files",
    params(("id" = Uuid, Path, description = "File id"), ("Range" = Option<String>, Header, nullable = false, description = "bytes=start-end, bytes=start- or bytes=-suffix", pattern = r"^bytes=([0-9]+-[0-9]*|-[0-9]+)$")),
    responses(
        (status = 200, description = "The whole file", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "The requested range", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A `Range` outside the grammar", body = Problem, content_type = "application/problem+json"),
        (status = 416, description = "The range is not satisfiable", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn download(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
    headers: HeaderMap,
) -> AppResult<Response> {
    caller.require(Scope::JobsRead)?;
    let file = files::get(&state.db, caller.account_id, id).await?;
    let size = file.size as u64;
    let range = match headers.get(header::RANGE).map(|v| v.to_str().unwrap_or("")) {
        None => None,
        Some(spec) => Some(files::parse_range(spec, size)?),
    };
    let options = GetOptions {
        range: range.map(|(start, end)| GetRange::Bounded(start..end + 1)),
        ..Default::default()
    };
    let object = state
        .files
        .get_opts(&files::object_path(id), options)
        .await
        .map_err(|e| anyhow::anyhow!("reading file {id}: {e}"))?;
    let (status, length) = match range {
        Some((start, end)) => (StatusCode::PARTIAL_CONTENT, end - start + 1),
        None => (StatusCode::OK, size),
    };
    let (content_type, inline) = served_as(&file.content_type);
    let disposition = if inline { "inline" } else { "attachment" };
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(
            header::CONTENT_DISPOSITION,
            format!("{disposition}; filename=\"{id}\""),
        )
        .header(header::CONTENT_LENGTH, length)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{}\"", file.sha256));
    if let Some((start, end)) = range {
        response = response.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"));
    }
    Ok(response
        .body(Body::from_stream(object.into_stream()))
        .map_err(|e| anyhow::anyhow!("building the response: {e}"))?
        .into_response())
}

/// The media types a download is served as: what xpand takes and makes (videos, images,
/// tabular data). A file declared as anything else (HTML, SVG, XML, a list of types...) is
/// served as `application/octet-stream`, so an upload can never render as a page in the
/// gateway's origin.
const SERVED_TYPES: &[&str] = &[
    "video/mp4",
    "video/quicktime",
    "video/webm",
    "video/x-matroska",
    "video/x-msvideo",
    "video/mp2t",
    "image/png",
    "image/jpeg",
    "image/webp",
    "text/csv",
    "text/tab-separated-values",
    "text/plain",
    "application/json",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "application/octet-stream",
];

/// The type a file declared as `declared` is served with (its media type, parameters dropped,
/// when on [`SERVED_TYPES`] exactly), and whether it may show inline: videos and images do,
/// everything else downloads as an attachment.
fn served_as(declared: &str) -> (&'static str, bool) {
    let media_type = declared.split(';').next().unwrap_or_default().trim();
    match SERVED_TYPES
        .iter()
        .find(|t| t.eq_ignore_ascii_case(media_type))
    {
        Some(t) => (t, t.starts_with("video/") || t.starts_with("image/")),
        None => ("application/octet-stream", false),
    }
}
