//! `/v1/transfers/{assignment}/{input,output}`: where workers fetch a shard's input and upload
//! its output. Not for callers: a request needs a URL the gateway signed into an assignment
//! *and* the signature of the node that assignment went to (see [`crate::transfers`]).

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;
use xpand_protocol::transfer::{self, NODE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use xpand_protocol::ShardTask;

use super::extract::{Path, Query};
use crate::error::{AppError, AppResult, Problem};
use crate::files;
use crate::http::state::AppState;
use crate::registry;
use crate::transfers::{self, Direction};

/// How far a node's request timestamp may be from the gateway's clock.
const MAX_SKEW_MS: i64 = 60_000;

#[derive(Debug, Deserialize, IntoParams)]
pub struct TransferQuery {
    /// Expiry, Unix ms.
    exp: i64,
    /// The gateway's signature of the URL.
    sig: String,
}

/// What an upload stored.
#[derive(Debug, Serialize, ToSchema)]
pub struct Uploaded {
    pub size: u64,
    pub sha256: String,
}

/// The shard an authorised transfer is for: its job and index.
async fn authorise(
    state: &AppState,
    direction: Direction,
    assignment: Uuid,
    query: &TransferQuery,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> AppResult<(Uuid, i32)> {
    let now = xpand_protocol::now_ms();
    state
        .transfers
        .check(direction, assignment, query.exp, &query.sig, now)
        .map_err(|e| AppError::Forbidden(e.to_string()))?;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(node), Some(ts), Some(sig)) = (
        header(NODE_HEADER),
        header(TIMESTAMP_HEADER).and_then(|t| t.parse::<i64>().ok()),
        header(SIGNATURE_HEADER),
    ) else {
        return Err(AppError::Unauthorized(
            "a transfer must be signed by the node it was issued to (x-xpand-node, \
             x-xpand-timestamp, x-xpand-signature)",
        ));
    };
    if (now - ts).abs() > MAX_SKEW_MS {
        return Err(AppError::Forbidden(
            "the request's timestamp is too far from the gateway's clock".into(),
        ));
    }
    transfer::verify_request(node, method.as_str(), uri.path(), ts, sig)
        .map_err(|_| AppError::Forbidden("the node's request signature is not valid".into()))?;
    let shard: Option<(Uuid, i32)> = sqlx::query_as(
        "SELECT job_id, idx FROM shards
         WHERE assignment_id = $1 AND node_id = $2 AND status = 'assigned'",
    )
    .bind(assignment)
    .bind(node)
    .fetch_optional(&state.db)
    .await?;
    shard.ok_or_else(|| AppError::Forbidden("the assignment is not this node's current one".into()))
}

/// Download a shard's input (workers only).
#[utoipa::path(
    get, path = "/v1/transfers/{assignment}/input", tag = "workers",
    params(("assignment" = Uuid, Path, description = "Assignment id"), TransferQuery),
    responses(
        (status = 200, description = "The segment: Matroska bytes, served as plain bytes", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Expired or forged URL, bad node signature, or not the node's current assignment", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn input(
    State(state): State<AppState>,
    Path(assignment): Path<Uuid>,
    Query(query): Query<TransferQuery>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> AppResult<Response> {
    let (job, idx) = authorise(
        &state,
        Direction::Input,
        assignment,
        &query,
        &method,
        &uri,
        &headers,
    )
    .await?;
    serve(&state, transfers::input_path(job, idx)).await
}

/// Download the registry model a predict shard runs (workers only); the node checks its hash.
#[utoipa::path(
    get, path = "/v1/transfers/{assignment}/model", tag = "workers", operation_id = "model",
    params(("assignment" = Uuid, Path, description = "Assignment id"), TransferQuery),
    responses(
        (status = 200, description = "The model's ONNX bytes", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Expired or forged URL, bad node signature, not the node's current assignment, or one that runs no registry model", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "The model version is gone", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn model(
    State(state): State<AppState>,
    Path(assignment): Path<Uuid>,
    Query(query): Query<TransferQuery>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> AppResult<Response> {
    let (job, idx) = authorise(
        &state,
        Direction::Model,
        assignment,
        &query,
        &method,
        &uri,
        &headers,
    )
    .await?;
    let task: Option<sqlx::types::Json<ShardTask>> = sqlx::query_scalar(
        "SELECT task FROM shards WHERE job_id = $1 AND idx = $2 AND assignment_id = $3",
    )
    .bind(job)
    .bind(idx)
    .bind(assignment)
    .fetch_optional(&state.db)
    .await?;
    let Some(sqlx::types::Json(ShardTask::Predict(task))) = task else {
        return Err(AppError::Forbidden(
            "the assignment runs no registry model".into(),
        ));
    };
    serve(&state, registry::object_path(&task.model, &task.sha256)).await
}

/// Streams an object as bytes.
async fn serve(state: &AppState, path: object_store::path::Path) -> AppResult<Response> {
    let object = match state.files.get(&path).await {
        Ok(object) => object,
        Err(object_store::Error::NotFound { .. }) => return Err(AppError::NotFound("object")),
        Err(e) => return Err(anyhow::anyhow!("reading {path}: {e}").into()),
    };
    let size = object.meta.size;
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, size)
        .body(Body::from_stream(object.into_stream()))
        .map_err(|e| anyhow::anyhow!("building the response: {e}"))?
        .into_response())
}

/// Upload a shard's output (workers only).
#[utoipa::path(
    put, path = "/v1/transfers/{assignment}/output", tag = "workers",
    params(("assignment" = Uuid, Path, description = "Assignment id"), TransferQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The anonymized segment: MP4 bytes"),
    responses(
        (status = 201, description = "Stored", body = Uploaded),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Expired or forged URL, bad node signature, or not the node's current assignment", body = Problem, content_type = "application/problem+json"),
        (status = 413, body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn output(
    State(state): State<AppState>,
    Path(assignment): Path<Uuid>,
    Query(query): Query<TransferQuery>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> AppResult<(StatusCode, Json<Uploaded>)> {
    let (job, idx) = authorise(
        &state,
        Direction::Output,
        assignment,
        &query,
        &method,
        &uri,
        &headers,
    )
    .await?;
    let path = transfers::output_path(job, idx, assignment);
    let stored = files::store_stream(
        &state.files,
        &path,
        state.config.max_upload_bytes,
        body.into_data_stream(),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(Uploaded {
            size: stored.size,
            sha256: stored.sha256,
        }),
    ))
}
