//! Sealing ledger entries into commitment blocks, and serving blocks and inclusion proofs.
//!
//! Entry ids come from a sequence, so a transaction can commit an entry with a lower id after a
//! higher one is visible. The sealer therefore takes `LOCK TABLE ledger_entries IN SHARE MODE`:
//! it waits for every transaction that is inserting entries to finish and holds new ones off
//! while it reads, so a sealed id range can never later gain an entry. Sealers on several
//! replicas are serialised by an advisory lock. The same holds for the records sealed beside the
//! entries (capability statements and assignments, [`record`]).
//!
//! What is public and what is not: block headers and their leaf hashes ([`leaves`]) are for
//! anyone; an entry with its salt ([`prove`]) is for its owner and the auditor; whole blocks of
//! entries and records ([`entries`], [`records`]) and the balances ([`audit`]) for the auditor.

use chrono::Utc;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use utoipa::ToSchema;
use uuid::Uuid;

use xpand_chain::{
    self as chain, Block, BlockLeaves, Hash, InclusionProof, ProofStep, RecordProof, Sealed,
    SealedEntry, SealedRecord, GENESIS_PREV_HASH,
};

/// Most entries one block covers; a backlog is sealed into several blocks.
pub const MAX_ENTRIES_PER_BLOCK: i64 = 10_000;
/// Advisory lock key that serialises sealers across replicas ("xpandblk").
const SEAL_LOCK: i64 = 0x7870_616e_6462_6c6b;

const ENTRY_SELECT: &str =
    "SELECT e.id, e.tx_id, t.kind AS tx_kind, t.job_id, t.epoch, e.ledger_account_id,
        a.owner, a.purpose, e.amount, e.created_at, e.salt
    FROM ledger_entries e
    JOIN ledger_transactions t ON t.id = e.tx_id
    JOIN ledger_accounts a ON a.id = e.ledger_account_id";

const RECORD_SELECT: &str =
    "SELECT id, kind, node_id, digest, envelope, created_at, salt FROM chain_records";

const BLOCK_COLUMNS: &str = "height, first_entry_id, last_entry_id, entry_count, merkle_root, \
    first_record_id, last_record_id, record_count, records_root, prev_hash, sealed_at, \
    block_hash, signature";

/// Records that `node` said or was told `envelope` (in the caller's transaction), for sealing.
/// Only the envelope's sha256 is kept: an assignment carries the customer's input.
pub async fn record(
    conn: &mut PgConnection,
    kind: &str,
    node: &str,
    envelope: &[u8],
) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO chain_records (kind, node_id, digest) VALUES ($1, $2, $3)")
        .bind(kind)
        .bind(node)
        .bind(xpand_protocol::sha256_hex(envelope))
        .execute(conn)
        .await?;
    Ok(())
}

/// Seals the next block of unsealed entries, if there are any.
pub async fn seal_next(
    pool: &PgPool,
    key: &ed25519_dalek::SigningKey,
) -> sqlx::Result<Option<Block>> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(SEAL_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::query("LOCK TABLE ledger_entries, chain_records IN SHARE MODE")
        .execute(&mut *tx)
        .await?;
    let last = latest(&mut tx).await?;
    let first_entry_id = last.as_ref().map_or(1, |b| b.last_entry_id + 1);
    let first_record_id = last.as_ref().map_or(1, |b| b.last_record_id + 1);
    let entries: Vec<SealedEntry> = sqlx::query_as(&format!(
        "{ENTRY_SELECT} WHERE e.id >= $1 ORDER BY e.id LIMIT $2"
    ))
    .bind(first_entry_id)
    .bind(MAX_ENTRIES_PER_BLOCK)
    .fetch_all(&mut *tx)
    .await?;
    let records: Vec<SealedRecord> = sqlx::query_as(&format!(
        "{RECORD_SELECT} WHERE id >= $1 ORDER BY id LIMIT $2"
    ))
    .bind(first_record_id)
    .bind(MAX_ENTRIES_PER_BLOCK)
    .fetch_all(&mut *tx)
    .await?;
    if entries.is_empty() && records.is_empty() {
        return Ok(None);
    }
    let prev_hash: Hash = match &last {
        Some(b) => chain::parse_hash(&b.block_hash).unwrap_or(GENESIS_PREV_HASH),
        None => GENESIS_PREV_HASH,
    };
    let block = Block::seal(
        last.as_ref().map_or(1, |b| b.height + 1),
        (first_entry_id, first_record_id),
        &entries,
        &records,
        &prev_hash,
        Utc::now(),
        key,
    );
    sqlx::query(&format!(
        "INSERT INTO ledger_blocks ({BLOCK_COLUMNS})
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
    ))
    .bind(block.height)
    .bind(block.first_entry_id)
    .bind(block.last_entry_id)
    .bind(block.entry_count)
    .bind(&block.merkle_root)
    .bind(block.first_record_id)
    .bind(block.last_record_id)
    .bind(block.record_count)
    .bind(&block.records_root)
    .bind(&block.prev_hash)
    .bind(block.sealed_at)
    .bind(&block.block_hash)
    .bind(&block.signature)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(block))
}

/// Seals every `XPAND_SEAL_INTERVAL_SECS` until `shutdown`.
pub async fn run_sealer(
    db: PgPool,
    key: ed25519_dalek::SigningKey,
    every: std::time::Duration,
    shutdown: crate::shutdown::Shutdown,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait() => return,
        }
        match seal_all(&db, &key).await {
            Ok(sealed) if !sealed.is_empty() => {
                let last = sealed.last().expect("non-empty");
                tracing::info!(
                    blocks = sealed.len(),
                    height = last.height,
                    last_entry = last.last_entry_id,
                    "sealed ledger entries"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sealing the ledger failed"),
        }
    }
}

/// Seals what is unsealed now, in as many blocks as it takes; returns the blocks sealed.
///
/// It stops after the first block that is not full: under load, entries keep arriving, and a
/// sealer that chased them would take its table lock back to back, holding every money
/// movement off most of the time. What arrives meanwhile waits for the next round.
pub async fn seal_all(pool: &PgPool, key: &ed25519_dalek::SigningKey) -> sqlx::Result<Vec<Block>> {
    let mut sealed = Vec::new();
    while let Some(block) = seal_next(pool, key).await? {
        let full = i64::from(block.entry_count) >= MAX_ENTRIES_PER_BLOCK
            || i64::from(block.record_count) >= MAX_ENTRIES_PER_BLOCK;
        sealed.push(block);
        if !full {
            break;
        }
    }
    Ok(sealed)
}

async fn latest(conn: &mut PgConnection) -> sqlx::Result<Option<Block>> {
    sqlx::query_as(&format!(
        "SELECT {BLOCK_COLUMNS} FROM ledger_blocks ORDER BY height DESC LIMIT 1"
    ))
    .fetch_optional(conn)
    .await
}

/// Blocks with height above `after`, ascending (the order a verifier walks the chain in).
pub async fn list(pool: &PgPool, after: i64, limit: i64) -> sqlx::Result<Vec<Block>> {
    sqlx::query_as(&format!(
        "SELECT {BLOCK_COLUMNS} FROM ledger_blocks WHERE height > $1 ORDER BY height LIMIT $2"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await
}

pub async fn get(pool: &PgPool, height: i64) -> sqlx::Result<Option<Block>> {
    sqlx::query_as(&format!(
        "SELECT {BLOCK_COLUMNS} FROM ledger_blocks WHERE height = $1"
    ))
    .bind(height)
    .fetch_optional(pool)
    .await
}

/// The entries a block covers, in id order, as stored now.
pub async fn entries(pool: &PgPool, block: &Block) -> sqlx::Result<Vec<SealedEntry>> {
    sqlx::query_as(&format!(
        "{ENTRY_SELECT} WHERE e.id BETWEEN $1 AND $2 ORDER BY e.id"
    ))
    .bind(block.first_entry_id)
    .bind(block.last_entry_id)
    .fetch_all(pool)
    .await
}

/// The records a block covers, in id order, as stored now.
pub async fn records(pool: &PgPool, block: &Block) -> sqlx::Result<Vec<SealedRecord>> {
    sqlx::query_as(&format!(
        "{RECORD_SELECT} WHERE id BETWEEN $1 AND $2 ORDER BY id"
    ))
    .bind(block.first_record_id)
    .bind(block.last_record_id)
    .fetch_all(pool)
    .await
}

/// The leaf hashes of a block's entries and records: what anyone may see of its contents.
pub async fn leaves(pool: &PgPool, block: &Block) -> sqlx::Result<BlockLeaves> {
    fn hex_leaves<T: Sealed>(items: &[T]) -> Vec<String> {
        items.iter().map(|i| hex::encode(i.leaf())).collect()
    }
    Ok(BlockLeaves {
        height: block.height,
        entries: hex_leaves(&entries(pool, block).await?),
        records: hex_leaves(&records(pool, block).await?),
    })
}

/// The block whose `first_{what}_id..=last_{what}_id` holds `id`.
async fn block_holding(pool: &PgPool, what: &str, id: i64) -> sqlx::Result<Option<Block>> {
    sqlx::query_as(&format!(
        "SELECT {BLOCK_COLUMNS} FROM ledger_blocks
         WHERE first_{what}_id <= $1 AND last_{what}_id >= $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Where `id` sits among `items` and its path to their root.
fn path_to<T: Sealed + Clone>(items: &[T], id: i64) -> Option<(T, usize, Vec<ProofStep>)> {
    let index = items.iter().position(|i| i.id() == id)?;
    let leaves: Vec<Hash> = items.iter().map(Sealed::leaf).collect();
    Some((
        items[index].clone(),
        index,
        chain::merkle_proof(&leaves, index),
    ))
}

/// A proof for entry `id`, or `None` while it is not sealed (or does not exist). The caller
/// decides who may see it: it carries the entry's owner, amount and salt.
pub async fn prove(pool: &PgPool, id: i64) -> sqlx::Result<Option<InclusionProof>> {
    let Some(block) = block_holding(pool, "entry", id).await? else {
        return Ok(None);
    };
    let entries = entries(pool, &block).await?;
    Ok(
        path_to(&entries, id).map(|(entry, index, path)| InclusionProof {
            entry,
            index,
            path,
            block,
        }),
    )
}

/// A proof for record `id`, or `None` while it is not sealed (or does not exist).
pub async fn prove_record(pool: &PgPool, id: i64) -> sqlx::Result<Option<RecordProof>> {
    let Some(block) = block_holding(pool, "record", id).await? else {
        return Ok(None);
    };
    let records = records(pool, &block).await?;
    Ok(
        path_to(&records, id).map(|(record, index, path)| RecordProof {
            record,
            index,
            path,
            block,
        }),
    )
}

/// Ids of `node`'s sealed records after `after`, oldest first.
pub async fn sealed_record_ids(
    pool: &PgPool,
    node: &str,
    after: i64,
    limit: i64,
) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar(
        "SELECT id FROM chain_records
         WHERE node_id = $1 AND id > $2
           AND id <= (SELECT coalesce(max(last_record_id), 0) FROM ledger_blocks)
         ORDER BY id LIMIT $3",
    )
    .bind(node)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// One ledger account's balance, split at the last sealed entry: the auditor checks that the
/// sealed entries it verified plus `unsealed` make `balance`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct AuditAccount {
    pub ledger_account_id: i64,
    pub owner: Uuid,
    pub purpose: String,
    pub balance: i64,
    /// Sum of this account's entries after `sealed_through`.
    pub unsealed: i64,
}

/// Every ledger account at one instant.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditSnapshot {
    /// The last entry id sealed at that instant.
    pub sealed_through: i64,
    pub accounts: Vec<AuditAccount>,
}

/// Reads every balance and the unsealed sums in one snapshot.
pub async fn audit(pool: &PgPool) -> sqlx::Result<AuditSnapshot> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let sealed_through: i64 =
        sqlx::query_scalar("SELECT coalesce(max(last_entry_id), 0) FROM ledger_blocks")
            .fetch_one(&mut *tx)
            .await?;
    let accounts = sqlx::query_as(
        "SELECT a.id AS ledger_account_id, a.owner, a.purpose, a.balance,
                coalesce(sum(e.amount), 0)::bigint AS unsealed
         FROM ledger_accounts a
         LEFT JOIN ledger_entries e ON e.ledger_account_id = a.id AND e.id > $1
         GROUP BY a.id ORDER BY a.id",
    )
    .bind(sealed_through)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(AuditSnapshot {
        sealed_through,
        accounts,
    })
}

/// Ids of the entries that released a job's escrow (its settlement, refund or payout).
pub async fn settlement_entry_ids(pool: &PgPool, job_id: Uuid) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar(
        "SELECT e.id FROM ledger_entries e JOIN ledger_transactions t ON t.id = e.tx_id
         WHERE t.job_id = $1 AND t.kind = 'escrow_release' ORDER BY e.id",
    )
    .bind(job_id)
    .fetch_all(pool)
    .await
}
