//! An [`AppError`] as an HTTP response: its RFC 9457 problem document, with the headers its
//! kind calls for (`Content-Range`, `Retry-After`, `WWW-Authenticate`).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::error::AppError;

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let err = self.settled();
        if let AppError::Internal(e) = &err {
            tracing::error!(error = ?e, "request failed");
        }
        let problem = err.problem();
        let mut response = (
            StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            axum::Json(&problem),
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
        if problem.status == 401 {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
