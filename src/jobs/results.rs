//! Results: what nodes report about their assignments. Progress renews a lease, a reject
//! offers the shard elsewhere, and a result is verified (digest, hash chain, shape, upload),
//! stored as its run's answer and then, by the shard's role, accepted, held for a check,
//! counted as a vote or raced against its primary. Results that arrive together are settled
//! together, in one transaction per batch ([`ResultBatcher`]).

use std::collections::{HashMap, HashSet};

use chrono::Utc;
use sqlx::PgConnection;
use uuid::Uuid;
use xpand_protocol::{Progress, ProgressChain, Reject, ShardResult, ShardTask, Stop};

use super::batch::Batcher;
use super::kind::{JobKind, UploadedShard};
use super::settlement::{
    complete_shard, fail_hopeless, lock_job, lock_jobs, Accepted, LockedJob, Settling,
};
use super::verification::{self, Verdict};
use super::Scheduler;
use crate::ledger::LedgerError;

/// Why a node's message about an assignment was not acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// For an attempt that is no longer current (re-dispatched, canceled, finished).
    #[error("the assignment is no longer current")]
    StaleAssignment,
    /// For an assignment another node holds.
    #[error("the assignment belongs to another node")]
    OtherNode,
    /// A result that failed verification (digest, hash chain, shape or upload); the node is
    /// charged a failure and the shard goes elsewhere.
    #[error("the result failed verification")]
    BadResult,
}

/// Progress renews the lease and records the hash chain the final result must extend.
pub async fn on_progress(scheduler: &Scheduler, node: &str, p: &Progress) -> anyhow::Result<()> {
    let updated = sqlx::query!(
        "UPDATE shards SET lease_expires_at = now() + $3 * interval '1 millisecond',
                progress_done = $4, progress_chain = $5
         WHERE assignment_id = $1 AND node_id = $2 AND status = 'assigned' AND $4 >= progress_done",
        p.assignment_id,
        node,
        scheduler.rules.lease.as_millis() as f64,
        p.done as i32,
        p.chain,
    )
    .execute(&scheduler.db)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(Refused::StaleAssignment.into());
    }
    Ok(())
}

/// A node declined a shard: it goes to another node if any live node that holds its model
/// has not rejected it (see [`super::dispatch`]), and its job fails at once when the shard is out
/// of attempts, or when this is the second node to call its input unusable.
pub async fn on_reject(scheduler: &Scheduler, node: &str, r: &Reject) -> anyhow::Result<()> {
    let updated = sqlx::query_scalar!(
        "UPDATE shards SET status = 'pending', node_id = NULL, assignment_id = NULL,
                lease_expires_at = NULL, excluded_nodes = array_add_once(excluded_nodes, $2),
                rejected_by = array_add_once(rejected_by, $2),
                input_refused_by = CASE WHEN $3 THEN array_add_once(input_refused_by, $2)
                                        ELSE input_refused_by END
         WHERE assignment_id = $1 AND node_id = $2 AND status = 'assigned'
         RETURNING id",
        r.assignment_id,
        node,
        r.input_unusable,
    )
    .fetch_optional(&scheduler.db)
    .await?;
    let Some(shard) = updated else {
        return Err(Refused::StaleAssignment.into());
    };
    tracing::info!(node, %shard, reason = %r.reason, input_unusable = r.input_unusable,
                   "node rejected a shard");
    fail_hopeless(scheduler, Some(&[shard])).await?;
    scheduler.wake_dispatcher();
    Ok(())
}

struct AssignedShard {
    id: Uuid,
    assignment_id: Uuid,
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
    /// Runs the answering node finished before this one.
    node_done: i64,
}

/// Why a result is refused; the node is charged a failure and the shard goes elsewhere.
fn verify_result(kind: &dyn JobKind, shard: &AssignedShard, r: &ShardResult) -> Result<(), String> {
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
    kind.check_output(&shard.task.0, &r.output)
}

/// Results settled in one transaction at most.
const MAX_BATCH: usize = 64;

/// A result admitted from a node, its upload checked, waiting to be settled.
pub(super) struct Arrival {
    node: String,
    result: ShardResult,
    /// Why its upload is not what it claims, when it is not.
    upload_refused: Option<String>,
}

/// Results wait while a batch is being settled and are settled together in the next one: one
/// transaction, with each hot row (the gateway's revenue, a customer's balance, a node's
/// counts) locked once for all of them.
pub(super) type ResultBatcher = Batcher<(), Arrival, anyhow::Result<()>>;

pub(super) fn result_batcher() -> ResultBatcher {
    Batcher::new(MAX_BATCH, |scheduler, arrivals| {
        Box::pin(async move { settle(&scheduler, &arrivals).await })
    })
}

/// Verifies and settles a shard result ([`on_results`] with one).
pub async fn on_result(scheduler: &Scheduler, node: &str, r: ShardResult) -> anyhow::Result<()> {
    on_results(scheduler, vec![(node.to_string(), r)])
        .await
        .pop()
        .expect("one outcome per result")
}

/// Verifies and settles results that arrived together, `(node, result)`, in one batch with
/// whatever else is waiting: each is stored as its run's answer and then, by the shard's role,
/// accepted, held for a check, counted as a vote or raced against its primary; a job whose
/// last shard is accepted ends and is paid in the same transaction (kinds that reduce later
/// do so after it). One outcome per result, in order: a refused result ([`Refused`]) is
/// refused alone and the others settle.
pub async fn on_results(
    scheduler: &Scheduler,
    results: Vec<(String, ShardResult)>,
) -> Vec<anyhow::Result<()>> {
    let mut checked = Vec::with_capacity(results.len());
    let mut arrivals = Vec::with_capacity(results.len());
    for (node, result) in results {
        // An upload is checked before any lock is taken: it means reading the file.
        match check_upload(scheduler, &node, &result).await {
            Ok(upload_refused) => {
                arrivals.push(Arrival {
                    node,
                    result,
                    upload_refused,
                });
                checked.push(Ok(()));
            }
            Err(e) => checked.push(Err(e)),
        }
    }
    let mut settled = scheduler
        .results
        .enqueue(scheduler, (), arrivals)
        .into_iter();
    let mut outcomes = Vec::with_capacity(checked.len());
    for check in checked {
        outcomes.push(match (check, settled.next()) {
            (Ok(()), Some(settled)) => settled
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("settling the result panicked"))),
            (Ok(()), None) => unreachable!("one receiver per queued result"),
            (Err(e), _) => Err(e),
        });
    }
    outcomes
}

/// Settles a batch in one transaction; when that fails (a deadlock, a job another replica
/// released first), each of its results alone, so one member cannot sink the others.
async fn settle(scheduler: &Scheduler, arrivals: &[Arrival]) -> Vec<anyhow::Result<()>> {
    let metrics = &scheduler.metrics;
    if arrivals.len() > 1 {
        match settle_together(scheduler, arrivals).await {
            Ok(outcomes) => {
                metrics.result_batch_size.observe(arrivals.len() as f64);
                return outcomes;
            }
            Err(e) => {
                metrics.result_batches_split.inc();
                tracing::warn!(
                    results = arrivals.len(),
                    error = format!("{e:#}"),
                    "settling a batch of results failed; settling them one by one"
                )
            }
        }
    }
    let mut outcomes = Vec::with_capacity(arrivals.len());
    for arrival in arrivals {
        metrics.result_batch_size.observe(1.0);
        let outcome = match settle_together(scheduler, std::slice::from_ref(arrival)).await {
            Ok(mut one) => one.pop().expect("one outcome per result"),
            // Released already, by a replica whose job update this one could not see yet.
            Err(e) if matches!(e.downcast_ref(), Some(LedgerError::AlreadyPosted(_))) => {
                Err(Refused::StaleAssignment.into())
            }
            Err(e) => Err(e),
        };
        outcomes.push(outcome);
    }
    outcomes
}

/// Settles `arrivals` in one transaction: their jobs locked in id order, then their shards,
/// each result then judged in turn; the hot rows and the commit come last ([`Settling`]). The
/// outer error is the transaction's (nothing of the batch took effect); the inner ones are
/// the results refused.
async fn settle_together(
    scheduler: &Scheduler,
    arrivals: &[Arrival],
) -> anyhow::Result<Vec<anyhow::Result<()>>> {
    let assignments: Vec<Uuid> = arrivals.iter().map(|a| a.result.assignment_id).collect();
    let mut tx = scheduler.db.begin().await?;
    let job_of: HashMap<Uuid, Uuid> = sqlx::query!(
        r#"SELECT assignment_id AS "assignment_id!", job_id FROM shards
           WHERE assignment_id = ANY($1)"#,
        &assignments
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|s| (s.assignment_id, s.job_id))
    .collect();
    let mut job_ids: Vec<Uuid> = job_of.values().copied().collect();
    job_ids.sort_unstable();
    job_ids.dedup();
    let mut jobs: HashMap<Uuid, LockedJob> = lock_jobs(&mut tx, &job_ids)
        .await?
        .into_iter()
        .map(|job| (job.id, job))
        .collect();
    let mut shards: HashMap<Uuid, AssignedShard> = assigned_shards(&mut tx, &assignments)
        .await?
        .into_iter()
        .map(|shard| (shard.assignment_id, shard))
        .collect();

    let mut settling = Settling::default();
    let mut seen = HashSet::new();
    let mut outcomes = Vec::with_capacity(arrivals.len());
    for arrival in arrivals {
        let assignment = arrival.result.assignment_id;
        // A re-dispatched shard has a new assignment id: this is a late answer to an old one.
        let Some(&job_id) = job_of.get(&assignment) else {
            outcomes.push(Err(Refused::StaleAssignment.into()));
            continue;
        };
        if !seen.insert(job_id) {
            // An earlier result of this batch changed this job: read it and the shard again.
            let job = lock_job(&mut tx, job_id).await?;
            jobs.insert(job_id, job);
            shards.remove(&assignment);
            if let Some(shard) = assigned_shards(&mut tx, &[assignment]).await?.pop() {
                shards.insert(assignment, shard);
            }
        }
        let (Some(job), Some(shard)) = (jobs.get(&job_id), shards.remove(&assignment)) else {
            outcomes.push(Err(Refused::StaleAssignment.into()));
            continue;
        };
        let outcome = judge(scheduler, &mut tx, job, shard, arrival, &mut settling).await?;
        outcomes.push(outcome.map_err(anyhow::Error::from));
    }
    settling.commit(scheduler, tx).await?;
    Ok(outcomes)
}

/// The shards whose current assignments are `assignments`, locked in id order.
async fn assigned_shards(
    conn: &mut PgConnection,
    assignments: &[Uuid],
) -> sqlx::Result<Vec<AssignedShard>> {
    sqlx::query_as!(
        AssignedShard,
        r#"SELECT s.id, s.assignment_id AS "assignment_id!", s.idx, s.row_offset, s.model,
                  s.replica_of, s.speculative,
                  s.task AS "task: sqlx::types::Json<ShardTask>", s.status, s.node_id,
                  s.assigned_at, s.progress_done, s.progress_chain,
                  COALESCE(n.shards_done, 0) AS "node_done!"
           FROM shards s LEFT JOIN nodes n ON n.id = s.node_id
           WHERE s.assignment_id = ANY($1) ORDER BY s.id FOR UPDATE OF s"#,
        assignments
    )
    .fetch_all(conn)
    .await
}

/// Judges one result on its locked job and shard: refused (a bad one sends the shard elsewhere
/// and charges its node), or stored and acted on by the shard's role.
async fn judge(
    scheduler: &Scheduler,
    tx: &mut PgConnection,
    job: &LockedJob,
    shard: AssignedShard,
    arrival: &Arrival,
    settling: &mut Settling,
) -> anyhow::Result<Result<(), Refused>> {
    let (node, r) = (arrival.node.as_str(), &arrival.result);
    let kind = scheduler.kinds.of(&job.kind)?.clone();
    if shard.node_id.as_deref() != Some(node) {
        return Ok(Err(Refused::OtherNode));
    }
    if shard.status != "assigned" || job.status.is_terminal() {
        return Ok(Err(Refused::StaleAssignment));
    }
    let upload = arrival.upload_refused.clone().map_or(Ok(()), Err);
    if let Err(why) = verify_result(kind.as_ref(), &shard, r).and(upload) {
        tracing::warn!(node, shard = %shard.id, why, "refused a shard result");
        sqlx::query!(
            "UPDATE shards SET status = 'pending', node_id = NULL, assignment_id = NULL,
                    lease_expires_at = NULL, excluded_nodes = array_add_once(excluded_nodes, $2),
                    rejected_by = array_add_once(rejected_by, $2)
             WHERE id = $1",
            shard.id,
            node,
        )
        .execute(&mut *tx)
        .await?;
        settling.charge_bad_result(node, shard.id);
        settling.requeued.push(shard.id);
        return Ok(Err(Refused::BadResult));
    }

    // The run's output goes on its own row either way: a primary's as its result (or, while it
    // waits for a replica, its candidate), a replica's as its vote, a speculative copy's as the
    // answer that may beat its primary.
    // Work done counts for the node's power score, replicas included; the count is taken at
    // the commit ([`Settling`]). Read here before it, it may miss runs of the node's that
    // commit meanwhile or settle in the same batch: a new node's checks can end a result or
    // two late or early.
    let hold = shard.replica_of.is_none()
        && verification::wanted(scheduler, node, shard.node_done, &shard.model).await?;
    sqlx::query!(
        "UPDATE shards SET status = $4, output = $2, output_sha256 = $3, completed_at = now(),
                lease_expires_at = NULL
         WHERE id = $1",
        shard.id,
        serde_json::to_value(&r.output).expect("outputs serialize"),
        r.output_sha256,
        if hold { "verifying" } else { "done" },
    )
    .execute(&mut *tx)
    .await?;
    let accepted = if shard.speculative {
        let primary = shard.replica_of.expect("a speculative copy has a primary");
        supersede(&mut *tx, primary, node, r, &mut settling.stops).await?
    } else if hold {
        verification::add_replica(&mut *tx, shard.id, &[node.to_string()]).await?;
        None
    } else if let Some(primary) = shard.replica_of {
        decide(&mut *tx, scheduler, kind.as_ref(), job.id, primary).await?
    } else {
        Some(Accepted {
            idx: shard.idx,
            row_offset: shard.row_offset,
            output: r.output.clone(),
        })
    };
    if !shard.speculative && shard.replica_of.is_none() {
        // The primary answered: a speculative copy still running is not needed any more.
        stop_copies(&mut *tx, shard.id, &mut settling.stops).await?;
    }
    let Some(accepted) = accepted else {
        settling.count_run(node);
        if let Some(primary) = shard.replica_of {
            // Split votes send the primary round again, which spends an attempt.
            settling.requeued.push(primary);
        }
        return Ok(Ok(()));
    };
    if let Some(assigned_at) = shard.assigned_at {
        let secs = (Utc::now() - assigned_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
        settling.observe_latency(kind.name(), secs);
    }
    complete_shard(tx, &kind, job, accepted, Some(node), settling).await?;
    Ok(Ok(()))
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
    let running = sqlx::query!(
        "SELECT node_id, assignment_id, idx, row_offset FROM shards
         WHERE id = $1 AND status = 'assigned' FOR UPDATE",
        primary
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some((Some(slow_node), Some(slow_assignment), idx, row_offset)) =
        running.map(|r| (r.node_id, r.assignment_id, r.idx, r.row_offset))
    else {
        return Ok(None);
    };
    // The slow run's assignment stops being current: its late progress and result are stale.
    sqlx::query!(
        "UPDATE shards SET status = 'done', node_id = $2, output = $3, output_sha256 = $4,
                completed_at = now(), lease_expires_at = NULL, assignment_id = NULL
         WHERE id = $1",
        primary,
        node,
        serde_json::to_value(&r.output).expect("outputs serialize"),
        r.output_sha256,
    )
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
    let canceled = sqlx::query!(
        "WITH live AS (SELECT id, node_id, assignment_id, status FROM shards
                       WHERE replica_of = $1 AND speculative AND status IN ('pending', 'assigned')
                       FOR UPDATE)
         UPDATE shards s SET status = 'canceled', lease_expires_at = NULL
         FROM live WHERE s.id = live.id
         RETURNING live.node_id, live.assignment_id",
        primary
    )
    .fetch_all(&mut *tx)
    .await?;
    for copy in canceled {
        if let (Some(node), Some(assignment_id)) = (copy.node_id, copy.assignment_id) {
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
    scheduler: &Scheduler,
    kind: &dyn JobKind,
    job_id: Uuid,
    primary: Uuid,
) -> anyhow::Result<Option<Accepted>> {
    match verification::resolve(tx, scheduler, kind, job_id, primary).await? {
        Verdict::Open => Ok(None),
        Verdict::Rerun => {
            sqlx::query!(
                "UPDATE shards p SET status = 'pending', node_id = NULL, assignment_id = NULL,
                        output = NULL, output_sha256 = NULL, completed_at = NULL,
                        excluded_nodes = ARRAY(
                            SELECT DISTINCT n FROM unnest(p.excluded_nodes || ARRAY(
                                SELECT node_id FROM shards
                                WHERE replica_of = p.id AND node_id IS NOT NULL)) n)
                 WHERE p.id = $1",
                primary
            )
            .execute(&mut *tx)
            .await?;
            // Their votes were about the discarded run; the new run gets new replicas.
            sqlx::query!(
                "UPDATE shards SET status = 'canceled' WHERE replica_of = $1",
                primary
            )
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
            let accepted = sqlx::query!(
                "UPDATE shards SET status = 'done', node_id = $2, output = $3, output_sha256 = $4
                 WHERE id = $1 RETURNING idx, row_offset",
                primary,
                node,
                serde_json::to_value(&output).expect("outputs serialize"),
                output_sha256,
            )
            .fetch_one(&mut *tx)
            .await?;
            Ok(Some(Accepted {
                idx: accepted.idx,
                row_offset: accepted.row_offset,
                output,
            }))
        }
    }
}

/// For an output with an upload, whether the upload is what the result claims: `Some(why)`
/// when not. `None` for outputs without one and for results that will be dropped anyway
/// (stale, another node's), which the locked checks in [`judge`] then sort out.
async fn check_upload(
    scheduler: &Scheduler,
    node: &str,
    r: &ShardResult,
) -> anyhow::Result<Option<String>> {
    // Keep the path of outputs without uploads free of this extra query.
    if !r.output.has_upload() {
        return Ok(None);
    }
    let shard = sqlx::query!(
        r#"SELECT s.job_id, s.idx, j.kind, s.task AS "task: sqlx::types::Json<ShardTask>"
           FROM shards s JOIN jobs j ON j.id = s.job_id
           WHERE s.assignment_id = $1 AND s.node_id = $2 AND s.status = 'assigned'"#,
        r.assignment_id,
        node,
    )
    .fetch_optional(&scheduler.db)
    .await?;
    let Some(shard) = shard else {
        return Ok(None);
    };
    let kind = scheduler.kinds.of(&shard.kind)?;
    if let Err(why) = kind.check_output(&shard.task.0, &r.output) {
        return Ok(Some(why));
    }
    let uploaded = UploadedShard {
        job: shard.job_id,
        idx: shard.idx,
        assignment: r.assignment_id,
        task: &shard.task.0,
    };
    let verdict = kind.check_upload(scheduler, uploaded, &r.output).await?;
    Ok(verdict.err())
}
