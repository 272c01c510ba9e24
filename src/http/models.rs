//! `/v1/models`: the model registry over HTTP. An upload is `multipart/form-data` with a
//! `manifest` part (JSON) and a `model` part (the ONNX bytes, read whole up to
//! `XPAND_MAX_MODEL_BYTES` to be checked); the checks themselves are `crate::registry`.

use axum::extract::multipart::{Multipart, MultipartError, MultipartRejection};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::extract::{parse_json, JsonBody, Path};
use crate::error::{AppError, AppResult, Problem};
use crate::http::auth::{Caller, Scope};
use crate::http::state::AppState;
use crate::registry::{self, Manifest, Model, ModelVersion};

/// Largest `manifest` part.
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024;

/// The parts of an upload, as a generated client sends them: only the document reads this type
/// (the handler reads the parts as they stream).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ModelUpload {
    /// The manifest, as JSON.
    manifest: Manifest,
    /// The ONNX file.
    #[schema(value_type = String, format = Binary)]
    model: Vec<u8>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// Your models and the published ones, by name.
    pub models: Vec<Model>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    /// Whether any account may see and run the model.
    pub published: bool,
}

/// Register a model version: an ONNX file and its manifest.
///
/// The graph is read (never run) and checked before anything is stored: no external data, no
/// custom operators, no opset newer than the workers load, and the manifest's inputs and
/// outputs must be the graph's. The same bytes again answer the existing version (200).
#[utoipa::path(
    post, path = "/v1/models", tag = "models", operation_id = "register_model",
    request_body(content = ModelUpload, content_type = "multipart/form-data"),
    responses(
        (status = 201, description = "A new version", body = ModelVersion),
        (status = 200, description = "These bytes were already this model's version", body = ModelVersion),
        (status = 403, description = "The account's storage quota would be exceeded", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The name belongs to another account", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Larger than XPAND_MAX_MODEL_BYTES", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A refused manifest or model; the field and the reason are named", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn register(
    State(state): State<AppState>,
    caller: Caller,
    multipart: Result<Multipart, MultipartRejection>,
) -> AppResult<(StatusCode, Json<ModelVersion>)> {
    caller.require(Scope::JobsWrite)?;
    let mut multipart = multipart.map_err(|_| {
        AppError::field(
            "Content-Type",
            "must be multipart/form-data with the parts `manifest` and `model`",
        )
    })?;
    let limit = state.config.max_model_bytes;
    let (mut manifest, mut model) = (None, None);
    // A body that is not well-formed multipart, or longer than the route takes.
    let broken = |e: MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            AppError::PayloadTooLarge {
                limit: limit as usize,
            }
        } else {
            AppError::field(
                "body",
                format!("is not well-formed multipart: {}", e.body_text()),
            )
        }
    };
    while let Some(mut field) = multipart.next_field().await.map_err(broken)? {
        let name = field.name().unwrap_or_default().to_string();
        let cap = match name.as_str() {
            "manifest" => MAX_MANIFEST_BYTES as u64,
            "model" => limit,
            other => {
                return Err(AppError::field(
                    other.chars().take(64).collect::<String>(),
                    "is not a part of an upload (`manifest` and `model` are)",
                ))
            }
        };
        let mut bytes = bytes::BytesMut::new();
        while let Some(chunk) = field.chunk().await.map_err(broken)? {
            if (bytes.len() + chunk.len()) as u64 > cap {
                return Err(if name == "model" {
                    AppError::PayloadTooLarge {
                        limit: limit as usize,
                    }
                } else {
                    AppError::field(
                        "manifest",
                        format!("must be at most {MAX_MANIFEST_BYTES} bytes"),
                    )
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        match name.as_str() {
            "manifest" => manifest = Some(bytes.freeze()),
            _ => model = Some(bytes.freeze()),
        }
    }
    let manifest = manifest.ok_or_else(|| AppError::field("manifest", "is missing"))?;
    let manifest: Manifest = parse_json(&manifest).map_err(|e| match e {
        AppError::Validation(errors) => AppError::Validation(
            errors
                .into_iter()
                .map(|mut e| {
                    e.field = format!("manifest.{}", e.field);
                    e
                })
                .collect(),
        ),
        AppError::MalformedJson(detail) => {
            AppError::field("manifest", format!("is not JSON: {detail}"))
        }
        other => other,
    })?;
    let model = model
        .filter(|m| !m.is_empty())
        .ok_or_else(|| AppError::field("model", "is missing"))?;
    let (version, created) = registry::register(
        &state.files,
        &state.db,
        caller.account_id,
        manifest,
        model,
        state.config.limits.storage_quota_bytes,
    )
    .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(version)))
}

/// Your models and the published ones.
#[utoipa::path(
    get, path = "/v1/models", tag = "models", operation_id = "list_models",
    responses((status = 200, body = ModelList)),
    security(("bearer" = []))
)]
pub async fn list(State(state): State<AppState>, caller: Caller) -> AppResult<Json<ModelList>> {
    caller.require(Scope::JobsRead)?;
    let models = registry::list(&state.db, caller.account_id).await?;
    Ok(Json(ModelList { models }))
}

/// One model with its versions, newest first.
#[utoipa::path(
    get, path = "/v1/models/{name}", tag = "models", operation_id = "get_model",
    params(("name" = String, Path, description = "Model name")),
    responses(
        (status = 200, body = Model),
        (status = 404, description = "No such model, or another account's private one", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> AppResult<Json<Model>> {
    caller.require(Scope::JobsRead)?;
    Ok(Json(
        registry::get(&state.db, caller.account_id, &name).await?,
    ))
}

/// Publish or withdraw one of your models.
#[utoipa::path(
    patch, path = "/v1/models/{name}", tag = "models", operation_id = "publish_model",
    params(("name" = String, Path, description = "Model name")),
    request_body = Publish,
    responses(
        (status = 200, body = Model),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn publish(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<Publish>,
) -> AppResult<Json<Model>> {
    caller.require(Scope::JobsWrite)?;
    let model = registry::publish(&state.db, caller.account_id, &name, body.published).await?;
    Ok(Json(model))
}

/// One version: `latest`, a sha256, or a prefix of at least 8 hex digits.
#[utoipa::path(
    get, path = "/v1/models/{name}/versions/{version}", tag = "models", operation_id = "get_model_version",
    params(
        ("name" = String, Path, description = "Model name"),
        ("version" = String, Path, description = "`latest`, a sha256, or a prefix of at least 8 hex digits"),
    ),
    responses(
        (status = 200, body = ModelVersion),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn version(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, version)): Path<(String, String)>,
) -> AppResult<Json<ModelVersion>> {
    caller.require(Scope::JobsRead)?;
    let version = registry::version(&state.db, caller.account_id, &name, &version).await?;
    Ok(Json(version))
}

/// Delete a version of one of your models; the last one takes the model and its name.
#[utoipa::path(
    delete, path = "/v1/models/{name}/versions/{version}", tag = "models", operation_id = "delete_model_version",
    params(
        ("name" = String, Path, description = "Model name"),
        ("version" = String, Path, description = "`latest`, a sha256, or a prefix of at least 8 hex digits"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "An unfinished job runs the model; the detail names it", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, version)): Path<(String, String)>,
) -> AppResult<StatusCode> {
    caller.require(Scope::JobsWrite)?;
    registry::delete_version(&state.files, &state.db, caller.account_id, &name, &version).await?;
    Ok(StatusCode::NO_CONTENT)
}
