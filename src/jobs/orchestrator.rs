//! The map → dispatch → reduce state machine.
//!
//! Shards live in Postgres: `pending` → `assigned` (to one node, under a lease) → `done`, or back
//! to `pending` when the lease lapses, the node rejects it, or its result fails verification.
//! Every gateway replica runs the same loops; `FOR UPDATE SKIP LOCKED` and row locks make sure a
//! shard is assigned by one replica at a time and a result is accepted once.
//!
//! Lock order, everywhere: the job row, then its shard rows. The dispatcher locks only shards.
//!
//! A job reaches a terminal state only in [`finish`], in the same transaction that releases its
//! escrow; `finish` is a no-op on a job that is already terminal, which makes settlement
//! idempotent under retries, crashes and racing replicas.

use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;
use xpand_protocol::{
    Accelerator, Assignment, Progress, ProgressChain, Reject, ShardOutput, ShardResult, ShardTask,
    Stop,
};

use super::verification::{self, Verdict};
use super::{
    anonymize, check_output, fetch_row, forecast, Job, JobError, JobRow, JobStatus, JOB_COLUMNS,
};
use crate::broker::{DropReason, SealedMessage};
use crate::error::AppError;
use crate::events::JobEvent;
use crate::ledger::escrow::{self, Release};
use crate::ledger::{self, LedgerError};
use crate::nodes::{self, Failure};
use crate::shutdown::Shutdown;
use crate::state::AppState;
use crate::transfers::Direction;

/// Assigns pending shards whenever woken (new jobs, freed capacity) or every tick.
pub async fn run_dispatcher(state: AppState, shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = state.dispatch_wakeup.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = shutdown.wait() => return,
        }
        loop {
            match dispatch_once(&state).await {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(error = ?e, "dispatch round failed");
                    break;
                }
            }
        }
    }
}

#[derive(sqlx::FromRow)]
struct PendingShard {
    id: Uuid,
    job_id: Uuid,
    model: String,
    task: sqlx::types::Json<ShardTask>,
    excluded_nodes: Vec<String>,
    ran_on: Vec<String>,
}

/// One round: [`assign`], then send what it signed. Returns how many were sent.
async fn dispatch_once(state: &AppState) -> anyhow::Result<usize> {
    let round = assign(state).await?;
    let sent = round.len();
    for (a, message) in round {
        if let Err(e) = state.broker.send(message).await {
            // The lease will lapse and the shard will be offered again.
            tracing::warn!(error = %e, shard = %a.shard_id, "sending an assignment failed");
        }
        state
            .metrics
            .dispatched_shards
            .with_label_values(&[task_kind(&a.task)])
            .inc();
    }
    Ok(sent)
}

/// Matches pending shards to live nodes with room and records the assignments (each signed
/// once: the same bytes are sealed into the ledger and returned for sending). Jobs that got
/// their first shard turn `running`.
///
/// Invariant: while a live node with a free slot may run some pending shard, the round
/// assigns at least one ([`placeable_pending`]).
pub async fn assign(state: &AppState) -> anyhow::Result<Vec<(Assignment, SealedMessage)>> {
    let mut slots = nodes::available(&state.db, &state.liveness).await?;
    // A node whose last epoch scored below the floor (failures, disputes) gets no work.
    let floor = state.config.min_power_score;
    slots.retain(|s| s.score.is_none_or(|score| score >= floor));
    let capacity: i64 = slots.iter().map(|s| s.free).sum();
    if capacity == 0 {
        return Ok(Vec::new());
    }
    let mut tx = state.db.begin().await?;
    let pending = placeable_pending(&mut tx, &slots, capacity).await?;

    let lease_expires_at = Utc::now() + state.config.lease;
    let mut assignments = Vec::with_capacity(pending.len());
    for shard in pending {
        let Some(slot) = choose_slot(
            &mut slots,
            &shard.model,
            &shard.excluded_nodes,
            &shard.ran_on,
        ) else {
            continue;
        };
        slot.free -= 1;
        let assignment_id = Uuid::new_v4();
        let mut task = shard.task.0;
        if let ShardTask::Anonymize(t) = &mut task {
            // Usable only by this node, only while this assignment is the shard's current one.
            let expires = (Utc::now() + state.config.job_timeout).timestamp_millis();
            t.input_url = state
                .transfers
                .url(Direction::Input, assignment_id, expires);
            t.output_url = state
                .transfers
                .url(Direction::Output, assignment_id, expires);
        }
        assignments.push(Assignment {
            assignment_id,
            job_id: shard.job_id,
            shard_id: shard.id,
            node: slot.id.clone(),
            model: shard.model,
            lease_expires_at_ms: lease_expires_at.timestamp_millis(),
            task,
        });
    }
    if assignments.is_empty() {
        return Ok(Vec::new());
    }
    let shard_ids: Vec<Uuid> = assignments.iter().map(|a| a.shard_id).collect();
    let node_ids: Vec<&str> = assignments.iter().map(|a| a.node.as_str()).collect();
    let assignment_ids: Vec<Uuid> = assignments.iter().map(|a| a.assignment_id).collect();
    sqlx::query(
        "UPDATE shards s SET status = 'assigned', node_id = u.node, assignment_id = u.assignment,
                attempts = s.attempts + 1, lease_expires_at = $4, assigned_at = now(),
                progress_done = 0, progress_chain = NULL
         FROM UNNEST($1::uuid[], $2::text[], $3::uuid[]) AS u(shard, node, assignment)
         WHERE s.id = u.shard",
    )
    .bind(&shard_ids)
    .bind(&node_ids)
    .bind(&assignment_ids)
    .bind(lease_expires_at)
    .execute(&mut *tx)
    .await?;
    // Each assignment is signed once: the same bytes are sealed into the ledger and sent.
    let mut messages = Vec::with_capacity(assignments.len());
    for a in &assignments {
        let message = state.broker.seal_assignment(a);
        ledger::blocks::record(&mut tx, "assignment", &a.node, &message.payload).await?;
        messages.push(message);
    }
    tx.commit().await?;

    // The job turns `running` in its own statement: taking the job lock inside the shard
    // transaction above would invert the job → shard lock order.
    let mut job_ids: Vec<Uuid> = assignments.iter().map(|a| a.job_id).collect();
    job_ids.sort();
    job_ids.dedup();
    let started: Vec<(Uuid, Uuid, i32, i32)> = sqlx::query_as(
        "UPDATE jobs SET status = 'running', started_at = now(), updated_at = now()
         WHERE id = ANY($1) AND status = 'queued'
         RETURNING id, account_id, shards_done, shards_total",
    )
    .bind(&job_ids)
    .fetch_all(&state.db)
    .await?;

    for (job_id, account, shards_done, shards_total) in started {
        state
            .events
            .publish(
                account,
                JobEvent::Progress {
                    job_id,
                    status: JobStatus::Running,
                    shards_done,
                    shards_total,
                },
            )
            .await;
    }
    Ok(assignments.into_iter().zip(messages).collect())
}

/// Up to `limit` pending shards that some slot in `slots` may run, fairest first, locked for
/// this round.
///
/// Only placeable shards are taken: a shard no free node may run now (its model is on no live
/// node with room, or every such node already ran it) is skipped, never returned at the head of
/// the round, so it cannot block the shards behind it. Whatever is returned first can be
/// placed, hence a round with a free slot that may run some pending shard dispatches one.
///
/// Fairness: accounts take turns, least served first, where an account's service is the shards
/// of its unfinished jobs already started (running or done). An account with 40 shards of its
/// 10,000-row job started waits behind another account's first shard. Within an account, jobs
/// run oldest first (a job's replicas with it), so each job finishes as soon as it can.
async fn placeable_pending(
    conn: &mut PgConnection,
    slots: &[nodes::NodeSlot],
    limit: i64,
) -> sqlx::Result<Vec<PendingShard>> {
    let (free_nodes, free_models): (Vec<&str>, Vec<&str>) = slots
        .iter()
        .filter(|s| s.free > 0)
        .flat_map(|s| s.models.iter().map(|m| (s.id.as_str(), m.as_str())))
        .unzip();
    sqlx::query_as(
        "WITH free AS (SELECT * FROM UNNEST($1::text[], $2::text[]) AS f(node, model)),
         candidate AS (
             SELECT s.id, s.job_id, s.idx, s.model, s.replica_of, j.account_id, j.created_at,
                    -- For a replica or speculative copy: the nodes that already produced (or
                    -- are producing) a run of its primary. Nodes that merely lost it stay
                    -- eligible.
                    CASE WHEN s.replica_of IS NULL THEN '{}'::text[] ELSE ARRAY(
                        SELECT r.node_id FROM shards r
                        WHERE r.node_id IS NOT NULL
                          AND (r.id = s.replica_of
                               OR (r.replica_of = s.replica_of
                                   AND r.status IN ('assigned', 'done'))))
                    END AS ran_on
             FROM shards s JOIN jobs j ON j.id = s.job_id
             WHERE s.status = 'pending' AND s.model = ANY($2)),
         -- What each waiting account has started already: its unfinished jobs' shards that are
         -- no longer pending.
         served AS (
             SELECT j.account_id, sum(j.shards_total - COALESCE(p.pending, 0)) AS started
             FROM jobs j
             LEFT JOIN (SELECT job_id, count(*) FILTER (WHERE replica_of IS NULL) AS pending
                        FROM candidate GROUP BY job_id) p ON p.job_id = j.id
             WHERE j.status IN ('queued', 'running')
               AND j.account_id IN (SELECT account_id FROM candidate)
             GROUP BY j.account_id),
         ranked AS (
             SELECT c.*, s.started + row_number() OVER (
                        PARTITION BY c.account_id ORDER BY c.created_at, c.job_id, c.idx, c.id
                    ) AS account_turn
             FROM candidate c JOIN served s ON s.account_id = c.account_id
             WHERE EXISTS (SELECT 1 FROM free f
                           WHERE f.model = c.model AND f.node <> ALL(c.ran_on)))
         SELECT s.id, s.job_id, s.model, s.task, s.excluded_nodes, r.ran_on
         FROM ranked r JOIN shards s ON s.id = r.id
         WHERE s.status = 'pending'
         ORDER BY r.account_turn, r.created_at, r.job_id, r.idx, r.id
         LIMIT $3
         FOR UPDATE OF s SKIP LOCKED",
    )
    .bind(&free_nodes)
    .bind(&free_models)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Where a shard of `model` goes: a node with a free slot, preferring nodes not in `excluded`
/// (they failed or rejected the shard), then GPUs, then the least loaded (which spreads a job's
/// shards), then the best power score. Never a node in `ran_on` (for a replica or speculative
/// copy, the nodes with a run of the same shard): it would vote twice or race itself.
fn choose_slot<'a>(
    slots: &'a mut [nodes::NodeSlot],
    model: &str,
    excluded: &[String],
    ran_on: &[String],
) -> Option<&'a mut nodes::NodeSlot> {
    slots
        .iter_mut()
        .filter(|s| s.free > 0 && s.models.iter().any(|m| m == model))
        .filter(|s| !ran_on.contains(&s.id))
        .min_by_key(|s| {
            (
                excluded.contains(&s.id),
                s.accelerator != Accelerator::Cuda,
                -s.free,
                -s.score.unwrap_or(0),
            )
        })
}

fn task_kind(task: &ShardTask) -> &'static str {
    match task {
        ShardTask::Forecast { .. } => forecast::KIND,
        ShardTask::Anonymize(_) => anonymize::KIND,
    }
}

/// Progress renews the lease and records the hash chain the final result must extend.
pub async fn on_progress(state: &AppState, node: &str, p: &Progress) -> anyhow::Result<()> {
    let updated = sqlx::query(
        "UPDATE shards SET lease_expires_at = now() + $3 * interval '1 millisecond',
                progress_done = $4, progress_chain = $5
         WHERE assignment_id = $1 AND node_id = $2 AND status = 'assigned' AND $4 >= progress_done",
    )
    .bind(p.assignment_id)
    .bind(node)
    .bind(state.config.lease.as_millis() as f64)
    .bind(p.done as i32)
    .bind(&p.chain)
    .execute(&state.db)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(DropReason::StaleAssignment.into());
    }
    Ok(())
}

/// A node declined a shard: offer it elsewhere first.
pub async fn on_reject(state: &AppState, node: &str, r: &Reject) -> anyhow::Result<()> {
    let updated = sqlx::query(
        "UPDATE shards SET status = 'pending', node_id = NULL, assignment_id = NULL,
                lease_expires_at = NULL, excluded_nodes = array_append(excluded_nodes, $2)
         WHERE assignment_id = $1 AND node_id = $2 AND status = 'assigned'",
    )
    .bind(r.assignment_id)
    .bind(node)
    .execute(&state.db)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(DropReason::StaleAssignment.into());
    }
    tracing::info!(node, shard = %r.shard_id, reason = %r.reason, "node rejected a shard");
    state.wake_dispatcher();
    Ok(())
}

#[derive(sqlx::FromRow)]
struct AssignedShard {
    id: Uuid,
    idx: i32,
    row_offset: i32,
    model: String,
    replica_of: Option<Uuid>,
    speculative: bool,
    task: sqlx::types::Json<ShardTask>,
    status: String,
    node_id: Option<String>,
    assigned_at: Option<chrono::DateTime<Utc>>,
    progress_done: i32,
    progress_chain: Option<String>,
}

/// Why a result is refused; the node is charged a failure and the shard goes elsewhere.
fn verify_result(shard: &AssignedShard, r: &ShardResult) -> Result<(), String> {
    if r.shard_id != shard.id {
        return Err("result names another shard".into());
    }
    if r.output.digest() != r.output_sha256 {
        return Err("output_sha256 does not match the output".into());
    }
    if r.output.chain(r.assignment_id) != r.chain {
        return Err("hash chain does not match the output".into());
    }
    if let Some(claimed) = &shard.progress_chain {
        // The output must extend what progress already committed to.
        let mut chain = ProgressChain::new(r.assignment_id);
        for chunk in r
            .output
            .chunk_bytes()
            .iter()
            .take(shard.progress_done as usize)
        {
            chain.push(chunk);
        }
        if &chain.hex() != claimed {
            return Err("output contradicts the progress hash chain".into());
        }
    }
    check_output(&shard.task.0, &r.output)
}

/// Verifies and stores a shard result; completes the job when it was the last shard (video
/// jobs are then joined by [`anonymize::reduce`], outside this transaction).
pub async fn on_result(state: &AppState, node: &str, r: ShardResult) -> anyhow::Result<()> {
    // An uploaded segment is checked before any lock is taken: it means reading the file.
    let upload_refused = check_upload(state, node, &r).await?;
    let mut tx = state.db.begin().await?;
    let Some(job_id) =
        sqlx::query_scalar::<_, Uuid>("SELECT job_id FROM shards WHERE assignment_id = $1")
            .bind(r.assignment_id)
            .fetch_optional(&mut *tx)
            .await?
    else {
        // A re-dispatched shard has a new assignment id: this is a late answer to an old one.
        return Err(DropReason::StaleAssignment.into());
    };
    let (account, status, shards_total): (Uuid, JobStatus, i32) = sqlx::query_as(
        "SELECT account_id, status, shards_total FROM jobs WHERE id = $1 FOR UPDATE",
    )
    .bind(job_id)
    .fetch_one(&mut *tx)
    .await?;
    let shard: AssignedShard = sqlx::query_as(
        "SELECT id, idx, row_offset, model, replica_of, speculative, task, status,
                node_id, assigned_at, progress_done, progress_chain
         FROM shards WHERE assignment_id = $1 FOR UPDATE",
    )
    .bind(r.assignment_id)
    .fetch_one(&mut *tx)
    .await?;
    if shard.node_id.as_deref() != Some(node) {
        return Err(DropReason::CrossNode.into());
    }
    if shard.status != "assigned" || status.is_terminal() {
        return Err(DropReason::StaleAssignment.into());
    }
    if let Err(why) = verify_result(&shard, &r).and(upload_refused.map_or(Ok(()), Err)) {
        tracing::warn!(node, shard = %shard.id, why, "refused a shard result");
        sqlx::query(
            "UPDATE shards SET status = 'pending', node_id = NULL, assignment_id = NULL,
                    lease_expires_at = NULL, excluded_nodes = array_append(excluded_nodes, $2)
             WHERE id = $1",
        )
        .bind(shard.id)
        .bind(node)
        .execute(&mut *tx)
        .await?;
        nodes::charge_failures(&mut tx, &[(node.to_string(), shard.id)], Failure::BadResult)
            .await?;
        tx.commit().await?;
        state.wake_dispatcher();
        return Err(DropReason::BadResult.into());
    }

    // The run's output goes on its own row either way: a primary's as its result (or, while it
    // waits for a replica, its candidate), a replica's as its vote, a speculative copy's as the
    // answer that may beat its primary.
    // Work done counts for the node's power score, replicas included.
    let node_done: i64 = sqlx::query_scalar(
        "UPDATE nodes SET shards_done = shards_done + 1 WHERE id = $1 RETURNING shards_done",
    )
    .bind(node)
    .fetch_one(&mut *tx)
    .await?;
    // `node_done` counts this run: the node had done one fewer before it.
    let hold = shard.replica_of.is_none()
        && verification::wanted(state, node, node_done - 1, &shard.model).await?;
    sqlx::query(
        "UPDATE shards SET status = $4, output = $2, output_sha256 = $3, completed_at = now(),
                lease_expires_at = NULL
         WHERE id = $1",
    )
    .bind(shard.id)
    .bind(serde_json::to_value(&r.output).expect("outputs serialize"))
    .bind(&r.output_sha256)
    .bind(if hold { "verifying" } else { "done" })
    .execute(&mut *tx)
    .await?;
    let mut stops = Vec::new();
    let accepted = if shard.speculative {
        let primary = shard.replica_of.expect("a speculative copy has a primary");
        supersede(&mut tx, primary, node, &r, &mut stops).await?
    } else if hold {
        verification::add_replica(&mut tx, shard.id, &[node.to_string()]).await?;
        None
    } else if let Some(primary) = shard.replica_of {
        decide(&mut tx, state, job_id, primary).await?
    } else {
        Some(Accepted {
            idx: shard.idx,
            row_offset: shard.row_offset,
            output: r.output,
        })
    };
    if !shard.speculative && shard.replica_of.is_none() {
        // The primary answered: a speculative copy still running is not needed any more.
        stop_copies(&mut tx, shard.id, &mut stops).await?;
    }
    let Some(accepted) = accepted else {
        tx.commit().await?;
        for stop in &stops {
            state.broker.send_stop(stop).await;
        }
        state.wake_dispatcher();
        return Ok(());
    };
    if let Some(assigned_at) = shard.assigned_at {
        let secs = (Utc::now() - assigned_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
        state
            .metrics
            .shard_latency
            .with_label_values(&[task_kind(&shard.task.0)])
            .observe(secs);
    }
    let job = LockedJob {
        id: job_id,
        account,
        shards_total,
    };
    complete_shard(state, tx, &job, accepted).await?;
    for stop in &stops {
        state.broker.send_stop(stop).await;
    }
    state.wake_dispatcher();
    Ok(())
}

/// A job whose row the caller's transaction holds locked.
struct LockedJob {
    id: Uuid,
    account: Uuid,
    shards_total: i32,
}

/// A primary shard's accepted answer: where its rows go and what they are.
struct Accepted {
    idx: i32,
    row_offset: i32,
    output: ShardOutput,
}

/// Counts an accepted shard on its job and commits `tx`: the last shard reduces and settles a
/// forecast job in the same transaction, or (video) spawns the join after the commit.
async fn complete_shard(
    state: &AppState,
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    job: &LockedJob,
    accepted: Accepted,
) -> anyhow::Result<()> {
    let shards_done: i32 = sqlx::query_scalar(
        "UPDATE jobs SET shards_done = shards_done + 1, status = 'running',
                started_at = COALESCE(started_at, now()), updated_at = now()
         WHERE id = $1 RETURNING shards_done",
    )
    .bind(job.id)
    .fetch_one(&mut *tx)
    .await?;
    let is_video = matches!(accepted.output, ShardOutput::Anonymize { .. });
    let last = shards_done == job.shards_total;
    let finished = if last && !is_video {
        let outputs: Vec<sqlx::types::Json<ShardOutput>> = sqlx::query_scalar(
            "SELECT output FROM shards WHERE job_id = $1 AND replica_of IS NULL ORDER BY idx",
        )
        .bind(job.id)
        .fetch_all(&mut *tx)
        .await?;
        let output = forecast::reduce(outputs.into_iter().map(|o| o.0).collect());
        finish(&mut tx, job.id, Outcome::Succeeded(output)).await?
    } else {
        None
    };
    // Partial and progress events go out while this transaction still holds the job row lock:
    // concurrent results for the same job publish in lock order, so every `partial` precedes
    // the terminal event, which is sent after the commit.
    let events = &state.events;
    if let ShardOutput::Forecast { forecasts } = accepted.output {
        events
            .publish(
                job.account,
                JobEvent::Partial {
                    job_id: job.id,
                    shard: accepted.idx,
                    offset: accepted.row_offset,
                    rows: serde_json::to_value(forecasts).expect("rows serialize"),
                },
            )
            .await;
    }
    events
        .publish(
            job.account,
            JobEvent::Progress {
                job_id: job.id,
                status: finished.as_ref().map_or(JobStatus::Running, |j| j.status),
                shards_done,
                shards_total: job.shards_total,
            },
        )
        .await;
    tx.commit().await?;

    if let Some(finished) = finished {
        publish_finished(state, job.account, finished).await;
    }
    if is_video && last {
        tokio::spawn(anonymize::reduce(state.clone(), job.id));
    }
    Ok(())
}

/// A speculative copy answered: if its primary is still running, the copy's result becomes the
/// primary's (its node is paid) and the primary's node is told to stop. A copy that lost the race
/// changes nothing.
async fn supersede(
    tx: &mut PgConnection,
    primary: Uuid,
    node: &str,
    r: &ShardResult,
    stops: &mut Vec<Stop>,
) -> anyhow::Result<Option<Accepted>> {
    let running: Option<(Option<String>, Option<Uuid>, i32, i32)> = sqlx::query_as(
        "SELECT node_id, assignment_id, idx, row_offset FROM shards
         WHERE id = $1 AND status = 'assigned' FOR UPDATE",
    )
    .bind(primary)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((Some(slow_node), Some(slow_assignment), idx, row_offset)) = running else {
        return Ok(None);
    };
    // The slow run's assignment stops being current: its late progress and result are stale.
    sqlx::query(
        "UPDATE shards SET status = 'done', node_id = $2, output = $3, output_sha256 = $4,
                completed_at = now(), lease_expires_at = NULL, assignment_id = NULL
         WHERE id = $1",
    )
    .bind(primary)
    .bind(node)
    .bind(serde_json::to_value(&r.output).expect("outputs serialize"))
    .bind(&r.output_sha256)
    .execute(&mut *tx)
    .await?;
    stops.push(Stop {
        assignment_id: slow_assignment,
        shard_id: primary,
        node: slow_node,
        reason: "a speculative copy on another node finished first".into(),
    });
    Ok(Some(Accepted {
        idx,
        row_offset,
        output: r.output.clone(),
    }))
}

/// Cancels the speculative copies of `primary` that have not answered, collecting stops for
/// the ones running.
async fn stop_copies(
    tx: &mut PgConnection,
    primary: Uuid,
    stops: &mut Vec<Stop>,
) -> sqlx::Result<()> {
    let running: Vec<(Uuid, Option<String>, Option<Uuid>)> = sqlx::query_as(
        "WITH live AS (SELECT id, node_id, assignment_id, status FROM shards
                       WHERE replica_of = $1 AND speculative AND status IN ('pending', 'assigned')
                       FOR UPDATE)
         UPDATE shards s SET status = 'canceled', lease_expires_at = NULL
         FROM live WHERE s.id = live.id
         RETURNING s.id, live.node_id, live.assignment_id",
    )
    .bind(primary)
    .fetch_all(&mut *tx)
    .await?;
    for (_, node, assignment) in running {
        if let (Some(node), Some(assignment_id)) = (node, assignment) {
            stops.push(Stop {
                assignment_id,
                shard_id: primary,
                node,
                reason: "the shard's first run finished".into(),
            });
        }
    }
    Ok(())
}

/// Applies what the runs of a `verifying` primary decide: its accepted result (the primary's own
/// or the winning replica's, paid to the node that produced it), nothing yet, or a fresh start.
async fn decide(
    tx: &mut PgConnection,
    state: &AppState,
    job_id: Uuid,
    primary: Uuid,
) -> anyhow::Result<Option<Accepted>> {
    match verification::resolve(tx, &state.config, job_id, primary).await? {
        Verdict::Open => Ok(None),
        Verdict::Rerun => {
            sqlx::query(
                "UPDATE shards p SET status = 'pending', node_id = NULL, assignment_id = NULL,
                        output = NULL, output_sha256 = NULL, completed_at = NULL,
                        excluded_nodes = p.excluded_nodes || ARRAY(
                            SELECT node_id FROM shards WHERE replica_of = p.id AND node_id IS NOT NULL)
                 WHERE p.id = $1",
            )
            .bind(primary)
            .execute(&mut *tx)
            .await?;
            // Their votes were about the discarded run; the new run gets new replicas.
            sqlx::query("UPDATE shards SET status = 'canceled' WHERE replica_of = $1")
                .bind(primary)
                .execute(&mut *tx)
                .await?;
            tracing::warn!(shard = %primary, "three runs disagreed; the shard runs again");
            Ok(None)
        }
        Verdict::Accept {
            node,
            output,
            output_sha256,
        } => {
            let (idx, row_offset): (i32, i32) = sqlx::query_as(
                "UPDATE shards SET status = 'done', node_id = $2, output = $3, output_sha256 = $4
                 WHERE id = $1 RETURNING idx, row_offset",
            )
            .bind(primary)
            .bind(&node)
            .bind(serde_json::to_value(&output).expect("outputs serialize"))
            .bind(&output_sha256)
            .fetch_one(&mut *tx)
            .await?;
            Ok(Some(Accepted {
                idx,
                row_offset,
                output,
            }))
        }
    }
}

/// For a video shard, whether the node's upload is what its result claims: `Some(why)` when
/// not. `None` for other kinds and for results that will be dropped anyway (stale, another
/// node's), which the locked checks in [`on_result`] then sort out.
async fn check_upload(
    state: &AppState,
    node: &str,
    r: &ShardResult,
) -> anyhow::Result<Option<String>> {
    // Other outputs have no upload (and a forecast answer to a video shard fails its checks
    // later): keep the forecast path free of this extra query.
    if !matches!(r.output, ShardOutput::Anonymize { .. }) {
        return Ok(None);
    }
    let shard: Option<(Uuid, i32, sqlx::types::Json<ShardTask>)> = sqlx::query_as(
        "SELECT job_id, idx, task FROM shards
         WHERE assignment_id = $1 AND node_id = $2 AND status = 'assigned'",
    )
    .bind(r.assignment_id)
    .bind(node)
    .fetch_optional(&state.db)
    .await?;
    let Some((job_id, idx, sqlx::types::Json(ShardTask::Anonymize(task)))) = shard else {
        return Ok(None);
    };
    if let Err(why) = anonymize::check_output(&task, &r.output) {
        return Ok(Some(why));
    }
    let verdict =
        anonymize::verify_upload(state, job_id, idx, r.assignment_id, &task, &r.output).await?;
    Ok(verdict.err())
}

/// How a job ends.
pub enum Outcome {
    Succeeded(Value),
    Failed(JobError),
    Canceled,
}

/// Ends a job and releases its escrow, in the caller's transaction. Succeeded: the nodes are
/// paid for their shards and the gateway its fee. Canceled: the nodes are paid for shards
/// already done; the rest is refunded. Failed: everything is refunded.
/// Returns `None` when the job had already ended (nothing changes).
pub async fn finish(
    conn: &mut PgConnection,
    job_id: Uuid,
    outcome: Outcome,
) -> anyhow::Result<Option<Job>> {
    let job: JobRow = sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 FOR UPDATE"
    ))
    .bind(job_id)
    .fetch_one(&mut *conn)
    .await?;
    if job.status.is_terminal() {
        return Ok(None);
    }
    sqlx::query(
        "UPDATE shards SET status = 'canceled', lease_expires_at = NULL
         WHERE job_id = $1 AND status IN ('pending', 'assigned', 'verifying')",
    )
    .bind(job_id)
    .execute(&mut *conn)
    .await?;
    let (status, release, output, error) = match outcome {
        Outcome::Succeeded(mut output) => (
            JobStatus::Succeeded,
            Release {
                payouts: done_shard_payouts(conn, job_id).await?,
                fee: job.gateway_fee,
            },
            {
                if let (false, Some(fields)) =
                    (job.unverified_shards.is_empty(), output.as_object_mut())
                {
                    fields.insert("unverified_shards".into(), job.unverified_shards.into());
                }
                Some(output)
            },
            None,
        ),
        Outcome::Canceled => (
            JobStatus::Canceled,
            Release {
                payouts: done_shard_payouts(conn, job_id).await?,
                fee: 0,
            },
            None,
            None,
        ),
        Outcome::Failed(error) => (JobStatus::Failed, Release::default(), None, Some(error)),
    };
    let memo = format!("job {} {}", job.kind, status.as_str());
    match escrow::release(conn, job_id, &release, &memo).await {
        Ok(_) => {}
        // Released already (by a replica whose job update we cannot see yet): nothing to do.
        Err(LedgerError::AlreadyPosted(_)) => return Ok(None),
        Err(e) => return Err(e).context("releasing escrow"),
    }
    let row: JobRow = sqlx::query_as(&format!(
        "UPDATE jobs SET status = $2, output = $3, error = $4, cost = $5, finished_at = now(),
                updated_at = now()
         WHERE id = $1 RETURNING {JOB_COLUMNS}"
    ))
    .bind(job_id)
    .bind(status.as_str())
    .bind(output)
    .bind(error.map(|e| serde_json::to_value(e).expect("errors serialize")))
    .bind(release.cost())
    .fetch_one(&mut *conn)
    .await?;
    if let Some(url) = &row.webhook {
        crate::webhooks::enqueue(conn, job_id, url).await?;
    }
    Ok(Some(row.into()))
}

/// What each node earned on this job: the fees of the shards it completed.
async fn done_shard_payouts(
    conn: &mut PgConnection,
    job_id: Uuid,
) -> sqlx::Result<Vec<(Uuid, i64)>> {
    sqlx::query_as(
        "SELECT n.account_id, sum(s.fee)::bigint FROM shards s JOIN nodes n ON n.id = s.node_id
         WHERE s.job_id = $1 AND s.status = 'done' AND s.replica_of IS NULL
         GROUP BY n.account_id ORDER BY 1",
    )
    .bind(job_id)
    .fetch_all(conn)
    .await
}

/// Tells the job's owner it ended (after the settling transaction committed) and lets go of
/// what the job kept in object storage while it ran.
pub(crate) async fn publish_finished(state: &AppState, account: Uuid, job: Job) {
    state
        .metrics
        .job_transitions
        .with_label_values(&[&job.kind, job.status.as_str()])
        .inc();
    if job.kind == anonymize::KIND {
        let (state, id) = (state.clone(), job.id);
        tokio::spawn(async move { anonymize::discard_staging(&state, id).await });
    }
    if let Some(event) = JobEvent::finished(job) {
        state.events.publish(account, event).await;
    }
}

/// Cancels one of the caller's unfinished jobs, refunding what was not spent.
pub async fn cancel(state: &AppState, account: Uuid, job_id: Uuid) -> Result<Job, AppError> {
    let mut tx = state.db.begin().await?;
    let status: Option<JobStatus> =
        sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1 AND account_id = $2 FOR UPDATE")
            .bind(job_id)
            .bind(account)
            .fetch_optional(&mut *tx)
            .await?;
    let status = status.ok_or(AppError::NotFound("job"))?;
    if status.is_terminal() {
        return Err(AppError::Conflict(format!(
            "the job is already {}",
            status.as_str()
        )));
    }
    let job = match finish(&mut tx, job_id, Outcome::Canceled).await? {
        Some(job) => job,
        None => fetch_row(&mut tx, job_id).await?.into(),
    };
    tx.commit().await?;
    publish_finished(state, account, job.clone()).await;
    Ok(job)
}

/// Returns lapsed shards to the queue and fails jobs that cannot finish, every tick.
pub async fn run_sweeper(state: AppState, shutdown: Shutdown) {
    let tick = (state.config.lease / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = shutdown.wait() => return,
        }
        if let Err(e) = sweep(&state).await {
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
pub async fn requeue_lost(state: &AppState, lost: Lost<'_>) -> anyhow::Result<usize> {
    let (lapsed, gone, restarted, started_at_ms, why) = match lost {
        Lost::LeaseLapsed => (true, &[][..], None, 0, Failure::LeaseLapsed),
        Lost::NodesGone(nodes) => (false, nodes, None, 0, Failure::NodeLost),
        Lost::Restarted {
            node,
            started_at_ms,
        } => (false, &[][..], Some(node), started_at_ms, Failure::NodeLost),
    };
    let mut tx = state.db.begin().await?;
    let requeued: Vec<(String, Uuid)> = sqlx::query_as(
        "WITH lost AS (
             SELECT id, node_id FROM shards
             WHERE status = 'assigned'
               AND (($1 AND lease_expires_at < now())
                    OR node_id = ANY($2)
                    OR (node_id = $3 AND assigned_at < to_timestamp($4 / 1000.0)))
             FOR UPDATE SKIP LOCKED)
         UPDATE shards s SET status = 'pending', node_id = NULL, assignment_id = NULL,
                lease_expires_at = NULL, excluded_nodes = array_append(s.excluded_nodes, l.node_id)
         FROM lost l WHERE s.id = l.id
         RETURNING l.node_id, s.id",
    )
    .bind(lapsed)
    .bind(gone)
    .bind(restarted)
    .bind(started_at_ms as f64)
    .fetch_all(&mut *tx)
    .await?;
    if !requeued.is_empty() {
        nodes::charge_failures(&mut tx, &requeued, why).await?;
    }
    tx.commit().await?;
    if !requeued.is_empty() {
        tracing::info!(shards = requeued.len(), reason = ?why, "re-queued lost shards");
        state.wake_dispatcher();
    }
    Ok(requeued.len())
}

/// Gives each straggler — a primary running `XPAND_STRAGGLER_FACTOR` times longer than the median
/// of its job's finished shards, and at least `XPAND_STRAGGLER_MIN_SECS` — one speculative copy
/// for another node. The first valid result wins ([`supersede`], [`stop_copies`]).
async fn speculate(state: &AppState) -> anyhow::Result<()> {
    let copies: Vec<Uuid> = sqlx::query_scalar(
        "WITH finished AS (
             SELECT job_id, percentile_cont(0.5) WITHIN GROUP (
                        ORDER BY extract(epoch FROM completed_at - assigned_at)) AS median
             FROM shards
             WHERE status IN ('done', 'verifying') AND replica_of IS NULL
               AND assigned_at IS NOT NULL AND completed_at IS NOT NULL
               AND job_id IN (SELECT job_id FROM shards WHERE status = 'assigned')
             GROUP BY job_id)
         INSERT INTO shards (id, job_id, idx, row_offset, row_count, model, task, fee, status,
                             excluded_nodes, replica_of, speculative)
         SELECT gen_random_uuid(), s.job_id, s.idx, s.row_offset, s.row_count, s.model, s.task,
                0, 'pending', s.excluded_nodes || s.node_id, s.id, true
         FROM shards s JOIN finished f ON f.job_id = s.job_id
         WHERE s.status = 'assigned' AND s.replica_of IS NULL
           AND s.assigned_at < now() - make_interval(secs => greatest($1, $2 * f.median))
           AND NOT EXISTS (SELECT 1 FROM shards c WHERE c.replica_of = s.id AND c.speculative)
         RETURNING replica_of",
    )
    .bind(state.config.straggler_min_secs)
    .bind(state.config.straggler_factor)
    .fetch_all(&state.db)
    .await?;
    if !copies.is_empty() {
        tracing::info!(shards = ?copies, "stragglers got speculative copies");
        state.wake_dispatcher();
    }
    Ok(())
}

/// Held results that no node has checked `XPAND_VERIFY_WAIT_SECS` after they were held, with
/// no replica running now (none eligible is alive, or the only checker died and its lease
/// lapsed): each is accepted as its node answered, marked unverified on the shard and the job,
/// and its outstanding replicas are dropped. A job never waits out its timeout for a check
/// that cannot happen.
async fn accept_unchecked(state: &AppState) -> anyhow::Result<()> {
    const NO_RUNNING_REPLICA: &str = "NOT EXISTS (SELECT 1 FROM shards r
                                      WHERE r.replica_of = p.id AND r.status = 'assigned')";
    let stuck: Vec<(Uuid, Uuid)> = sqlx::query_as(&format!(
        "SELECT p.id, p.job_id FROM shards p
         WHERE p.status = 'verifying' AND p.completed_at < now() - $1 * interval '1 second'
           AND {NO_RUNNING_REPLICA}"
    ))
    .bind(state.config.verify_wait.as_secs_f64())
    .fetch_all(&state.db)
    .await?;
    for (primary, job_id) in stuck {
        let mut tx = state.db.begin().await?;
        let (account, status, shards_total): (Uuid, JobStatus, i32) = sqlx::query_as(
            "SELECT account_id, status, shards_total FROM jobs WHERE id = $1 FOR UPDATE",
        )
        .bind(job_id)
        .fetch_one(&mut *tx)
        .await?;
        if status.is_terminal() {
            continue;
        }
        // Re-checked under the job lock: a replica may have been dispatched or answered since.
        let held: Option<(
            i32,
            i32,
            sqlx::types::Json<ShardOutput>,
            sqlx::types::Json<ShardTask>,
        )> = sqlx::query_as(&format!(
            "UPDATE shards p SET status = 'done', unverified = true
                 WHERE p.id = $1 AND p.status = 'verifying' AND {NO_RUNNING_REPLICA}
                 RETURNING p.idx, p.row_offset, p.output, p.task"
        ))
        .bind(primary)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((idx, row_offset, output, task)) = held else {
            continue;
        };
        sqlx::query(
            "UPDATE shards SET status = 'canceled', lease_expires_at = NULL
             WHERE replica_of = $1 AND status = 'pending'",
        )
        .bind(primary)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE jobs SET unverified_shards = array_append(unverified_shards, $2) WHERE id = $1",
        )
        .bind(job_id)
        .bind(idx)
        .execute(&mut *tx)
        .await?;
        let job = LockedJob {
            id: job_id,
            account,
            shards_total,
        };
        let accepted = Accepted {
            idx,
            row_offset,
            output: output.0,
        };
        complete_shard(state, tx, &job, accepted).await?;
        state
            .metrics
            .unverified_shards
            .with_label_values(&[task_kind(&task.0)])
            .inc();
        tracing::warn!(job = %job_id, shard = %primary, "no node could check a held result in time; accepted it unverified");
    }
    Ok(())
}

/// One pass of the sweeper: lost shards back to the queue, stragglers copied, unchecked held
/// results accepted, stranded joins restarted, exhausted and timed-out jobs failed.
pub async fn sweep(state: &AppState) -> anyhow::Result<()> {
    // Leases that lapsed without progress: the node is presumed dead or stuck.
    requeue_lost(state, Lost::LeaseLapsed).await?;
    // Shards held by nodes whose heartbeats stopped: no need to wait out their leases. (A Redis
    // that lost its keys makes live nodes look gone for a heartbeat; their shards then run
    // twice and the first run's late result is dropped as stale: wasted work, nothing wrong.)
    let holders: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT node_id FROM shards WHERE status = 'assigned' AND node_id IS NOT NULL",
    )
    .fetch_all(&state.db)
    .await?;
    let alive = state.liveness.alive(&holders).await?;
    let gone: Vec<String> = holders
        .into_iter()
        .zip(alive)
        .filter_map(|(node, alive)| (!alive).then_some(node))
        .collect();
    if !gone.is_empty() {
        requeue_lost(state, Lost::NodesGone(&gone)).await?;
    }

    speculate(state).await?;
    accept_unchecked(state).await?;

    // Video jobs whose segments are all done but whose join was never claimed, or whose
    // claimant went quiet (crashed mid-join).
    let unjoined: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM jobs
         WHERE kind = $1 AND status = 'running' AND shards_done = shards_total
           AND (reduce_claimed_at IS NULL OR reduce_claimed_at < now() - $2 * interval '1 second')
           AND updated_at < now() - interval '2 seconds'",
    )
    .bind(anonymize::KIND)
    .bind(anonymize::REDUCE_LEASE.as_secs_f64())
    .fetch_all(&state.db)
    .await?;
    for job_id in unjoined {
        tokio::spawn(anonymize::reduce(state.clone(), job_id));
    }

    let exhausted: Vec<Uuid> = sqlx::query_scalar(
        "SELECT DISTINCT job_id FROM shards WHERE status = 'pending' AND attempts >= $1",
    )
    .bind(state.config.max_shard_attempts as i32)
    .fetch_all(&state.db)
    .await?;
    for job_id in exhausted {
        fail(
            state,
            job_id,
            "shard_attempts_exhausted",
            "a shard failed on every node it was sent to",
        )
        .await?;
    }

    let timed_out: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE status IN ('queued', 'running')
           AND created_at < now() - $1 * interval '1 second'",
    )
    .bind(state.config.job_timeout.as_secs_f64())
    .fetch_all(&state.db)
    .await?;
    for job_id in timed_out {
        fail(
            state,
            job_id,
            "timed_out",
            "the job did not finish in time (no capable node was available?)",
        )
        .await?;
    }
    Ok(())
}

pub(crate) async fn fail(
    state: &AppState,
    job_id: Uuid,
    code: &str,
    message: &str,
) -> anyhow::Result<()> {
    let mut tx = state.db.begin().await?;
    let job = finish(
        &mut tx,
        job_id,
        Outcome::Failed(JobError {
            code: code.into(),
            message: message.into(),
        }),
    )
    .await?;
    let account: Uuid = sqlx::query_scalar("SELECT account_id FROM jobs WHERE id = $1")
        .bind(job_id)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    if let Some(job) = job {
        tracing::warn!(job = %job_id, code, "job failed");
        publish_finished(state, account, job).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(id: &str, free: i64, accelerator: Accelerator, score: Option<i64>) -> nodes::NodeSlot {
        nodes::NodeSlot {
            id: id.into(),
            models: vec!["m".into()],
            free,
            accelerator,
            score,
        }
    }

    fn chosen(slots: &mut [nodes::NodeSlot], excluded: &[&str], ran_on: &[&str]) -> Option<String> {
        let owned = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        choose_slot(slots, "m", &owned(excluded), &owned(ran_on)).map(|s| s.id.clone())
    }

    #[test]
    fn placement_prefers_fresh_nodes_then_gpus_then_room_then_score() {
        use Accelerator::{Cpu, Cuda};
        let mut slots = [
            slot("cpu-roomy", 4, Cpu, Some(900)),
            slot("gpu-busy", 1, Cuda, None),
            slot("cpu-best", 4, Cpu, Some(5_000)),
        ];
        assert_eq!(chosen(&mut slots, &[], &[]).as_deref(), Some("gpu-busy"));
        assert_eq!(
            chosen(&mut slots, &["gpu-busy"], &[]).as_deref(),
            Some("cpu-best")
        );
        slots[2].free = 2;
        assert_eq!(
            chosen(&mut slots, &["gpu-busy"], &[]).as_deref(),
            Some("cpu-roomy")
        );
        // Everyone failed it before: it still goes somewhere. Nodes that ran it never get a
        // replica, but a node that only lost it does.
        let all = ["gpu-busy", "cpu-roomy", "cpu-best"];
        assert!(chosen(&mut slots, &all, &[]).is_some());
        assert_eq!(chosen(&mut slots, &all, &all), None);
        assert_eq!(
            chosen(&mut slots, &all, &["gpu-busy", "cpu-best"]).as_deref(),
            Some("cpu-roomy")
        );
        for s in &mut slots {
            s.free = 0;
        }
        assert_eq!(chosen(&mut slots, &[], &[]), None);
        let mut other_model = [slot("x", 4, Cpu, None)];
        other_model[0].models = vec!["other".into()];
        assert_eq!(chosen(&mut other_model, &[], &[]), None);
    }
}
