//! ffprobe and ffmpeg, hardened: they only ever read local files the gateway wrote itself, only
//! through the `file` protocol and only with the container demuxers named here (a crafted
//! playlist or concat list cannot make them fetch a URL or read another file), each under a time
//! limit, killed when it runs over or its caller goes away.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::Deserialize;
use tokio::process::Command;

/// Demuxers an uploaded video may be read with (matched against ffmpeg's demuxer names, so
/// `mov` covers MP4/MOV/M4V and `matroska` covers WebM). No playlist or list formats.
pub const VIDEO_DEMUXERS: &str = "mov,matroska,webm,avi,mpegts";
/// How long one probe or stream copy may take.
pub const TOOL_TIME_LIMIT: Duration = Duration::from_secs(120);
/// Keep this much of a tool's stderr for error messages.
const STDERR_LIMIT: usize = 2_000;

/// What the gateway needs to know about an uploaded video.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoProbe {
    pub container: String,
    pub codec: String,
    pub width: u32,
    pub height: u32,
    pub fps_num: u32,
    pub fps_den: u32,
    /// Packets of the first video stream: its frames.
    pub frames: u32,
    /// Frame indices (in stream order) of the keyframes, starting with 0.
    pub keyframes: Vec<u32>,
    pub duration_seconds: f64,
    /// Codec of the first audio stream, if any.
    pub audio_codec: Option<String>,
}

/// Why a file is not a video the gateway will take.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}")]
    Unusable(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

#[derive(Deserialize)]
struct ProbeJson {
    #[serde(default)]
    streams: Vec<StreamJson>,
    format: Option<FormatJson>,
}

#[derive(Deserialize)]
struct StreamJson {
    codec_type: Option<String>,
    codec_name: Option<String>,
    width: Option<u32>,
    height: Option<u32>,
    r_frame_rate: Option<String>,
    nb_frames: Option<String>,
}

#[derive(Deserialize)]
struct FormatJson {
    format_name: Option<String>,
    duration: Option<String>,
}

/// Probes `path`: container and streams first, then every packet of the video stream (no
/// decoding) to count frames and find keyframes. A file whose index promises more frames than it
/// holds (truncated) or that the demuxer reports errors in is refused.
pub async fn probe(path: &Path) -> Result<VideoProbe, ProbeError> {
    let out = ffprobe(
        &[
            "-show_entries",
            "format=format_name,duration:stream=codec_type,codec_name,width,height,r_frame_rate,nb_frames",
            "-of",
            "json",
        ],
        path,
    )
    .await?;
    if !out.success {
        return Err(ProbeError::Unusable(format!(
            "not a video file this service reads ({})",
            first_line(&out.stderr)
        )));
    }
    let parsed: ProbeJson = serde_json::from_slice(&out.stdout).context("parsing ffprobe json")?;
    let format = parsed
        .format
        .ok_or_else(|| ProbeError::Unusable("not a video file".into()))?;
    let video = parsed
        .streams
        .iter()
        .find(|s| s.codec_type.as_deref() == Some("video"))
        .ok_or_else(|| ProbeError::Unusable("the file has no video stream".into()))?;
    let audio_codec = parsed
        .streams
        .iter()
        .find(|s| s.codec_type.as_deref() == Some("audio"))
        .and_then(|s| s.codec_name.clone());
    let (Some(width), Some(height)) = (video.width, video.height) else {
        return Err(ProbeError::Unusable(
            "the video stream has no frame size".into(),
        ));
    };
    let (fps_num, fps_den) = video
        .r_frame_rate
        .as_deref()
        .and_then(parse_rate)
        .ok_or_else(|| ProbeError::Unusable("the video stream has no frame rate".into()))?;

    let packets = ffprobe(
        &[
            "-select_streams",
            "v:0",
            "-show_entries",
            "packet=flags",
            "-of",
            "csv=p=0",
        ],
        path,
    )
    .await?;
    if !packets.success || !packets.stderr.trim().is_empty() {
        return Err(ProbeError::Unusable(format!(
            "the video is corrupt or truncated ({})",
            first_line(&packets.stderr)
        )));
    }
    let flags = String::from_utf8_lossy(&packets.stdout);
    let mut frames: u32 = 0;
    let mut keyframes = Vec::new();
    for line in flags.lines().filter(|l| !l.trim().is_empty()) {
        if line.starts_with('K') {
            keyframes.push(frames);
        }
        frames += 1;
    }
    if frames == 0 {
        return Err(ProbeError::Unusable("the video has no frames".into()));
    }
    if keyframes.first() != Some(&0) {
        return Err(ProbeError::Unusable(
            "the video does not start with a keyframe".into(),
        ));
    }
    if let Some(indexed) = video
        .nb_frames
        .as_deref()
        .and_then(|n| n.parse::<u32>().ok())
    {
        if indexed != frames {
            return Err(ProbeError::Unusable(format!(
                "the video is truncated or corrupt: its index lists {indexed} frames but \
                 {frames} can be read"
            )));
        }
    }
    let duration_seconds = format
        .duration
        .as_deref()
        .and_then(|d| d.parse::<f64>().ok())
        .filter(|d| d.is_finite() && *d > 0.0)
        .unwrap_or(f64::from(frames) * f64::from(fps_den) / f64::from(fps_num));
    Ok(VideoProbe {
        container: format.format_name.unwrap_or_default(),
        codec: video.codec_name.clone().unwrap_or_default(),
        width,
        height,
        fps_num,
        fps_den,
        frames,
        keyframes,
        duration_seconds,
        audio_codec,
    })
}

/// `"30000/1001"` → (30000, 1001); `None` for zero or nonsense.
fn parse_rate(rate: &str) -> Option<(u32, u32)> {
    let (num, den) = rate.split_once('/')?;
    let (num, den): (u32, u32) = (num.parse().ok()?, den.parse().ok()?);
    (num > 0 && den > 0).then_some((num, den))
}

/// Video frames in `path` (packets of its first video stream), with its frame size and codec.
pub async fn count_frames(path: &Path) -> anyhow::Result<(u32, u32, u32, String)> {
    let out = ffprobe(
        &[
            "-count_packets",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=nb_read_packets,width,height,codec_name",
            "-of",
            "json",
        ],
        path,
    )
    .await?;
    if !out.success {
        bail!("not a readable video: {}", first_line(&out.stderr));
    }
    #[derive(Deserialize)]
    struct Counted {
        streams: Vec<CountedStream>,
    }
    #[derive(Deserialize)]
    struct CountedStream {
        nb_read_packets: Option<String>,
        width: Option<u32>,
        height: Option<u32>,
        codec_name: Option<String>,
    }
    let counted: Counted = serde_json::from_slice(&out.stdout).context("parsing ffprobe json")?;
    let stream = counted.streams.first().context("no video stream")?;
    let frames = stream
        .nb_read_packets
        .as_deref()
        .and_then(|n| n.parse().ok())
        .context("no packet count")?;
    Ok((
        frames,
        stream.width.unwrap_or(0),
        stream.height.unwrap_or(0),
        stream.codec_name.clone().unwrap_or_default(),
    ))
}

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
    if !cuts.is_empty() {
        let frames: Vec<String> = cuts.iter().map(u32::to_string).collect();
        args.push("-segment_frames".into());
        args.push(frames.join(","));
    }
    args.extend(["-reset_timestamps", "1"].map(String::from));
    args.push(path_arg(&pattern)?);
    let out = run_args("ffmpeg", &args).await?;
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
    args.extend(
        [
            "-protocol_whitelist",
            "file",
            "-format_whitelist",
            VIDEO_DEMUXERS,
            "-i",
        ]
        .map(String::from),
    );
    args.push(path_arg(original)?);
    args.extend(["-map", "0:v:0", "-map", "1:a:0?", "-c:v", "copy"].map(String::from));
    match audio_codec {
        Some("aac" | "mp3" | "alac") | None => args.extend(["-c:a", "copy"].map(String::from)),
        Some(_) => args.extend(["-c:a", "aac", "-b:a", "192k"].map(String::from)),
    }
    args.extend(["-movflags", "+faststart", "-f", "mp4", "-y"].map(String::from));
    args.push(path_arg(output)?);
    let out = run_args("ffmpeg", &args).await?;
    if !out.success {
        bail!("joining the segments failed: {}", first_line(&out.stderr));
    }
    Ok(())
}

/// ffmpeg's arguments up to its first `-i`: quiet but for errors, local files only, through
/// the demuxers in `demuxers`.
fn ffmpeg_reading(demuxers: &str) -> Vec<String> {
    [
        "-nostdin",
        "-hide_banner",
        "-loglevel",
        "error",
        "-protocol_whitelist",
        "file",
        "-format_whitelist",
        demuxers,
        "-i",
    ]
    .map(String::from)
    .to_vec()
}

fn path_arg(path: &Path) -> anyhow::Result<String> {
    let s = path
        .to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))?;
    // A leading '-' would read as an option; ffmpeg's own `file:` prefix would not stop a
    // relative path starting with one either, so keep paths absolute.
    anyhow::ensure!(path.is_absolute(), "{s} is not an absolute path");
    Ok(s.to_string())
}

/// The first message in a tool's stderr, without ffmpeg's `[h264 @ 0x55...]` context prefix
/// and the local path (which means nothing to the caller).
fn first_line(stderr: &str) -> String {
    let line = stderr
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no detail");
    let line = match line.strip_prefix('[').and_then(|l| l.split_once("] ")) {
        Some((_, rest)) => rest,
        None => line,
    };
    let line = line.rsplit_once(": ").map_or(
        line,
        |(head, tail)| {
            if head.starts_with('/') {
                tail
            } else {
                line
            }
        },
    );
    line.chars().take(300).collect()
}

struct Output {
    success: bool,
    stdout: Vec<u8>,
    stderr: String,
}

/// ffprobe on the local file `input`, quiet but for errors, through the whitelists.
async fn ffprobe(args: &[&str], input: &Path) -> anyhow::Result<Output> {
    let mut all: Vec<String> = [
        "-v",
        "error",
        "-protocol_whitelist",
        "file",
        "-format_whitelist",
        VIDEO_DEMUXERS,
    ]
    .iter()
    .chain(args)
    .map(|a| a.to_string())
    .collect();
    all.push(path_arg(input)?);
    run_args("ffprobe", &all).await
}

/// Runs `tool` with `args` under [`TOOL_TIME_LIMIT`]; the process is killed when it runs over
/// (or this future is dropped).
async fn run_args(tool: &str, args: &[String]) -> anyhow::Result<Output> {
    let child = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {tool} (is ffmpeg installed? `make setup` does it)"))?;
    let out = tokio::time::timeout(TOOL_TIME_LIMIT, child.wait_with_output())
        .await
        .map_err(|_| anyhow::anyhow!("{tool} ran longer than {TOOL_TIME_LIMIT:?}; killed"))?
        .with_context(|| format!("running {tool}"))?;
    let stderr: String = String::from_utf8_lossy(&out.stderr)
        .chars()
        .take(STDERR_LIMIT)
        .collect();
    Ok(Output {
        success: out.status.success(),
        stdout: out.stdout,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn tool_messages_lose_their_context_prefix_and_our_paths() {
        assert_eq!(
            super::first_line("\n[hls @ 0x55ffa67a64c0] Format not on whitelist 'mov'\nmore"),
            "Format not on whitelist 'mov'"
        );
        assert_eq!(
            super::first_line("/tmp/xpand/video-1/original: Invalid data found"),
            "Invalid data found"
        );
        assert_eq!(super::first_line(""), "no detail");
    }

    #[test]
    fn frame_rates_parse_as_fractions() {
        assert_eq!(parse_rate("25/1"), Some((25, 1)));
        assert_eq!(parse_rate("30000/1001"), Some((30000, 1001)));
        assert_eq!(parse_rate("0/0"), None);
        assert_eq!(parse_rate("25"), None);
    }
}
