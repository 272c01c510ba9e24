//! Cutting and joining by stream copy, never re-encoding: the gateway splits an upload's video
//! stream at keyframes into segments for workers, and joins the masked segments they send back
//! with the original's audio into one web-playable MP4.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use crate::tool::{ffmpeg_reading, first_line, path_arg, run_args, whitelists, FFMPEG};
use crate::VIDEO_DEMUXERS;

/// Cuts the video stream of `input` before each frame index in `cuts` (each a keyframe), by
/// stream copy into Matroska files in `dir`. Returns the segment paths in order.
pub async fn split(input: &Path, cuts: &[u32], dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let pattern = dir.join("segment-%05d.mkv");
    let mut args = ffmpeg_reading(VIDEO_DEMUXERS);
    args.push(path_arg(input)?);
    args.extend(
        [
            "-map",
            "0:v:0",
            "-c",
            "copy",
            "-f",
            "segment",
            "-segment_format",
            "matroska",
        ]
        .map(String::from),
    );
    if cuts.is_empty() {
        // The segment muxer cuts every 2 s by default: no cut means one segment of it all.
        args.extend(["-segment_time", "1000000000"].map(String::from));
    } else {
        let frames: Vec<String> = cuts.iter().map(u32::to_string).collect();
        args.push("-segment_frames".into());
        args.push(frames.join(","));
    }
    args.extend(["-reset_timestamps", "1"].map(String::from));
    args.push(path_arg(&pattern)?);
    let out = run_args(FFMPEG, &args).await?;
    if !out.success {
        bail!("splitting the video failed: {}", first_line(&out.stderr));
    }
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("segment-"))
        })
        .collect();
    segments.sort();
    Ok(segments)
}

/// Joins `segments` (MP4 files of one codec and size) by stream copy and muxes in the audio of
/// `original`, writing a web-playable MP4 (`+faststart`) to `output`. Audio MP4 cannot carry is
/// re-encoded to AAC.
pub async fn concat_with_audio(
    segments: &[PathBuf],
    original: &Path,
    audio_codec: Option<&str>,
    output: &Path,
) -> anyhow::Result<()> {
    let dir = output.parent().context("output has no directory")?;
    let list = dir.join("segments.ffconcat");
    let mut text = String::from("ffconcat version 1.0\n");
    for segment in segments {
        // Paths are ours (a temporary directory and fixed names), but quote them anyway.
        let path = path_arg(segment)?;
        text.push_str(&format!("file '{}'\n", path.replace('\'', "'\\''")));
    }
    std::fs::write(&list, text).with_context(|| format!("writing {}", list.display()))?;
    // Our own list of our own files: the one place the concat demuxer is allowed.
    let mut args = ffmpeg_reading("concat,mov");
    let i = args.len() - 1;
    args.splice(i..i, ["-f", "concat", "-safe", "0"].map(String::from));
    args.push(path_arg(&list)?);
    args.extend(whitelists("file", VIDEO_DEMUXERS).map(String::from));
    args.push("-i".into());
    args.push(path_arg(original)?);
    args.extend(["-map", "0:v:0", "-map", "1:a:0?", "-c:v", "copy"].map(String::from));
    match audio_codec {
        Some("aac" | "mp3" | "alac") | None => args.extend(["-c:a", "copy"].map(String::from)),
        Some(_) => args.extend(["-c:a", "aac", "-b:a", "192k"].map(String::from)),
    }
    args.extend(["-movflags", "+faststart", "-f", "mp4", "-y"].map(String::from));
    args.push(path_arg(output)?);
    let out = run_args(FFMPEG, &args).await?;
    if !out.success {
        bail!("joining the segments failed: {}", first_line(&out.stderr));
    }
    Ok(())
}

#[cfg(all(test, feature = "test-clips"))]
mod tests {
    use super::*;
    use crate::clips::{ffmpeg, make_clip};
    use crate::{count_frames, probe};

    #[tokio::test]
    async fn a_clip_cut_at_its_keyframes_and_joined_again_keeps_its_frames_and_audio() {
        let dir = tempfile::tempdir().unwrap();
        let clip = make_clip(dir.path(), 320, 240, 3, true);
        let cut = dir.path().join("cut");
        std::fs::create_dir(&cut).unwrap();
        let segments = split(&clip, &[25, 50], &cut).await.unwrap();
        assert_eq!(segments.len(), 3);
        for segment in &segments {
            let (frames, width, height, _) = count_frames(segment).await.unwrap();
            assert_eq!((frames, width, height), (25, 320, 240));
        }

        // Joined from MP4 segments of one codec and size, as workers send them back.
        let masked: Vec<PathBuf> = segments
            .iter()
            .enumerate()
            .map(|(i, segment)| {
                let out = dir.path().join(format!("masked-{i}.mp4"));
                let (input, output) = (segment.to_str().unwrap(), out.to_str().unwrap());
                ffmpeg(&[
                    "-i", input, "-c:v", "libx264", "-pix_fmt", "yuv420p", output,
                ]);
                out
            })
            .collect();
        let joined = dir.path().join("joined.mp4");
        concat_with_audio(&masked, &clip, Some("aac"), &joined)
            .await
            .unwrap();
        let probed = probe(&joined).await.unwrap();
        assert_eq!((probed.frames, probed.width, probed.height), (75, 320, 240));
        assert_eq!(probed.audio_codec.as_deref(), Some("aac"));
        assert!((probed.duration_seconds - 3.0).abs() < 0.1);

        // Only absolute paths are passed to ffmpeg.
        assert!(split(Path::new("clip.mp4"), &[], &cut).await.is_err());
    }

    #[tokio::test]
    async fn a_clip_split_with_no_cut_is_one_segment() {
        // Longer than the segment muxer's default 2 s segments.
        let dir = tempfile::tempdir().unwrap();
        let clip = make_clip(dir.path(), 320, 240, 6, false);
        let cut = dir.path().join("cut");
        std::fs::create_dir(&cut).unwrap();
        let segments = split(&clip, &[], &cut).await.unwrap();
        assert_eq!(segments.len(), 1, "{segments:?}");
        let (frames, _, _, _) = count_frames(&segments[0]).await.unwrap();
        assert_eq!(frames, 150);
    }
}
