//! The Open Inference Protocol (KServe v2, as Triton serves it) over the registry, so that its
//! existing clients work with a URL and a token: health, model metadata, and `infer`, which
//! submits a `predict` job, waits for it as `Prefer: wait` does, and answers in the protocol's
//! shape. Money moves as for any job. Errors are problem documents that also carry the
//! protocol's `error` member, which its clients read; field names are the request body's own
//! (`inputs[0].data[5]`).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::extract::{JsonBody, Path};
use super::jobs::{submit_job, wait_for_end, MAX_WAIT};
use crate::error::AppError;
use crate::http::auth::{Caller, Scope};
use crate::http::state::AppState;
use crate::jobs::{JobStatus, SubmitJob};
use crate::kinds::predict;
use crate::registry::{self, ModelVersion};

/// An error in the protocol's shape: the problem document plus `error`.
pub struct ProtocolError(AppError);

impl From<AppError> for ProtocolError {
    fn from(e: AppError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ProtocolError {
    fn into_response(self) -> Response {
        crate::http::problem::respond(self.0, |mut problem| {
            for e in &mut problem.errors {
                if let Some(field) = e.field.strip_prefix("input.") {
                    e.field = field.to_string();
                }
            }
            let error = match problem.errors.first() {
                Some(first) => format!("{}: {}", first.field, first.detail),
                None => problem.detail.clone(),
            };
            let mut body = serde_json::to_value(problem).expect("problems serialize");
            body["error"] = json!(error);
            body
        })
    }
}

type ProtocolResult<T> = Result<T, ProtocolError>;

/// A model's metadata, as the protocol gives it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelMetadata {
    pub name: String,
    /// Its versions' sha256s, newest first.
    pub versions: Vec<String>,
    pub platform: &'static str,
    pub inputs: Vec<crate::registry::TensorSpec>,
    pub outputs: Vec<crate::registry::TensorSpec>,
}

/// The server's metadata: its name, version and protocol extensions (none).
#[utoipa::path(
    get, path = "/v2", tag = "inference", operation_id = "inference_server",
    responses((status = 200, description = "`name`, `version`, `extensions`", body = Object)),
)]
pub async fn server() -> Json<Value> {
    Json(json!({ "name": "xpand", "version": env!("CARGO_PKG_VERSION"), "extensions": [] }))
}

/// Live: the gateway answers.
#[utoipa::path(
    get, path = "/v2/health/live", tag = "inference", operation_id = "inference_live",
    responses((status = 200, description = "Live")),
)]
pub async fn live() -> Json<Value> {
    Json(json!({ "live": true }))
}

/// Ready: the gateway takes inference requests (liveness and readiness of its services are
/// `/healthz` and `/readyz`).
#[utoipa::path(
    get, path = "/v2/health/ready", tag = "inference", operation_id = "inference_ready",
    responses((status = 200, description = "Ready")),
)]
pub async fn ready() -> Json<Value> {
    Json(json!({ "ready": true }))
}

/// Whether the model (its latest version) may be run: it exists and the caller may run it.
#[utoipa::path(
    get, path = "/v2/models/{name}/ready", tag = "inference", operation_id = "inference_model_ready",
    params(("name" = String, Path, description = "Model name")),
    responses(
        (status = 200, description = "Ready"),
        (status = 404, body = crate::error::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn model_ready(
    State(state): State<AppState>,
    caller: Result<Caller, AppError>,
    Path(name): Path<String>,
) -> ProtocolResult<Json<Value>> {
    let caller = caller?;
    caller.require(Scope::JobsRead)?;
    registry::version(&state.db, caller.account_id, &name, "latest").await?;
    Ok(Json(json!({ "name": name, "ready": true })))
}

/// Whether one version of the model may be run.
#[utoipa::path(
    get, path = "/v2/models/{name}/versions/{version}/ready", tag = "inference", operation_id = "inference_model_version_ready",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "A sha256, a prefix of at least 8 hex digits, or `latest`")),
    responses(
        (status = 200, description = "Ready"),
        (status = 404, body = crate::error::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn model_version_ready(
    State(state): State<AppState>,
    caller: Result<Caller, AppError>,
    Path((name, version)): Path<(String, String)>,
) -> ProtocolResult<Json<Value>> {
    let caller = caller?;
    caller.require(Scope::JobsRead)?;
    registry::version(&state.db, caller.account_id, &name, &version).await?;
    Ok(Json(json!({ "name": name, "ready": true })))
}

/// A model's metadata (its latest version).
#[utoipa::path(
    get, path = "/v2/models/{name}", tag = "inference", operation_id = "inference_model",
    params(("name" = String, Path, description = "Model name")),
    responses(
        (status = 200, body = ModelMetadata),
        (status = 404, body = crate::error::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn model(
    State(state): State<AppState>,
    caller: Result<Caller, AppError>,
    Path(name): Path<String>,
) -> ProtocolResult<Json<ModelMetadata>> {
    metadata(&state, caller?, &name, "latest").await
}

/// One version's metadata.
#[utoipa::path(
    get, path = "/v2/models/{name}/versions/{version}", tag = "inference", operation_id = "inference_model_version",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "A sha256, a prefix of at least 8 hex digits, or `latest`")),
    responses(
        (status = 200, body = ModelMetadata),
        (status = 404, body = crate::error::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn model_version(
    State(state): State<AppState>,
    caller: Result<Caller, AppError>,
    Path((name, version)): Path<(String, String)>,
) -> ProtocolResult<Json<ModelMetadata>> {
    metadata(&state, caller?, &name, &version).await
}

async fn metadata(
    state: &AppState,
    caller: Caller,
    name: &str,
    version: &str,
) -> ProtocolResult<Json<ModelMetadata>> {
    caller.require(Scope::JobsRead)?;
    let model = registry::get(&state.db, caller.account_id, name).await?;
    let chosen: ModelVersion =
        registry::version(&state.db, caller.account_id, name, version).await?;
    let manifest = chosen.manifest.0;
    Ok(Json(ModelMetadata {
        name: model.name,
        versions: model.versions.into_iter().map(|v| v.sha256).collect(),
        platform: "onnxruntime_onnx",
        inputs: manifest.inputs,
        outputs: manifest.outputs,
    }))
}

/// Run the model (its latest version) on the request's rows: a `predict` job, waited for.
#[utoipa::path(
    post, path = "/v2/models/{name}/infer", tag = "inference", operation_id = "infer",
    params(("name" = String, Path, description = "Model name")),
    request_body(content = Object, description = "The protocol's inference request: `inputs` (each `name`, `shape`, `datatype`, `data`), optional `id` and `outputs`"),
    responses(
        (status = 200, description = "The protocol's inference response: `model_name`, `model_version`, `id`, `outputs`", body = Object),
        (status = 402, body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 404, body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 422, body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "The job did not end in 60 s (it goes on: `GET /v1/jobs/{id}`), or failed", body = crate::error::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn infer(
    State(state): State<AppState>,
    caller: Result<Caller, AppError>,
    Path(name): Path<String>,
    body: Result<JsonBody<Value>, AppError>,
) -> ProtocolResult<Json<Value>> {
    run(&state, caller?, name, "latest".into(), body?.0).await
}

/// Run one version of the model on the request's rows.
#[utoipa::path(
    post, path = "/v2/models/{name}/versions/{version}/infer", tag = "inference", operation_id = "infer_version",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "A sha256, a prefix of at least 8 hex digits, or `latest`")),
    request_body(content = Object, description = "The protocol's inference request"),
    responses(
        (status = 200, description = "The protocol's inference response", body = Object),
        (status = 402, body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 404, body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 422, body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "The job did not end in 60 s (it goes on: `GET /v1/jobs/{id}`), or failed", body = crate::error::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn infer_version(
    State(state): State<AppState>,
    caller: Result<Caller, AppError>,
    Path((name, version)): Path<(String, String)>,
    body: Result<JsonBody<Value>, AppError>,
) -> ProtocolResult<Json<Value>> {
    run(&state, caller?, name, version, body?.0).await
}

async fn run(
    state: &AppState,
    caller: Caller,
    name: String,
    version: String,
    mut input: Value,
) -> ProtocolResult<Json<Value>> {
    caller.require(Scope::JobsWrite)?;
    // `JsonBody` has taken only an object (within `XPAND_MAX_BODY_BYTES`, typed as JSON).
    let Some(object) = input.as_object_mut() else {
        return Err(AppError::field("body", "must be a JSON object").into());
    };
    let id = object.get("id").cloned();
    // Resolved once: the job and the answer name the same version.
    let version = registry::version(&state.db, caller.account_id, &name, &version)
        .await?
        .sha256;
    object.insert("model".into(), json!(name));
    object.insert("version".into(), json!(version));
    let request = SubmitJob {
        kind: predict::KIND.into(),
        input,
        params: json!({}),
        // The model's price is the price: the protocol has no field to bound it.
        max_fee: i64::MAX,
        webhook: None,
        deadline: None,
    };
    let feed = state.events.subscribe();
    let (_, job) = submit_job(state, &caller, &request, None).await?;
    let job = if job.status.is_terminal() {
        job
    } else {
        wait_for_end(state, caller.account_id, job, feed, MAX_WAIT).await
    };
    match (job.status, job.output) {
        (JobStatus::Succeeded, Some(mut output)) => {
            output["model_name"] = json!(name);
            output["model_version"] = json!(version);
            if let Some(id) = id {
                output["id"] = id;
            }
            Ok(Json(output))
        }
        (status, _) if status.is_terminal() => {
            let why = job
                .error
                .map(|e| e.message)
                .unwrap_or_else(|| format!("the job {status:?}"));
            Err(AppError::Unavailable(format!("job {} did not succeed: {why}", job.id)).into())
        }
        _ => Err(AppError::Timeout(MAX_WAIT.as_secs()).into()),
    }
}
