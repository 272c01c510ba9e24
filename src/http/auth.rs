//! Who is calling. Backends send an API key (`Authorization: Bearer xp_...`), limited to the
//! scopes its owner gave it; browsers and add-ins exchange it for a short-lived EdDSA JWT
//! signed with the gateway key, which names the key it came from and lives only as long as that
//! key does. Two more credentials read the ledger: the operator's auditor key (everything), and
//! a node's signed request (`Authorization: XpandNode ...`, its own records only).

use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use crate::accounts::Scope;
use crate::accounts::API_KEY_PREFIX;
use crate::error::AppError;
use crate::http::state::AppState;

/// An authenticated caller: an account and what this credential may do with it.
#[derive(Debug, Clone)]
pub struct Caller {
    pub account_id: Uuid,
    pub scopes: Vec<Scope>,
    /// The API key behind the credential: the key itself, or the one a token was minted from.
    /// Revoking it ends the credential everywhere, open streams included.
    pub key_id: Uuid,
    /// True for an API key, false for a token; only API keys may mint tokens and manage keys.
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

    /// Whether the key behind this credential is still live (unrevoked, its account a
    /// customer's). Answers from the cache, so at most a second old.
    pub async fn still_live(&self, state: &AppState) -> Result<bool, AppError> {
        Ok(state
            .credentials
            .by_id(self.key_id)
            .await?
            .is_some_and(|g| g.account_id == self.account_id))
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: Uuid,
    /// The API key the token was minted from.
    key: Uuid,
    scope: String,
    iat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
    exp: u64,
    iss: String,
}

const ISSUER: &str = "xpand";
/// Clock skew forgiven on `exp`, `nbf` and `iat`.
const LEEWAY: u64 = 5;

/// The gateway's JWT keys, derived from its ed25519 signing key, and the longest lifetime a
/// token may claim.
#[derive(Clone)]
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    max_lifetime: Duration,
}

impl JwtKeys {
    pub fn new(key: &xpand_protocol::NodeKey, max_lifetime: Duration) -> anyhow::Result<Self> {
        let der = key
            .signing_key()
            .to_pkcs8_der()
            .map_err(|e| anyhow::anyhow!("encoding the gateway key as PKCS#8: {e}"))?;
        let x = URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes());
        Ok(Self {
            encoding: EncodingKey::from_ed_der(der.as_bytes()),
            decoding: DecodingKey::from_ed_components(&x)?,
            max_lifetime,
        })
    }

    /// Issues a token for `account`, minted from its API key `key`, with `scopes`, valid for
    /// `ttl` (the caller keeps it within the maximum lifetime; longer tokens are refused).
    pub fn issue(
        &self,
        account: Uuid,
        key: Uuid,
        scopes: &[Scope],
        ttl: Duration,
    ) -> anyhow::Result<String> {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: account,
            key,
            scope: scopes
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" "),
            iat: now,
            nbf: None,
            exp: now + ttl.as_secs(),
            iss: ISSUER.into(),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::EdDSA),
            &claims,
            &self.encoding,
        )?)
    }

    /// The account a token signed by this gateway speaks for (`None` for anything else, API
    /// keys included). Checks the signature and times only: enough to count requests against
    /// the account, not to let them in.
    pub fn subject(&self, token: &str) -> Option<Uuid> {
        self.verify(token).ok().map(|c| c.sub)
    }

    /// The token's claims, if it is signed by this gateway, current (`nbf`, `exp`), and no
    /// longer-lived than the maximum.
    fn verify(&self, token: &str) -> Result<Claims, AppError> {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY;
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map_err(|_| AppError::Unauthorized("the token is invalid, not yet valid or expired"))?
            .claims;
        let now = jsonwebtoken::get_current_timestamp();
        if claims.iat > now + LEEWAY
            || claims.exp.saturating_sub(claims.iat) > self.max_lifetime.as_secs()
        {
            return Err(AppError::Unauthorized(
                "the token claims a longer lifetime than this gateway grants",
            ));
        }
        Ok(claims)
    }
}

/// Authenticates a bearer credential: an API key (its scopes) or a JWT (its scopes, within
/// those of the key it was minted from). Either is refused once that key is revoked or its
/// account is not a live customer's.
pub async fn authenticate(state: &AppState, credential: &str) -> Result<Caller, AppError> {
    if credential.starts_with(API_KEY_PREFIX) {
        let grant = state
            .credentials
            .by_secret(credential)
            .await?
            .ok_or(AppError::Unauthorized("unknown or revoked API key"))?;
        return Ok(Caller {
            account_id: grant.account_id,
            scopes: grant.scopes,
            key_id: grant.key_id,
            via_api_key: true,
            expires_at: None,
        });
    }
    let claims = state.jwt.verify(credential)?;
    let grant = state
        .credentials
        .by_id(claims.key)
        .await?
        .filter(|g| g.account_id == claims.sub)
        .ok_or(AppError::Unauthorized(
            "the token's API key is revoked, or its account is not a customer's",
        ))?;
    let scopes = claims
        .scope
        .split_whitespace()
        .filter_map(Scope::parse)
        .filter(|s| grant.scopes.contains(s))
        .collect();
    Ok(Caller {
        account_id: grant.account_id,
        scopes,
        key_id: grant.key_id,
        via_api_key: false,
        expires_at: Some(claims.exp),
    })
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
    authenticate(state, token).await
}

/// The bearer credential in the `Authorization` header, if any.
pub fn bearer(parts: &Parts) -> Option<&str> {
    bearer_header(&parts.headers)
}

/// The credential of `Authorization: Bearer <credential>`; the scheme is case-insensitive
/// (RFC 6750 by way of RFC 9110).
pub fn bearer_header(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, credential) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credential.trim())
}

/// The credential a request carries: its bearer header, else a `token` query parameter (which
/// only streams accept, but which counts against the rate limit wherever it is sent).
pub fn request_credential(
    headers: &axum::http::HeaderMap,
    uri: &axum::http::Uri,
) -> Option<String> {
    if let Some(credential) = bearer_header(headers) {
        return Some(credential.to_owned());
    }
    url::form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(name, _)| name == "token")
        .map(|(_, token)| token.into_owned())
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
