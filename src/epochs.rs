//! Epochs, power scores and the reward pool (paper §3.1, Proof-of-AI).
//!
//! The paper's equations 1–5 were images and are lost, so xpand defines its own power score from
//! what the gateway itself observed during epoch `n`:
//!
//! ```text
//! score = 1000 · C · A / S  +  100 · D  −  500 · F
//! ```
//!
//! - `A / S`: uptime — of the epoch's `S` ten-second slots, the `A` in which the node sent a
//!   verified heartbeat (kept in Redis as a bitmap per node and epoch);
//! - `C`: committed capacity from its signed capability statement — concurrent shards (at most
//!   64), times 4 when it runs on CUDA;
//! - `D`: shards it completed (results accepted) in the epoch;
//! - `F`: failures charged to it in the epoch (a lease that lapsed, a result refused).
//!
//! The score is an integer and can go negative. The pool is `issuance` (newly issued,
//! `XPAND_EPOCH_ISSUANCE`) plus `XPAND_REWARD_FEE_SHARE_BPS` of the gateway fees earned in the
//! epoch. Node `i` gets `floor(pool · max(0, s_i) / Σ max(0, s_j))`; the rounding remainder goes to
//! the node with the highest score (ties: the smallest node id), so the whole pool is paid. With
//! no positive score nothing is issued or moved (`pool` 0).
//!
//! Closing is idempotent and safe under racing replicas: an advisory lock serialises closers, the
//! epoch's row has a primary key, and the ledger allows one `epoch_reward` transaction per epoch.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;
use xpand_protocol::{Accelerator, Announce};

use crate::config::PoolConfig;
use crate::error::AppError;
use crate::ledger::{self, Posting, Purpose, Subject, TxKind, SYSTEM_ACCOUNT};
use crate::nodes::Presence;
use crate::shutdown::Shutdown;

/// Uptime is sampled in slots of this length.
pub const SLOT: Duration = Duration::from_secs(10);
const MAX_CAPACITY: i64 = 64;
const CUDA_FACTOR: i64 = 4;
const UPTIME_WEIGHT: i64 = 1000;
const SHARD_WEIGHT: i64 = 100;
const FAILURE_WEIGHT: i64 = 500;
/// Advisory lock key that serialises epoch closers ("xpandepc").
const EPOCH_LOCK: i64 = 0x7870_616e_6465_7063;

/// Epoch boundaries: epoch `n` is `[genesis + n·length, genesis + (n+1)·length)`.
#[derive(Debug, Clone, Copy)]
pub struct EpochClock {
    pub genesis: DateTime<Utc>,
    pub length: Duration,
}

impl EpochClock {
    pub async fn load(pool: &PgPool, length: Duration) -> sqlx::Result<Self> {
        let genesis = sqlx::query_scalar("SELECT genesis FROM network")
            .fetch_one(pool)
            .await?;
        Ok(Self { genesis, length })
    }

    fn length(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.length).expect("epoch length fits")
    }

    pub fn bounds(&self, n: i64) -> (DateTime<Utc>, DateTime<Utc>) {
        let start = self.genesis + self.length() * n as i32;
        (start, start + self.length())
    }

    /// The epoch `at` falls in, and its slot.
    pub fn locate(&self, at: DateTime<Utc>) -> (i64, i64) {
        let since = (at - self.genesis).num_milliseconds().max(0);
        let len = self.length.as_millis() as i64;
        (since / len, (since % len) / SLOT.as_millis() as i64)
    }

    pub fn slots(&self) -> i64 {
        (self.length.as_millis() as u64).div_ceil(SLOT.as_millis() as u64) as i64
    }
}

/// What one node did in one epoch, and what it earned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct NodeScore {
    pub epoch: i64,
    pub node_id: String,
    /// Ten-second slots with a heartbeat, of `total_slots`.
    pub alive_slots: i32,
    pub total_slots: i32,
    /// Committed capacity: concurrent shards (≤ 64), ×4 on CUDA.
    pub capacity: i32,
    pub shards_done: i64,
    pub failures: i64,
    pub score: i64,
    /// Micro-credits paid from the pool.
    pub reward: i64,
}

impl NodeScore {
    fn compute(&mut self) {
        let uptime = UPTIME_WEIGHT * i64::from(self.capacity) * i64::from(self.alive_slots)
            / i64::from(self.total_slots.max(1));
        self.score = uptime + SHARD_WEIGHT * self.shards_done - FAILURE_WEIGHT * self.failures;
    }
}

/// A closed epoch.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Epoch {
    pub number: i64,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub issuance: i64,
    pub fee_share: i64,
    /// `issuance + fee_share`: all of it was paid to nodes.
    pub pool: i64,
    pub remainder_node: Option<String>,
    pub closed_at: DateTime<Utc>,
    #[sqlx(skip)]
    pub scores: Vec<NodeScore>,
}

/// Splits `pool` in proportion to the positive scores. Returns each reward (same order as
/// `scores`) and the index that took the rounding remainder. `None` when no score is positive.
pub fn split_pool(pool: i64, scores: &[(&str, i64)]) -> Option<(Vec<i64>, usize)> {
    let total: i128 = scores.iter().map(|(_, s)| i128::from((*s).max(0))).sum();
    if total == 0 {
        return None;
    }
    let mut rewards: Vec<i64> = scores
        .iter()
        .map(|(_, s)| (i128::from(pool) * i128::from((*s).max(0)) / total) as i64)
        .collect();
    let top = (0..scores.len())
        .max_by(|&a, &b| {
            scores[a]
                .1
                .cmp(&scores[b].1)
                .then_with(|| scores[b].0.cmp(scores[a].0))
        })
        .expect("a positive score exists");
    rewards[top] += pool - rewards.iter().sum::<i64>();
    Some((rewards, top))
}

/// Closes epochs: exactly what closing needs, no more.
#[derive(Clone)]
pub struct EpochCloser {
    pub db: PgPool,
    pub clock: EpochClock,
    /// Where uptime is read from (heartbeats recorded it).
    pub presence: Arc<dyn Presence>,
    pub pool: PoolConfig,
    /// Seals the ledger after each close.
    pub key: ed25519_dalek::SigningKey,
}

impl EpochCloser {
    /// Closes every epoch that has ended, oldest first; returns the numbers closed here (a
    /// racing replica may close some instead).
    pub async fn close_due(&self) -> anyhow::Result<Vec<i64>> {
        let mut closed = Vec::new();
        loop {
            let next: i64 = sqlx::query_scalar("SELECT COALESCE(max(number) + 1, 0) FROM epochs")
                .fetch_one(&self.db)
                .await?;
            let (_, ends_at) = self.clock.bounds(next);
            if ends_at > Utc::now() {
                return Ok(closed);
            }
            if self.close(next).await? {
                closed.push(next);
            }
        }
    }

    /// Closes due epochs and seals the ledger after each close, until `shutdown`.
    pub async fn run(self, shutdown: Shutdown) {
        let tick =
            (self.clock.length / 10).clamp(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = shutdown.wait() => return,
            }
            match self.close_due().await {
                Ok(closed) if !closed.is_empty() => {
                    if let Err(e) = ledger::blocks::seal_all(&self.db, &self.key).await {
                        tracing::warn!(error = %e, "sealing after an epoch close failed");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = ?e, "closing epochs failed"),
            }
        }
    }

    /// Closes epoch `n`; false when another closer already did.
    async fn close(&self, n: i64) -> anyhow::Result<bool> {
        close(&self.db, self.clock, self.presence.as_ref(), self.pool, n).await
    }
}

/// Closes epoch `n` from the nodes' uptime in `presence`; false when another closer already did.
async fn close(
    db: &PgPool,
    clock: EpochClock,
    presence: &dyn Presence,
    cfg: PoolConfig,
    n: i64,
) -> anyhow::Result<bool> {
    let (starts_at, ends_at) = clock.bounds(n);
    let nodes: Vec<(String, Uuid, Option<sqlx::types::Json<Announce>>)> = sqlx::query_as(
        "SELECT id, account_id, capabilities FROM nodes WHERE status = 'active' ORDER BY id",
    )
    .fetch_all(db)
    .await?;
    // Uptime is read before taking the locks.
    let ids: Vec<String> = nodes.iter().map(|(id, _, _)| id.clone()).collect();
    let slots = presence.uptime_slots(n, &ids).await?;
    let alive: HashMap<String, i32> = ids
        .into_iter()
        .zip(slots)
        .map(|(id, slots)| (id, slots.min(clock.slots()) as i32))
        .collect();

    let mut tx = db.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(EPOCH_LOCK)
        .execute(&mut *tx)
        .await?;
    let already: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM epochs WHERE number = $1)")
            .bind(n)
            .fetch_one(&mut *tx)
            .await?;
    if already {
        return Ok(false);
    }
    let done: HashMap<String, i64> = sqlx::query_as(
        "SELECT node_id, count(*) FROM shards
         WHERE status = 'done' AND completed_at >= $1 AND completed_at < $2 GROUP BY node_id",
    )
    .bind(starts_at)
    .bind(ends_at)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let failures: HashMap<String, i64> = sqlx::query_as(
        "SELECT node_id, count(*) FROM node_failures WHERE at >= $1 AND at < $2 GROUP BY node_id",
    )
    .bind(starts_at)
    .bind(ends_at)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let mut scores: Vec<NodeScore> = nodes
        .iter()
        .map(|(id, _, caps)| {
            let capacity = caps.as_ref().map_or(0, |c| {
                let cuda = if c.0.accelerator == Accelerator::Cuda {
                    CUDA_FACTOR
                } else {
                    1
                };
                i64::from(c.0.max_concurrent_shards).min(MAX_CAPACITY) * cuda
            });
            let mut s = NodeScore {
                epoch: n,
                node_id: id.clone(),
                alive_slots: alive.get(id).copied().unwrap_or(0),
                total_slots: clock.slots() as i32,
                capacity: capacity as i32,
                shards_done: done.get(id).copied().unwrap_or(0),
                failures: failures.get(id).copied().unwrap_or(0),
                score: 0,
                reward: 0,
            };
            s.compute();
            s
        })
        .collect();

    // Gateway fees earned in the epoch: revenue credited by escrow releases in the window.
    let fees: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(e.amount), 0)::bigint FROM ledger_entries e
         JOIN ledger_accounts a ON a.id = e.ledger_account_id
         JOIN ledger_transactions t ON t.id = e.tx_id
         WHERE a.purpose = 'revenue' AND t.kind = 'escrow_release'
           AND e.created_at >= $1 AND e.created_at < $2",
    )
    .bind(starts_at)
    .bind(ends_at)
    .fetch_one(&mut *tx)
    .await?;
    let fee_share = fees * cfg.fee_share_bps / 10_000;
    let ranked: Vec<(&str, i64)> = scores
        .iter()
        .map(|s| (s.node_id.as_str(), s.score))
        .collect();
    let (issuance, fee_share, remainder_node) = match split_pool(cfg.issuance + fee_share, &ranked)
    {
        Some((rewards, top)) => {
            for (score, reward) in scores.iter_mut().zip(rewards) {
                score.reward = reward;
            }
            (cfg.issuance, fee_share, Some(scores[top].node_id.clone()))
        }
        None => (0, 0, None),
    };
    sqlx::query(
        "INSERT INTO epochs (number, starts_at, ends_at, issuance, fee_share, pool, remainder_node)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(n)
    .bind(starts_at)
    .bind(ends_at)
    .bind(issuance)
    .bind(fee_share)
    .bind(issuance + fee_share)
    .bind(&remainder_node)
    .execute(&mut *tx)
    .await?;
    for s in &scores {
        sqlx::query(
            "INSERT INTO epoch_scores (epoch, node_id, alive_slots, total_slots, capacity,
                                       shards_done, failures, score, reward)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(n)
        .bind(&s.node_id)
        .bind(s.alive_slots)
        .bind(s.total_slots)
        .bind(s.capacity)
        .bind(s.shards_done)
        .bind(s.failures)
        .bind(s.score)
        .bind(s.reward)
        .execute(&mut *tx)
        .await?;
    }
    if issuance + fee_share > 0 {
        let accounts: HashMap<&str, Uuid> = nodes
            .iter()
            .map(|(id, acct, _)| (id.as_str(), *acct))
            .collect();
        let rewards: Vec<(Uuid, i64)> = scores
            .iter()
            .map(|s| (accounts[s.node_id.as_str()], s.reward))
            .collect();
        pay(&mut tx, n, issuance, fee_share, &rewards).await?;
    }
    tx.commit().await?;
    tracing::info!(
        epoch = n,
        pool = issuance + fee_share,
        nodes = scores.len(),
        "closed epoch"
    );
    Ok(true)
}

/// Pays epoch `n`'s pool: `issuance` newly issued plus `fee_share` from revenue, to the node
/// accounts' earnings. One transaction per epoch, ever ([`LedgerError::AlreadyPosted`] otherwise).
///
/// [`LedgerError::AlreadyPosted`]: crate::ledger::LedgerError::AlreadyPosted
pub async fn pay(
    conn: &mut sqlx::PgConnection,
    n: i64,
    issuance: i64,
    fee_share: i64,
    rewards: &[(Uuid, i64)],
) -> Result<i64, ledger::LedgerError> {
    let mut postings = vec![
        Posting {
            owner: SYSTEM_ACCOUNT,
            purpose: Purpose::Issuance,
            amount: -issuance,
        },
        Posting {
            owner: SYSTEM_ACCOUNT,
            purpose: Purpose::Revenue,
            amount: -fee_share,
        },
    ];
    postings.extend(rewards.iter().map(|&(owner, amount)| Posting {
        owner,
        purpose: Purpose::Earnings,
        amount,
    }));
    ledger::post(
        conn,
        TxKind::EpochReward,
        Subject::Epoch(n),
        &format!("epoch {n} rewards"),
        &postings,
    )
    .await
}

/// A closed epoch with its scores.
pub async fn get(pool: &PgPool, n: i64) -> Result<Epoch, AppError> {
    let mut epoch: Epoch = sqlx::query_as(
        "SELECT number, starts_at, ends_at, issuance, fee_share, pool, remainder_node, closed_at
         FROM epochs WHERE number = $1",
    )
    .bind(n)
    .fetch_optional(pool)
    .await?
    .ok_or(AppError::NotFound("closed epoch"))?;
    epoch.scores = sqlx::query_as(&format!(
        "SELECT {SCORE_COLUMNS} FROM epoch_scores WHERE epoch = $1 ORDER BY score DESC, node_id"
    ))
    .bind(n)
    .fetch_all(pool)
    .await?;
    Ok(epoch)
}

const SCORE_COLUMNS: &str =
    "epoch, node_id, alive_slots, total_slots, capacity, shards_done, failures, score, reward";

/// A node's most recent scores.
pub async fn node_scores(pool: &PgPool, node: &str, limit: i64) -> sqlx::Result<Vec<NodeScore>> {
    sqlx::query_as(&format!(
        "SELECT {SCORE_COLUMNS} FROM epoch_scores WHERE node_id = $1 ORDER BY epoch DESC LIMIT $2"
    ))
    .bind(node)
    .bind(limit)
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_pool_is_paid_in_proportion() {
        let scores = [("a", 300), ("b", 100), ("c", -50), ("d", 0)];
        let (rewards, top) = split_pool(1_000, &scores).unwrap();
        assert_eq!(rewards, vec![750, 250, 0, 0]);
        assert_eq!(top, 0);
        let (rewards, top) = split_pool(10, &[("b", 1), ("a", 1), ("c", 1)]).unwrap();
        assert_eq!(rewards.iter().sum::<i64>(), 10);
        assert_eq!(
            (top, rewards[top]),
            (1, 4),
            "remainder to the smallest id among the best"
        );
        assert!(split_pool(10, &[("a", 0), ("b", -3)]).is_none());
    }

    #[test]
    fn scores_weigh_uptime_capacity_work_and_failures() {
        let mut s = NodeScore {
            epoch: 0,
            node_id: "n".into(),
            alive_slots: 180,
            total_slots: 360,
            capacity: 2,
            shards_done: 7,
            failures: 1,
            score: 0,
            reward: 0,
        };
        s.compute();
        assert_eq!(s.score, 1000 * 2 / 2 + 700 - 500);
        s.failures = 10;
        s.compute();
        assert!(s.score < 0, "failures can make a score negative");
    }

    #[test]
    fn clock_locates_epochs_and_slots() {
        let genesis = Utc::now();
        let clock = EpochClock {
            genesis,
            length: Duration::from_secs(60),
        };
        assert_eq!(
            clock.locate(genesis + chrono::Duration::seconds(125)),
            (2, 0)
        );
        assert_eq!(
            clock.locate(genesis + chrono::Duration::seconds(59)),
            (0, 5)
        );
        assert_eq!(clock.slots(), 6);
        assert_eq!(clock.bounds(2).0, genesis + chrono::Duration::seconds(120));
    }
}
