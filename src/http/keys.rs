//! `/v1/account/keys`: an owner's API keys, listed, created (scoped, shown once) and revoked.
//!
//! Listing needs `account:read`. Creating and revoking need an API key with `account:read`, not
//! a token: a token is short-lived and lives in browsers, and a key made with it would outlive
//! it. A key can grant a new key no scope it lacks itself. A revoked key stops working on every
//! replica within about a second, and so do the tokens minted from it and the streams opened
//! with either.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::extract::{JsonBody, Path};
use crate::accounts::{self, ApiKey};
use crate::error::{AppError, AppResult, Problem};
use crate::http::auth::{Caller, Scope};
use crate::http::state::AppState;

/// Longest key name, in characters.
const MAX_NAME_CHARS: usize = 64;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyList {
    /// Oldest first, revoked keys included. Never the secrets.
    pub keys: Vec<ApiKey>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// What the key is for, 1 to 64 characters, no control characters (required; missing, it
    /// is refused naming `name`).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 64)]
    pub name: String,
    /// Scopes the key may use, among the creating key's own (default: all of them).
    #[serde(default)]
    #[schema(min_items = 1)]
    pub scopes: Option<Vec<Scope>>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedKey {
    /// The secret, `xp_` and 64 hex: shown this once, only its hash is kept.
    pub key: String,
    #[serde(flatten)]
    pub api_key: ApiKey,
}

/// Only an API key holding `account:read` manages keys.
fn may_manage_keys(caller: &Caller) -> Result<(), AppError> {
    if !caller.via_api_key {
        return Err(AppError::Forbidden(
            "only an API key can create or revoke keys, not a token".into(),
        ));
    }
    caller.require(Scope::AccountRead)
}

/// Your API keys.
#[utoipa::path(
    get, path = "/v1/account/keys", tag = "account", operation_id = "list_keys",
    responses(
        (status = 200, body = KeyList),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The credential lacks account:read", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn list(State(state): State<AppState>, caller: Caller) -> AppResult<Json<KeyList>> {
    caller.require(Scope::AccountRead)?;
    Ok(Json(KeyList {
        keys: accounts::list_keys(&state.db, caller.account_id).await?,
    }))
}

/// Create an API key.
///
/// The response carries the secret once. At most 100 unrevoked keys per account.
#[utoipa::path(
    post, path = "/v1/account/keys", tag = "account", operation_id = "create_key",
    request_body = CreateKey,
    responses(
        (status = 201, body = CreatedKey),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an API key with account:read, a scope the key lacks, or the account's keys are all taken", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A bad name or scope", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<CreateKey>,
) -> AppResult<(StatusCode, Json<CreatedKey>)> {
    may_manage_keys(&caller)?;
    let name = req.name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
        return Err(AppError::field(
            "name",
            format!("must be 1 to {MAX_NAME_CHARS} characters"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(AppError::field(
            "name",
            "must not contain control characters",
        ));
    }
    let mut scopes = req.scopes.unwrap_or_else(|| caller.scopes.clone());
    if scopes.is_empty() {
        return Err(AppError::field("scopes", "must name at least one scope"));
    }
    if let Some(lacking) = scopes.iter().find(|s| !caller.scopes.contains(s)) {
        return Err(AppError::Forbidden(format!(
            "this API key lacks scope {}, so it cannot grant it",
            lacking.as_str()
        )));
    }
    scopes.sort_by_key(|s| Scope::ALL.iter().position(|x| x == s));
    scopes.dedup();
    let (api_key, key) = accounts::create_key(&state.db, caller.account_id, name, &scopes).await?;
    Ok((StatusCode::CREATED, Json(CreatedKey { key, api_key })))
}

/// Revoke an API key.
///
/// Takes effect on every replica within about a second: requests with the key or a token
/// minted from it get 401, and WebSockets and event streams opened with either are closed
/// (WebSocket close code 4403; an event stream ends with an `error` event). Revoking a revoked
/// key changes nothing. Another account's key is not found.
#[utoipa::path(
    delete, path = "/v1/account/keys/{id}", tag = "account", operation_id = "revoke_key",
    params(("id" = Uuid, Path, description = "Key id")),
    responses(
        (status = 200, description = "The key, revoked", body = ApiKey),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an API key with account:read", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<Uuid>,
) -> AppResult<Json<ApiKey>> {
    may_manage_keys(&caller)?;
    let key = accounts::revoke_key(&state.db, caller.account_id, id)
        .await?
        .ok_or(AppError::NotFound("api key"))?;
    state.credentials.forget(id);
    Ok(Json(key))
}
