//! The bare CenterFace detector's throughput on a video's frames: decoded up front with ffmpeg,
//! then timed through `FaceDetector::detect` alone (CPU ONNX Runtime, as the worker uses it).
//! Prints frames per second on its last line.
//!
//!   cargo run --release -p xpand-worker --example detect_bench -- clip.mp4

use std::process::Command;
use std::time::Instant;

use anyhow::{ensure, Context as _};
use xpand_worker::face_detect::FaceDetector;

fn main() -> anyhow::Result<()> {
    let clip = std::env::args()
        .nth(1)
        .context("usage: detect_bench <video>")?;
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-show_entries"])
        .args(["stream=width,height", "-of", "csv=p=0", &clip])
        .output()?;
    let size = String::from_utf8(probe.stdout)?;
    let (width, height) = size.trim().split_once(',').context("no frame size")?;
    let (width, height): (u32, u32) = (width.parse()?, height.parse()?);
    let decoded = Command::new("ffmpeg")
        .args(["-v", "error", "-nostdin", "-i", &clip, "-map", "0:v:0"])
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"])
        .output()?;
    ensure!(decoded.status.success(), "ffmpeg could not decode {clip}");
    let frame = (width * height * 3) as usize;
    let frames: Vec<&[u8]> = decoded.stdout.chunks_exact(frame).collect();

    let models = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/centerface");
    let detector = FaceDetector::open(models.as_ref(), &xpand_worker::default_ort_dylib_path())?;
    detector.detect(frames[0], width, height, 0.2)?; // warm-up
    let started = Instant::now();
    let mut faces = 0;
    for rgb in &frames {
        faces += detector.detect(rgb, width, height, 0.2)?.len();
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{} frames of {width}x{height}, {faces} faces, {secs:.2} s",
        frames.len()
    );
    println!("{:.1}", frames.len() as f64 / secs);
    Ok(())
}
