//! Submitting and reading jobs: a submission validated by its kind, priced, escrowed and
//! stored with its shards in one transaction; jobs read back by their owner only.

use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::batch::Batcher;
use super::dispatch::{self, PendingShard, Recorded};
use super::kind::PlanRequest;
use super::{Job, JobPlan, JobRow, JobStatus, Kinds, Scheduler, SubmitJob, JOB_COLUMNS};
use crate::error::{AppError, FieldError};
use crate::files;
use crate::ledger::{self, escrow, LedgerError};

/// Validates a submission and maps it into the shards of job `id`, naming every bad field.
async fn plan(
    scheduler: &Scheduler,
    account: Uuid,
    id: Uuid,
    req: &SubmitJob,
) -> Result<JobPlan, AppError> {
    let mut errors = Vec::new();
    if req.max_fee < 0 {
        errors.push(FieldError::new("max_fee", "must be a non-negative integer"));
    }
    if let Some(url) = &req.webhook {
        if url.len() > 2048 {
            errors.push(FieldError::new(
                "webhook",
                "must be at most 2048 characters",
            ));
        } else if let Err(why) = scheduler.egress.check_url(url).await {
            errors.push(FieldError::new("webhook", why));
        }
    }
    if !req.params.is_object() {
        errors.push(FieldError::new("params", "must be an object"));
    }
    if let Some(deadline) = req.deadline {
        let now = chrono::Utc::now();
        let latest = scheduler.rules.job_timeout.as_secs();
        if deadline <= now {
            errors.push(FieldError::new("deadline", "is not in the future"));
        } else if (deadline - now).num_seconds() as u64 > latest {
            errors.push(FieldError::new(
                "deadline",
                format!(
                    "is more than {latest} s away: every job ends by then \
                     (XPAND_JOB_TIMEOUT_SECS)"
                ),
            ));
        }
    }
    let Some(kind) = scheduler.kinds.get(&req.kind) else {
        let supported: Vec<&str> = scheduler.kinds.names().collect();
        errors.push(FieldError::new(
            "kind",
            format!(
                "unknown job kind {:?}; supported: {}",
                req.kind,
                supported.join(", ")
            ),
        ));
        return Err(AppError::Validation(errors));
    };
    if !errors.is_empty() && kind.plan_is_costly() {
        return Err(AppError::Validation(errors));
    }
    let request = PlanRequest {
        account,
        job: id,
        input: &req.input,
        params: &req.params,
    };
    match kind.plan(scheduler, request).await {
        Ok(plan) if errors.is_empty() => Ok(plan),
        Ok(plan) => {
            files::delete_all(scheduler.files.as_ref(), &plan.staged).await;
            Err(AppError::Validation(errors))
        }
        Err(AppError::Validation(mut more)) => {
            errors.append(&mut more);
            Err(AppError::Validation(errors))
        }
        Err(e) => Err(e),
    }
}

/// Hash of a submission, to tell an idempotent retry from a different request under the same key.
fn request_hash(req: &SubmitJob) -> String {
    hex::encode(Sha256::digest(
        serde_json::to_vec(req).expect("submissions serialize"),
    ))
}

/// The outcome of [`submit`]: a new job, or the one an earlier request with the same
/// idempotency key created.
pub enum Submitted {
    Created(Job),
    Existing(Job),
}

/// Prices, escrows and stores a job with its shards, in one transaction: a refused job leaves
/// no trace and moves no money (objects staged while planning are deleted again). Submissions
/// of one account that arrive together are stored together ([`SubmitBatcher`]).
pub async fn submit(
    scheduler: &Scheduler,
    account: Uuid,
    req: &SubmitJob,
    idempotency_key: Option<&str>,
) -> Result<Submitted, AppError> {
    let pool = &scheduler.db;
    let hash = request_hash(req);
    if let Some(key) = idempotency_key {
        if let Some(existing) = find_by_idempotency_key(pool, account, key).await? {
            return existing_for(existing, &hash);
        }
    }
    let id = Uuid::now_v7();
    let mut plan = plan(scheduler, account, id, req).await?;
    let quote = plan.quote();
    if quote > req.max_fee {
        files::delete_all(scheduler.files.as_ref(), &plan.staged).await;
        return Err(AppError::MaxFeeBelowQuote {
            quote,
            max_fee: req.max_fee,
        });
    }
    let staged = plan.staged.clone();
    let planned = Planned {
        id,
        account,
        kind: req.kind.clone(),
        input: plan
            .input_record
            .take()
            .unwrap_or_else(|| req.input.clone()),
        params: req.params.clone(),
        max_fee: req.max_fee,
        webhook: req.webhook.clone(),
        deadline: req.deadline,
        idempotency_key: idempotency_key.map(str::to_string),
        hash,
        plan,
        max_unfinished: scheduler.max_unfinished_jobs,
    };
    let stored = scheduler
        .submits
        .enqueue(scheduler, account, vec![planned])
        .pop()
        .expect("one receiver per queued submission")
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("storing the job panicked").into()));
    if !matches!(stored, Ok(Submitted::Created(_))) {
        files::delete_all(scheduler.files.as_ref(), &staged).await;
    }
    stored
}

/// Submissions of one account stored in one transaction at most.
const MAX_BATCH: usize = 64;

/// A submission validated and priced, waiting to be stored: what its job's row keeps.
pub(super) struct Planned {
    id: Uuid,
    account: Uuid,
    kind: String,
    /// What the row keeps of the input ([`JobPlan::input_record`]).
    input: serde_json::Value,
    params: serde_json::Value,
    max_fee: i64,
    webhook: Option<String>,
    deadline: Option<chrono::DateTime<chrono::Utc>>,
    idempotency_key: Option<String>,
    /// Of the request, to tell an idempotent retry from a different request under its key.
    hash: String,
    plan: JobPlan,
    max_unfinished: i64,
}

/// An account's submissions wait while a batch of its submissions is being stored and are
/// stored together in the next one: one transaction, one escrow posting for all their holds,
/// the account's balance locked once.
pub(super) type SubmitBatcher = Batcher<Uuid, Planned, Result<Submitted, AppError>>;

pub(super) fn submit_batcher() -> SubmitBatcher {
    Batcher::new(MAX_BATCH, |scheduler, planned| {
        Box::pin(async move { store(&scheduler, &planned).await })
    })
}

/// Stores a batch of one account's submissions in one transaction; when that fails (one is
/// refused: a short balance, the quota, an idempotency key raced), each alone, so a refused
/// submission gets its own problem and the others their jobs.
async fn store(scheduler: &Scheduler, planned: &[Planned]) -> Vec<Result<Submitted, AppError>> {
    if planned.len() > 1 {
        if let Ok(stored) = store_together(scheduler, planned).await {
            return stored.into_iter().map(Ok).collect();
        }
    }
    let mut stored = Vec::with_capacity(planned.len());
    for one in planned {
        let outcome = store_together(scheduler, std::slice::from_ref(one)).await;
        stored.push(outcome.map(|mut one| one.pop().expect("one job per submission")));
    }
    stored
}

/// Stores one account's submissions, their shards and their escrow holds in one transaction,
/// or none of them. A one-shard job is also placed on a node there when it may be
/// ([`dispatch::placement_at_submit`]), and its assignment sent after the commit: a small job
/// then costs no dispatch round of its own.
async fn store_together(
    scheduler: &Scheduler,
    planned: &[Planned],
) -> Result<Vec<Submitted>, AppError> {
    let pool = &scheduler.db;
    let (account, max_unfinished) = (planned[0].account, planned[0].max_unfinished);
    let mut placement = if planned.iter().any(|job| job.plan.shards.len() == 1) {
        // Placing here only saves a dispatch round: a failure to look (presence unreachable,
        // say) leaves the job to the dispatcher rather than failing the submit.
        dispatch::placement_at_submit(scheduler)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "placing at submit failed; left to dispatch"
                );
                None
            })
    } else {
        None
    };
    let mut placeable = Vec::new();
    // The account's balance rows are locked last (by the holds, then the quota count under
    // them), so concurrent submits of one account wait for each other as briefly as possible.
    let mut tx = pool.begin().await?;
    let mut rows = Vec::with_capacity(planned.len());
    for job in planned {
        // The files the job reads are held (shared) until the commit, so a delete either ran
        // before (and the submit is refused here) or waits and then sees the job.
        files::hold_for_job(&mut tx, account, &job.plan.reads).await?;
        let inserted: sqlx::Result<JobRow> = sqlx::query_as(&format!(
            "INSERT INTO jobs (id, account_id, kind, status, input, params, quote, max_fee,
                               escrow, gateway_fee, shards_total, webhook, idempotency_key,
                               request_hash, input_files, deadline, royalty_account, royalty)
             VALUES ($1, $2, $3, 'queued', $4, $5, $6, $7, $6, $8, $9, $10, $11, $12, $13, $14,
                     $15, $16)
             RETURNING {JOB_COLUMNS}"
        ))
        .bind(job.id)
        .bind(account)
        .bind(&job.kind)
        .bind(&job.input)
        .bind(&job.params)
        .bind(job.plan.quote())
        .bind(job.max_fee)
        .bind(job.plan.gateway_fee)
        .bind(job.plan.shards.len() as i32)
        .bind(&job.webhook)
        .bind(&job.idempotency_key)
        .bind(&job.hash)
        .bind(&job.plan.reads)
        .bind(job.deadline)
        .bind(job.plan.royalty.map(|(account, _)| account))
        .bind(job.plan.royalty.map_or(0, |(_, amount)| amount))
        .fetch_one(&mut *tx)
        .await;
        if let (Err(sqlx::Error::Database(db)), Some(key), [_]) =
            (&inserted, &job.idempotency_key, planned)
        {
            if db.is_unique_violation() {
                // A concurrent request with the same key won the race; answer with its job.
                drop(tx);
                let existing = find_by_idempotency_key(pool, account, key)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("idempotent job vanished"))?;
                return Ok(vec![existing_for(existing, &job.hash)?]);
            }
        }
        rows.push(inserted?);
        let shards = insert_shards(&mut tx, job.id, &job.plan).await?;
        if let ([shard], [planned_shard], true) =
            (&shards[..], &job.plan.shards[..], placement.is_some())
        {
            let task = planned_shard.task.clone();
            placeable.push(PendingShard::new(
                *shard,
                job.id,
                &job.kind,
                &job.plan.model,
                task,
            ));
        }
    }

    let recorded = match placement.as_mut() {
        Some(placement) => placement.place(scheduler, &mut tx, placeable).await?,
        None => Recorded::default(),
    };
    let holds: Vec<(Uuid, i64)> = planned.iter().map(|j| (j.id, j.plan.quote())).collect();
    match escrow::hold_all(&mut tx, account, &holds).await {
        Ok(()) => {}
        Err(LedgerError::Overdrawn) => {
            drop(tx);
            let available = ledger::balances(pool, account).await?.available;
            let quote = holds.iter().map(|(_, quote)| quote).sum();
            return Err(AppError::InsufficientFunds { quote, available });
        }
        Err(e) => return Err(AppError::Internal(e.into())),
    }
    // Counted after the holds, which lock the account's balance: concurrent submits of one
    // account pass here one at a time, so the quota cannot be raced past.
    let unfinished = sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM jobs
           WHERE account_id = $1 AND status IN ('queued', 'running')"#,
        account
    )
    .fetch_one(&mut *tx)
    .await?;
    if unfinished > max_unfinished {
        return Err(AppError::QuotaExceeded(format!(
            "the account already has {max_unfinished} unfinished jobs, the most it may have; \
             wait for some to finish"
        )));
    }
    tx.commit().await?;
    drop(placement);
    let dispatched = recorded.announce(scheduler).await;
    dispatch::send(scheduler, dispatched).await;
    Ok(rows
        .into_iter()
        .map(|row| Submitted::Created(row.into()))
        .collect())
}

fn existing_for(row: JobRow, hash: &str) -> Result<Submitted, AppError> {
    if row.request_hash.as_deref() != Some(hash) {
        return Err(AppError::IdempotencyMismatch);
    }
    Ok(Submitted::Existing(row.into()))
}

/// Inserts `plan`'s shards of `job`, pending; returns their ids in plan order.
async fn insert_shards(
    conn: &mut PgConnection,
    job: Uuid,
    plan: &JobPlan,
) -> sqlx::Result<Vec<Uuid>> {
    let n = plan.shards.len();
    let (mut ids, mut idxs, mut offsets, mut counts, mut fees, mut tasks) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (i, s) in plan.shards.iter().enumerate() {
        ids.push(Uuid::now_v7());
        idxs.push(i as i32);
        offsets.push(s.row_offset);
        counts.push(s.row_count);
        fees.push(s.fee);
        tasks.push(serde_json::to_value(&s.task).expect("tasks serialize"));
    }
    sqlx::query(
        "INSERT INTO shards (id, job_id, idx, row_offset, row_count, model, task, fee, status)
         SELECT u.id, $2, u.idx, u.row_offset, u.row_count, $3, u.task, u.fee, 'pending'
         FROM UNNEST($1::uuid[], $4::int[], $5::int[], $6::int[], $7::jsonb[], $8::bigint[])
              AS u(id, idx, row_offset, row_count, task, fee)",
    )
    .bind(&ids)
    .bind(job)
    .bind(&plan.model)
    .bind(&idxs)
    .bind(&offsets)
    .bind(&counts)
    .bind(&tasks)
    .bind(&fees)
    .execute(conn)
    .await?;
    Ok(ids)
}

async fn find_by_idempotency_key(
    pool: &PgPool,
    account: Uuid,
    key: &str,
) -> sqlx::Result<Option<JobRow>> {
    sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE account_id = $1 AND idempotency_key = $2"
    ))
    .bind(account)
    .bind(key)
    .fetch_optional(pool)
    .await
}

pub(crate) async fn fetch_row(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<JobRow> {
    sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
        .bind(id)
        .fetch_one(conn)
        .await
}

/// One of the caller's jobs; another account's job is "not found", never "forbidden". A job
/// whose kind counts frames also reports frames done, from its shards' progress.
pub async fn get(pool: &PgPool, kinds: &Kinds, account: Uuid, id: Uuid) -> Result<Job, AppError> {
    let mut job: Job = sqlx::query_as::<_, JobRow>(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 AND account_id = $2"
    ))
    .bind(id)
    .bind(account)
    .fetch_optional(pool)
    .await?
    .map(Job::from)
    .ok_or(AppError::NotFound("job"))?;
    if kinds.get(&job.kind).is_some_and(|k| k.reports_frames()) {
        let frames = sqlx::query!(
            r#"SELECT COALESCE(sum(CASE WHEN status IN ('done', 'verifying') THEN row_count
                                        WHEN status = 'assigned'
                                        THEN LEAST(progress_done, row_count)
                                        ELSE 0 END), 0)::bigint AS "done!",
                      COALESCE(sum(row_count), 0)::bigint AS "total!"
               FROM shards WHERE job_id = $1 AND replica_of IS NULL"#,
            id
        )
        .fetch_one(pool)
        .await?;
        job.progress.frames_done = Some(frames.done);
        job.progress.frames_total = Some(frames.total);
    }
    Ok(job)
}

/// Filters for listing jobs.
#[derive(Debug, Default, Clone)]
pub struct ListFilter {
    pub status: Option<JobStatus>,
    pub kind: Option<String>,
    /// Only jobs older than this one (the previous page's `next_cursor`).
    pub before: Option<Uuid>,
    pub limit: i64,
}

/// The caller's jobs, newest first (ids are UUIDv7, so id order is creation order).
pub async fn list(pool: &PgPool, account: Uuid, f: &ListFilter) -> Result<Vec<Job>, AppError> {
    let rows: Vec<JobRow> = sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs
         WHERE account_id = $1
           AND ($2::text IS NULL OR status = $2)
           AND ($3::text IS NULL OR kind = $3)
           AND ($4::uuid IS NULL OR id < $4)
         ORDER BY id DESC LIMIT $5"
    ))
    .bind(account)
    .bind(f.status.map(JobStatus::as_str))
    .bind(&f.kind)
    .bind(f.before)
    .bind(f.limit)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(Job::from).collect())
}

/// Queues a webhook message about job `job_id` in the transaction of the change it reports
/// (the outbox: delivered at least once, after the commit, by `crate::webhooks`). A registered
/// endpoint (`webhook_endpoints`, matched by the job's `webhook` URL) gets the events it chose
/// unless a 410 disabled it; any other URL gets `completed` alone. `data` is the event's body;
/// `None` for `completed`, whose body is the job as it is at delivery.
pub(super) async fn enqueue_webhook(
    conn: &mut PgConnection,
    job_id: Uuid,
    event: WebhookEvent,
    data: Option<serde_json::Value>,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO webhook_messages (id, job_id, url, endpoint_id, event, data)
         SELECT $2, j.id, j.webhook, e.id, $3, $4
         FROM jobs j
         LEFT JOIN webhook_endpoints e ON e.account_id = j.account_id AND e.url = j.webhook
         WHERE j.id = $1 AND j.webhook IS NOT NULL
           AND CASE WHEN e.id IS NULL THEN $3 = 'completed'
                    ELSE e.disabled_at IS NULL AND $3 = ANY(e.events) END",
    )
    .bind(job_id)
    .bind(Uuid::new_v4())
    .bind(event.as_str())
    .bind(data)
    .execute(conn)
    .await?;
    Ok(())
}

/// What a webhook may be told of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookEvent {
    /// The job got its first node.
    Start,
    /// A shard finished (`data`: the `progress` event).
    Progress,
    /// A shard's rows (`data`: the `partial` event).
    Partial,
    /// The job ended: succeeded, failed or canceled.
    Completed,
}

impl WebhookEvent {
    pub const ALL: [WebhookEvent; 4] =
        [Self::Start, Self::Progress, Self::Partial, Self::Completed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Progress => "progress",
            Self::Partial => "partial",
            Self::Completed => "completed",
        }
    }
}
