//! Reducing an `anonymize` job, after its last segment and outside the result transaction
//! (it takes seconds): the masked segments joined in order by stream copy, the original audio
//! muxed back, the result stored as a new file of the caller in the transaction that settles
//! the job.

use anyhow::Context as _;
use serde_json::{json, Value};
use uuid::Uuid;
use xpand_protocol::ShardOutput;

use super::Anonymize;
use crate::files;
use crate::jobs::kind::ClaimedJob;
use crate::jobs::settlement::{self, Outcome};
use crate::jobs::Scheduler;
use crate::transfers::output_path;
use xpand_media as media;

#[derive(sqlx::FromRow)]
struct DoneSegment {
    idx: i32,
    assignment_id: Uuid,
    row_count: i32,
    output: sqlx::types::Json<ShardOutput>,
}

/// Joins a claimed job's masked segments into the caller's output file and settles the job.
pub(super) async fn join(kind: &Anonymize, ctx: &Scheduler, job: ClaimedJob) -> anyhow::Result<()> {
    let ClaimedJob {
        id: job_id,
        account,
        input,
    } = job;
    let file: Uuid = input
        .get("file")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .context("the job's input names no file")?;
    // Each segment's accepted upload: the run (the primary or, after a vote, a replica) whose
    // node and output the segment settled on.
    let segments: Vec<DoneSegment> = sqlx::query_as(
        "SELECT s.idx, r.assignment_id, s.row_count, s.output FROM shards s
         JOIN LATERAL (SELECT assignment_id FROM shards r
                       WHERE (r.id = s.id OR r.replica_of = s.id) AND r.node_id = s.node_id
                         AND r.output_sha256 = s.output_sha256
                         -- A primary a speculative copy superseded has no assignment left.
                         AND r.assignment_id IS NOT NULL
                       ORDER BY r.replica_of NULLS FIRST LIMIT 1) r ON true
         WHERE s.job_id = $1 AND s.status = 'done' AND s.replica_of IS NULL ORDER BY s.idx",
    )
    .bind(job_id)
    .fetch_all(&ctx.db)
    .await?;

    let scratch = kind.scratch_dir()?;
    let original = scratch.path().join("original");
    files::fetch_to_file(&ctx.files, &files::object_path(file), &original).await?;
    let probe = media::probe(&original)
        .await
        .map_err(|e| anyhow::anyhow!("probing the original again: {e}"))?;
    let mut local = Vec::with_capacity(segments.len());
    for s in &segments {
        let path = scratch.path().join(format!("masked-{:05}.mp4", s.idx));
        files::fetch_to_file(
            &ctx.files,
            &output_path(job_id, s.idx, s.assignment_id),
            &path,
        )
        .await?;
        local.push(path);
    }
    let joined = scratch.path().join("anonymized.mp4");
    media::concat_with_audio(&local, &original, probe.audio_codec.as_deref(), &joined).await?;
    let (frames, width, height, _) = media::count_frames(&joined).await?;
    let expected: i64 = segments.iter().map(|s| i64::from(s.row_count)).sum();
    anyhow::ensure!(
        i64::from(frames) == expected,
        "the joined video has {frames} frames, expected {expected}"
    );
    let faces: usize = segments
        .iter()
        .map(|s| match &s.output.0 {
            ShardOutput::Anonymize { detections, .. } => detections.iter().map(Vec::len).sum(),
            _ => 0,
        })
        .sum();

    let output_id = Uuid::now_v7();
    let path = files::object_path(output_id);
    let stored = files::store_local_file(&ctx.files, &path, &joined).await?;
    let settled = settle(
        ctx,
        job_id,
        account,
        output_id,
        &stored,
        json!({
            "file": output_id,
            "size": stored.size,
            "sha256": stored.sha256,
            "frames": frames,
            "width": width,
            "height": height,
            "duration_seconds": probe.duration_seconds,
            "segments": segments.len(),
            "faces_masked": faces,
            "audio": probe.audio_codec.is_some(),
        }),
    )
    .await;
    if !matches!(settled, Ok(true)) {
        // Not ours to deliver (the job ended meanwhile) or not recorded: leave nothing behind.
        let _ = ctx.files.delete(&path).await;
    }
    settled.map(|_| ())
}

/// Records the output file and settles the job in one transaction. `false` when the job had
/// already ended (canceled or timed out while joining).
async fn settle(
    ctx: &Scheduler,
    job_id: Uuid,
    account: Uuid,
    output_id: Uuid,
    stored: &files::Stored,
    output: Value,
) -> anyhow::Result<bool> {
    let mut tx = ctx.db.begin().await?;
    files::insert(&mut *tx, output_id, account, stored, "video/mp4").await?;
    let Some(job) = settlement::finish(&mut tx, job_id, Outcome::Succeeded(output)).await? else {
        return Ok(false);
    };
    tx.commit().await?;
    ctx.publish_finished(account, job).await;
    Ok(true)
}
