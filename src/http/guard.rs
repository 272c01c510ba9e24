//! Request guards every route passes through: bounded headers (a 431 problem document), a
//! per-credential rate limit shared by all replicas through Redis (a 429 with `Retry-After`;
//! WebSocket ops count against it too, see `ws.rs`), and a request timeout for everything but
//! streams, file transfers and submits.

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::error::AppError;
use crate::http::state::AppState;

/// Largest accepted header section, in bytes, and number of header fields.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
pub const MAX_HEADER_FIELDS: usize = 100;

pub async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Err(refusal) = check_headers(req.headers()) {
        return refusal.into_response();
    }
    let subject = crate::http::auth::request_credential(req.headers(), req.uri())
        .map(|c| rate_subject(&state, &c));
    if let Some(subject) = subject {
        if let Err(refusal) = rate_limit(&state, &subject).await {
            return refusal.into_response();
        }
    }
    if exempt_from_timeout(&req) {
        return next.run(req).await;
    }
    let limit = state.config.limits.request_timeout;
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => AppError::Timeout(limit.as_secs()).into_response(),
    }
}

fn check_headers(headers: &axum::http::HeaderMap) -> Result<(), AppError> {
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if bytes > MAX_HEADER_BYTES || headers.len() > MAX_HEADER_FIELDS {
        return Err(AppError::HeadersTooLarge {
            limit: MAX_HEADER_BYTES,
            count: MAX_HEADER_FIELDS,
        });
    }
    Ok(())
}

/// Not timed: uploads and worker transfers, which stream large bodies inside the handler, and
/// submits, whose video planning (probe and cut, each under its own ffmpeg time limit) must not
/// be dropped halfway with segments staged. Streams (SSE, WebSocket) answer at once.
fn exempt_from_timeout(req: &Request) -> bool {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("", MatchedPath::as_str);
    matches!(
        (req.method(), route),
        (&Method::POST, "/v1/files" | "/v1/jobs")
            | (&Method::PUT, "/v1/transfers/{assignment}/output")
    )
}

/// Whom a request (or a WebSocket op) counts against: the account of a token (so minting
/// tokens buys no extra rate), else the credential itself (an API key, or something invalid
/// that is refused later anyway).
pub fn rate_subject(state: &AppState, credential: &str) -> String {
    match state.jwt.subject(credential) {
        Some(account) => format!("account:{account}"),
        None => format!(
            "key:{}",
            hex::encode(&Sha256::digest(credential.as_bytes())[..12])
        ),
    }
}

/// A one-second window per subject, counting one request or WebSocket op. Redis being down
/// lets requests through: the limit protects the service, and failing closed would make a
/// Redis outage an API outage.
pub async fn rate_limit(state: &AppState, subject: &str) -> Result<(), AppError> {
    let limit = state.config.limits.requests_per_sec;
    let second = chrono::Utc::now().timestamp();
    let key = format!("{}:rate:{subject}:{second}", state.config.redis_prefix);
    let mut conn = state.redis.clone();
    let counted: redis::RedisResult<(i64,)> = redis::pipe()
        .atomic()
        .incr(&key, 1)
        .expire(&key, 2)
        .ignore()
        .query_async(&mut conn)
        .await;
    match counted {
        Ok((n,)) if n > i64::from(limit) => Err(AppError::RateLimited {
            limit,
            retry_after: 1,
        }),
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!(error = %e, "rate limiting is off while Redis is unreachable");
            Ok(())
        }
    }
}
