//! Operations endpoints: liveness, readiness, metrics, the API description and its docs page.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

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
    let postgres = sqlx::query("SELECT 1").execute(&state.db).await.is_ok();
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
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// This API's OpenAPI 3.1 description.
#[utoipa::path(get, path = "/openapi.json", tag = "ops", responses((status = 200, description = "The OpenAPI document", content_type = "application/json")))]
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(super::openapi::ApiDoc::openapi())
}

/// A browsable reference rendered from `/openapi.json` by a self-contained page (no CDN).
pub async fn docs() -> Html<&'static str> {
    Html(include_str!("docs.html"))
}

/// The video anonymization page: pick a video, follow the job, play the result (a plain page
/// over the public API, with the caller's API key).
pub async fn anonymize_page() -> Html<&'static str> {
    Html(include_str!("anonymize.html"))
}
