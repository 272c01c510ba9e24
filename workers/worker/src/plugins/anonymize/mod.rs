//! Video anonymization (issue 4): one shard is one segment of a video, and every face the
//! CenterFace detector ([`FaceDetector`]) finds in a frame is masked, within the ellipse
//! inscribed in its enlarged box, by a blur, a mosaic or black.
//!
//! A shard GETs its segment from `input_url` into a private temporary directory, decodes it with
//! ffmpeg to RGB frames, detects and masks faces frame by frame, re-encodes with a second ffmpeg
//! (H.264 in MP4, one output frame per input frame, no audio) and PUTs the result to
//! `output_url`, each request signed with the node key (`xpand_protocol::transfer`). Decoding,
//! inference and encoding overlap: a reader thread feeds decoded frames through a bounded
//! channel to the detect + mask loop, which feeds a writer thread the same way.
//!
//! The ffmpeg children (hardened command lines from `xpand_media`) are killed when the shard
//! runs past its time limit ([`time_limit`]) or fails, and are always reaped before
//! [`anonymize_file`](pipeline::anonymize_file) returns; their stderr (the last few KiB) goes
//! into error messages. The temporary directory is removed however the shard ends.
//!
//! Progress chunks are frames: each is committed to by what was masked in it (its list of
//! [`Detection`](xpand_protocol::Detection)s), reported as soon as the frame is masked.
//!
//! This module is the plugin's glue (the task's checks, the shard's steps); `pipeline` runs
//! decode → detect → mask → encode, `mask` paints the masking styles, `transfer` fetches the
//! segment, uploads the output and hashes it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use xpand_media::RawFrames;
use xpand_protocol::{Accelerator, AnonymizeTask, MaskStyle, NodeKey, ShardOutput, ShardTask};

use super::face_detect::FaceDetector;
use super::Plugin;
use crate::models::VerifiedModel;
use crate::onnx::OnnxRuntime;
use pipeline::anonymize_file;
use transfer::{block_on, download, file_digest, http_client, upload};

mod mask;
mod pipeline;
#[cfg(test)]
mod testing;
pub(crate) mod transfer;

/// The shard kind this plugin serves (its model's manifest kind is `face_detect`).
pub const KIND: &str = "anonymize";

/// Largest segment a shard downloads.
pub const MAX_SEGMENT_BYTES: u64 = 2 << 30;
/// Largest frame side, and largest frame area (4096x2304: DCI 4K and UHD fit).
const MAX_SIDE: u32 = 8192;
const MAX_PIXELS: u64 = 4096 * 2304;
/// Most frames in one segment (two hours at 30 fps).
const MAX_FRAMES: u32 = 216_000;
/// Highest frame rate a segment may declare.
const MAX_FPS: f64 = 1000.0;
/// Highest x264 constant rate factor.
const MAX_CRF: u8 = 51;
/// The narrowest a detector input may be: one network input block.
const MIN_DETECT_WIDTH: u32 = 32;

/// Time a segment may take to decode, mask and encode: [`TIME_LIMIT_BASE`] plus
/// [`TIME_LIMIT_PER_FRAME`] for each frame, plus [`TIME_LIMIT_PER_MEGAPIXEL`] for each megapixel
/// of each frame. On a 2-core CPU a 1280x720 frame takes about 0.1 s end to end; the limit is
/// generous so that only a stuck or pathologically slow shard trips it.
const TIME_LIMIT_BASE: Duration = Duration::from_secs(60);
const TIME_LIMIT_PER_FRAME: Duration = Duration::from_secs(1);
const TIME_LIMIT_PER_MEGAPIXEL: Duration = Duration::from_secs(1);

/// What [`anonymize_file`] needs to know about a segment and how to mask it.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoSpec {
    /// Frames the segment must decode to, exactly.
    pub frames: u32,
    /// Size every frame must have, exactly; both even (H.264 in 4:2:0).
    pub width: u32,
    pub height: u32,
    /// Frame rate of the re-encode.
    pub fps_num: u32,
    pub fps_den: u32,
    pub style: MaskStyle,
    /// Detector score above which a face is masked.
    pub threshold: f32,
    /// The width the detector sees frames scaled to; at most `width`.
    pub detect_width: u32,
    /// x264 constant rate factor of the re-encode.
    pub crf: u8,
    /// After this long, the ffmpeg children are killed and the segment fails.
    pub time_limit: Duration,
}

impl VideoSpec {
    /// The spec of a task, checked, with its time limit from [`time_limit`].
    pub fn from_task(task: &AnonymizeTask) -> anyhow::Result<Self> {
        let spec = Self {
            frames: task.frames,
            width: task.width,
            height: task.height,
            fps_num: task.fps_num,
            fps_den: task.fps_den,
            style: task.style,
            threshold: task.threshold,
            detect_width: task.detect_width.unwrap_or(task.width).min(task.width),
            crf: task.crf,
            time_limit: time_limit(task.frames, task.width, task.height),
        };
        spec.check()?;
        Ok(spec)
    }

    fn check(&self) -> anyhow::Result<()> {
        let (width, height) = (self.width, self.height);
        ensure!(
            (1..=MAX_FRAMES).contains(&self.frames),
            "a segment has 1 to {MAX_FRAMES} frames, not {}",
            self.frames
        );
        ensure!(
            (1..=MAX_SIDE).contains(&width)
                && (1..=MAX_SIDE).contains(&height)
                && u64::from(width) * u64::from(height) <= MAX_PIXELS,
            "frames of {width}x{height} are outside what a worker takes (sides up to \
             {MAX_SIDE}, at most {MAX_PIXELS} pixels)"
        );
        ensure!(
            width % 2 == 0 && height % 2 == 0,
            "frames of {width}x{height} cannot be encoded: H.264 in 4:2:0 needs even sides"
        );
        ensure!(
            self.fps_num > 0
                && self.fps_den > 0
                && f64::from(self.fps_num) / f64::from(self.fps_den) <= MAX_FPS,
            "the frame rate {}/{} is not a positive rate up to {MAX_FPS}",
            self.fps_num,
            self.fps_den
        );
        ensure!(
            (0.0..=1.0).contains(&self.threshold),
            "the detection threshold {} is outside 0..=1",
            self.threshold
        );
        // A frame narrower than the floor is seen as it is.
        let narrowest = MIN_DETECT_WIDTH.min(width);
        ensure!(
            (narrowest..=width).contains(&self.detect_width),
            "the detection width {} is outside {narrowest}..={width}",
            self.detect_width
        );
        ensure!(
            self.crf <= MAX_CRF,
            "the crf {} is above {MAX_CRF}",
            self.crf
        );
        Ok(())
    }

    /// The raw frames the decoder and encoder pipes carry.
    fn raw_frames(&self) -> RawFrames {
        RawFrames {
            width: self.width,
            height: self.height,
            fps_num: self.fps_num,
            fps_den: self.fps_den,
        }
    }
}

/// How long a segment of `frames` frames of `width`x`height` may take to decode, mask and
/// encode before its ffmpeg children are killed.
pub fn time_limit(frames: u32, width: u32, height: u32) -> Duration {
    let megapixels = f64::from(width) * f64::from(height) / 1e6;
    let per_frame = TIME_LIMIT_PER_FRAME + TIME_LIMIT_PER_MEGAPIXEL.mul_f64(megapixels);
    TIME_LIMIT_BASE + per_frame * frames
}

/// Serves `anonymize` shards with a CenterFace model (manifest kind `face_detect`).
pub struct AnonymizePlugin {
    detector: FaceDetector,
    http: reqwest::Client,
    /// Signs transfer requests: the gateway serves a shard's URLs only to its node.
    node_key: NodeKey,
    /// Where each shard makes its temporary directory.
    scratch_dir: PathBuf,
}

impl AnonymizePlugin {
    /// Loads the detector from `model` (see [`FaceDetector::load`]); transfers are signed with
    /// `node_key`.
    pub fn load(
        runtime: &OnnxRuntime,
        model: &VerifiedModel,
        node_key: &NodeKey,
    ) -> anyhow::Result<Self> {
        Self::new(FaceDetector::load(runtime, model)?, node_key.clone())
    }

    /// Shards make their temporary directories in the system's temporary directory.
    pub fn new(detector: FaceDetector, node_key: NodeKey) -> anyhow::Result<Self> {
        Ok(Self {
            detector,
            http: http_client()?,
            node_key,
            scratch_dir: std::env::temp_dir(),
        })
    }

    /// Where the detector runs.
    pub fn runs_on(&self) -> Accelerator {
        self.detector.runs_on()
    }
}

impl Plugin for AnonymizePlugin {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn run(
        &self,
        task: &ShardTask,
        progress: &mut dyn FnMut(&ShardOutput) -> bool,
    ) -> anyhow::Result<ShardOutput> {
        let ShardTask::Anonymize(task) = task else {
            bail!(
                "an anonymize plugin cannot run `{}` shards",
                super::task_kind(task)
            );
        };
        let spec = VideoSpec::from_task(task)?;
        // Removed when dropped, however this returns.
        let dir = tempfile::Builder::new()
            .prefix("xpand-anonymize-")
            .tempdir_in(&self.scratch_dir)
            .with_context(|| {
                format!(
                    "creating a temporary directory in {}",
                    self.scratch_dir.display()
                )
            })?;
        let input = dir.path().join("segment.mkv");
        let output = dir.path().join("out.mp4");

        block_on(download(
            &self.http,
            &self.node_key,
            &task.input_url,
            &input,
            MAX_SEGMENT_BYTES,
        ))?
        .context("fetching the segment")?;
        let detections = anonymize_file(&self.detector, &input, &output, &spec, &mut |done| {
            progress(&ShardOutput::Anonymize {
                detections: done.to_vec(),
                video_sha256: String::new(),
                video_bytes: 0,
            })
        })?;
        let (video_sha256, video_bytes) =
            file_digest(&output).context("reading the masked segment")?;
        let sent = block_on(upload(
            &self.http,
            &self.node_key,
            &output,
            &task.output_url,
        ))?
        .context("uploading the masked segment")?;
        ensure!(
            sent == video_bytes,
            "the masked segment changed while it was uploaded"
        );
        Ok(ShardOutput::Anonymize {
            detections,
            video_sha256,
            video_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::testing::task;
    use super::*;

    #[test]
    fn specs_outside_what_a_worker_takes_are_refused() {
        let spec = VideoSpec::from_task(&task()).unwrap();
        assert_eq!(spec.time_limit, time_limit(50, 640, 360));
        assert!(spec.time_limit > Duration::from_secs(60 + 50));
        let refused: [fn(&mut AnonymizeTask); 10] = [
            |t| t.frames = 0,
            |t| t.width = 641,
            |t| t.height = 0,
            |t| (t.width, t.height) = (8192, 8192),
            |t| t.fps_den = 0,
            |t| t.fps_num = 0,
            |t| t.threshold = f32::NAN,
            |t| t.threshold = 1.5,
            |t| t.crf = 52,
            |t| t.detect_width = Some(8),
        ];
        // A frame narrower than the floor is still taken, seen at its own width.
        let narrow = AnonymizeTask {
            width: 16,
            height: 16,
            ..task()
        };
        assert_eq!(VideoSpec::from_task(&narrow).unwrap().detect_width, 16);
        for change in refused {
            let mut task = task();
            change(&mut task);
            assert!(VideoSpec::from_task(&task).is_err(), "{task:?}");
        }
    }
}
