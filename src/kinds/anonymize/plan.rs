//! Planning an `anonymize` job: parameters and input validated, the video probed, checked
//! against the limits, priced from frames × pixels and cut at keyframes into segment shards.

use anyhow::Context as _;
use serde_json::Value;
use uuid::Uuid;
use xpand_protocol::{AnonymizeTask, MaskStyle, ShardTask};

use super::{Anonymize, MODEL, PRICE_PER_MEGAPIXEL_FRAME};
use super::{
    MAX_HEIGHT, MAX_SEGMENTS, MAX_WIDTH, MIN_SEGMENT_SECONDS, MIN_SIDE, SEGMENTS_PER_SLOT,
};
use crate::error::{AppError, FieldError};
use crate::files;
use crate::jobs::kind::PlanRequest;
use crate::jobs::{JobPlan, Scheduler, ShardPlan};
use crate::nodes;
use crate::transfers::input_path;
use xpand_media::{self as media, ProbeError, VideoProbe};

/// Masking parameters, validated.
#[derive(Debug, Clone, PartialEq)]
struct Params {
    style: MaskStyle,
    threshold: f32,
    /// The width the detector sees; `None`, full resolution.
    detect_width: Option<u32>,
    crf: u8,
}

/// The narrowest detector input a caller may ask for: below it, only faces filling much of
/// the frame are found.
pub(super) const MIN_DETECT_WIDTH: u64 = 160;

/// The x264 CRF of each `quality`.
pub(super) const QUALITIES: [(&str, u8); 3] = [("high", 18), ("standard", 23), ("small", 28)];

fn parse_params(params: &Value, errors: &mut Vec<FieldError>) -> Option<Params> {
    let mut parsed = Params {
        style: MaskStyle::Blur,
        threshold: 0.2,
        detect_width: None,
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
            "detect_width" => match value.as_u64() {
                Some(w) if (MIN_DETECT_WIDTH..=u64::from(MAX_WIDTH)).contains(&w) => {
                    parsed.detect_width = Some(w as u32)
                }
                _ => errors.push(FieldError::new(
                    field,
                    format!(
                        "must be a whole number of pixels from {MIN_DETECT_WIDTH} to {MAX_WIDTH}"
                    ),
                )),
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

/// Validates, probes, prices and splits the caller's video into segment shards for job `job`.
/// Segments are stored before the job exists; they are listed in the plan's `staged` objects,
/// which the caller deletes when the job is refused after all.
pub(super) async fn plan(
    kind: &Anonymize,
    ctx: &Scheduler,
    request: PlanRequest<'_>,
) -> Result<JobPlan, AppError> {
    let PlanRequest {
        account,
        job,
        input,
        params,
    } = request;
    let mut errors = Vec::new();
    let params = parse_params(params, &mut errors);
    let file = parse_input(input, &mut errors);
    let (Some(params), Some(file)) = (params, file) else {
        return Err(AppError::Validation(errors));
    };
    if !errors.is_empty() {
        return Err(AppError::Validation(errors));
    }
    match files::get(&ctx.db, account, file).await {
        Ok(_) => {}
        Err(AppError::NotFound(_)) => {
            return Err(AppError::field(
                "input.file",
                "no such file (upload it with POST /v1/files first)",
            ))
        }
        Err(e) => return Err(e),
    }

    let scratch = kind.scratch_dir()?;
    let original = scratch.path().join("original");
    files::fetch_to_file(&ctx.files, &files::object_path(file), &original).await?;
    let probe = match media::probe(&original).await {
        Ok(probe) => probe,
        Err(ProbeError::Unusable(why)) => return Err(AppError::field("input.file", why)),
        Err(ProbeError::Internal(e)) => return Err(AppError::Internal(e)),
    };
    check_limits(&probe, kind.max_video_seconds)?;

    let slots = nodes::live_capacity(&ctx.db, ctx.presence.as_ref(), MODEL).await?;
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

    // Segment i holds the packets from cut i - 1 up to cut i: the split copies packets and cuts
    // only at the keyframes named, so its frames are known without reading it again. A segment
    // that decodes to any other count is refused by the worker that runs it.
    let bounds: Vec<u32> = std::iter::once(0)
        .chain(cuts.iter().copied())
        .chain(std::iter::once(probe.frames))
        .collect();
    let mut shards = Vec::with_capacity(segments.len());
    let mut staged = Vec::with_capacity(segments.len());
    let result = async {
        for (idx, (segment, span)) in segments.iter().zip(bounds.windows(2)).enumerate() {
            let (offset, frames) = (span[0], span[1] - span[0]);
            let path = input_path(job, idx as i32);
            files::store_local_file(&ctx.files, &path, segment).await?;
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
                    // Asking for the frame's own width or more is full resolution.
                    detect_width: params.detect_width.filter(|w| *w < probe.width),
                    crf: params.crf,
                }),
            });
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        files::delete_all(ctx.files.as_ref(), &staged).await;
        return Err(AppError::Internal(e.context("storing the segments")));
    }
    Ok(JobPlan {
        model: MODEL.into(),
        gateway_fee: super::PRICE_PER_JOB,
        royalty: None,
        input_record: None,
        shards,
        staged,
        reads: vec![file],
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

#[cfg(test)]
mod tests {
    use serde_json::json;

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
                detect_width: None,
                crf: 23
            }
        );
        let p = parse_params(
            &json!({"style": "mosaic", "threshold": 0.5, "quality": "high", "targets": ["faces"],
                    "detect_width": 640}),
            &mut errors,
        )
        .unwrap();
        assert_eq!(
            (p.style, p.crf, p.detect_width),
            (MaskStyle::Mosaic, 18, Some(640))
        );
        assert!(errors.is_empty());
        let bad = parse_params(
            &json!({"style": "pixelate", "threshold": 2, "quality": 5, "targets": ["plates"], "x": 1,
                    "detect_width": 100}),
            &mut errors,
        );
        assert!(bad.is_none());
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "params.detect_width",
                "params.quality",
                "params.style",
                "params.targets",
                "params.threshold",
                "params.x"
            ]
        );
    }
}
