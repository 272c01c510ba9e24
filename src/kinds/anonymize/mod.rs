//! Job kind `anonymize`: a video in, the same video with every face masked out.
//!
//! Map (at submit, before the job exists): the caller's file is probed with ffprobe (refused
//! with a problem naming `input.file` when it is not a video, truncated, too long or too
//! large), priced from frames × resolution, and cut at keyframes by stream copy into segments,
//! about two per live worker slot; each segment is a shard ([`plan`]). Workers fetch a segment
//! and upload its masked re-encode through signed transfer URLs ([`crate::transfers`]), filled
//! in per assignment; the upload is checked before the result is accepted ([`check`]).
//!
//! Reduce is deferred ([`reduce`]): after the last shard the segments are joined into the
//! caller's output file. A replica claims the reduction for [`REDUCE_LEASE`]; a stale claim is
//! taken over by the sweeper, so a crash mid-reduce delays the job but never strands it.

mod check;
mod plan;
mod reduce;
pub mod schema;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use chrono::Utc;
use futures::future::BoxFuture;
use futures::StreamExt as _;
use object_store::path::Path as ObjectPath;
use serde_json::Value;
use uuid::Uuid;
use xpand_protocol::{ShardOutput, ShardTask};

use crate::error::AppError;
use crate::files;
use crate::jobs::kind::{ClaimedJob, JobKind, PlanRequest, Reduction, UploadedShard};
use crate::jobs::{JobPlan, Scheduler};
use crate::transfers::{self, Direction, TransferUrls};

pub use plan::segment_fee;

pub const KIND: &str = "anonymize";
/// The face detector anonymize shards run (see `workers/models/centerface/manifest.json`).
pub const MODEL: &str = "centerface";

/// Unit prices, in micro-credits. The gateway keeps the job fee; workers earn the rest.
pub const PRICE_PER_JOB: i64 = 2_000;
/// Per million pixels of every frame processed (a 1280×720 frame is 0.92 Mpx).
pub const PRICE_PER_MEGAPIXEL_FRAME: i64 = 20;

pub const MAX_WIDTH: u32 = 3840;
pub const MAX_HEIGHT: u32 = 2160;
pub const MIN_SIDE: u32 = 16;
/// Segments per live worker slot: more than one, so a fast worker takes more of the video and
/// progress moves in finer steps.
pub(super) const SEGMENTS_PER_SLOT: i64 = 2;
pub(super) const MAX_SEGMENTS: usize = 64;
/// A segment shorter than this costs more in process start-up than it saves.
pub(super) const MIN_SEGMENT_SECONDS: f64 = 1.0;
/// How long one replica's reduce claim holds before another may take the job over.
pub const REDUCE_LEASE: Duration = Duration::from_secs(120);

/// The `anonymize` job kind, with what it needs beyond the scheduler's handles.
pub struct Anonymize {
    /// Signs the URLs a node fetches its segment from and uploads its output to.
    pub transfers: TransferUrls,
    /// How long those URLs stay valid (a job never runs longer).
    pub url_lifetime: Duration,
    /// Where probes, checks and joins work on local copies.
    pub scratch_dir: PathBuf,
    /// The longest video accepted.
    pub max_video_seconds: u64,
}

impl JobKind for Anonymize {
    fn name(&self) -> &'static str {
        KIND
    }

    fn plan_is_costly(&self) -> bool {
        // Probing and cutting the video is work: only for an otherwise valid request.
        true
    }

    fn plan<'a>(
        &'a self,
        ctx: &'a Scheduler,
        request: PlanRequest<'a>,
    ) -> BoxFuture<'a, Result<JobPlan, AppError>> {
        Box::pin(plan::plan(self, ctx, request))
    }

    fn prepare(&self, task: &mut ShardTask, assignment: Uuid) {
        if let ShardTask::Anonymize(t) = task {
            // Usable only by this node, only while this assignment is the shard's current one.
            let expires = (Utc::now() + self.url_lifetime).timestamp_millis();
            t.input_url = self.transfers.url(Direction::Input, assignment, expires);
            t.output_url = self.transfers.url(Direction::Output, assignment, expires);
        }
    }

    fn check_output(&self, task: &ShardTask, output: &ShardOutput) -> Result<(), String> {
        match task {
            ShardTask::Anonymize(task) => check::check_output(task, output),
            _ => Err("an anonymize job must have anonymize shards".into()),
        }
    }

    fn check_upload<'a>(
        &'a self,
        ctx: &'a Scheduler,
        shard: UploadedShard<'a>,
        output: &'a ShardOutput,
    ) -> BoxFuture<'a, anyhow::Result<Result<(), String>>> {
        Box::pin(check::verify_upload(self, ctx, shard, output))
    }

    fn outputs_agree(&self, task: &ShardTask, a: &ShardOutput, b: &ShardOutput) -> bool {
        matches!(task, ShardTask::Anonymize(_)) && check::outputs_agree(a, b)
    }

    fn reduction(&self) -> Reduction {
        Reduction::Deferred {
            lease: REDUCE_LEASE,
        }
    }

    fn reduce(&self, _outputs: Vec<ShardOutput>) -> anyhow::Result<Value> {
        anyhow::bail!("anonymize jobs are joined after the last shard, not inline")
    }

    fn reduce_deferred<'a>(
        &'a self,
        ctx: &'a Scheduler,
        job: ClaimedJob,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(reduce::join(self, ctx, job))
    }

    fn reports_frames(&self) -> bool {
        true
    }

    fn discard<'a>(&'a self, ctx: &'a Scheduler, job: Uuid) -> BoxFuture<'a, ()> {
        Box::pin(discard_staging(ctx, job))
    }
}

impl Anonymize {
    /// A directory for one probe, check or join, removed when dropped.
    fn scratch_dir(&self) -> anyhow::Result<tempfile::TempDir> {
        tempfile::Builder::new()
            .prefix("video-")
            .tempdir_in(&self.scratch_dir)
            .with_context(|| {
                format!(
                    "creating a scratch directory in {}",
                    self.scratch_dir.display()
                )
            })
    }
}

/// Deletes a job's segments and uploads once it has ended.
async fn discard_staging(ctx: &Scheduler, job: Uuid) {
    let prefix = transfers::job_prefix(job);
    let paths: Vec<ObjectPath> = ctx
        .files
        .list(Some(&prefix))
        .filter_map(|meta| async move { meta.ok().map(|m| m.location) })
        .collect()
        .await;
    files::delete_all(ctx.files.as_ref(), &paths).await;
}
