//! Sweeping: what no message will fix. Lapsed leases and silent nodes hand their shards back,
//! stragglers get speculative copies, held results no node can check are accepted, stranded
//! reductions restart, and jobs that cannot finish fail (a shard out of attempts normally fails
//! its job the moment it is re-queued; the sweep is the backstop).

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;
use xpand_protocol::ShardOutput;

use super::kind::Reduction;
use super::settlement::{
    cancel_overdue, complete_shard, fail, fail_hopeless, lock_job, reduce_deferred, Accepted,
    Settling,
};
use super::Scheduler;
use crate::config::Scheduling;
use crate::nodes::{self, Failure};
use crate::shutdown::Shutdown;

/// Returns lapsed shards to the queue and fails jobs that cannot finish, every tick.
pub async fn run_sweeper(scheduler: Scheduler, shutdown: Shutdown) {
    let tick =
        (scheduler.rules.lease / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = shutdown.wait() => return,
        }
        if let Err(e) = sweep(&scheduler).await {
            tracing::warn!(error = ?e, "sweep failed");
        }
    }
}

/// Why assigned shards are taken back from their nodes.
pub enum Lost<'a> {
    /// Their leases lapsed without progress.
    LeaseLapsed,
    /// Their nodes' heartbeats stopped.
    NodesGone(&'a [String]),
    /// `node` started a new process at `started_at_ms`: what it was given before is gone.
    Restarted { node: &'a str, started_at_ms: i64 },
}

/// Returns lost shards to the queue, each node charged a failure for each, and wakes the
/// dispatcher. Returns how many went back.
pub async fn requeue_lost(scheduler: &Scheduler, lost: Lost<'_>) -> anyhow::Result<usize> {
    let (lapsed, gone, restarted, started_at_ms, why) = match lost {
        Lost::LeaseLapsed => (true, &[][..], None, 0, Failure::LeaseLapsed),
        Lost::NodesGone(nodes) => (false, nodes, None, 0, Failure::NodeLost),
        Lost::Restarted {
            node,
            started_at_ms,
        } => (false, &[][..], Some(node), started_at_ms, Failure::NodeLost),
    };
    let mut tx = scheduler.db.begin().await?;
    let requeued: Vec<(String, Uuid)> = sqlx::query!(
        r#"WITH lost AS (
               SELECT id, node_id FROM shards
               WHERE status = 'assigned'
                 AND (($1 AND lease_expires_at < now())
                      OR node_id = ANY($2)
                      OR (node_id = $3 AND assigned_at < to_timestamp($4::float8 / 1000)))
               FOR UPDATE SKIP LOCKED)
           UPDATE shards s SET status = 'pending', node_id = NULL, assignment_id = NULL,
                  lease_expires_at = NULL,
                  excluded_nodes = array_add_once(s.excluded_nodes, l.node_id)
           FROM lost l WHERE s.id = l.id
           RETURNING l.node_id AS "node_id!", s.id"#,
        lapsed,
        gone,
        restarted,
        started_at_ms as f64,
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|r| (r.node_id, r.id))
    .collect();
    if !requeued.is_empty() {
        nodes::charge_failures(&mut tx, &requeued, why).await?;
    }
    tx.commit().await?;
    if !requeued.is_empty() {
        tracing::info!(shards = requeued.len(), reason = ?why, "re-queued lost shards");
        let shards: Vec<Uuid> = requeued.iter().map(|(_, shard)| *shard).collect();
        fail_hopeless(scheduler, Some(&shards)).await?;
        scheduler.wake_dispatcher();
    }
    Ok(requeued.len())
}

/// Gives each straggler — a primary running `XPAND_STRAGGLER_FACTOR` times longer than the median
/// of its job's finished shards, and at least `XPAND_STRAGGLER_MIN_SECS` — one speculative copy
/// for another node. The first valid result wins (see [`super::results`]). Returns the
/// primaries that got a copy.
pub async fn speculate(db: &PgPool, rules: &Scheduling) -> sqlx::Result<Vec<Uuid>> {
    let copies: Vec<Uuid> = sqlx::query_scalar(
        // The running jobs first (a handful), then their finished shards by job: asked the
        // other way round, the planner checked every finished shard in the table against the
        // running ones, 10 s on a development database of 19,000 shards.
        "WITH running AS MATERIALIZED (
             SELECT DISTINCT job_id FROM shards WHERE status = 'assigned' AND replica_of IS NULL),
         finished AS (
             SELECT d.job_id, percentile_cont(0.5) WITHIN GROUP (
                        ORDER BY extract(epoch FROM d.completed_at - d.assigned_at)) AS median
             FROM running r JOIN shards d ON d.job_id = r.job_id
             WHERE d.status IN ('done', 'verifying') AND d.replica_of IS NULL
               AND d.assigned_at IS NOT NULL AND d.completed_at IS NOT NULL
             GROUP BY d.job_id)
         INSERT INTO shards (id, job_id, idx, row_offset, row_count, model, task, fee, status,
                             excluded_nodes, replica_of, speculative)
         SELECT gen_random_uuid(), s.job_id, s.idx, s.row_offset, s.row_count, s.model, s.task,
                0, 'pending', array_add_once(s.excluded_nodes, s.node_id), s.id, true
         FROM shards s JOIN finished f ON f.job_id = s.job_id
         WHERE s.status = 'assigned' AND s.replica_of IS NULL
           AND s.assigned_at < now() - make_interval(secs => greatest($1, $2 * f.median))
           AND NOT EXISTS (SELECT 1 FROM shards c WHERE c.replica_of = s.id AND c.speculative)
         RETURNING replica_of",
    )
    .bind(rules.straggler_min_secs)
    .bind(rules.straggler_factor)
    .fetch_all(db)
    .await?;
    if !copies.is_empty() {
        tracing::info!(shards = ?copies, "stragglers got speculative copies");
    }
    Ok(copies)
}

/// Held results that no node has checked `XPAND_VERIFY_WAIT_SECS` after they were held, with
/// no replica running now (none eligible is alive, or the only checker died and its lease
/// lapsed): each is accepted as its node answered, marked unverified on the shard and the job,
/// and its outstanding replicas are dropped. A job never waits out its timeout for a check
/// that cannot happen.
async fn accept_unchecked(scheduler: &Scheduler) -> anyhow::Result<()> {
    const NO_RUNNING_REPLICA: &str = "NOT EXISTS (SELECT 1 FROM shards r
                                      WHERE r.replica_of = p.id AND r.status = 'assigned')";
    let stuck: Vec<(Uuid, Uuid)> = sqlx::query_as(&format!(
        "SELECT p.id, p.job_id FROM shards p
         WHERE p.status = 'verifying' AND p.completed_at < now() - $1 * interval '1 second'
           AND {NO_RUNNING_REPLICA}"
    ))
    .bind(scheduler.rules.verify_wait.as_secs_f64())
    .fetch_all(&scheduler.db)
    .await?;
    for (primary, job_id) in stuck {
        let mut tx = scheduler.db.begin().await?;
        let job = lock_job(&mut tx, job_id).await?;
        if job.status.is_terminal() {
            continue;
        }
        // Re-checked under the job lock: a replica may have been dispatched or answered since.
        let held: Option<(i32, i32, sqlx::types::Json<ShardOutput>)> = sqlx::query_as(&format!(
            "UPDATE shards p SET status = 'done', unverified = true
                 WHERE p.id = $1 AND p.status = 'verifying' AND {NO_RUNNING_REPLICA}
                 RETURNING p.idx, p.row_offset, p.output"
        ))
        .bind(primary)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((idx, row_offset, output)) = held else {
            continue;
        };
        sqlx::query!(
            "UPDATE shards SET status = 'canceled', lease_expires_at = NULL
             WHERE replica_of = $1 AND status = 'pending'",
            primary
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query!(
            "UPDATE jobs SET unverified_shards = array_append(unverified_shards, $2) WHERE id = $1",
            job_id,
            idx
        )
        .execute(&mut *tx)
        .await?;
        let kind = scheduler.kinds.of(&job.kind)?;
        let accepted = Accepted {
            idx,
            row_offset,
            output: output.0,
        };
        let mut settling = Settling::default();
        complete_shard(&mut tx, kind, &job, accepted, None, &mut settling).await?;
        settling.commit(scheduler, tx).await?;
        scheduler
            .metrics
            .unverified_shards
            .with_label_values(&[kind.name()])
            .inc();
        tracing::warn!(job = %job_id, shard = %primary, "no node could check a held result in time; accepted it unverified");
    }
    Ok(())
}

/// One pass of the sweeper: lost shards back to the queue, stragglers copied, unchecked held
/// results accepted, stranded joins restarted, exhausted and timed-out jobs failed, jobs past
/// their deadline canceled.
pub async fn sweep(scheduler: &Scheduler) -> anyhow::Result<()> {
    // Leases that lapsed without progress: the node is presumed dead or stuck.
    requeue_lost(scheduler, Lost::LeaseLapsed).await?;
    // Shards held by nodes whose heartbeats stopped: no need to wait out their leases. (A Redis
    // that lost its keys makes live nodes look gone for a heartbeat; their shards then run
    // twice and the first run's late result is dropped as stale: wasted work, nothing wrong.)
    let holders = sqlx::query_scalar!(
        r#"SELECT DISTINCT node_id AS "node_id!" FROM shards
           WHERE status = 'assigned' AND node_id IS NOT NULL"#
    )
    .fetch_all(&scheduler.db)
    .await?;
    let alive = scheduler.presence.alive(&holders).await?;
    let gone: Vec<String> = holders
        .into_iter()
        .zip(alive)
        .filter_map(|(node, alive)| (!alive).then_some(node))
        .collect();
    if !gone.is_empty() {
        requeue_lost(scheduler, Lost::NodesGone(&gone)).await?;
    }

    if !speculate(&scheduler.db, &scheduler.rules).await?.is_empty() {
        scheduler.wake_dispatcher();
    }
    accept_unchecked(scheduler).await?;
    restart_reductions(scheduler).await?;

    // Normally failed as soon as they are re-queued; this catches a failure to fail them then.
    fail_hopeless(scheduler, None).await?;
    cancel_overdue(scheduler).await?;

    let timed_out = sqlx::query_scalar!(
        "SELECT id FROM jobs WHERE status IN ('queued', 'running')
           AND created_at < now() - $1 * interval '1 second'",
        scheduler.rules.job_timeout.as_secs_f64()
    )
    .fetch_all(&scheduler.db)
    .await?;
    for job_id in timed_out {
        fail(
            scheduler,
            job_id,
            "timed_out",
            "the job did not finish in time (no capable node was available?)",
        )
        .await?;
    }
    Ok(())
}

/// Deferred reductions of jobs whose shards are all done but whose reduction was never
/// claimed, or whose claimant went quiet (crashed mid-reduction): started again here.
async fn restart_reductions(scheduler: &Scheduler) -> sqlx::Result<()> {
    for kind in scheduler.kinds.iter() {
        let Reduction::Deferred { lease } = kind.reduction() else {
            continue;
        };
        let stranded: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM jobs
             WHERE kind = $1 AND status = 'running' AND shards_done = shards_total
               AND (reduce_claimed_at IS NULL
                    OR reduce_claimed_at < now() - $2 * interval '1 second')
               AND updated_at < now() - interval '2 seconds'",
        )
        .bind(kind.name())
        .bind(lease.as_secs_f64())
        .fetch_all(&scheduler.db)
        .await?;
        for job_id in stranded {
            tokio::spawn(reduce_deferred(scheduler.clone(), kind.clone(), job_id));
        }
    }
    Ok(())
}
