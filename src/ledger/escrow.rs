//! Escrow: a job's quote moves from the caller's available balance to held at submit, and is
//! released exactly once at the end: paid to the nodes that did shards and to the gateway's fee,
//! the rest refunded.

use sqlx::PgConnection;
use uuid::Uuid;

use super::{
    post_all, LedgerError, Posting, Purpose, Subject, Transaction, TxKind, SYSTEM_ACCOUNT,
};

/// Moves `amount` (> 0) from `account`'s available balance to held, for `job_id`.
/// Fails with [`LedgerError::Overdrawn`] when the balance is short.
pub async fn hold(
    conn: &mut PgConnection,
    account: Uuid,
    job_id: Uuid,
    amount: i64,
) -> Result<(), LedgerError> {
    hold_all(conn, account, &[(job_id, amount)]).await
}

/// Holds each `(job, amount)` from `account`, as [`hold`] does each, with a fixed number of
/// statements ([`post_all`]). Either all are held or the call fails (overdrawn when their sum
/// is short) and the caller's transaction must roll back.
pub async fn hold_all(
    conn: &mut PgConnection,
    account: Uuid,
    holds: &[(Uuid, i64)],
) -> Result<(), LedgerError> {
    if holds.iter().any(|&(_, amount)| amount <= 0) {
        return Err(LedgerError::InvalidAmount("an escrow must be positive"));
    }
    let transactions: Vec<Transaction> = holds
        .iter()
        .map(|&(job, amount)| Transaction {
            kind: TxKind::EscrowHold,
            subject: Subject::Job(job),
            memo: "escrow for job".into(),
            postings: vec![
                Posting {
                    owner: account,
                    purpose: Purpose::Available,
                    amount: -amount,
                },
                Posting {
                    owner: account,
                    purpose: Purpose::Held,
                    amount,
                },
            ],
        })
        .collect();
    post_all(conn, &transactions).await.map(|_| ())
}

/// How a job's escrow is divided when it is released.
#[derive(Debug, Clone, Default)]
pub struct Release {
    /// Earnings per node account (the node's owning account id).
    pub payouts: Vec<(Uuid, i64)>,
    /// The gateway's fee, to revenue.
    pub fee: i64,
    /// A royalty to a model's owner account (to what it may spend).
    pub royalty: Option<(Uuid, i64)>,
}

impl Release {
    /// What the caller is charged: payouts, fee and royalty.
    pub fn cost(&self) -> i64 {
        self.payouts.iter().map(|(_, a)| a).sum::<i64>()
            + self.fee
            + self.royalty.map_or(0, |(_, amount)| amount)
    }
}

/// What a release did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// The account whose escrow it was.
    pub account: Uuid,
    /// What the hold had moved to held.
    pub escrow: i64,
    /// What went back to available.
    pub refund: i64,
}

/// Releases the escrow held for `job_id`: pays `release`, refunds the remainder to the account
/// that was charged. Who and how much come from the hold itself, so a release can never take
/// more, less or from someone else. A second release of the same job fails with
/// [`LedgerError::AlreadyPosted`] and changes nothing, which makes settlement idempotent.
pub async fn release(
    conn: &mut PgConnection,
    job_id: Uuid,
    release: &Release,
    memo: &str,
) -> Result<Released, LedgerError> {
    let released = release_all(conn, &[(job_id, release.clone(), memo.to_string())]).await?;
    Ok(released[0])
}

/// Releases several jobs' escrows, as [`release`] does each, with a fixed number of statements
/// ([`post_all`]): the holds are read in one query and the releases posted together. Either all
/// are released or the call fails and the caller's transaction must roll back.
pub async fn release_all(
    conn: &mut PgConnection,
    releases: &[(Uuid, Release, String)],
) -> Result<Vec<Released>, LedgerError> {
    if releases.iter().any(|(_, r, _)| {
        r.fee < 0 || r.payouts.iter().any(|&(_, a)| a < 0) || r.royalty.is_some_and(|(_, a)| a < 0)
    }) {
        return Err(LedgerError::InvalidAmount(
            "payouts and fees cannot be negative",
        ));
    }
    let jobs: Vec<Uuid> = releases.iter().map(|(job, _, _)| *job).collect();
    let holds: Vec<(Uuid, Uuid, i64)> = sqlx::query_as(
        "SELECT t.job_id, a.owner, e.amount FROM ledger_transactions t
         JOIN ledger_entries e ON e.tx_id = t.id
         JOIN ledger_accounts a ON a.id = e.ledger_account_id
         WHERE t.job_id = ANY($1) AND t.kind = 'escrow_hold' AND a.purpose = 'held'",
    )
    .bind(&jobs)
    .fetch_all(&mut *conn)
    .await?;
    let mut released = Vec::with_capacity(releases.len());
    let mut transactions = Vec::with_capacity(releases.len());
    for (job_id, release, memo) in releases {
        let &(_, account, escrow) = holds
            .iter()
            .find(|(job, _, _)| job == job_id)
            .ok_or(LedgerError::InvalidAmount("no escrow is held for this job"))?;
        let refund = escrow - release.cost();
        if refund < 0 {
            return Err(LedgerError::Overdrawn);
        }
        let mut postings = vec![
            Posting {
                owner: account,
                purpose: Purpose::Held,
                amount: -escrow,
            },
            Posting {
                owner: account,
                purpose: Purpose::Available,
                amount: refund,
            },
            Posting {
                owner: SYSTEM_ACCOUNT,
                purpose: Purpose::Revenue,
                amount: release.fee,
            },
        ];
        postings.extend(release.payouts.iter().map(|&(owner, amount)| Posting {
            owner,
            purpose: Purpose::Earnings,
            amount,
        }));
        postings.extend(release.royalty.map(|(owner, amount)| Posting {
            owner,
            purpose: Purpose::Available,
            amount,
        }));
        transactions.push(Transaction {
            kind: TxKind::EscrowRelease,
            subject: Subject::Job(*job_id),
            memo: memo.clone(),
            postings,
        });
        released.push(Released {
            account,
            escrow,
            refund,
        });
    }
    post_all(conn, &transactions).await?;
    Ok(released)
}
