//! Test clips (feature `test-clips`), one copy for the gateway's integration tests, the worker's
//! tests and this crate's own: made with ffmpeg from scikit-image's astronaut photo (one face,
//! installed by `scripts/setup-models.sh`) over ffmpeg's animated `testsrc2` pattern, and read
//! back as RGB frames. Everything here panics on failure: it is for tests only.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::tool::{FFMPEG, QUIET};

/// Frame rate of every clip; each has a keyframe every second.
pub const FPS: u32 = 25;

/// The astronaut photo: in `XPAND_MODELS_DIR` (as the worker's tests read models) or in
/// `workers/models`, under `centerface/testdata/`.
pub fn astronaut() -> PathBuf {
    let models = std::env::var_os("XPAND_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../workers/models"));
    let photo = models.join("centerface/testdata/astronaut.png");
    assert!(
        photo.is_file(),
        "{} is missing: run scripts/setup-models.sh (make setup does)",
        photo.display()
    );
    photo
}

/// Runs ffmpeg, quiet but for errors, replacing its outputs, with `args`; panics with its
/// stderr when it fails.
pub fn ffmpeg(args: &[&str]) {
    let out = Command::new(FFMPEG)
        .args(QUIET)
        .arg("-y")
        .args(args)
        .output()
        .expect("ffmpeg runs (make setup installs it)");
    assert!(
        out.status.success(),
        "ffmpeg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `seconds`-long MP4 clip in `dir`, H.264 (4:2:0), the face drifting right and pulsing in
/// size; with a 440 Hz tone (AAC) when `audio`. Returns its path.
pub fn make_clip(dir: &Path, width: u32, height: u32, seconds: u32, audio: bool) -> PathBuf {
    let path = dir.join(format!("clip-{width}x{height}-{seconds}s-{audio}.mp4"));
    let tone = format!("sine=f=440:d={seconds}");
    let face = format!(
        "[1]scale=w='{h}*0.45+{h}*0.08*sin(2*t)':h=-2:eval=frame[f];\
         [0][f]overlay=x='{w}*0.08+{w}*0.1*t':y='{h}*0.1':shortest=1[v]",
        w = width,
        h = height
    );
    let mut args = vec![];
    if audio {
        args.extend(["-f", "lavfi", "-i", &tone]);
    }
    args.extend(["-filter_complex", &face, "-map", "[v]"]);
    if audio {
        args.extend(["-map", "2:a", "-c:a", "aac"]);
    }
    args.extend(["-preset", "veryfast", "-pix_fmt", "yuv420p"]);
    overlay_face(&path, width, height, seconds, &args);
    path
}

/// A `seconds`-long Matroska clip at `path`, H.264, no audio: the face `face_width` pixels wide,
/// its photo's top-left corner at (100 + 40 t, 60).
pub fn make_sliding_clip(path: &Path, width: u32, height: u32, seconds: u32, face_width: u32) {
    let face = format!("[1]scale={face_width}:-1[f];[0][f]overlay=x='100+40*t':y=60");
    overlay_face(
        path,
        width,
        height,
        seconds,
        &["-filter_complex", &face, "-f", "matroska"],
    );
}

/// ffmpeg with the pattern as input 0 and the looped photo as input 1, then `middle` (more
/// inputs, the filter, mapping and encoding options), x264 with a keyframe every second, cut to
/// `seconds`, written to `path`.
fn overlay_face(path: &Path, width: u32, height: u32, seconds: u32, middle: &[&str]) {
    let background = format!("testsrc2=s={width}x{height}:r={FPS}:d={seconds}");
    let astronaut = astronaut();
    let (seconds, keyframes) = (seconds.to_string(), FPS.to_string());
    let mut args = vec!["-f", "lavfi", "-i", &background, "-loop", "1", "-i"];
    args.push(astronaut.to_str().expect("a UTF-8 path"));
    args.extend(middle);
    args.extend(["-c:v", "libx264", "-g", &keyframes, "-t", &seconds]);
    args.push(path.to_str().expect("a UTF-8 path"));
    ffmpeg(&args);
}

/// Every frame of the first video stream of `path`, decoded as it is coded, as RGB24 frames of
/// `width`x`height`.
pub fn decode_frames(path: &Path, width: u32, height: u32) -> Vec<Vec<u8>> {
    let out = Command::new(FFMPEG)
        .args(QUIET)
        .arg("-i")
        .arg(path)
        .args(["-map", "0:v:0", "-fps_mode", "passthrough"])
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"])
        .output()
        .expect("ffmpeg runs (make setup installs it)");
    assert!(
        out.status.success(),
        "decoding {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let frame = width as usize * height as usize * 3;
    assert_eq!(
        out.stdout.len() % frame,
        0,
        "{} does not decode to whole frames of {width}x{height}",
        path.display()
    );
    out.stdout.chunks_exact(frame).map(<[u8]>::to_vec).collect()
}

/// (frames, width, height) of the first video stream of `path` by [`crate::count_frames`], from
/// synchronous code (also from inside a tokio runtime: it runs on a thread of its own).
pub fn count_frames_blocking(path: &Path) -> (u32, u32, u32) {
    let counted = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for ffprobe")
                    .block_on(crate::count_frames(path))
            })
            .join()
            .expect("counting frames")
    });
    let (frames, width, height, _) =
        counted.unwrap_or_else(|e| panic!("counting the frames of {}: {e:#}", path.display()));
    (frames, width, height)
}
