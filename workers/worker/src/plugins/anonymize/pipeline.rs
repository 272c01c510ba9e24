//! One segment through decode → detect → mask → encode: an ffmpeg decodes it to raw RGB frames,
//! a reader thread hands them through a bounded queue to the detect + mask loop on the calling
//! thread, and a writer thread feeds the masked frames to a second ffmpeg that encodes them.
//! A watchdog kills both at the segment's time limit; whatever happens, both are killed and
//! reaped before [`anonymize_file`] returns, and a failure carries the stderr of the ffmpeg that
//! explains it.

use std::io::{self, Read, Write};
use std::path::Path;
use std::process::{ChildStdin, ChildStdout};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::thread::{self, Scope, ScopedJoinHandle};
use std::time::Instant;

use anyhow::{anyhow, ensure, Context as _};
use xpand_media::{decoder_command, encoder_command, log_tail, Children};
use xpand_protocol::Detection;

use super::mask::mask;
use super::VideoSpec;
use crate::plugins::face_detect::{scale_box, FaceBox, FaceDetector, DEFAULT_MASK_SCALE};
use crate::plugins::InputUnusable;

/// Decoded frames waiting for the detector, and masked frames waiting for the encoder.
const QUEUE_FRAMES: usize = 3;

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
        Err(Failure::Decode(e)) => Err(with_log(e, &decoder_log).context(InputUnusable)),
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
            .detect_at(&frame, width, height, spec.threshold, spec.detect_width)
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

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::time::Duration;

    use xpand_media::clips::{astronaut, count_frames_blocking, decode_frames, make_sliding_clip};
    use xpand_protocol::MaskStyle;

    use super::*;
    use crate::plugins::anonymize::mask::Region;
    use crate::plugins::anonymize::testing::{
        detector, face, ffmpeg_children, one_at_a_time, pixel, spec,
    };

    #[test]
    fn detections_are_whole_pixels_inside_the_frame() {
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
