//! Escrow: a job's quote moves from the caller's available balance to held at submit, and is
//! released exactly once at the end: paid to the nodes that did shards and to the gateway's fee,
//! the rest refunded.

use sqlx::PgConnection;
use uuid::Uuid;

use super::{post, LedgerError, Posting, Purpose, Subject, TxKind, SYSTEM_ACCOUNT};

/// Moves `amount` from `account`'s available balance to held, for `job_id`.
/// Fails with [`LedgerError::Overdrawn`] when the balance is short.
pub async fn hold(
    conn: &mut PgConnection,
    account: Uuid,
    job_id: Uuid,
    amount: i64,
) -> Result<(), LedgerError> {
    post(
        conn,
        TxKind::EscrowHold,
        Subject::Job(job_id),
        "escrow for job",
        &[
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
    )
    .await
    .map(|_| ())
}

/// How a job's escrow is divided when it is released.
#[derive(Debug, Clone, Default)]
pub struct Release {
    /// Earnings per node account (the node's owning account id).
    pub payouts: Vec<(Uuid, i64)>,
    /// The gateway's fee, to revenue.
    pub fee: i64,
}

impl Release {
    /// What the caller is charged: payouts plus fee.
    pub fn cost(&self) -> i64 {
        self.payouts.iter().map(|(_, a)| a).sum::<i64>() + self.fee
    }
}

/// Releases `escrow` held for `job_id`: pays `release`, refunds the remainder to available.
/// Returns the refund. A second release of the same job fails with
/// [`LedgerError::AlreadyPosted`] and changes nothing, which makes settlement idempotent.
pub async fn release(
    conn: &mut PgConnection,
    account: Uuid,
    job_id: Uuid,
    escrow: i64,
    release: &Release,
    memo: &str,
) -> Result<i64, LedgerError> {
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
    post(
        conn,
        TxKind::EscrowRelease,
        Subject::Job(job_id),
        memo,
        &postings,
    )
    .await?;
    Ok(refund)
}
