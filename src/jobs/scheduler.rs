//! The handles the state machine runs on, and nothing more: Postgres, its rules, the kinds,
//! and the domain's own interfaces to presence, the node link and the event feed. Startup
//! builds one from the adapters; a test can build one from Postgres and stand-ins.

use std::ops::Deref;
use std::sync::Arc;

use object_store::ObjectStore;
use sqlx::PgPool;
use tokio::sync::Notify;
use uuid::Uuid;
use xpand_protocol::NodeKey;

use super::event::EventSink;
use super::ports::NodeLink;
use super::results::{result_batcher, ResultBatcher};
use super::store::{submit_batcher, SubmitBatcher};
use super::{Job, JobEvent, Kinds};
use crate::config::Scheduling;
use crate::egress::EgressPolicy;
use crate::metrics::Metrics;
use crate::nodes::Presence;

/// What a [`Scheduler`] is made of.
pub struct SchedulerParts {
    pub db: PgPool,
    pub rules: Scheduling,
    pub kinds: Kinds,
    /// Which nodes are up (heartbeats).
    pub presence: Arc<dyn Presence>,
    /// Sends assignments and stops to nodes.
    pub link: Arc<dyn NodeLink>,
    /// Tells owners what their jobs do.
    pub events: Arc<dyn EventSink>,
    pub metrics: Metrics,
    /// Object storage: uploads, staged shard inputs and outputs.
    pub files: Arc<dyn ObjectStore>,
    /// Where webhook URLs may point (checked at submit).
    pub egress: EgressPolicy,
    /// Most unfinished jobs one account may have.
    pub max_unfinished_jobs: i64,
    /// Signs challenges (outvoted results) so their sealed record says who judged.
    pub gateway_key: NodeKey,
    /// The topic challenge envelopes are signed for.
    pub challenge_topic: String,
}

/// The job state machine's handles; cheap to clone into every loop.
#[derive(Clone)]
pub struct Scheduler {
    parts: Arc<SchedulerParts>,
    wakeup: Arc<Notify>,
    /// Results waiting to be settled together.
    pub(super) results: Arc<ResultBatcher>,
    /// Submissions waiting to be stored together, per account.
    pub(super) submits: Arc<SubmitBatcher>,
    /// This replica's placement turn: a dispatch round or a submit placing its job.
    pub(super) placing: Arc<tokio::sync::Mutex<()>>,
}

impl Scheduler {
    pub fn new(parts: SchedulerParts) -> Self {
        Self {
            parts: Arc::new(parts),
            wakeup: Arc::default(),
            results: Arc::new(result_batcher()),
            submits: Arc::new(submit_batcher()),
            placing: Arc::default(),
        }
    }

    /// Asks the dispatcher to look for work now rather than at its next tick.
    pub fn wake_dispatcher(&self) {
        self.wakeup.notify_one();
    }

    pub(super) async fn woken(&self) {
        self.wakeup.notified().await
    }

    /// Tells a job's owner it ended (after the settling transaction committed), counts the
    /// transition and lets the job's kind clean up after it.
    pub async fn publish_finished(&self, account: Uuid, job: Job) {
        self.metrics
            .job_transitions
            .with_label_values(&[&job.kind, job.status.as_str()])
            .inc();
        if let Some(kind) = self.kinds.get(&job.kind).cloned() {
            let (ctx, id) = (self.clone(), job.id);
            tokio::spawn(async move { kind.discard(&ctx, id).await });
        }
        if let Some(event) = JobEvent::finished(job) {
            self.events.publish(account, event).await;
        }
    }
}

impl Deref for Scheduler {
    type Target = SchedulerParts;

    fn deref(&self) -> &SchedulerParts {
        &self.parts
    }
}
