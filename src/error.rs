//! One error type for every request path, rendered as RFC 9457 `application/problem+json`.
//!
//! Each variant has a stable `type` URI (clients switch on it), a status, and a human `detail`.
//! Validation errors name the offending field (or spreadsheet cell). Anything unexpected becomes
//! a 500 whose detail is logged, never shown. The domain returns these; `http::problem` turns
//! them into responses.

use serde::Serialize;
use utoipa::ToSchema;

/// An RFC 9457 problem document.
#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema, PartialEq)]
pub struct Problem {
    /// Stable identifier of the problem kind, e.g. `https://xpand.dev/problems/insufficient-funds`.
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// For validation problems: each offending field, e.g. `input.series[3][5]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// The quote, for payment problems.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quote: Option<i64>,
    /// The available balance, for `insufficient-funds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available: Option<i64>,
    /// Seconds to wait before retrying, for `rate-limited` (also the `Retry-After` header of a
    /// response; a WebSocket `error` frame has only this).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

/// One invalid field. For spreadsheet input `row` and `column` locate the cell (0-based).
#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema, PartialEq)]
pub struct FieldError {
    /// JSON path of the field, e.g. `params.horizon` or `input.series[3][5]`.
    pub field: String,
    pub detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
}

impl FieldError {
    pub fn new(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            detail: detail.into(),
            row: None,
            column: None,
        }
    }

    pub fn cell(row: usize, column: usize, detail: impl Into<String>) -> Self {
        Self {
            field: format!("input.series[{row}][{column}]"),
            detail: detail.into(),
            row: Some(row),
            column: Some(column),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    #[error("missing or invalid credentials")]
    Unauthorized(&'static str),
    /// The whole detail: what the caller lacks or why the request is refused.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("this route does not accept that method")]
    MethodNotAllowed,
    #[error("the requested range is not satisfiable (the file has {size} bytes)")]
    RangeNotSatisfiable { size: u64 },
    #[error("the Idempotency-Key was already used for a different request")]
    IdempotencyMismatch,
    #[error("insufficient funds")]
    InsufficientFunds { quote: i64, available: i64 },
    #[error("max_fee is below the quote")]
    MaxFeeBelowQuote { quote: i64, max_fee: i64 },
    #[error("a dependency is unavailable: {0}")]
    Unavailable(String),
    #[error("the request headers are larger than {limit} bytes or {count} fields")]
    HeadersTooLarge { limit: usize, count: usize },
    #[error("the request took longer than {0} seconds; retry it (with the same Idempotency-Key for a submit)")]
    Timeout(u64),
    #[error(
        "more than {limit} requests per second with this credential; retry after {retry_after} s"
    )]
    RateLimited { limit: u32, retry_after: u64 },
    #[error("this account already has {limit} open streams (WebSockets and event streams), the most allowed; close one first")]
    TooManyStreams { limit: u32 },
    #[error("{0}")]
    QuotaExceeded(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<sqlx::Error> for AppError {
    fn from(e: sqlx::Error) -> Self {
        if database_unreachable(&e) {
            AppError::Unavailable("database".into())
        } else {
            AppError::Internal(anyhow::Error::new(e))
        }
    }
}

/// Whether `e` means Postgres cannot be reached right now (as opposed to a bad query).
fn database_unreachable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed
    )
}

impl AppError {
    /// An internal error whose cause is an unreachable database becomes a 503, however deep in
    /// the call chain it was wrapped: the client should retry, nothing was half-written.
    pub fn settled(self) -> Self {
        match self {
            AppError::Internal(e)
                if e.chain().any(|cause| {
                    cause
                        .downcast_ref::<sqlx::Error>()
                        .is_some_and(database_unreachable)
                }) =>
            {
                AppError::Unavailable("database".into())
            }
            other => other,
        }
    }
}

impl AppError {
    pub fn field(field: impl Into<String>, detail: impl Into<String>) -> Self {
        AppError::Validation(vec![FieldError::new(field, detail)])
    }

    pub fn problem(&self) -> Problem {
        let (status, slug, title) = match self {
            AppError::MalformedJson(_) => (400, "malformed-json", "Malformed JSON"),
            AppError::PayloadTooLarge { .. } => (413, "payload-too-large", "Payload too large"),
            AppError::Validation(_) => (422, "validation", "Invalid request"),
            AppError::Unauthorized(_) => (401, "unauthorized", "Unauthorized"),
            AppError::Forbidden(_) => (403, "forbidden", "Forbidden"),
            AppError::NotFound(_) => (404, "not-found", "Not found"),
            AppError::Conflict(_) => (409, "conflict", "Conflict"),
            AppError::MethodNotAllowed => (405, "method-not-allowed", "Method not allowed"),
            AppError::RangeNotSatisfiable { .. } => {
                (416, "range-not-satisfiable", "Range not satisfiable")
            }
            AppError::IdempotencyMismatch => {
                (422, "idempotency-key-reused", "Idempotency key reused")
            }
            AppError::InsufficientFunds { .. } => (402, "insufficient-funds", "Insufficient funds"),
            AppError::MaxFeeBelowQuote { .. } => {
                (402, "max-fee-below-quote", "max_fee below quote")
            }
            AppError::Unavailable(_) => (503, "unavailable", "Service unavailable"),
            AppError::HeadersTooLarge { .. } => {
                (431, "headers-too-large", "Request header fields too large")
            }
            AppError::Timeout(_) => (503, "timeout", "Request timed out"),
            AppError::RateLimited { .. } => (429, "rate-limited", "Too many requests"),
            AppError::TooManyStreams { .. } => (429, "too-many-streams", "Too many open streams"),
            AppError::QuotaExceeded(_) => (403, "quota-exceeded", "Quota exceeded"),
            AppError::Internal(_) => (500, "internal", "Internal error"),
        };
        let detail = match self {
            AppError::Validation(errors) => errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.detail))
                .collect::<Vec<_>>()
                .join("; "),
            AppError::Unauthorized(why) => format!("missing or invalid credentials: {why}"),
            AppError::InsufficientFunds { quote, available } => {
                format!("the job costs {quote} micro-credits but only {available} are available")
            }
            AppError::MaxFeeBelowQuote { quote, max_fee } => {
                format!("the job is quoted at {quote} micro-credits, above max_fee {max_fee}")
            }
            AppError::Internal(_) => "an internal error occurred; it has been logged".into(),
            other => other.to_string(),
        };
        let (quote, available) = match self {
            AppError::InsufficientFunds { quote, available } => (Some(*quote), Some(*available)),
            AppError::MaxFeeBelowQuote { quote, .. } => (Some(*quote), None),
            _ => (None, None),
        };
        Problem {
            type_uri: problem_type(slug),
            title: title.into(),
            status,
            detail,
            errors: match self {
                AppError::Validation(errors) => errors.clone(),
                _ => Vec::new(),
            },
            quote,
            available,
            retry_after: match self {
                AppError::RateLimited { retry_after, .. } => Some(*retry_after),
                _ => None,
            },
        }
    }
}

pub fn problem_type(slug: &str) -> String {
    format!("https://xpand.dev/problems/{slug}")
}

pub type AppResult<T> = Result<T, AppError>;
