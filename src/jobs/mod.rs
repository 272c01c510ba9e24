//! Jobs: what a caller submits, how it is priced and mapped into shards, and how it is read back.
//! The map → dispatch → reduce state machine that runs them lives in [`orchestrator`].
//!
//! Job states: `queued` → `running` → `succeeded` | `failed` | `canceled`. A terminal state is
//! reached exactly once, in the same transaction that releases the job's escrow.

pub mod anonymize;
pub mod forecast;
pub mod orchestrator;
pub mod verification;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use utoipa::ToSchema;
use uuid::Uuid;
use xpand_protocol::ShardTask;

use crate::error::{AppError, FieldError};
use crate::ledger::{self, escrow, LedgerError};
use crate::state::AppState;

/// A job submission.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitJob {
    /// `forecast` or `anonymize`.
    #[schema(example = "forecast")]
    pub kind: String,
    /// Kind-specific input. `forecast`: `{"series": [[number, ...], ...]}`, one array per
    /// spreadsheet row, each with at least 3 values. `anonymize`: `{"file": "<file id>"}`, a
    /// video uploaded with `POST /v1/files`.
    #[schema(value_type = Object, example = json!({"series": [[112, 118, 132, 129, 121, 135, 148, 148]]}))]
    pub input: Value,
    /// Kind-specific parameters. `forecast`: `{"horizon": 1..=24}`. `anonymize` (all optional):
    /// `{"targets": ["faces"], "style": "blur" | "mosaic" | "solid", "threshold": 0.01..=0.99
    /// (default 0.2), "quality": "high" | "standard" | "small"}`.
    #[serde(default = "empty_object")]
    #[schema(value_type = Object, example = json!({"horizon": 6}))]
    pub params: Value,
    /// The most the caller agrees to pay, in micro-credits. The job is refused if the quote is
    /// higher.
    #[schema(example = 100000)]
    pub max_fee: i64,
    /// http(s) URL to POST the finished job to (at least once, retried with back-off; signed:
    /// `X-Xpand-Signature` is the base64 ed25519 signature of `{X-Xpand-Timestamp}.{body}`
    /// under the gateway's public key; deduplicate on `X-Xpand-Delivery`).
    #[serde(default)]
    pub webhook: Option<String>,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, sqlx::Type)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl JobStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Canceled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Canceled => "canceled",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct JobProgress {
    pub shards_total: i32,
    pub shards_done: i32,
    /// Video jobs, on `GET /v1/jobs/{id}`: frames masked so far (as workers report them) and in
    /// all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames_done: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames_total: Option<i64>,
}

/// Why a job failed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct JobError {
    /// Stable code: `shard_attempts_exhausted`, `timed_out`.
    pub code: String,
    pub message: String,
}

/// A job as its owner sees it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Job {
    pub id: Uuid,
    pub kind: String,
    pub status: JobStatus,
    #[schema(value_type = Object)]
    pub params: Value,
    pub progress: JobProgress,
    /// Price quoted at submit, in micro-credits.
    pub quote: i64,
    pub max_fee: i64,
    /// Micro-credits escrowed for this job at submit.
    pub escrow: i64,
    /// Micro-credits charged, once the job is settled.
    pub cost: Option<i64>,
    /// Kind-specific result, once succeeded. `forecast`: `{"forecasts": [[...], ...]}` in row
    /// order. `anonymize`: `{"file": "<file id>", "frames", "width", "height",
    /// "duration_seconds", "segments", "faces_masked", "audio", "size", "sha256"}`; the masked
    /// video (H.264 MP4, original audio) is `GET /v1/files/{file}`. Either may carry
    /// `"unverified_shards": [idx, ...]`: shards held for a check by a second node that no node
    /// could run in time, accepted as the first node answered.
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    pub error: Option<JobError>,
    pub webhook: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// When the job's input and output were erased under the retention policy
    /// (`XPAND_RETENTION_HOURS` after it finished); `output` is null from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_expired_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
pub(crate) struct JobRow {
    pub id: Uuid,
    pub kind: String,
    pub status: JobStatus,
    pub params: Value,
    pub output: Option<Value>,
    pub error: Option<Value>,
    pub quote: i64,
    pub max_fee: i64,
    pub escrow: i64,
    pub gateway_fee: i64,
    pub cost: Option<i64>,
    pub shards_total: i32,
    pub shards_done: i32,
    pub webhook: Option<String>,
    pub request_hash: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Indexes of shards accepted without the check they were held for.
    pub unverified_shards: Vec<i32>,
    pub data_expired_at: Option<DateTime<Utc>>,
}

pub(crate) const JOB_COLUMNS: &str = "id, kind, status, params, output, error, quote, \
    max_fee, escrow, gateway_fee, cost, shards_total, shards_done, webhook, request_hash, \
    created_at, updated_at, started_at, finished_at, unverified_shards, data_expired_at";

impl From<JobRow> for Job {
    fn from(r: JobRow) -> Self {
        Job {
            id: r.id,
            kind: r.kind,
            status: r.status,
            params: r.params,
            progress: JobProgress {
                shards_total: r.shards_total,
                shards_done: r.shards_done,
                frames_done: None,
                frames_total: None,
            },
            quote: r.quote,
            max_fee: r.max_fee,
            escrow: r.escrow,
            cost: r.cost,
            output: r.output,
            error: r.error.and_then(|e| serde_json::from_value(e).ok()),
            webhook: r.webhook,
            created_at: r.created_at,
            updated_at: r.updated_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            data_expired_at: r.data_expired_at,
        }
    }
}

/// A job mapped into shards, before it is stored.
#[derive(Debug)]
pub struct JobPlan {
    pub model: String,
    /// The gateway's share of the price; workers earn the shards' fees.
    pub gateway_fee: i64,
    pub shards: Vec<ShardPlan>,
    /// Objects stored while planning (video segments): deleted if the job is refused after all.
    pub staged: Vec<object_store::path::Path>,
}

impl JobPlan {
    pub fn quote(&self) -> i64 {
        self.gateway_fee + self.shards.iter().map(|s| s.fee).sum::<i64>()
    }
}

#[derive(Debug)]
pub struct ShardPlan {
    pub row_offset: i32,
    pub row_count: i32,
    pub fee: i64,
    pub task: ShardTask,
}

/// Validates a submission and maps it into the shards of job `id`, naming every bad field.
async fn plan(
    state: &AppState,
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
        } else if let Err(why) = state.config.egress.check_url(url).await {
            errors.push(FieldError::new("webhook", why));
        }
    }
    if !req.params.is_object() {
        errors.push(FieldError::new("params", "must be an object"));
    }
    let plan = match req.kind.as_str() {
        "forecast" => forecast::plan(&req.input, &req.params),
        anonymize::KIND if errors.is_empty() => {
            // Probing and cutting the video is work: only for an otherwise valid request.
            return anonymize::plan(state, account, id, &req.input, &req.params).await;
        }
        anonymize::KIND => return Err(AppError::Validation(errors)),
        other => {
            errors.push(FieldError::new(
                "kind",
                format!("unknown job kind {other:?}; supported: forecast, anonymize"),
            ));
            return Err(AppError::Validation(errors));
        }
    };
    match plan {
        Ok(plan) if errors.is_empty() => Ok(plan),
        Ok(_) => Err(AppError::Validation(errors)),
        Err(mut more) => {
            errors.append(&mut more);
            Err(AppError::Validation(errors))
        }
    }
}

/// Checks a shard's output against its task, whatever the kind.
pub fn check_output(task: &ShardTask, output: &xpand_protocol::ShardOutput) -> Result<(), String> {
    match task {
        ShardTask::Forecast { .. } => forecast::check_output(task, output),
        ShardTask::Anonymize(task) => anonymize::check_output(task, output),
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
/// no trace and moves no money (objects staged while planning are deleted again).
pub async fn submit(
    state: &AppState,
    account: Uuid,
    req: &SubmitJob,
    idempotency_key: Option<&str>,
) -> Result<Submitted, AppError> {
    let pool = &state.db;
    let hash = request_hash(req);
    if let Some(key) = idempotency_key {
        if let Some(existing) = find_by_idempotency_key(pool, account, key).await? {
            return existing_for(existing, &hash);
        }
    }
    let id = Uuid::now_v7();
    let plan = plan(state, account, id, req).await?;
    let max_unfinished = state.config.limits.max_unfinished_jobs;
    let idempotency = Idempotency {
        key: idempotency_key,
        hash: &hash,
    };
    let stored = store(pool, account, id, req, idempotency, &plan, max_unfinished).await;
    if !matches!(stored, Ok(Submitted::Created(_))) {
        anonymize::delete_all(state, &plan.staged).await;
    }
    stored
}

/// A submission's idempotency key, if any, and the hash of the request it stands for.
#[derive(Clone, Copy)]
struct Idempotency<'a> {
    key: Option<&'a str>,
    hash: &'a str,
}

async fn store(
    pool: &PgPool,
    account: Uuid,
    id: Uuid,
    req: &SubmitJob,
    idempotency: Idempotency<'_>,
    plan: &JobPlan,
    max_unfinished: i64,
) -> Result<Submitted, AppError> {
    let Idempotency {
        key: idempotency_key,
        hash,
    } = idempotency;
    let quote = plan.quote();
    if quote > req.max_fee {
        return Err(AppError::MaxFeeBelowQuote {
            quote,
            max_fee: req.max_fee,
        });
    }

    let mut tx = pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO jobs (id, account_id, kind, status, input, params, quote, max_fee, escrow,
                           gateway_fee, shards_total, webhook, idempotency_key, request_hash)
         VALUES ($1, $2, $3, 'queued', $4, $5, $6, $7, $6, $8, $9, $10, $11, $12)",
    )
    .bind(id)
    .bind(account)
    .bind(&req.kind)
    .bind(&req.input)
    .bind(&req.params)
    .bind(quote)
    .bind(req.max_fee)
    .bind(plan.gateway_fee)
    .bind(plan.shards.len() as i32)
    .bind(&req.webhook)
    .bind(idempotency_key)
    .bind(hash)
    .execute(&mut *tx)
    .await;
    if let (Err(sqlx::Error::Database(db)), Some(key)) = (&inserted, idempotency_key) {
        if db.is_unique_violation() {
            // A concurrent request with the same key won the race; answer with its job.
            drop(tx);
            let existing = find_by_idempotency_key(pool, account, key)
                .await?
                .ok_or_else(|| anyhow::anyhow!("idempotent job vanished"))?;
            return existing_for(existing, hash);
        }
    }
    inserted?;

    match escrow::hold(&mut tx, account, id, quote).await {
        Ok(()) => {}
        Err(LedgerError::Overdrawn) => {
            drop(tx);
            let available = ledger::balances(pool, account).await?.available;
            return Err(AppError::InsufficientFunds { quote, available });
        }
        Err(e) => return Err(AppError::Internal(e.into())),
    }
    // Counted after the hold, which locks the account's balance: concurrent submits of one
    // account pass here one at a time, so the quota cannot be raced past.
    let unfinished: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE account_id = $1 AND status IN ('queued', 'running')",
    )
    .bind(account)
    .fetch_one(&mut *tx)
    .await?;
    if unfinished > max_unfinished {
        return Err(AppError::QuotaExceeded(format!(
            "the account already has {max_unfinished} unfinished jobs, the most it may have; \
             wait for some to finish"
        )));
    }
    insert_shards(&mut tx, id, plan).await?;
    let row = fetch_row(&mut tx, id).await?;
    tx.commit().await?;
    Ok(Submitted::Created(row.into()))
}

fn existing_for(row: JobRow, hash: &str) -> Result<Submitted, AppError> {
    if row.request_hash.as_deref() != Some(hash) {
        return Err(AppError::IdempotencyMismatch);
    }
    Ok(Submitted::Existing(row.into()))
}

async fn insert_shards(conn: &mut PgConnection, job: Uuid, plan: &JobPlan) -> sqlx::Result<()> {
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
    Ok(())
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

/// One of the caller's jobs; another account's job is "not found", never "forbidden". A video
/// job also reports frames done, from its segments' progress.
pub async fn get(pool: &PgPool, account: Uuid, id: Uuid) -> Result<Job, AppError> {
    let mut job: Job = sqlx::query_as::<_, JobRow>(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 AND account_id = $2"
    ))
    .bind(id)
    .bind(account)
    .fetch_optional(pool)
    .await?
    .map(Job::from)
    .ok_or(AppError::NotFound("job"))?;
    if job.kind == anonymize::KIND {
        let (done, total): (i64, i64) = sqlx::query_as(
            "SELECT COALESCE(sum(CASE WHEN status IN ('done', 'verifying') THEN row_count
                                      WHEN status = 'assigned' THEN LEAST(progress_done, row_count)
                                      ELSE 0 END), 0)::bigint,
                    COALESCE(sum(row_count), 0)::bigint
             FROM shards WHERE job_id = $1 AND replica_of IS NULL",
        )
        .bind(id)
        .fetch_one(pool)
        .await?;
        job.progress.frames_done = Some(done);
        job.progress.frames_total = Some(total);
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
