//! Who is calling. Backends send an API key (`Authorization: Bearer xp_...`); browsers and
//! add-ins exchange it for a short-lived, scoped EdDSA JWT signed with the gateway key.
//! Two more credentials read the ledger: the operator's auditor key (everything), and a node's
//! signed request (`Authorization: XpandNode ...`, its own records only).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::AppError;
use crate::http::state::AppState;
use crate::{accounts, accounts::API_KEY_PREFIX};

/// What a credential may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum Scope {
    #[serde(rename = "jobs:read")]
    JobsRead,
    #[serde(rename = "jobs:write")]
    JobsWrite,
    #[serde(rename = "account:read")]
    AccountRead,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::JobsRead, Scope::JobsWrite, Scope::AccountRead];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::JobsRead => "jobs:read",
            Scope::JobsWrite => "jobs:write",
            Scope::AccountRead => "account:read",
        }
    }
}

/// An authenticated caller: an account and what this credential may do with it.
#[derive(Debug, Clone)]
pub struct Caller {
    pub account_id: Uuid,
    pub scopes: Vec<Scope>,
    /// True for an API key, false for a token; only API keys may mint tokens.
    pub via_api_key: bool,
    /// When a token stops being valid (Unix seconds); `None` for an API key.
    pub expires_at: Option<u64>,
}

impl Caller {
    pub fn require(&self, scope: Scope) -> Result<(), AppError> {
        if self.scopes.contains(&scope) {
            Ok(())
        } else {
            Err(AppError::Forbidden(format!(
                "the credential lacks scope {}",
                scope.as_str()
            )))
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: Uuid,
    scope: String,
    iat: u64,
    exp: u64,
    iss: String,
}

const ISSUER: &str = "xpand";

/// The gateway's JWT keys, derived from its ed25519 signing key.
#[derive(Clone)]
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl JwtKeys {
    pub fn new(key: &xpand_protocol::NodeKey) -> anyhow::Result<Self> {
        let der = key
            .signing_key()
            .to_pkcs8_der()
            .map_err(|e| anyhow::anyhow!("encoding the gateway key as PKCS#8: {e}"))?;
        let x = URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes());
        Ok(Self {
            encoding: EncodingKey::from_ed_der(der.as_bytes()),
            decoding: DecodingKey::from_ed_components(&x)?,
        })
    }

    /// Issues a token for `account` with `scopes`, valid for `ttl`.
    pub fn issue(
        &self,
        account: Uuid,
        scopes: &[Scope],
        ttl: std::time::Duration,
    ) -> anyhow::Result<String> {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: account,
            scope: scopes
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" "),
            iat: now,
            exp: now + ttl.as_secs(),
            iss: ISSUER.into(),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::EdDSA),
            &claims,
            &self.encoding,
        )?)
    }

    /// The account a valid token speaks for (`None` for anything else, API keys included).
    pub fn subject(&self, token: &str) -> Option<Uuid> {
        self.verify(token).ok().map(|c| c.account_id)
    }

    fn verify(&self, token: &str) -> Result<Caller, AppError> {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[ISSUER]);
        validation.leeway = 5;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map_err(|_| AppError::Unauthorized("the token is invalid or expired"))?;
        let scopes = data
            .claims
            .scope
            .split_whitespace()
            .filter_map(|s| Scope::ALL.into_iter().find(|x| x.as_str() == s))
            .collect();
        Ok(Caller {
            account_id: data.claims.sub,
            scopes,
            via_api_key: false,
            expires_at: Some(data.claims.exp),
        })
    }
}

/// Authenticates a bearer credential: an API key (all scopes) or a JWT (its scopes).
pub async fn authenticate(state: &AppState, credential: &str) -> Result<Caller, AppError> {
    if credential.starts_with(API_KEY_PREFIX) {
        let account = accounts::account_for_key(&state.db, credential)
            .await?
            .ok_or(AppError::Unauthorized("unknown or revoked API key"))?;
        return Ok(Caller {
            account_id: account,
            scopes: Scope::ALL.to_vec(),
            via_api_key: true,
            expires_at: None,
        });
    }
    state.jwt.verify(credential)
}

/// The caller of a request that may carry its credential in the URL (`?token=`), for clients
/// that cannot set headers: a browser's `EventSource`, a WebSocket. The URL may only carry a
/// short-lived token: URLs end up in logs and browser history, so an API key there is refused.
pub async fn authenticate_header_or_query(
    state: &AppState,
    parts: &Parts,
    token: Option<&str>,
) -> Result<Caller, AppError> {
    if let Some(credential) = bearer(parts) {
        return authenticate(state, credential).await;
    }
    let token = token.ok_or(AppError::Unauthorized(
        "send Authorization: Bearer, or ?token=<token from POST /v1/auth/token>",
    ))?;
    if token.starts_with(API_KEY_PREFIX) {
        return Err(AppError::Unauthorized(
            "an API key must not travel in a URL; exchange it for a token (POST /v1/auth/token)",
        ));
    }
    state.jwt.verify(token)
}

/// The bearer credential in the `Authorization` header, if any.
pub fn bearer(parts: &Parts) -> Option<&str> {
    bearer_header(&parts.headers)
}

pub fn bearer_header(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let credential = bearer(parts).ok_or(AppError::Unauthorized(
            "send Authorization: Bearer <api key or token>",
        ))?;
        authenticate(state, credential).await
    }
}

/// The auditor: the operator's credential (`XPAND_AUDITOR_KEY_FILE`) that may read every sealed
/// entry and record and every balance.
pub struct Auditor;

fn is_auditor(state: &AppState, credential: &str) -> bool {
    use sha2::{Digest, Sha256};
    // Comparing digests keeps the comparison's timing independent of the secret.
    Sha256::digest(credential.as_bytes()) == Sha256::digest(state.config.auditor_key.as_bytes())
}

impl FromRequestParts<AppState> for Auditor {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        match bearer(parts) {
            Some(credential) if is_auditor(state, credential) => Ok(Auditor),
            Some(_) => Err(AppError::Forbidden("this needs the auditor key".into())),
            None => Err(AppError::Unauthorized(
                "send Authorization: Bearer <auditor key>",
            )),
        }
    }
}

/// Whoever may read one ledger entry: its owner's account, or the auditor.
pub enum LedgerReader {
    Account(Caller),
    Auditor,
}

impl LedgerReader {
    /// Whether this reader may see an entry of `owner`.
    pub fn may_read(&self, owner: Uuid) -> bool {
        match self {
            LedgerReader::Account(caller) => caller.account_id == owner,
            LedgerReader::Auditor => true,
        }
    }
}

impl FromRequestParts<AppState> for LedgerReader {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        if bearer(parts).is_some_and(|c| is_auditor(state, c)) {
            return Ok(LedgerReader::Auditor);
        }
        let caller = Caller::from_request_parts(parts, state).await?;
        caller.require(Scope::AccountRead)?;
        Ok(LedgerReader::Account(caller))
    }
}

/// A node proving who it is by signing the request (`xpand_protocol::NodeKey::
/// request_authorization`). The signature covers method, path and query, and is valid for a
/// minute.
pub struct NodeCaller {
    pub node_id: String,
}

/// How far a node's request signature may be from the gateway's clock.
const NODE_REQUEST_SKEW_MS: i64 = 60_000;

impl FromRequestParts<AppState> for NodeCaller {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, AppError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(AppError::Unauthorized(
                "send Authorization: XpandNode <signed request>",
            ))?;
        let target = parts
            .uri
            .path_and_query()
            .map_or(parts.uri.path(), |p| p.as_str());
        let opened = xpand_protocol::open_request_authorization(
            header,
            parts.method.as_str(),
            target,
            NODE_REQUEST_SKEW_MS,
        )
        .map_err(|_| AppError::Unauthorized("the node request signature is invalid or stale"))?;
        Ok(NodeCaller {
            node_id: opened.signer,
        })
    }
}
