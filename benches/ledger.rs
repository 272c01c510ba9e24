//! Ledger throughput on the real Postgres (`XPAND_TEST_PG`, default 127.0.0.1:5432), in a
//! database of its own that is dropped at the end. Run: `cargo bench --bench ledger`.
//!
//! - Settlements: `XPAND_BENCH_JOBS` jobs (default 2000), each an escrow hold and then its
//!   release (payouts to two of four nodes, the gateway's fee, a refund), each in a transaction
//!   of its own as the product settles; once one at a time, once eight at a time. Each settler
//!   has its own customer; the revenue balance is one row every release credits, as in the
//!   product. Then the same in batches of 16, as the gateway stores submits and settles
//!   results that arrive together: 16 holds in one transaction ([`escrow::hold_all`]), then
//!   their 16 releases in one ([`escrow::release_all`]).
//! - Sealing: 100,000 entries sealed by `blocks::seal_all` (blocks of 10,000), then one
//!   inclusion proof for the entry in the middle. The entries are bulk-inserted in one statement
//!   as 50,000 balanced deposit transactions, with the balances moved to match (the deferred
//!   trigger checks each transaction at commit): posting them one by one through
//!   `ledger::deposit` would serialise on the issuance balance row for minutes, and the figure
//!   wanted is the sealer's, not the poster's.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;
use xpand::ledger::escrow::{self, Release};
use xpand::ledger::{blocks, Purpose, SYSTEM_ACCOUNT};
use xpand_protocol::NodeKey;

const ESCROW: i64 = 10_000;
const BULK_ENTRIES: i64 = 100_000;

/// One line of the results table.
struct Row {
    what: String,
    n: String,
    total: Duration,
    rate: String,
    /// p50 and p99 of one operation, where there are many.
    latency: Option<(Duration, Duration)>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let jobs: usize = match std::env::var("XPAND_BENCH_JOBS") {
        Ok(v) => v.parse().context("XPAND_BENCH_JOBS must be a number")?,
        Err(_) => 2000,
    };
    let server = std::env::var("XPAND_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    // Named like the tests' databases, so one an interrupted run leaves is swept by them.
    let secs = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let name = format!(
        "xpand_t_{secs}_{}",
        &Uuid::new_v4().simple().to_string()[..12]
    );
    let mut admin = PgConnection::connect(&format!("{server}/postgres"))
        .await
        .with_context(|| format!("connecting to Postgres at {server}"))?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await?;
    let result = run(&format!("{server}/{name}"), jobs).await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    print_table(&result?);
    Ok(())
}

async fn run(url: &str, jobs: usize) -> anyhow::Result<Vec<Row>> {
    let pool = PgPoolOptions::new().max_connections(9).connect(url).await?;
    xpand::startup::migrate(&pool).await?;
    let mut nodes = Vec::new();
    for i in 0..4 {
        let id = NodeKey::generate().id().to_string();
        nodes.push(xpand::nodes::register(&pool, &id, &format!("bench-{i}")).await?);
    }
    let mut rows = Vec::new();
    for concurrency in [1, 8] {
        rows.push(settlements(&pool, &nodes, jobs, concurrency).await?);
    }
    rows.push(batched_settlements(&pool, &nodes, jobs, 16).await?);
    rows.extend(sealing(&pool).await?);
    pool.close().await;
    Ok(rows)
}

/// Job `i`'s escrow held, then released: 30 % and 25 % to two of the nodes, 10 % fee, the rest
/// (35 %) refunded.
async fn settle(pool: &PgPool, customer: Uuid, nodes: &[Uuid], i: usize) -> anyhow::Result<()> {
    let job = Uuid::now_v7();
    let mut tx = pool.begin().await?;
    escrow::hold(&mut tx, customer, job, ESCROW).await?;
    tx.commit().await?;
    let mut tx = pool.begin().await?;
    escrow::release(&mut tx, job, &release_of(nodes, i), "bench").await?;
    tx.commit().await?;
    Ok(())
}

async fn settlements(
    pool: &PgPool,
    nodes: &[Uuid],
    jobs: usize,
    concurrency: usize,
) -> anyhow::Result<Row> {
    let mut customers = Vec::new();
    for _ in 0..concurrency {
        let credit = ESCROW * jobs as i64;
        customers.push(
            xpand::accounts::create_customer(pool, "bench", credit)
                .await?
                .0,
        );
    }
    let next = Arc::new(AtomicUsize::new(0));
    let nodes: Arc<[Uuid]> = nodes.into();
    let started = Instant::now();
    let mut settlers = tokio::task::JoinSet::new();
    for customer in customers {
        let (pool, nodes, next) = (pool.clone(), nodes.clone(), next.clone());
        settlers.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= jobs {
                    return anyhow::Ok(latencies);
                }
                let t = Instant::now();
                settle(&pool, customer, &nodes, i).await?;
                latencies.push(t.elapsed());
            }
        });
    }
    let mut latencies = Vec::with_capacity(jobs);
    while let Some(settled) = settlers.join_next().await {
        latencies.extend(settled??);
    }
    let total = started.elapsed();
    latencies.sort_unstable();
    Ok(Row {
        what: format!("settle (hold + release), concurrency {concurrency}"),
        n: format!("{jobs} jobs"),
        total,
        rate: format!("{:.0} jobs/s", jobs as f64 / total.as_secs_f64()),
        latency: Some((percentile(&latencies, 50), percentile(&latencies, 99))),
    })
}

/// Job `i`'s release: 30 % and 25 % to two of the nodes, 10 % fee, the rest refunded.
fn release_of(nodes: &[Uuid], i: usize) -> Release {
    Release {
        payouts: vec![
            (nodes[i % nodes.len()], ESCROW * 30 / 100),
            (nodes[(i + 1) % nodes.len()], ESCROW * 25 / 100),
        ],
        fee: ESCROW / 10,
        royalty: None,
    }
}

/// `jobs` settled as [`settle`] does, `batch` at a time: their holds in one transaction, then
/// their releases in one.
async fn batched_settlements(
    pool: &PgPool,
    nodes: &[Uuid],
    jobs: usize,
    batch: usize,
) -> anyhow::Result<Row> {
    let credit = ESCROW * jobs as i64;
    let (customer, _) = xpand::accounts::create_customer(pool, "bench", credit).await?;
    let started = Instant::now();
    let mut latencies = Vec::new();
    for first in (0..jobs).step_by(batch) {
        let t = Instant::now();
        let ids: Vec<usize> = (first..jobs.min(first + batch)).collect();
        let holds: Vec<(Uuid, i64)> = ids.iter().map(|_| (Uuid::now_v7(), ESCROW)).collect();
        let mut tx = pool.begin().await?;
        escrow::hold_all(&mut tx, customer, &holds).await?;
        tx.commit().await?;
        let releases: Vec<(Uuid, Release, String)> = holds
            .iter()
            .zip(&ids)
            .map(|(&(job, _), &i)| (job, release_of(nodes, i), "bench".to_string()))
            .collect();
        let mut tx = pool.begin().await?;
        escrow::release_all(&mut tx, &releases).await?;
        tx.commit().await?;
        latencies.push(t.elapsed());
    }
    let total = started.elapsed();
    latencies.sort_unstable();
    Ok(Row {
        what: format!("settle in batches of {batch} (hold_all + release_all; latency per batch)"),
        n: format!("{jobs} jobs"),
        total,
        rate: format!("{:.0} jobs/s", jobs as f64 / total.as_secs_f64()),
        latency: Some((percentile(&latencies, 50), percentile(&latencies, 99))),
    })
}

/// Nearest-rank percentile of sorted `values`.
fn percentile(values: &[Duration], p: usize) -> Duration {
    let rank = (values.len() * p).div_ceil(100).max(1);
    values[rank - 1]
}

async fn sealing(pool: &PgPool) -> anyhow::Result<Vec<Row>> {
    let key = NodeKey::generate();
    // Seal what the settlements left first, so that the timed run seals exactly the bulk.
    blocks::seal_all(pool, key.signing_key()).await?;
    let (customer, _) = xpand::accounts::create_customer(pool, "bulk", 0).await?;
    bulk_deposits(pool, customer, BULK_ENTRIES / 2).await?;

    let started = Instant::now();
    let sealed = blocks::seal_all(pool, key.signing_key()).await?;
    let seal_time = started.elapsed();
    let entries: i64 = sealed.iter().map(|b| i64::from(b.entry_count)).sum();
    anyhow::ensure!(entries == BULK_ENTRIES, "sealed {entries} entries");

    let (first, last) = match (sealed.first(), sealed.last()) {
        (Some(first), Some(last)) => (first.first_entry_id, last.last_entry_id),
        _ => anyhow::bail!("nothing was sealed"),
    };
    let middle = first + (last - first) / 2;
    let started = Instant::now();
    let proof = blocks::prove(pool, middle)
        .await?
        .context("the middle entry is sealed")?;
    let prove_time = started.elapsed();
    proof
        .verify(&key.verifying_key())
        .map_err(anyhow::Error::msg)?;

    Ok(vec![
        Row {
            what: "seal_all".into(),
            n: format!("{entries} entries, {} blocks", sealed.len()),
            total: seal_time,
            rate: format!("{:.0} entries/s", entries as f64 / seal_time.as_secs_f64()),
            latency: None,
        },
        Row {
            what: "prove (middle entry)".into(),
            n: format!("1 of a {}-entry block", proof.block.entry_count),
            total: prove_time,
            rate: "-".into(),
            latency: None,
        },
    ])
}

/// `count` deposit transactions of one micro-credit to `customer`, two entries each, inserted in
/// one statement; the issuance and available balances move by the same totals.
async fn bulk_deposits(pool: &PgPool, customer: Uuid, count: i64) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let account_id = "SELECT id FROM ledger_accounts WHERE owner = $1 AND purpose = $2";
    let issuance: i64 = sqlx::query_scalar(account_id)
        .bind(SYSTEM_ACCOUNT)
        .bind(Purpose::Issuance.as_str())
        .fetch_one(&mut *tx)
        .await?;
    let available: i64 = sqlx::query_scalar(account_id)
        .bind(customer)
        .bind(Purpose::Available.as_str())
        .fetch_one(&mut *tx)
        .await?;
    sqlx::query(
        "WITH txs AS (
             INSERT INTO ledger_transactions (kind, memo)
             SELECT 'deposit', 'bench bulk deposit' FROM generate_series(1, $1)
             RETURNING id)
         INSERT INTO ledger_entries (tx_id, ledger_account_id, amount)
         SELECT txs.id, leg.account, leg.amount
         FROM txs CROSS JOIN (VALUES ($2::bigint, -1::bigint), ($3::bigint, 1::bigint))
             AS leg(account, amount)
         ORDER BY txs.id, leg.amount",
    )
    .bind(count)
    .bind(issuance)
    .bind(available)
    .execute(&mut *tx)
    .await?;
    for (account, amount) in [(issuance, -count), (available, count)] {
        sqlx::query("UPDATE ledger_accounts SET balance = balance + $2 WHERE id = $1")
            .bind(account)
            .bind(amount)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn print_table(rows: &[Row]) {
    println!("| benchmark | n | total | rate | p50 | p99 |");
    println!("|---|---|---:|---:|---:|---:|");
    for r in rows {
        let (p50, p99) = r
            .latency
            .map_or(("-".into(), "-".into()), |(p50, p99)| (ms(p50), ms(p99)));
        let total = if r.total < Duration::from_secs(1) {
            ms(r.total)
        } else {
            format!("{:.2} s", r.total.as_secs_f64())
        };
        println!(
            "| {} | {} | {total} | {} | {p50} | {p99} |",
            r.what, r.n, r.rate
        );
    }
}
