//! HTTP and WebSocket handlers. Handlers are thin: they authenticate, parse, call into
//! `jobs` / `ledger` / `nodes`, and render; every error is an [`crate::error::AppError`].

pub mod account;
pub mod auth;
pub mod credentials;
pub mod extract;
pub mod files;
pub mod guard;
pub mod inference;
pub mod jobs;
pub mod keys;
pub mod ledger;
pub mod models;
pub mod nodes;
pub mod openapi;
pub mod ops;
pub mod problem;
pub mod serve;
pub mod state;
pub mod streams;
pub mod transfers;
pub mod webhooks;
pub mod ws;

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post, put};
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;

use crate::error::AppError;
use crate::http::state::AppState;

pub fn router(state: AppState) -> Router {
    let cors = cross_origin(&state.config.cors_origins);
    let routes = Router::new()
        .route("/v1/jobs", post(jobs::submit).get(jobs::list))
        .route("/v1/jobs/{id}", get(jobs::get))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/events", get(jobs::events))
        .route("/v1/jobs/{id}/deliveries", get(webhooks::deliveries))
        .route("/v1/webhooks", get(webhooks::list).post(webhooks::register))
        .route("/v1/webhooks/{id}", delete(webhooks::delete))
        .route("/v1/ws", get(ws::upgrade))
        .route(
            "/v1/models",
            get(models::list)
                .post(models::register)
                .layer(DefaultBodyLimit::max(
                    state.config.max_model_bytes as usize + models::MAX_MANIFEST_BYTES + 64 * 1024,
                )),
        )
        .route("/v1/models/{name}", get(models::get).patch(models::publish))
        .route(
            "/v1/models/{name}/versions/{version}",
            get(models::version).delete(models::delete),
        )
        .route("/v1/files", post(files::upload))
        .route("/v1/files/{id}", get(files::download).delete(files::delete))
        .route("/v1/transfers/{assignment}/input", get(transfers::input))
        .route("/v1/transfers/{assignment}/model", get(transfers::model))
        .route("/v1/transfers/{assignment}/output", put(transfers::output))
        .route("/v1/auth/token", post(account::token))
        .route("/v1/account", get(account::account))
        .route("/v1/account/ledger", get(account::ledger_entries))
        .route("/v1/account/keys", get(keys::list).post(keys::create))
        .route("/v1/account/keys/{id}", delete(keys::revoke))
        .route(
            "/v1/jobs/{id}/settlement-proof",
            get(ledger::settlement_proof),
        )
        .route("/v1/ledger/public-key", get(ledger::public_key))
        .route("/v1/epochs/{n}", get(ledger::epoch))
        .route("/v1/ledger/blocks", get(ledger::list_blocks))
        .route("/v1/ledger/blocks/{height}", get(ledger::get_block))
        .route(
            "/v1/ledger/blocks/{height}/leaves",
            get(ledger::block_leaves),
        )
        .route("/v1/ledger/audit", get(ledger::audit))
        .route("/v1/nodes/{id}/records", get(ledger::node_records))
        .route(
            "/v1/ledger/blocks/{height}/entries",
            get(ledger::block_entries),
        )
        .route(
            "/v1/ledger/blocks/{height}/records",
            get(ledger::block_records),
        )
        .route("/v1/ledger/entries/{id}/proof", get(ledger::entry_proof))
        .route("/v1/nodes", get(nodes::list))
        .route("/v1/nodes/{id}", get(nodes::get))
        .route("/v2", get(inference::server))
        .route("/v2/health/live", get(inference::live))
        .route("/v2/health/ready", get(inference::ready))
        .route("/v2/models/{name}/ready", get(inference::model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(inference::model_version_ready),
        )
        .route("/v2/models/{name}", get(inference::model))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(inference::model_version),
        )
        .route("/v2/models/{name}/infer", post(inference::infer))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(inference::infer_version),
        )
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .route("/docs", get(ops::docs))
        .route("/anonymize", get(ops::anonymize_page))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), guard::guard))
        .layer(middleware::from_fn_with_state(state.clone(), track));
    // Outside the guard: a preflight carries no credential and is answered here, and a refusal
    // (401, 429) reaches the page that asked, readable.
    let routes = match cors {
        Some(cors) => routes.layer(cors),
        None => routes,
    };
    routes.layer(TraceLayer::new_for_http()).with_state(state)
}

/// What lets a page on an allowed origin call the API from a browser (an add-in's task pane,
/// say): its preflights are answered and its responses readable. Closed when no origin is
/// configured. Credentials are bearer headers, never cookies, so no origin is told it may send
/// cookies, and an origin not listed gets no CORS header at all: the browser keeps the response
/// from it.
fn cross_origin(origins: &[String]) -> Option<CorsLayer> {
    use axum::http::{header, HeaderName, HeaderValue, Method};
    if origins.is_empty() {
        return None;
    }
    let origins: Vec<HeaderValue> = origins
        .iter()
        .map(|o| HeaderValue::from_str(o).expect("origins are validated with the configuration"))
        .collect();
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::RANGE,
                HeaderName::from_static("idempotency-key"),
                HeaderName::from_static("prefer"),
            ])
            .expose_headers([
                header::RETRY_AFTER,
                header::LOCATION,
                header::CONTENT_RANGE,
                header::CONTENT_DISPOSITION,
                HeaderName::from_static("preference-applied"),
            ])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// Validates a page size: `limit` (or `default`) must be from 1 to `max`.
fn page_limit(limit: Option<i64>, default: i64, max: i64) -> Result<i64, AppError> {
    let limit = limit.unwrap_or(default);
    if (1..=max).contains(&limit) {
        Ok(limit)
    } else {
        Err(AppError::field("limit", format!("must be from 1 to {max}")))
    }
}

/// Pages are fetched one item long to learn whether another page follows: cuts `items` back to
/// `limit` and returns the cursor of the last item kept when it did.
fn next_cursor<T, C>(items: &mut Vec<T>, limit: i64, cursor: impl Fn(&T) -> C) -> Option<C> {
    if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(cursor)
    } else {
        None
    }
}

async fn not_found() -> AppError {
    AppError::NotFound("route")
}

async fn method_not_allowed() -> AppError {
    AppError::MethodNotAllowed
}

/// Counts requests and their latency by matched route (not raw path: ids would explode the
/// label set), and tells browsers never to sniff a type other than the declared one.
async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    // Bounded labels: a client can send any method, and each new one would be a new series.
    let method = match req.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    };
    let started = Instant::now();
    let mut response = next.run(req).await;
    response.headers_mut().insert(
        axum::http::header::X_CONTENT_TYPE_OPTIONS,
        axum::http::HeaderValue::from_static("nosniff"),
    );
    state
        .metrics
        .http_requests
        .with_label_values(&[method, &route, response.status().as_str()])
        .inc();
    state
        .metrics
        .http_duration
        .with_label_values(&[method, &route])
        .observe(started.elapsed().as_secs_f64());
    response
}
