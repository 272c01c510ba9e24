//! Whether an API key is still good, for every door: REST requests, tokens minted from the key,
//! and open streams re-checking once a second. Each replica keeps what Postgres said about a
//! key for at most [`FRESH`], so a revocation on any replica reaches all of them within about a
//! second, and REST with an API key costs no more queries than one per key per second (plus,
//! off the request's path, the key's `last_used_at` once a minute).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use uuid::Uuid;

use crate::accounts::{self, KeyGrant};

/// How long an answer from Postgres is trusted.
pub const FRESH: Duration = Duration::from_secs(1);

/// Entries kept per map; past it, stale ones are dropped (then all, should a flood of distinct
/// keys all be fresh), so guessing keys cannot grow memory.
const CAPACITY: usize = 10_000;

pub struct Credentials {
    db: PgPool,
    /// By the key's sha256.
    by_hash: Cache<[u8; 32]>,
    /// By key id: tokens carry it, streams re-check with it.
    by_id: Cache<Uuid>,
}

struct Cache<K>(Mutex<HashMap<K, (Instant, Option<KeyGrant>)>>);

impl<K: Hash + Eq> Cache<K> {
    fn new() -> Self {
        Self(Mutex::new(HashMap::new()))
    }

    fn fresh(&self, key: &K) -> Option<Option<KeyGrant>> {
        let entries = self.0.lock().expect("cache lock");
        entries
            .get(key)
            .filter(|(at, _)| at.elapsed() < FRESH)
            .map(|(_, grant)| grant.clone())
    }

    fn put(&self, key: K, grant: Option<KeyGrant>) {
        let mut entries = self.0.lock().expect("cache lock");
        if entries.len() >= CAPACITY {
            entries.retain(|_, (at, _)| at.elapsed() < FRESH);
            if entries.len() >= CAPACITY {
                entries.clear();
            }
        }
        entries.insert(key, (Instant::now(), grant));
    }

    fn forget(&self, key_id: Uuid) {
        let mut entries = self.0.lock().expect("cache lock");
        entries.retain(|_, (_, grant)| grant.as_ref().is_none_or(|g| g.key_id != key_id));
    }
}

impl Credentials {
    pub fn new(db: PgPool) -> Self {
        Self {
            db,
            by_hash: Cache::new(),
            by_id: Cache::new(),
        }
    }

    /// What the API key `secret` grants, if it is live.
    pub async fn by_secret(&self, secret: &str) -> Result<Option<KeyGrant>, sqlx::Error> {
        let hash = accounts::hash_key(secret);
        if let Some(known) = self.by_hash.fresh(&hash) {
            return Ok(known);
        }
        let grant = accounts::grant_by_hash(&self.db, &hash).await?;
        self.by_hash.put(hash, grant.clone());
        self.touch(grant.as_ref());
        Ok(grant)
    }

    /// What key `id` grants, if it is live.
    pub async fn by_id(&self, id: Uuid) -> Result<Option<KeyGrant>, sqlx::Error> {
        if let Some(known) = self.by_id.fresh(&id) {
            return Ok(known);
        }
        let grant = accounts::grant_by_id(&self.db, id).await?;
        self.by_id.put(id, grant.clone());
        self.touch(grant.as_ref());
        Ok(grant)
    }

    /// Marks a key found live as used (its `last_used_at`), off the request's path: only on a
    /// cache miss, so at most once a second per key and replica, and a write once a minute.
    fn touch(&self, grant: Option<&KeyGrant>) {
        if let Some(grant) = grant {
            let (db, id) = (self.db.clone(), grant.key_id);
            tokio::spawn(async move {
                if let Err(e) = accounts::touch_key(&db, id).await {
                    tracing::warn!(error = %e, "recording an API key's use");
                }
            });
        }
    }

    /// Drops what this replica knows of key `id` after revoking it here: this replica stops
    /// honouring it at once, the others within [`FRESH`].
    pub fn forget(&self, id: Uuid) {
        self.by_hash.forget(id);
        self.by_id.forget(id);
    }
}
