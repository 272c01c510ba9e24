//! `/v1/webhooks`: an account's webhook endpoints (a URL, the job events it wants, its own
//! signing secret shown once), and `/v1/jobs/{id}/deliveries`: what was sent to a job's webhook,
//! attempt by attempt. Delivery itself is `crate::webhooks`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::extract::{JsonBody, Path};
use crate::error::{AppError, AppResult, Problem};
use crate::http::auth::{Caller, Scope};
use crate::http::state::AppState;
use crate::webhooks::endpoints::{self, Delivery, Endpoint};

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterEndpoint {
    /// The http(s) URL to POST to; a public address (as for a job's `webhook`).
    pub url: String,
    /// Default: `["completed"]`.
    #[serde(default)]
    pub events: Option<Vec<EventName>>,
}

/// An event a webhook endpoint may choose.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventName {
    /// The job got its first node.
    Start,
    /// A shard finished.
    Progress,
    /// A shard's rows.
    Partial,
    /// The job ended: succeeded, failed or canceled.
    Completed,
}

impl EventName {
    fn as_str(self) -> &'static str {
        match self {
            EventName::Start => "start",
            EventName::Progress => "progress",
            EventName::Partial => "partial",
            EventName::Completed => "completed",
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RegisteredEndpoint {
    /// The endpoint's signing secret (`whsec_...`, Standard Webhooks): shown this once.
    pub secret: String,
    #[serde(flatten)]
    pub endpoint: Endpoint,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EndpointList {
    /// Oldest first. Never the secrets.
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeliveryList {
    /// Oldest first, each with its attempts.
    pub deliveries: Vec<Delivery>,
}

/// Register a webhook endpoint.
///
/// A job whose `webhook` is this URL is told of the events chosen here, each message signed
/// with the endpoint's secret (`webhook-signature: v1,...`). Any other URL gets `completed`
/// alone, signed with the gateway's key (`v1a,...`).
#[utoipa::path(
    post, path = "/v1/webhooks", tag = "webhooks", operation_id = "register_webhook",
    request_body = RegisterEndpoint,
    responses(
        (status = 201, body = RegisteredEndpoint),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The credential lacks jobs:write", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The URL is registered already, or the account has 32 endpoints", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A bad URL or event, named", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn register(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<RegisterEndpoint>,
) -> AppResult<(StatusCode, Json<RegisteredEndpoint>)> {
    caller.require(Scope::JobsWrite)?;
    let (endpoint, secret) = endpoints::register(
        &state.db,
        &state.scheduler.egress,
        caller.account_id,
        &req.url,
        req.events
            .map(|events| events.iter().map(|e| e.as_str().to_string()).collect()),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(RegisteredEndpoint { secret, endpoint }),
    ))
}

/// Your webhook endpoints.
#[utoipa::path(
    get, path = "/v1/webhooks", tag = "webhooks", operation_id = "list_webhooks",
    responses(
        (status = 200, body = EndpointList),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The credential lacks jobs:read", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn list(State(state): State<AppState>, caller: Caller) -> AppResult<Json<EndpointList>> {
    caller.require(Scope::JobsRead)?;
    Ok(Json(EndpointList {
        endpoints: endpoints::list(&state.db, caller.account_id).await?,
    }))
}

/// Delete a webhook endpoint.
///
/// Messages already queued for it are still delivered, signed with the gateway's key.
#[utoipa::path(
    delete, path = "/v1/webhooks/{id}", tag = "webhooks", operation_id = "delete_webhook",
    params(("id" = Uuid, Path, description = "Endpoint id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The credential lacks jobs:write", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> AppResult<StatusCode> {
    caller.require(Scope::JobsWrite)?;
    endpoints::delete(&state.db, caller.account_id, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// What was sent to a job's webhook.
///
/// Each message (`webhook-id`) with its event and every attempt: when, the receiver's status
/// or the error, how long it took.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/deliveries", tag = "webhooks", operation_id = "list_deliveries",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 200, body = DeliveryList),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The credential lacks jobs:read", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn deliveries(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> AppResult<Json<DeliveryList>> {
    caller.require(Scope::JobsRead)?;
    let deliveries = endpoints::deliveries(&state.db, caller.account_id, id)
        .await?
        .ok_or(AppError::NotFound("job"))?;
    Ok(Json(DeliveryList { deliveries }))
}
