//! Customer accounts and their API keys: named, scoped, sha256 at rest, shown once, revocable by
//! their owner.

use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::AppError;
use crate::ledger::{self, Purpose};

/// API keys look like `xp_<64 hex>`; the prefix makes leaked keys easy to scan for.
pub const API_KEY_PREFIX: &str = "xp_";

/// Unrevoked keys one account may hold: each is a standing credential, so a leaked key must
/// not be able to mint an unbounded number of others.
pub const MAX_KEYS_PER_ACCOUNT: i64 = 100;

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

    pub fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// An API key as its owner sees it: never the secret.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiKey {
    pub id: Uuid,
    pub name: String,
    /// The key's first characters (`xp_` and 8 hex), to recognise it.
    pub prefix: String,
    pub scopes: Vec<Scope>,
    pub created_at: DateTime<Utc>,
    /// When the key, or a token minted from it, was last used (to the minute; `None`: never).
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// What a live API key grants: whose account, and which scopes.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyGrant {
    pub key_id: Uuid,
    pub account_id: Uuid,
    pub scopes: Vec<Scope>,
}

/// sha256 of a key: keys are 256-bit random, so a fast hash is enough and lookups stay O(1).
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn scopes_of(names: Vec<String>) -> Vec<Scope> {
    names.iter().filter_map(|n| Scope::parse(n)).collect()
}

fn scope_names(scopes: &[Scope]) -> Vec<&'static str> {
    scopes.iter().map(|s| s.as_str()).collect()
}

/// Creates a customer account with an optional opening credit, and its first API key (every
/// scope). Returns the account id and the key (shown once; only its hash is stored).
pub async fn create_customer(
    pool: &PgPool,
    name: &str,
    credit: i64,
) -> anyhow::Result<(Uuid, String)> {
    let mut tx = pool.begin().await?;
    let id = Uuid::now_v7();
    sqlx::query("INSERT INTO accounts (id, name, kind) VALUES ($1, $2, 'customer')")
        .bind(id)
        .bind(name)
        .execute(&mut *tx)
        .await?;
    ledger::open_accounts(&mut tx, id, &[Purpose::Available, Purpose::Held]).await?;
    if credit > 0 {
        ledger::deposit(&mut tx, id, credit, "opening credit").await?;
    }
    let (_, key) = insert_key(&mut tx, id, "default", &Scope::ALL).await?;
    tx.commit().await?;
    Ok((id, key))
}

async fn insert_key(
    conn: &mut sqlx::PgConnection,
    account: Uuid,
    name: &str,
    scopes: &[Scope],
) -> Result<(ApiKey, String), sqlx::Error> {
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let key = format!("{API_KEY_PREFIX}{}", hex::encode(secret));
    let row = sqlx::query(
        "INSERT INTO api_keys (id, account_id, key_hash, prefix, name, scopes)
         VALUES ($1, $2, $3, $4, $5, $6)
         RETURNING id, name, prefix, scopes, created_at, last_used_at, revoked_at",
    )
    .bind(Uuid::now_v7())
    .bind(account)
    .bind(hash_key(&key).as_slice())
    .bind(&key[..API_KEY_PREFIX.len() + 8])
    .bind(name)
    .bind(scope_names(scopes))
    .fetch_one(&mut *conn)
    .await?;
    Ok((api_key(&row)?, key))
}

fn api_key(row: &sqlx::postgres::PgRow) -> Result<ApiKey, sqlx::Error> {
    Ok(ApiKey {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        prefix: row.try_get("prefix")?,
        scopes: scopes_of(row.try_get("scopes")?),
        created_at: row.try_get("created_at")?,
        last_used_at: row.try_get("last_used_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

/// Issues a new key for `account` with `name` and `scopes`; returns it and its secret (shown
/// once). Refused once the account holds [`MAX_KEYS_PER_ACCOUNT`] unrevoked keys.
pub async fn create_key(
    pool: &PgPool,
    account: Uuid,
    name: &str,
    scopes: &[Scope],
) -> Result<(ApiKey, String), AppError> {
    let mut tx = pool.begin().await?;
    // Serialises key creation per account, so concurrent requests cannot pass the cap together.
    sqlx::query("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE")
        .bind(account)
        .execute(&mut *tx)
        .await?;
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM api_keys WHERE account_id = $1 AND revoked_at IS NULL",
    )
    .bind(account)
    .fetch_one(&mut *tx)
    .await?;
    if live >= MAX_KEYS_PER_ACCOUNT {
        return Err(AppError::QuotaExceeded(format!(
            "an account may hold {MAX_KEYS_PER_ACCOUNT} unrevoked API keys; revoke one first"
        )));
    }
    let created = insert_key(&mut tx, account, name, scopes).await?;
    tx.commit().await?;
    Ok(created)
}

/// An account's keys, revoked ones included, oldest first.
pub async fn list_keys(pool: &PgPool, account: Uuid) -> Result<Vec<ApiKey>, sqlx::Error> {
    sqlx::query(
        "SELECT id, name, prefix, scopes, created_at, last_used_at, revoked_at FROM api_keys
         WHERE account_id = $1 ORDER BY id",
    )
    .bind(account)
    .fetch_all(pool)
    .await?
    .iter()
    .map(api_key)
    .collect()
}

/// Revokes `account`'s key `id` (again is harmless: the first revocation time stays). `None`
/// when the account has no such key.
pub async fn revoke_key(
    pool: &PgPool,
    account: Uuid,
    id: Uuid,
) -> Result<Option<ApiKey>, sqlx::Error> {
    sqlx::query(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
         WHERE id = $1 AND account_id = $2
         RETURNING id, name, prefix, scopes, created_at, last_used_at, revoked_at",
    )
    .bind(id)
    .bind(account)
    .fetch_optional(pool)
    .await?
    .as_ref()
    .map(api_key)
    .transpose()
}

const LIVE_GRANT: &str = "SELECT k.id, k.account_id, k.scopes FROM api_keys k
     JOIN accounts a ON a.id = k.account_id
     WHERE k.revoked_at IS NULL AND a.kind = 'customer' AND ";

fn grant(row: &sqlx::postgres::PgRow) -> Result<KeyGrant, sqlx::Error> {
    Ok(KeyGrant {
        key_id: row.try_get("id")?,
        account_id: row.try_get("account_id")?,
        scopes: scopes_of(row.try_get("scopes")?),
    })
}

/// What the key whose sha256 is `hash` grants, if it is unrevoked and its account a customer's.
pub async fn grant_by_hash(pool: &PgPool, hash: &[u8]) -> Result<Option<KeyGrant>, sqlx::Error> {
    sqlx::query(&format!("{LIVE_GRANT} k.key_hash = $1"))
        .bind(hash)
        .fetch_optional(pool)
        .await?
        .as_ref()
        .map(grant)
        .transpose()
}

/// What key `id` grants, if it is unrevoked and its account a customer's.
pub async fn grant_by_id(pool: &PgPool, id: Uuid) -> Result<Option<KeyGrant>, sqlx::Error> {
    sqlx::query(&format!("{LIVE_GRANT} k.id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?
        .as_ref()
        .map(grant)
        .transpose()
}

/// Records that key `id` is in use; a write at most once a minute per key.
pub async fn touch_key(pool: &PgPool, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE api_keys SET last_used_at = now()
         WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn exists(pool: &PgPool, account: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM accounts WHERE id = $1 AND kind = 'customer')")
        .bind(account)
        .fetch_one(pool)
        .await
}
