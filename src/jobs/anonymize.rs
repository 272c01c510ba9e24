//! Job kind `anonymize`: a video in, the same video with every face masked out.
//!
//! Map (at submit, before the job exists): the caller's file is probed with ffprobe (refused
//! with a problem naming `input.file` when it is not a video, truncated, too long or too
//! large), priced from frames × resolution, and cut at keyframes by stream copy into segments,
//! about two per live worker slot; each segment is a shard. Workers fetch a segment and upload
//! its masked re-encode through signed transfer URLs ([`crate::transfers`]).
//!
//! Reduce (after the last shard, outside the result transaction because it takes seconds): the
//! masked segments are joined in order by stream copy, the original audio is muxed back, and the
//! result is stored as a new file of the caller, in the same transaction that settles the job.
//! A replica claims the reduce in `jobs.reduce_claimed_at`; a stale claim is taken over by the
//! sweeper, so a crash mid-reduce delays the job but never strands it.

use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use object_store::path::Path as ObjectPath;
use serde_json::{json, Value};
use uuid::Uuid;
use xpand_protocol::{AnonymizeTask, MaskStyle, ShardOutput, ShardTask};

use super::orchestrator::{self, Outcome};
use super::{JobPlan, ShardPlan};
use crate::error::{AppError, FieldError};
use crate::files;
use crate::media::{self, ProbeError, VideoProbe};
use crate::state::AppState;

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
const SEGMENTS_PER_SLOT: i64 = 2;
const MAX_SEGMENTS: usize = 64;
/// A segment shorter than this costs more in process start-up than it saves.
const MIN_SEGMENT_SECONDS: f64 = 1.0;
/// How long one replica's reduce claim holds before another may take the job over.
pub const REDUCE_LEASE: Duration = Duration::from_secs(120);

/// Masking parameters, validated.
#[derive(Debug, Clone, PartialEq)]
struct Params {
    style: MaskStyle,
    threshold: f32,
    crf: u8,
}

/// The x264 CRF of each `quality`.
const QUALITIES: [(&str, u8); 3] = [("high", 18), ("standard", 23), ("small", 28)];

fn parse_params(params: &Value, errors: &mut Vec<FieldError>) -> Option<Params> {
    let mut parsed = Params {
        style: MaskStyle::Blur,
        threshold: 0.2,
        crf: 23,
    };
    let obj = params.as_object()?;
    let before = errors.len();
    for (key, value) in obj {
        let field = format!("params.{key}");
        match key.as_str() {
            "targets" => {
                let targets: Option<Vec<&str>> = value
                    .as_array()
                    .and_then(|a| a.iter().map(Value::as_str).collect());
                match targets.as_deref() {
                    Some(["faces"]) => {}
                    Some(t) if t.iter().any(|t| matches!(*t, "persons" | "plates")) => errors
                        .push(FieldError::new(
                            field,
                            "only [\"faces\"] is supported for now (persons and plates are planned)",
                        )),
                    _ => errors.push(FieldError::new(field, "must be [\"faces\"]")),
                }
            }
            "style" => match value.as_str() {
                Some("blur") => parsed.style = MaskStyle::Blur,
                Some("mosaic") => parsed.style = MaskStyle::Mosaic,
                Some("solid") => parsed.style = MaskStyle::Solid,
                _ => errors.push(FieldError::new(
                    field,
                    "must be \"blur\", \"mosaic\" or \"solid\"",
                )),
            },
            "threshold" => match value.as_f64() {
                Some(t) if (0.01..=0.99).contains(&t) => parsed.threshold = t as f32,
                _ => errors.push(FieldError::new(field, "must be a number from 0.01 to 0.99")),
            },
            "quality" => {
                match QUALITIES
                    .iter()
                    .find(|(name, _)| Some(*name) == value.as_str())
                {
                    Some((_, crf)) => parsed.crf = *crf,
                    None => errors.push(FieldError::new(
                        field,
                        "must be \"high\", \"standard\" or \"small\"",
                    )),
                }
            }
            _ => errors.push(FieldError::new(field, "is not an anonymize parameter")),
        }
    }
    (errors.len() == before).then_some(parsed)
}

fn parse_input(input: &Value, errors: &mut Vec<FieldError>) -> Option<Uuid> {
    if let Some(obj) = input.as_object() {
        for key in obj.keys().filter(|k| *k != "file") {
            errors.push(FieldError::new(
                format!("input.{key}"),
                "is not an anonymize input",
            ));
        }
    }
    match input.get("file").map(|f| f.as_str().map(Uuid::parse_str)) {
        None => errors.push(FieldError::new(
            "input.file",
            "is required: the id of an uploaded video (POST /v1/files)",
        )),
        Some(Some(Ok(id))) => return Some(id),
        Some(_) => errors.push(FieldError::new("input.file", "must be a file id (a UUID)")),
    }
    None
}

/// Where segment `idx` of `job` is kept while the job runs.
pub fn segment_path(job: Uuid, idx: i32) -> ObjectPath {
    ObjectPath::from(format!("jobs/{job}/segments/{idx:05}.mkv"))
}

/// Where the output of one attempt at segment `idx` is uploaded. Named by attempt, so a late
/// upload from a node that lost the shard cannot overwrite the accepted one.
pub fn output_path(job: Uuid, idx: i32, assignment: Uuid) -> ObjectPath {
    ObjectPath::from(format!("jobs/{job}/outputs/{idx:05}-{assignment}.mp4"))
}

fn job_prefix(job: Uuid) -> ObjectPath {
    ObjectPath::from(format!("jobs/{job}"))
}

/// Validates, probes, prices and splits the caller's video into segment shards for job `job`.
/// Segments are stored before the job exists; they are listed in the plan's `staged` objects,
/// which the caller deletes when the job is refused after all.
pub async fn plan(
    state: &AppState,
    account: Uuid,
    job: Uuid,
    input: &Value,
    params: &Value,
) -> Result<JobPlan, AppError> {
    let mut errors = Vec::new();
    let params = parse_params(params, &mut errors);
    let file = parse_input(input, &mut errors);
    let (Some(params), Some(file)) = (params, file) else {
        return Err(AppError::Validation(errors));
    };
    if !errors.is_empty() {
        return Err(AppError::Validation(errors));
    }
    match files::get(&state.db, account, file).await {
        Ok(_) => {}
        Err(AppError::NotFound(_)) => {
            return Err(AppError::field(
                "input.file",
                "no such file (upload it with POST /v1/files first)",
            ))
        }
        Err(e) => return Err(e),
    }

    let scratch = scratch_dir(state)?;
    let original = scratch.path().join("original");
    files::fetch_to_file(&state.files, &files::object_path(file), &original).await?;
    let probe = match media::probe(&original).await {
        Ok(probe) => probe,
        Err(ProbeError::Unusable(why)) => return Err(AppError::field("input.file", why)),
        Err(ProbeError::Internal(e)) => return Err(AppError::Internal(e)),
    };
    check_limits(&probe, state.config.max_video_seconds)?;

    let slots = crate::nodes::live_capacity(&state.db, &state.liveness, MODEL).await?;
    let wanted = (slots * SEGMENTS_PER_SLOT).clamp(1, MAX_SEGMENTS as i64) as usize;
    let cuts = choose_cuts(&probe, wanted);
    let dir = scratch.path().join("segments");
    std::fs::create_dir_all(&dir).context("creating the segments directory")?;
    let segments = media::split(&original, &cuts, &dir)
        .await
        .map_err(|e| AppError::field("input.file", format!("the video cannot be cut: {e:#}")))?;
    if segments.len() != cuts.len() + 1 {
        return Err(AppError::field(
            "input.file",
            format!(
                "the video cut into {} segments where {} were planned (is it damaged?)",
                segments.len(),
                cuts.len() + 1
            ),
        ));
    }

    let mut shards = Vec::with_capacity(segments.len());
    let mut staged = Vec::with_capacity(segments.len());
    let mut offset = 0u32;
    let result = async {
        for (idx, segment) in segments.iter().enumerate() {
            let (frames, ..) = media::count_frames(segment).await?;
            let path = segment_path(job, idx as i32);
            files::store_local_file(&state.files, &path, segment).await?;
            staged.push(path);
            shards.push(ShardPlan {
                row_offset: offset as i32,
                row_count: frames as i32,
                fee: segment_fee(frames, probe.width, probe.height),
                task: ShardTask::Anonymize(AnonymizeTask {
                    // Filled in per assignment by the dispatcher.
                    input_url: String::new(),
                    output_url: String::new(),
                    frames,
                    width: probe.width,
                    height: probe.height,
                    fps_num: probe.fps_num,
                    fps_den: probe.fps_den,
                    style: params.style,
                    threshold: params.threshold,
                    crf: params.crf,
                }),
            });
            offset += frames;
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        delete_all(state, &staged).await;
        return Err(AppError::Internal(e.context("storing the segments")));
    }
    if offset != probe.frames {
        delete_all(state, &staged).await;
        return Err(AppError::field(
            "input.file",
            format!(
                "the segments hold {offset} frames where the video has {} (is it damaged?)",
                probe.frames
            ),
        ));
    }
    Ok(JobPlan {
        model: MODEL.into(),
        gateway_fee: PRICE_PER_JOB,
        shards,
        staged,
    })
}

fn scratch_dir(state: &AppState) -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("video-")
        .tempdir_in(&state.config.scratch_dir)
        .with_context(|| {
            format!(
                "creating a scratch directory in {}",
                state.config.scratch_dir.display()
            )
        })
}

fn check_limits(probe: &VideoProbe, max_seconds: u64) -> Result<(), AppError> {
    let mut errors = Vec::new();
    if probe.duration_seconds > max_seconds as f64 {
        errors.push(FieldError::new(
            "input.file",
            format!(
                "the video lasts {:.1} s; at most {max_seconds} s are accepted",
                probe.duration_seconds
            ),
        ));
    }
    if probe.width > MAX_WIDTH || probe.height > MAX_HEIGHT {
        errors.push(FieldError::new(
            "input.file",
            format!(
                "the video is {}x{}; at most {MAX_WIDTH}x{MAX_HEIGHT} is accepted",
                probe.width, probe.height
            ),
        ));
    }
    if probe.width < MIN_SIDE || probe.height < MIN_SIDE {
        errors.push(FieldError::new(
            "input.file",
            format!(
                "the video is {}x{}; each side needs at least {MIN_SIDE} pixels",
                probe.width, probe.height
            ),
        ));
    }
    if probe.width % 2 == 1 || probe.height % 2 == 1 {
        // H.264 in 4:2:0, what browsers play, needs even sides.
        errors.push(FieldError::new(
            "input.file",
            format!(
                "the video is {}x{}; odd frame sizes are not supported",
                probe.width, probe.height
            ),
        ));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(AppError::Validation(errors))
    }
}

/// What workers earn for a segment: frames × megapixels × the unit price, rounded up.
pub fn segment_fee(frames: u32, width: u32, height: u32) -> i64 {
    let pixel_frames = i128::from(frames) * i128::from(width) * i128::from(height);
    let micro = (pixel_frames * i128::from(PRICE_PER_MEGAPIXEL_FRAME) + 999_999) / 1_000_000;
    i64::try_from(micro).unwrap_or(i64::MAX)
}

/// Frame indices to cut before: keyframes nearest to `wanted` equal parts, each segment at
/// least [`MIN_SEGMENT_SECONDS`] long where the video allows, strictly increasing.
fn choose_cuts(probe: &VideoProbe, wanted: usize) -> Vec<u32> {
    let fps = f64::from(probe.fps_num) / f64::from(probe.fps_den);
    let min_frames = ((MIN_SEGMENT_SECONDS * fps).ceil() as u32).max(1);
    let by_length = (probe.frames / min_frames).max(1) as usize;
    let parts = wanted.min(by_length).max(1);
    let mut cuts: Vec<u32> = Vec::with_capacity(parts - 1);
    for i in 1..parts {
        let target = (u64::from(probe.frames) * i as u64 / parts as u64) as u32;
        let last = cuts.last().copied().unwrap_or(0);
        let nearest = probe
            .keyframes
            .iter()
            .copied()
            .filter(|&k| k >= last + min_frames && k + min_frames <= probe.frames)
            .min_by_key(|&k| k.abs_diff(target));
        if let Some(k) = nearest {
            if cuts.last() != Some(&k) {
                cuts.push(k);
            }
        }
    }
    cuts
}

/// Checks a worker's claims about a segment before its upload is even looked at.
pub fn check_output(task: &AnonymizeTask, output: &ShardOutput) -> Result<(), String> {
    let ShardOutput::Anonymize {
        detections,
        video_sha256,
        video_bytes,
    } = output
    else {
        return Err("an anonymize shard must return an anonymize output".into());
    };
    if detections.len() != task.frames as usize {
        return Err(format!(
            "detections for {} frames returned for {} frames sent",
            detections.len(),
            task.frames
        ));
    }
    let (w, h) = (task.width as i32, task.height as i32);
    for (frame, boxes) in detections.iter().enumerate() {
        for d in boxes {
            if !(d.x1 < d.x2 && d.y1 < d.y2 && d.x2 > 0 && d.y2 > 0 && d.x1 < w && d.y1 < h) {
                return Err(format!("frame {frame} has a box outside the frame: {d:?}"));
            }
        }
    }
    if video_sha256.len() != 64 || !video_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("video_sha256 is not a sha256".into());
    }
    if *video_bytes == 0 {
        return Err("the output video is empty".into());
    }
    Ok(())
}

/// Checks what a worker uploaded for a segment against its result: the bytes hash to what it
/// signed, and the file is an H.264 video of the segment's size with exactly its frame count.
/// `Err` is a refusal (the node lied or failed); an internal error is `Ok(Err)`-free: it
/// propagates as `anyhow`.
pub async fn verify_upload(
    state: &AppState,
    job: Uuid,
    idx: i32,
    assignment: Uuid,
    task: &AnonymizeTask,
    output: &ShardOutput,
) -> anyhow::Result<Result<(), String>> {
    let ShardOutput::Anonymize {
        video_sha256,
        video_bytes,
        ..
    } = output
    else {
        return Ok(Err("not an anonymize output".into()));
    };
    let scratch = scratch_dir(state)?;
    let local = scratch.path().join("output.mp4");
    let stored = match files::fetch_to_file(
        &state.files,
        &output_path(job, idx, assignment),
        &local,
    )
    .await
    {
        Ok(stored) => stored,
        Err(_) => return Ok(Err("no output was uploaded for this assignment".into())),
    };
    if &stored.sha256 != video_sha256 || stored.size != *video_bytes {
        return Ok(Err(format!(
            "the upload ({} bytes, sha256 {}) is not the video the result names",
            stored.size, stored.sha256
        )));
    }
    match media::count_frames(&local).await {
        Ok((frames, w, h, codec))
            if frames == task.frames && w == task.width && h == task.height && codec == "h264" =>
        {
            Ok(Ok(()))
        }
        Ok((frames, w, h, codec)) => Ok(Err(format!(
            "the upload is {codec} {w}x{h} with {frames} frames; expected h264 {}x{} with {}",
            task.width, task.height, task.frames
        ))),
        Err(e) => Ok(Err(format!("the upload is not a readable video: {e:#}"))),
    }
}

#[derive(sqlx::FromRow)]
struct DoneSegment {
    idx: i32,
    assignment_id: Uuid,
    row_count: i32,
    output: sqlx::types::Json<ShardOutput>,
}

/// Joins a job's masked segments into the caller's output file and settles the job, unless
/// another replica holds a fresh claim on it or it is not ready. A failure to join fails the
/// job with a full refund.
pub async fn reduce(state: AppState, job_id: Uuid) {
    match try_reduce(&state, job_id).await {
        Ok(()) => {}
        Err(e) => {
            tracing::warn!(job = %job_id, error = format!("{e:#}"), "joining the video failed");
            let failed = orchestrator::fail(
                &state,
                job_id,
                "reduce_failed",
                "the masked segments could not be joined into a video",
            )
            .await;
            if let Err(e) = failed {
                // The claim lapses and the sweeper tries again.
                tracing::warn!(job = %job_id, error = ?e, "failing the job failed");
            }
        }
    }
}

async fn try_reduce(state: &AppState, job_id: Uuid) -> anyhow::Result<()> {
    let claimed: Option<(Uuid, Value)> = sqlx::query_as(
        "UPDATE jobs SET reduce_claimed_at = now()
         WHERE id = $1 AND kind = $2 AND status = 'running' AND shards_done = shards_total
           AND (reduce_claimed_at IS NULL OR reduce_claimed_at < now() - $3 * interval '1 second')
         RETURNING account_id, input",
    )
    .bind(job_id)
    .bind(KIND)
    .bind(REDUCE_LEASE.as_secs_f64())
    .fetch_optional(&state.db)
    .await?;
    let Some((account, input)) = claimed else {
        return Ok(());
    };
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
    .fetch_all(&state.db)
    .await?;

    let scratch = scratch_dir(state)?;
    let original = scratch.path().join("original");
    files::fetch_to_file(&state.files, &files::object_path(file), &original).await?;
    let probe = media::probe(&original)
        .await
        .map_err(|e| anyhow::anyhow!("probing the original again: {e}"))?;
    let mut local = Vec::with_capacity(segments.len());
    for s in &segments {
        let path = scratch.path().join(format!("masked-{:05}.mp4", s.idx));
        files::fetch_to_file(
            &state.files,
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
            ShardOutput::Forecast { .. } => 0,
        })
        .sum();

    let output_id = Uuid::now_v7();
    let path = files::object_path(output_id);
    let stored = files::store_local_file(&state.files, &path, &joined).await?;
    let settled = settle(
        state,
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
        let _ = state.files.delete(&path).await;
    }
    settled.map(|_| ())
}

/// Records the output file and settles the job in one transaction. `false` when the job had
/// already ended (canceled or timed out while joining).
async fn settle(
    state: &AppState,
    job_id: Uuid,
    account: Uuid,
    output_id: Uuid,
    stored: &files::Stored,
    output: Value,
) -> anyhow::Result<bool> {
    let mut tx = state.db.begin().await?;
    files::insert(&mut *tx, output_id, account, stored, "video/mp4").await?;
    let Some(job) = orchestrator::finish(&mut tx, job_id, Outcome::Succeeded(output)).await? else {
        return Ok(false);
    };
    tx.commit().await?;
    orchestrator::publish_finished(state, account, job).await;
    Ok(true)
}

/// Deletes a job's segments and uploads once it has ended.
pub async fn discard_staging(state: &AppState, job: Uuid) {
    let prefix = job_prefix(job);
    let paths: Vec<ObjectPath> = state
        .files
        .list(Some(&prefix))
        .filter_map(|meta| async move { meta.ok().map(|m| m.location) })
        .collect()
        .await;
    delete_all(state, &paths).await;
}

pub async fn delete_all(state: &AppState, paths: &[ObjectPath]) {
    for path in paths {
        if let Err(e) = state.files.delete(path).await {
            tracing::warn!(%path, error = %e, "could not delete a staged object");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(frames: u32, keyframes: Vec<u32>) -> VideoProbe {
        VideoProbe {
            container: "mov".into(),
            codec: "h264".into(),
            width: 1280,
            height: 720,
            fps_num: 25,
            fps_den: 1,
            frames,
            keyframes,
            duration_seconds: f64::from(frames) / 25.0,
            audio_codec: None,
        }
    }

    #[test]
    fn cuts_land_on_keyframes_near_equal_parts() {
        let p = probe(250, (0..250).step_by(25).collect());
        assert_eq!(choose_cuts(&p, 1), Vec::<u32>::new());
        assert_eq!(choose_cuts(&p, 2), vec![125]);
        assert_eq!(choose_cuts(&p, 4), vec![50, 125, 175]);
        // At most one segment per second of video.
        assert_eq!(choose_cuts(&p, 64).len(), 9);
    }

    #[test]
    fn cuts_respect_sparse_keyframes_and_short_videos() {
        assert_eq!(choose_cuts(&probe(250, vec![0]), 8), Vec::<u32>::new());
        assert_eq!(choose_cuts(&probe(250, vec![0, 240]), 2), Vec::<u32>::new());
        assert_eq!(choose_cuts(&probe(250, vec![0, 100]), 2), vec![100]);
        assert_eq!(choose_cuts(&probe(20, vec![0, 10]), 4), Vec::<u32>::new());
        let cuts = choose_cuts(&probe(1000, vec![0, 400, 410, 420, 430]), 8);
        assert!(cuts.windows(2).all(|w| w[1] >= w[0] + 25), "{cuts:?}");
    }

    #[test]
    fn fees_scale_with_frames_and_pixels() {
        assert_eq!(segment_fee(100, 1000, 1000), 2_000);
        assert_eq!(segment_fee(1, 1, 1), 1);
        assert_eq!(segment_fee(250, 1280, 720), 4_608);
        assert_eq!(segment_fee(250, 640, 360), 1_152);
    }

    #[test]
    fn params_default_and_name_every_bad_field() {
        let mut errors = Vec::new();
        let p = parse_params(&json!({}), &mut errors).unwrap();
        assert_eq!(
            p,
            Params {
                style: MaskStyle::Blur,
                threshold: 0.2,
                crf: 23
            }
        );
        let p = parse_params(
            &json!({"style": "mosaic", "threshold": 0.5, "quality": "high", "targets": ["faces"]}),
            &mut errors,
        )
        .unwrap();
        assert_eq!((p.style, p.crf), (MaskStyle::Mosaic, 18));
        assert!(errors.is_empty());
        let bad = parse_params(
            &json!({"style": "pixelate", "threshold": 2, "quality": 5, "targets": ["plates"], "x": 1}),
            &mut errors,
        );
        assert!(bad.is_none());
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "params.quality",
                "params.style",
                "params.targets",
                "params.threshold",
                "params.x"
            ]
        );
    }
}
