//! Jobs: what a caller submits and reads back, and the map → dispatch → reduce state machine
//! that runs them, whatever their kind.
//!
//! Job states: `queued` → `running` → `succeeded` | `failed` | `canceled`. A terminal state is
//! reached exactly once, in the same transaction that releases the job's escrow.
//!
//! Shards live in Postgres: `pending` → `assigned` (to one node, under a lease) → `done`, or back
//! to `pending` when the lease lapses, the node rejects it, or its result fails verification.
//! Every gateway replica runs the same loops; `FOR UPDATE SKIP LOCKED` and row locks make sure a
//! shard is assigned by one replica at a time and a result is accepted once. Lock order,
//! everywhere: the job row, then its shard rows; the dispatcher locks only shards.
//!
//! The stages, one file each: [`store`] (submit, read), [`dispatch`], [`results`],
//! [`verification`], [`settlement`], [`sweep`]. What differs between kinds is behind
//! [`kind::JobKind`]; the transports are behind [`ports`]. Nothing here names a kind, MQTT or
//! Redis.

mod batch;
pub mod dispatch;
mod event;
pub mod kind;
pub mod ports;
pub mod results;
mod scheduler;
pub mod settlement;
pub mod store;
pub mod sweep;
pub mod verification;

pub use event::{EventSink, JobEvent};
pub use kind::{JobKind, Kinds, Reduction};
pub use scheduler::{Scheduler, SchedulerParts};
pub use store::{get, list, submit, ListFilter, Submitted};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;
use xpand_protocol::ShardTask;

/// A job submission.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitJob {
    /// `forecast` or `anonymize`.
    #[schema(example = "forecast")]
    pub kind: String,
    /// Kind-specific input. `forecast`: `{"series": [[number, ...], ...]}`, one array per
    /// spreadsheet row, each with at least 3 values; a cell may be blank (`null` or `""`): filled
    /// in between values, dropped at a row's ends, at most 30% of a row. `anonymize`: `{"file": "<file id>"}`, a
    /// video uploaded with `POST /v1/files`.
    #[schema(value_type = Object, example = json!({"series": [[112, 118, 132, 129, 121, 135, 148, 148]]}))]
    pub input: Value,
    /// Kind-specific parameters. `forecast`: `{"horizon": 1..=24}`. `anonymize` (all optional):
    /// `{"targets": ["faces"], "style": "blur" | "mosaic" | "solid", "threshold": 0.01..=0.99
    /// (default 0.2), "quality": "high" | "standard" | "small", "detect_width": 160..=3840
    /// (default: the frame's width)}`.
    #[serde(default = "empty_object")]
    #[schema(value_type = Object, example = json!({"horizon": 6}))]
    pub params: Value,
    /// The most the caller agrees to pay, in micro-credits. The job is refused if the quote is
    /// higher.
    #[schema(example = 100000)]
    pub max_fee: i64,
    /// http(s) URL to tell of the job, per Standard Webhooks: at least once, retried on the
    /// specification's schedule, deduplicate on `webhook-id`. A URL registered with
    /// `POST /v1/webhooks` gets the events it chose, signed with its secret (`v1,...`); any other
    /// gets `job.completed` with the job as it ended, signed with the gateway's ed25519 key
    /// (`v1a,...`, over `{webhook-id}.{webhook-timestamp}.{body}`).
    #[serde(default)]
    pub webhook: Option<String>,
    /// When the job must be done by (RFC 3339). Still unfinished then, it is canceled as its
    /// owner would cancel it (nodes paid for shards done, whose rows stay in `output`; the rest
    /// refunded), with `error.code` `deadline_exceeded`. Within `XPAND_JOB_TIMEOUT_SECS` of now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
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
    /// Stable code: `shard_attempts_exhausted`, `input_unusable`, `reduce_failed`, `timed_out`.
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
    /// The caller's deadline, if any (see `SubmitJob::deadline`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
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
    pub deadline: Option<DateTime<Utc>>,
    pub request_hash: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Indexes of shards accepted without the check they were held for.
    pub unverified_shards: Vec<i32>,
    pub data_expired_at: Option<DateTime<Utc>>,
    /// Whom a success pays a royalty, and how much (a published model's owner).
    pub royalty_account: Option<Uuid>,
    pub royalty: i64,
}

pub(crate) const JOB_COLUMNS: &str = "id, kind, status, params, output, error, quote, \
    max_fee, escrow, gateway_fee, cost, shards_total, shards_done, webhook, deadline, \
    request_hash, created_at, updated_at, started_at, finished_at, unverified_shards, data_expired_at, \
    royalty_account, royalty";

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
            deadline: r.deadline,
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
    /// What a success pays the owner of another account's model it runs, and to whom.
    pub royalty: Option<(Uuid, i64)>,
    /// What of the input the job's row keeps, when its shards' tasks carry all the rest (so
    /// that a forecast's rows are written once, not twice); `None` keeps the whole input (a
    /// kind that reads it back, as video's join does).
    pub input_record: Option<Value>,
    pub shards: Vec<ShardPlan>,
    /// Objects stored while planning (video segments): deleted if the job is refused after all.
    pub staged: Vec<object_store::path::Path>,
    /// The caller's uploaded files the job reads until it ends (a video's original, for the
    /// join): neither their owner nor retention may delete them meanwhile.
    pub reads: Vec<uuid::Uuid>,
}

impl JobPlan {
    pub fn quote(&self) -> i64 {
        self.gateway_fee
            + self.royalty.map_or(0, |(_, amount)| amount)
            + self.shards.iter().map(|s| s.fee).sum::<i64>()
    }
}

#[derive(Debug)]
pub struct ShardPlan {
    pub row_offset: i32,
    pub row_count: i32,
    pub fee: i64,
    pub task: ShardTask,
}
