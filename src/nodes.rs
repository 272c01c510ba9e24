//! Worker nodes: registration (an operator registers a node's public key; its messages are
//! refused until then), signed capability statements, failures charged, and which nodes can
//! take work now.
//!
//! Whether a node is up comes from its heartbeats, through the [`Presence`] interface: every
//! gateway replica must agree on who is alive, and a dead node must disappear without anyone
//! noticing it died (the Redis adapter keeps a key per node with a TTL heartbeats renew).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::Mutex;
use utoipa::ToSchema;
use uuid::Uuid;
use xpand_protocol::{parse_node_id, Accelerator, Announce};

use crate::error::AppError;
use crate::ledger::{self, Purpose};

/// Registers a node's public key (hex) with a payout account. Idempotent per key.
pub async fn register(pool: &PgPool, node_id: &str, name: &str) -> anyhow::Result<Uuid> {
    parse_node_id(node_id).map_err(|e| anyhow::anyhow!("{node_id:?} is not a node id: {e}"))?;
    let mut tx = pool.begin().await?;
    if let Some(account) =
        sqlx::query_scalar::<_, Uuid>("SELECT account_id FROM nodes WHERE id = $1")
            .bind(node_id)
            .fetch_optional(&mut *tx)
            .await?
    {
        return Ok(account);
    }
    let account = Uuid::now_v7();
    sqlx::query("INSERT INTO accounts (id, name, kind) VALUES ($1, $2, 'node')")
        .bind(account)
        .bind(format!("node {name}"))
        .execute(&mut *tx)
        .await?;
    ledger::open_accounts(&mut tx, account, &[Purpose::Earnings]).await?;
    sqlx::query("INSERT INTO nodes (id, name, account_id) VALUES ($1, $2, $3)")
        .bind(node_id)
        .bind(name)
        .bind(account)
        .execute(&mut *tx)
        .await
        .context("inserting the node")?;
    notify_directory(&mut tx, node_id).await?;
    tx.commit().await?;
    Ok(account)
}

/// Postgres channel on which registrations and bans are announced to every gateway replica's
/// [`NodeDirectory`] (delivered when the changing transaction commits).
pub const DIRECTORY_CHANNEL: &str = "xpand_node_directory";

async fn notify_directory(conn: &mut sqlx::PgConnection, node_id: &str) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(DIRECTORY_CHANNEL)
        .bind(node_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Why a node is charged with a failure (it lowers its power score).
#[derive(Debug, Clone, Copy)]
pub enum Failure {
    LeaseLapsed,
    /// The node died (its heartbeats stopped) or restarted while it held the shard.
    NodeLost,
    BadResult,
    /// Outvoted by two other nodes on the same shard.
    Disputed,
}

/// Counts the runs `nodes` finished (a result stored, replicas included; a node named twice ran
/// twice), for their power scores and for how many of their results are still checked as a new
/// node's. Callers run it last before their commit: every result of a node updates its one row,
/// so the rows are locked in one order (by id), each once.
pub async fn count_runs(conn: &mut sqlx::PgConnection, nodes: &[String]) -> sqlx::Result<()> {
    if nodes.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE nodes n SET shards_done = n.shards_done + c.runs
         FROM (SELECT node, count(*) AS runs FROM UNNEST($1::text[]) AS node
               GROUP BY node ORDER BY node) c
         WHERE n.id = c.node",
    )
    .bind(nodes)
    .execute(conn)
    .await?;
    Ok(())
}

/// Charges each `(node, shard)` with a failure: counted on the node and timestamped for the
/// epoch's power score.
pub async fn charge_failures(
    conn: &mut sqlx::PgConnection,
    failures: &[(String, Uuid)],
    why: Failure,
) -> sqlx::Result<()> {
    let reason = match why {
        Failure::LeaseLapsed => "lease_lapsed",
        Failure::NodeLost => "node_lost",
        Failure::BadResult => "bad_result",
        Failure::Disputed => "disputed",
    };
    let (nodes, shards): (Vec<&str>, Vec<Uuid>) =
        failures.iter().map(|(n, s)| (n.as_str(), *s)).unzip();
    sqlx::query(
        "INSERT INTO node_failures (node_id, shard_id, reason)
         SELECT node, shard, $3 FROM UNNEST($1::text[], $2::uuid[]) AS u(node, shard)",
    )
    .bind(&nodes)
    .bind(&shards)
    .bind(reason)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE nodes n SET shards_failed = n.shards_failed + c.failures
         FROM (SELECT node, count(*) AS failures FROM UNNEST($1::text[]) AS node GROUP BY node) c
         WHERE n.id = c.node",
    )
    .bind(&nodes)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Bans a node: its messages are dropped and it gets no more work. False if there is no such node.
pub async fn ban(pool: &PgPool, node_id: &str) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let n = sqlx::query("UPDATE nodes SET status = 'banned' WHERE id = $1")
        .bind(node_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    notify_directory(&mut tx, node_id).await?;
    tx.commit().await?;
    Ok(n == 1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeStanding {
    Active,
    Banned,
}

/// What every worker message needs to know about its node: registered or not, banned or not,
/// and whether a capability statement is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectoryEntry {
    pub standing: NodeStanding,
    pub announced: bool,
}

/// Node entries, cached for a few seconds. A registration or ban anywhere reaches every
/// replica's cache through [`DIRECTORY_CHANNEL`] ([`run_directory_listener`]), so "unknown" is
/// never remembered past a registration.
pub struct NodeDirectory {
    cache: Mutex<HashMap<String, (Option<DirectoryEntry>, Instant)>>,
}

const DIRECTORY_TTL: Duration = Duration::from_secs(5);

impl NodeDirectory {
    pub fn new() -> Self {
        Self {
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// `None` for a node nobody registered.
    pub async fn lookup(
        &self,
        pool: &PgPool,
        node_id: &str,
    ) -> Result<Option<DirectoryEntry>, sqlx::Error> {
        if let Some((entry, at)) = self.cache.lock().await.get(node_id) {
            if at.elapsed() < DIRECTORY_TTL {
                return Ok(*entry);
            }
        }
        let row: Option<(String, bool)> =
            sqlx::query_as("SELECT status, capabilities IS NOT NULL FROM nodes WHERE id = $1")
                .bind(node_id)
                .fetch_optional(pool)
                .await?;
        let entry = row.map(|(status, announced)| DirectoryEntry {
            standing: if status == "banned" {
                NodeStanding::Banned
            } else {
                NodeStanding::Active
            },
            announced,
        });
        let mut cache = self.cache.lock().await;
        if cache.len() > 100_000 {
            cache.clear();
        }
        cache.insert(node_id.to_string(), (entry, Instant::now()));
        Ok(entry)
    }

    /// Drops what is cached of `node_id`: it was registered, banned or announced.
    pub async fn forget(&self, node_id: &str) {
        self.cache.lock().await.remove(node_id);
    }

    async fn forget_all(&self) {
        self.cache.lock().await.clear();
    }
}

impl Default for NodeDirectory {
    fn default() -> Self {
        Self::new()
    }
}

/// Keeps `directory` in step with registrations and bans made anywhere (another replica, or
/// `xpand admin` on the database), until `shutdown`. Notifications missed while the listening
/// connection was down are made up for by forgetting everything.
pub async fn run_directory_listener(
    pool: PgPool,
    directory: std::sync::Arc<NodeDirectory>,
    shutdown: crate::shutdown::Shutdown,
) {
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
            Ok(mut listener) => match listener.listen(DIRECTORY_CHANNEL).await {
                Ok(()) => listener,
                Err(e) => {
                    tracing::warn!(error = %e, "listening for node registrations failed");
                    if !continue_after(&shutdown).await {
                        return;
                    }
                    continue;
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "connecting to listen for node registrations failed");
                if !continue_after(&shutdown).await {
                    return;
                }
                continue;
            }
        };
        // Whatever changed while nobody listened.
        directory.forget_all().await;
        loop {
            let next = tokio::select! {
                next = listener.try_recv() => next,
                _ = shutdown.wait() => return,
            };
            match next {
                Ok(Some(notification)) => directory.forget(notification.payload()).await,
                // The connection dropped and was re-established: notifications may be lost.
                Ok(None) => directory.forget_all().await,
                Err(e) => {
                    tracing::warn!(error = %e, "node registration feed lost");
                    break;
                }
            }
        }
        if !continue_after(&shutdown).await {
            return;
        }
    }
}

/// Waits a retry interval; false when shutdown came first.
async fn continue_after(shutdown: &crate::shutdown::Shutdown) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(1)) => true,
        _ = shutdown.wait() => false,
    }
}

/// Stores a verified capability statement unless a newer one is already stored, and records its
/// signed `envelope` for sealing when it says something new (workers re-announce periodically
/// with the same capabilities). True when it changed the stored statement.
pub async fn record_announce(
    pool: &PgPool,
    node_id: &str,
    signed_at_ms: i64,
    announce: &Announce,
    envelope: &[u8],
) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let changed: Option<bool> = sqlx::query_scalar(
        "WITH old AS (SELECT capabilities FROM nodes WHERE id = $1 FOR UPDATE)
         UPDATE nodes n SET capabilities = $2, announced_ts = $3, announced_at = now()
         FROM old
         WHERE n.id = $1 AND (n.announced_ts IS NULL OR n.announced_ts < $3)
         RETURNING old.capabilities IS DISTINCT FROM $2",
    )
    .bind(node_id)
    .bind(serde_json::to_value(announce).expect("announces serialize"))
    .bind(signed_at_ms)
    .fetch_optional(&mut *tx)
    .await?;
    let new = changed == Some(true);
    if new {
        crate::ledger::blocks::record(&mut tx, "capability", node_id, envelope).await?;
    }
    tx.commit().await?;
    Ok(new)
}

/// Which nodes are up, as heartbeats tell: the domain's view of presence. The Redis adapter
/// ([`crate::presence::RedisPresence`]) implements it; the domain never talks to Redis itself.
pub trait Presence: Send + Sync {
    /// Which of `nodes` are alive, in order.
    fn alive<'a>(&'a self, nodes: &'a [String]) -> BoxFuture<'a, anyhow::Result<Vec<bool>>>;
    /// In how many of epoch `epoch`'s slots each of `nodes` was up, in order.
    fn uptime_slots<'a>(
        &'a self,
        epoch: i64,
        nodes: &'a [String],
    ) -> BoxFuture<'a, anyhow::Result<Vec<i64>>>;
}

/// A live node with room for more shards.
#[derive(Debug, Clone)]
pub struct NodeSlot {
    pub id: String,
    pub models: Vec<String>,
    pub free: i64,
    pub accelerator: Accelerator,
    /// Power score of the node's last closed epoch, if it has one.
    pub score: Option<i64>,
    /// The registry models (sha256s) it holds.
    pub held: Vec<String>,
}

/// An active node with a current heartbeat and a capability statement.
struct LiveNode {
    id: String,
    caps: Announce,
    /// Shards assigned to it now.
    busy: i64,
    score: Option<i64>,
}

async fn live_nodes(pool: &PgPool, presence: &dyn Presence) -> anyhow::Result<Vec<LiveNode>> {
    let rows: Vec<(String, sqlx::types::Json<Announce>, i64, Option<i64>)> = sqlx::query_as(
        "SELECT n.id, n.capabilities,
                (SELECT count(*) FROM shards s WHERE s.node_id = n.id AND s.status = 'assigned'),
                (SELECT es.score FROM epoch_scores es WHERE es.node_id = n.id
                 ORDER BY es.epoch DESC LIMIT 1)
         FROM nodes n WHERE n.status = 'active' AND n.capabilities IS NOT NULL
         -- A stable order: placement breaks ties by it.
         ORDER BY n.registered_at, n.id",
    )
    .fetch_all(pool)
    .await?;
    let ids: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    let alive = presence.alive(&ids).await?;
    Ok(rows
        .into_iter()
        .zip(alive)
        .filter(|(_, alive)| *alive)
        .map(|((id, caps, busy, score), _)| LiveNode {
            id,
            caps: caps.0,
            busy,
            score,
        })
        .collect())
}

/// Live, active nodes and how many more shards each can take, busy ones (`free` 0) included:
/// placement must know who could take a shard later, not only who can now.
pub async fn available(pool: &PgPool, presence: &dyn Presence) -> anyhow::Result<Vec<NodeSlot>> {
    Ok(live_nodes(pool, presence)
        .await?
        .into_iter()
        .map(|n| NodeSlot {
            models: n.caps.models.iter().map(|m| m.name.clone()).collect(),
            free: (n.caps.max_concurrent_shards as i64 - n.busy).max(0),
            accelerator: n.caps.accelerator,
            score: n.score,
            held: n.caps.held_models,
            id: n.id,
        })
        .collect())
}

/// Shard slots of live, active nodes that hold `model`, busy or not: what a job is sized for.
pub async fn live_capacity(
    pool: &PgPool,
    presence: &dyn Presence,
    model: &str,
) -> anyhow::Result<i64> {
    Ok(live_nodes(pool, presence)
        .await?
        .iter()
        .filter(|n| n.caps.models.iter().any(|m| m.name == model))
        .map(|n| i64::from(n.caps.max_concurrent_shards))
        .sum())
}

/// Whether a live, active node other than `node` holds `model`.
pub async fn another_serves(
    pool: &PgPool,
    presence: &dyn Presence,
    model: &str,
    node: &str,
) -> anyhow::Result<bool> {
    Ok(live_nodes(pool, presence)
        .await?
        .iter()
        .any(|n| n.id != node && n.caps.models.iter().any(|m| m.name == model)))
}

/// A node as anyone may see it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema)]
pub struct Node {
    /// Hex of the node's ed25519 public key.
    pub id: String,
    pub name: String,
    /// `active` or `banned`.
    pub status: String,
    /// Whether the node's heartbeat is current.
    pub alive: bool,
    /// The node's last signed capability statement.
    #[schema(value_type = Option<Object>)]
    pub capabilities: Option<serde_json::Value>,
    pub announced_at: Option<DateTime<Utc>>,
    pub registered_at: DateTime<Utc>,
    pub shards_done: i64,
    pub shards_failed: i64,
    /// Micro-credits earned: shard fees and epoch rewards.
    pub earnings: i64,
}

#[derive(sqlx::FromRow)]
struct NodeRow {
    id: String,
    name: String,
    status: String,
    capabilities: Option<serde_json::Value>,
    announced_at: Option<DateTime<Utc>>,
    registered_at: DateTime<Utc>,
    shards_done: i64,
    shards_failed: i64,
    earnings: i64,
}

const NODE_SELECT: &str = "SELECT n.id, n.name, n.status, n.capabilities, n.announced_at,
        n.registered_at, n.shards_done, n.shards_failed, COALESCE(l.balance, 0) AS earnings
    FROM nodes n LEFT JOIN ledger_accounts l ON l.owner = n.account_id AND l.purpose = 'earnings'";

/// A capability statement as others may read it: without the registry models the node holds,
/// whose hashes would fingerprint customers' private models.
fn public_capabilities(mut statement: serde_json::Value) -> serde_json::Value {
    if let Some(fields) = statement.as_object_mut() {
        fields.remove("held_models");
    }
    statement
}

async fn with_liveness(presence: &dyn Presence, rows: Vec<NodeRow>) -> anyhow::Result<Vec<Node>> {
    let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
    let alive = presence.alive(&ids).await?;
    Ok(rows
        .into_iter()
        .zip(alive)
        .map(|(r, alive)| Node {
            id: r.id,
            name: r.name,
            status: r.status,
            alive,
            capabilities: r.capabilities.map(public_capabilities),
            announced_at: r.announced_at,
            registered_at: r.registered_at,
            shards_done: r.shards_done,
            shards_failed: r.shards_failed,
            earnings: r.earnings,
        })
        .collect())
}

pub async fn list(pool: &PgPool, presence: &dyn Presence) -> Result<Vec<Node>, AppError> {
    let rows: Vec<NodeRow> = sqlx::query_as(&format!("{NODE_SELECT} ORDER BY n.registered_at"))
        .fetch_all(pool)
        .await?;
    Ok(with_liveness(presence, rows).await?)
}

pub async fn get(pool: &PgPool, presence: &dyn Presence, id: &str) -> Result<Node, AppError> {
    let rows: Vec<NodeRow> = sqlx::query_as(&format!("{NODE_SELECT} WHERE n.id = $1"))
        .bind(id)
        .fetch_all(pool)
        .await?;
    with_liveness(presence, rows)
        .await?
        .pop()
        .ok_or(AppError::NotFound("node"))
}
