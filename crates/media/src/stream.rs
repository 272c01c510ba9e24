//! ffmpeg on pipes of raw RGB frames, for the worker: one process decodes a segment the gateway
//! cut to frames on its stdout, another encodes masked frames from its stdin to H.264 in MP4.
//! The decoder reads only a local file, through the `file` protocol and the segment demuxers;
//! [`Children`] kills and reaps both however the caller's pipeline ends, and [`log_tail`] keeps
//! the end of their stderr for error messages.
//!
//! These are blocking `std::process` commands: the worker drives them from threads of its own,
//! and stops them at its own per-segment time limit with [`Children::kill_all`].

use std::io::{self, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use crate::tool::{file_url, whitelists, FFMPEG, QUIET};

/// Demuxers a worker decodes segments with: the gateway cuts them into Matroska; MP4 for tests
/// and tools. No playlist or list formats.
pub const SEGMENT_DEMUXERS: &str = "matroska,webm,mov,mp4";
/// How much of an ffmpeg's stderr [`log_tail`] keeps.
pub const LOG_TAIL_BYTES: usize = 4096;
/// How often a child that should be exiting is checked.
const EXIT_POLL: Duration = Duration::from_millis(5);

/// Raw RGB24 frames on a pipe: their size and rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawFrames {
    pub width: u32,
    pub height: u32,
    pub fps_num: u32,
    pub fps_den: u32,
}

impl RawFrames {
    /// Bytes in one frame.
    pub fn frame_bytes(&self) -> usize {
        self.width as usize * self.height as usize * 3
    }
}

/// `ffmpeg` decoding the first video stream of `input` (a local Matroska or MP4 file, nothing
/// else) to raw RGB frames on stdout, one per decoded frame, unrotated. Its stdin is null, its
/// stdout and stderr piped; it stops at the first decoding error.
pub fn decoder_command(input: &Path) -> Command {
    let mut command = Command::new(FFMPEG);
    command
        .args(QUIET)
        .arg("-xerror")
        .args(whitelists("file,pipe", SEGMENT_DEMUXERS))
        // Frames as coded (the size the gateway probed), not turned by rotation metadata.
        .arg("-noautorotate")
        .arg("-i")
        .arg(file_url(input))
        .args(["-map", "0:v:0", "-fps_mode", "passthrough"])
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// `ffmpeg` encoding raw RGB `frames` from stdin to H.264 in MP4 (x264 at constant rate factor
/// `crf`, 4:2:0, `+faststart`) at `output`, replacing it; one output frame per input frame, no
/// audio. Its stdin and stderr are piped, its stdout null.
pub fn encoder_command(output: &Path, frames: &RawFrames, crf: u8) -> Command {
    let mut command = Command::new(FFMPEG);
    command
        .args(QUIET)
        .arg("-y")
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24"])
        .arg("-s")
        .arg(format!("{}x{}", frames.width, frames.height))
        .arg("-framerate")
        .arg(format!("{}/{}", frames.fps_num, frames.fps_den))
        .args(["-i", "pipe:0", "-map", "0:v:0", "-fps_mode", "passthrough"])
        .args(["-c:v", "libx264", "-preset", "veryfast", "-crf"])
        .arg(crf.to_string())
        .args([
            "-pix_fmt",
            "yuv420p",
            "-movflags",
            "+faststart",
            "-f",
            "mp4",
        ])
        .arg(file_url(output))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// Child processes that are killed and reaped when this is dropped.
#[derive(Default)]
pub struct Children(Mutex<Vec<Child>>);

impl Children {
    fn lock(&self) -> MutexGuard<'_, Vec<Child>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes `child` into care; returns its index.
    pub fn adopt(&self, child: Child) -> usize {
        let mut children = self.lock();
        children.push(child);
        children.len() - 1
    }

    /// Kills every child (from any thread, also while another waits for one).
    pub fn kill_all(&self) {
        for child in self.lock().iter_mut() {
            // Fails only for children that already exited.
            let _ = child.kill();
        }
    }

    /// Waits for child `index` to exit, without holding the lock while it runs, so that
    /// [`Children::kill_all`] can stop it meanwhile.
    pub fn wait(&self, index: usize) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.lock()[index].try_wait()? {
                return Ok(status);
            }
            thread::sleep(EXIT_POLL);
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for child in self.0.get_mut().unwrap_or_else(PoisonError::into_inner) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The last [`LOG_TAIL_BYTES`] of what `from` yields until it ends, as one line.
pub fn log_tail(mut from: impl Read) -> String {
    let mut kept = Vec::new();
    let mut buffer = [0; 4096];
    loop {
        match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                kept.extend_from_slice(&buffer[..n]);
                if kept.len() > 2 * LOG_TAIL_BYTES {
                    kept.drain(..kept.len() - LOG_TAIL_BYTES);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if kept.len() > LOG_TAIL_BYTES {
        kept.drain(..kept.len() - LOG_TAIL_BYTES);
    }
    let text = String::from_utf8_lossy(&kept);
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn log_tails_keep_the_last_lines_on_one_line() {
        assert_eq!(log_tail(&b"\n  first  \n\nsecond\n"[..]), "first | second");
        let long = format!("{}\nlast words\n", "x".repeat(3 * LOG_TAIL_BYTES));
        let tail = log_tail(long.as_bytes());
        assert!(tail.ends_with(" | last words"), "{tail}");
        assert!(tail.len() <= LOG_TAIL_BYTES + 3, "{}", tail.len());
        assert_eq!(log_tail(&b""[..]), "");
    }

    #[test]
    fn children_are_killed_meanwhile_and_reaped_on_drop() {
        let children = Children::default();
        let sleeper = children.adopt(Command::new("sleep").arg("30").spawn().unwrap());
        let pid = children.lock()[sleeper].id();
        let started = Instant::now();
        thread::scope(|scope| {
            scope.spawn(|| {
                thread::sleep(Duration::from_millis(50));
                children.kill_all();
            });
            assert!(!children.wait(sleeper).unwrap().success());
        });
        assert!(started.elapsed() < Duration::from_secs(10));

        let children = Children::default();
        children.adopt(Command::new("sleep").arg("30").spawn().unwrap());
        let pid2 = children.lock()[0].id();
        drop(children);
        for pid in [pid, pid2] {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "process {pid} is left over"
            );
        }
    }

    #[cfg(feature = "test-clips")]
    mod with_ffmpeg {
        use std::io::Write as _;

        use super::*;
        use crate::clips;

        const FRAMES: RawFrames = RawFrames {
            width: 64,
            height: 48,
            fps_num: 25,
            fps_den: 1,
        };

        fn decode(input: &Path) -> (bool, Vec<u8>, String) {
            let out = decoder_command(input).output().unwrap();
            let log = log_tail(&out.stderr[..]);
            (out.status.success(), out.stdout, log)
        }

        #[test]
        fn frames_go_through_the_encoder_and_back_one_for_one() {
            let dir = tempfile::tempdir().unwrap();
            let output = dir.path().join("out.mp4");
            let frames: Vec<Vec<u8>> = (0..10u8)
                .map(|i| vec![i * 20; FRAMES.frame_bytes()])
                .collect();
            let mut encoder = encoder_command(&output, &FRAMES, 18).spawn().unwrap();
            let mut input = encoder.stdin.take().unwrap();
            for frame in &frames {
                input.write_all(frame).unwrap();
            }
            drop(input);
            assert!(encoder.wait_with_output().unwrap().status.success());
            assert_eq!(clips::count_frames_blocking(&output), (10, 64, 48));

            let (success, decoded, log) = decode(&output);
            assert!(success, "{log}");
            assert_eq!(decoded.len(), 10 * FRAMES.frame_bytes());
            for (frame, decoded) in frames
                .iter()
                .zip(decoded.chunks_exact(FRAMES.frame_bytes()))
            {
                let off = frame
                    .iter()
                    .zip(decoded)
                    .map(|(a, b)| a.abs_diff(*b))
                    .max()
                    .unwrap();
                assert!(off <= 3, "a uniform frame came back {off} off");
            }
            assert_eq!(clips::decode_frames(&output, 64, 48).concat(), decoded);
        }

        #[test]
        fn the_decoder_reads_only_local_segments() {
            let dir = tempfile::tempdir().unwrap();
            let png = dir.path().join("frame.png");
            clips::ffmpeg(&[
                "-f",
                "lavfi",
                "-i",
                "testsrc2=s=64x48:d=1",
                "-frames:v",
                "1",
                png.to_str().unwrap(),
            ]);
            let clip = dir.path().join("clip.mkv");
            clips::ffmpeg(&[
                "-f",
                "lavfi",
                "-i",
                "testsrc2=s=64x48:r=25:d=1",
                "-c:v",
                "libx264",
                "-f",
                "matroska",
                clip.to_str().unwrap(),
            ]);
            let playlist = dir.path().join("list.mkv");
            std::fs::write(
                &playlist,
                format!(
                    "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{}\n#EXT-X-ENDLIST\n",
                    clip.display()
                ),
            )
            .unwrap();
            let (success, decoded, log) = decode(&clip);
            assert!(success, "{log}");
            assert_eq!(decoded.len(), 25 * FRAMES.frame_bytes());
            for refused in [png, playlist, dir.path().join("missing.mkv")] {
                let (success, decoded, log) = decode(&refused);
                assert!(!success && decoded.is_empty(), "{}", refused.display());
                assert!(!log.is_empty());
            }
            // A name that looks like an option or a URL is still a local file.
            let (success, _, log) = decode(Path::new("http://127.0.0.1:9/clip.mkv"));
            assert!(!success && !log.contains("Connection"), "{log}");
        }
    }
}
