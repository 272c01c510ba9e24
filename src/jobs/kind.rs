//! The seam between the state machine and what a job computes. A job kind validates and plans
//! a submission, prepares each assignment, checks a node's output, says when two runs agree,
//! streams partial results, reduces the outputs (inline, or later and outside the result
//! transaction) and cleans up after itself. The state machine calls these and names no kind;
//! each kind lives in its own folder under `crate::kinds` and is registered there once.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;
use uuid::Uuid;
use xpand_protocol::{ShardOutput, ShardTask};

use super::{JobPlan, Scheduler};
use crate::error::AppError;

/// What a submission asks of its kind's planner.
pub struct PlanRequest<'a> {
    pub account: Uuid,
    /// The id the job will have if it is accepted (staged objects are named by it).
    pub job: Uuid,
    pub input: &'a Value,
    pub params: &'a Value,
}

/// A shard whose result names an upload, as [`JobKind::check_upload`] sees it.
pub struct UploadedShard<'a> {
    pub job: Uuid,
    pub idx: i32,
    pub assignment: Uuid,
    pub task: &'a ShardTask,
}

/// A job whose deferred reduction this replica claimed.
pub struct ClaimedJob {
    pub id: Uuid,
    pub account: Uuid,
    pub input: Value,
}

/// When a kind's outputs are combined into the job's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// In the transaction that accepts the last shard ([`JobKind::reduce`]).
    Inline,
    /// After that transaction, by [`JobKind::reduce_deferred`] (it takes seconds); a replica
    /// claims it for `lease`, and a stale claim is taken over by the sweeper.
    Deferred { lease: Duration },
}

/// One job kind. Kinds are registered by name in [`Kinds`]; the name is the job's `kind`.
pub trait JobKind: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Planning reads or writes more than the request (files, probes): run it only once the
    /// rest of the request is valid, so a bad request costs nothing.
    fn plan_is_costly(&self) -> bool {
        false
    }

    /// Validates input and params, prices the job and maps it into shards, naming every bad
    /// field (`AppError::Validation`). Objects stored while planning go in `JobPlan::staged`.
    fn plan<'a>(
        &'a self,
        ctx: &'a Scheduler,
        request: PlanRequest<'a>,
    ) -> BoxFuture<'a, Result<JobPlan, AppError>>;

    /// Fills in what is particular to one assignment of `task` (signed transfer URLs, say).
    fn prepare(&self, _task: &mut ShardTask, _assignment: Uuid) {}

    /// Checks an output's shape against its task; `Err` says why it is refused.
    fn check_output(&self, task: &ShardTask, output: &ShardOutput) -> Result<(), String>;

    /// Checks what a node uploaded beside its result (for outputs that
    /// [`ShardOutput::has_upload`]), before any lock is taken. `Ok(Err(why))` refuses it.
    fn check_upload<'a>(
        &'a self,
        _ctx: &'a Scheduler,
        _shard: UploadedShard<'a>,
        _output: &'a ShardOutput,
    ) -> BoxFuture<'a, anyhow::Result<Result<(), String>>> {
        Box::pin(async { Ok(Ok(())) })
    }

    /// Whether two runs of `task` gave the same answer.
    fn outputs_agree(&self, task: &ShardTask, a: &ShardOutput, b: &ShardOutput) -> bool;

    /// The rows of an accepted shard's output to stream to the owner at once, if the kind
    /// streams partial results.
    fn partial(&self, _output: &ShardOutput) -> Option<PartialRows> {
        None
    }

    /// What a job that ends early (canceled, or failed on its input) hands back for the shards
    /// it paid for: each shard's slice in order, with `output` for those done. `None` when the
    /// kind has nothing to give from a part (the default).
    fn reduce_paid(&self, _slices: Vec<PaidSlice>) -> Option<Value> {
        None
    }

    fn reduction(&self) -> Reduction {
        Reduction::Inline
    }

    /// The job's output from its shards' outputs in shard order ([`Reduction::Inline`]).
    fn reduce(&self, outputs: Vec<ShardOutput>) -> anyhow::Result<Value>;

    /// Combines a claimed job's outputs and settles it ([`Reduction::Deferred`]). An error
    /// fails the job with a full refund.
    fn reduce_deferred<'a>(
        &'a self,
        _ctx: &'a Scheduler,
        job: ClaimedJob,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        let kind = self.name();
        Box::pin(async move { anyhow::bail!("{kind} job {} has no deferred reduction", job.id) })
    }

    /// Whether the job's progress counts frames (`frames_done`, `frames_total`), one per row of
    /// its shards.
    fn reports_frames(&self) -> bool {
        false
    }

    /// Lets go of what the job kept while it ran, once it has ended.
    fn discard<'a>(&'a self, _ctx: &'a Scheduler, _job: Uuid) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// The registered kinds, in registration order (a handful: a scan beats a map).
#[derive(Clone, Default)]
pub struct Kinds(Vec<Arc<dyn JobKind>>);

impl Kinds {
    pub fn with(mut self, kind: impl JobKind) -> Self {
        self.0.push(Arc::new(kind));
        self
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn JobKind>> {
        self.0.iter().find(|k| k.name() == name)
    }

    /// The kind of a stored job; a name no kind answers to is a bug (or a gateway too old).
    pub fn of(&self, name: &str) -> anyhow::Result<&Arc<dyn JobKind>> {
        self.get(name)
            .ok_or_else(|| anyhow::anyhow!("no job kind {name:?} is registered"))
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.0.iter().map(|k| k.name())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn JobKind>> {
        self.0.iter()
    }
}

/// One accepted shard's slice of a job's output, streamed before the job ends.
#[derive(Debug, Clone, PartialEq)]
pub struct PartialRows {
    pub rows: Value,
    /// Bounds of the slice's rows, where the kind gives them (forecast intervals).
    pub intervals: Option<Value>,
    /// The slice as named tensors, where the kind's output is tensors (predict).
    pub outputs: Option<Value>,
}

/// One shard's place in a job that ended early, and its output if it was done (and paid).
#[derive(Debug, Clone, PartialEq)]
pub struct PaidSlice {
    pub row_offset: i32,
    pub row_count: i32,
    pub output: Option<ShardOutput>,
}
