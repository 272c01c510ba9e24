//! Extractors whose rejections are problem documents: a malformed body, a wrong type or a bad
//! path never reaches the client as axum's plain-text error.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use serde::de::DeserializeOwned;

use crate::error::{AppError, FieldError};
use crate::state::AppState;

/// A JSON body, size-limited by `XPAND_MAX_BODY_BYTES`. Syntax errors are 400
/// `malformed-json`; type errors are 422 naming the field's path (e.g. `max_fee`).
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, AppError> {
        let bytes = read_json_body(req, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Like [`JsonBody`], but an empty body stands for `T::default()`.
pub struct JsonBodyOrDefault<T>(pub T);

impl<T: DeserializeOwned + Default> FromRequest<AppState> for JsonBodyOrDefault<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, AppError> {
        let bytes = read_json_body(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonBodyOrDefault(T::default()));
        }
        parse_json(&bytes).map(JsonBodyOrDefault)
    }
}

/// Reads a body of at most `XPAND_MAX_BODY_BYTES` whose declared type, if any, is JSON.
async fn read_json_body(req: Request, state: &AppState) -> Result<axum::body::Bytes, AppError> {
    let limit = state.config.max_body_bytes;
    if let Some(ct) = req.headers().get(axum::http::header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or_default();
        if !ct.starts_with("application/json") && !ct.contains("+json") {
            return Err(AppError::field("Content-Type", "must be application/json"));
        }
    }
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| AppError::PayloadTooLarge { limit })
}

/// Parses JSON the way [`JsonBody`] does (the WebSocket uses it for frames).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AppError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let inner = e.inner();
        if inner.is_syntax() || inner.is_eof() {
            AppError::MalformedJson(inner.to_string())
        } else {
            let path = e.path().to_string();
            let field = if path == "." {
                "body".to_string()
            } else {
                path
            };
            AppError::Validation(vec![FieldError::new(field, inner.to_string())])
        }
    })
}

/// `axum::extract::Path` with a problem rejection.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(AppError))]
pub struct Path<T>(pub T);

impl From<PathRejection> for AppError {
    fn from(e: PathRejection) -> Self {
        AppError::field("path", e.body_text())
    }
}

/// `axum::extract::Query` with a problem rejection.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(AppError))]
pub struct Query<T>(pub T);

impl From<QueryRejection> for AppError {
    fn from(e: QueryRejection) -> Self {
        AppError::field("query", e.body_text())
    }
}
