//! Customer accounts and their API keys.

use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::ledger::{self, Purpose};

/// API keys look like `xp_<64 hex>`; the prefix makes leaked keys easy to scan for.
pub const API_KEY_PREFIX: &str = "xp_";

fn hash_key(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// Creates a customer account with an optional opening credit, and its first API key.
/// Returns the account id and the key (shown once; only its hash is stored).
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
    let key = issue_api_key(&mut tx, id).await?;
    tx.commit().await?;
    Ok((id, key))
}

/// Issues a new API key for an account.
pub async fn issue_api_key(
    conn: &mut sqlx::PgConnection,
    account: Uuid,
) -> Result<String, sqlx::Error> {
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let key = format!("{API_KEY_PREFIX}{}", hex::encode(secret));
    sqlx::query("INSERT INTO api_keys (id, account_id, key_hash, prefix) VALUES ($1, $2, $3, $4)")
        .bind(Uuid::now_v7())
        .bind(account)
        .bind(hash_key(&key))
        .bind(&key[..API_KEY_PREFIX.len() + 8])
        .execute(&mut *conn)
        .await?;
    Ok(key)
}

/// The customer account an API key belongs to, if the key is valid and not revoked.
pub async fn account_for_key(pool: &PgPool, key: &str) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT k.account_id FROM api_keys k JOIN accounts a ON a.id = k.account_id
         WHERE k.key_hash = $1 AND k.revoked_at IS NULL AND a.kind = 'customer'",
    )
    .bind(hash_key(key))
    .fetch_optional(pool)
    .await
}

pub async fn exists(pool: &PgPool, account: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM accounts WHERE id = $1 AND kind = 'customer')")
        .bind(account)
        .fetch_one(pool)
        .await
}
