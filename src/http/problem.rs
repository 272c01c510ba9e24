//! An [`AppError`] as an HTTP response: its RFC 9457 problem document, with the headers its
//! kind calls for (`Content-Range`, `Retry-After`, `WWW-Authenticate`).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::error::{AppError, Problem};

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        respond(self, |problem| {
            serde_json::to_value(problem).expect("problems serialize")
        })
    }
}

/// `err` as its response, its problem document written by `document` (a protocol that wants
/// members of its own, as the Open Inference Protocol's `error`, adds them there); the status,
/// the headers and the log line of a server error are the same for every caller.
pub fn respond(err: AppError, document: impl FnOnce(Problem) -> serde_json::Value) -> Response {
    let err = err.settled();
    if let AppError::Internal(e) = &err {
        tracing::error!(error = ?e, "request failed");
    }
    let problem = err.problem();
    let status = problem.status;
    let mut response = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(document(problem)),
    )
        .into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if let AppError::RangeNotSatisfiable { size } = err {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
            response.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    if let AppError::RateLimited { retry_after, .. } = err {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    }
    if status == 401 {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}
