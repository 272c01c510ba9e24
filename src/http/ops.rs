//! Operations endpoints: liveness, readiness, metrics, the API description and its docs page,
//! and the anonymize page.

use std::sync::LazyLock;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use serde::Serialize;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use crate::http::state::AppState;

/// Alive: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, description = "Alive", body = String)))]
pub async fn healthz() -> &'static str {
    "ok"
}

#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct Readiness {
    pub postgres: bool,
    pub redis: bool,
    pub broker: bool,
}

/// Ready: Postgres, Redis and the MQTT broker are reachable.
#[utoipa::path(
    get, path = "/readyz", tag = "ops",
    responses((status = 200, description = "Ready", body = Readiness), (status = 503, description = "A dependency is down", body = Readiness))
)]
pub async fn readyz(State(state): State<AppState>) -> Response {
    // Bounded like the Redis check: behind a silent partition a query waits, and so would the
    // probe that asks.
    let postgres = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        sqlx::query("SELECT 1").execute(&state.db),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    let mut conn = state.redis.clone();
    let redis = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        redis::cmd("PING").query_async::<String>(&mut conn),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    let broker = state.broker.is_connected();
    let status = if postgres && redis && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Readiness {
            postgres,
            redis,
            broker,
        }),
    )
        .into_response()
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    // Job counts come from Postgres so every replica reports the whole system.
    if let Ok(rows) =
        sqlx::query_as::<_, (String, i64)>("SELECT status, count(*) FROM jobs GROUP BY status")
            .fetch_all(&state.db)
            .await
    {
        state.metrics.jobs.reset();
        for (status, n) in rows {
            state.metrics.jobs.with_label_values(&[&status]).set(n);
        }
    }
    // Two index lookups: the newest entry and the end of the newest block.
    if let Ok(unsealed) = sqlx::query_scalar::<_, i64>(
        "SELECT COALESCE((SELECT max(id) FROM ledger_entries), 0)
              - COALESCE((SELECT max(last_entry_id) FROM ledger_blocks), 0)",
    )
    .fetch_one(&state.db)
    .await
    {
        state.metrics.ledger_unsealed_entries.set(unsealed.max(0));
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// This API's OpenAPI 3.1 description.
#[utoipa::path(get, path = "/openapi.json", tag = "ops", responses((status = 200, description = "The OpenAPI document", content_type = "application/json")))]
pub async fn openapi() -> Json<serde_json::Value> {
    Json(super::openapi::document())
}

/// A browsable reference rendered from `/openapi.json` by a self-contained page (no CDN).
pub async fn docs() -> Response {
    const HTML: &str = include_str!("docs.html");
    static POLICY: LazyLock<String> = LazyLock::new(|| page_policy(HTML));
    page(HTML, &POLICY)
}

/// The video anonymization page: pick a video, follow the job, play the result (a plain page
/// over the public API, with the caller's API key).
pub async fn anonymize_page() -> Response {
    const HTML: &str = include_str!("anonymize.html");
    static POLICY: LazyLock<String> = LazyLock::new(|| page_policy(HTML));
    page(HTML, &POLICY)
}

/// A page with its Content-Security-Policy, and refused to frames (clickjacking: the anonymize
/// page holds the caller's key) also for browsers that predate `frame-ancestors`.
fn page(html: &'static str, policy: &str) -> Response {
    (
        [
            (header::CONTENT_SECURITY_POLICY, policy),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        Html(html),
    )
        .into_response()
}

/// The Content-Security-Policy of a self-contained page: only its own inline scripts and styles
/// run (allowed by their sha256, so an injected one does not), it talks only to this origin, and
/// plays media it fetched (`blob:`). No other site may frame it.
fn page_policy(html: &str) -> String {
    let hashes = |tag: &str| -> String {
        let (open, close) = (format!("<{tag}"), format!("</{tag}>"));
        let mut hashes = String::new();
        let mut rest = html;
        while let Some(start) = rest.find(&open) {
            let after = &rest[start..];
            let (Some(body), Some(end)) = (after.find('>'), after.find(&close)) else {
                break;
            };
            let digest = Sha256::digest(&after[body + 1..end]);
            hashes.push_str(&format!(" 'sha256-{}'", B64.encode(digest)));
            rest = &after[end + close.len()..];
        }
        hashes
    };
    format!(
        "default-src 'self'; script-src{}; style-src{}; img-src 'self' data:; \
         media-src 'self' blob:; object-src 'none'; base-uri 'none'; form-action 'self'; \
         frame-ancestors 'none'",
        hashes("script"),
        hashes("style")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_policy_allows_exactly_its_own_inline_script_and_style() {
        let policy = page_policy("<style>b{}</style><p><script>go()</script><script>x</script>");
        let sha = |text: &str| format!("'sha256-{}'", B64.encode(Sha256::digest(text)));
        assert!(
            policy.contains(&format!("script-src {} {};", sha("go()"), sha("x"))),
            "{policy}"
        );
        assert!(
            policy.contains(&format!("style-src {};", sha("b{}"))),
            "{policy}"
        );
        assert!(policy.ends_with("frame-ancestors 'none'"), "{policy}");
    }
}
