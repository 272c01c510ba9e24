//! `/v1/account` and `/v1/auth/token`: balances, ledger entries, and browser tokens.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::extract::{JsonBodyOrDefault, Query};
use crate::error::{AppError, AppResult, Problem};
use crate::http::auth::{Caller, Scope};
use crate::http::state::AppState;
use crate::ledger::{self, LedgerEntry};

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Account {
    pub id: Uuid,
    /// Spendable micro-credits.
    pub available: i64,
    /// Micro-credits escrowed for unfinished jobs.
    pub held: i64,
}

/// Your balances.
#[utoipa::path(
    get, path = "/v1/account", tag = "account",
    responses((status = 200, body = Account), (status = 401, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = []))
)]
pub async fn account(State(state): State<AppState>, caller: Caller) -> AppResult<Json<Account>> {
    caller.require(Scope::AccountRead)?;
    let b = ledger::balances(&state.db, caller.account_id).await?;
    Ok(Json(Account {
        id: caller.account_id,
        available: b.available,
        held: b.held,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LedgerParams {
    /// `next_cursor` from the previous page.
    cursor: Option<i64>,
    /// Page size, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LedgerPage {
    pub entries: Vec<LedgerEntry>,
    pub next_cursor: Option<i64>,
}

/// Your ledger entries, newest first.
#[utoipa::path(
    get, path = "/v1/account/ledger", tag = "account",
    params(LedgerParams),
    responses((status = 200, body = LedgerPage), (status = 422, body = Problem, content_type = "application/problem+json")),
    security(("bearer" = []))
)]
pub async fn ledger_entries(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<LedgerParams>,
) -> AppResult<Json<LedgerPage>> {
    caller.require(Scope::AccountRead)?;
    let limit = super::page_limit(params.limit, 50, 200)?;
    let mut entries =
        ledger::entries(&state.db, caller.account_id, params.cursor, limit + 1).await?;
    let next_cursor = super::next_cursor(&mut entries, limit, |e| e.id);
    Ok(Json(LedgerPage {
        entries,
        next_cursor,
    }))
}

#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Scopes to grant, among the API key's own (default: all the key's scopes).
    #[serde(default)]
    #[schema(min_items = 1)]
    pub scopes: Option<Vec<Scope>>,
    /// Lifetime in seconds, 60 up to the server's maximum (`XPAND_TOKEN_TTL_SECS`: 900 unless
    /// the operator set it, at most an hour; default: the maximum).
    #[serde(default)]
    #[schema(minimum = 60, maximum = 900)]
    pub ttl_seconds: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    /// An EdDSA JWT; send it as `Authorization: Bearer` or as `?token=` on the WebSocket.
    pub token: String,
    pub token_type: String,
    pub expires_in: u64,
    pub scopes: Vec<Scope>,
}

/// Exchange an API key for a short-lived scoped token (for browsers and spreadsheet add-ins).
///
/// The token carries the key's id: it may do no more than the key may, and stops working when
/// the key is revoked (open streams using it are closed within about two seconds).
#[utoipa::path(
    post, path = "/v1/auth/token", tag = "auth",
    request_body(content = Option<TokenRequest>, description = "Optional; an empty body grants all scopes for the maximum lifetime"),
    responses(
        (status = 200, body = TokenResponse),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Tokens cannot mint tokens, and a key cannot grant a scope it lacks", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn token(
    State(state): State<AppState>,
    caller: Caller,
    JsonBodyOrDefault(req): JsonBodyOrDefault<TokenRequest>,
) -> AppResult<Json<TokenResponse>> {
    if !caller.via_api_key {
        return Err(AppError::Forbidden(
            "only an API key can mint tokens, not a token".into(),
        ));
    }
    let max = state.config.token_ttl.as_secs();
    let ttl = req.ttl_seconds.unwrap_or(max);
    if !(60..=max).contains(&ttl) {
        return Err(AppError::field(
            "ttl_seconds",
            format!("must be from 60 to {max}"),
        ));
    }
    let scopes = req.scopes.unwrap_or_else(|| caller.scopes.clone());
    if scopes.is_empty() {
        return Err(AppError::field("scopes", "must name at least one scope"));
    }
    if let Some(lacking) = scopes.iter().find(|s| !caller.scopes.contains(s)) {
        return Err(AppError::Forbidden(format!(
            "the API key lacks scope {}, so its tokens cannot have it",
            lacking.as_str()
        )));
    }
    let token = state.jwt.issue(
        caller.account_id,
        caller.key_id,
        &scopes,
        std::time::Duration::from_secs(ttl),
    )?;
    Ok(Json(TokenResponse {
        token,
        token_type: "Bearer".into(),
        expires_in: ttl,
        scopes,
    }))
}
