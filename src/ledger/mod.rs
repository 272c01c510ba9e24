//! The double-entry ledger. Every movement of money in xpand goes through [`post`], inside the
//! caller's Postgres transaction, so a balance never changes without the state change it pays for.
//!
//! Invariants (enforced here and again by the schema):
//! - a transaction's entries sum to zero (checked before insert, and by a deferred trigger);
//! - no ledger account but the system's issuance account goes negative (a CHECK constraint);
//! - a job's escrow is held once and released once (a unique index on `(job_id, kind)`).
//!
//! Amounts are `i64` micro-credits.

pub mod blocks;
pub mod escrow;

use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use utoipa::ToSchema;
use uuid::Uuid;

/// The account that owns issuance (the source of deposits) and revenue (gateway fees).
pub const SYSTEM_ACCOUNT: Uuid = Uuid::nil();

/// What a ledger account holds for its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// A customer's spendable balance.
    Available,
    /// A customer's money escrowed for unfinished jobs.
    Held,
    /// A node's earnings from shards.
    Earnings,
    /// Where deposits come from; the only account allowed below zero.
    Issuance,
    /// The gateway's job fees.
    Revenue,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Available => "available",
            Purpose::Held => "held",
            Purpose::Earnings => "earnings",
            Purpose::Issuance => "issuance",
            Purpose::Revenue => "revenue",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxKind {
    Deposit,
    EscrowHold,
    EscrowRelease,
    EpochReward,
}

/// What a transaction is about; a job or an epoch has at most one transaction of each kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    None,
    Job(Uuid),
    Epoch(i64),
}

impl TxKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TxKind::Deposit => "deposit",
            TxKind::EscrowHold => "escrow_hold",
            TxKind::EscrowRelease => "escrow_release",
            TxKind::EpochReward => "epoch_reward",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger transaction does not balance (sum {0})")]
    Unbalanced(i64),
    #[error("this job's or epoch's {0} was already posted")]
    AlreadyPosted(&'static str),
    #[error("the posting would overdraw a ledger account")]
    Overdrawn,
    #[error("invalid amount: {0}")]
    InvalidAmount(&'static str),
    #[error("ledger account {owner}/{purpose} does not exist")]
    NoSuchAccount { owner: Uuid, purpose: &'static str },
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Creates the ledger accounts an owner needs (idempotent).
pub async fn open_accounts(
    conn: &mut PgConnection,
    owner: Uuid,
    purposes: &[Purpose],
) -> Result<(), sqlx::Error> {
    for p in purposes {
        sqlx::query(
            "INSERT INTO ledger_accounts (owner, purpose) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(owner)
        .bind(p.as_str())
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// The ids of the ledger accounts the postings name, in posting order, in one round trip.
async fn account_ids(
    conn: &mut PgConnection,
    postings: &[Posting],
) -> Result<Vec<i64>, LedgerError> {
    let owners: Vec<Uuid> = postings.iter().map(|p| p.owner).collect();
    let purposes: Vec<&str> = postings.iter().map(|p| p.purpose.as_str()).collect();
    let found: Vec<Option<i64>> = sqlx::query_scalar(
        "SELECT a.id FROM UNNEST($1::uuid[], $2::text[]) WITH ORDINALITY AS p(owner, purpose, n)
         LEFT JOIN ledger_accounts a ON a.owner = p.owner AND a.purpose = p.purpose
         ORDER BY p.n",
    )
    .bind(&owners)
    .bind(&purposes)
    .fetch_all(&mut *conn)
    .await?;
    found
        .into_iter()
        .zip(postings)
        .map(|(id, p)| {
            id.ok_or(LedgerError::NoSuchAccount {
                owner: p.owner,
                purpose: p.purpose.as_str(),
            })
        })
        .collect()
}

/// One leg of a transaction: `amount` (signed) to `owner`'s `purpose` account.
#[derive(Debug, Clone, Copy)]
pub struct Posting {
    pub owner: Uuid,
    pub purpose: Purpose,
    pub amount: i64,
}

/// A balanced transaction to record: its postings, what it is about, and a memo.
#[derive(Debug, Clone)]
pub struct Transaction {
    pub kind: TxKind,
    pub subject: Subject,
    pub memo: String,
    pub postings: Vec<Posting>,
}

/// Records a balanced transaction and applies it to the balances. Zero-amount postings are
/// dropped. Returns the transaction id. Runs in the caller's transaction: the caller commits.
pub async fn post(
    conn: &mut PgConnection,
    kind: TxKind,
    subject: Subject,
    memo: &str,
    postings: &[Posting],
) -> Result<i64, LedgerError> {
    let transaction = Transaction {
        kind,
        subject,
        memo: memo.to_string(),
        postings: postings.to_vec(),
    };
    let ids = post_all(conn, std::slice::from_ref(&transaction)).await?;
    Ok(ids[0])
}

/// Records several balanced transactions with a fixed number of statements, however many there
/// are, and applies them to the balances, each account changed once by the sum of its legs.
/// This is how a batch of settlements pays: the gateway's revenue and a busy customer's balance,
/// which every job touches, are locked once per batch. Returns the transaction ids in order.
/// Either every transaction is recorded or none: a failure (an unbalanced one, one posted
/// already, an overdraft) leaves the caller's Postgres transaction to roll back.
pub async fn post_all(
    conn: &mut PgConnection,
    transactions: &[Transaction],
) -> Result<Vec<i64>, LedgerError> {
    if transactions.is_empty() {
        return Ok(Vec::new());
    }
    // Every leg, flattened, with the index of its transaction.
    let mut legs: Vec<(i64, Posting)> = Vec::new();
    for (n, t) in transactions.iter().enumerate() {
        let sum = t
            .postings
            .iter()
            .try_fold(0i64, |acc, p| acc.checked_add(p.amount))
            .ok_or(LedgerError::Unbalanced(i64::MAX))?;
        if sum != 0 {
            return Err(LedgerError::Unbalanced(sum));
        }
        legs.extend(
            t.postings
                .iter()
                .filter(|p| p.amount != 0)
                .map(|&p| (n as i64 + 1, p)),
        );
    }
    let postings: Vec<Posting> = legs.iter().map(|&(_, p)| p).collect();
    let accounts = account_ids(conn, &postings).await?;
    let amounts: Vec<i64> = postings.iter().map(|p| p.amount).collect();
    let leg_tx: Vec<i64> = legs.iter().map(|&(n, _)| n).collect();

    let kinds: Vec<&str> = transactions.iter().map(|t| t.kind.as_str()).collect();
    let (jobs, epochs): (Vec<Option<Uuid>>, Vec<Option<i64>>) = transactions
        .iter()
        .map(|t| match t.subject {
            Subject::None => (None, None),
            Subject::Job(job) => (Some(job), None),
            Subject::Epoch(epoch) => (None, Some(epoch)),
        })
        .unzip();
    let memos: Vec<&str> = transactions.iter().map(|t| t.memo.as_str()).collect();
    // Ids are drawn first, in order, so the entries can name their transaction in the same
    // statement (the foreign key is checked at its end).
    let ids: Vec<i64> = sqlx::query_scalar(
        "WITH ids AS MATERIALIZED (
             SELECT n, nextval(pg_get_serial_sequence('ledger_transactions', 'id')) AS id
             FROM generate_series(1, cardinality($1::text[])) n),
         tx AS (
             INSERT INTO ledger_transactions (id, kind, job_id, epoch, memo)
             SELECT ids.id, t.kind, t.job_id, t.epoch, t.memo
             FROM UNNEST($1::text[], $2::uuid[], $3::bigint[], $4::text[])
                  WITH ORDINALITY AS t(kind, job_id, epoch, memo, n)
             JOIN ids ON ids.n = t.n),
         entries AS (
             INSERT INTO ledger_entries (tx_id, ledger_account_id, amount)
             SELECT ids.id, e.account, e.amount
             FROM UNNEST($5::bigint[], $6::bigint[], $7::bigint[]) AS e(n, account, amount)
             JOIN ids ON ids.n = e.n)
         SELECT id FROM ids ORDER BY n",
    )
    .bind(&kinds)
    .bind(&jobs)
    .bind(&epochs)
    .bind(&memos)
    .bind(&leg_tx)
    .bind(&accounts)
    .bind(&amounts)
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            LedgerError::AlreadyPosted(if transactions.len() == 1 {
                transactions[0].kind.as_str()
            } else {
                "transaction"
            })
        }
        _ => LedgerError::Db(e),
    })?;

    // Balances are touched last, so their row locks (some accounts, like the gateway's revenue,
    // are in every job) are held for as little of the transaction as possible. They are locked
    // in one global order (by id) so concurrent postings cannot deadlock, and each account
    // changes once, by the sum of its legs.
    let mut changes: Vec<(i64, i64)> = accounts.into_iter().zip(amounts).collect();
    changes.sort_unstable_by_key(|&(account, _)| account);
    changes.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            kept.1 += later.1;
        }
        same
    });
    changes.retain(|&(_, delta)| delta != 0);
    let (ids_changed, deltas): (Vec<i64>, Vec<i64>) = changes.into_iter().unzip();
    sqlx::query("SELECT id FROM ledger_accounts WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
        .bind(&ids_changed)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "UPDATE ledger_accounts a SET balance = a.balance + c.delta
         FROM UNNEST($1::bigint[], $2::bigint[]) AS c(id, delta) WHERE a.id = c.id",
    )
    .bind(&ids_changed)
    .bind(&deltas)
    .execute(&mut *conn)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(db) if db.is_check_violation() => LedgerError::Overdrawn,
        _ => LedgerError::Db(e),
    })?;
    Ok(ids)
}

/// Credits a customer from issuance: the stand-in for the paper's on-chain payment oracle. A
/// chain watcher would call this with the confirmed transfer as `memo`.
pub async fn deposit(
    conn: &mut PgConnection,
    account: Uuid,
    amount: i64,
    memo: &str,
) -> Result<i64, LedgerError> {
    if amount <= 0 {
        return Err(LedgerError::Unbalanced(amount));
    }
    post(
        conn,
        TxKind::Deposit,
        Subject::None,
        memo,
        &[
            Posting {
                owner: SYSTEM_ACCOUNT,
                purpose: Purpose::Issuance,
                amount: -amount,
            },
            Posting {
                owner: account,
                purpose: Purpose::Available,
                amount,
            },
        ],
    )
    .await
}

/// A customer's balances.
#[derive(Debug, Clone, Copy, Default, Serialize, ToSchema, PartialEq, Eq)]
pub struct Balances {
    /// Spendable micro-credits.
    pub available: i64,
    /// Micro-credits escrowed for unfinished jobs.
    pub held: i64,
}

pub async fn balances(pool: &PgPool, owner: Uuid) -> Result<Balances, sqlx::Error> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT purpose, balance FROM ledger_accounts WHERE owner = $1")
            .bind(owner)
            .fetch_all(pool)
            .await?;
    let mut b = Balances::default();
    for (purpose, balance) in rows {
        match purpose.as_str() {
            "available" => b.available = balance,
            "held" => b.held = balance,
            _ => {}
        }
    }
    Ok(b)
}

/// One ledger entry as an account owner sees it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema, sqlx::FromRow)]
pub struct LedgerEntry {
    pub id: i64,
    pub tx_id: i64,
    /// `deposit`, `escrow_hold`, `escrow_release` or `epoch_reward`.
    pub kind: String,
    /// Which of the owner's ledger accounts moved: `available`, `held`, `earnings`.
    pub purpose: String,
    /// Signed micro-credits.
    pub amount: i64,
    pub job_id: Option<Uuid>,
    pub memo: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// The owner's entries, newest first, strictly before entry id `before` when given.
pub async fn entries(
    pool: &PgPool,
    owner: Uuid,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<LedgerEntry>, sqlx::Error> {
    sqlx::query_as(
        "SELECT e.id, e.tx_id, t.kind, a.purpose, e.amount, t.job_id, t.memo, e.created_at
         FROM ledger_entries e
         JOIN ledger_accounts a ON a.id = e.ledger_account_id
         JOIN ledger_transactions t ON t.id = e.tx_id
         WHERE a.owner = $1 AND ($2::bigint IS NULL OR e.id < $2)
         ORDER BY e.id DESC LIMIT $3",
    )
    .bind(owner)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await
}
