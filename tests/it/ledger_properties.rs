//! Properties of the ledger on the real Postgres, driven through its API (no HTTP): random
//! sequences of deposits, escrow holds and releases and epoch payouts, each in a transaction of
//! its own as the product runs them, checked op by op against a model and after every sequence
//! against the ledger's invariants; the same money moving concurrently, with a sealer under it;
//! and the reward split on its own.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestCaseResult, TestRunner};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;
use xpand::epochs::{self, split_pool};
use xpand::ledger::escrow::{self, Release};
use xpand::ledger::{self, blocks, LedgerError, Purpose, SYSTEM_ACCOUNT};
use xpand_chain as chain;
use xpand_protocol::NodeKey;

use crate::common::pg_server;

/// Nodes each generated sequence pays.
const NODES: usize = 3;

/// A fresh, migrated database for one test, named like the harness's so that one a crashed run
/// left is swept; dropped by [`TestDb::drop`].
struct TestDb {
    name: String,
    pool: PgPool,
}

impl TestDb {
    async fn create(connections: u32) -> Self {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let name = format!(
            "xpand_t_{secs}_{}",
            &Uuid::new_v4().simple().to_string()[..12]
        );
        let mut admin = PgConnection::connect(&format!("{}/postgres", pg_server()))
            .await
            .expect("Postgres must be running on 127.0.0.1:5432 (make test starts it)");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let pool = PgPoolOptions::new()
            .max_connections(connections)
            .connect(&format!("{}/{name}", pg_server()))
            .await
            .unwrap();
        xpand::startup::migrate(&pool).await.unwrap();
        Self { name, pool }
    }

    async fn drop(self) {
        self.pool.close().await;
        let mut admin = PgConnection::connect(&format!("{}/postgres", pg_server()))
            .await
            .unwrap();
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .await
        .unwrap();
    }
}

/// Runs `op` in a transaction of its own, committed if it succeeds and rolled back otherwise, as
/// the product runs every posting.
async fn in_tx<T>(
    pool: &PgPool,
    op: impl AsyncFnOnce(&mut PgConnection) -> Result<T, LedgerError>,
) -> Result<T, LedgerError> {
    let mut tx = pool.begin().await?;
    let out = op(&mut tx).await?;
    tx.commit().await?;
    Ok(out)
}

/// Every balance, and how many transactions and entries there are.
type Snapshot = (Vec<(i64, i64)>, i64, i64);

async fn snapshot(pool: &PgPool) -> Snapshot {
    let balances = sqlx::query_as("SELECT id, balance FROM ledger_accounts ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap();
    let (txs, entries) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM ledger_transactions), (SELECT count(*) FROM ledger_entries)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    (balances, txs, entries)
}

/// Runs `op` in its own transaction: it must be refused with an error `expected` accepts, and
/// leave the ledger exactly as it was.
async fn assert_refused<T: std::fmt::Debug>(
    pool: &PgPool,
    expected: fn(&LedgerError) -> bool,
    op: impl AsyncFnOnce(&mut PgConnection) -> Result<T, LedgerError>,
) -> TestCaseResult {
    let before = snapshot(pool).await;
    let result = in_tx(pool, op).await;
    prop_assert!(
        matches!(&result, Err(e) if expected(e)),
        "not refused as expected: {result:?}"
    );
    prop_assert_eq!(
        snapshot(pool).await,
        before,
        "a refused posting changed the ledger"
    );
    Ok(())
}

fn overdrawn(e: &LedgerError) -> bool {
    matches!(e, LedgerError::Overdrawn)
}

fn already_posted(e: &LedgerError) -> bool {
    matches!(e, LedgerError::AlreadyPosted(_))
}

/// A posting that had to succeed failed (`Debug` keeps the SQLSTATE, e.g. 40P01 for a deadlock).
fn failed(e: LedgerError) -> TestCaseError {
    TestCaseError::fail(format!("posting failed: {e:?}"))
}

/// How a released amount is divided: weights of payouts to nodes, and of the gateway's fee.
#[derive(Debug, Clone)]
struct Split {
    payouts: Vec<(Index, u16)>,
    fee: u16,
}

impl Split {
    /// Divides exactly `amount`; the fee takes the rounding (everything when all weights are 0).
    fn release(&self, amount: i64, nodes: &[Node]) -> Release {
        let total =
            self.payouts.iter().map(|(_, w)| i64::from(*w)).sum::<i64>() + i64::from(self.fee);
        let payouts: Vec<(Uuid, i64)> = self
            .payouts
            .iter()
            .map(|(node, w)| {
                let share = if total == 0 {
                    0
                } else {
                    amount * i64::from(*w) / total
                };
                (node.get(nodes).account, share)
            })
            .collect();
        let fee = amount - payouts.iter().map(|(_, a)| a).sum::<i64>();
        Release {
            payouts,
            fee,
            royalty: None,
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Deposit {
        customer: Index,
        amount: i64,
    },
    /// Escrow for a new job; refused when the customer's available balance is short.
    Hold {
        customer: Index,
        amount: i64,
    },
    /// Releases a held job: `spend_pct` of its escrow paid out by `split`, the rest refunded
    /// (100: a job that succeeded; less: one canceled; more: a release that must be refused).
    Release {
        job: Index,
        spend_pct: u8,
        split: Split,
    },
    /// Holds a job again, or releases a released one again: refused, nothing changes.
    Replay {
        job: Index,
        hold: bool,
    },
    /// Pays an epoch: `issuance` plus `fee_pct` of revenue, split by one score per node.
    /// `overdraw` first tries to take more than revenue holds.
    CloseEpoch {
        scores: Vec<i64>,
        issuance: i64,
        fee_pct: u8,
        overdraw: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let split = (
        prop::collection::vec((any::<Index>(), any::<u16>()), 0..=NODES + 1),
        any::<u16>(),
    )
        .prop_map(|(payouts, fee)| Split { payouts, fee });
    let spend_pct = prop_oneof![2 => Just(100u8), 2 => 0u8..100, 1 => 101u8..=110];
    let score = prop_oneof![Just(0i64), -1_000i64..0, 1i64..1_000];
    prop_oneof![
        3 => (any::<Index>(), 1i64..=1_000_000)
            .prop_map(|(customer, amount)| Op::Deposit { customer, amount }),
        4 => (any::<Index>(), 1i64..=2_000_000)
            .prop_map(|(customer, amount)| Op::Hold { customer, amount }),
        4 => (any::<Index>(), spend_pct, split)
            .prop_map(|(job, spend_pct, split)| Op::Release { job, spend_pct, split }),
        1 => (any::<Index>(), any::<bool>()).prop_map(|(job, hold)| Op::Replay { job, hold }),
        1 => (
            prop::collection::vec(score, NODES),
            0i64..=1_000_000,
            0u8..=100,
            prop::bool::weighted(0.25),
        )
            .prop_map(|(scores, issuance, fee_pct, overdraw)| Op::CloseEpoch {
                scores,
                issuance,
                fee_pct,
                overdraw,
            }),
    ]
}

#[derive(Debug, Clone)]
struct Node {
    id: String,
    account: Uuid,
}

#[derive(Debug, Clone, Copy)]
struct Job {
    id: Uuid,
    customer: Uuid,
    escrow: i64,
    released: bool,
}

/// What the ledger must hold after each op of one sequence.
struct Model {
    customers: Vec<Uuid>,
    nodes: Vec<Node>,
    /// Every ledger account the sequence touches, by (owner, purpose).
    balances: BTreeMap<(Uuid, String), i64>,
    jobs: Vec<Job>,
    /// Epochs the sequence paid, with their pools.
    epochs: Vec<(i64, i64)>,
}

impl Model {
    /// New customers with opening `credits` and [`NODES`] new nodes.
    async fn open(pool: &PgPool, credits: &[i64]) -> Self {
        // The system accounts are shared by every sequence: start from what they hold now.
        let system: Vec<(String, i64)> =
            sqlx::query_as("SELECT purpose, balance FROM ledger_accounts WHERE owner = $1")
                .bind(SYSTEM_ACCOUNT)
                .fetch_all(pool)
                .await
                .unwrap();
        let mut model = Model {
            customers: Vec::new(),
            nodes: Vec::new(),
            balances: system
                .into_iter()
                .map(|(purpose, balance)| ((SYSTEM_ACCOUNT, purpose), balance))
                .collect(),
            jobs: Vec::new(),
            epochs: Vec::new(),
        };
        for &credit in credits {
            let (id, _) = xpand::accounts::create_customer(pool, "prop", credit)
                .await
                .unwrap();
            model.add(id, Purpose::Held, 0);
            model.add(id, Purpose::Available, credit);
            model.add(SYSTEM_ACCOUNT, Purpose::Issuance, -credit);
            model.customers.push(id);
        }
        for _ in 0..NODES {
            let id = NodeKey::generate().id().to_string();
            let account = xpand::nodes::register(pool, &id, "prop").await.unwrap();
            model.add(account, Purpose::Earnings, 0);
            model.nodes.push(Node { id, account });
        }
        model
    }

    fn add(&mut self, owner: Uuid, purpose: Purpose, amount: i64) {
        *self
            .balances
            .entry((owner, purpose.as_str().to_string()))
            .or_default() += amount;
    }

    fn balance(&self, owner: Uuid, purpose: Purpose) -> i64 {
        self.balances[&(owner, purpose.as_str().to_string())]
    }

    fn pay(&mut self, release: &Release) {
        self.add(SYSTEM_ACCOUNT, Purpose::Revenue, release.fee);
        for &(node, amount) in &release.payouts {
            self.add(node, Purpose::Earnings, amount);
        }
    }

    async fn apply(&mut self, pool: &PgPool, op: Op, next_epoch: &AtomicI64) -> TestCaseResult {
        match op {
            Op::Deposit { customer, amount } => {
                let customer = *customer.get(&self.customers);
                in_tx(pool, async |c| {
                    ledger::deposit(c, customer, amount, "prop deposit").await
                })
                .await
                .map_err(failed)?;
                self.add(SYSTEM_ACCOUNT, Purpose::Issuance, -amount);
                self.add(customer, Purpose::Available, amount);
            }
            Op::Hold { customer, amount } => {
                let customer = *customer.get(&self.customers);
                let id = Uuid::now_v7();
                let hold = async |c: &mut PgConnection| escrow::hold(c, customer, id, amount).await;
                if amount > self.balance(customer, Purpose::Available) {
                    return assert_refused(pool, overdrawn, hold).await;
                }
                in_tx(pool, hold).await.map_err(failed)?;
                self.add(customer, Purpose::Available, -amount);
                self.add(customer, Purpose::Held, amount);
                self.jobs.push(Job {
                    id,
                    customer,
                    escrow: amount,
                    released: false,
                });
            }
            Op::Release {
                job,
                spend_pct,
                split,
            } => {
                let held: Vec<usize> = (0..self.jobs.len())
                    .filter(|&i| !self.jobs[i].released)
                    .collect();
                if held.is_empty() {
                    return Ok(());
                }
                let index = *job.get(&held);
                let job = self.jobs[index];
                let mut spend = job.escrow * i64::from(spend_pct) / 100;
                if spend_pct > 100 {
                    spend = spend.max(job.escrow + 1);
                }
                let release = split.release(spend, &self.nodes);
                let settle =
                    async |c: &mut PgConnection| escrow::release(c, job.id, &release, "prop").await;
                if spend > job.escrow {
                    return assert_refused(pool, overdrawn, settle).await;
                }
                let released = in_tx(pool, settle).await.map_err(failed)?;
                prop_assert_eq!(
                    (released.account, released.escrow),
                    (job.customer, job.escrow)
                );
                let refund = released.refund;
                prop_assert_eq!(refund, job.escrow - spend);
                self.add(job.customer, Purpose::Held, -job.escrow);
                self.add(job.customer, Purpose::Available, refund);
                self.pay(&release);
                self.jobs[index].released = true;
                // A replayed settlement (a retry, a second replica) changes nothing, even when
                // it would divide the escrow differently.
                assert_refused(pool, already_posted, async |c| {
                    let refund_all = Release::default();
                    escrow::release(c, job.id, &refund_all, "again").await
                })
                .await?;
            }
            Op::Replay { job, hold } => {
                if self.jobs.is_empty() {
                    return Ok(());
                }
                let job = *job.get(&self.jobs);
                if hold {
                    assert_refused(pool, already_posted, async |c| {
                        escrow::hold(c, job.customer, job.id, job.escrow).await
                    })
                    .await?;
                } else if job.released {
                    assert_refused(pool, already_posted, async |c| {
                        let refund_all = Release::default();
                        escrow::release(c, job.id, &refund_all, "again").await
                    })
                    .await?;
                }
            }
            Op::CloseEpoch {
                scores,
                issuance,
                fee_pct,
                overdraw,
            } => {
                let n = next_epoch.fetch_add(1, Ordering::Relaxed);
                let revenue = self.balance(SYSTEM_ACCOUNT, Purpose::Revenue);
                let fee_share = revenue * i64::from(fee_pct) / 100;
                let ranked: Vec<(&str, i64)> = self
                    .nodes
                    .iter()
                    .zip(&scores)
                    .map(|(node, &score)| (node.id.as_str(), score))
                    .collect();
                let rewards_of = |pool: i64| -> Option<Vec<(Uuid, i64)>> {
                    let (shares, _) = split_pool(pool, &ranked)?;
                    Some(self.nodes.iter().map(|n| n.account).zip(shares).collect())
                };
                let Some(rewards) = rewards_of(issuance + fee_share) else {
                    // With no positive score the product pays nothing.
                    prop_assert!(scores.iter().all(|&s| s <= 0), "{scores:?}");
                    return Ok(());
                };
                prop_assert_eq!(
                    rewards.iter().map(|(_, r)| r).sum::<i64>(),
                    issuance + fee_share
                );
                if overdraw {
                    // Taking more than revenue holds is refused and leaves the epoch unpaid.
                    let greedy = rewards_of(issuance + revenue + 1).expect("a positive score");
                    assert_refused(pool, overdrawn, async |c| {
                        epochs::pay(c, n, issuance, revenue + 1, &greedy).await
                    })
                    .await?;
                }
                in_tx(pool, async |c| {
                    epochs::pay(c, n, issuance, fee_share, &rewards).await
                })
                .await
                .map_err(failed)?;
                self.add(SYSTEM_ACCOUNT, Purpose::Issuance, -issuance);
                self.add(SYSTEM_ACCOUNT, Purpose::Revenue, -fee_share);
                for &(node, reward) in &rewards {
                    self.add(node, Purpose::Earnings, reward);
                }
                self.epochs.push((n, issuance + fee_share));
                assert_refused(pool, already_posted, async |c| {
                    epochs::pay(c, n, issuance, fee_share, &rewards).await
                })
                .await?;
            }
        }
        Ok(())
    }

    /// Every account the sequence touches holds exactly what the model says.
    async fn check_balances(&self, pool: &PgPool) -> TestCaseResult {
        let owners: Vec<Uuid> = self.balances.keys().map(|(owner, _)| *owner).collect();
        let rows: Vec<(Uuid, String, i64)> = sqlx::query_as(
            "SELECT owner, purpose, balance FROM ledger_accounts WHERE owner = ANY($1)",
        )
        .bind(&owners)
        .fetch_all(pool)
        .await
        .unwrap();
        let actual: BTreeMap<(Uuid, String), i64> = rows
            .into_iter()
            .map(|(owner, purpose, balance)| ((owner, purpose), balance))
            .collect();
        prop_assert_eq!(&actual, &self.balances);
        Ok(())
    }

    /// Each job's escrow was held at the model's amount and released iff the model released
    /// it; each epoch paid exactly its pool.
    async fn check_jobs_and_epochs(&self, pool: &PgPool) -> TestCaseResult {
        for job in &self.jobs {
            let (held, released): (i64, bool) = sqlx::query_as(
                "SELECT
                   COALESCE((SELECT sum(e.amount) FROM ledger_entries e
                             JOIN ledger_transactions t ON t.id = e.tx_id
                             JOIN ledger_accounts a ON a.id = e.ledger_account_id
                             WHERE t.job_id = $1 AND t.kind = 'escrow_hold'
                               AND a.purpose = 'held'), 0)::bigint,
                   EXISTS (SELECT 1 FROM ledger_transactions
                           WHERE job_id = $1 AND kind = 'escrow_release')",
            )
            .bind(job.id)
            .fetch_one(pool)
            .await
            .unwrap();
            prop_assert_eq!((held, released), (job.escrow, job.released), "{:?}", job);
        }
        for &(n, expected) in &self.epochs {
            let paid: i64 = sqlx::query_scalar(
                "SELECT COALESCE(sum(e.amount), 0)::bigint FROM ledger_entries e
                 JOIN ledger_transactions t ON t.id = e.tx_id
                 JOIN ledger_accounts a ON a.id = e.ledger_account_id
                 WHERE t.kind = 'epoch_reward' AND t.epoch = $1 AND a.purpose = 'earnings'",
            )
            .bind(n)
            .fetch_one(pool)
            .await
            .unwrap();
            prop_assert_eq!(paid, expected, "epoch {}", n);
        }
        Ok(())
    }
}

/// The ledger's invariants over the whole database.
async fn check_invariants(pool: &PgPool) -> TestCaseResult {
    let unbalanced: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT tx_id, sum(amount)::bigint FROM ledger_entries GROUP BY tx_id
         HAVING sum(amount) <> 0",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    prop_assert!(
        unbalanced.is_empty(),
        "transactions that do not sum to zero: {unbalanced:?}"
    );

    let negative: Vec<(i64, String, i64)> = sqlx::query_as(
        "SELECT id, purpose, balance FROM ledger_accounts
         WHERE balance < 0 AND purpose <> 'issuance'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    prop_assert!(negative.is_empty(), "negative accounts: {negative:?}");

    let drifted: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT a.id, a.balance, COALESCE(sum(e.amount), 0)::bigint FROM ledger_accounts a
         LEFT JOIN ledger_entries e ON e.ledger_account_id = a.id
         GROUP BY a.id HAVING a.balance <> COALESCE(sum(e.amount), 0)",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    prop_assert!(
        drifted.is_empty(),
        "balances that are not the sum of their entries: {drifted:?}"
    );

    // Per job: held once; released at most once, and then taking exactly what was held from
    // `held` and paying out + refunding exactly that.
    let jobs: Vec<(Uuid, i64, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT t.job_id,
           count(DISTINCT t.id) FILTER (WHERE t.kind = 'escrow_hold'),
           count(DISTINCT t.id) FILTER (WHERE t.kind = 'escrow_release'),
           COALESCE(sum(e.amount) FILTER (WHERE t.kind = 'escrow_hold' AND a.purpose = 'held'),
                    0)::bigint,
           COALESCE(-sum(e.amount) FILTER (WHERE t.kind = 'escrow_release'
                                             AND a.purpose = 'held'), 0)::bigint,
           COALESCE(sum(e.amount) FILTER (WHERE t.kind = 'escrow_release' AND e.amount > 0),
                    0)::bigint
         FROM ledger_transactions t
         LEFT JOIN ledger_entries e ON e.tx_id = t.id
         LEFT JOIN ledger_accounts a ON a.id = e.ledger_account_id
         WHERE t.job_id IS NOT NULL
         GROUP BY t.job_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for (job, holds, releases, held, taken, paid) in jobs {
        prop_assert_eq!(holds, 1, "job {} held {} times", job, holds);
        match releases {
            0 => prop_assert_eq!((taken, paid), (0, 0), "job {}", job),
            1 => prop_assert_eq!((taken, paid), (held, held), "job {}", job),
            _ => prop_assert!(false, "job {job} released {releases} times"),
        }
    }

    let held: Vec<(Uuid, i64, i64)> = sqlx::query_as(
        "SELECT a.owner, a.balance, COALESCE(
           (SELECT sum(e.amount) FROM ledger_entries e
            JOIN ledger_transactions t ON t.id = e.tx_id
            WHERE e.ledger_account_id = a.id AND t.kind = 'escrow_hold'
              AND NOT EXISTS (SELECT 1 FROM ledger_transactions r
                              WHERE r.job_id = t.job_id AND r.kind = 'escrow_release')),
           0)::bigint AS unreleased
         FROM ledger_accounts a WHERE a.purpose = 'held'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for (owner, balance, unreleased) in held {
        prop_assert_eq!(
            balance,
            unreleased,
            "{}'s held balance is not the sum of its unreleased escrows",
            owner
        );
    }

    // Per epoch: one transaction, moving issuance and revenue to earnings only, all of it.
    let epochs: Vec<(i64, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT t.epoch, count(DISTINCT t.id),
           COALESCE(sum(e.amount) FILTER (WHERE a.purpose = 'earnings'), 0)::bigint,
           COALESCE(-sum(e.amount) FILTER (WHERE a.purpose IN ('issuance', 'revenue')),
                    0)::bigint,
           count(e.id) FILTER (WHERE a.purpose NOT IN ('earnings', 'issuance', 'revenue'))
         FROM ledger_transactions t
         LEFT JOIN ledger_entries e ON e.tx_id = t.id
         LEFT JOIN ledger_accounts a ON a.id = e.ledger_account_id
         WHERE t.kind = 'epoch_reward'
         GROUP BY t.epoch",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for (epoch, txs, rewards, pool_paid, strays) in epochs {
        prop_assert_eq!((txs, rewards, strays), (1, pool_paid, 0), "epoch {}", epoch);
    }

    let total: i64 =
        sqlx::query_scalar("SELECT COALESCE(sum(balance), 0)::bigint FROM ledger_accounts")
            .fetch_one(pool)
            .await
            .unwrap();
    prop_assert_eq!(total, 0, "money was created or lost");
    Ok(())
}

async fn run_sequence(
    pool: &PgPool,
    credits: &[i64],
    ops: Vec<Op>,
    next_epoch: &AtomicI64,
) -> TestCaseResult {
    let mut model = Model::open(pool, credits).await;
    for op in ops {
        model.apply(pool, op, next_epoch).await?;
        model.check_balances(pool).await?;
    }
    model.check_jobs_and_epochs(pool).await?;
    check_invariants(pool).await
}

#[test]
fn random_ledger_sequences_keep_every_invariant() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    // One database for all cases: each sequence opens its own customers and nodes, and the
    // shared system accounts are tracked from wherever the previous sequences left them.
    let db = rt.block_on(TestDb::create(4));
    let next_epoch = AtomicI64::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 24,
        // Every shrinking step replays a whole sequence against the database.
        max_shrink_iters: 64,
        source_file: Some(file!()),
        ..Config::default()
    });
    let sequences = (
        prop::collection::vec(0i64..=3_000_000, 1..=3),
        prop::collection::vec(op(), 1..40),
    );
    let result = runner.run(&sequences, |(credits, ops)| {
        rt.block_on(run_sequence(&db.pool, &credits, ops, &next_epoch))
    });
    rt.block_on(db.drop());
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Holds `amount` for a new job of `customer` and releases it by `release`, each in its own
/// transaction. False when the hold is refused for a short balance; any other error panics.
async fn hold_and_release(pool: &PgPool, customer: Uuid, amount: i64, release: &Release) -> bool {
    let job = Uuid::now_v7();
    match in_tx(pool, async |c| escrow::hold(c, customer, job, amount).await).await {
        Ok(()) => {}
        Err(LedgerError::Overdrawn) => return false,
        Err(e) => panic!("holding for job {job}: {e:?}"),
    }
    if let Err(e) = in_tx(pool, async |c| {
        escrow::release(c, job, release, "concurrent").await
    })
    .await
    {
        panic!("releasing job {job}: {e:?}");
    }
    true
}

/// Settlements for many jobs at once on one pool, a sealer sealing under them, and two closers
/// racing to pay the same epoch: exactly one pays, nothing deadlocks, every entry is sealed once,
/// and the ledger is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_settlements_and_racing_payouts_keep_the_ledger_whole() {
    const TASKS: usize = 40;
    const JOBS_PER_TASK: usize = 5;
    let db = TestDb::create(12).await;
    let pool = db.pool.clone();

    // The last customer affords only a few jobs: its holds race for a short balance.
    let credits = [20_000_000, 20_000_000, 20_000_000, 20_000_000, 15_000];
    let mut customers = Vec::new();
    for credit in credits {
        let (id, _) = xpand::accounts::create_customer(&pool, "race", credit)
            .await
            .unwrap();
        customers.push(id);
    }
    let mut nodes = Vec::new();
    for _ in 0..4 {
        let id = NodeKey::generate().id().to_string();
        let account = xpand::nodes::register(&pool, &id, "race").await.unwrap();
        nodes.push(Node { id, account });
    }
    let (customers, nodes) = (Arc::new(customers), Arc::new(nodes));

    // Revenue for the epoch to share; during the race it only grows.
    let warmup = Release {
        payouts: vec![(nodes[0].account, 5_000)],
        fee: 4_000,
        royalty: None,
    };
    assert!(hold_and_release(&pool, customers[0], 10_000, &warmup).await);
    let (issuance, fee_share) = (1_000_000, 3_000);
    let ranked: Vec<(&str, i64)> = nodes
        .iter()
        .zip([700, 0, -20, 300])
        .map(|(n, s)| (n.id.as_str(), s))
        .collect();
    let (shares, _) = split_pool(issuance + fee_share, &ranked).unwrap();
    let rewards: Arc<Vec<(Uuid, i64)>> =
        Arc::new(nodes.iter().map(|n| n.account).zip(shares).collect());

    let start = Arc::new(tokio::sync::Barrier::new(TASKS + 2));
    let mut settlers = Vec::new();
    for i in 0..TASKS {
        let (pool, customers, nodes, start) = (
            pool.clone(),
            customers.clone(),
            nodes.clone(),
            start.clone(),
        );
        settlers.push(tokio::spawn(async move {
            start.wait().await;
            let mut settled = Vec::new();
            for k in 0..JOBS_PER_TASK {
                let customer = customers[(i + k) % customers.len()];
                let amount = 1_000 + ((i * 31 + k * 17) % 40) as i64 * 250;
                let release = Release {
                    payouts: vec![
                        (nodes[i % nodes.len()].account, amount / 4),
                        (nodes[(i + k + 1) % nodes.len()].account, amount / 5),
                    ],
                    fee: amount / 10,
                    // Another customer's model: its owner's balance is locked by others' jobs too.
                    royalty: Some((customers[(i + k + 1) % customers.len()], amount / 20)),
                };
                if hold_and_release(&pool, customer, amount, &release).await {
                    settled.push((customer, release));
                }
            }
            settled
        }));
    }
    let closers: Vec<_> = (0..2)
        .map(|_| {
            let (pool, rewards, start) = (pool.clone(), rewards.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                in_tx(&pool, async |c| {
                    epochs::pay(c, 0, issuance, fee_share, &rewards).await
                })
                .await
            })
        })
        .collect();
    let seal_key = NodeKey::generate();
    let done = Arc::new(AtomicBool::new(false));
    let sealer = {
        let (pool, key, done) = (pool.clone(), seal_key.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                blocks::seal_all(&pool, key.signing_key())
                    .await
                    .expect("sealing under load");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let mut settled = vec![(customers[0], warmup)];
    for settler in settlers {
        settled.extend(settler.await.unwrap());
    }
    let mut paid = Vec::new();
    for closer in closers {
        paid.push(closer.await.unwrap());
    }
    done.store(true, Ordering::Relaxed);
    sealer.await.unwrap();

    let (ok, refused): (Vec<_>, Vec<_>) = paid.into_iter().partition(Result::is_ok);
    assert_eq!(ok.len(), 1, "exactly one payout of the epoch: {ok:?}");
    assert!(
        matches!(refused[..], [Err(LedgerError::AlreadyPosted(_))]),
        "the other is refused as already posted: {refused:?}"
    );
    assert!(
        settled.len() > TASKS * JOBS_PER_TASK / 2,
        "most jobs settled: {}",
        settled.len()
    );

    // Exactly the money that moved, where it moved.
    let mut expected: BTreeMap<(Uuid, String), i64> = BTreeMap::new();
    let mut add = |owner: Uuid, purpose: Purpose, amount: i64| {
        *expected
            .entry((owner, purpose.as_str().to_string()))
            .or_default() += amount;
    };
    add(SYSTEM_ACCOUNT, Purpose::Issuance, -issuance);
    add(SYSTEM_ACCOUNT, Purpose::Revenue, -fee_share);
    for (&customer, credit) in customers.iter().zip(credits) {
        add(SYSTEM_ACCOUNT, Purpose::Issuance, -credit);
        add(customer, Purpose::Available, credit);
        add(customer, Purpose::Held, 0);
    }
    for &(node, reward) in rewards.iter() {
        add(node, Purpose::Earnings, reward);
    }
    for (customer, release) in &settled {
        add(*customer, Purpose::Available, -release.cost());
        add(SYSTEM_ACCOUNT, Purpose::Revenue, release.fee);
        for &(node, amount) in &release.payouts {
            add(node, Purpose::Earnings, amount);
        }
        if let Some((owner, amount)) = release.royalty {
            add(owner, Purpose::Available, amount);
        }
    }
    let actual: BTreeMap<(Uuid, String), i64> = sqlx::query_as::<_, (Uuid, String, i64)>(
        "SELECT owner, purpose, balance FROM ledger_accounts",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(owner, purpose, balance)| ((owner, purpose), balance))
    .collect();
    assert_eq!(actual, expected);
    check_invariants(&pool).await.unwrap();

    // Sealing under load lost nothing: the blocks cover every entry, in order, and each block's
    // range gained no entry after it was sealed.
    blocks::seal_all(&pool, seal_key.signing_key())
        .await
        .unwrap();
    let sealed = blocks::list(&pool, 0, i64::MAX).await.unwrap();
    let mut next_entry = 1;
    for block in &sealed {
        block.verify_signature(&seal_key.verifying_key()).unwrap();
        assert_eq!(block.first_entry_id, next_entry, "block {}", block.height);
        let entries = blocks::entries(&pool, block).await.unwrap();
        let leaves: Vec<chain::Hash> = entries.iter().map(chain::SealedEntry::leaf).collect();
        assert_eq!(entries.len(), block.entry_count as usize);
        assert_eq!(
            hex::encode(chain::merkle_root(&leaves)),
            block.merkle_root,
            "block {} no longer matches its entries",
            block.height
        );
        next_entry = block.last_entry_id + 1;
    }
    let last_entry: i64 = sqlx::query_scalar("SELECT max(id) FROM ledger_entries")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(next_entry, last_entry + 1, "every entry is sealed");
    db.drop().await;
}

fn scores() -> impl Strategy<Value = Vec<(String, i64)>> {
    let score = prop_oneof![Just(0i64), -1_000i64..0, 1i64..1_000, any::<i64>()];
    // Distinct node ids, in random order (ties go to the smallest id, not the first).
    prop::collection::btree_map(any::<u16>(), score, 1..10)
        .prop_map(|m| {
            m.into_iter()
                .map(|(id, s)| (format!("{id:04x}"), s))
                .collect()
        })
        .prop_shuffle()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn split_pool_pays_the_whole_pool_in_score_order(
        pool in prop_oneof![0i64..=1_000_000_000, 0i64..=i64::MAX],
        scores in scores(),
    ) {
        let ranked: Vec<(&str, i64)> = scores.iter().map(|(id, s)| (id.as_str(), *s)).collect();
        let positive: Vec<i128> =
            ranked.iter().map(|&(_, s)| i128::from(s)).filter(|&s| s > 0).collect();
        let total: i128 = positive.iter().sum();
        let Some((rewards, top)) = split_pool(pool, &ranked) else {
            prop_assert_eq!(total, 0, "split refused despite a positive score");
            return Ok(());
        };
        prop_assert!(total > 0);
        prop_assert_eq!(rewards.len(), ranked.len());
        prop_assert_eq!(rewards.iter().map(|&r| i128::from(r)).sum::<i128>(), i128::from(pool));
        // The remainder goes to the best score, the smallest id among equals.
        let (top_id, top_score) = ranked[top];
        for (i, &(id, score)) in ranked.iter().enumerate() {
            prop_assert!(i == top || score < top_score || (score == top_score && id > top_id));
        }
        for (i, (&reward, &(_, score))) in rewards.iter().zip(&ranked).enumerate() {
            prop_assert!(reward >= 0);
            let share = (i128::from(pool) * i128::from(score.max(0)) / total) as i64;
            if i == top {
                // Each positive share rounds down by less than one.
                let remainder = reward - share;
                prop_assert!(remainder >= 0 && (remainder as usize) < positive.len());
            } else {
                prop_assert_eq!(reward, share);
            }
            if score <= 0 {
                prop_assert_eq!(reward, 0);
            }
        }
        // Monotone: a better score never earns less.
        for (a, &(_, sa)) in ranked.iter().enumerate() {
            for (b, &(_, sb)) in ranked.iter().enumerate() {
                if sa > sb || (sa == sb && a == top) {
                    prop_assert!(rewards[a] >= rewards[b], "{:?} vs {:?}", ranked[a], ranked[b]);
                }
            }
        }
    }
}
