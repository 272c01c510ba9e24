//! What a video holds, read by ffprobe without decoding: the container, the first video
//! stream's codec, size, frame rate, frame count and keyframes, and the first audio stream's
//! codec. The gateway probes every upload before it accepts a job and counts the frames of what
//! workers send back; a file the tools cannot read, or whose index does not match its packets,
//! is refused with a reason the caller can be shown.

use std::path::Path;

use anyhow::{bail, Context as _};
use serde::Deserialize;

use crate::tool::{ffprobe, first_line};

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
    #[serde(default)]
    packets: Vec<PacketJson>,
}

#[derive(Deserialize)]
struct StreamJson {
    index: Option<u32>,
    codec_type: Option<String>,
    codec_name: Option<String>,
    width: Option<u32>,
    height: Option<u32>,
    r_frame_rate: Option<String>,
    nb_frames: Option<String>,
}

#[derive(Deserialize)]
struct PacketJson {
    stream_index: Option<u32>,
    #[serde(default)]
    flags: String,
}

#[derive(Deserialize)]
struct FormatJson {
    format_name: Option<String>,
    duration: Option<String>,
}

/// Probes `path` in one ffprobe run: container and streams, and every packet (no decoding) to
/// count the video stream's frames and find its keyframes. A file whose index promises more
/// frames than it holds (truncated) or that the demuxer reports errors in is refused.
pub async fn probe(path: &Path) -> Result<VideoProbe, ProbeError> {
    let out = ffprobe(
        &[
            "-show_entries",
            "format=format_name,duration:\
             stream=index,codec_type,codec_name,width,height,r_frame_rate,nb_frames:\
             packet=stream_index,flags",
            "-of",
            "json",
        ],
        path,
    )
    .await?;
    let parsed: Option<ProbeJson> = serde_json::from_slice(&out.stdout).ok();
    let Some(ProbeJson {
        streams,
        format: Some(format),
        packets,
    }) = parsed
    else {
        return Err(ProbeError::Unusable(format!(
            "not a video file this service reads ({})",
            first_line(&out.stderr)
        )));
    };
    let video = streams
        .iter()
        .find(|s| s.codec_type.as_deref() == Some("video"))
        .ok_or_else(|| ProbeError::Unusable("the file has no video stream".into()))?;
    let audio_codec = streams
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
    // The demuxer read every packet: a failure or anything it complains of is damage.
    if !out.success || !out.stderr.trim().is_empty() {
        return Err(ProbeError::Unusable(format!(
            "the video is corrupt or truncated ({})",
            first_line(&out.stderr)
        )));
    }
    let mut frames: u32 = 0;
    let mut keyframes = Vec::new();
    for packet in packets.iter().filter(|p| p.stream_index == video.index) {
        if packet.flags.starts_with('K') {
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

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn frame_rates_parse_as_fractions() {
        assert_eq!(parse_rate("25/1"), Some((25, 1)));
        assert_eq!(parse_rate("30000/1001"), Some((30000, 1001)));
        assert_eq!(parse_rate("0/0"), None);
        assert_eq!(parse_rate("25"), None);
    }

    #[cfg(feature = "test-clips")]
    #[tokio::test]
    async fn clips_probe_as_made_and_what_is_not_a_video_is_refused() {
        use crate::clips::make_clip;
        use crate::{count_frames, probe, ProbeError};

        let dir = tempfile::tempdir().unwrap();
        let clip = make_clip(dir.path(), 320, 240, 2, true);
        let probed = probe(&clip).await.unwrap();
        assert_eq!((probed.width, probed.height), (320, 240));
        assert_eq!((probed.fps_num, probed.fps_den), (25, 1));
        assert_eq!(probed.frames, 50);
        assert_eq!(probed.keyframes, [0, 25]);
        assert_eq!(probed.codec, "h264");
        assert_eq!(probed.audio_codec.as_deref(), Some("aac"));
        assert!(probed.container.contains("mp4"), "{}", probed.container);
        assert!((probed.duration_seconds - 2.0).abs() < 0.1);
        let (frames, width, height, codec) = count_frames(&clip).await.unwrap();
        assert_eq!(
            (frames, width, height, codec.as_str()),
            (50, 320, 240, "h264")
        );

        let bytes = std::fs::read(&clip).unwrap();
        let write = |name: &str, contents: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, contents).unwrap();
            path
        };
        let refused = [
            write("text", b"just some words, not a video"),
            write("truncated", &bytes[..bytes.len() / 2]),
            write(
                "playlist-url",
                b"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\nhttp://127.0.0.1:9/x.ts\n\
                  #EXT-X-ENDLIST\n",
            ),
            write(
                "playlist-file",
                format!(
                    "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{}\n#EXT-X-ENDLIST\n",
                    clip.display()
                )
                .as_bytes(),
            ),
            write(
                "concat-list",
                format!("ffconcat version 1.0\nfile {}\n", clip.display()).as_bytes(),
            ),
            dir.path().join("missing"),
        ];
        for path in refused {
            match probe(&path).await {
                Err(ProbeError::Unusable(why)) => assert!(!why.contains('/'), "{why}"),
                other => panic!("{}: {other:?}", path.display()),
            }
        }
        assert!(matches!(
            probe(std::path::Path::new("clip.mp4")).await,
            Err(ProbeError::Internal(_))
        ));
    }
}
