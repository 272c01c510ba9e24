//! Settlement: an accepted shard counted on its job, the job reduced and ended, and its escrow
//! released, all in one transaction.
//!
//! A job reaches a terminal state only in [`finish`], in the same transaction that releases its
//! escrow; `finish` is a no-op on a job that is already terminal, which makes settlement
//! idempotent under retries, crashes and racing replicas.

use std::sync::Arc;

use anyhow::Context;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;
use xpand_protocol::ShardOutput;

use super::kind::{ClaimedJob, JobKind, PaidSlice, Reduction};
use super::store::WebhookEvent;
use super::{store, Job, JobError, JobEvent, JobRow, JobStatus, Scheduler, JOB_COLUMNS};
use crate::error::AppError;
use crate::ledger::escrow::{self, Release};
use crate::ledger::LedgerError;
use crate::nodes;

/// A job whose row the caller's transaction holds locked.
pub(super) struct LockedJob {
    pub id: Uuid,
    pub account: Uuid,
    pub shards_total: i32,
    pub status: JobStatus,
    pub kind: String,
    /// Whether the job reports to a webhook (which may want its progress and partials).
    pub has_webhook: bool,
}

/// Locks job `id`'s row in the caller's transaction (the first lock of the job → shards order).
pub(super) async fn lock_job(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<LockedJob> {
    lock_jobs(conn, &[id])
        .await?
        .pop()
        .ok_or(sqlx::Error::RowNotFound)
}

/// Locks the rows of the jobs `ids` that exist, in one order (by id) so that two transactions
/// locking several jobs cannot deadlock; returns them in that order.
pub(super) async fn lock_jobs(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> sqlx::Result<Vec<LockedJob>> {
    let jobs = sqlx::query!(
        r#"SELECT id, account_id, status AS "status: JobStatus", shards_total, kind,
                  webhook IS NOT NULL AS "has_webhook!"
           FROM jobs WHERE id = ANY($1) ORDER BY id FOR UPDATE"#,
        ids
    )
    .fetch_all(conn)
    .await?;
    Ok(jobs
        .into_iter()
        .map(|job| LockedJob {
            id: job.id,
            account: job.account_id,
            shards_total: job.shards_total,
            status: job.status,
            kind: job.kind,
            has_webhook: job.has_webhook,
        })
        .collect())
}

/// A primary shard's accepted answer: where its rows go and what they are.
pub(super) struct Accepted {
    pub idx: i32,
    pub row_offset: i32,
    pub output: ShardOutput,
}

/// What a settling transaction defers to its end: events published while it still holds its
/// jobs' rows (so every `partial` precedes the terminal event), then the hot rows in one go
/// (failures charged and runs counted on the nodes' rows, escrows released on the balances,
/// each row locked once however many results the transaction settles), then its commit, then
/// what must wait for the commit. One result's transaction and a batch's use it alike.
#[derive(Default)]
pub(super) struct Settling {
    events: Vec<(Uuid, JobEvent)>,
    failures: Vec<(String, Uuid)>,
    runs: Vec<String>,
    releases: Vec<(Uuid, Release, String)>,
    finished: Vec<(Uuid, Job)>,
    reductions: Vec<(Arc<dyn JobKind>, Uuid)>,
    /// Stops for runs not needed any more, sent after the commit.
    pub stops: Vec<xpand_protocol::Stop>,
    /// Shards sent back to the queue, checked for hopelessness after the commit.
    pub requeued: Vec<Uuid>,
    /// Accepted shards' times from assignment, by kind: observed once the commit succeeded, so
    /// a batch settled again one by one counts each once.
    latencies: Vec<(&'static str, f64)>,
}

impl Settling {
    /// Charges `node` a bad result for `shard`, with the other hot rows.
    pub fn charge_bad_result(&mut self, node: &str, shard: Uuid) {
        self.failures.push((node.to_string(), shard));
    }

    /// Counts a finished run of `node`'s for its power score, with the other hot rows.
    pub fn count_run(&mut self, node: &str) {
        self.runs.push(node.to_string());
    }

    /// Records an accepted shard's time from assignment (`xpand_shard_latency_seconds`).
    pub fn observe_latency(&mut self, kind: &'static str, secs: f64) {
        self.latencies.push((kind, secs));
    }

    /// Applies what was deferred, commits `tx`, then publishes the jobs that ended, starts
    /// deferred reductions, sends stops and fails jobs whose shards can go nowhere.
    pub async fn commit(
        mut self,
        scheduler: &Scheduler,
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    ) -> anyhow::Result<()> {
        scheduler
            .events
            .publish_all(std::mem::take(&mut self.events))
            .await;
        if !self.failures.is_empty() {
            nodes::charge_failures(&mut tx, &self.failures, nodes::Failure::BadResult).await?;
        }
        nodes::count_runs(&mut tx, &self.runs).await?;
        escrow::release_all(&mut tx, &self.releases).await?;
        tx.commit().await?;

        for (kind, secs) in self.latencies {
            let latency = &scheduler.metrics.shard_latency;
            latency.with_label_values(&[kind]).observe(secs);
        }
        for (account, job) in self.finished {
            scheduler.publish_finished(account, job).await;
        }
        for (kind, job) in self.reductions {
            tokio::spawn(reduce_deferred(scheduler.clone(), kind, job));
        }
        for stop in &self.stops {
            scheduler.link.send_stop(stop).await;
        }
        if !self.requeued.is_empty() {
            fail_hopeless(scheduler, Some(&self.requeued)).await?;
        }
        scheduler.wake_dispatcher();
        Ok(())
    }
}

/// Counts an accepted shard on its job, in the caller's transaction: the last shard reduces and
/// ends an inline kind's job there, or starts a deferred reduction after the commit. `run_by`
/// is the node whose run produced the answer, counted for its power score at the commit.
pub(super) async fn complete_shard(
    conn: &mut PgConnection,
    kind: &Arc<dyn JobKind>,
    job: &LockedJob,
    accepted: Accepted,
    run_by: Option<&str>,
    settling: &mut Settling,
) -> anyhow::Result<()> {
    let shards_done = sqlx::query_scalar!(
        "UPDATE jobs SET shards_done = shards_done + 1, status = 'running',
                started_at = COALESCE(started_at, now()), updated_at = now()
         WHERE id = $1 RETURNING shards_done",
        job.id
    )
    .fetch_one(&mut *conn)
    .await?;
    let inline = kind.reduction() == Reduction::Inline;
    let last = shards_done == job.shards_total;
    let output = if last && inline {
        // A one-shard job's only output is the one in hand: reading it back would cost as
        // much as storing it did.
        let outputs = if job.shards_total == 1 {
            vec![accepted.output.clone()]
        } else {
            sqlx::query_scalar!(
                r#"SELECT output AS "output!: sqlx::types::Json<ShardOutput>" FROM shards
               WHERE job_id = $1 AND replica_of IS NULL ORDER BY idx"#,
                job.id
            )
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(|o| o.0)
            .collect()
        };
        Some(kind.reduce(outputs)?)
    } else {
        None
    };
    // A job ending here needs no progress event: the terminal one carries its counts.
    let mut events = Vec::with_capacity(2);
    if let Some(slice) = kind.partial(&accepted.output) {
        let partial = JobEvent::Partial {
            job_id: job.id,
            shard: accepted.idx,
            offset: accepted.row_offset,
            rows: slice.rows,
            intervals: slice.intervals,
            outputs: slice.outputs,
        };
        events.push((job.account, partial));
    }
    if output.is_none() {
        let progress = JobEvent::Progress {
            job_id: job.id,
            status: JobStatus::Running,
            shards_done,
            shards_total: job.shards_total,
        };
        events.push((job.account, progress));
    }
    if job.has_webhook {
        for (_, event) in &events {
            let kind = match event {
                JobEvent::Partial { .. } => WebhookEvent::Partial,
                _ => WebhookEvent::Progress,
            };
            let data = serde_json::to_value(event).expect("events serialize");
            store::enqueue_webhook(&mut *conn, job.id, kind, Some(data)).await?;
        }
    }
    settling.events.extend(events);
    if let Some(output) = output {
        let ended = end(
            &mut *conn,
            job.id,
            Outcome::Succeeded(output),
            &mut settling.releases,
        )
        .await?;
        if let Some(ended) = ended {
            settling.finished.push((job.account, ended));
        }
    }
    if let Some(node) = run_by {
        settling.count_run(node);
    }
    if last && !inline {
        settling.reductions.push((kind.clone(), job.id));
    }
    Ok(())
}

/// How a job ends.
pub enum Outcome {
    Succeeded(Value),
    Failed(JobError),
    /// Failed because of what the caller sent (its input cannot be processed): the nodes'
    /// accepted work was done in good faith and is paid, as for a cancel, and `output` holds
    /// what was paid for ([`paid_output`]).
    FailedOnInput {
        error: JobError,
        output: Option<Value>,
    },
    /// Stopped by its owner, or by its deadline (`reason`): shards done are paid, and `output`
    /// holds their rows ([`paid_output`]).
    Canceled {
        reason: Option<JobError>,
        output: Option<Value>,
    },
}

/// Ends a job and releases its escrow, in the caller's transaction. Succeeded: the nodes are
/// paid for their shards and the gateway its fee. Canceled, or failed on the caller's input:
/// the nodes are paid for shards already done; the rest is refunded. Failed otherwise:
/// everything is refunded.
/// Returns `None` when the job had already ended (nothing changes).
pub async fn finish(
    conn: &mut PgConnection,
    job_id: Uuid,
    outcome: Outcome,
) -> anyhow::Result<Option<Job>> {
    let mut releases = Vec::with_capacity(1);
    let ended = end(&mut *conn, job_id, outcome, &mut releases).await?;
    match escrow::release_all(conn, &releases).await {
        Ok(_) => Ok(ended),
        // Released already (by a replica whose job update we cannot see yet): the failed
        // insert aborted the transaction, so nothing above takes effect either.
        Err(LedgerError::AlreadyPosted(_)) => Ok(None),
        Err(e) => Err(e).context("releasing escrow"),
    }
}

/// Ends a job as [`finish`] does, leaving its escrow's release in `releases` for the caller to
/// post last ([`escrow::release_all`]): it locks balances that every job touches (the
/// gateway's revenue, the nodes' earnings), which should stay locked only until the commit.
async fn end(
    conn: &mut PgConnection,
    job_id: Uuid,
    outcome: Outcome,
    releases: &mut Vec<(Uuid, Release, String)>,
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
                royalty: job.royalty_account.map(|owner| (owner, job.royalty)),
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
        Outcome::Canceled { reason, output } => (
            JobStatus::Canceled,
            Release {
                payouts: done_shard_payouts(conn, job_id).await?,
                fee: 0,
                royalty: None,
            },
            output,
            reason,
        ),
        Outcome::Failed(error) => (JobStatus::Failed, Release::default(), None, Some(error)),
        Outcome::FailedOnInput { error, output } => (
            JobStatus::Failed,
            Release {
                payouts: done_shard_payouts(conn, job_id).await?,
                fee: 0,
                royalty: None,
            },
            output,
            Some(error),
        ),
    };
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
    if row.webhook.is_some() {
        store::enqueue_webhook(conn, job_id, WebhookEvent::Completed, None).await?;
    }
    releases.push((
        job_id,
        release,
        format!("job {} {}", job.kind, status.as_str()),
    ));
    Ok(Some(row.into()))
}

/// What each node earned on this job: the fees of the shards it completed.
async fn done_shard_payouts(
    conn: &mut PgConnection,
    job_id: Uuid,
) -> sqlx::Result<Vec<(Uuid, i64)>> {
    let earned = sqlx::query!(
        r#"SELECT n.account_id, sum(s.fee)::bigint AS "fees!" FROM shards s
           JOIN nodes n ON n.id = s.node_id
           WHERE s.job_id = $1 AND s.status = 'done' AND s.replica_of IS NULL
           GROUP BY n.account_id ORDER BY 1"#,
        job_id
    )
    .fetch_all(conn)
    .await?;
    Ok(earned.into_iter().map(|e| (e.account_id, e.fees)).collect())
}

/// What the caller paid for when a job ends early: the rows of the shards done so far, as the
/// job's kind lays them out ([`JobKind::reduce_paid`]). Read with the job row locked, so no
/// shard completes between this and the payouts.
async fn paid_output(
    scheduler: &Scheduler,
    conn: &mut PgConnection,
    job_id: Uuid,
) -> anyhow::Result<Option<Value>> {
    let kind: String = sqlx::query_scalar("SELECT kind FROM jobs WHERE id = $1")
        .bind(job_id)
        .fetch_one(&mut *conn)
        .await?;
    let Some(kind) = scheduler.kinds.get(&kind).cloned() else {
        return Ok(None);
    };
    let slices: Vec<(i32, i32, Option<sqlx::types::Json<ShardOutput>>)> = sqlx::query_as(
        "SELECT row_offset, row_count, CASE WHEN status = 'done' THEN output END FROM shards
         WHERE job_id = $1 AND replica_of IS NULL ORDER BY idx",
    )
    .bind(job_id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(kind.reduce_paid(
        slices
            .into_iter()
            .map(|(row_offset, row_count, output)| PaidSlice {
                row_offset,
                row_count,
                output: output.map(|o| o.0),
            })
            .collect(),
    ))
}

/// Cancels one of the caller's unfinished jobs: the nodes are paid for the shards done, whose
/// rows stay the job's output; the rest is refunded.
pub async fn cancel(scheduler: &Scheduler, account: Uuid, job_id: Uuid) -> Result<Job, AppError> {
    let mut tx = scheduler.db.begin().await?;
    let status = sqlx::query_scalar!(
        r#"SELECT status AS "status: JobStatus" FROM jobs
           WHERE id = $1 AND account_id = $2 FOR UPDATE"#,
        job_id,
        account
    )
    .fetch_optional(&mut *tx)
    .await?;
    let status = status.ok_or(AppError::NotFound("job"))?;
    if status.is_terminal() {
        return Err(AppError::Conflict(format!(
            "the job is already {}",
            status.as_str()
        )));
    }
    let job = match end_canceled(scheduler, &mut tx, job_id, None).await? {
        Some(job) => job,
        None => store::fetch_row(&mut tx, job_id).await?.into(),
    };
    tx.commit().await?;
    scheduler.publish_finished(account, job.clone()).await;
    Ok(job)
}

/// Cancels a job whose row the caller has locked, keeping the rows it paid for.
async fn end_canceled(
    scheduler: &Scheduler,
    conn: &mut PgConnection,
    job_id: Uuid,
    reason: Option<JobError>,
) -> anyhow::Result<Option<Job>> {
    let output = paid_output(scheduler, conn, job_id).await?;
    finish(conn, job_id, Outcome::Canceled { reason, output }).await
}

/// Cancels the unfinished jobs whose deadline has passed, as their owners would, saying why.
pub(super) async fn cancel_overdue(scheduler: &Scheduler) -> anyhow::Result<()> {
    let overdue: Vec<(Uuid, Uuid, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT id, account_id, deadline FROM jobs
         WHERE deadline <= now() AND status IN ('queued', 'running')",
    )
    .fetch_all(&scheduler.db)
    .await?;
    for (job_id, account, deadline) in overdue {
        let mut tx = scheduler.db.begin().await?;
        sqlx::query("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE")
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        let reason = JobError {
            code: "deadline_exceeded".into(),
            message: format!(
                "the job was not done by its deadline ({}): the nodes are paid for the shards \
                 done, whose rows are the output; the rest is refunded",
                deadline.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
        };
        let job = end_canceled(scheduler, &mut tx, job_id, Some(reason)).await?;
        tx.commit().await?;
        if let Some(job) = job {
            tracing::info!(job = %job_id, "job canceled at its deadline");
            scheduler.publish_finished(account, job).await;
        }
    }
    Ok(())
}

/// Fails a job with a full refund, unless it already ended.
pub async fn fail(
    scheduler: &Scheduler,
    job_id: Uuid,
    code: &str,
    message: &str,
) -> anyhow::Result<()> {
    let error = JobError {
        code: code.into(),
        message: message.into(),
    };
    end_failed(scheduler, job_id, Outcome::Failed(error)).await
}

/// Ends a job as failed (`outcome` is one of the failures), unless it already ended.
async fn end_failed(scheduler: &Scheduler, job_id: Uuid, outcome: Outcome) -> anyhow::Result<()> {
    let mut tx = scheduler.db.begin().await?;
    let outcome = match outcome {
        Outcome::FailedOnInput { error, .. } => {
            // Locked before the paid rows are read: no shard may complete in between.
            sqlx::query("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE")
                .bind(job_id)
                .execute(&mut *tx)
                .await?;
            let output = paid_output(scheduler, &mut tx, job_id).await?;
            Outcome::FailedOnInput { error, output }
        }
        other => other,
    };
    let job = finish(&mut tx, job_id, outcome).await?;
    let account = sqlx::query_scalar!("SELECT account_id FROM jobs WHERE id = $1", job_id)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    if let Some(job) = job {
        let code = job.error.as_ref().map_or("", |e| e.code.as_str());
        tracing::warn!(job = %job_id, code, "job failed");
        scheduler.publish_finished(account, job).await;
    }
    Ok(())
}

/// Fails the jobs of pending shards that can go nowhere: out of attempts
/// (`XPAND_MAX_SHARD_ATTEMPTS`, whatever sent them back: rejects, bad results, lost leases,
/// split votes), or whose input two different nodes called unusable. Unusable input is the
/// caller's doing, so the nodes are paid for shards already done; otherwise everything is
/// refunded. Called with `Some(shards)` right after whatever re-queued them commits (the
/// dispatcher never sends such a shard again meanwhile), and by the sweep with `None` for all.
pub(super) async fn fail_hopeless(
    scheduler: &Scheduler,
    shards: Option<&[Uuid]>,
) -> anyhow::Result<()> {
    let hopeless = sqlx::query!(
        r#"SELECT job_id, bool_or(cardinality(input_refused_by) >= 2) AS "unusable!",
                  min(idx) AS "idx!"
           FROM shards
           WHERE status = 'pending' AND ($1::uuid[] IS NULL OR id = ANY($1))
             AND (attempts >= $2 OR cardinality(input_refused_by) >= 2)
           GROUP BY job_id"#,
        shards as Option<&[Uuid]>,
        scheduler.rules.max_shard_attempts as i32
    )
    .fetch_all(&scheduler.db)
    .await?;
    for job in hopeless {
        let outcome = if job.unusable {
            Outcome::FailedOnInput {
                error: JobError {
                    code: "input_unusable".into(),
                    message: format!(
                        "two nodes could not process the input of shard {} (it does not decode, \
                         or is not what the job's plan says it is); the nodes are paid for the \
                         shards they finished, the rest is refunded",
                        job.idx
                    ),
                },
                output: None,
            }
        } else {
            Outcome::Failed(JobError {
                code: "shard_attempts_exhausted".into(),
                message: format!(
                    "shard {} was sent to nodes {} times without a usable result",
                    job.idx, scheduler.rules.max_shard_attempts
                ),
            })
        };
        end_failed(scheduler, job.job_id, outcome).await?;
    }
    Ok(())
}

/// Runs a deferred reduction of `job_id` here, unless another replica holds a fresh claim on
/// it or it is not ready. A failure fails the job with a full refund (a failure to fail it
/// leaves the claim to lapse, and the sweeper tries again).
pub async fn reduce_deferred(scheduler: Scheduler, kind: Arc<dyn JobKind>, job_id: Uuid) {
    let Reduction::Deferred { lease } = kind.reduction() else {
        return;
    };
    let claimed = match claim_reduction(&scheduler, kind.name(), job_id, lease).await {
        Ok(Some(claimed)) => claimed,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(job = %job_id, error = ?e, "claiming a reduction failed");
            return;
        }
    };
    if let Err(e) = kind.reduce_deferred(&scheduler, claimed).await {
        tracing::warn!(job = %job_id, error = format!("{e:#}"), "reducing a job failed");
        let message = format!(
            "the {} job's shard outputs could not be combined",
            kind.name()
        );
        if let Err(e) = fail(&scheduler, job_id, "reduce_failed", &message).await {
            tracing::warn!(job = %job_id, error = ?e, "failing the job failed");
        }
    }
}

/// Claims the reduction of a running job whose shards are all done, for `lease`.
async fn claim_reduction(
    scheduler: &Scheduler,
    kind: &str,
    job_id: Uuid,
    lease: std::time::Duration,
) -> sqlx::Result<Option<ClaimedJob>> {
    let claimed = sqlx::query!(
        "UPDATE jobs SET reduce_claimed_at = now()
         WHERE id = $1 AND kind = $2 AND status = 'running' AND shards_done = shards_total
           AND (reduce_claimed_at IS NULL OR reduce_claimed_at < now() - $3 * interval '1 second')
         RETURNING account_id, input",
        job_id,
        kind,
        lease.as_secs_f64(),
    )
    .fetch_optional(&scheduler.db)
    .await?;
    Ok(claimed.map(|c| ClaimedJob {
        id: job_id,
        account: c.account_id,
        input: c.input,
    }))
}
