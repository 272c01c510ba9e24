//! The bare CenterFace detector's throughput on a video's frames: decoded up front with ffmpeg,
//! then timed through `FaceDetector::detect` alone (CPU ONNX Runtime, as the worker uses it).
//! Prints frames per second on its last line.
//!
//!   cargo run --release -p xpand-worker --example detect_bench -- clip.mp4

use std::time::Instant;

use anyhow::{ensure, Context as _};
use xpand_worker::face_detect::FaceDetector;

fn main() -> anyhow::Result<()> {
    let clip = std::env::args()
        .nth(1)
        .context("usage: detect_bench <video>")?;
    // The worker's own hardened ffprobe and decoder, which take absolute paths.
    let clip = std::fs::canonicalize(&clip).with_context(|| format!("opening {clip}"))?;
    let (_, width, height, _) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(xpand_media::count_frames(&clip))?;
    let decoded = xpand_media::decoder_command(&clip).output()?;
    ensure!(
        decoded.status.success(),
        "ffmpeg could not decode {}: {}",
        clip.display(),
        xpand_media::log_tail(&decoded.stderr[..])
    );
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
