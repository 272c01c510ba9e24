//! Checking an `anonymize` shard's answer: the claims in its result (a box list per frame,
//! inside the frame; a sha256 and size of the upload), the upload itself (the bytes it signed, an
//! H.264 video of the segment's size and frame count), and agreement between two runs (boxes
//! that overlap, on nearly every frame).

use xpand_protocol::{AnonymizeTask, Detection, ShardOutput, ShardTask};

use super::Anonymize;
use crate::files;
use crate::jobs::kind::UploadedShard;
use crate::jobs::Scheduler;
use crate::transfers::output_path;
use xpand_media as media;

/// Two detections are the same face when their boxes overlap at least this much (IoU).
const BOX_IOU: f64 = 0.5;
/// Two video runs agree when at least this share of frames has matching detections.
const FRAMES_AGREEING: f64 = 0.95;

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
pub(super) async fn verify_upload(
    kind: &Anonymize,
    ctx: &Scheduler,
    shard: UploadedShard<'_>,
    output: &ShardOutput,
) -> anyhow::Result<Result<(), String>> {
    let ShardTask::Anonymize(task) = shard.task else {
        return Ok(Err("not an anonymize shard".into()));
    };
    let ShardOutput::Anonymize {
        video_sha256,
        video_bytes,
        ..
    } = output
    else {
        return Ok(Err("not an anonymize output".into()));
    };
    let scratch = kind.scratch_dir()?;
    let local = scratch.path().join("output.mp4");
    let stored = match files::fetch_to_file(
        &ctx.files,
        &output_path(shard.job, shard.idx, shard.assignment),
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

/// Two runs found the same faces: on at least [`FRAMES_AGREEING`] of the frames, every box of
/// one overlaps a box of the other.
pub(super) fn outputs_agree(a: &ShardOutput, b: &ShardOutput) -> bool {
    let (
        ShardOutput::Anonymize { detections: x, .. },
        ShardOutput::Anonymize { detections: y, .. },
    ) = (a, b)
    else {
        return false;
    };
    if x.len() != y.len() {
        return false;
    }
    let matching = x.iter().zip(y).filter(|(f, g)| same_faces(f, g)).count();
    matching as f64 >= FRAMES_AGREEING * x.len() as f64
}

fn same_faces(a: &[Detection], b: &[Detection]) -> bool {
    a.len() == b.len() && a.iter().all(|d| b.iter().any(|e| iou(d, e) >= BOX_IOU))
}

fn iou(a: &Detection, b: &Detection) -> f64 {
    let w = (a.x2.min(b.x2) - a.x1.max(b.x1)).max(0) as f64;
    let h = (a.y2.min(b.y2) - a.y1.max(b.y1)).max(0) as f64;
    let inter = w * h;
    let area = |d: &Detection| ((d.x2 - d.x1) * (d.y2 - d.y1)) as f64;
    let union = area(a) + area(b) - inter;
    if union <= 0.0 {
        0.0
    } else {
        inter / union
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detections_agree_by_overlap() {
        let d = |x1, y1, x2, y2| Detection {
            x1,
            y1,
            x2,
            y2,
            score: 900,
        };
        let video = |frames: Vec<Vec<Detection>>| ShardOutput::Anonymize {
            detections: frames,
            video_sha256: String::new(),
            video_bytes: 1,
        };
        let a = video(vec![vec![d(100, 100, 200, 200)]; 20]);
        let nudged = video(vec![vec![d(104, 98, 203, 199)]; 20]);
        assert!(outputs_agree(&a, &nudged));
        let mut one_off = vec![vec![d(100, 100, 200, 200)]; 20];
        one_off[3] = vec![];
        assert!(outputs_agree(&a, &video(one_off)), "19 of 20 frames");
        let elsewhere = video(vec![vec![d(300, 100, 400, 200)]; 20]);
        assert!(!outputs_agree(&a, &elsewhere));
        let none = video(vec![vec![]; 20]);
        assert!(!outputs_agree(&a, &none));
    }
}
