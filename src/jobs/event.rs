//! What the state machine tells a job's owner as it runs, and the interface it tells them
//! through. Delivery (Redis pub/sub to every replica's streams) is an adapter's business.

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::Job;

/// A server → client event about one job (SSE `data`, and WebSocket frames).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JobEvent {
    /// Shards finished so far.
    Progress {
        job_id: Uuid,
        status: super::JobStatus,
        shards_done: i32,
        shards_total: i32,
    },
    /// One shard's slice of the output as soon as it is verified: `rows` start at row `offset`.
    Partial {
        job_id: Uuid,
        shard: i32,
        offset: i32,
        #[schema(value_type = Vec<Vec<f64>>)]
        rows: serde_json::Value,
        /// The rows' intervals, one per level the job asked for, where its kind gives them:
        /// `lower` and `upper` have the rows' shape.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(value_type = Option<Vec<IntervalRows>>)]
        intervals: Option<serde_json::Value>,
        /// A predict job's slice as the Open Inference Protocol's tensors (`name`, `datatype`,
        /// `shape`, `data`); `rows` then holds each row's values across them, in order.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(value_type = Option<Vec<Object>>)]
        outputs: Option<serde_json::Value>,
    },
    Succeeded {
        job: Box<Job>,
    },
    Failed {
        job: Box<Job>,
    },
    Canceled {
        job: Box<Job>,
    },
}

/// One level's bounds around a slice of rows (the schema of `intervals`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct IntervalRows {
    /// Percent.
    pub level: f64,
    pub lower: Vec<Vec<f64>>,
    pub upper: Vec<Vec<f64>>,
}

impl JobEvent {
    pub fn job_id(&self) -> Uuid {
        match self {
            JobEvent::Progress { job_id, .. } | JobEvent::Partial { job_id, .. } => *job_id,
            JobEvent::Succeeded { job } | JobEvent::Failed { job } | JobEvent::Canceled { job } => {
                job.id
            }
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobEvent::Succeeded { .. } | JobEvent::Failed { .. } | JobEvent::Canceled { .. }
        )
    }

    /// The job a terminal event carries, as it ended.
    pub fn finished_job(&self) -> Option<&Job> {
        match self {
            JobEvent::Succeeded { job } | JobEvent::Failed { job } | JobEvent::Canceled { job } => {
                Some(job)
            }
            JobEvent::Progress { .. } | JobEvent::Partial { .. } => None,
        }
    }

    /// The terminal event for a finished job.
    pub fn finished(job: Job) -> Option<Self> {
        use super::JobStatus::*;
        let job = Box::new(job);
        match job.status {
            Succeeded => Some(JobEvent::Succeeded { job }),
            Failed => Some(JobEvent::Failed { job }),
            Canceled => Some(JobEvent::Canceled { job }),
            Queued | Running => None,
        }
    }
}

/// Where job events go. Best effort by contract: events are a live feed, and a lost one is
/// recovered by reading the job, so publishing never fails the state change behind it.
pub trait EventSink: Send + Sync {
    fn publish(&self, account: Uuid, event: JobEvent) -> BoxFuture<'_, ()>;

    /// Publishes each event to its owner, in order (a sink may send them in one round trip).
    fn publish_all(&self, events: Vec<(Uuid, JobEvent)>) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            for (account, event) in events {
                self.publish(account, event).await;
            }
        })
    }
}
